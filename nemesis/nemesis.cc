#include "nemesis/nemesis.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "cli/control.h"
#include "cli/ledger_client.h"
#include "cli/load.h"
#include "cli/local_hosts.h"
#include "cli/process.h"
#include "guest/abi.h"

namespace romulus::nemesis {
namespace {

using Clock = std::chrono::steady_clock;
using cli::LocalHosts;
using Host = LocalHosts::Host;
using std::chrono::milliseconds;

double Since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}
Host Other(Host h) { return h == Host::kA ? Host::kB : Host::kA; }

// How long a request waits at the proxy for a primary: above a failover, below a round.
constexpr milliseconds kProxyHold{3000};
// The VM's disk, which holds the ledger's journal: a cluster is replaced (not counted as a
// failure) when its journal is full, every few dozen rounds.
constexpr uint64_t kDiskMib = 32;
// How long recovery after a round may take before the cluster counts as unrecovered.
constexpr double kRecoverySeconds = 45;

// What a fault is aimed at, named by role: the schedule is drawn before the round, and the
// roles are resolved to hosts a and b when the round starts.
enum class Target { kPrimary, kMirror, kWitness, kProxy, kPrimaryStub, kMirrorStub };
const char* TargetName(Target t) {
  switch (t) {
    case Target::kPrimary:
      return "primary";
    case Target::kMirror:
      return "mirror";
    case Target::kWitness:
      return "witness";
    case Target::kProxy:
      return "proxy";
    case Target::kPrimaryStub:
      return "primary's stub";
    case Target::kMirrorStub:
      return "mirror's stub";
  }
  return "?";
}

enum class Kind {
  kKill,              // SIGKILL; restarted (as the mirror) in recovery
  kFreeze,            // SIGSTOP, SIGCONT `for_s` later (a host together with its stub)
  kRestartAsPrimary,  // SIGKILL, then `romulus primary` with its old files `for_s` later
  kRestartAsMirror,   // SIGKILL, then `romulus mirror` `for_s` later
  kStarve,            // stress-ng --cpu 2 for `for_s`
  kMigrate,           // romulus migrate on the primary
  kPartition,         // drop everything between two endpoints for `for_s`
  kOneWay,            // drop what one endpoint sends the other for `for_s`
  kDiskFull,          // the mirror's file system full for `for_s`
};

// The endpoints of a partition.
enum class Pair { kHosts, kPrimaryWitness, kMirrorWitness, kProxyPrimary, kProxyMirror };
const char* PairName(Pair p, bool reverse) {
  switch (p) {
    case Pair::kHosts:
      return reverse ? "mirror->primary" : "primary->mirror";
    case Pair::kPrimaryWitness:
      return reverse ? "witness->primary" : "primary->witness";
    case Pair::kMirrorWitness:
      return reverse ? "witness->mirror" : "mirror->witness";
    case Pair::kProxyPrimary:
      return reverse ? "primary->proxy" : "proxy->primary";
    case Pair::kProxyMirror:
      return reverse ? "mirror->proxy" : "proxy->mirror";
  }
  return "?";
}

struct Fault {
  Kind kind;
  Target target = Target::kPrimary;
  Pair pair = Pair::kHosts;
  bool reverse = false;  // kOneWay: the pair's second endpoint is the sender
  double at_s = 0, for_s = 0;
};

std::string Describe(const Fault& f) {
  switch (f.kind) {
    case Kind::kKill:
      return absl::StrFormat("+%.2fs kill %s", f.at_s, TargetName(f.target));
    case Kind::kFreeze:
      return absl::StrFormat("+%.2fs freeze %s %.2fs", f.at_s, TargetName(f.target), f.for_s);
    case Kind::kRestartAsPrimary:
      return absl::StrFormat("+%.2fs kill %s, restart as primary %.2fs later", f.at_s,
                             TargetName(f.target), f.for_s);
    case Kind::kRestartAsMirror:
      return absl::StrFormat("+%.2fs kill %s, restart as mirror %.2fs later", f.at_s,
                             TargetName(f.target), f.for_s);
    case Kind::kStarve:
      return absl::StrFormat("+%.2fs stress-ng --cpu 2 %.2fs", f.at_s, f.for_s);
    case Kind::kMigrate:
      return absl::StrFormat("+%.2fs migrate", f.at_s);
    case Kind::kPartition:
      return absl::StrFormat("+%.2fs partition %s %.2fs", f.at_s, PairName(f.pair, false), f.for_s);
    case Kind::kOneWay:
      return absl::StrFormat("+%.2fs drop %s %.2fs", f.at_s, PairName(f.pair, f.reverse), f.for_s);
    case Kind::kDiskFull:
      return absl::StrFormat("+%.2fs mirror's disk full %.2fs", f.at_s, f.for_s);
  }
  return "?";
}

// A round's faults: one to three, drawn from the seeded generator only (the cluster's state
// does not change what is drawn), so that a seed gives the same schedule on every run.
std::vector<Fault> Draw(std::mt19937_64& rng, const Options& o) {
  auto uniform = [&](double lo, double hi) {
    return lo + (hi - lo) * static_cast<double>(rng() % 10001) / 10000.0;
  };
  std::vector<Kind> kinds = {Kind::kKill,
                             Kind::kKill,
                             Kind::kFreeze,
                             Kind::kFreeze,
                             Kind::kFreeze,
                             Kind::kRestartAsPrimary,
                             Kind::kRestartAsMirror,
                             Kind::kMigrate};
  if (!o.stress_ng.empty()) kinds.push_back(Kind::kStarve);
  if (o.network) kinds.insert(kinds.end(), {Kind::kPartition, Kind::kOneWay});
  if (o.disk_full) kinds.push_back(Kind::kDiskFull);
  std::vector<Target> targets = {Target::kPrimary, Target::kPrimary, Target::kMirror,
                                 Target::kWitness, Target::kProxy};
  // The process platform runs each guest in a stub process of its own; KVM in the host's.
  if (o.platform == "process") {
    targets.insert(targets.end(), {Target::kPrimaryStub, Target::kMirrorStub});
  }
  uint64_t roll = rng() % 100;
  int n = roll < 55 ? 1 : roll < 85 ? 2 : 3;
  std::vector<Fault> faults;
  for (int i = 0; i < n; i++) {
    Fault f{.kind = kinds[rng() % kinds.size()]};
    f.at_s = uniform(0.3, 1.5);
    switch (f.kind) {
      case Kind::kKill:
        f.target = targets[rng() % targets.size()];
        break;
      case Kind::kFreeze:
        f.target = targets[rng() % targets.size()];
        f.for_s = uniform(0.2, 3.0);
        break;
      case Kind::kRestartAsPrimary:
      case Kind::kRestartAsMirror:
        f.target = rng() % 3 == 0 ? Target::kMirror : Target::kPrimary;
        f.for_s = uniform(0.3, 2.0);
        break;
      case Kind::kStarve:
        f.for_s = uniform(1.0, 4.0);
        break;
      case Kind::kDiskFull:
        f.for_s = uniform(0.5, 3.0);
        break;
      case Kind::kMigrate:
        break;
      case Kind::kPartition:
      case Kind::kOneWay:
        f.pair = static_cast<Pair>(rng() % 5);
        f.reverse = rng() % 2 == 1;
        f.for_s = uniform(0.3, 3.0);
        break;
    }
    faults.push_back(f);
  }
  std::sort(faults.begin(), faults.end(),
            [](const Fault& a, const Fault& b) { return a.at_s < b.at_s; });
  return faults;
}

// The process platform's stub: the host's child process (found through every thread's list of
// children, since the host's threads start it).
std::vector<pid_t> Children(pid_t pid) {
  std::vector<pid_t> out;
  std::string tasks = absl::StrCat("/proc/", pid, "/task");
  DIR* d = ::opendir(tasks.c_str());
  if (!d) return out;
  while (dirent* e = ::readdir(d)) {
    if (e->d_name[0] == '.') continue;
    std::ifstream f(absl::StrCat(tasks, "/", e->d_name, "/children"));
    pid_t child;
    while (f >> child) out.push_back(child);
  }
  ::closedir(d);
  return out;
}

// The local UDP port of the socket of `pid` that is connected to `remote_port` on loopback (a
// host's lease client, talking to the witness), or 0.
uint16_t ConnectedUdpPort(pid_t pid, uint16_t remote_port) {
  std::set<std::string> inodes;
  std::string fds = absl::StrCat("/proc/", pid, "/fd");
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(fds, ec)) {
    std::string target = std::filesystem::read_symlink(e.path(), ec).string();
    if (!ec && absl::StartsWith(target, "socket:[")) {
      inodes.insert(target.substr(8, target.size() - 9));
    }
  }
  std::ifstream udp(absl::StrCat("/proc/", pid, "/net/udp"));
  std::string line;
  std::getline(udp, line);  // the header
  while (std::getline(udp, line)) {
    std::istringstream in(line);
    std::string sl, local, remote, st, queues, tr, retr, uid, timeout, inode;
    in >> sl >> local >> remote >> st >> queues >> tr >> retr >> uid >> timeout >> inode;
    if (!inodes.count(inode) || remote.size() < 5) continue;
    if (std::stoul(remote.substr(remote.size() - 4), nullptr, 16) != remote_port) continue;
    return static_cast<uint16_t>(std::stoul(local.substr(local.size() - 4), nullptr, 16));
  }
  return 0;
}

