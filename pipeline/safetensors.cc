#include "pipeline/safetensors.h"

#include "common/files.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <filesystem>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "nlohmann/json.hpp"
#include "pipeline/json_file.h"

namespace kiln::pipeline {
namespace {

struct DTypeInfo {
  DType dtype;
  const char* name;
  size_t size;
};

constexpr DTypeInfo kDTypes[] = {
    {DType::kF64, "F64", 8},        {DType::kF32, "F32", 4},         {DType::kF16, "F16", 2},
    {DType::kBF16, "BF16", 2},      {DType::kI64, "I64", 8},         {DType::kI32, "I32", 4},
    {DType::kI16, "I16", 2},        {DType::kI8, "I8", 1},           {DType::kU64, "U64", 8},
    {DType::kU32, "U32", 4},        {DType::kU16, "U16", 2},         {DType::kU8, "U8", 1},
    {DType::kBool, "BOOL", 1},      {DType::kF8E4M3, "F8_E4M3", 1}, {DType::kF8E5M2, "F8_E5M2", 1},
};

// Dtypes the safetensors format defines that kiln does not read: Unimplemented, not
// InvalidArgument, since the file is well-formed.
constexpr const char* kUnsupportedDTypes[] = {"F8_E8M0", "F6_E2M3", "F6_E3M2", "F4", "C64"};

// absl::StrCat takes absl::string_view, which Debian's Abseil does not alias to std::string_view.
absl::string_view Sv(std::string_view s) { return absl::string_view(s.data(), s.size()); }

using Fd = kiln::UniqueFd;

// A non-negative JSON integer, as safetensors' shapes and offsets are (u64 in the Rust reader).
bool AsUnsigned(const nlohmann::json& j, uint64_t* out) {
  if (j.is_number_unsigned()) {
    *out = j.get<uint64_t>();
    return true;
  }
  if (j.is_number_integer() && j.get<int64_t>() >= 0) {
    *out = static_cast<uint64_t>(j.get<int64_t>());
    return true;
  }
  return false;
}

// What one header entry says, before it becomes a TensorView.
struct HeaderEntry {
  TensorView view;
  uint64_t begin = 0;
  uint64_t end = 0;
};

absl::StatusOr<HeaderEntry> ParseEntry(const std::string& path, const std::string& name,
                                 const nlohmann::json& j, uint64_t data_size) {
  auto invalid = [&](absl::string_view what) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": tensor '", name, "': ", what));
  };
  if (!j.is_object()) return invalid("header entry is not an object");
  HeaderEntry e;
  e.view.name = name;

  auto dtype_it = j.find("dtype");
  if (dtype_it == j.end() || !dtype_it->is_string()) return invalid("missing or non-string dtype");
  const std::string& dtype_name = dtype_it->get_ref<const std::string&>();
  std::optional<DType> dtype = ParseDType(dtype_name);
  if (!dtype) {
    for (const char* unsupported : kUnsupportedDTypes) {
      if (dtype_name == unsupported) {
        return absl::UnimplementedError(
            absl::StrCat(path, ": tensor '", name, "': dtype ", dtype_name, " is not supported"));
      }
    }
    return invalid(absl::StrCat("unknown dtype '", dtype_name, "'"));
  }
  e.view.dtype = *dtype;

  auto shape_it = j.find("shape");
  if (shape_it == j.end() || !shape_it->is_array()) return invalid("missing or non-array shape");
  uint64_t numel = 1;
  bool overflow = false;
  for (const auto& d : *shape_it) {
    uint64_t dim;
    if (!AsUnsigned(d, &dim) || dim > static_cast<uint64_t>(INT64_MAX)) {
      return invalid(absl::StrCat("shape ", shape_it->dump(), " has a negative or non-integer "
                                  "dimension"));
    }
    e.view.shape.push_back(static_cast<int64_t>(dim));
    overflow = overflow || __builtin_mul_overflow(numel, dim, &numel);
  }
  uint64_t expected_bytes = 0;
  overflow = overflow || __builtin_mul_overflow(numel, DTypeSize(*dtype), &expected_bytes);
  if (overflow || numel > static_cast<uint64_t>(INT64_MAX)) {
    return invalid(absl::StrCat("shape ", shape_it->dump(), " has too many elements"));
  }

  auto offsets_it = j.find("data_offsets");
  if (offsets_it == j.end() || !offsets_it->is_array() || offsets_it->size() != 2 ||
      !AsUnsigned((*offsets_it)[0], &e.begin) || !AsUnsigned((*offsets_it)[1], &e.end)) {
    return invalid("data_offsets must be [begin, end], two non-negative integers");
  }
  if (e.begin > e.end) {
    return invalid(absl::StrCat("data_offsets [", e.begin, ", ", e.end, "] has begin > end"));
  }
  if (e.end > data_size) {
    return absl::DataLossError(absl::StrCat(path, ": tensor '", name, "': data_offsets [", e.begin,
                                            ", ", e.end, "] beyond the data section (",
                                            data_size, " bytes); file truncated?"));
  }
  if (e.end - e.begin != expected_bytes) {
    return invalid(absl::StrCat("data_offsets [", e.begin, ", ", e.end, "] hold ",
                                e.end - e.begin, " bytes, but ", DTypeName(*dtype),
                                ShapeString(e.view.shape), " needs ", expected_bytes));
  }
  e.view.nbytes = static_cast<size_t>(expected_bytes);
  return e;
}

