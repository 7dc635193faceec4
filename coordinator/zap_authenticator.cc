#include "coordinator/zap_authenticator.h"

#include <chrono>
#include <iterator>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/clock.h"
#include "common/log.h"
#include "zmq_addon.hpp"

namespace kiln::coordinator {
namespace {

constexpr char kZapEndpoint[] = "inproc://zeromq.zap.01";
constexpr int kPollMs = 100;

std::string Z85(const zmq::message_t& binary_key) {
  if (binary_key.size() != 32) return "";
  char out[41] = {};
  if (zmq_z85_encode(out, static_cast<const uint8_t*>(binary_key.data()), 32) == nullptr) {
    return "";
  }
  return out;
}

}  // namespace

const char* PeerRoleName(PeerRole role) {
  switch (role) {
    case PeerRole::kNode:
      return "node";
    case PeerRole::kClient:
      return "client";
    case PeerRole::kAdmin:
      return "admin";
    case PeerRole::kNone:
      break;
  }
  return "none";
}

std::string MakeUserId(PeerRole role, const std::string& key) {
  return absl::StrCat(PeerRoleName(role), ":", key);
}

Peer ParseUserId(absl::string_view user_id) {
  for (PeerRole role : {PeerRole::kNode, PeerRole::kClient, PeerRole::kAdmin}) {
    const std::string prefix = absl::StrCat(PeerRoleName(role), ":");
    if (absl::StartsWith(user_id, prefix) && user_id.size() > prefix.size()) {
      return Peer{role, std::string(user_id.substr(prefix.size()))};
    }
  }
  return Peer{};
}

absl::StatusOr<KeyAllowlist> KeyAllowlist::Load(const KeyAllowlistPaths& paths) {
  KeyAllowlist lists;
  for (auto [path, list] : {std::pair{&paths.node_keys, &lists.node_},
                            std::pair{&paths.client_keys, &lists.client_},
                            std::pair{&paths.admin_keys, &lists.admin_}}) {
    auto read = ReadCurveKeyList(*path);
    if (!read.ok()) return read.status();
    *list = std::move(*read);
  }
  return lists;
}

PeerRole KeyAllowlist::RoleOf(absl::string_view domain, const std::string& public_key) const {
  if (domain == "node") return node_.count(public_key) ? PeerRole::kNode : PeerRole::kNone;
  if (domain == "client") {
    if (admin_.count(public_key)) return PeerRole::kAdmin;
    if (client_.count(public_key)) return PeerRole::kClient;
  }
  return PeerRole::kNone;
}

std::string KeyAllowlist::NameOf(const std::string& public_key) const {
  for (const CurveKeyList* list : {&admin_, &client_, &node_}) {
    if (auto it = list->find(public_key); it != list->end()) return it->second;
  }
  return "";
}

absl::StatusOr<std::unique_ptr<ZapAuthenticator>> ZapAuthenticator::Start(
    zmq::context_t& context, const ZapAuthenticatorOptions& options,
    prometheus::Registry& registry, std::function<void(const std::string&)> log) {
  auto lists = KeyAllowlist::Load(options.allowlists);
  if (!lists.ok()) return lists.status();
  std::unique_ptr<ZapAuthenticator> auth(
      new ZapAuthenticator(options, std::move(*lists), registry, std::move(log)));
  try {
    auth->socket_ = std::make_unique<zmq::socket_t>(context, zmq::socket_type::rep);
    auth->socket_->set(zmq::sockopt::linger, 0);
    auth->socket_->bind(kZapEndpoint);
  } catch (const zmq::error_t& e) {
    return absl::InternalError(absl::StrCat("cannot bind the ZAP handler: ", e.what()));
  }
  auth->fingerprint_ = absl::StrCat(KeyListFingerprint(options.allowlists.node_keys), "|",
                                    KeyListFingerprint(options.allowlists.client_keys), "|",
                                    KeyListFingerprint(options.allowlists.admin_keys));
  auth->keys_.Add({{"list", "node"}}).Set(auth->lists_.node_keys());
  auth->keys_.Add({{"list", "client"}}).Set(auth->lists_.client_keys());
  auth->keys_.Add({{"list", "admin"}}).Set(auth->lists_.admin_keys());
  auth->thread_ = std::thread(&ZapAuthenticator::Loop, auth.get());
  return auth;
}

ZapAuthenticator::ZapAuthenticator(const ZapAuthenticatorOptions& options, KeyAllowlist lists,
                                   prometheus::Registry& registry,
                                   std::function<void(const std::string&)> log)
    : options_(options),
      lists_(std::move(lists)),
      log_(std::move(log)),
      handshakes_(prometheus::BuildCounter()
                      .Name("kiln_auth_handshakes_total")
                      .Help("CURVE handshakes answered by the ZAP handler, by socket domain and "
                            "result (accepted, refused: the key is in no allowlist for it)")
                      .Register(registry)),
      reloads_(prometheus::BuildCounter()
                   .Name("kiln_auth_reloads_total")
                   .Help("Allowlist reloads (file change or SIGHUP), by result (ok, error: the "
                         "previous lists were kept)")
                   .Register(registry)),
      keys_(prometheus::BuildGauge()
                .Name("kiln_auth_keys")
                .Help("Public keys in each allowlist (node, client, admin)")
                .Register(registry)) {}

ZapAuthenticator::~ZapAuthenticator() { Stop(); }

void ZapAuthenticator::Stop() {
  stop_.store(true);
  if (thread_.joinable()) thread_.join();
  socket_.reset();
}

void ZapAuthenticator::Log(const std::string& line) {
  if (log_) log_(line);
}

void ZapAuthenticator::MaybeReload(bool force) {
  const KeyAllowlistPaths& p = options_.allowlists;
  const std::string fingerprint = absl::StrCat(KeyListFingerprint(p.node_keys), "|",
                                               KeyListFingerprint(p.client_keys), "|",
                                               KeyListFingerprint(p.admin_keys));
  if (!force && fingerprint == fingerprint_) return;
  fingerprint_ = fingerprint;
  auto lists = KeyAllowlist::Load(p);
  if (!lists.ok()) {
    reloads_.Add({{"result", "error"}}).Increment();
    Log(absl::StrCat("allowlist reload failed, keeping the previous keys: ",
                     lists.status().message()));
    return;
  }
  lists_ = std::move(*lists);
  reloads_.Add({{"result", "ok"}}).Increment();
  keys_.Add({{"list", "node"}}).Set(lists_.node_keys());
  keys_.Add({{"list", "client"}}).Set(lists_.client_keys());
  keys_.Add({{"list", "admin"}}).Set(lists_.admin_keys());
  Log(absl::StrCat("allowlists reloaded: ", lists_.node_keys(), " node, ", lists_.client_keys(),
                   " client, ", lists_.admin_keys(), " admin keys"));
}

void ZapAuthenticator::Loop() {
  int64_t next_check_ms = SteadyMs() + options_.check_interval_ms;
  while (!stop_.load()) {
    if (reload_requested_.exchange(false)) {
      MaybeReload(/*force=*/true);
    } else if (SteadyMs() >= next_check_ms) {
      next_check_ms = SteadyMs() + options_.check_interval_ms;
      MaybeReload(/*force=*/false);
    }
    zmq::pollitem_t item{socket_->handle(), 0, ZMQ_POLLIN, 0};
    try {
      zmq::poll(&item, 1, std::chrono::milliseconds(kPollMs));
      if (!(item.revents & ZMQ_POLLIN)) continue;
      std::vector<zmq::message_t> request;
      if (!zmq::recv_multipart(*socket_, std::back_inserter(request),
                               zmq::recv_flags::dontwait)) {
        continue;
      }
      Handle(request);
    } catch (const zmq::error_t& e) {
      if (e.num() == ETERM) return;
      Log(absl::StrCat("ZAP handler: ", e.what()));
    }
  }
}

void ZapAuthenticator::Handle(std::vector<zmq::message_t>& request) {
  // [version][request id][domain][address][routing id][mechanism][credentials...]
  std::string status_code = "400", status_text = "malformed ZAP request", user_id;
  std::string request_id = request.size() > 1 ? request[1].to_string() : "";
  std::string domain = request.size() > 2 ? request[2].to_string() : "";
  std::string address = request.size() > 3 ? request[3].to_string() : "";
  std::string key;
  if (request.size() >= 7 && request[0].to_string_view() == "1.0" &&
      request[5].to_string_view() == "CURVE") {
    key = Z85(request[6]);
    const PeerRole role = key.empty() ? PeerRole::kNone : lists_.RoleOf(domain, key);
    if (role != PeerRole::kNone) {
      status_code = "200";
      status_text = "OK";
      user_id = MakeUserId(role, key);
    } else {
      status_text = "key not allowed";
    }
  } else if (request.size() >= 6) {
    status_text = absl::StrCat("mechanism ", request[5].to_string(), " not allowed");
  }
  handshakes_.Add({{"domain", domain.empty() ? "none" : domain},
                   {"result", status_code == "200" ? "accepted" : "refused"}})
      .Increment();
  if (status_code != "200") {
    const int64_t now = SteadyMs();
    if (now - last_refusal_log_ms_ >= 1000) {
      last_refusal_log_ms_ = now;
      std::string more;
      if (refusals_not_logged_ > 0) {
        more = absl::StrCat(" (", refusals_not_logged_, " more since the last such line)");
      }
      refusals_not_logged_ = 0;
      Log(absl::StrCat("refused a ", domain, " connection from ", address, " (key ",
                       key.empty() ? "none" : key, "): ", status_text, more));
    } else {
      ++refusals_not_logged_;
    }
  }
  std::vector<zmq::const_buffer> reply = {
      zmq::str_buffer("1.0"),        zmq::buffer(request_id), zmq::buffer(status_code),
      zmq::buffer(status_text), zmq::buffer(user_id),   zmq::const_buffer()};
  zmq::send_multipart(*socket_, reply, zmq::send_flags::dontwait);
}

}  // namespace kiln::coordinator
