// Placement v1: which nodes can run a job, and which of them should. Pure functions of the
// node table and the job, so they are tested without a coordinator. Thread-safe (no state).
//
// Eligible: the node is READY with a free slot, serves the job's model, serves its precision and
// size (see below), its device can run the precision (a cpu device cannot run fp8; a cuda device
// with a known compute capability below 8.9 cannot either), and it either holds the job's
// packages (loaded or on local disk) or can compile them. Among eligible nodes: packages loaded
// in memory > on local disk > to be compiled (or fetched), then the fewest active jobs, then the
// one idle longest, then node id.
//
// NodeInfo.package_sets["<model>/<precision>/<W>x<H>"] lists the package digests a job needs.
// A node that declares any set for a model declares every (precision, size) it serves for it:
// a job whose key it does not declare is not for that node (for precision "" any precision at
// the job's size will do: the node picks its default). A node that declares no set for the model
// is assumed to serve every size and precision, cold. A job with precision "" needs the set the
// node declares under "<model>//<W>x<H>", else the one for its device's usual default (cpu:
// fp32, cuda: bf16), else the only one declared at that size.
#pragma once

#include <cstdint>
#include <string>
#include "absl/strings/string_view.h"
#include <vector>

#include "absl/status/status.h"
#include "common/proto/kiln.pb.h"

namespace kiln::coordinator {

// How warm a node is for a job's packages; higher is warmer.
enum class Warmth { kCold = 0, kLocalDisk = 1, kLoaded = 2 };
const char* WarmthName(Warmth w);  // "cold", "local", "loaded"

// "<model>/<precision>/<W>x<H>", the key of NodeInfo.package_sets.
std::string PackageSetKey(absl::string_view model, absl::string_view precision, uint32_t width,
                          uint32_t height);
// The precision a node runs when a job asks for "" and the node does not say: cpu → fp32,
// anything else → bf16.
std::string DefaultPrecision(const kiln::v1::DeviceInfo& device);
// Splits a package-set key (parsed from the right: model names may contain '/'). False if it is
// not "<model>/<precision>/<W>x<H>".
bool ParsePackageSetKey(absl::string_view key, std::string* model, std::string* precision,
                        std::string* size);

// The package set `node` declares for `spec` (see the file comment), or nullptr.
const kiln::v1::PackageSet* FindPackageSet(const kiln::v1::NodeInfo& node,
                                           const kiln::v1::JobSpec& spec);
// Where the node holds the job's packages (kCold when it declares no set for it).
Warmth WarmthFor(const kiln::v1::NodeInfo& node, const kiln::v1::JobSpec& spec);

// OK if `node`'s declared capabilities can run `spec` (ignores its state and load); otherwise
// FailedPrecondition saying why, e.g. "n1 does not serve model flux-dev".
absl::Status CheckCapable(const kiln::v1::NodeInfo& node, const kiln::v1::JobSpec& spec);

// One node as placement sees it.
struct Candidate {
  const kiln::v1::NodeInfo* info = nullptr;
  int active_jobs = 0;            // jobs assigned to it and not yet released
  int64_t last_assigned_ms = 0;   // monotonic ms of its last assignment (0: never)
};

// Index into `candidates` of the best one for `spec` among those CheckCapable accepts, or -1.
// The caller passes only READY nodes with a free slot.
int ChooseNode(const std::vector<Candidate>& candidates, const kiln::v1::JobSpec& spec);

}  // namespace kiln::coordinator