absl::Status ParseMetadata(const std::string& path, const nlohmann::json& j,
                           std::map<std::string, std::string>* out) {
  if (j.is_null()) return absl::OkStatus();
  if (!j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": __metadata__ is not an object"));
  }
  for (const auto& [k, v] : j.items()) {
    if (!v.is_string()) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": __metadata__ value for '", k, "' is not a string"));
    }
    (*out)[k] = v.get<std::string>();
  }
  return absl::OkStatus();
}

bool IsRegularFile(const std::string& path) {
  std::error_code ec;
  return std::filesystem::is_regular_file(path, ec);
}

}  // namespace

const char* DTypeName(DType dtype) {
  for (const auto& info : kDTypes) {
    if (info.dtype == dtype) return info.name;
  }
  return "?";
}

size_t DTypeSize(DType dtype) {
  for (const auto& info : kDTypes) {
    if (info.dtype == dtype) return info.size;
  }
  return 0;
}

std::optional<DType> ParseDType(std::string_view name) {
  for (const auto& info : kDTypes) {
    if (name == info.name) return info.dtype;
  }
  return std::nullopt;
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string ShapeString(absl::Span<const int64_t> shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(
    const std::string& path, const SafetensorsOptions& options) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) return absl::ErrnoToStatus(errno, absl::StrCat("cannot open ", path));
  struct stat st;
  if (::fstat(fd.get(), &st) != 0) return absl::ErrnoToStatus(errno, absl::StrCat("stat ", path));
  if (!S_ISREG(st.st_mode)) {
    return absl::InvalidArgumentError(absl::StrCat(path, " is not a regular file"));
  }
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  if (size < 8) {
    return absl::DataLossError(absl::StrCat(path, ": file is ", size,
                                            " bytes, too short for the 8-byte header length"));
  }

  // The object owns the mapping from here on, so every early return below unmaps it.
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd.get(), 0);
  if (map == MAP_FAILED) return absl::ErrnoToStatus(errno, absl::StrCat("mmap ", path));
  file->map_ = map;
  file->map_size_ = size;
  const auto* bytes = static_cast<const unsigned char*>(map);

  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | bytes[i];
  if (header_len > size - 8) {
    return absl::DataLossError(absl::StrCat(path, ": header length ", header_len,
                                            " goes beyond the end of the file (", size,
                                            " bytes); file truncated or not safetensors?"));
  }
  if (header_len > options.max_header_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": header length ", header_len,
                                                   " exceeds the limit of ",
                                                   options.max_header_bytes, " bytes"));
  }
  const uint64_t data_start = 8 + header_len;
  const uint64_t data_size = size - data_start;


  nlohmann::json header;
  try {
    header = nlohmann::json::parse(bytes + 8, bytes + data_start);
  } catch (const nlohmann::json::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": header is not valid JSON: ", e.what()));
  }
  if (!header.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": header is not a JSON object"));
  }

  std::vector<HeaderEntry> entries;
  entries.reserve(header.size());
  for (const auto& [name, value] : header.items()) {
    if (name == "__metadata__") {
      if (auto s = ParseMetadata(path, value, &file->metadata_); !s.ok()) return s;
      continue;
    }
    absl::StatusOr<HeaderEntry> entry = ParseEntry(path, name, value, data_size);
    if (!entry.ok()) return entry.status();
    entries.push_back(*std::move(entry));
  }

  // No two tensors may share a byte. Gaps are accepted (the safetensors library writes none).
  std::vector<const HeaderEntry*> by_offset;
  for (const auto& e : entries) {
    if (e.end > e.begin) by_offset.push_back(&e);
  }
  std::sort(by_offset.begin(), by_offset.end(), [](const HeaderEntry* a, const HeaderEntry* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const HeaderEntry& prev = *by_offset[i - 1];
    const HeaderEntry& cur = *by_offset[i];
    if (cur.begin < prev.end) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": tensors '", prev.view.name, "' [", prev.begin, ", ", prev.end, ") and '",
          cur.view.name, "' [", cur.begin, ", ", cur.end, ") overlap"));
    }
  }

  // nlohmann::json objects iterate in key order, so tensors_ comes out sorted by name.
  file->tensors_.reserve(entries.size());
  for (auto& e : entries) {
    if (e.view.nbytes > 0) e.view.data = bytes + data_start + e.begin;
    file->tensor_bytes_ += e.view.nbytes;
    file->tensors_.push_back(std::move(e.view));
  }
  // Only a valid file is worth reading ahead.
  if (options.prefetch && data_size > 0) file->StartPrefetch();
  return file;
}

