#include "common/curve_keys.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zmq.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/files.h"

namespace kiln {
namespace {

constexpr size_t kZ85KeyLength = 40;

absl::Status ErrnoError(int err, absl::string_view what, const std::string& path) {
  return absl::ErrnoToStatus(err, absl::StrCat(what, " ", path));
}

absl::StatusOr<std::string> ReadSmallFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return ErrnoError(errno, "cannot read", path);
  std::ostringstream buf;
  buf << in.rdbuf();
  std::string text = buf.str();
  if (text.size() > (1 << 20)) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": larger than 1 MiB; not a key file"));
  }
  return text;
}

// The value of `public-key = "..."` / `secret-key = "..."` lines, and bare key lines.
struct ParsedKeyFile {
  std::string public_key, secret_key, bare;
};

absl::StatusOr<ParsedKeyFile> ParseKeyFile(const std::string& path, const std::string& text) {
  ParsedKeyFile out;
  int line_no = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_no;
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || line[0] == '#') continue;
    std::string* target = nullptr;
    if (absl::ConsumePrefix(&line, "public-key")) {
      target = &out.public_key;
    } else if (absl::ConsumePrefix(&line, "secret-key")) {
      target = &out.secret_key;
    }
    if (target == nullptr) {
      if (IsCurveKey(line) && out.bare.empty()) {
        out.bare = std::string(line);
        continue;
      }
      if (line == "curve" || line == "metadata" || absl::StrContains(line, '=')) continue;
      return absl::InvalidArgumentError(
          absl::StrCat(path, ":", line_no, ": not a key line (want public-key = \"Z85\")"));
    }
    line = absl::StripLeadingAsciiWhitespace(line);
    if (!absl::ConsumePrefix(&line, "=")) {
      return absl::InvalidArgumentError(absl::StrCat(path, ":", line_no, ": missing '='"));
    }
    line = absl::StripAsciiWhitespace(line);
    absl::ConsumePrefix(&line, "\"");
    absl::ConsumeSuffix(&line, "\"");
    if (!IsCurveKey(line)) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ":", line_no, ": not a 40-character Z85 CURVE key"));
    }
    *target = std::string(line);
  }
  return out;
}

bool ValidName(absl::string_view name) {
  if (name.empty() || name == "." || name == "..") return false;
  for (char c : name) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '_' && c != '-') {
      return false;
    }
  }
  return true;
}

absl::Status WriteNew(const std::string& path, const std::string& contents, int mode,
                      bool overwrite) {
  const int flags = O_WRONLY | O_CREAT | O_CLOEXEC | (overwrite ? O_TRUNC : O_EXCL);
  UniqueFd fd(::open(path.c_str(), flags, mode));
  if (fd.get() < 0) return ErrnoError(errno, "cannot create", path);
  // The mode of an existing file (overwrite) or one narrowed by the umask is set explicitly.
  if (::fchmod(fd.get(), mode) != 0) return ErrnoError(errno, "cannot chmod", path);
  size_t done = 0;
  while (done < contents.size()) {
    const ssize_t n = ::write(fd.get(), contents.data() + done, contents.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return ErrnoError(errno, "cannot write", path);
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd.get()) != 0) return ErrnoError(errno, "cannot fsync", path);
  if (fd.Close() != 0) return ErrnoError(errno, "cannot close", path);
  return absl::OkStatus();
}

std::vector<std::string> PubFilesIn(const std::string& dir) {
  std::vector<std::string> names;
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return names;
  while (dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    if (name.size() > 4 && absl::EndsWith(name, ".pub") && name[0] != '.') names.push_back(name);
  }
  ::closedir(d);
  std::sort(names.begin(), names.end());
  return names;
}

}  // namespace

bool IsCurveKey(absl::string_view z85) {
  if (z85.size() != kZ85KeyLength) return false;
  uint8_t bytes[32];
  const std::string copy(z85);
  return zmq_z85_decode(bytes, copy.c_str()) != nullptr;
}

absl::StatusOr<CurveKeyPair> NewCurveKeyPair() {
  char pub[kZ85KeyLength + 1] = {}, sec[kZ85KeyLength + 1] = {};
  if (zmq_curve_keypair(pub, sec) != 0) {
    return absl::InternalError(
        absl::StrCat("zmq_curve_keypair failed (libzmq without CURVE?): ", zmq_strerror(errno)));
  }
  return CurveKeyPair{pub, sec};
}

