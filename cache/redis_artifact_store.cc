#include "cache/redis_artifact_store.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "cache/held_lease.h"
#include "cache/package_dir.h"
#include "common/hash.h"
#include "common/log.h"
#include "nlohmann/json.hpp"
#include "prometheus/family.h"

namespace kiln::cache {
namespace {

// KEYS: pkg, index. ARGV: 1 digest, 2 files JSON, 3 upload, 4 published ms, 5.. chunk keys.
// 1: published; 0: an entry existed (the caller deletes its chunks).
constexpr char kPublishScript[] = R"lua(
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
for i = 5, #ARGV do redis.call('PERSIST', ARGV[i]) end
redis.call('HSET', KEYS[1], 'files', ARGV[2], 'upload', ARGV[3], 'published_unix_ms', ARGV[4])
redis.call('SADD', KEYS[2], ARGV[1])
return 1
)lua";

// KEYS: pkg, index, corrupt list. ARGV: 1 digest, 2 upload, 3 record, 4 blob key prefix of the
// upload. Removes the entry (and its chunks) only if it is still that upload. 1 removed, 0 not.
constexpr char kRemoveScript[] = R"lua(
redis.call('RPUSH', KEYS[3], ARGV[3])
redis.call('LTRIM', KEYS[3], -1000, -1)
local t = redis.call('TYPE', KEYS[1])['ok']
if t == 'hash' and redis.call('HGET', KEYS[1], 'upload') ~= ARGV[2] then return 0 end
if t == 'none' then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
local cursor = '0'
repeat
  local r = redis.call('SCAN', cursor, 'MATCH', ARGV[4] .. '*', 'COUNT', 1000)
  cursor = r[1]
  for _, k in ipairs(r[2]) do redis.call('DEL', k) end
until cursor == '0'
return 1
)lua";

// KEYS: lease, held. ARGV: token, value, ttl. {1, took_over} acquired; {0, current value}.
constexpr char kAcquireScript[] = R"lua(
local cur = redis.call('GET', KEYS[1])
if cur then return {0, cur} end
local prev = redis.call('GET', KEYS[2])
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('SET', KEYS[2], ARGV[1], 'PX', 86400000)
if prev then return {1, 1} end
return {1, 0}
)lua";

// KEYS: lease. ARGV: token prefix ("<token> "), ttl. 1 renewed, 0 lost.
constexpr char kRenewScript[] = R"lua(
local cur = redis.call('GET', KEYS[1])
if cur and string.sub(cur, 1, #ARGV[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
)lua";

// KEYS: lease, held. ARGV: token prefix, token. 1 released, 0 not ours.
constexpr char kReleaseScript[] = R"lua(
if redis.call('GET', KEYS[2]) == ARGV[2] then redis.call('DEL', KEYS[2]) end
local cur = redis.call('GET', KEYS[1])
if cur and string.sub(cur, 1, #ARGV[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
)lua";

struct FileEntry {
  std::string name;
  int64_t bytes = 0;
  std::string sha256;
  int64_t chunks = 0;
};

std::string BlobKey(const std::string& prefix, const std::string& digest,
                    const std::string& upload, const std::string& file, int64_t i) {
  return absl::StrCat(prefix, ":blob:", digest, ":", upload, ":", file, ":", i);
}

// Regular files directly in `dir` (no dot files), as kiln-compile writes a package.
absl::StatusOr<std::vector<std::string>> PackageFiles(const std::string& dir) {
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return ErrnoStatus(errno, absl::StrCat("open ", dir));
  std::vector<std::string> out;
  while (dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    if (name.empty() || name[0] == '.') continue;
    struct stat st;
    if (::stat(absl::StrCat(dir, "/", name).c_str(), &st) == 0 && S_ISREG(st.st_mode)) {
      out.push_back(name);
    }
  }
  ::closedir(d);
  return out;
}