SafetensorsFile::~SafetensorsFile() {
  stop_prefetch_ = true;
  if (prefetch_.joinable()) prefetch_.join();
  if (map_ != nullptr) ::munmap(map_, map_size_);
}

void SafetensorsFile::StartPrefetch() {
  prefetch_ = std::thread([this] {
    constexpr size_t kChunk = 16 << 20;
    std::vector<char> buf(kChunk);
    Fd fd(::open(path_.c_str(), O_RDONLY | O_CLOEXEC));
    if (fd.get() < 0) return;  // best effort: the mapping still serves every read
    ::posix_fadvise(fd.get(), 0, 0, POSIX_FADV_SEQUENTIAL);
    for (off_t off = 0; !stop_prefetch_;) {
      const ssize_t n = ::pread(fd.get(), buf.data(), kChunk, off);
      if (n <= 0) break;
      off += n;
    }
  });
}

const TensorView* SafetensorsFile::Find(std::string_view name) const {
  auto it = std::lower_bound(tensors_.begin(), tensors_.end(), name,
                             [](const TensorView& t, std::string_view n) { return t.name < n; });
  return it != tensors_.end() && it->name == name ? &*it : nullptr;
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  out.reserve(tensors_.size());
  for (const auto& t : tensors_) out.push_back(t.name);
  return out;
}

absl::StatusOr<std::unique_ptr<WeightSet>> WeightSet::Describe(std::vector<TensorView> views,
                                                               std::string description) {
  std::unique_ptr<WeightSet> set(new WeightSet());
  set->description_ = std::move(description);
  set->described_ = std::move(views);
  for (const TensorView& t : set->described_) {
    if (!set->by_name_.emplace(t.name, Entry{&t, nullptr}).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor '", t.name, "' given twice in ", set->description_));
    }
    set->total_bytes_ += t.nbytes;
  }
  return set;
}

