#include "cli/config.h"

#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "google/protobuf/io/tokenizer.h"
#include "google/protobuf/text_format.h"
#include "replicator/replicator.h"
#include "switchover/switchover.h"
#include "vmm/vmm.h"

namespace romulus::cli {
namespace {

using google::protobuf::Message;
using google::protobuf::TextFormat;

class FirstError : public google::protobuf::io::ErrorCollector {
 public:
  void AddError(int line, int column, const std::string& message) override {
    if (error.empty()) error = absl::StrCat(line + 1, ":", column + 1, ": ", message);
  }
  std::string error;
};

// Parses `path` into `msg`; `where(field)` then names the line a field was set on.
class Parsed {
 public:
  absl::Status Load(const std::string& path, Message* msg) {
    path_ = path;
    std::ifstream in(path);
    if (!in) return absl::NotFoundError(absl::StrCat("cannot read config file ", path));
    std::stringstream text;
    text << in.rdbuf();
    if (text.str().size() > (1 << 20))
      return absl::InvalidArgumentError(absl::StrCat(path, ": larger than 1 MiB"));
    TextFormat::Parser parser;
    FirstError errors;
    parser.RecordErrorsTo(&errors);
    parser.WriteLocationsTo(&tree_);
    if (!parser.ParseFromString(text.str(), msg)) {
      return absl::InvalidArgumentError(absl::StrCat(path, ":", errors.error));
    }
    msg_ = msg;
    return absl::OkStatus();
  }
  absl::Status Bad(const std::string& field, const std::string& what) {
    const auto* fd = msg_->GetDescriptor()->FindFieldByName(field);
    auto loc = fd ? tree_.GetLocation(fd, -1) : TextFormat::ParseLocation();
    std::string line = loc.line >= 0 ? absl::StrCat(loc.line + 1, ":") : "";
    return absl::InvalidArgumentError(absl::StrCat(path_, ":", line, " ", field, ": ", what));
  }

