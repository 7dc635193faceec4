// The job vocabulary every component shares: what a valid JobSpec is (limits, the id and model
// name charsets) and the precisions and what each needs of a device (the job and node state
// names are in common/job_state.h). The coordinator checks a whole spec on Submit, the node checks it again before it plans
// a job (plus what only it knows: whether it serves the model, precision and size), the pipeline
// checks its GenerateRequest with the same field checks, and the artifact key and placement ask
// the same precision rules. Every error is a FieldError (common/status.h) naming the field:
// "spec.width: 300 is not a multiple of 16". Thread-safe (no state).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

// Not including common/proto/kiln.pb.h: this header is also read by code that sees LibTorch's
// headers (the pipeline, the artifact key), whose bundled protobuf headers clash with Debian's.
namespace kiln::v1 {
class JobSpec;
}  // namespace kiln::v1

namespace kiln {

// Limits a JobSpec is checked against (the coordinator's options carry them; the node and the
// pipeline use the defaults).
struct SpecLimits {
  uint32_t max_image_side = 4096;    // pixels, for width and height
  uint32_t max_steps = 1000;         // denoising steps
  uint32_t max_prompt_bytes = 10000; // UTF-8 bytes
};

inline constexpr size_t kMaxIdChars = 128;   // job ids, node ids, model names
inline constexpr uint32_t kSideMultiple = 16; // image sides are multiples of this (pixels)
inline constexpr double kMaxGuidance = 100;   // guidance is in 0..kMaxGuidance (0: the default)

// Job and node ids: 1..128 characters of [A-Za-z0-9._:-]. InvalidArgument naming `field`.
absl::Status ValidateId(absl::string_view field, absl::string_view id);
// Model names: 1..128 characters of [A-Za-z0-9._:/-]. InvalidArgument naming `field`.
absl::Status ValidateModelName(absl::string_view field, absl::string_view model);

// The single-field checks ValidateJobSpec is made of, for callers that hold the values in their
// own types (the pipeline's GenerateRequest). InvalidArgument naming `field`.
// A prompt: 1..max_prompt_bytes bytes of well-formed UTF-8.
absl::Status ValidatePrompt(absl::string_view field, absl::string_view prompt,
                            const SpecLimits& limits = {});
// An image side in pixels: set, a multiple of 16, at most max_image_side.
absl::Status ValidateImageSide(absl::string_view field, int64_t pixels,
                               const SpecLimits& limits = {});
absl::Status ValidateSteps(absl::string_view field, int64_t steps, const SpecLimits& limits = {});
// Finite and in 0..100.
absl::Status ValidateGuidance(absl::string_view field, double guidance);

// LoRAs (JobSpec.loras). A name is a file stem: 1..128 characters of [A-Za-z0-9._-], not
// starting with '.'; a scale is finite and in -kMaxLoraScale..kMaxLoraScale (0 on the wire means
// 1.0). At most kMaxLoras per job, no name twice.
inline constexpr size_t kMaxLoras = 8;
inline constexpr double kMaxLoraScale = 100;
absl::Status ValidateLoraName(absl::string_view field, absl::string_view name);

// One LoRA of a job as the node and the pipeline use it: the wire's scale 0 made 1.0.
struct LoraChoice {
  std::string name;
  double scale = 1.0;
};
std::vector<LoraChoice> LorasOf(const kiln::v1::JobSpec& spec);
// "NAME" or "NAME:SCALE" (the CLI's and kiln-run's --lora) → a choice; InvalidArgument naming
// `field` for a bad name or a scale that is not a finite number in range.
absl::StatusOr<LoraChoice> ParseLoraChoice(absl::string_view field, absl::string_view text);
// The identity of a LoRA set in job order: "NAME@SCALE,..." (scale as the float the wire carries,
// "%.9g"), "" for none. A node reports the key of the set its weights hold
// (NodeInfo.applied_loras) and placement compares it with the job's; two jobs with equal keys
// run on the same merged weights.
std::string LoraSetKey(const std::vector<LoraChoice>& loras);

// Every field of `spec`, in declaration order; the first bad one is reported as InvalidArgument
// naming "spec.<field>", e.g. "spec.width: 300 is not a multiple of 16". Checks only the spec
// itself: whether a model is served, at which sizes, and whether the deadline has passed depend
// on the cluster, the node and the clock (their owners check those).
absl::Status ValidateJobSpec(const kiln::v1::JobSpec& spec, const SpecLimits& limits = {});

// Compute precisions: fp32, bf16, and fp8 (e4m3 linears, bf16 activations; CUDA sm_89+ only).
inline const std::vector<std::string> kPrecisions = {"fp32", "bf16", "fp8"};
// True for one of kPrecisions.
bool IsPrecision(absl::string_view precision);
// InvalidArgument naming `field` unless `precision` is one of kPrecisions ("" too when
// `allow_default`: a JobSpec's "" means the node's default).
absl::Status ValidatePrecision(absl::string_view field, absl::string_view precision,
                               bool allow_default = false);

// What a precision needs of a device.
struct PrecisionNeeds {
  bool cuda = false;                // needs a CUDA device
  int min_compute_capability = 0;   // major*10+minor, e.g. 89 for sm_89 (0: any)
};
PrecisionNeeds NeedsOf(absl::string_view precision);

// A device as the precision rules see it.
struct DeviceCaps {
  bool cuda = false;
  int compute_capability = -1;  // major*10+minor; -1 unknown (assumed able)
};
// "cpu" → {false}; "cuda", "cuda:N" → {true, -1}; "cuda:sm_90" (an artifact key's target) →
// {true, 90}.
DeviceCaps CapsOfDevice(absl::string_view device_or_target);
// "8.9" → 89; -1 when empty or not MAJOR.MINOR.
int ParseComputeCapability(absl::string_view text);

// OK if `device` can run `precision`; otherwise FailedPrecondition saying what it needs, e.g.
// "fp8 needs a cuda device" or "fp8 needs compute capability 8.9 or newer, not 8.0".
absl::Status CheckDeviceRuns(absl::string_view precision, const DeviceCaps& device);

// The precision a device runs when a job names none: cpu → fp32, cuda → bf16.
std::string DefaultPrecisionFor(const DeviceCaps& device);

}  // namespace kiln
