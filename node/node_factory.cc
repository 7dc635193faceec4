#include "node/node_factory.h"

#include <fstream>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cache/package_provider.h"
#include "common/advertise.h"
#include "common/files.h"
#include "common/log.h"
#include "common/status.h"
#include "node/catalog.h"
#include "node/device_probe.h"
#include "parallel/sequence_parallel_threads.h"
#include "pipeline/flux_pipeline.h"

namespace kiln::node {
namespace {

// A Generator over the ranks of a multi-GPU node: the worker's encode stage encodes a job with
// rank 0's pipeline beside the previous job's loop, its denoise stage runs the loop over every
// rank and the decode on rank 0's thread.
class SequenceParallelGenerator : public Generator {
 public:
  explicit SequenceParallelGenerator(std::unique_ptr<parallel::SequenceParallelThreads> ranks)
      : ranks_(std::move(ranks)) {}
  absl::StatusOr<pipeline::GenerateResult> Generate(
      const pipeline::GenerateRequest& request, const pipeline::ProgressFn& progress) override {
    return ranks_->Generate(request, progress);
  }
  absl::StatusOr<pipeline::EncodedPrompt> EncodePrompt(
      const pipeline::GenerateRequest& request, const pipeline::ProgressFn& progress) override {
    if (!request.loras.empty()) {
      return kiln::InvalidField("spec.loras",
                                "a multi-GPU node (--gpus) does not apply LoRAs yet");
    }
    return ranks_->EncodePrompt(request, progress);
  }
  absl::StatusOr<pipeline::GenerateResult> DenoiseDecode(
      pipeline::EncodedPrompt encoded, const pipeline::ProgressFn& progress) override {
    return ranks_->DenoiseDecode(std::move(encoded), progress);
  }
  std::vector<std::string> DigestsFor(int width, int height) const override {
    return ranks_->DigestsFor(width, height);
  }
  std::vector<std::string> LoadedDigests() const override { return ranks_->LoadedDigests(); }
  // Unavailable for good once a collective of the ranks' group failed.
  absl::Status Health() const override { return ranks_->health(); }
  std::string AppliedLoras() const override { return ranks_->AppliedLoras(); }
  std::vector<std::string> AvailableLoras() const override { return ranks_->AvailableLoras(); }

 private:
  std::unique_ptr<parallel::SequenceParallelThreads> ranks_;
};

// The transformer's attention heads (its config.json), which Ulysses splits over the ranks;
// -1 when the config does not say.
int64_t AttentionHeads(const std::string& model_dir) {
  std::ifstream in(model_dir + "/transformer/config.json");
  const nlohmann::json config = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (!config.is_object()) return -1;
  const auto heads = config.find("num_attention_heads");
  return heads != config.end() && heads->is_number_integer() ? heads->get<int64_t>() : -1;
}

}  // namespace

std::string SequenceParallelGroupName(const std::string& model, const std::string& precision) {
  return absl::StrCat(model, "/", precision);
}

absl::StatusOr<NodeProcess> CreateNodeProcess(NodeProcessOptions options) {
  if (auto s = options.node.Validate(); !s.ok()) return s;
  ProbeOptions probe;
  probe.device = options.node.device;
  probe.cuda_visible_devices = options.cuda_visible_devices;
  // A multi-GPU node: every listed GPU must exist and be the same kind of card (one device
  // class for placement); the first one's DeviceInfo is registered, with gpu_count.
  auto device = options.node.gpus.empty()
                    ? ProbeDevice(probe)
                    : ProbeDevices(options.node.RankDevices(), probe);
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

absl::StatusOr<std::unique_ptr<ModelCatalog>> CreateNodeCatalog(
    const NodeOptions& options, std::shared_ptr<cache::PackageProvider> provider) {
  const int ranks = static_cast<int>(options.gpus.size());
  std::vector<std::string> precisions = options.precisions;
  if (precisions.empty()) precisions.push_back(options.precision);
  auto catalog = std::make_unique<ModelCatalog>(options.precision, options.resolutions);
  // Each group registers under its own name (several in this process); one the operator gives
  // in compile_options serves one group only.
  const bool named = options.compile_options.is_object() &&
                     options.compile_options.contains("process_group");
  if (ranks > 1 && named && options.models.size() * precisions.size() > 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "compile_options process_group: one name for ", options.models.size(), " model(s) x ",
        precisions.size(), " precision(s); leave it out and each group is named ",
        "<model>/<precision>"));
  }
  for (const auto& [name, dir] : options.models) {
    if (ranks > 1) {
      const int64_t heads = AttentionHeads(dir);
      if (heads > 0 && heads % ranks != 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("model ", name, " (", dir, "): its ", heads,
                         " attention heads do not divide over ", ranks, " ranks (--gpus)"));
      }
    }
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
      // Named copies: a C++17 lambda cannot capture structured bindings (clang refuses).
      const auto failed = [&precision, model = name, model_dir = dir](const absl::Status& s) {
        return absl::Status(s.code(), absl::StrCat("model ", model, " (", model_dir, ", ",
                                                   precision, "): ", s.message()));
      };
      if (ranks > 1) {
        // The sequence-parallel set of KeyPolicy's key: one rank's regional set of P.
        po.compile_options["layout"] = "regional";
        po.compile_options["sequence_parallel"] = ranks;
        // The group's name, in the packages' key: the model's served name and the precision,
        // nothing of this node's, so every node serving the model shares the set
        // (docs/multi_gpu.md).
        if (!named) {
          po.compile_options["process_group"] = SequenceParallelGroupName(name, precision);
        }
        parallel::ThreadsOptions threads;
        threads.devices = options.RankDevices();
        threads.timeout_seconds = options.group_timeout_seconds;
        auto started = parallel::SequenceParallelThreads::Start(threads, po, provider);
        if (!started.ok()) return failed(started.status());
        catalog->Add(name, precision,
                     std::make_unique<SequenceParallelGenerator>(*std::move(started)));
        continue;
      }
      auto p = pipeline::FluxPipeline::Create(po, provider);
      if (!p.ok()) return failed(p.status());
      catalog->Add(name, precision, std::make_unique<PipelineGenerator>(*std::move(p)));
    }
  }
  return catalog;
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

  auto catalog = CreateNodeCatalog(options, provider);
  if (!catalog.ok()) return catalog.status();
  // The inventory is the provider's local store; the aliasing pointer keeps the provider alive.
  std::shared_ptr<const cache::LocalDiskStore> packages(provider, &provider->local());
  return NodeAgent::Create(std::move(options), *std::move(catalog), std::move(packages), registry,
                           clock);
}

}  // namespace kiln::node