// One load run on a thread of its own.
class Clients {
 public:
  explicit Clients(cli::LoadOptions o) : o_(std::move(o)) {
    o_.running = [this] {
      std::lock_guard<std::mutex> lock(mu_);
      running_ = true;
    };
    thread_ = std::thread([this] { report_ = cli::RunLoad(o_); });
  }
  ~Clients() {
    if (thread_.joinable()) thread_.join();
  }
  bool running() {
    std::lock_guard<std::mutex> lock(mu_);
    return running_;
  }
  absl::StatusOr<cli::LoadReport> Finish() {
    if (thread_.joinable()) thread_.join();
    return report_;
  }

 private:
  cli::LoadOptions o_;
  std::mutex mu_;
  bool running_ = false;
  absl::StatusOr<cli::LoadReport> report_ = absl::UnknownError("not run");
  std::thread thread_;
};

class Nemesis {
 public:
  explicit Nemesis(const Options& o) : o_(o), rng_(o.seed) {
    if (!o_.log_file.empty()) log_ = std::fopen(o_.log_file.c_str(), "a");
  }
  ~Nemesis() {
    Teardown();
    if (log_) std::fclose(log_);
  }

  absl::StatusOr<Report> Run() {
    if (auto s = Fresh(); !s.ok()) return s;
    Say(absl::StrFormat("%-5s | %-70s | %-10s | %-12s | %s", "round", "faults", "violations",
                        "longest wait", "recovered"));
    for (uint64_t r = 1; r <= o_.rounds; r++) {
      Round round = RunRound(r);
      report_.violations += round.violations.size();
      if (!round.recovered) report_.unrecovered++;
      std::string wait = absl::StrFormat("%.0f ms", round.longest_wait_ms);
      if (round.unanswered > 0) absl::StrAppend(&wait, " (", round.unanswered, " unanswered)");
      Say(absl::StrFormat("%-5d | %-70s | %-10d | %-12s | %s", r, absl::StrJoin(round.faults, "; "),
                          round.violations.size(), wait, round.recovered ? "y" : "n"));
      for (const auto& v : round.violations) Say(absl::StrCat("      violation: ", v));
      report_.rounds.push_back(std::move(round));
      if (!report_.rounds.back().recovered || ledger_full_) {
        if (ledger_full_) Say("nemesis: the ledger's journal is full: a fresh cluster");
        ledger_full_ = false;
        if (auto s = Fresh(); !s.ok()) return s;
      }
    }
    return report_;
  }

