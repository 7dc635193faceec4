#include "parallel/sequence_parallel_pipeline.h"

#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/log.h"
#include "parallel/sequence_parallel.h"
#include "parallel/weight_broadcast.h"
#include "pipeline/denoiser.h"
#include "pipeline/weights.h"

namespace kiln::parallel {
namespace {

constexpr int64_t kStop = 0, kJob = 1, kIdle = 2;
constexpr int64_t kHeader = 5;  // kind, width, height, steps, bytes of the job's LoRA set
constexpr size_t kMaxMessage = 4096;  // bytes of a refusing rank's error sent to the others
constexpr int64_t kMaxLoraBytes = 65536;  // far above any valid set's (EncodeLoras)

// A job's LoRA set as the header's bytes: "NAME:SCALE" per LoRA (the scale exact, %.17g), one a
// line, read back by ParseLoraChoice. A few hundred bytes at most (GenerateRequest::Validate:
// at most kMaxLoras names of at most 128 characters).
std::string EncodeLoras(const std::vector<LoraChoice>& loras) {
  std::vector<std::string> lines;
  for (const auto& l : loras) lines.push_back(absl::StrFormat("%s:%.17g", l.name, l.scale));
  return absl::StrJoin(lines, "\n");
}

absl::StatusOr<std::vector<LoraChoice>> DecodeLoras(const std::string& bytes) {
  std::vector<LoraChoice> loras;
  if (bytes.empty()) return loras;
  for (absl::string_view line : absl::StrSplit(bytes, '\n')) {
    auto choice = ParseLoraChoice(absl::StrCat("the job header's loras[", loras.size(), "]"),
                                  line);
    if (!choice.ok()) return choice.status();
    loras.push_back(*std::move(choice));
  }
  return loras;
}

// The header's tensor: {kind, width, height, steps, LoRA bytes}.
at::Tensor Header(int64_t kind, int64_t width = 0, int64_t height = 0, int64_t steps = 0,
                  int64_t lora_bytes = 0) {
  return torch::tensor({kind, width, height, steps, lora_bytes}, torch::dtype(torch::kLong));
}

}  // namespace

absl::StatusOr<std::unique_ptr<SequenceParallelPipeline>> SequenceParallelPipeline::Create(
    ProcessGroup& group, pipeline::PipelineOptions options,
    std::shared_ptr<cache::PackageProvider> provider) {
  if (options.denoise_loop) {
    return absl::InvalidArgumentError(
        "denoise_loop: set by SequenceParallelPipeline, must be empty");
  }
  // Not an integer, or not an object: FluxPipeline::Create's Validate names it.
  const nlohmann::json p = options.compile_options.is_object()
                               ? options.compile_options.value("sequence_parallel",
                                                               nlohmann::json(1))
                               : nlohmann::json(1);
  if (p.is_number_integer() && p.get<int64_t>() != group.world_size()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "sequence parallel: the package set (compile_options sequence_parallel) is for ",
        p.get<int64_t>(), " rank(s), the group has ", group.world_size()));
  }
  // The name the set's all-to-alls resolve (a group of one runs none).
  if (const std::string name = pipeline::ProcessGroupName(options.compile_options);
      group.world_size() > 1 && name != group.group_name()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "sequence parallel: the package set's all-to-alls resolve process group \"", name,
        "\" (compile_options process_group), the group is registered as \"",
        group.group_name(), "\""));
  }
  try {
    const c10::Device device(options.device);
    if (device.type() != group.device().type() ||
        (device.has_index() && device.index() != group.device().index())) {
      return absl::InvalidArgumentError(absl::StrCat("device '", options.device,
                                                     "': the group runs on ",
                                                     group.device().str()));
    }
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("device '", options.device, "': ", ExceptionMessage(e)));
  }
  std::unique_ptr<SequenceParallelPipeline> sp(new SequenceParallelPipeline(group));
  // The transformer weights first, on every rank at once: nothing before this can fail on a
  // follower alone, so no rank waits in the broadcast for one that gave up.
  std::unique_ptr<pipeline::ComponentWeights> weights;
  if (group.world_size() > 1) {
    BroadcastOptions b;
    b.dir = options.model_dir + "/" + pipeline::ComponentWeights::FolderFor("transformer");
    b.stem = pipeline::ComponentWeights::StemFor("transformer");
    auto got = BroadcastWeights(group, b);
    if (!got.ok()) {
      return absl::Status(got.status().code(),
                          absl::StrCat("sequence parallel: the transformer weights broadcast: ",
                                       got.status().message()));
    }
    sp->broadcast_bytes_ = got->bytes;
    sp->broadcast_seconds_ = got->seconds;
    LogInfo("parallel", absl::StrCat("sequence parallel rank ", group.rank(), ": ",
                                     got->tensors.size(), " transformer tensors (", got->bytes,
                                     " bytes) ", group.rank() == 0 ? "read and broadcast" :
                                     "received", " in ", got->seconds, " s"));
    auto held = pipeline::ComponentWeights::FromTensors(
        std::move(got->tensors), group.device(),
        group.rank() == 0 ? b.dir + " (read once, broadcast to every rank)"
                          : "the transformer weights broadcast by rank 0");
    if (!held.ok()) return held.status();
    weights = *std::move(held);
  }
  options.denoise_loop = [raw = sp.get()](pipeline::DenoiseJob& job) { return raw->Loop(job); };
  auto flux = pipeline::FluxPipeline::Create(options, std::move(provider));
  if (!flux.ok()) return flux.status();
  sp->pipeline_ = *std::move(flux);
  if (weights != nullptr) {
    if (auto s = sp->pipeline_->UseWeights("transformer", std::move(weights)); !s.ok()) return s;
  }
  return sp;
}

