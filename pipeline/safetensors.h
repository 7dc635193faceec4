// Safetensors reader: maps a .safetensors file read-only and exposes each tensor as a view into
// the mapping, without copying. WeightSet gathers the one or more files of a diffusers /
// transformers component folder (single file or shards) into one name -> tensor table. The
// LibTorch adapter wraps these views (from_blob) and hands them to AOTInductor packages as their
// constants; nothing here knows about LibTorch.
//
// File format (https://github.com/huggingface/safetensors): 8-byte little-endian header length N,
// N bytes of JSON {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
// "__metadata__": {"key": "value"}}, then the data section; offsets are relative to its start.
//
// Everything in the header is checked at Open, so a view handed out is always inside the file
// and holds exactly numel * itemsize bytes. Error codes:
//   NotFound / PermissionDenied / other errno codes   the file cannot be opened or mapped
//   DataLoss          the file is shorter than its header says: truncated header or header length
//                     beyond the end of the file, data_offsets beyond the data section
//   InvalidArgument   the header is malformed: not JSON, wrong types, unknown dtype, negative
//                     shape, end - begin != numel * itemsize, overlapping tensors, too large
//   Unimplemented     a dtype safetensors defines that kiln does not read (F8_E8M0, F4, C64, ...)
// Messages name the file and, where there is one, the tensor. Gaps between tensors' byte ranges
// are accepted (the safetensors library writes none; the Rust reader rejects them).
//
// Threads: a SafetensorsFile / WeightSet is immutable after Open; any thread may read it. Views
// stay valid as long as the object that handed them out. The file must not be truncated while
// open: the kernel answers a read of a mapped page past the new end with SIGBUS.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace kiln::pipeline {

// Element types, named as in the safetensors header.
enum class DType {
  kF64,
  kF32,
  kF16,
  kBF16,
  kI64,
  kI32,
  kI16,
  kI8,
  kU64,
  kU32,
  kU16,
  kU8,
  kBool,
  kF8E4M3,  // "F8_E4M3", torch.float8_e4m3fn
  kF8E5M2,  // "F8_E5M2", torch.float8_e5m2
};

// The header spelling: "F32", "BF16", "F8_E4M3", ... (a string literal).
const char* DTypeName(DType dtype);
// Bytes per element: 8, 4, 2 or 1 (BOOL and the F8 types take one byte).
size_t DTypeSize(DType dtype);
// Inverse of DTypeName; nullopt for any other string.
std::optional<DType> ParseDType(std::string_view name);

// A tensor inside a mapped file. `data` points into the read-only mapping: never write through it.
// It is aligned only as the file aligns it (writers pad the header to 8 bytes and tensors follow
// one another, so the address is a multiple of the itemsize in files written by the safetensors
// library, but nothing guarantees it).
struct TensorView {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;  // elements per dimension, each >= 0; empty = scalar
  const void* data = nullptr;  // nullptr only when nbytes == 0
  size_t nbytes = 0;           // numel() * DTypeSize(dtype)

  int64_t numel() const;
};

// "[3072, 64]": shapes as error messages write them.
std::string ShapeString(absl::Span<const int64_t> shape);

struct SafetensorsOptions {
  // A background thread reads the whole file front to back with 16 MB pread()s from Open on, so
  // the page cache fills at the disk's sequential rate while the caller reads the mapping (which
  // alone page-faults it in small pieces). Stopped and joined by the destructor. Measured on the
  // GPU host (bench/README.md): cold reads 1.33 -> 2.03 GB/s against MADV_SEQUENTIAL+WILLNEED,
  // whose drop-behind also left later processes a half-empty page cache.
  bool prefetch = false;
  // Largest JSON header accepted, in bytes (the safetensors library's own limit is 100 MB).
  uint64_t max_header_bytes = 100'000'000;
};

