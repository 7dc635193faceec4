#include "node/node_metrics.h"

#include "metrics/metrics_server.h"

namespace kiln::node {
namespace {

prometheus::Family<prometheus::Histogram>& ColdStart(prometheus::Registry& r) {
  return prometheus::BuildHistogram()
      .Name("kiln_cold_start_seconds")
      .Help("Seconds a node spent making its pipeline ready for a job, by phase (jobs that found "
            "everything warm are not observed)")
      .Register(r);
}

prometheus::Family<prometheus::Counter>& Jobs(prometheus::Registry& r) {
  return prometheus::BuildCounter()
      .Name("kiln_node_jobs_total")
      .Help("Jobs this node finished, by outcome (rejected: never ran)")
      .Register(r);
}

// Steps of flux-tiny on a CPU take milliseconds; of Flux.1-dev on an H100, about a second.
std::vector<double> StepBuckets() {
  return {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30};
}

}  // namespace

NodeMetrics::NodeMetrics(prometheus::Registry& registry, const std::string& node_id,
                         const std::string& device, const kiln::v1::DeviceInfo& device_info)
    : cold_weights(ColdStart(registry).Add({{"phase", "weights"}}, metrics::DurationBuckets())),
      cold_package_load(
          ColdStart(registry).Add({{"phase", "package_load"}}, metrics::DurationBuckets())),
      cold_fetch(ColdStart(registry).Add({{"phase", "fetch"}}, metrics::DurationBuckets())),
      cold_compile(ColdStart(registry).Add({{"phase", "compile"}}, metrics::DurationBuckets())),
      cold_total(ColdStart(registry).Add({{"phase", "total"}}, metrics::DurationBuckets())),
      jobs_succeeded(Jobs(registry).Add({{"outcome", "succeeded"}})),
      jobs_failed(Jobs(registry).Add({{"outcome", "failed"}})),
      jobs_cancelled(Jobs(registry).Add({{"outcome", "cancelled"}})),
      jobs_rejected(Jobs(registry).Add({{"outcome", "rejected"}})),
      job_seconds(prometheus::BuildHistogram()
                      .Name("kiln_node_job_seconds")
                      .Help("Wall time of jobs this node ran: generation and PNG encoding")
                      .Register(registry)
                      .Add({}, metrics::DurationBuckets())),
      step_seconds(prometheus::BuildHistogram()
                       .Name("kiln_node_step_seconds")
                       .Help("Wall time between denoising steps as the host sees them (on cuda "
                             "the host may run ahead of the device by a few steps)")
                       .Register(registry)
                       .Add({}, StepBuckets())),
      lora_switches(prometheus::BuildCounter()
                        .Name("kiln_node_lora_switches_total")
                        .Help("Jobs whose LoRA set differed from the one merged into the "
                              "weights, so the weights were switched (to base included)")
                        .Register(registry)
                        .Add({})),
      lora_switch_seconds(prometheus::BuildHistogram()
                              .Name("kiln_node_lora_switch_seconds")
                              .Help("Time of a LoRA switch on the critical path: reading and "
                                    "verifying LoRA files not read before, and the switch at the "
                                    "job's denoise (loading the weights alone when the set was "
                                    "merged ahead, else merging into the weights and loading "
                                    "them)")
                              .Register(registry)
                              .Add({}, StepBuckets())),
      lora_prepare_seconds(prometheus::BuildHistogram()
                               .Name("kiln_node_lora_prepare_seconds")
                               .Help("Time of merging a job's LoRA set ahead into new "
                                     "weight tensors during its encoding, beside the denoise of "
                                     "the job before (off the critical path)")
                               .Register(registry)
                               .Add({}, StepBuckets())),
      protocol_errors(prometheus::BuildCounter()
                          .Name("kiln_protocol_errors_total")
                          .Help("Malformed, unknown or unexpected messages received, by socket")
                          .Register(registry)
                          .Add({{"socket", "coordinator"}})),
      reconnects(prometheus::BuildCounter()
                     .Name("kiln_node_reconnects_total")
                     .Help("Times the node declared its coordinator dead and reconnected")
                     .Register(registry)
                     .Add({})),
      images(prometheus::BuildCounter()
                 .Name("kiln_node_images_total")
                 .Help("Images this node made (jobs that succeeded), by model")
                 .Register(registry)),
      device_seconds(prometheus::BuildCounter()
                         .Name("kiln_node_device_seconds_total")
                         .Help("Seconds this node's device was busy with a model's jobs (a job "
                               "in its encoding or denoise stage; overlapping jobs counted "
                               "once), by model")
                         .Register(registry)),
      batch_size(prometheus::BuildHistogram()
                     .Name("kiln_node_batch_size")
                     .Help("Jobs denoised and decoded together per batch run, by model (1: a "
                           "job alone)")
                     .Register(registry)),
      rank_group_failures(prometheus::BuildCounter()
                              .Name("kiln_node_rank_group_failures_total")
                              .Help("Rank groups of a multi-GPU node whose collective failed "
                                    "(the node reports itself unhealthy until restarted), by "
                                    "model and precision")
                              .Register(registry)),
      info(prometheus::BuildGauge()
               .Name("kiln_node_info")
               .Help("Always 1; labels describe this node")
               .Register(registry)
               .Add({{"node_id", node_id},
                     {"device", device},
                     {"name", device_info.name()},
                     {"mig_profile", device_info.mig_profile()}})) {
  info.Set(1);
}

prometheus::Histogram::BucketBoundaries NodeMetrics::BatchBuckets() { return {1, 2, 4, 8}; }

}  // namespace kiln::node