 private:
  void Say(const std::string& line) {
    if (o_.out) o_.out(line);
    Log(line);
  }
  void Log(absl::string_view line) {
    if (!log_) return;
    std::lock_guard<std::mutex> lock(log_mu_);
    std::fprintf(log_, "%9.3f %.*s\n", Since(start_), static_cast<int>(line.size()), line.data());
    std::fflush(log_);
  }

  // A new cluster in a directory of its own: the first, or after one that did not recover.
  absl::Status Fresh() {
    Teardown();
    std::error_code ec;
    cluster_dir_ = absl::StrCat(o_.dir, "/cluster-", ++clusters_);
    std::filesystem::create_directories(cluster_dir_, ec);
    if (ec) return absl::InternalError(absl::StrCat("cannot create ", cluster_dir_));
    std::array<std::string, 2> files_dir{};
    if (o_.disk_full) {
      for (Host h : {Host::kA, Host::kB}) {
        files_dir[h] = absl::StrCat(cluster_dir_, "/files-", LocalHosts::Name(h));
        std::filesystem::create_directories(files_dir[h], ec);
        // Room for the 64 MiB memory file and the disk, and a little more.
        if (::mount("tmpfs", files_dir[h].c_str(), "tmpfs", 0,
                    absl::StrCat("size=", 64 + kDiskMib + 32, "m,mode=0700").c_str()) != 0) {
          return absl::InternalError(
              absl::StrCat("mount tmpfs on ", files_dir[h], ": ", std::strerror(errno)));
        }
        mounts_.push_back(files_dir[h]);
      }
    }
    accounts_.clear();
    max_seq_ = 0;
    absl::Status last;
    for (int attempt = 0; attempt < 3; attempt++) {
      auto c = LocalHosts::Start({.binary = o_.binary,
                                  .dir = cluster_dir_,
                                  .files_dir = files_dir,
                                  .disk_mib = kDiskMib,
                                  .platform = o_.platform,
                                  .echo = [this](absl::string_view l) { Log(l); },
                                  .proxy_hold = kProxyHold});
      if (c.ok()) {
        cluster_ = std::move(*c);
        Log(absl::StrCat("nemesis: cluster ", clusters_, " started in ", cluster_dir_));
        return absl::OkStatus();
      }
      last = c.status();
      Say(absl::StrCat("nemesis: starting a cluster failed: ", last.message()));
    }
    return last;
  }

