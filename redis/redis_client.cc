#include "redis/redis_client.h"

#include <sys/time.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "hiredis/hiredis.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"

namespace kiln::redis {
namespace {

int64_t SteadyMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

struct ReplyDeleter {
  void operator()(redisReply* r) const { freeReplyObject(r); }
};
using ReplyPtr = std::unique_ptr<redisReply, ReplyDeleter>;

struct ContextDeleter {
  void operator()(redisContext* c) const { redisFree(c); }
};
using ContextPtr = std::unique_ptr<redisContext, ContextDeleter>;

timeval ToTimeval(int64_t ms) {
  timeval tv;
  tv.tv_sec = ms / 1000;
  tv.tv_usec = (ms % 1000) * 1000;
  return tv;
}

// Decodes a non-error reply (errors are handled before, at every level).
absl::StatusOr<Reply> Decode(const redisReply& r) {
  Reply out;
  switch (r.type) {
    case REDIS_REPLY_NIL:
      out.type = Reply::Type::kNil;
      return out;
    case REDIS_REPLY_STRING:
      out.type = Reply::Type::kString;
      out.str.assign(r.str, r.len);
      return out;
    case REDIS_REPLY_STATUS:
      out.type = Reply::Type::kStatus;
      out.str.assign(r.str, r.len);
      return out;
    case REDIS_REPLY_INTEGER:
      out.type = Reply::Type::kInteger;
      out.integer = r.integer;
      return out;
    case REDIS_REPLY_ARRAY:
      out.type = Reply::Type::kArray;
      out.elements.reserve(r.elements);
      for (size_t i = 0; i < r.elements; ++i) {
        const redisReply* e = r.element[i];
        if (e->type == REDIS_REPLY_ERROR) {
          // Only inside MULTI/EXEC results; kiln does not use them, but never crash on one.
          Reply err;
          err.type = Reply::Type::kStatus;
          err.str = std::string("ERR ") + std::string(e->str, e->len);
          out.elements.push_back(std::move(err));
          continue;
        }
        auto d = Decode(*e);
        if (!d.ok()) return d.status();
        out.elements.push_back(std::move(*d));
      }
      return out;
    default:
      return absl::InternalError(absl::StrCat("unexpected redis reply type ", r.type));
  }
}

// The Status for an error reply; see the header for the mapping.
absl::Status ErrorStatus(absl::string_view text, const std::string& url) {
  const std::string first(text.substr(0, text.find(' ')));
  static const std::pair<const char*, absl::StatusCode> kCodes[] = {
      {"INVALID_ARGUMENT", absl::StatusCode::kInvalidArgument},
      {"NOT_FOUND", absl::StatusCode::kNotFound},
      {"ALREADY_EXISTS", absl::StatusCode::kAlreadyExists},
      {"FAILED_PRECONDITION", absl::StatusCode::kFailedPrecondition},
      {"ABORTED", absl::StatusCode::kAborted},
      {"DATA_LOSS", absl::StatusCode::kDataLoss},
      {"INTERNAL", absl::StatusCode::kInternal},
      {"UNAVAILABLE", absl::StatusCode::kUnavailable},
  };
  for (const auto& [name, code] : kCodes) {
    if (first == name) {
      return absl::Status(code, absl::StripLeadingAsciiWhitespace(text.substr(first.size())));
    }
  }
  const std::string where = absl::StrCat("redis ", url, ": ", text);
  if (first == "WRONGTYPE") {
    return absl::DataLossError(absl::StrCat(where, " (not what kiln stores under this key)"));
  }
  if (first == "LOADING" || first == "BUSY" || first == "READONLY" || first == "MASTERDOWN" ||
      first == "TRYAGAIN" || first == "CLUSTERDOWN") {
    return absl::UnavailableError(where);
  }
  if (first == "OOM") return absl::ResourceExhaustedError(where);
  return absl::InternalError(where);
}

bool IsNoScript(const absl::Status& s) {
  return absl::IsInternal(s) && absl::StrContains(s.message(), "NOSCRIPT");
}

}  // namespace

struct RedisClient::Context {
  ContextPtr ctx;
};

absl::Status RedisOptions::Validate() const {
  if (host.empty()) return absl::InvalidArgumentError("redis host: must not be empty");
  if (port < 1 || port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("redis port: ", port, " is not in 1..65535"));
  }
  if (db < 0) return absl::InvalidArgumentError(absl::StrCat("redis db: ", db, " is negative"));
  if (connect_timeout_ms < 1) {
    return absl::InvalidArgumentError("redis connect_timeout_ms: must be at least 1");
  }
  if (command_timeout_ms < 1) {
    return absl::InvalidArgumentError("redis command_timeout_ms: must be at least 1");
  }
  if (reconnect_initial_ms < 0 || reconnect_max_ms < reconnect_initial_ms) {
    return absl::InvalidArgumentError(
        "redis reconnect_initial_ms / reconnect_max_ms: need 0 <= initial <= max");
  }
  return absl::OkStatus();
}

std::string RedisOptions::Url() const { return absl::StrCat("redis://", host, ":", port, "/", db); }