// A lease key whose value starts with the holder's token; Redis expires it (PX = the ttl).
class RedisCompileLease : public HeldLease {
 public:
  RedisCompileLease(redis::RedisClient& client, std::string lease_key, std::string held_key,
                    const Clock* clock, LeaseInfo info, int64_t ttl_ms, bool took_over)
      : HeldLease(lease_key, std::move(info), clock, ttl_ms, took_over),
        client_(client),
        lease_key_(std::move(lease_key)),
        held_key_(std::move(held_key)),
        ttl_ms_(ttl_ms) {}
  ~RedisCompileLease() override { ReleaseOrLog(); }

 private:
  absl::Status RenewHeld(const LeaseInfo& info, int64_t) override {
    auto r = client_.Eval(redis::ScriptFor<kRenewScript>(), {lease_key_},
                          {info.token + " ", std::to_string(ttl_ms_)});
    if (!r.ok()) return r.status();
    if (r->integer != 1) {
      return absl::AbortedError(absl::StrCat("compile lease for ", info.digest,
                                             " expired or was taken over"));
    }
    return absl::OkStatus();
  }

  absl::Status ReleaseHeld(const LeaseInfo& info) override {
    return client_
        .Eval(redis::ScriptFor<kReleaseScript>(), {lease_key_, held_key_},
              {info.token + " ", info.token})
        .status();
  }

  redis::RedisClient& client_;
  const std::string lease_key_;
  const std::string held_key_;
  const int64_t ttl_ms_;
};

}  // namespace

