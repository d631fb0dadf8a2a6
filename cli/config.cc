#include "cli/config.h"

#include <arpa/inet.h>

#include <algorithm>
#include <fstream>
#include <sstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "cli/ledger_client.h"
#include "cli/metrics.h"
#include "cli/proxy.h"
#include "google/protobuf/io/tokenizer.h"
#include "google/protobuf/text_format.h"
#include "replicator/replicator.h"
#include "switchover/health.h"
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

// Parses `path` into `msg`; Bad() then names the line a field was set on.
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

  // "FILE:LINE: FIELD: WHAT". `field` is a path such as "switchover.path[2].local" (index from
  // 0); the line is where the parser met it, or where its closest enclosing message began (none
  // when the field is absent from the file).
  absl::Status Bad(absl::string_view field, absl::string_view what) const {
    int line = -1;
    const google::protobuf::Descriptor* type = msg_->GetDescriptor();
    const TextFormat::ParseInfoTree* tree = &tree_;
    for (absl::string_view part : absl::StrSplit(field, '.')) {
      int index = -1;
      if (size_t open = part.find('['); open != absl::string_view::npos) {
        if (!absl::SimpleAtoi(part.substr(open + 1, part.size() - open - 2), &index)) break;
        part = part.substr(0, open);
      }
      const auto* fd = type ? type->FindFieldByName(std::string(part)) : nullptr;
      // A repeated field has a line per element only (protobuf aborts when asked for the field's).
      if (fd == nullptr || tree == nullptr || (fd->is_repeated() && index < 0)) break;
      auto loc = tree->GetLocation(fd, index);
      if (loc.line < 0) break;
      line = loc.line;
      type = fd->message_type();
      tree = type ? tree->GetTreeForNested(fd, index) : nullptr;
    }
    std::string at = line >= 0 ? absl::StrCat(line + 1, ":") : "";
    return absl::InvalidArgumentError(absl::StrCat(path_, ":", at, " ", field, ": ", what));
  }

  // `value` must be within [`min`, `max`]; `unit` follows the numbers in the error.
  template <typename T>
  absl::Status Range(absl::string_view field, T value, uint64_t min, uint64_t max,
                     absl::string_view unit = "") const {
    if (value >= min && value <= max) return absl::OkStatus();
    return Bad(field, absl::StrCat(value, " is out of range: ", min, " to ", max,
                                   unit.empty() ? "" : " ", unit));
  }

 private:
  std::string path_;
  Message* msg_ = nullptr;
  TextFormat::ParseInfoTree tree_;
};

// Bounds an operator would expect, and far enough inside the types that the arithmetic done on
// them (MiB to bytes, milliseconds to a poll timeout) cannot wrap.
constexpr uint64_t kMaxDiskMib = 4ull << 20;          // 4 TiB
constexpr uint64_t kMaxInFlightMib = 64ull << 10;     // 64 GiB of staged checkpoints
constexpr uint64_t kMaxWriteRate = 10'000'000;        // page writes per second (40 GB/s)
constexpr uint64_t kMaxHeartbeatIntervalMs = 10'000;  // below the 60 s timeout bound
constexpr uint64_t kMaxFenceTimeoutMs = 3'600'000;    // an hour
constexpr size_t kMaxPathBytes = 4096;                // PATH_MAX
constexpr uint64_t kMaxHealthIntervalMs = 3'600'000;  // an hour
constexpr int kMaxInterfaces = 16;
constexpr int kMaxHealthRules = 32;
constexpr uint64_t kMaxRuleCount = 1'000'000'000'000;
constexpr uint64_t kMaxWindowS = 7 * 86'400;  // a week
// A counter rule remembers the checks within its window that saw new events: bounded.
constexpr uint64_t kMaxChecksPerWindow = 100'000;

// An IPv4 or IPv6 address literal (no name: nothing to resolve, nothing to go wrong later).
bool IsAddress(const std::string& text) {
  in6_addr a;
  return ::inet_pton(AF_INET, text.c_str(), &a) == 1 ||
         ::inet_pton(AF_INET6, text.c_str(), &a) == 1;
}