absl::StatusOr<std::string> CurvePublicKey(absl::string_view secret_z85) {
  if (!IsCurveKey(secret_z85)) {
    return absl::InvalidArgumentError("secret key: not a 40-character Z85 CURVE key");
  }
  char pub[kZ85KeyLength + 1] = {};
  const std::string secret(secret_z85);
  if (zmq_curve_public(pub, secret.c_str()) != 0) {
    return absl::InternalError(absl::StrCat("zmq_curve_public failed: ", zmq_strerror(errno)));
  }
  return std::string(pub);
}

absl::Status WriteCurveKeyFiles(const std::string& dir, const std::string& name,
                                const CurveKeyPair& pair, bool overwrite) {
  if (!ValidName(name)) {
    return absl::InvalidArgumentError(
        absl::StrCat("name: '", name, "' is not [A-Za-z0-9._-]+"));
  }
  if (!IsCurveKey(pair.public_key) || !IsCurveKey(pair.secret_key)) {
    return absl::InvalidArgumentError("key pair: not Z85 CURVE keys");
  }
  const std::string d = dir.empty() ? "." : dir;
  if (::mkdir(d.c_str(), 0700) != 0 && errno != EEXIST) {
    return ErrnoError(errno, "cannot create directory", d);
  }
  const std::string key_path = absl::StrCat(d, "/", name, ".key");
  const std::string pub_path = absl::StrCat(d, "/", name, ".pub");
  if (!overwrite) {
    struct stat st;
    for (const std::string& p : {key_path, pub_path}) {
      if (::stat(p.c_str(), &st) == 0) {
        return absl::AlreadyExistsError(absl::StrCat(p, " exists; not overwritten"));
      }
    }
  }
  const std::string pub_line = absl::StrCat("public-key = \"", pair.public_key, "\"\n");
  if (auto s = WriteNew(key_path,
                        absl::StrCat("# kiln CURVE key pair '", name,
                                     "': keep secret (0600)\n", pub_line, "secret-key = \"",
                                     pair.secret_key, "\"\n"),
                        0600, overwrite);
      !s.ok()) {
    return s;
  }
  return WriteNew(pub_path, absl::StrCat("# kiln CURVE public key '", name, "'\n", pub_line),
                  0644, overwrite);
}

absl::StatusOr<CurveKeyPair> ReadCurveKeyPair(const std::string& path) {
  auto text = ReadSmallFile(path);
  if (!text.ok()) return text.status();
  auto parsed = ParseKeyFile(path, *text);
  if (!parsed.ok()) return parsed.status();
  std::string secret = !parsed->secret_key.empty() ? parsed->secret_key : parsed->bare;
  if (secret.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": no secret-key line (is this a .pub file?)"));
  }
  auto pub = CurvePublicKey(secret);
  if (!pub.ok()) return absl::InvalidArgumentError(absl::StrCat(path, ": ", pub.status().message()));
  if (!parsed->public_key.empty() && parsed->public_key != *pub) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": public-key does not belong to secret-key"));
  }
  return CurveKeyPair{*pub, secret};
}

absl::StatusOr<std::string> ReadCurvePublicKey(const std::string& path) {
  auto text = ReadSmallFile(path);
  if (!text.ok()) return text.status();
  auto parsed = ParseKeyFile(path, *text);
  if (!parsed.ok()) return parsed.status();
  if (!parsed->public_key.empty()) return parsed->public_key;
  if (!parsed->secret_key.empty()) return CurvePublicKey(parsed->secret_key);
  if (!parsed->bare.empty()) return parsed->bare;
  return absl::InvalidArgumentError(absl::StrCat(path, ": no public key in it"));
}

