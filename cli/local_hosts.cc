#include "cli/local_hosts.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <deque>
#include <mutex>
#include <random>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "google/protobuf/text_format.h"
#include "proto/romulus.pb.h"

namespace romulus::cli {
namespace {

const char kVmId[] = "demo";

// What went wrong with a host, and the last thing it said (its own reason, when it gave up).
absl::Status HostError(LocalHosts::Host h, const Process& p, const absl::Status& s) {
  std::string out = p.output();
  while (!out.empty() && out.back() == '\n') out.pop_back();
  std::string last = out.substr(out.rfind('\n') == std::string::npos ? 0 : out.rfind('\n') + 1);
  return absl::Status(s.code(), absl::StrCat("host ", LocalHosts::Name(h), ": ", s.message(),
                                             last.empty() ? "" : "; it said last: ", last));
}

std::string At(const char* address, uint16_t port) { return absl::StrCat(address, ":", port); }

// Readable by this user only (the key is among these files).
absl::Status WriteFile(const std::string& path, const std::string& text) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  bool ok = fd >= 0 && ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size());
  int e = errno;
  if (fd >= 0) ::close(fd);
  if (!ok) return absl::InternalError(absl::StrCat("cannot write ", path, ": ", std::strerror(e)));
  return absl::OkStatus();
}

std::string Text(const google::protobuf::Message& m) {
  std::string out;
  google::protobuf::TextFormat::PrintToString(m, &out);
  return out;
}

// Whether `port` on `address` can be bound now (0: any port; the one bound is then in *port).
bool CanBind(int type, const char* address, uint16_t* port, int* error) {
  int fd = ::socket(AF_INET, type | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    *error = errno;
    return false;
  }
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(*port);
  socklen_t len = sizeof(a);
  bool ok = ::inet_pton(AF_INET, address, &a.sin_addr) == 1 &&
            ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0 &&
            ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0;
  *error = errno;
  ::close(fd);
  if (ok) *port = ntohs(a.sin_port);
  return ok;
}

}  // namespace

namespace {

// Claims `port` among the processes of this machine that pick ports here (tests running side by
// side, demos, the nemesis): a lock on a file named after it, held until this process exits or
// has claimed kMaxClaims more. Two of them could otherwise both find a port free and both hand
// it to a daemon, and one daemon fails to bind (or, worse, the other's peer connects to it).
bool Claim(uint16_t port) {
  constexpr size_t kMaxClaims = 512;  // the oldest are long bound by their daemons, or gone
  static std::mutex mu;
  static std::deque<int> claims;
  static const std::string dir = [] {
    std::string d = "/tmp/romulus-ports";
    ::mkdir(d.c_str(), 01777);
    ::chmod(d.c_str(), 01777);  // whoever runs the tests, whatever the umask
    return d;
  }();
  int fd = ::open(absl::StrCat(dir, "/", port).c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0666);
  if (fd < 0) return true;  // no claims possible here: as before them
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    ::close(fd);
    return false;
  }
  std::lock_guard<std::mutex> lock(mu);
  claims.push_back(fd);
  if (claims.size() > kMaxClaims) {
    ::close(claims.front());
    claims.pop_front();
  }
  return true;
}

}  // namespace

// Below the kernel's ephemeral range: a port from that range (what binding port 0 gives) is also
// what the kernel hands every outgoing connection, so on a busy machine some client could take
// it before the daemon that was meant to binds it. Claimed (above) before it is returned.
absl::StatusOr<uint16_t> FreePort(int type, const char* address) {
  constexpr uint16_t kLowest = 10000;
  unsigned ephemeral_low = 32768, ephemeral_high = 60999;
  if (FILE* f = std::fopen("/proc/sys/net/ipv4/ip_local_port_range", "r")) {
    if (std::fscanf(f, "%u %u", &ephemeral_low, &ephemeral_high) != 2) ephemeral_low = 32768;
    std::fclose(f);
  }
  int error = 0;
  if (ephemeral_low > kLowest + 1000) {
    std::random_device random;
    for (int i = 0; i < 200; i++) {
      auto port = static_cast<uint16_t>(kLowest + random() % (ephemeral_low - kLowest));
      if (CanBind(type, address, &port, &error) && Claim(port)) return port;
    }
  }
  uint16_t any = 0;  // no room below the ephemeral range, or all tried were taken
  if (CanBind(type, address, &any, &error)) return any;
  return absl::UnavailableError(
      absl::StrCat("no free port on ", address, ": ", std::strerror(error)));
}