  // The cluster's processes and files go (its mounts with them).
  void Teardown() {
    Heal();
    cluster_.reset();
    for (const auto& m : mounts_) ::umount2(m.c_str(), MNT_DETACH);
    mounts_.clear();
    std::error_code ec;
    if (!cluster_dir_.empty()) std::filesystem::remove_all(cluster_dir_, ec);
  }

  // Fills the file system of `dir` (what a full disk does to the host that writes there).
  void Fill(const std::string& dir) {
    filler_ = dir + "/filler";
    int fd = ::open(filler_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) return;
    std::string block(1 << 20, '\0');
    for (size_t size : {size_t{1} << 20, size_t{4096}}) {
      while (::write(fd, block.data(), size) == static_cast<ssize_t>(size)) {
      }
    }
    ::close(fd);
    struct statvfs v {};
    ::statvfs(dir.c_str(), &v);
    Log(absl::StrCat("nemesis: filled ", dir, "; ", v.f_bavail * v.f_frsize, " bytes left"));
  }

  // The load's setup could not open an account because the ledger is out of room.
  static bool Full(const absl::Status& s) {
    return absl::StrContains(s.message(),
                             absl::StrCat("failed with status ", RML_ERR_JOURNAL_FULL)) ||
           absl::StrContains(s.message(), absl::StrCat("failed with status ", RML_ERR_LEDGER_FULL));
  }

  bool Alive(Host h) { return !cluster_->process(h).Wait(milliseconds(0)).has_value(); }
  std::optional<pb::StatusReply> Status(Host h, int timeout_ms = 1000) {
    if (!Alive(h)) return std::nullopt;
    auto s = cli::QueryStatus(cluster_->control_socket(h), timeout_ms);
    if (!s.ok()) return std::nullopt;
    return *s;
  }
  std::optional<Host> Primary() {
    for (Host h : {Host::kA, Host::kB}) {
      auto s = Status(h);
      if (s && s->role() == "primary") return h;
    }
    return std::nullopt;
  }

  // Every pid a target names now (a host with its stub).
  std::vector<pid_t> Pids(Target t, Host primary, bool with_stub) {
    Host mirror = Other(primary);
    switch (t) {
      case Target::kWitness:
        return {cluster_->witness().pid()};
      case Target::kProxy:
        return {cluster_->proxy()->pid()};
      case Target::kPrimary:
      case Target::kMirror: {
        Host h = t == Target::kPrimary ? primary : mirror;
        std::vector<pid_t> pids = {cluster_->process(h).pid()};
        if (with_stub) {
          auto c = Children(pids[0]);
          pids.insert(pids.end(), c.begin(), c.end());
        }
        return pids;
      }
      case Target::kPrimaryStub:
        return Children(cluster_->process(primary).pid());
      case Target::kMirrorStub:
        return Children(cluster_->process(mirror).pid());
    }
    return {};
  }

  // nftables rules (in this process's own network namespace) that drop what `from` sends `to`.
  std::vector<std::string> DropRules(Pair p, bool reverse, Host primary) {
    Host mirror = Other(primary);
    auto& c = *cluster_;
    // Endpoints: a host (by its ports) or the witness/proxy.
    enum End { kPrimaryEnd, kMirrorEnd, kWitnessEnd, kProxyEnd };
    End from = kPrimaryEnd, to = kMirrorEnd;
    switch (p) {
      case Pair::kHosts:
        from = kPrimaryEnd, to = kMirrorEnd;
        break;
      case Pair::kPrimaryWitness:
        from = kPrimaryEnd, to = kWitnessEnd;
        break;
      case Pair::kMirrorWitness:
        from = kMirrorEnd, to = kWitnessEnd;
        break;
      case Pair::kProxyPrimary:
        from = kProxyEnd, to = kPrimaryEnd;
        break;
      case Pair::kProxyMirror:
        from = kProxyEnd, to = kMirrorEnd;
        break;
    }
    if (reverse) std::swap(from, to);
    auto host_of = [&](End e) { return e == kPrimaryEnd ? primary : mirror; };
    std::vector<std::string> rules;
    bool from_host = from == kPrimaryEnd || from == kMirrorEnd;
    bool to_host = to == kPrimaryEnd || to == kMirrorEnd;
    if (from_host && to_host) {
      Host f = host_of(from), t = host_of(to);
      // Heartbeats to t; replication data to t's port (t serves) or from f's port (f serves).
      rules.push_back(absl::StrFormat("udp dport { %d, %d } drop", c.heartbeat_port(t, 0),
                                      c.heartbeat_port(t, 1)));
      rules.push_back(absl::StrFormat("tcp dport %d drop", c.replication_port(t)));
      rules.push_back(absl::StrFormat("tcp sport %d drop", c.replication_port(f)));
    } else if (from == kWitnessEnd || to == kWitnessEnd) {
      Host h = host_of(from == kWitnessEnd ? to : from);
      uint16_t lease = ConnectedUdpPort(c.process(h).pid(), c.witness_port());
      if (lease == 0) return {};
      if (to == kWitnessEnd) {
        rules.push_back(absl::StrFormat("udp sport %d udp dport %d drop", lease, c.witness_port()));
      } else {
        rules.push_back(absl::StrFormat("udp sport %d udp dport %d drop", c.witness_port(), lease));
      }
    } else {
      // The proxy and a host's ledger (the direct clients lose that path too).
      Host h = host_of(from == kProxyEnd ? to : from);
      rules.push_back(absl::StrFormat("tcp %s %d drop", from == kProxyEnd ? "dport" : "sport",
                                      c.ledger_port(h)));
    }
    return rules;
  }