// "HOST:PORT" with a port of 1 to 65535 and a host that is not empty.
absl::Status CheckHostPort(const Parsed& p, absl::string_view field, const std::string& value) {
  std::string host;
  uint16_t port = 0;
  if (!ParseHostPort(value, &host, &port).ok() || host.empty()) {
    return p.Bad(field, absl::StrCat("'", value, "' is not HOST:PORT (a port of 1 to 65535)"));
  }
  return absl::OkStatus();
}

// A replication peer's HOST:PORT, whose host is an address (or localhost). A name is refused
// here rather than resolved: replication connects to addresses only, so a name loaded fine and
// then every connection failed at run time.
absl::Status CheckPeerHostPort(const Parsed& p, absl::string_view field, const std::string& value) {
  if (auto s = CheckHostPort(p, field, value); !s.ok()) return s;
  std::string host;
  uint16_t port = 0;
  (void)ParseHostPort(value, &host, &port);
  std::string bare = host;
  if (bare.size() > 2 && bare.front() == '[' && bare.back() == ']') {
    bare = bare.substr(1, bare.size() - 2);
  }
  if (host != "localhost" && !IsAddress(bare)) {
    return p.Bad(field, absl::StrCat("'", host.substr(0, 256),
                                     "' is a name, not an address: give the host's IPv4 or IPv6 "
                                     "address (names are not resolved)"));
  }
  return absl::OkStatus();
}

// A port: 1 to 65535, or 0 where the caller gave 0 its meaning (a default, or "none").
// Parallel paths: further HOST:PORTs (or addresses, without `host_port`), beside `first`; at
// most kMaxPaths in all, none twice.
absl::Status CheckPaths(const Parsed& p, absl::string_view field,
                        const google::protobuf::RepeatedPtrField<std::string>& paths,
                        const std::string& first, bool host_port) {
  std::vector<std::string> seen = {first};
  for (int i = 0; i < paths.size(); i++) {
    const std::string& path = paths[i];
    std::string at = absl::StrCat(field, "[", i, "]");  // names the element's line
    if (static_cast<uint32_t>(i) + 1 >= replicator::kMaxPaths) {
      return p.Bad(at, absl::StrCat("at most ", replicator::kMaxPaths - 1, " further paths (",
                                    replicator::kMaxPaths, " in all)"));
    }
    if (host_port) {
      if (auto s = CheckPeerHostPort(p, at, path); !s.ok()) return s;
    } else if (!IsAddress(path)) {
      return p.Bad(at, absl::StrCat("'", path, "' is not an IPv4 or IPv6 address"));
    }
    if (std::find(seen.begin(), seen.end(), path) != seen.end()) {
      return p.Bad(at, absl::StrCat("'", path, "' is named twice: each path is one address"));
    }
    seen.push_back(path);
  }
  return absl::OkStatus();
}

absl::Status CheckPort(const Parsed& p, absl::string_view field, uint32_t value) {
  return value == 0 ? absl::OkStatus() : p.Range(field, value, 1, 65535);
}

// The fields both roles share: which VM, and how much memory and disk it has.
template <typename Config>
absl::Status CheckVm(const Parsed& p, Config& c) {
  if (c.vm_id().empty()) return p.Bad("vm_id", "is required (both hosts must name the same VM)");
  if (c.memory_mib() == 0) c.set_memory_mib(256);
  if (c.memory_mib() < 16 || c.memory_mib() > 4096 || c.memory_mib() % 2) {
    return p.Bad("memory_mib", "must be an even number from 16 to 4096");
  }
  if (c.disk_mib() == 0) c.set_disk_mib(64);
  if (auto s = p.Range("disk_mib", c.disk_mib(), 1, kMaxDiskMib, "MiB (4 TiB)"); !s.ok()) return s;
  if (auto platform = vmm::ParsePlatform(c.platform()); !platform.ok()) {
    return p.Bad("platform", "must be kvm or process (or unset: kvm where /dev/kvm works)");
  }
  if (c.epoch_ms() == 0) c.set_epoch_ms(25);
  if (auto s = p.Range("epoch_ms", c.epoch_ms(), 5, 1000); !s.ok()) return s;
  if (c.ledger_listen().empty()) c.set_ledger_listen("127.0.0.1");
  if (c.ledger_port() == 0) c.set_ledger_port(7070);
  if (auto s = CheckPort(p, "ledger_port", c.ledger_port()); !s.ok()) return s;
  if (c.compression().empty()) c.set_compression("lz4");
  if (auto comp = replicator::ParseCompression(c.compression()); !comp.ok()) {
    return p.Bad("compression", "must be none or lz4");
  }
  if (!c.metrics_listen().empty()) {
    if (auto s = CheckMetricsListen(c.metrics_listen()); !s.ok()) {
      return p.Bad("metrics_listen", s.message());
    }
  }
  return absl::OkStatus();
}