LocalHosts::LocalHosts(Options options) : o_(std::move(options)) {}

LocalHosts::~LocalHosts() = default;  // each Process kills its child

std::string LocalHosts::control_socket(Host h) const {
  return File(absl::StrCat(Name(h), ".sock"));
}

absl::StatusOr<std::unique_ptr<Process>> LocalHosts::Run(const std::string& name,
                                                         const std::vector<std::string>& args) {
  Process::LineFn echo = nullptr;
  if (o_.echo) {
    echo = [echo = o_.echo, prefix = absl::StrCat("[", name, "] ")](absl::string_view line) {
      echo(absl::StrCat(prefix, line));
    };
  }
  return Process::Start(o_.binary, args, std::move(echo));
}

absl::StatusOr<std::unique_ptr<LocalHosts>> LocalHosts::Start(Options options) {
  std::unique_ptr<LocalHosts> l(new LocalHosts(std::move(options)));
  for (int h = 0; h < 2; h++) {
    for (auto [port, type, address] : {std::tuple{&l->replication_[h], SOCK_STREAM, "127.0.0.1"},
                                       {&l->ledger_[h], SOCK_STREAM, "127.0.0.1"},
                                       {&l->heartbeat_[h], SOCK_DGRAM, "127.0.0.1"},
                                       {&l->heartbeat2_[h], SOCK_DGRAM, "127.0.0.2"}}) {
      auto p = FreePort(type, address);
      if (!p.ok()) return p.status();
      *port = *p;
    }
  }
  auto w = FreePort(SOCK_DGRAM, "127.0.0.1");
  if (!w.ok()) return w.status();
  l->witness_ = *w;
  if (l->o_.metrics) {
    for (uint16_t* port : {&l->metrics_[kA], &l->metrics_[kB], &l->witness_metrics_}) {
      auto p = FreePort(SOCK_STREAM, "127.0.0.1");
      if (!p.ok()) return p.status();
      *port = *p;
    }
  }
  // A fresh random key: nothing else on this machine can join these hosts.
  std::random_device random;
  std::string key;
  for (int i = 0; i < 4; i++) absl::StrAppendFormat(&key, "%08x", random());
  if (auto s = WriteFile(l->File("key"), key + "\n"); !s.ok()) return s;

  if (auto s = WriteFile(l->File("a.conf"), l->PrimaryConfig(kA)); !s.ok()) return s;
  if (auto s = WriteFile(l->File("b.conf"), l->MirrorConfig(kB)); !s.ok()) return s;
  if (auto s = l->StartWitness(/*first_start=*/true); !s.ok()) return s;
  if (l->o_.proxy_hold.count() > 0) {
    auto p = FreePort(SOCK_STREAM, "127.0.0.1");
    if (!p.ok()) return p.status();
    l->proxy_ = *p;
    pb::ProxyConfig c;
    c.set_port(l->proxy_);
    for (Host h : {kA, kB}) c.add_host(At("127.0.0.1", l->ledger_[h]));
    c.set_hold_ms(static_cast<uint32_t>(l->o_.proxy_hold.count()));
    if (auto s = WriteFile(l->File("proxy.conf"), Text(c)); !s.ok()) return s;
    if (auto s = l->StartProxy(); !s.ok()) return s;
  }
  for (Host h : {kB, kA}) {
    auto p = l->Run(Name(h), {h == kA ? "primary" : "mirror", "--config",
                              l->File(absl::StrCat(Name(h), ".conf"))});
    if (!p.ok()) return p.status();
    l->hosts_[h] = std::move(*p);
    auto line = l->hosts_[h]->WaitForLine(
        h == kA ? "protected: replicating" : "waiting for the primary", l->o_.wait);
    if (!line.ok()) return HostError(h, *l->hosts_[h], line.status());
  }
  return l;
}