absl::StatusOr<CurveKeyList> ReadCurveKeyList(const std::string& path) {
  CurveKeyList list;
  if (path.empty()) return list;
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return ErrnoError(errno, "key list", path);
  if (S_ISDIR(st.st_mode)) {
    for (const std::string& name : PubFilesIn(path)) {
      auto key = ReadCurvePublicKey(absl::StrCat(path, "/", name));
      if (!key.ok()) return key.status();
      list[*key] = name.substr(0, name.size() - 4);
    }
    return list;
  }
  auto text = ReadSmallFile(path);
  if (!text.ok()) return text.status();
  int line_no = 0;
  for (absl::string_view line : absl::StrSplit(*text, '\n')) {
    ++line_no;
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || line[0] == '#') continue;
    std::vector<absl::string_view> words =
        absl::StrSplit(line, absl::ByAnyChar(" \t"), absl::SkipEmpty());
    if (!IsCurveKey(words[0])) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ":", line_no, ": not a 40-character Z85 CURVE public key"));
    }
    list[std::string(words[0])] =
        words.size() > 1 ? std::string(words[1]) : absl::StrCat("line", line_no);
  }
  return list;
}

std::string KeyListFingerprint(const std::string& path) {
  if (path.empty()) return "";
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return "";
  auto stamp = [](const struct stat& s) {
    return absl::StrCat(s.st_size, "@", s.st_mtim.tv_sec, ".", s.st_mtim.tv_nsec, "#", s.st_ino);
  };
  std::string out = stamp(st);
  if (S_ISDIR(st.st_mode)) {
    for (const std::string& name : PubFilesIn(path)) {
      struct stat f;
      // stat follows the ..data symlinks of a mounted Kubernetes Secret.
      if (::stat(absl::StrCat(path, "/", name).c_str(), &f) == 0) {
        absl::StrAppend(&out, ";", name, "=", stamp(f));
      }
    }
  }
  return out;
}

absl::Status ApplyCurveClient(void* zmq_socket, const CurveClient& client) {
  if (!client.enabled()) return absl::OkStatus();
  if (!IsCurveKey(client.server_public_key)) {
    return absl::InvalidArgumentError("server_key: not a Z85 CURVE public key");
  }
  if (!IsCurveKey(client.own.public_key) || !IsCurveKey(client.own.secret_key)) {
    return absl::InvalidArgumentError("key: not a Z85 CURVE key pair");
  }
  for (auto [option, value] : {std::pair{ZMQ_CURVE_SERVERKEY, &client.server_public_key},
                               std::pair{ZMQ_CURVE_PUBLICKEY, &client.own.public_key},
                               std::pair{ZMQ_CURVE_SECRETKEY, &client.own.secret_key}}) {
    if (zmq_setsockopt(zmq_socket, option, value->c_str(), kZ85KeyLength + 1) != 0) {
      return absl::InternalError(absl::StrCat("CURVE socket option: ", zmq_strerror(errno)));
    }
  }
  return absl::OkStatus();
}

absl::Status ApplyCurveServer(void* zmq_socket, const std::string& secret_key,
                              const std::string& zap_domain) {
  if (!IsCurveKey(secret_key)) return absl::InvalidArgumentError("key: not a Z85 CURVE key");
  const int one = 1;
  if (zmq_setsockopt(zmq_socket, ZMQ_CURVE_SERVER, &one, sizeof(one)) != 0 ||
      zmq_setsockopt(zmq_socket, ZMQ_CURVE_SECRETKEY, secret_key.c_str(), kZ85KeyLength + 1) !=
          0 ||
      zmq_setsockopt(zmq_socket, ZMQ_ZAP_DOMAIN, zap_domain.data(), zap_domain.size()) != 0) {
    return absl::InternalError(absl::StrCat("CURVE server socket option: ", zmq_strerror(errno)));
  }
  return absl::OkStatus();
}

absl::StatusOr<CurveClient> LoadCurveClient(const std::string& own_key_path,
                                            const std::string& server_key_path,
                                            absl::string_view own_flag,
                                            absl::string_view server_flag) {
  CurveClient client;
  if (own_key_path.empty() && server_key_path.empty()) return client;
  if (own_key_path.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(own_flag, ": required with ", server_flag, " (this peer's NAME.key)"));
  }
  if (server_key_path.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        server_flag, ": required with ", own_flag, " (the coordinator's .pub file)"));
  }
  auto own = ReadCurveKeyPair(own_key_path);
  if (!own.ok()) return own.status();
  auto server = ReadCurvePublicKey(server_key_path);
  if (!server.ok()) return server.status();
  client.own = *own;
  client.server_public_key = *server;
  return client;
}

}  // namespace kiln