// Heartbeat paths, the witness and the fence; defaults filled in. Absent: no switchover.
absl::Status CheckSwitchover(const Parsed& p, pb::SwitchoverConfig* s) {
  if (s->ByteSizeLong() == 0) return absl::OkStatus();
  if (s->node().empty() || s->node().size() > 64) {
    return p.Bad("switchover.node", "this host's name, 1 to 64 bytes, is required");
  }
  for (int i = 0; i < s->path_size(); i++) {
    const pb::HeartbeatPath& path = s->path(i);
    for (auto [end, value] : {std::pair{"local", &path.local()}, {"remote", &path.remote()}}) {
      if (auto ep = switchover::ParseEndpoint(*value); !ep.ok()) {
        return p.Bad(absl::StrCat("switchover.path[", i, "].", end), ep.status().message());
      }
    }
  }
  if (s->heartbeat_interval_ms() == 0) s->set_heartbeat_interval_ms(10);
  if (auto r = p.Range("switchover.heartbeat_interval_ms", s->heartbeat_interval_ms(), 1,
                       kMaxHeartbeatIntervalMs);
      !r.ok()) {
    return r;
  }
  if (s->heartbeat_timeout_ms() == 0) s->set_heartbeat_timeout_ms(50);
  if (s->heartbeat_timeout_ms() <= s->heartbeat_interval_ms() ||
      s->heartbeat_timeout_ms() > 60000) {
    return p.Bad("switchover.heartbeat_timeout_ms",
                 "must exceed heartbeat_interval_ms and be at most 60000");
  }
  if (s->heartbeat_timeout_max_ms() == 0) {
    s->set_heartbeat_timeout_max_ms(std::min<uint32_t>(4 * s->heartbeat_timeout_ms(), 60000));
  }
  if (auto r = p.Range("switchover.heartbeat_timeout_max_ms", s->heartbeat_timeout_max_ms(),
                       s->heartbeat_timeout_ms(), 60000);
      !r.ok()) {
    return r;
  }
  if (!s->witness().empty()) {
    if (auto ep = switchover::ParseEndpoint(s->witness()); !ep.ok()) {
      return p.Bad("switchover.witness", ep.status().message());
    }
  }
  if (s->lease_renew_ms() == 0) s->set_lease_renew_ms(30);
  if (auto r = p.Range("switchover.lease_renew_ms", s->lease_renew_ms(), 5, 10000); !r.ok()) {
    return r;
  }
  if (s->unprotected_command().size() > kMaxCommandBytes) {
    return p.Bad("switchover.unprotected_command",
                 absl::StrCat("is longer than ", kMaxCommandBytes, " bytes"));
  }
  if (s->fence_command().size() > kMaxCommandBytes) {
    return p.Bad("switchover.fence_command",
                 absl::StrCat("is longer than ", kMaxCommandBytes, " bytes"));
  }
  if (s->fence_timeout_ms() == 0) s->set_fence_timeout_ms(kDefaultFenceTimeoutMs);
  if (auto r = p.Range("switchover.fence_timeout_ms", s->fence_timeout_ms(), 1, kMaxFenceTimeoutMs,
                       "ms (an hour)");
      !r.ok()) {
    return r;
  }
  return absl::OkStatus();
}