// The witness keeps its terms in the cluster's directory; only its first start creates them.
std::vector<std::string> LocalHosts::WitnessArgs(bool first_start) const {
  std::vector<std::string> args = {
      "witness", "--psk-file",         File("key"), "--listen", At("127.0.0.1", witness_),
      "--state", File("witness.state")};
  if (first_start) args.push_back("--init");
  if (o_.metrics) args.insert(args.end(), {"--metrics-listen", At("127.0.0.1", witness_metrics_)});
  return args;
}

absl::Status LocalHosts::StartWitness(bool first_start) {
  auto witness = Run("witness", WitnessArgs(first_start));
  if (!witness.ok()) return witness.status();
  witness_process_ = std::move(*witness);
  return witness_process_->WaitForLine("serving leases", o_.wait).status();
}

absl::Status LocalHosts::StartProxy() {
  auto proxy = Run("proxy", {"proxy", "--config", File("proxy.conf")});
  if (!proxy.ok()) return proxy.status();
  proxy_process_ = std::move(*proxy);
  return proxy_process_->WaitForLine("ledger listening on", o_.wait).status();
}

absl::Status LocalHosts::RestartWitness() {
  if (!witness_process_->Wait(std::chrono::milliseconds(0))) {
    return absl::FailedPreconditionError("the witness still runs");
  }
  return StartWitness(/*first_start=*/false);
}

absl::Status LocalHosts::RestartProxy() {
  if (!proxy_process_) return absl::FailedPreconditionError("there is no proxy");
  if (!proxy_process_->Wait(std::chrono::milliseconds(0))) {
    return absl::FailedPreconditionError("the proxy still runs");
  }
  return StartProxy();
}

std::string LocalHosts::PrimaryConfig(Host h) const {
  Host other = h == kA ? kB : kA;
  pb::PrimaryConfig c;
  c.set_vm_id(kVmId);
  c.set_memory_mib(o_.memory_mib);
  c.set_disk(disk(h));
  c.set_disk_mib(o_.disk_mib);
  c.set_memory_file(memory_file(h));
  c.set_mirror(At("127.0.0.1", replication_[other]));
  c.set_replication_port(replication_[h]);
  c.set_psk_file(File("key"));
  c.set_epoch_ms(o_.epoch_ms);
  c.set_compression(o_.compression);
  c.set_platform(o_.platform);
  c.set_ledger_port(ledger_[h]);
  c.set_control_socket(control_socket(h));
  c.mutable_workload()->set_working_set_pages(o_.working_set_pages);
  c.mutable_workload()->set_write_rate(o_.write_rate);
  *c.mutable_switchover() = SwitchoverOf(h);
  if (o_.metrics) c.set_metrics_listen(At("127.0.0.1", metrics_[h]));
  if (o_.health.ByteSizeLong() > 0) *c.mutable_health() = o_.health;
  return Text(c);
}

std::string LocalHosts::MirrorConfig(Host h) const {
  Host other = h == kA ? kB : kA;
  pb::MirrorConfig c;
  c.set_vm_id(kVmId);
  c.set_memory_mib(o_.memory_mib);
  c.set_disk_mib(o_.disk_mib);
  c.set_port(replication_[h]);
  c.set_psk_file(File("key"));
  c.set_replica_disk(disk(h));
  // Host a returns with what it held when it was killed.
  if (h == kA) c.set_seed_memory_file(memory_file(kA));
  c.set_control_socket(control_socket(h));
  c.set_ledger_port(ledger_[h]);
  c.set_replicate_to(At("127.0.0.1", replication_[other]));
  c.set_epoch_ms(o_.epoch_ms);
  c.set_compression(o_.compression);
  c.set_platform(o_.platform);
  *c.mutable_switchover() = SwitchoverOf(h);
  if (o_.metrics) c.set_metrics_listen(At("127.0.0.1", metrics_[h]));
  return Text(c);
}