bool IsRedisUrl(absl::string_view spec) { return absl::StartsWith(spec, "redis://"); }

absl::StatusOr<RedisOptions> ParseRedisUrl(absl::string_view url) {
  if (!IsRedisUrl(url)) {
    return absl::InvalidArgumentError(
        absl::StrCat("'", url, "' is not a redis://HOST[:PORT][/DB] URL"));
  }
  absl::string_view rest = url.substr(std::string("redis://").size());
  RedisOptions options;
  if (const size_t slash = rest.find('/'); slash != absl::string_view::npos) {
    const absl::string_view db = rest.substr(slash + 1);
    if (!db.empty() && (!absl::SimpleAtoi(db, &options.db) || options.db < 0)) {
      return absl::InvalidArgumentError(
          absl::StrCat("'", url, "': database '", db, "' is not a non-negative number"));
    }
    rest = rest.substr(0, slash);
  }
  if (absl::StrContains(rest, '@')) {
    return absl::InvalidArgumentError(
        absl::StrCat("'", url, "': credentials in the URL are not supported"));
  }
  if (const size_t colon = rest.rfind(':'); colon != absl::string_view::npos) {
    const absl::string_view port = rest.substr(colon + 1);
    if (!absl::SimpleAtoi(port, &options.port) || options.port < 1 || options.port > 65535) {
      return absl::InvalidArgumentError(
          absl::StrCat("'", url, "': port '", port, "' is not in 1..65535"));
    }
    rest = rest.substr(0, colon);
  }
  if (rest.empty()) return absl::InvalidArgumentError(absl::StrCat("'", url, "': no host"));
  options.host = std::string(rest);
  return options;
}

absl::StatusOr<std::unique_ptr<RedisClient>> RedisClient::Create(const RedisOptions& options,
                                                                 prometheus::Registry* registry) {
  if (auto s = options.Validate(); !s.ok()) return s;
  std::shared_ptr<prometheus::Registry> owned;
  if (registry == nullptr) {
    owned = std::make_shared<prometheus::Registry>();
    registry = owned.get();
  }
  std::unique_ptr<RedisClient> client(new RedisClient(options, *registry));
  client->owned_registry_ = std::move(owned);
  return client;
}

namespace {

prometheus::Family<prometheus::Counter>& CommandsFamily(prometheus::Registry& r) {
  return prometheus::BuildCounter()
      .Name("kiln_redis_commands_total")
      .Help("Redis commands by outcome (error: Redis answered with an error; unavailable: no "
            "answer: not connected, refused, timed out)")
      .Register(r);
}
prometheus::Family<prometheus::Counter>& ConnectsFamily(prometheus::Registry& r) {
  return prometheus::BuildCounter()
      .Name("kiln_redis_connects_total")
      .Help("Redis connection attempts by result")
      .Register(r);
}

}  // namespace

RedisClient::RedisClient(const RedisOptions& options, prometheus::Registry& registry)
    : options_(options),
      commands_ok_(CommandsFamily(registry).Add(
          {{"client", options.client_name}, {"result", "ok"}})),
      commands_error_(CommandsFamily(registry).Add(
          {{"client", options.client_name}, {"result", "error"}})),
      commands_unavailable_(CommandsFamily(registry).Add(
          {{"client", options.client_name}, {"result", "unavailable"}})),
      connects_ok_(ConnectsFamily(registry).Add({{"client", options.client_name}, {"result", "ok"}})),
      connects_failed_(
          ConnectsFamily(registry).Add({{"client", options.client_name}, {"result", "failed"}})),
      connected_gauge_(prometheus::BuildGauge()
                           .Name("kiln_redis_connected")
                           .Help("1 while the client's Redis connection is up")
                           .Register(registry)
                           .Add({{"client", options.client_name}})) {}

RedisClient::~RedisClient() {
  absl::MutexLock lock(&mu_);
  Disconnect();
}

bool RedisClient::connected() const {
  absl::MutexLock lock(&mu_);
  return context_ != nullptr;
}

void RedisClient::Disconnect() {
  if (context_ != nullptr) connected_gauge_.Set(0);
  context_.reset();
}

