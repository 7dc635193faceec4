#include "node/node_factory.h"

#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cache/package_provider.h"
#include "common/advertise.h"
#include "common/files.h"
#include "common/log.h"
#include "node/catalog.h"
#include "node/device_probe.h"
#include "pipeline/flux_pipeline.h"

namespace kiln::node {
absl::StatusOr<NodeProcess> CreateNodeProcess(NodeProcessOptions options) {
  if (auto s = options.node.Validate(); !s.ok()) return s;
  ProbeOptions probe;
  probe.device = options.node.device;
  probe.cuda_visible_devices = options.cuda_visible_devices;
  auto device = ProbeDevice(probe);
  if (!device.ok()) return device.status();
  options.node.device_info = *std::move(device);

  NodeProcess process;
  auto metrics = metrics::MetricsServer::Start(options.metrics_address);
  if (!metrics.ok()) return metrics.status();
  process.metrics = *std::move(metrics);
  options.node.metrics_url = WithHost(process.metrics->url(), options.advertise_host);
  auto telemetry = StartGpuTelemetry(options.gpu_telemetry_interval_ms, options.node.node_id,
                                     options.node.device_info, process.metrics->registry());
  if (!telemetry.ok()) return telemetry.status();
  process.telemetry = *std::move(telemetry);

  auto agent = CreateNodeAgent(std::move(options.node), process.metrics->registry());
  if (!agent.ok()) return agent.status();
  process.agent = *std::move(agent);
  return process;
}

absl::StatusOr<std::unique_ptr<NodeAgent>> CreateNodeAgent(NodeOptions options,
                                                           prometheus::Registry& registry,
                                                           const Clock* clock) {
  if (auto s = options.Validate(); !s.ok()) return s;
  if (options.models.empty()) return absl::InvalidArgumentError("models: at least one is required");
  // One provider for every pipeline (thread-safe; the worker runs one Generate() at a time).
  cache::TieredProviderConfig config;
  config.local.root = options.package_dir;
  config.local.max_bytes = options.package_dir_max_bytes;
  config.local.clock = clock;
  config.shared_root = options.shared_cache_dir;
  config.shared_host = options.hostname;  // "" = gethostname(), as NodeAgent advertises
  if (options.allow_compile) {
    config.compiler_path =
        options.compiler_path.empty() ? ExecutableDir() + "/kiln-compile" : options.compiler_path;
  }
  config.trusted_keys = options.trusted_keys;
  config.signing_key = options.signing_key;
  config.tiered.revocation_file = options.revocation_file;
  if (options.trusted_keys.empty()) {
    LogWarning("node", "no --trusted_keys: package signatures are NOT checked; any package in "
                       "the package dirs or the shared cache will be loaded and run (development "
                       "only; kiln up sets up a cluster signing key)");
  }
  config.tiered.node_id = options.node_id;
  config.tiered.clock = clock;
  auto opened = cache::OpenTieredProvider(std::move(config), &registry);
  if (!opened.ok()) return opened.status();
  std::shared_ptr<cache::TieredPackageProvider> provider = *std::move(opened);

  std::vector<std::string> precisions = options.precisions;
  if (precisions.empty()) precisions.push_back(options.precision);
  auto catalog = std::make_unique<ModelCatalog>(options.precision, options.resolutions);
  for (const auto& [name, dir] : options.models) {
    for (const auto& precision : precisions) {
      pipeline::PipelineOptions po;
      po.model_dir = dir;
      po.device = options.device;
      po.precision = precision;
      po.resolutions = options.resolutions;
      po.compile_options = options.compile_options;  // travels with each package request
      po.lora_dirs = options.lora_dirs;
      // A directory shared cache also holds LoRAs (a Redis one does not).
      if (!options.shared_cache_dir.empty() &&
          options.shared_cache_dir.rfind("redis://", 0) != 0) {
        po.lora_dirs.push_back(options.shared_cache_dir + "/loras");
      }
      auto p = pipeline::FluxPipeline::Create(po, provider);
      if (!p.ok()) {
        return absl::Status(p.status().code(),
                            absl::StrCat("model ", name, " (", dir, ", ", precision,
                                         "): ", p.status().message()));
      }
      catalog->Add(name, precision, std::make_unique<PipelineGenerator>(*std::move(p)));
    }
  }
  // The inventory is the provider's local store; the aliasing pointer keeps the provider alive.
  std::shared_ptr<const cache::LocalDiskStore> packages(provider, &provider->local());
  return NodeAgent::Create(std::move(options), std::move(catalog), std::move(packages), registry,
                           clock);
}

}  // namespace kiln::node