absl::Status RedisArtifactStoreOptions::Validate() const {
  if (!redis::IsRedisUrl(url)) {
    return absl::InvalidArgumentError(absl::StrCat("url: '", url, "' is not a redis:// URL"));
  }
  if (key_prefix.empty()) return absl::InvalidArgumentError("key_prefix: must not be empty");
  if (chunk_bytes < 1024 || chunk_bytes > (256 << 20)) {
    return absl::InvalidArgumentError(
        absl::StrCat("chunk_bytes: ", chunk_bytes, " is not in 1024..268435456"));
  }
  if (upload_ttl_ms < 1000) return absl::InvalidArgumentError("upload_ttl_ms: below 1000");
  if (command_timeout_ms < 1) return absl::InvalidArgumentError("command_timeout_ms: below 1");
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<RedisArtifactStore>> RedisArtifactStore::Open(
    RedisArtifactStoreOptions options, prometheus::Registry* registry) {
  if (auto s = options.Validate(); !s.ok()) return s;
  auto redis_options = redis::ParseRedisUrl(options.url);
  if (!redis_options.ok()) return redis_options.status();
  redis_options->client_name = "artifact_store";
  redis_options->command_timeout_ms = options.command_timeout_ms;
  std::shared_ptr<prometheus::Registry> owned;
  if (registry == nullptr) {
    owned = std::make_shared<prometheus::Registry>();
    registry = owned.get();
  }
  auto client = redis::RedisClient::Create(*redis_options, registry);
  if (!client.ok()) return client.status();
  std::unique_ptr<RedisArtifactStore> store(
      new RedisArtifactStore(std::move(options), std::move(*client), *registry));
  store->owned_registry_ = std::move(owned);
  return store;
}

RedisArtifactStore::RedisArtifactStore(RedisArtifactStoreOptions options,
                                       std::unique_ptr<redis::RedisClient> client,
                                       prometheus::Registry& registry)
    : options_(std::move(options)),
      host_(options_.host.empty() ? HostName() : options_.host),
      clock_(options_.clock),
      client_(std::move(client)),
      corrupt_(prometheus::BuildCounter()
                   .Name("kiln_artifact_redis_corrupt_total")
                   .Help("Packages in the Redis shared tier refused on fetch because a file did "
                         "not match the index (size or SHA-256) or the manifest; removed so they "
                         "are rebuilt")
                   .Register(registry)
                   .Add({})) {
  if (clock_ == nullptr) {
    owned_clock_ = std::make_unique<SystemClock>();
    clock_ = owned_clock_.get();
  }
}

std::string RedisArtifactStore::Describe() const {
  return absl::StrCat("redis shared cache ", client_->options().Url());
}
std::string RedisArtifactStore::PackageKey(const std::string& digest) const {
  return absl::StrCat(options_.key_prefix, ":pkg:", digest);
}
std::string RedisArtifactStore::LeaseKey(const std::string& digest) const {
  return absl::StrCat(options_.key_prefix, ":lease:", digest);
}

absl::StatusOr<bool> RedisArtifactStore::Has(const std::string& digest) const {
  auto r = client_->Command({"HEXISTS", PackageKey(digest), "files"});
  if (!r.ok()) return r.status();
  return r->integer == 1;
}

absl::Status RedisArtifactStore::RefuseCorrupt(const std::string& digest,
                                               const std::string& upload,
                                               const std::string& reason) {
  corrupt_.Increment();
  const std::string p = options_.key_prefix;
  auto removed = client_->Eval(
      redis::ScriptFor<kRemoveScript>(), {PackageKey(digest), p + ":index", p + ":corrupt"},
      {digest, upload, absl::StrCat(digest, " ", clock_->UnixMs(), " ", reason),
       absl::StrCat(p, ":blob:", digest, ":", upload, ":")});
  kiln::LogWarning("cache", absl::StrCat("refused corrupt package ", digest, " in ", Describe(),
                                         ": ", reason));
  return absl::DataLossError(absl::StrCat(
      "copy of ", digest, " in ", Describe(), " is corrupt (", reason, ")",
      removed.ok() ? "; removed from the index, to be rebuilt"
                   : absl::StrCat("; removing it failed: ", removed.status().message())));
}

absl::StatusOr<Revocations> RedisArtifactStore::ReadRevocations() const {
  auto r = client_->Command({"SMEMBERS", options_.key_prefix + ":revoked"});
  if (!r.ok()) return r.status();
  std::string text;
  for (const auto& e : r->elements) absl::StrAppend(&text, e.str, "\n");
  auto parsed = Revocations::Parse(text);
  if (!parsed.ok()) {
    return absl::DataLossError(
        absl::StrCat(options_.key_prefix, ":revoked: ", parsed.status().message()));
  }
  return parsed;
}

absl::Status RedisArtifactStore::AddRevocation(const std::string& entry) {
  if (auto s = Revocations::CheckEntry(entry); !s.ok()) return s;
  auto r = client_->Command({"SADD", options_.key_prefix + ":revoked", entry});
  return r.ok() ? absl::OkStatus() : r.status();
}

absl::Status RedisArtifactStore::Quarantine(const std::string& digest, const std::string& reason) {
  auto upload = client_->Command({"HGET", PackageKey(digest), "upload"});
  if (!upload.ok()) return upload.status();
  if (upload->is_nil()) return absl::NotFoundError(absl::StrCat("no ", digest, " in ", Describe()));
  const std::string p = options_.key_prefix;
  auto removed = client_->Eval(
      redis::ScriptFor<kRemoveScript>(), {PackageKey(digest), p + ":index", p + ":corrupt"},
      {digest, upload->str, absl::StrCat(digest, " ", clock_->UnixMs(), " ", reason),
       absl::StrCat(p, ":blob:", digest, ":", upload->str, ":")});
  if (!removed.ok()) return removed.status();
  kiln::LogWarning("cache", absl::StrCat("quarantined package ", digest, " in ", Describe(),
                                         ": ", reason));
  return absl::OkStatus();
}

absl::StatusOr<FetchResult> RedisArtifactStore::Fetch(const ArtifactKey& key,
                                                      LocalDiskStore& local) {
  const std::string digest = key.Digest();
  auto entry = client_->Command({"HMGET", PackageKey(digest), "files", "upload"});
  if (!entry.ok()) return entry.status();
  if (entry->elements.size() != 2 || entry->elements[0].is_nil()) {
    return absl::NotFoundError(absl::StrCat("no package for ", key.component, " (", digest,
                                            ") in ", Describe()));
  }
  const std::string upload = entry->elements[1].is_nil() ? "" : entry->elements[1].str;
  std::vector<FileEntry> files;
  nlohmann::json j = nlohmann::json::parse(entry->elements[0].str, nullptr, false);
  try {
    if (j.is_discarded() || !j.is_array() || j.empty()) throw std::runtime_error("not a list");
    for (const auto& f : j) {
      FileEntry e{f.at("name").get<std::string>(), f.at("bytes").get<int64_t>(),
                  f.at("sha256").get<std::string>(), f.at("chunks").get<int64_t>()};
      if (e.name.empty() || e.name[0] == '.' || absl::StrContains(e.name, '/') || e.bytes < 0 ||
          e.chunks < 0) {
        throw std::runtime_error("bad file entry");
      }
      files.push_back(std::move(e));
    }
  } catch (const std::exception& e) {
    return RefuseCorrupt(digest, upload, absl::StrCat("index entry unreadable: ", e.what()));
  }

  const std::string staging =
      absl::StrCat(local.root(), "/", kStagingPrefix, digest.substr(0, 12), "-redis-",
                   RandomToken());
  if (::mkdir(staging.c_str(), 0755) != 0) {
    return ErrnoStatus(errno, absl::StrCat("create ", staging));
  }
  struct Cleanup {
    std::string path;
    ~Cleanup() { RemoveTree(path); }
  } cleanup{staging};
  int64_t total = 0;
  for (const FileEntry& f : files) {
    const std::string path = absl::StrCat(staging, "/", f.name);
    int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) return ErrnoStatus(errno, absl::StrCat("create ", path));
    int64_t written = 0;
    absl::Status status;
    for (int64_t i = 0; i < f.chunks && status.ok(); ++i) {
      auto chunk =
          client_->Command({"GET", BlobKey(options_.key_prefix, digest, upload, f.name, i)});
      if (!chunk.ok()) {
        status = chunk.status();
        break;
      }
      if (!chunk->is_string()) {
        ::close(fd);
        return RefuseCorrupt(digest, upload, absl::StrCat(f.name, " chunk ", i, " is missing"));
      }
      written += static_cast<int64_t>(chunk->str.size());
      status = WriteAll(fd, chunk->str, path);
    }
    if (status.ok() && ::fsync(fd) != 0) status = ErrnoStatus(errno, "fsync " + path);
    ::close(fd);
    if (!status.ok()) return status;  // I/O trouble, not the stored copy's fault
    if (written != f.bytes) {
      return RefuseCorrupt(digest, upload, absl::StrCat(f.name, " has ", written,
                                                        " bytes, the index says ", f.bytes));
    }
    auto sha = Sha256File(path);
    if (!sha.ok()) return sha.status();
    if (*sha != f.sha256) {
      return RefuseCorrupt(digest, upload,
                           absl::StrCat(f.name, " does not match its SHA-256 in the index"));
    }
    total += written;
  }
  auto inserted = local.Insert(key, staging);
  if (!inserted.ok()) {
    if (absl::IsDataLoss(inserted.status())) {
      return RefuseCorrupt(digest, upload, std::string(inserted.status().message()));
    }
    return inserted.status();
  }
  return FetchResult{std::move(inserted->package), inserted->bytes == 0 ? 0 : total};
}