  absl::Status ApplyRules() {
    std::string path = absl::StrCat(o_.dir, "/rules.nft");
    std::ofstream f(path, std::ios::trunc);
    f << "table inet nemesis\ndelete table inet nemesis\n"
      << "table inet nemesis {\n  chain input {\n    type filter hook input priority 0; "
         "policy accept;\n";
    for (const auto& [id, rules] : drops_) {
      for (const auto& r : rules) f << "    " << r << "\n";
    }
    f << "  }\n}\n";
    f.close();
    int rc = std::system(absl::StrCat("nft -f ", path, " 2>&1").c_str());
    if (rc != 0) return absl::InternalError(absl::StrCat("nft -f ", path, " failed"));
    return absl::OkStatus();
  }

  // Undoes what a round left: frozen processes continue, the network is whole, the CPU free.
  void Heal() {
    for (pid_t p : frozen_) ::kill(p, SIGCONT);
    frozen_.clear();
    if (!drops_.empty() || network_touched_) {
      drops_.clear();
      (void)std::system("nft delete table inet nemesis >/dev/null 2>&1");
      network_touched_ = false;
    }
    stress_.reset();  // killed
    if (!filler_.empty()) ::unlink(filler_.c_str());
    filler_.clear();
    for (auto& t : migrations_) t.join();
    migrations_.clear();
  }

  struct Event {
    double at_s;
    std::function<void()> run;
  };

  std::vector<Event> Events(const std::vector<Fault>& faults, Host primary) {
    std::vector<Event> events;
    int id = 0;
    for (const Fault& f : faults) {
      id++;
      switch (f.kind) {
        case Kind::kKill:
          events.push_back(
              {f.at_s, [this, f, primary] {
                 for (pid_t p : Pids(f.target, primary, false)) {
                   ::kill(p, SIGKILL);
                   Log(absl::StrCat("nemesis: SIGKILL ", TargetName(f.target), " pid ", p));
                 }
               }});
          break;
        case Kind::kFreeze: {
          auto pids = std::make_shared<std::vector<pid_t>>();
          events.push_back({f.at_s, [this, f, primary, pids] {
                              *pids = Pids(f.target, primary, true);
                              for (pid_t p : *pids) {
                                ::kill(p, SIGSTOP);
                                frozen_.push_back(p);
                              }
                              Log(absl::StrCat("nemesis: SIGSTOP ", TargetName(f.target), " pids ",
                                               absl::StrJoin(*pids, ",")));
                            }});
          events.push_back({f.at_s + f.for_s, [this, f, pids] {
                              for (pid_t p : *pids) ::kill(p, SIGCONT);
                              Log(absl::StrCat("nemesis: SIGCONT ", TargetName(f.target)));
                            }});
          break;
        }
        case Kind::kRestartAsPrimary:
        case Kind::kRestartAsMirror: {
          Host h = f.target == Target::kPrimary ? primary : Other(primary);
          events.push_back({f.at_s, [this, h] {
                              cluster_->process(h).Signal(SIGKILL);
                              Log(absl::StrCat("nemesis: SIGKILL host ", LocalHosts::Name(h)));
                            }});
          bool as_primary = f.kind == Kind::kRestartAsPrimary;
          events.push_back(
              {f.at_s + f.for_s, [this, h, as_primary] {
                 cluster_->process(h).Wait(milliseconds(5000));
                 auto s = as_primary ? cluster_->RestartAsPrimary(h) : cluster_->Rejoin(h);
                 Log(absl::StrCat("nemesis: host ", LocalHosts::Name(h), " restarted as ",
                                  as_primary ? "primary" : "mirror", ": ", s.ToString()));
               }});
          break;
        }
        case Kind::kStarve:
          events.push_back({f.at_s, [this, f] {
                              auto p = cli::Process::Start(
                                  o_.stress_ng,
                                  {"--cpu", "2", "--timeout",
                                   absl::StrFormat("%.0fs", std::max(1.0, f.for_s + 0.5))});
                              if (p.ok()) stress_ = std::move(*p);
                              Log("nemesis: stress-ng started");
                            }});
          events.push_back({f.at_s + f.for_s, [this] {
                              stress_.reset();
                              Log("nemesis: stress-ng stopped");
                            }});
          break;
        case Kind::kMigrate:
          events.push_back({f.at_s, [this, primary] {
                              std::string socket = cluster_->control_socket(primary);
                              migrations_.emplace_back([this, socket] {
                                auto m = cli::RequestMigration(socket, milliseconds(10000));
                                Log(absl::StrCat("nemesis: migrate: ",
                                                 m.ok() ? m->line : m.status().ToString()));
                              });
                            }});
          break;
        case Kind::kDiskFull: {
          if (!o_.disk_full) break;
          std::string dir = std::filesystem::path(cluster_->disk(Other(primary))).parent_path();
          events.push_back({f.at_s, [this, dir] { Fill(dir); }});
          events.push_back({f.at_s + f.for_s, [this] {
                              if (!filler_.empty()) ::unlink(filler_.c_str());
                              filler_.clear();
                              Log("nemesis: disk space back");
                            }});
          break;
        }
        case Kind::kPartition:
        case Kind::kOneWay:
          events.push_back({f.at_s, [this, f, primary, id] {
                              auto rules = DropRules(f.pair, f.reverse, primary);
                              if (f.kind == Kind::kPartition) {
                                auto back = DropRules(f.pair, !f.reverse, primary);
                                rules.insert(rules.end(), back.begin(), back.end());
                              }
                              drops_[id] = rules;
                              network_touched_ = true;
                              auto s = ApplyRules();
                              Log(absl::StrCat("nemesis: drop ", absl::StrJoin(rules, "; "), ": ",
                                               s.ToString()));
                            }});
          events.push_back({f.at_s + f.for_s, [this, id] {
                              drops_.erase(id);
                              auto s = ApplyRules();
                              Log(absl::StrCat("nemesis: network healed: ", s.ToString()));
                            }});
          break;
      }
    }
    std::stable_sort(events.begin(), events.end(),
                     [](const Event& a, const Event& b) { return a.at_s < b.at_s; });
    return events;
  }