// The hardware health monitor and its policy (a health block, even an empty one); defaults
// filled in.
absl::Status CheckHealth(const Parsed& p, pb::HealthConfig* h) {
  if (h->sysfs_root().empty()) h->set_sysfs_root("/sys");
  if (h->sysfs_root().size() > kMaxPathBytes || h->sysfs_root().front() != '/') {
    return p.Bad("health.sysfs_root", "must be an absolute path of at most 4096 bytes");
  }
  if (h->interval_ms() == 0) h->set_interval_ms(1000);
  if (auto r =
          p.Range("health.interval_ms", h->interval_ms(), 10, kMaxHealthIntervalMs, "ms (an hour)");
      !r.ok()) {
    return r;
  }
  if (h->interface_size() > kMaxInterfaces) {
    return p.Bad("health.interface", absl::StrCat("at most ", kMaxInterfaces, " interfaces"));
  }
  for (int i = 0; i < h->interface_size(); i++) {
    const std::string& name = h->interface(i);
    // A kernel interface name: 1 to 15 bytes, no '/' or space, not "." or "..".
    bool ok = !name.empty() && name.size() <= 15 && name != "." && name != "..";
    for (char c : name) ok = ok && c > ' ' && c < 0x7f && c != '/';
    if (!ok) {
      return p.Bad(absl::StrCat("health.interface[", i, "]"),
                   "must be a network interface name (1 to 15 printable bytes, no '/')");
    }
  }
  for (auto [field, value] : {std::pair{"health.smart_device", &h->smart_device()},
                              {"health.smartctl", &h->smartctl()}}) {
    if (value->size() > kMaxPathBytes)
      return p.Bad(field, absl::StrCat("is longer than ", kMaxPathBytes, " bytes"));
  }
  if (h->command().size() > kMaxCommandBytes) {
    return p.Bad("health.command", absl::StrCat("is longer than ", kMaxCommandBytes, " bytes"));
  }
  if (h->command_timeout_ms() == 0) h->set_command_timeout_ms(5000);
  if (auto r = p.Range("health.command_timeout_ms", h->command_timeout_ms(), 1, kMaxFenceTimeoutMs,
                       "ms (an hour)");
      !r.ok()) {
    return r;
  }
  if (h->retry_ms() == 0) h->set_retry_ms(5000);
  if (auto r = p.Range("health.retry_ms", h->retry_ms(), 10, kMaxHealthIntervalMs, "ms (an hour)");
      !r.ok()) {
    return r;
  }
  if (h->migrate_timeout_ms() == 0) h->set_migrate_timeout_ms(10000);
  if (auto r = p.Range("health.migrate_timeout_ms", h->migrate_timeout_ms(), 100, 600000, "ms");
      !r.ok()) {
    return r;
  }
  if (h->rule_size() > kMaxHealthRules) {
    return p.Bad("health.rule", absl::StrCat("at most ", kMaxHealthRules, " rules"));
  }
  for (int i = 0; i < h->rule_size(); i++) {
    pb::HealthRule* r = h->mutable_rule(i);
    std::string at = absl::StrCat("health.rule[", i, "]");
    auto signal = switchover::ParseHealthSignal(r->signal());
    if (!signal.ok()) return p.Bad(at + ".signal", signal.status().message());
    if (r->count() == 0) r->set_count(1);
    if (auto s = p.Range(at + ".count", r->count(), 1, kMaxRuleCount); !s.ok()) return s;
    if (auto s = p.Range(at + ".window_s", r->window_s(), 0, kMaxWindowS, "s (a week)"); !s.ok()) {
      return s;
    }
    if (r->window_s() != 0 && !switchover::IsCounter(*signal)) {
      return p.Bad(at + ".window_s", "applies to counters only (a state counts checks in a row)");
    }
    if (uint64_t{r->window_s()} * 1000 / h->interval_ms() > kMaxChecksPerWindow) {
      return p.Bad(at + ".window_s", absl::StrCat("spans more than ", kMaxChecksPerWindow,
                                                  " checks at health.interval_ms"));
    }
    using S = switchover::HealthSignal;
    bool net =
        *signal == S::kLinkErrors || *signal == S::kCarrierChanges || *signal == S::kLinkDown;
    if (net && h->interface_size() == 0) {
      return p.Bad(at + ".signal", "watches network interfaces, but health.interface names none");
    }
    if (*signal == S::kDiskFailing && h->smart_device().empty()) {
      return p.Bad(at + ".signal", "watches a disk, but health.smart_device is not set");
    }
    if (*signal == S::kCommandFailing && h->command().empty()) {
      return p.Bad(at + ".signal", "watches a command, but health.command is not set");
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<pb::PrimaryConfig> LoadPrimaryConfig(const std::string& path) {
  pb::PrimaryConfig c;
  Parsed p;
  if (auto s = p.Load(path, &c); !s.ok()) return s;
  if (auto s = CheckVm(p, c); !s.ok()) return s;
  if (c.disk().empty()) return p.Bad("disk", "is required");
  if (c.mirror().empty()) return p.Bad("mirror", "is required (HOST:PORT)");
  if (auto s = CheckPeerHostPort(p, "mirror", c.mirror()); !s.ok()) return s;
  if (auto s = CheckPaths(p, "mirror_path", c.mirror_path(), c.mirror(), true); !s.ok()) return s;
  if (c.psk_file().empty()) return p.Bad("psk_file", "is required");
  if (c.max_in_flight_mib() == 0) c.set_max_in_flight_mib(256);
  if (auto s = p.Range("max_in_flight_mib", c.max_in_flight_mib(), 1, kMaxInFlightMib, "MiB");
      !s.ok()) {
    return s;
  }
  if (!replicator::ParseEncryption(c.encryption()).ok()) {
    return p.Bad("encryption", "must be auto, aes-256-gcm, chacha20-poly1305 or off");
  }
  const pb::WorkloadConfig& w = c.workload();
  vmm::VmConfig vm;
  vm.memory_bytes = c.memory_mib() << 20;
  vm.workload.working_set_pages = w.working_set_pages();
  if (auto s = vmm::ValidateVmConfig(vm); !s.ok()) {
    return p.Bad("workload.working_set_pages", s.message());
  }
  if (auto s = p.Range("workload.write_rate", w.write_rate(), 0, kMaxWriteRate, "pages/s");
      !s.ok()) {
    return s;
  }
  const std::string& pat = w.pattern();
  if (!pat.empty() && pat != "sequential" && pat != "uniform" && pat != "hotcold") {
    return p.Bad("workload.pattern", "must be sequential, uniform or hotcold");
  }
  if (auto s = CheckPort(p, "replication_port", c.replication_port()); !s.ok()) return s;
  if (c.replication_port() != 0 && c.replication_listen().empty()) {
    c.set_replication_listen("127.0.0.1");
  }
  if (auto s = CheckPaths(p, "replication_listen_path", c.replication_listen_path(),
                          c.replication_listen(), false);
      !s.ok()) {
    return s;
  }
  if (auto s = CheckSwitchover(p, c.mutable_switchover()); !s.ok()) return s;
  if (c.has_health()) {
    if (auto s = CheckHealth(p, c.mutable_health()); !s.ok()) return s;
  }
  if (auto s = p.Range("migration.precopy_rounds", c.migration().precopy_rounds(), 0,
                       replicator::PostcopyMigration::kMaxPrecopyRounds);
      !s.ok()) {
    return s;
  }
  return c;
}

absl::StatusOr<pb::MirrorConfig> LoadMirrorConfig(const std::string& path) {
  pb::MirrorConfig c;
  Parsed p;
  if (auto s = p.Load(path, &c); !s.ok()) return s;
  if (auto s = CheckVm(p, c); !s.ok()) return s;
  if (c.listen().empty()) c.set_listen("127.0.0.1");
  if (c.port() == 0) return p.Bad("port", "is required (1 to 65535: the primary must know it)");
  if (auto s = CheckPort(p, "port", c.port()); !s.ok()) return s;
  if (c.psk_file().empty()) return p.Bad("psk_file", "is required");
  if (c.replica_disk().empty()) return p.Bad("replica_disk", "is required");
  if (!c.replicate_to().empty()) {
    if (auto s = CheckPeerHostPort(p, "replicate_to", c.replicate_to()); !s.ok()) return s;
  }
  if (!c.replicate_to_path().empty() && c.replicate_to().empty()) {
    return p.Bad("replicate_to_path[0]", "needs replicate_to (the first path)");
  }
  if (auto s = CheckPaths(p, "replicate_to_path", c.replicate_to_path(), c.replicate_to(), true);
      !s.ok()) {
    return s;
  }
  if (auto s = CheckPaths(p, "listen_path", c.listen_path(), c.listen(), false); !s.ok()) return s;
  if (!replicator::ParseEncryption(c.encryption()).ok()) {
    return p.Bad("encryption", "must be auto, aes-256-gcm, chacha20-poly1305 or off");
  }
  if (auto s = CheckSwitchover(p, c.mutable_switchover()); !s.ok()) return s;
  if (c.has_health()) {
    if (auto s = CheckHealth(p, c.mutable_health()); !s.ok()) return s;
  }
  if (auto s = p.Range("migration.precopy_rounds", c.migration().precopy_rounds(), 0,
                       replicator::PostcopyMigration::kMaxPrecopyRounds);
      !s.ok()) {
    return s;
  }
  return c;
}

absl::StatusOr<pb::ProxyConfig> LoadProxyConfig(const std::string& path) {
  pb::ProxyConfig c;
  Parsed p;
  if (auto s = p.Load(path, &c); !s.ok()) return s;
  if (c.listen().empty()) c.set_listen("127.0.0.1");
  if (!IsAddress(c.listen())) {
    return p.Bad("listen", absl::StrCat("'", c.listen(), "' is not an IPv4 or IPv6 address"));
  }
  if (c.port() == 0) return p.Bad("port", "is required (1 to 65535: the clients' port)");
  if (auto s = CheckPort(p, "port", c.port()); !s.ok()) return s;
  if (c.host_size() < 1 || c.host_size() > kMaxProxyHosts) {
    return p.Bad(
        c.host_size() ? absl::StrCat("host[", kMaxProxyHosts, "]") : "host",
        absl::StrCat("1 to ", kMaxProxyHosts, " are required (each host's ledger HOST:PORT)"));
  }
  for (int i = 0; i < c.host_size(); i++) {
    std::string field = absl::StrCat("host[", i, "]");
    if (auto s = CheckHostPort(p, field, c.host(i)); !s.ok()) return s;
    std::string address;
    uint16_t port = 0;
    if (auto s = ParseLedgerAddress(c.host(i), &address, &port); !s.ok()) {
      return p.Bad(field, s.message());
    }
    for (int j = 0; j < i; j++) {
      if (c.host(j) == c.host(i)) return p.Bad(field, absl::StrCat("'", c.host(i), "' twice"));
    }
  }
  if (c.hold_ms() == 0) c.set_hold_ms(10000);
  if (auto s = p.Range("hold_ms", c.hold_ms(), 1, 600000, "ms"); !s.ok()) return s;
  if (c.answer_timeout_ms() == 0) c.set_answer_timeout_ms(2000);
  if (auto s = p.Range("answer_timeout_ms", c.answer_timeout_ms(), 1, 600000, "ms"); !s.ok()) {
    return s;
  }
  if (c.probe_interval_ms() == 0) c.set_probe_interval_ms(5);
  if (auto s = p.Range("probe_interval_ms", c.probe_interval_ms(), 1, 10000, "ms"); !s.ok()) {
    return s;
  }
  if (c.max_clients() == 0) c.set_max_clients(1024);
  if (auto s = p.Range("max_clients", c.max_clients(), 1, 65536); !s.ok()) return s;
  return c;
}

}  // namespace romulus::cli