pb::SwitchoverConfig LocalHosts::SwitchoverOf(Host h) const {
  Host other = h == kA ? kB : kA;
  pb::SwitchoverConfig s;
  s.set_node(Name(h));
  pb::HeartbeatPath* p = s.add_path();
  p->set_local(At("127.0.0.1", heartbeat_[h]));
  p->set_remote(At("127.0.0.1", heartbeat_[other]));
  p = s.add_path();
  p->set_local(At("127.0.0.2", heartbeat2_[h]));
  p->set_remote(At("127.0.0.2", heartbeat2_[other]));
  s.set_witness(At("127.0.0.1", witness_));
  if (o_.heartbeat_timeout_ms != 0) s.set_heartbeat_timeout_ms(o_.heartbeat_timeout_ms);
  if (o_.heartbeat_timeout_max_ms != 0) {
    s.set_heartbeat_timeout_max_ms(o_.heartbeat_timeout_max_ms);
  }
  return s;
}

LoadOptions LocalHosts::Load(Host primary) const {
  Host other = primary == kA ? kB : kA;
  LoadOptions o;
  o.port = ledger_[primary];
  o.standby_host = "127.0.0.1";
  o.standby_port = ledger_[other];
  o.accounts = 8;
  o.attempts = 200;  // 50 ms apart: 10 s for detection, the lease and the promotion
  return o;
}

LoadOptions LocalHosts::LoadThroughProxy() const {
  LoadOptions o;
  o.port = proxy_;
  o.accounts = 8;
  // A request waits at the proxy until a primary answers it, up to proxy_hold: the clients
  // wait longer, so that the proxy's answer (or error) is what they see.
  o.timeout_ms = static_cast<uint64_t>(o_.proxy_hold.count()) + 5000;
  return o;
}

absl::Status LocalHosts::Rejoin(Host h) {
  if (hosts_[h] && !hosts_[h]->Wait(std::chrono::milliseconds(0))) {
    return absl::FailedPreconditionError(absl::StrCat("host ", Name(h), " still runs"));
  }
  std::string config = File(absl::StrCat(Name(h), "-mirror.conf"));
  if (auto s = WriteFile(config, MirrorConfig(h)); !s.ok()) return s;
  auto p = Run(Name(h), {"mirror", "--config", config});
  if (!p.ok()) return p.status();
  hosts_[h] = std::move(*p);
  if (auto line = hosts_[h]->WaitForLine("waiting for the primary", o_.wait); !line.ok()) {
    return HostError(h, *hosts_[h], line.status());
  }
  return absl::OkStatus();
}

absl::Status LocalHosts::RestartAsPrimary(Host h) {
  if (hosts_[h] && !hosts_[h]->Wait(std::chrono::milliseconds(0))) {
    return absl::FailedPreconditionError(absl::StrCat("host ", Name(h), " still runs"));
  }
  // Host a's own config, as it first started; host b's written once, the same way.
  std::string config = File(absl::StrCat(Name(h), h == kA ? ".conf" : "-primary.conf"));
  if (h == kB) {
    if (auto s = WriteFile(config, PrimaryConfig(h)); !s.ok()) return s;
  }
  auto p = Run(Name(h), {"primary", "--config", config});
  if (!p.ok()) return p.status();
  hosts_[h] = std::move(*p);
  return absl::OkStatus();
}

absl::Status LocalHosts::Stop() {
  std::vector<std::pair<std::string, Process*>> running;
  for (Host h : {kA, kB}) {
    if (hosts_[h]) running.emplace_back(Name(h), hosts_[h].get());
  }
  if (witness_process_) running.emplace_back("witness", witness_process_.get());
  if (proxy_process_) running.emplace_back("proxy", proxy_process_.get());
  for (auto& [name, p] : running) {
    if (!p->Wait(std::chrono::milliseconds(0))) p->Signal(SIGTERM);
  }
  absl::Status result;
  for (auto& [name, p] : running) {
    auto code = p->Wait(o_.wait);
    if (!code) {
      result.Update(absl::DeadlineExceededError(absl::StrCat(name, " did not stop")));
    } else if (*code != 0) {
      result.Update(absl::InternalError(absl::StrCat(name, " exited with ", *code)));
    }
  }
  return result;
}

}  // namespace romulus::cli