  // Violations a load run's report shows. Requests nobody answered, and final reads that found
  // no primary, are unavailability: counted apart.
  void Check(const char* who, const absl::StatusOr<cli::LoadReport>& r, Round& round) {
    if (!r.ok()) {
      if (Full(r.status())) {
        ledger_full_ = true;
        return;
      }
      round.unanswered++;
      Log(absl::StrCat("nemesis: ", who, " clients: ", r.status().ToString()));
      return;
    }
    round.longest_wait_ms = std::max(round.longest_wait_ms, r->max_us / 1000);
    if (r->by_status.count(RML_ERR_JOURNAL_FULL) || r->by_status.count(RML_ERR_LEDGER_FULL)) {
      ledger_full_ = true;
    }
    round.unanswered += r->unresolved;
    bool complete = true;
    for (const auto& v : r->violations) {
      if (absl::StartsWith(v, "final read of account")) {
        complete = false;
        continue;
      }
      round.violations.push_back(absl::StrCat(who, ": ", v));
    }
    max_seq_ = std::max(max_seq_, r->last_seq);
    // The accounts whose final balances are known exactly must keep them from now on.
    if (complete && r->unresolved == 0) {
      for (auto [account, balance] : r->final_balances) {
        accounts_[account] = {round.round, balance};
      }
    }
  }

  // Reads back every account earlier rounds left (the newest 64 when there are more): none may
  // have changed, and the ledger's sequence may not have gone back.
  void CheckState(Round& round) {
    auto c = cli::LedgerClient::Connect("127.0.0.1", cluster_->proxy_port(),
                                        static_cast<int>(kProxyHold.count()) + 5000);
    if (!c.ok()) {
      round.recovered = false;
      return;
    }
    std::vector<std::pair<uint32_t, std::pair<uint64_t, int64_t>>> all(accounts_.begin(),
                                                                       accounts_.end());
    std::sort(all.begin(), all.end(),
              [](const auto& a, const auto& b) { return a.second.first > b.second.first; });
    if (all.size() > 64) all.resize(64);
    for (const auto& [account, expected] : all) {
      pb::LedgerRequest q;
      q.set_client_id(0x6e656d0000000000ull + clusters_);
      q.set_request_id(++read_id_);
      q.set_op(pb::READ);
      q.set_account(account);
      auto r = c->Call(q);
      if (!r.ok() || r->status() != RML_OK) {
        round.recovered = false;
        return;
      }
      if (r->seq() < max_seq_) {
        round.violations.push_back(absl::StrCat("state: the ledger's sequence went back from ",
                                                max_seq_, " to ", r->seq()));
        max_seq_ = r->seq();  // said once
      }
      if (r->balance() != expected.second) {
        round.violations.push_back(absl::StrCat("state: account ", account, " (round ",
                                                expected.first, ") reads ", r->balance(),
                                                ", its round ended with ", expected.second));
        accounts_[account].second = r->balance();  // said once
      }
    }
  }