absl::Status RedisClient::EnsureConnected(bool force) {
  if (context_ != nullptr) return absl::OkStatus();
  const int64_t now = SteadyMs();
  if (!force && now < next_attempt_ms_) {
    return absl::UnavailableError(absl::StrCat("redis ", options_.Url(), " unreachable (",
                                               last_error_, "); next attempt in ",
                                               next_attempt_ms_ - now, " ms"));
  }
  auto fail = [&](const std::string& why) {
    connects_failed_.Increment();
    last_error_ = why;
    backoff_ms_ = backoff_ms_ == 0 ? options_.reconnect_initial_ms
                                   : std::min(backoff_ms_ * 2, options_.reconnect_max_ms);
    next_attempt_ms_ = SteadyMs() + backoff_ms_;
    return absl::UnavailableError(
        absl::StrCat("cannot connect to redis ", options_.Url(), ": ", why));
  };
  ContextPtr ctx(redisConnectWithTimeout(options_.host.c_str(), options_.port,
                                         ToTimeval(options_.connect_timeout_ms)));
  if (ctx == nullptr) return fail("out of memory");
  if (ctx->err != 0) return fail(ctx->errstr);
  if (redisSetTimeout(ctx.get(), ToTimeval(options_.command_timeout_ms)) != REDIS_OK) {
    return fail(ctx->errstr[0] ? ctx->errstr : "cannot set the command timeout");
  }
  context_ = std::make_unique<Context>();
  context_->ctx = std::move(ctx);
  // SELECT and CLIENT SETNAME on the fresh connection; failures drop it again.
  if (options_.db != 0) {
    auto r = CommandLocked({"SELECT", std::to_string(options_.db)});
    if (!r.ok()) {
      Disconnect();
      if (absl::IsUnavailable(r.status())) return fail(std::string(r.status().message()));
      return absl::InvalidArgumentError(
          absl::StrCat("redis ", options_.Url(), ": cannot select database ", options_.db, ": ",
                       r.status().message()));
    }
  }
  auto named = CommandLocked({"CLIENT", "SETNAME", options_.client_name});
  if (!named.ok() && absl::IsUnavailable(named.status())) {
    Disconnect();
    return fail(std::string(named.status().message()));
  }
  connects_ok_.Increment();
  connected_gauge_.Set(1);
  backoff_ms_ = 0;
  next_attempt_ms_ = 0;
  return absl::OkStatus();
}

absl::StatusOr<Reply> RedisClient::CommandLocked(const std::vector<std::string>& argv) {
  if (argv.empty()) return absl::InvalidArgumentError("redis command: no arguments");
  std::vector<const char*> args;
  std::vector<size_t> lens;
  args.reserve(argv.size());
  lens.reserve(argv.size());
  for (const auto& a : argv) {
    args.push_back(a.data());
    lens.push_back(a.size());
  }
  redisContext* c = context_->ctx.get();
  ReplyPtr reply(static_cast<redisReply*>(
      redisCommandArgv(c, static_cast<int>(args.size()), args.data(), lens.data())));
  if (reply == nullptr) {
    // An I/O error, EOF or timeout: the connection is unusable from here on.
    const std::string why =
        c->err == REDIS_ERR_IO && (errno == EAGAIN || errno == EWOULDBLOCK)
            ? absl::StrCat("no reply within ", options_.command_timeout_ms, " ms")
            : std::string(c->errstr[0] ? c->errstr : "connection lost");
    Disconnect();
    last_error_ = why;
    commands_unavailable_.Increment();
    return absl::UnavailableError(
        absl::StrCat("redis ", options_.Url(), ": ", argv[0], " failed: ", why));
  }
  if (reply->type == REDIS_REPLY_ERROR) {
    commands_error_.Increment();
    return ErrorStatus(absl::string_view(reply->str, reply->len), options_.Url());
  }
  auto decoded = Decode(*reply);
  if (decoded.ok()) {
    commands_ok_.Increment();
  } else {
    commands_error_.Increment();
  }
  return decoded;
}

absl::StatusOr<Reply> RedisClient::Command(const std::vector<std::string>& argv) {
  absl::MutexLock lock(&mu_);
  if (auto s = EnsureConnected(/*force=*/false); !s.ok()) {
    commands_unavailable_.Increment();
    return s;
  }
  return CommandLocked(argv);
}

absl::Status RedisClient::Ping() {
  absl::MutexLock lock(&mu_);
  if (auto s = EnsureConnected(/*force=*/true); !s.ok()) return s;
  auto r = CommandLocked({"PING"});
  return r.ok() ? absl::OkStatus() : r.status();
}

absl::StatusOr<Reply> RedisClient::Eval(const Script& script, const std::vector<std::string>& keys,
                                        const std::vector<std::string>& args) {
  absl::MutexLock lock(&mu_);
  if (auto s = EnsureConnected(/*force=*/false); !s.ok()) {
    commands_unavailable_.Increment();
    return s;
  }
  std::string sha;
  {
    absl::MutexLock script_lock(&script.mu_);
    sha = script.sha_;
  }
  if (sha.empty()) {
    auto loaded = CommandLocked({"SCRIPT", "LOAD", script.source()});
    if (!loaded.ok()) return loaded.status();
    if (!loaded->is_string()) return absl::InternalError("SCRIPT LOAD returned no sha");
    sha = loaded->str;
    absl::MutexLock script_lock(&script.mu_);
    script.sha_ = sha;
  }
  std::vector<std::string> argv;
  argv.reserve(3 + keys.size() + args.size());
  argv.push_back("EVALSHA");
  argv.push_back(sha);
  argv.push_back(std::to_string(keys.size()));
  argv.insert(argv.end(), keys.begin(), keys.end());
  argv.insert(argv.end(), args.begin(), args.end());
  auto reply = CommandLocked(argv);
  if (reply.ok() || !IsNoScript(reply.status()) || context_ == nullptr) return reply;
  // A Redis that restarted (or flushed its scripts): EVAL sends the source and caches it again.
  argv[0] = "EVAL";
  argv[1] = script.source();
  return CommandLocked(argv);
}

}  // namespace kiln::redis