SequenceParallelPipeline::~SequenceParallelPipeline() = default;

int SequenceParallelPipeline::rank() const { return group_.rank(); }

absl::Status SequenceParallelPipeline::Rendezvous(const absl::Status& error) {
  met_ = true;
  const int world = group_.world_size();
  auto flags = group_.AllGather(
      torch::tensor({static_cast<int64_t>(error.ok())}, torch::dtype(torch::kLong)));
  if (!flags.ok()) return flags.status();
  std::vector<int> refused;
  for (int r = 0; r < world; ++r) {
    if ((*flags)[r].item<int64_t>() == 0) refused.push_back(r);
  }
  if (refused.empty()) return absl::OkStatus();
  // The first refusing rank's error, sent to every rank from there.
  const int first = refused[0];
  std::string message(error.message().substr(0, kMaxMessage));
  at::Tensor length = torch::tensor({static_cast<int64_t>(message.size())},
                                    torch::dtype(torch::kLong));
  if (auto s = group_.Broadcast(length, first); !s.ok()) return s;
  at::Tensor bytes = torch::zeros({length.item<int64_t>()}, torch::dtype(torch::kByte));
  if (rank() == first) std::memcpy(bytes.data_ptr(), message.data(), message.size());
  if (bytes.numel() > 0) {
    if (auto s = group_.Broadcast(bytes, first); !s.ok()) return s;
  }
  const std::string why(reinterpret_cast<const char*>(bytes.data_ptr()), bytes.numel());
  if (!error.ok()) return error;
  if (first == 0) {
    return absl::AbortedError(absl::StrCat("sequence parallel: rank 0 failed the job: ", why));
  }
  return absl::FailedPreconditionError(
      absl::StrCat("sequence parallel: rank(s) ", absl::StrJoin(refused, ", "),
                   " could not take the job (rank ", first, ": ", why, ")"));
}

absl::Status SequenceParallelPipeline::Loop(pipeline::DenoiseJob& job) {
  if (auto s = Rendezvous(absl::OkStatus()); !s.ok()) return s;
  SequenceParallelInputs inputs;
  if (rank() == 0) {
    inputs.latents = job.latents;
    inputs.conditioning = job.conditioning;
  }
  auto latents = SequenceParallelDenoise(group_, *job.transformer, inputs, job.schedule, job.act);
  if (!latents.ok()) return latents.status();
  job.latents = *std::move(latents);
  return absl::OkStatus();
}