class SafetensorsFile {
 public:
  // Maps `path` (PROT_READ, MAP_PRIVATE) and validates its header; see the file comment for the
  // error codes.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(
      const std::string& path, const SafetensorsOptions& options = {});

  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  // The tensor called `name`, or nullptr.
  const TensorView* Find(std::string_view name) const;
  // Tensor names, sorted.
  std::vector<std::string> names() const;
  // All tensors, sorted by name.
  const std::vector<TensorView>& tensors() const { return tensors_; }
  // The header's "__metadata__" (empty when absent).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::string& path() const { return path_; }
  // Size of the whole file, in bytes.
  uint64_t file_bytes() const { return map_size_; }
  // Sum of the tensors' nbytes.
  uint64_t tensor_bytes() const { return tensor_bytes_; }

 private:
  SafetensorsFile() = default;

  void StartPrefetch();

  std::string path_;
  std::thread prefetch_;
  std::atomic<bool> stop_prefetch_{false};
  void* map_ = nullptr;  // owned: munmap in the destructor
  uint64_t map_size_ = 0;
  uint64_t tensor_bytes_ = 0;
  std::vector<TensorView> tensors_;
  std::map<std::string, std::string> metadata_;
};

// The weights of one component folder, possibly sharded over several files.
class WeightSet {
 public:
  // Opens the checkpoint `stem` ("diffusion_pytorch_model", "model") in `dir`, like transformers
  // and diffusers look for it:
  //   1. `<stem>.safetensors` if it exists;
  //   2. else `<stem>.safetensors.index.json` if it exists: every shard its "weight_map" names
  //      (file names inside `dir`), each tensor checked to be in the shard the index says;
  //   3. else every `*.safetensors` file in `dir`.
  // NotFound: `dir` missing, nothing to open, or a shard the index names is missing.
  // InvalidArgument: a tensor in two files, an index that is not {"weight_map": {name: file}}, a
  // shard name with a '/', a tensor the index places in a shard that does not hold it.
  // Plus any error of SafetensorsFile::Open.
  static absl::StatusOr<std::unique_ptr<WeightSet>> OpenDir(const std::string& dir,
                                                            const std::string& stem,
                                                            const SafetensorsOptions& options = {});
  // Opens exactly these files as one set; InvalidArgument on a tensor in two of them.
  static absl::StatusOr<std::unique_ptr<WeightSet>> OpenFiles(
      const std::vector<std::string>& paths, const SafetensorsOptions& options = {});
  // A set of tensors held elsewhere, described by `views` (names unique; a view's `data` is
  // where its owner keeps it, or nullptr when that is not host memory: then names, dtypes and
  // shapes only). No file: FileOf is null. `description` names the set in error messages.
  // InvalidArgument on a name given twice.
  static absl::StatusOr<std::unique_ptr<WeightSet>> Describe(std::vector<TensorView> views,
                                                             std::string description);

  // The tensor called `name`, or nullptr.
  const TensorView* Find(std::string_view name) const;
  // The tensor called `name`, checked: NotFound("tensor X not found in <dir>") when absent,
  // InvalidArgument("tensor X: dtype BF16 expected F32 (...)") or
  // InvalidArgument("tensor X: shape [..] expected [..] (...)") on a mismatch.
  absl::StatusOr<const TensorView*> Require(std::string_view name) const;
  absl::StatusOr<const TensorView*> Require(std::string_view name, DType dtype) const;
  // `dtype` nullopt = any dtype; `shape` is always checked ({} = a scalar).
  absl::StatusOr<const TensorView*> Require(std::string_view name, std::optional<DType> dtype,
                                            absl::Span<const int64_t> shape) const;

  // Tensor names over all files, sorted.
  std::vector<std::string> names() const;
  size_t size() const { return by_name_.size(); }
  // Sum of the tensors' nbytes over all files: what an upload of all weights moves.
  uint64_t total_bytes() const { return total_bytes_; }
  // The files opened, in the order opened.
  const std::vector<std::unique_ptr<SafetensorsFile>>& files() const { return files_; }
  // The file holding the tensor called `name`, or nullptr.
  const SafetensorsFile* FileOf(std::string_view name) const;

 private:
  WeightSet() = default;
  // Adds `file`'s tensors; InvalidArgument when one is already present from another file.
  absl::Status Add(std::unique_ptr<SafetensorsFile> file);
  // Require with optional checks.
  absl::StatusOr<const TensorView*> Check(std::string_view name, std::optional<DType> dtype,
                                          std::optional<absl::Span<const int64_t>> shape) const;

  std::string description_;  // folder or file list, for error messages
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::vector<TensorView> described_;  // Describe's views (files_ is then empty)
  struct Entry {
    const TensorView* view;
    const SafetensorsFile* file;
  };
  std::map<std::string, Entry, std::less<>> by_name_;
  uint64_t total_bytes_ = 0;
};

}  // namespace kiln::pipeline
