// The wiring of a kiln node: from NodeOptions to a NodeAgent ready to Start(). kiln-node's main
// reads flags and the environment into NodeProcessOptions and calls CreateNodeProcess; tests that
// serve fakes skip the factory and call NodeAgent::Create with their own catalog.
//
// What is built, in order: the device probe (NodeOptions.device_info), the metrics server
// (NodeOptions.metrics_url), one cache::TieredPackageProvider (node-local package_dir → the
// SharedFsStore on shared_cache_dir, if set → kiln-compile with compile_options under the shared
// store's compile lease, unless !allow_compile; its kiln_artifact_* metrics in the node's
// registry), one FluxPipeline per served (model, precision), all over that provider, the
// ModelCatalog holding them, and the agent, whose advertised on-disk packages are the provider's
// local store's listing.
#pragma once

#include <memory>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "cache/package_provider.h"
#include "common/clock.h"
#include "metrics/metrics_server.h"
#include "node/gpu_telemetry.h"
#include "node/node_agent.h"
#include "node/node_options.h"
#include "prometheus/registry.h"

namespace kiln::node {

struct NodeProcessOptions {
  NodeOptions node;  // device_info and metrics_url are filled in by CreateNodeProcess
  std::string metrics_address = "127.0.0.1:0";  // HOST:PORT to serve /metrics on (port 0: any)
  // Host other machines reach this node at: the registered metrics URL carries it instead of the
  // bound address ("": as bound, 127.0.0.1 for 0.0.0.0).
  std::string advertise_host;
  // CUDA_VISIBLE_DEVICES as the process sees it (main reads the environment); nullopt = unset.
  std::optional<std::string> cuda_visible_devices;
  // cuda nodes: sample the GPU (or MIG slice) through NVML every this many ms; 0 = off.
  int gpu_telemetry_interval_ms = 1000;
};

// A node process's long-lived parts. Members are destroyed in reverse order: the agent (whose
// metrics live in the server's registry) before the metrics server.
struct NodeProcess {
  std::unique_ptr<metrics::MetricsServer> metrics;
  std::unique_ptr<GpuTelemetry> telemetry;  // null on cpu nodes or with telemetry off
  std::unique_ptr<NodeAgent> agent;
};

// Probes the device, starts the metrics server, then CreateNodeAgent. Errors: the probe's
// (FailedPrecondition for a cuda device without a driver, InvalidArgument for a bad one), the
// metrics server's (cannot bind), CreateNodeAgent's.
absl::StatusOr<NodeProcess> CreateNodeProcess(NodeProcessOptions options);

// Builds the provider, pipelines and catalog for `options` (device_info as given) and the agent
// over them; metrics go to `registry`, which must outlive the agent. Reads the repositories'
// configs and tokenizers only (weights and packages load on the first job). InvalidArgument for
// bad options (naming the field) or no models; the pipeline's error, naming the model, for an
// unusable repository; the stores' errors for an unusable package directory.
// The catalog CreateNodeAgent serves: one generator per served (model, precision) over
// `provider`. With options.gpus, each is a sequence-parallel generator: one rank thread per
// device (parallel/sequence_parallel_threads.h), its group up and every rank's pipeline made
// before this returns, the package set asked for with compile_options' `sequence_parallel` =
// the rank count, the regional layout and `process_group` = SequenceParallelGroupName (set
// here; or the operator's compile_options process_group, for a node with one model and one
// precision only: InvalidArgument otherwise); a LoRA job's set is merged on every rank, each
// reading the files from the node's LoRA directories (SequenceParallelPipeline). Errors name
// the model: InvalidArgument for a
// model whose attention heads do not divide over the ranks, the group's error for one that does
// not come up.
// The c10d name of a multi-GPU node's group for one served model and precision, which the
// packages' all-to-alls resolve (compile option `process_group`, part of their key):
// "<model>/<precision>", e.g. "flux-dev/bf16". Distinct for each group of a node (a model name
// has no '/'), the same on every node serving the model, nothing node-specific in it
// (docs/multi_gpu.md).
std::string SequenceParallelGroupName(const std::string& model, const std::string& precision);

absl::StatusOr<std::unique_ptr<ModelCatalog>> CreateNodeCatalog(
    const NodeOptions& options, std::shared_ptr<cache::PackageProvider> provider);

absl::StatusOr<std::unique_ptr<NodeAgent>> CreateNodeAgent(NodeOptions options,
                                                           prometheus::Registry& registry,
                                                           const Clock* clock = nullptr);

}  // namespace kiln::node