  // Brings the cluster back: the witness and the proxy run, one host is a protected primary and
  // the other its mirror, and clients through the proxy are served.
  bool Recover() {
    auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                       std::chrono::duration<double>(kRecoverySeconds));
    auto wait_limit = Clock::now() + std::chrono::seconds(15);
    bool nudged = false, killed_unserving = false;
    while (Clock::now() < deadline) {
      if (cluster_->witness().Wait(milliseconds(0))) {
        Log(absl::StrCat("nemesis: recovery: witness restarted: ",
                         cluster_->RestartWitness().ToString()));
      }
      if (cluster_->proxy()->Wait(milliseconds(0))) {
        Log(absl::StrCat("nemesis: recovery: proxy restarted: ",
                         cluster_->RestartProxy().ToString()));
      }
      std::optional<pb::StatusReply> s[2] = {Status(Host::kA), Status(Host::kB)};
      auto role = [&](Host h) { return s[h] ? s[h]->role() : std::string("down"); };
      bool alive[2] = {Alive(Host::kA), Alive(Host::kB)};
      if (!alive[0] && !alive[1]) return false;
      for (Host h : {Host::kA, Host::kB}) {
        if (alive[h] || role(Other(h)) != "primary") continue;
        Log(absl::StrCat("nemesis: recovery: host ", LocalHosts::Name(h),
                         " rejoins as mirror: ", cluster_->Rejoin(h).ToString()));
      }
      if (role(Host::kA) == "primary" && role(Host::kB) == "primary") {
        // Two primaries: the one without the witness's lease goes, and comes back as mirror.
        Host loser = s[Host::kA]->lease_held() ? Host::kB : Host::kA;
        Log(absl::StrCat("nemesis: recovery: two primaries; killing ", LocalHosts::Name(loser)));
        cluster_->process(loser).Signal(SIGKILL);
        cluster_->process(loser).Wait(milliseconds(5000));
        continue;
      }
      std::optional<Host> primary;
      for (Host h : {Host::kA, Host::kB}) {
        if (role(h) == "primary") primary = h;
      }
      if (primary && role(Other(*primary)) == "mirror" &&
          absl::StrContains(s[*primary]->state(), "protected: replicating") &&
          !absl::StrContains(s[*primary]->state(), "not protected")) {
        if (Probe()) return true;
        if (killed_unserving) return false;
        // A primary that says it is protected but answers no client (its VM died, or it is
        // fenced): what a service manager would do, kill it, so that the mirror takes over.
        killed_unserving = true;
        Log(absl::StrCat("nemesis: recovery: primary ", LocalHosts::Name(*primary),
                         " serves no client; killing it"));
        cluster_->process(*primary).Signal(SIGKILL);
        cluster_->process(*primary).Wait(milliseconds(5000));
        wait_limit = Clock::now() + std::chrono::seconds(15);
        continue;
      }
      // A primary whose VM stopped (its stub was killed) stays a primary that serves nothing:
      // killed, as a service manager would, so that the mirror takes over.
      if (Clock::now() > wait_limit && primary && !killed_unserving &&
          absl::StrContains(s[*primary]->state(), "VM stopped")) {
        killed_unserving = true;
        Log(absl::StrCat("nemesis: recovery: primary ", LocalHosts::Name(*primary), " says ",
                         s[*primary]->state(), "; killing it"));
        cluster_->process(*primary).Signal(SIGKILL);
        cluster_->process(*primary).Wait(milliseconds(5000));
        wait_limit = Clock::now() + std::chrono::seconds(15);
        continue;
      }
      // A host stuck neither protected nor promoting (idle, or a mirror its primary does not
      // reach): started again as the mirror, once.
      if (Clock::now() > wait_limit && !nudged && primary) {
        Host h = Other(*primary);
        nudged = true;
        Log(absl::StrCat("nemesis: recovery: host ", LocalHosts::Name(h), " is ", role(h), "; ",
                         s[*primary]->state(), "; restarting it as mirror"));
        cluster_->process(h).Signal(SIGKILL);
        cluster_->process(h).Wait(milliseconds(5000));
        continue;
      }
      std::this_thread::sleep_for(milliseconds(100));  // polling the hosts' status
    }
    Log("nemesis: recovery: gave up");
    return false;
  }

  // Clients through the proxy are served again.
  bool Probe() {
    cli::LoadOptions o = cluster_->LoadThroughProxy();
    o.clients = 1;
    o.accounts = 2;
    o.duration_s = 0.3;
    o.timeout_ms = static_cast<uint64_t>(kProxyHold.count()) + 1000;
    o.attempts = 1;
    o.seed = probe_seed_++;
    auto r = cli::RunLoad(o);
    if (!r.ok() && Full(r.status())) {
      ledger_full_ = true;
      return true;  // served: only out of room
    }
    bool ok = r.ok() && r->requests > 0 && r->unresolved == 0;
    if (!ok)
      Log(absl::StrCat("nemesis: recovery probe failed: ",
                       r.ok() ? cli::FormatReport(*r) : r.status().ToString()));
    return ok;
  }

  Round RunRound(uint64_t number) {
    Round round;
    round.round = number;
    std::vector<Fault> faults = Draw(rng_, o_);
    uint64_t load_seed = rng_();
    for (const Fault& f : faults) round.faults.push_back(Describe(f));
    auto primary = Primary();
    if (!primary) {
      round.recovered = false;
      round.faults.insert(round.faults.begin(), "(no primary at the start)");
      return round;
    }
    Say(absl::StrFormat("schedule: seed %d round %d primary %s: %s", o_.seed, number,
                        LocalHosts::Name(*primary), absl::StrJoin(round.faults, "; ")));
    double end_s = 0;
    for (const Fault& f : faults) end_s = std::max(end_s, f.at_s + f.for_s);
    double duration = std::max(3.0, end_s + 1.5);

    cli::LoadOptions via_proxy = cluster_->LoadThroughProxy();
    via_proxy.clients = 2;
    via_proxy.accounts = 3;
    via_proxy.duration_s = duration;
    // Bounded, so that a round whose cluster does not come back ends in tens of seconds.
    via_proxy.timeout_ms = static_cast<uint64_t>(kProxyHold.count()) + 1000;
    via_proxy.attempts = 2;
    via_proxy.seed = load_seed;
    cli::LoadOptions direct = cluster_->Load(*primary);
    direct.clients = 2;
    direct.accounts = 3;
    direct.duration_s = duration;
    direct.timeout_ms = 1000;
    direct.attempts = 12;
    direct.seed = load_seed + 1;
    Clients proxy_clients(via_proxy), direct_clients(direct);
    auto started = Clock::now();
    while ((!proxy_clients.running() || !direct_clients.running()) && Since(started) < 30) {
      std::this_thread::sleep_for(milliseconds(10));  // polling the clients' start
    }
    auto t0 = Clock::now();
    Log(absl::StrCat("nemesis: round ", number, " faults start"));
    for (auto& e : Events(faults, *primary)) {
      std::this_thread::sleep_until(
          t0 + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(e.at_s)));
      e.run();
    }
    auto proxy_report = proxy_clients.Finish();
    auto direct_report = direct_clients.Finish();
    Heal();
    Check("proxy", proxy_report, round);
    Check("direct", direct_report, round);
    round.recovered = Recover();
    if (round.recovered) CheckState(round);
    return round;
  }

  const Options& o_;
  std::mt19937_64 rng_;
  Clock::time_point start_ = Clock::now();
  FILE* log_ = nullptr;
  std::mutex log_mu_;
  std::unique_ptr<LocalHosts> cluster_;
  std::string cluster_dir_;
  int clusters_ = 0;
  Report report_;
  // What the round did that Heal undoes.
  std::vector<pid_t> frozen_;
  std::map<int, std::vector<std::string>> drops_;
  bool network_touched_ = false;
  std::unique_ptr<cli::Process> stress_;
  std::vector<std::thread> migrations_;
  std::string filler_;               // the file that fills a host's file system
  std::vector<std::string> mounts_;  // the hosts' file systems
  // The state check's memory: account -> (round, balance), and the highest sequence seen.
  std::map<uint32_t, std::pair<uint64_t, int64_t>> accounts_;
  uint64_t max_seq_ = 0;
  bool ledger_full_ = false;  // the ledger's journal (or account table) is out of room
  uint64_t read_id_ = 0;
  uint64_t probe_seed_ = 1;  // not from rng_: recovery's course must not change the schedule
};

}  // namespace

absl::StatusOr<Report> Run(const Options& options) {
  Nemesis n(options);
  return n.Run();
}

std::string SummaryLine(const Report& r, const Options& o) {
  return absl::StrFormat("nemesis: %d rounds, %d violations, %d unrecovered, seed %d, platform %s",
                         r.rounds.size(), r.violations, r.unrecovered, o.seed, o.platform);
}

}  // namespace romulus::nemesis