absl::StatusOr<pipeline::GenerateResult> SequenceParallelPipeline::Generate(
    const pipeline::GenerateRequest& request, const pipeline::ProgressFn& progress) {
  if (rank() != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("sequence parallel: Generate on rank ", rank(), "; only rank 0 leads"));
  }
  // Step 1 once rank 0 has the job's embeddings and packages: what fails before concerns
  // rank 0 alone.
  auto encoded = pipeline_->EncodePrompt(request, progress);
  if (!encoded.ok()) return encoded.status();
  return DenoiseDecode(*std::move(encoded), progress);
}

absl::StatusOr<pipeline::GenerateResult> SequenceParallelPipeline::DenoiseDecode(
    pipeline::EncodedPrompt encoded, const pipeline::ProgressFn& progress) {
  if (rank() != 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "sequence parallel: DenoiseDecode on rank ", rank(), "; only rank 0 leads"));
  }
  const pipeline::GenerateRequest& request = encoded.request;
  // The job's LoRA set follows the header: every rank merges it into its own weights.
  const std::string loras = EncodeLoras(request.loras);
  at::Tensor header = Header(kJob, request.width, request.height, request.steps,
                             static_cast<int64_t>(loras.size()));
  if (auto s = group_.Broadcast(header); !s.ok()) return s;
  if (!loras.empty()) {
    at::Tensor bytes = torch::empty({static_cast<int64_t>(loras.size())},
                                    torch::dtype(torch::kByte));
    std::memcpy(bytes.data_ptr(), loras.data(), loras.size());
    if (auto s = group_.Broadcast(bytes); !s.ok()) return s;
  }
  met_ = false;
  auto result = pipeline_->DenoiseDecode(std::move(encoded), progress);
  if (!met_) {
    // The job failed (or was cancelled) before its loop: the followers still wait in step 2.
    const absl::Status why =
        result.ok() ? absl::InternalError("the job ended without its denoise loop")
                    : result.status();
    Rendezvous(why).IgnoreError();  // rank 0's own error is the job's
  }
  return result;
}

absl::Status SequenceParallelPipeline::SendHeader(int64_t kind, const char* what) {
  if (rank() != 0) {
    return absl::FailedPreconditionError(absl::StrCat("sequence parallel: ", what, " on rank ",
                                                      rank(), "; only rank 0 leads"));
  }
  at::Tensor header = Header(kind);
  return group_.Broadcast(header);
}

absl::Status SequenceParallelPipeline::Stop() { return SendHeader(kStop, "Stop"); }

absl::Status SequenceParallelPipeline::KeepAlive() { return SendHeader(kIdle, "KeepAlive"); }

absl::Status SequenceParallelPipeline::Follow() {
  if (rank() == 0) {
    return absl::FailedPreconditionError("sequence parallel: Follow on rank 0, which leads");
  }
  at::Tensor header = torch::zeros({kHeader}, torch::dtype(torch::kLong));
  do {
    if (auto s = group_.Broadcast(header); !s.ok()) return s;
  } while (header.data_ptr<int64_t>()[0] == kIdle);
  const int64_t* h = header.data_ptr<int64_t>();
  if (h[0] == kStop) return absl::OutOfRangeError("sequence parallel: rank 0 stopped");
  if (h[4] < 0 || h[4] > kMaxLoraBytes) {
    return absl::InternalError(absl::StrCat("sequence parallel: a job header with ", h[4],
                                            " bytes of LoRAs"));
  }
  std::string lora_bytes;
  if (h[4] > 0) {
    at::Tensor bytes = torch::zeros({h[4]}, torch::dtype(torch::kByte));
    if (auto s = group_.Broadcast(bytes); !s.ok()) return s;
    lora_bytes.assign(reinterpret_cast<const char*>(bytes.data_ptr()), bytes.numel());
  }
  met_ = false;
  auto loras = DecodeLoras(lora_bytes);
  absl::Status s = loras.status();
  if (s.ok()) {
    s = pipeline_->FollowDenoise(static_cast<int>(h[1]), static_cast<int>(h[2]),
                                 static_cast<int>(h[3]), *loras);
  }
  if (!met_) {
    // This rank failed before the loop: it still says so in step 2, then returns its error.
    const absl::Status why =
        s.ok() ? absl::InternalError("the job ended without its denoise loop") : s;
    absl::Status met = Rendezvous(why);
    return s.ok() ? met : s;
  }
  return s;
}

}  // namespace kiln::parallel