absl::Status WeightSet::Add(std::unique_ptr<SafetensorsFile> file) {
  for (const auto& t : file->tensors()) {
    auto [it, inserted] = by_name_.emplace(t.name, Entry{&t, file.get()});
    if (!inserted) {
      return absl::InvalidArgumentError(absl::StrCat("tensor '", t.name, "' is in both ",
                                                     it->second.file->path(), " and ",
                                                     file->path()));
    }
    total_bytes_ += t.nbytes;
  }
  files_.push_back(std::move(file));
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<WeightSet>> WeightSet::OpenFiles(
    const std::vector<std::string>& paths, const SafetensorsOptions& options) {
  std::unique_ptr<WeightSet> set(new WeightSet());
  set->description_ = absl::StrJoin(paths, ", ");
  for (const auto& path : paths) {
    auto file = SafetensorsFile::Open(path, options);
    if (!file.ok()) return file.status();
    if (auto s = set->Add(*std::move(file)); !s.ok()) return s;
  }
  return set;
}

absl::StatusOr<std::unique_ptr<WeightSet>> WeightSet::OpenDir(const std::string& dir,
                                                              const std::string& stem,
                                                              const SafetensorsOptions& options) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    return absl::NotFoundError(absl::StrCat("component folder ", dir, " not found"));
  }
  const std::string single = (fs::path(dir) / (stem + ".safetensors")).string();
  const std::string index_path = (fs::path(dir) / (stem + ".safetensors.index.json")).string();

  absl::StatusOr<std::unique_ptr<WeightSet>> set;
  if (IsRegularFile(single)) {
    set = OpenFiles({single}, options);
  } else if (IsRegularFile(index_path)) {
    auto read = ReadJsonFile(index_path);
    if (!read.ok()) return read.status();
    const nlohmann::json& index = *read;
    if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object()) {
      return absl::InvalidArgumentError(
          absl::StrCat(index_path, ": no \"weight_map\" object"));
    }
    const nlohmann::json& weight_map = index["weight_map"];
    std::set<std::string> shards;
    for (const auto& [name, shard] : weight_map.items()) {
      if (!shard.is_string()) {
        return absl::InvalidArgumentError(
            absl::StrCat(index_path, ": weight_map entry for '", name, "' is not a string"));
      }
      const std::string& shard_name = shard.get_ref<const std::string&>();
      if (shard_name.empty() || shard_name.find('/') != std::string::npos || shard_name == "." ||
          shard_name == "..") {
        return absl::InvalidArgumentError(absl::StrCat(
            index_path, ": shard '", shard_name, "' (for '", name, "') is not a file name"));
      }
      if (shards.insert(shard_name).second &&
          !IsRegularFile((fs::path(dir) / shard_name).string())) {
        return absl::NotFoundError(absl::StrCat(index_path, ": shard ", shard_name, " (for '",
                                                name, "') not found in ", dir));
      }
    }
    std::vector<std::string> paths;
    for (const auto& shard : shards) paths.push_back((fs::path(dir) / shard).string());
    set = OpenFiles(paths, options);
    if (set.ok()) {
      for (const auto& [name, shard] : weight_map.items()) {
        const std::string expected = (fs::path(dir) / shard.get<std::string>()).string();
        const SafetensorsFile* file = (*set)->FileOf(name);
        if (file == nullptr || file->path() != expected) {
          return absl::InvalidArgumentError(absl::StrCat(
              index_path, ": tensor '", name, "' is mapped to ", shard.get<std::string>(),
              " but ", file == nullptr ? "no shard holds it" : "it is in " + file->path()));
        }
      }
    }
  } else {
    std::vector<std::string> paths;
    for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
      const fs::path& p = it->path();
      if (p.extension() == ".safetensors" && IsRegularFile(p.string())) {
        paths.push_back(p.string());
      }
    }
    if (ec) return absl::ErrnoToStatus(ec.value(), absl::StrCat("cannot list ", dir));
    if (paths.empty()) {
      return absl::NotFoundError(absl::StrCat("no ", stem, ".safetensors, ", stem,
                                              ".safetensors.index.json or *.safetensors in ",
                                              dir));
    }
    std::sort(paths.begin(), paths.end());
    set = OpenFiles(paths, options);
  }
  if (set.ok()) (*set)->description_ = dir;
  return set;
}

const TensorView* WeightSet::Find(std::string_view name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : it->second.view;
}

const SafetensorsFile* WeightSet::FileOf(std::string_view name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : it->second.file;
}

absl::StatusOr<const TensorView*> WeightSet::Require(std::string_view name) const {
  const TensorView* view = Find(name);
  if (view == nullptr) {
    return absl::NotFoundError(absl::StrCat("tensor ", Sv(name), " not found in ", description_));
  }
  return view;
}

absl::StatusOr<const TensorView*> WeightSet::Require(std::string_view name, DType dtype) const {
  return Check(name, dtype, std::nullopt);
}

absl::StatusOr<const TensorView*> WeightSet::Require(std::string_view name,
                                                     std::optional<DType> dtype,
                                                     absl::Span<const int64_t> shape) const {
  return Check(name, dtype, shape);
}

absl::StatusOr<const TensorView*> WeightSet::Check(
    std::string_view name, std::optional<DType> dtype,
    std::optional<absl::Span<const int64_t>> shape) const {
  auto view = Require(name);
  if (!view.ok()) return view;
  const TensorView& t = **view;
  if (dtype && t.dtype != *dtype) {
    return absl::InvalidArgumentError(absl::StrCat("tensor ", Sv(name), ": dtype ",
                                                   DTypeName(t.dtype), " expected ",
                                                   DTypeName(*dtype), " (in ",
                                                   FileOf(name)->path(), ")"));
  }
  if (shape && absl::Span<const int64_t>(t.shape) != *shape) {
    return absl::InvalidArgumentError(absl::StrCat("tensor ", Sv(name), ": shape ",
                                                   ShapeString(t.shape), " expected ",
                                                   ShapeString(*shape), " (in ",
                                                   FileOf(name)->path(), ")"));
  }
  return view;
}

std::vector<std::string> WeightSet::names() const {
  std::vector<std::string> out;
  out.reserve(by_name_.size());
  for (const auto& [name, entry] : by_name_) out.push_back(name);
  return out;
}

}  // namespace kiln::pipeline