absl::Status RedisArtifactStore::Publish(const LocatedPackage& package) {
  const std::string& digest = package.manifest.digest;
  auto has = Has(digest);
  if (!has.ok()) return has.status();
  if (*has) return absl::OkStatus();
  auto names = PackageFiles(package.dir);
  if (!names.ok()) return names.status();
  const std::string upload = RandomToken();
  const std::string ttl = std::to_string(options_.upload_ttl_ms);
  nlohmann::json index = nlohmann::json::array();
  std::vector<std::string> chunk_keys;
  int64_t total = 0;
  for (const std::string& name : *names) {
    const std::string path = absl::StrCat(package.dir, "/", name);
    auto sha = Sha256File(path);
    if (!sha.ok()) return sha.status();
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return ErrnoStatus(errno, absl::StrCat("open ", path));
    std::string buf(static_cast<size_t>(options_.chunk_bytes), '\0');
    int64_t bytes = 0, chunks = 0;
    absl::Status status;
    while (status.ok()) {
      size_t filled = 0;
      while (filled < buf.size()) {
        ssize_t n = ::read(fd, buf.data() + filled, buf.size() - filled);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) {
          status = ErrnoStatus(errno, absl::StrCat("read ", path));
          break;
        }
        if (n == 0) break;
        filled += static_cast<size_t>(n);
      }
      if (!status.ok() || filled == 0) break;
      const std::string key = BlobKey(options_.key_prefix, digest, upload, name, chunks);
      auto set = client_->Command({"SET", key, buf.substr(0, filled), "PX", ttl});
      if (!set.ok()) status = set.status();
      chunk_keys.push_back(key);
      bytes += static_cast<int64_t>(filled);
      ++chunks;
      if (filled < buf.size()) break;
    }
    ::close(fd);
    if (!status.ok()) return status;  // the uploaded chunks expire on their own
    index.push_back({{"name", name}, {"bytes", bytes}, {"sha256", *sha}, {"chunks", chunks}});
    total += bytes;
  }
  const std::string p = options_.key_prefix;
  std::vector<std::string> args = {digest, index.dump(), upload,
                                   std::to_string(clock_->UnixMs())};
  args.insert(args.end(), chunk_keys.begin(), chunk_keys.end());
  auto published =
      client_->Eval(redis::ScriptFor<kPublishScript>(), {PackageKey(digest), p + ":index"}, args);
  if (!published.ok()) return published.status();
  if (published->integer == 1) {
    kiln::LogInfo("cache", absl::StrCat("published package ", digest, " (", total, " bytes) to ",
                                        Describe()));
  } else {
    std::vector<std::string> del = {"DEL"};
    del.insert(del.end(), chunk_keys.begin(), chunk_keys.end());
    if (chunk_keys.size() > 0) (void)client_->Command(del);  // else they expire
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<CompileLease>> RedisArtifactStore::TryAcquireLease(
    const std::string& digest, const LeaseRequest& request) {
  if (auto s = CheckLeaseRequest(digest, request); !s.ok()) return s;
  LeaseInfo info{digest, request.holder, static_cast<int64_t>(::getpid()), host_,
                 clock_->UnixMs() + request.ttl_ms, RandomToken()};
  const std::string held = absl::StrCat(options_.key_prefix, ":lease-held:", digest);
  auto r = client_->Eval(redis::ScriptFor<kAcquireScript>(), {LeaseKey(digest), held},
                         {info.token, info.token + " " + info.ToJson().dump(),
                          std::to_string(request.ttl_ms)});
  if (!r.ok()) return r.status();
  if (r->type != redis::Reply::Type::kArray || r->elements.size() != 2) {
    return absl::InternalError("lease: unexpected reply from the acquire script");
  }
  if (r->elements[0].integer == 1) {
    const bool took_over = r->elements[1].integer == 1;
    if (took_over) {
      kiln::LogWarning("cache", absl::StrCat("took over the expired compile lease for ",
                                             digest.substr(0, 12), " in ", Describe()));
    }
    return std::unique_ptr<CompileLease>(std::make_unique<RedisCompileLease>(
        *client_, LeaseKey(digest), held, clock_, std::move(info), request.ttl_ms, took_over));
  }
  const std::string& cur = r->elements[1].str;
  const size_t space = cur.find(' ');
  nlohmann::json j = space == std::string::npos
                         ? nlohmann::json()
                         : nlohmann::json::parse(cur.substr(space + 1), nullptr, false);
  auto holder = j.is_discarded() || j.is_null() ? absl::StatusOr<LeaseInfo>(
                                                      absl::DataLossError("unreadable"))
                                                : LeaseInfo::FromJson(j);
  return absl::AlreadyExistsError(absl::StrCat(
      "compile lease for ", digest, " is held by ",
      holder.ok() ? absl::StrCat(holder->holder, " (pid ", holder->pid, " on ", holder->host, ")")
                  : std::string("an unreadable lease (it expires on its own)")));
}

}  // namespace kiln::cache