 private:
  std::string path_;
  Message* msg_ = nullptr;
  TextFormat::ParseInfoTree tree_;
};

bool ValidHostPort(const std::string& s) {
  auto colon = s.rfind(':');
  if (colon == std::string::npos || colon == 0) return false;
  int port = std::atoi(s.c_str() + colon + 1);
  return port > 0 && port < 65536;
}

// The fields both roles share: which VM, and how much memory and disk it has.
template <typename Config>
absl::Status CheckVm(Parsed& p, Config& c) {
  if (c.vm_id().empty()) return p.Bad("vm_id", "is required (both hosts must name the same VM)");
  if (c.memory_mib() == 0) c.set_memory_mib(256);
  if (c.memory_mib() < 16 || c.memory_mib() > 4096 || c.memory_mib() % 2) {
    return p.Bad("memory_mib", "must be an even number from 16 to 4096");
  }
  if (c.disk_mib() == 0) c.set_disk_mib(64);
  if (auto platform = vmm::ParsePlatform(c.platform()); !platform.ok()) {
    return p.Bad("platform", "must be kvm or process (or unset: kvm where /dev/kvm works)");
  }
  return absl::OkStatus();
}

// Heartbeat paths, the witness and the fence; defaults filled in. Absent: no switchover.
absl::Status CheckSwitchover(Parsed& p, pb::SwitchoverConfig* s) {
  if (s->ByteSizeLong() == 0) return absl::OkStatus();
  auto bad = [&](const std::string& what) { return p.Bad("switchover", what); };
  if (s->node().empty() || s->node().size() > 64) {
    return bad("node (this host's name, 1 to 64 bytes) is required");
  }
  for (int i = 0; i < s->path_size(); i++) {
    for (const std::string* e : {&s->path(i).local(), &s->path(i).remote()}) {
      if (auto ep = switchover::ParseEndpoint(*e); !ep.ok()) {
        return bad(absl::StrCat("path ", i + 1, ": ", ep.status().message()));
      }
    }
  }
  if (s->heartbeat_interval_ms() == 0) s->set_heartbeat_interval_ms(10);
  if (s->heartbeat_timeout_ms() == 0) s->set_heartbeat_timeout_ms(50);
  if (s->heartbeat_timeout_ms() <= s->heartbeat_interval_ms() ||
      s->heartbeat_timeout_ms() > 60000) {
    return bad("heartbeat_timeout_ms must exceed heartbeat_interval_ms and be at most 60000");
  }
  if (!s->witness().empty()) {
    if (auto ep = switchover::ParseEndpoint(s->witness()); !ep.ok()) {
      return bad(absl::StrCat("witness: ", ep.status().message()));
    }
  }
  if (s->lease_renew_ms() == 0) s->set_lease_renew_ms(30);
  if (s->lease_renew_ms() < 5 || s->lease_renew_ms() > 10000) {
    return bad("lease_renew_ms must be 5 to 10000");
  }
  if (s->fence_timeout_ms() == 0) s->set_fence_timeout_ms(5000);
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<pb::PrimaryConfig> LoadPrimaryConfig(const std::string& path) {
  pb::PrimaryConfig c;
  Parsed p;
  if (auto s = p.Load(path, &c); !s.ok()) return s;
  if (auto s = CheckVm(p, c); !s.ok()) return s;
  if (c.disk().empty()) return p.Bad("disk", "is required");
  if (c.mirror().empty() || !ValidHostPort(c.mirror())) return p.Bad("mirror", "must be HOST:PORT");
  if (c.psk_file().empty()) return p.Bad("psk_file", "is required");
  if (c.epoch_ms() == 0) c.set_epoch_ms(25);
  if (c.epoch_ms() < 5 || c.epoch_ms() > 1000) return p.Bad("epoch_ms", "must be 5 to 1000");
  if (c.max_in_flight_mib() == 0) c.set_max_in_flight_mib(256);
  if (c.ledger_listen().empty()) c.set_ledger_listen("127.0.0.1");
  if (c.ledger_port() == 0) c.set_ledger_port(7070);
  if (c.ledger_port() > 65535) return p.Bad("ledger_port", "must be at most 65535");
  if (c.compression().empty()) c.set_compression("lz4");
  if (auto comp = replicator::ParseCompression(c.compression()); !comp.ok()) {
    return p.Bad("compression", "must be none or lz4");
  }
  if (!replicator::ParseEncryption(c.encryption()).ok()) {
    return p.Bad("encryption", "must be auto, aes-256-gcm, chacha20-poly1305 or off");
  }
  const std::string& pat = c.workload().pattern();
  if (!pat.empty() && pat != "sequential" && pat != "uniform" && pat != "hotcold") {
    return p.Bad("workload", "pattern must be sequential, uniform or hotcold");
  }
  if (c.replication_port() > 65535) return p.Bad("replication_port", "must be at most 65535");
  if (c.replication_port() != 0 && c.replication_listen().empty()) {
    c.set_replication_listen("127.0.0.1");
  }
  if (auto s = CheckSwitchover(p, c.mutable_switchover()); !s.ok()) return s;
  return c;
}

absl::StatusOr<pb::MirrorConfig> LoadMirrorConfig(const std::string& path) {
  pb::MirrorConfig c;
  Parsed p;
  if (auto s = p.Load(path, &c); !s.ok()) return s;
  if (auto s = CheckVm(p, c); !s.ok()) return s;
  if (c.listen().empty()) c.set_listen("127.0.0.1");
  if (c.port() == 0 || c.port() > 65535) return p.Bad("port", "must be 1 to 65535");
  if (c.psk_file().empty()) return p.Bad("psk_file", "is required");
  if (c.replica_disk().empty()) return p.Bad("replica_disk", "is required");
  if (c.ledger_listen().empty()) c.set_ledger_listen("127.0.0.1");
  if (c.ledger_port() == 0) c.set_ledger_port(7070);
  if (c.ledger_port() > 65535) return p.Bad("ledger_port", "must be at most 65535");
  if (!c.replicate_to().empty() && !ValidHostPort(c.replicate_to())) {
    return p.Bad("replicate_to", "must be HOST:PORT");
  }
  if (c.epoch_ms() == 0) c.set_epoch_ms(25);
  if (c.epoch_ms() < 5 || c.epoch_ms() > 1000) return p.Bad("epoch_ms", "must be 5 to 1000");
  if (c.compression().empty()) c.set_compression("lz4");
  if (auto comp = replicator::ParseCompression(c.compression()); !comp.ok()) {
    return p.Bad("compression", "must be none or lz4");
  }
  if (!replicator::ParseEncryption(c.encryption()).ok()) {
    return p.Bad("encryption", "must be auto, aes-256-gcm, chacha20-poly1305 or off");
  }
  if (auto s = CheckSwitchover(p, c.mutable_switchover()); !s.ok()) return s;
  return c;
}

}  // namespace romulus::cli
