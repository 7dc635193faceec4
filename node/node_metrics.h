// The node's Prometheus metrics, created from the registry main's MetricsServer owns (passed in;
// no global registry). prometheus-cpp metrics are thread-safe; the references stay valid for the
// registry's lifetime, which must outlast this object.
//
//   kiln_cold_start_seconds{phase}        histogram; phase = weights|package_load|fetch|compile|
//                                         total, observed once per job that had to get ready
//   kiln_node_jobs_total{outcome}         counter; succeeded|failed|cancelled|rejected
//   kiln_node_job_seconds                 histogram; wall time of jobs that ran (generate + PNG)
//   kiln_node_step_seconds                histogram; wall time between denoising steps
//   kiln_node_lora_switches_total         counter; jobs whose LoRA set differed from the merged one
//   kiln_node_lora_switch_seconds         histogram; a switch's time on the critical path: LoRA
//                                         files read (first use) + the switch at the job's denoise
//                                         (the swap alone when the set was merged ahead)
//   kiln_node_lora_prepare_seconds        histogram; a set merged ahead in the job's encoding
//                                         (beside the denoise before it; pipeline README "LoRA")
//   kiln_protocol_errors_total{socket}    counter; socket="coordinator": bad or unexpected frames
//   kiln_node_reconnects_total            counter; coordinator declared dead, socket reopened
//   kiln_node_images_total{model}         counter; images made (jobs that succeeded)
//   kiln_node_device_seconds_total{model} counter; seconds the device was busy with the model's
//                                         jobs: while one is in its encoding or denoise stage,
//                                         overlapping jobs counted once (cold starts included).
//                                         Images per GPU-second of a node and model:
//                                         rate(images_total) / rate(device_seconds_total)
//   kiln_node_batch_size{model}           histogram; jobs per batch run (1: alone; node/worker.h)
//   kiln_node_rank_group_failures_total{model,precision}  counter; a multi-GPU node's rank group
//                                         whose collective failed (a rank gone, a timeout): the
//                                         node is unhealthy from then on (node/README.md)
//   kiln_node_info{node_id,device,name,mig_profile}  gauge = 1
#pragma once

#include <string>

#include "common/proto/kiln.pb.h"
#include "prometheus/counter.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace kiln::node {

struct NodeMetrics {
  NodeMetrics(prometheus::Registry& registry, const std::string& node_id,
              const std::string& device, const kiln::v1::DeviceInfo& info);

  prometheus::Histogram& cold_weights;
  prometheus::Histogram& cold_package_load;
  prometheus::Histogram& cold_fetch;
  prometheus::Histogram& cold_compile;
  prometheus::Histogram& cold_total;
  prometheus::Counter& jobs_succeeded;
  prometheus::Counter& jobs_failed;
  prometheus::Counter& jobs_cancelled;
  prometheus::Counter& jobs_rejected;  // never ran: invalid spec, deadline passed, shutting down
  prometheus::Histogram& job_seconds;
  prometheus::Histogram& step_seconds;
  prometheus::Counter& lora_switches;
  prometheus::Histogram& lora_switch_seconds;
  prometheus::Histogram& lora_prepare_seconds;
  prometheus::Counter& protocol_errors;
  prometheus::Counter& reconnects;
  prometheus::Family<prometheus::Counter>& images;          // label: model
  prometheus::Family<prometheus::Counter>& device_seconds;  // label: model
  prometheus::Family<prometheus::Histogram>& batch_size;    // label: model; BatchBuckets()
  static prometheus::Histogram::BucketBoundaries BatchBuckets();
  prometheus::Family<prometheus::Counter>& rank_group_failures;  // labels: model, precision
  prometheus::Gauge& info;
};

}  // namespace kiln::node
