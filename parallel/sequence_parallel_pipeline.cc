#include "parallel/sequence_parallel_pipeline.h"

#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "parallel/sequence_parallel.h"
#include "pipeline/denoiser.h"

namespace kiln::parallel {
namespace {

constexpr int64_t kStop = 0, kJob = 1, kIdle = 2;
constexpr size_t kMaxMessage = 4096;  // bytes of rank 0's error sent to the followers

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
  options.denoise_loop = [raw = sp.get()](pipeline::DenoiseJob& job) { return raw->Loop(job); };
  auto flux = pipeline::FluxPipeline::Create(options, std::move(provider));
  if (!flux.ok()) return flux.status();
  sp->pipeline_ = *std::move(flux);
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
  absl::Status leader;  // rank 0's error, as the followers return it
  if (!refused.empty() && refused[0] == 0) {
    std::string message(error.message().substr(0, kMaxMessage));
    at::Tensor length = torch::tensor({static_cast<int64_t>(message.size())},
                                      torch::dtype(torch::kLong));
    if (auto s = group_.Broadcast(length); !s.ok()) return s;
    at::Tensor bytes = torch::zeros({length.item<int64_t>()}, torch::dtype(torch::kByte));
    if (rank() == 0) std::memcpy(bytes.data_ptr(), message.data(), message.size());
    if (bytes.numel() > 0) {
      if (auto s = group_.Broadcast(bytes); !s.ok()) return s;
    }
    leader = absl::AbortedError(absl::StrCat(
        "sequence parallel: rank 0 failed the job: ",
        std::string(reinterpret_cast<const char*>(bytes.data_ptr()), bytes.numel())));
  }
  if (!error.ok()) return error;
  if (!leader.ok()) return leader;
  if (!refused.empty()) {
    return absl::FailedPreconditionError(
        absl::StrCat("sequence parallel: rank(s) ", absl::StrJoin(refused, ", "),
                     " could not take the job (each rank returns its reason)"));
  }
  return absl::OkStatus();
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
  at::Tensor header = torch::tensor({kJob, int64_t{request.width}, int64_t{request.height},
                                     int64_t{request.steps}},
                                    torch::dtype(torch::kLong));
  if (auto s = group_.Broadcast(header); !s.ok()) return s;
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

absl::Status SequenceParallelPipeline::Stop() {
  if (rank() != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("sequence parallel: Stop on rank ", rank(), "; only rank 0 leads"));
  }
  at::Tensor header = torch::tensor({kStop, int64_t{0}, int64_t{0}, int64_t{0}},
                                    torch::dtype(torch::kLong));
  return group_.Broadcast(header);
}

absl::Status SequenceParallelPipeline::KeepAlive() {
  if (rank() != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("sequence parallel: KeepAlive on rank ", rank(), "; only rank 0 leads"));
  }
  at::Tensor header = torch::tensor({kIdle, int64_t{0}, int64_t{0}, int64_t{0}},
                                    torch::dtype(torch::kLong));
  return group_.Broadcast(header);
}

absl::Status SequenceParallelPipeline::Follow() {
  if (rank() == 0) {
    return absl::FailedPreconditionError("sequence parallel: Follow on rank 0, which leads");
  }
  at::Tensor header = torch::zeros({4}, torch::dtype(torch::kLong));
  do {
    if (auto s = group_.Broadcast(header); !s.ok()) return s;
  } while (header.data_ptr<int64_t>()[0] == kIdle);
  const int64_t* h = header.data_ptr<int64_t>();
  if (h[0] == kStop) return absl::OutOfRangeError("sequence parallel: rank 0 stopped");
  met_ = false;
  absl::Status s = pipeline_->FollowDenoise(static_cast<int>(h[1]), static_cast<int>(h[2]),
                                            static_cast<int>(h[3]));
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
