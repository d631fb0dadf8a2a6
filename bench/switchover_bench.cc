// Switchover with real `romulus` processes (cli::LocalHosts: a witness, host a as `romulus
// primary`, host b as `romulus mirror`, heartbeats on two loopback paths), on every platform that
// can run VMs here (or the one named):
//   - failover: ledger clients (given both hosts' addresses) run on the primary, which is killed
//     (SIGKILL) at a random moment; timed from the kill to the first answer from the other host.
//     The killed host then rejoins as the mirror of the new primary, and the next kill is of the
//     new primary. Baselines from the same run: what bounds detection in the hosts' configuration
//     (heartbeat timeout + lease), and the failover decision (detection + winning the lease)
//     measured in this process with the same heartbeat and lease code, without a VM.
//   - planned migration (`romulus migrate`) back and forth under load, at 256 MiB and 1 GiB of
//     guest RAM with the guest's workload dirtying memory: the downtime the primary reports
//     (VM paused here -> resumed there). Baseline from the same run: the primary's own
//     checkpoint pause (p50) just before each migration.
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "bench/bench_util.h"
#include "bench/failover_decision.h"
#include "cli/args.h"
#include "cli/control.h"
#include "cli/load.h"
#include "cli/local_hosts.h"
#include "vmm/vmm.h"

#ifndef ROMULUS_BINARY
#error "ROMULUS_BINARY must name the romulus executable (bench/CMakeLists.txt defines it)"
#endif

namespace {

using romulus::bench::Clock;
using romulus::bench::Quantile;
using romulus::cli::LocalHosts;
using std::chrono::milliseconds;
using Host = LocalHosts::Host;
namespace cli = romulus::cli;
namespace vmm = romulus::vmm;

struct Settings {
  std::string binary = ROMULUS_BINARY;
  uint64_t kills = 20, migrations = 10;
  uint64_t memory_mib = 256;  // for the failovers; the migrations run at 256 MiB and 1 GiB
  uint64_t working_set = 4096, write_rate = 20000, clients = 4;
  bool quick = false, verbose = false;
};

// What `romulus primary`/`mirror` and `romulus witness` use unless configured otherwise
// (cli/config.cc, cli/witness_command.cc), and LocalHosts configures nothing else.
constexpr double kHeartbeatTimeoutMs = 50, kLeaseMs = 150;

std::string g_platform;

template <typename... Args>
void Line(const absl::FormatSpec<Args...>& format, const Args&... args) {
  std::printf("[%s] %s\n", g_platform.c_str(), absl::StrFormat(format, args...).c_str());
  std::fflush(stdout);
}

double Ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }
using romulus::bench::Ratio;
using romulus::bench::Secs;
Host Other(Host h) { return h == LocalHosts::kA ? LocalHosts::kB : LocalHosts::kA; }

// The number after `key` in `line` (e.g. "authorised in " -> 12.5), if there is one.
std::optional<double> NumberAfter(const std::string& line, const std::string& key) {
  size_t at = line.find(key);
  if (at == std::string::npos) return std::nullopt;
  const char* start = line.c_str() + at + key.size();
  char* end = nullptr;
  double v = std::strtod(start, &end);
  if (end == start) return std::nullopt;
  return v;
}

// A scratch directory for one set of hosts, removed after them (declare it before them).
struct Scratch {
  std::string dir;
  Scratch() {
    char tmpl[] = "/tmp/romulus-switchover-bench-XXXXXX";
    if (::mkdtemp(tmpl) != nullptr) dir = tmpl;
  }
  ~Scratch() {
    if (!dir.empty()) std::filesystem::remove_all(dir);
  }
};

// The last lines a host printed, to say why it failed.
std::string Tail(const cli::Process& p, int lines = 6) {
  std::string out = p.output();
  size_t at = out.size();
  for (int i = 0; i <= lines && at != std::string::npos && at > 0; i++) {
    at = out.rfind('\n', at - 1);
  }
  return at == std::string::npos ? out : out.substr(at + 1);
}

absl::Status HostFailed(LocalHosts& h, Host host, const absl::Status& s) {
  return absl::Status(s.code(), absl::StrCat("host ", LocalHosts::Name(host), ": ", s.message(),
                                             "; its last lines:\n", Tail(h.process(host))));
}

absl::StatusOr<std::unique_ptr<LocalHosts>> StartHosts(const Settings& st, const Scratch& s,
                                                       uint64_t memory_mib) {
  if (s.dir.empty()) return absl::InternalError("cannot create a scratch directory in /tmp");
  LocalHosts::Options o;
  o.binary = st.binary;
  o.dir = s.dir;
  o.memory_mib = memory_mib;
  o.disk_mib = 64;
  o.working_set_pages = st.working_set;
  o.write_rate = st.write_rate;
  o.epoch_ms = 25;
  o.platform = g_platform;
  if (st.verbose) {
    o.echo = [](absl::string_view line) {
      std::printf("[%s]   %s\n", g_platform.c_str(), std::string(line).c_str());
      std::fflush(stdout);
    };
  }
  o.wait = milliseconds(120000);
  o.proxy_hold = milliseconds(20000);  // a `romulus proxy` in front of both ledgers
  return LocalHosts::Start(std::move(o));
}

// Ledger clients on a thread of their own.
class Clients {
 public:
  explicit Clients(cli::LoadOptions o) : thread_([this, o] { report_ = cli::RunLoad(o); }) {}
  ~Clients() {
    if (thread_.joinable()) thread_.join();
  }
  absl::StatusOr<cli::LoadReport> Finish() {
    thread_.join();
    return report_;
  }

 private:
  absl::StatusOr<cli::LoadReport> report_;
  std::thread thread_;
};

std::string Problems(const cli::LoadReport& r) {
  return absl::StrFormat(
      "%d acknowledged writes lost, %d requests unanswered, %d violations%s%s", r.lost_acknowledged,
      r.unresolved, r.violations.size(),
      r.violations.empty() ? "" : ", first: ", r.violations.empty() ? "" : r.violations.front());
}

absl::Status Failovers(const Settings& st, const romulus::bench::FailoverDecision& decision) {
  Scratch s;
  auto t_start = Clock::now();
  auto started = StartHosts(st, s, st.memory_mib);
  if (!started.ok()) return started.status();
  LocalHosts& h = **started;
  Line(
      "failover: hosts up and protected in %.1f s (%lu MiB guest, 64 MiB disk, workload %lu "
      "pages at %lu writes/s, 25 ms epochs)",
      Secs(Clock::now() - t_start), static_cast<unsigned long>(st.memory_mib),
      static_cast<unsigned long>(st.working_set), static_cast<unsigned long>(st.write_rate));
  std::mt19937 rng(std::random_device{}());
  std::vector<double> first_answer, authorised, resumed, reprotect, proxied_wait;
  int intact = 0;
  Host primary = LocalHosts::kA;
  for (uint64_t i = 0; i < st.kills; i++) {
    Host standby = Other(primary);
    cli::LoadOptions o = h.Load(primary);
    o.clients = st.clients;
    o.duration_s = 2;
    Clients clients(o);
    // As many clients again, given only the proxy's address: their longest wait is the
    // failover as they see it.
    cli::LoadOptions p = h.LoadThroughProxy();
    p.clients = st.clients;
    p.duration_s = 2;
    Clients proxied(p);
    // A random moment of the run (when the primary dies, not a wait for something).
    std::this_thread::sleep_for(milliseconds(400 + rng() % 600));
    auto killed = Clock::now();
    h.process(primary).Signal(SIGKILL);
    auto promoted = h.process(standby).WaitForLine("promoted (", milliseconds(30000));
    auto report = clients.Finish();
    auto through_proxy = proxied.Finish();
    if (!promoted.ok()) return HostFailed(h, standby, promoted.status());
    if (!report.ok()) return report.status();
    if (!through_proxy.ok()) return through_proxy.status();
    proxied_wait.push_back(through_proxy->max_us / 1000);
    if (!report->first_standby_answer) {
      return HostFailed(h, standby,
                        absl::InternalError("the clients got no answer from the promoted host"));
    }
    double ms = Ms(*report->first_standby_answer - killed);
    first_answer.push_back(ms);
    auto auth = NumberAfter(*promoted, "authorised in ");
    auto res = NumberAfter(*promoted, " as the primary in ");
    if (auth) authorised.push_back(*auth);
    if (res) resumed.push_back(*res);
    bool ok = report->ok() && report->lost_acknowledged == 0 && through_proxy->ok() &&
              through_proxy->lost_acknowledged == 0;
    intact += ok ? 1 : 0;
    std::string reprotected;
    if (i + 1 < st.kills) {  // the killed host returns as the mirror of the new primary
      auto t0 = Clock::now();
      if (auto r = h.Rejoin(primary); !r.ok()) return r;
      auto line = h.process(standby).WaitForLine("protected: replicating", milliseconds(120000));
      if (!line.ok()) return HostFailed(h, standby, line.status());
      reprotect.push_back(Secs(Clock::now() - t0));
      reprotected = absl::StrFormat("; host %s rejoined, protected again after %.1f s",
                                    LocalHosts::Name(primary), reprotect.back());
    }
    Line(
        "kill %2lu/%lu: host %s killed; first answer from host %s after %.0f ms (promotion "
        "authorised %.0f ms after it began, replica resumed in %.1f ms); through the proxy the "
        "clients' longest wait %.1f ms; %lu requests, %s%s",
        static_cast<unsigned long>(i + 1), static_cast<unsigned long>(st.kills),
        LocalHosts::Name(primary), LocalHosts::Name(standby), ms, auth.value_or(-1),
        res.value_or(-1), proxied_wait.back(),
        static_cast<unsigned long>(report->requests + through_proxy->requests),
        ok ? "nothing lost" : Problems(report->ok() ? *through_proxy : *report), reprotected);
    primary = standby;
  }
  absl::Status stopped = h.Stop();
  // The host killed last was not brought back: its exit by SIGKILL is no failure to stop.
  if (stopped.message() == absl::StrCat(LocalHosts::Name(Other(primary)), " exited with 137")) {
    stopped = absl::OkStatus();
  }
  double bound = kHeartbeatTimeoutMs + kLeaseMs;
  double p50 = Quantile(first_answer, 0.5), p99 = Quantile(first_answer, 0.99);
  double d50 = Quantile(decision.by_lease_ms, 0.5), d99 = Quantile(decision.by_lease_ms, 0.99);
  Line(
      "failover, %d kills (-9) under load (%lu clients): kill -> first answer from the "
      "promoted mirror p50 %.0f ms, p99 %.0f ms, max %.0f ms; promotion authorised p50 %.0f ms "
      "after it began (on detection), replica resumed p50 %.1f ms; every acknowledged write "
      "kept in %d of %d",
      static_cast<int>(first_answer.size()), static_cast<unsigned long>(st.clients), p50, p99,
      Quantile(first_answer, 1.0), Quantile(authorised, 0.5), Quantile(resumed, 0.5), intact,
      static_cast<int>(first_answer.size()));
  double q50 = Quantile(proxied_wait, 0.5), q99 = Quantile(proxied_wait, 0.99);
  Line(
      "failover through the proxy (%lu more clients, given only its address): the clients' "
      "longest wait per kill p50 %.1f ms, p99 %.1f ms, max %.1f ms",
      static_cast<unsigned long>(st.clients), q50, q99, Quantile(proxied_wait, 1.0));
  Line(
      "  baseline: heartbeat timeout %.0f ms + lease %.0f ms = %.0f ms (what bounded detection "
      "and authorisation before takeovers): ratio p50 %.2f, p99 %.2f; through the proxy p50 "
      "%.2f, p99 %.2f",
      kHeartbeatTimeoutMs, kLeaseMs, bound, Ratio(p50, bound), Ratio(p99, bound), Ratio(q50, bound),
      Ratio(q99, bound));
  Line(
      "  baseline: failover decision measured in this run (same heartbeat and lease code, in "
      "one process, no VM; kill -> lease won by a takeover) p50 %.0f ms, p99 %.0f ms: ratio p50 "
      "%.2f, p99 "
      "%.2f; the rest (p50 %.0f ms) is promotion, resuming the VM and the clients reconnecting",
      d50, d99, Ratio(p50, d50), Ratio(p99, d99), p50 - d50);
  if (!reprotect.empty()) {
    Line(
        "  re-protection after each kill (rejoin -> new primary protected): p50 %.1f s, max "
        "%.1f s",
        Quantile(reprotect, 0.5), Quantile(reprotect, 1.0));
  }
  if (!stopped.ok()) Line("  stopping the hosts: %s", std::string(stopped.message()));
  return intact == static_cast<int>(first_answer.size())
             ? absl::OkStatus()
             : absl::DataLossError("a failover lost acknowledged writes (see above)");
}

absl::Status Migrations(const Settings& st, uint64_t memory_mib) {
  Scratch s;
  auto t_start = Clock::now();
  auto started = StartHosts(st, s, memory_mib);
  if (!started.ok()) return started.status();
  LocalHosts& h = **started;
  double startup_s = Secs(Clock::now() - t_start);
  std::vector<double> downtime, commit, pages, pause, longest_wait;
  std::vector<std::string> aborted;  // attempts that did not happen, and why
  int intact = 0;
  Host from = LocalHosts::kA;
  for (uint64_t i = 0; i < st.migrations; i++) {
    Host to = Other(from);
    // A migration hands the witness's lease over, so the primary must hold it. Under CPU
    // contention a renewal can come late and the lease lapse for a moment; a migration asked
    // then does not happen (the VM runs on where it was): wait for the lease, and try again.
    absl::StatusOr<romulus::pb::StatusReply> before;
    absl::StatusOr<cli::Migrated> migrated;
    absl::StatusOr<cli::LoadReport> report;
    for (int attempt = 0;; attempt++) {
      auto deadline = Clock::now() + std::chrono::seconds(10);
      while ((before = cli::QueryStatus(h.control_socket(from))).ok() && !before->lease_held() &&
             Clock::now() < deadline) {
        std::this_thread::sleep_for(milliseconds(20));
      }
      if (!before.ok()) return HostFailed(h, from, before.status());
      cli::LoadOptions o = h.Load(from);
      o.clients = st.clients;
      o.duration_s = 1.5;
      Clients clients(o);
      std::this_thread::sleep_for(milliseconds(500));  // mid-run, by design
      migrated = cli::RequestMigration(h.control_socket(from), milliseconds(30000));
      report = clients.Finish();
      if (migrated.ok() || attempt == 2 ||
          !absl::StrContains(migrated.status().message(), "the VM runs here again")) {
        break;
      }
      aborted.push_back(std::string(migrated.status().message()));
      Line("migration %lu/%lu, %s -> %s, attempt %d: %s", static_cast<unsigned long>(i + 1),
           static_cast<unsigned long>(st.migrations), LocalHosts::Name(from), LocalHosts::Name(to),
           attempt + 1, aborted.back());
    }
    if (!migrated.ok()) return HostFailed(h, from, migrated.status());
    if (!report.ok()) return report.status();
    // Protected again (the old primary is the new one's mirror) before the next migration.
    auto line = h.process(to).WaitForLine("protected: replicating", milliseconds(120000));
    if (!line.ok()) return HostFailed(h, to, line.status());
    downtime.push_back(migrated->downtime_ms);
    pause.push_back(before->pause_p50_ms());
    longest_wait.push_back(report->max_us / 1000);
    if (auto c = NumberAfter(migrated->line, "committed ")) commit.push_back(*c);
    // "handed over at epoch N (P pages in the last checkpoint)"
    if (size_t at = migrated->line.find(" pages in the last checkpoint"); at != std::string::npos) {
      size_t open = migrated->line.rfind('(', at);
      double p = 0;
      if (open != std::string::npos &&
          absl::SimpleAtod(migrated->line.substr(open + 1, at - open - 1), &p)) {
        pages.push_back(p);
      }
    }
    bool ok = report->ok() && report->lost_acknowledged == 0;
    intact += ok ? 1 : 0;
    if (st.verbose || !ok) {
      Line("migration %lu/%lu, %s -> %s: %s; clients: %s", static_cast<unsigned long>(i + 1),
           static_cast<unsigned long>(st.migrations), LocalHosts::Name(from), LocalHosts::Name(to),
           migrated->line, ok ? "nothing lost" : Problems(*report));
    }
    from = to;
  }
  absl::Status stopped = h.Stop();
  double d50 = Quantile(downtime, 0.5), p50 = Quantile(pause, 0.5);
  Line(
      "migration, %4lu MiB guest (workload %lu pages at %lu writes/s), %d migrations under load "
      "(%lu clients): downtime (paused here -> resumed there) p50 %.1f ms, p99 %.1f ms, max "
      "%.1f ms; last checkpoint committed p50 %.1f ms, p50 %.0f pages; clients' longest wait "
      "p50 %.1f ms; every acknowledged write kept in %d of %d",
      static_cast<unsigned long>(memory_mib), static_cast<unsigned long>(st.working_set),
      static_cast<unsigned long>(st.write_rate), static_cast<int>(downtime.size()),
      static_cast<unsigned long>(st.clients), d50, Quantile(downtime, 0.99),
      Quantile(downtime, 1.0), Quantile(commit, 0.5), Quantile(pages, 0.5),
      Quantile(longest_wait, 0.5), intact, static_cast<int>(downtime.size()));
  Line(
      "  baseline: the primary's own checkpoint pause just before, p50 %.2f ms: downtime ratio "
      "p50 %.1f (hosts up and protected in %.1f s; %d attempts did not happen and were "
      "repeated)",
      p50, Ratio(d50, p50), startup_s, static_cast<int>(aborted.size()));
  if (!stopped.ok()) Line("  stopping the hosts: %s", std::string(stopped.message()));
  return intact == static_cast<int>(downtime.size())
             ? absl::OkStatus()
             : absl::DataLossError("a migration lost acknowledged writes (see above)");
}

}  // namespace

int main(int argc, char** argv) {
  Settings st;
  std::string platform_name;
  // Leading positional arguments: PLATFORM (kvm, process or all) and KILLS, in either order.
  int first_option = 1;
  bool platform_given = false;
  for (; first_option < argc && argv[first_option][0] != '-'; first_option++) {
    std::string arg = argv[first_option];
    if (uint64_t n = 0; absl::SimpleAtoi(arg, &n)) {
      st.kills = n;
      continue;
    }
    if (platform_given) {
      std::fprintf(stderr, "romulus_switchover_bench: unexpected argument '%s'\n", arg.c_str());
      return 2;
    }
    platform_name = arg == "all" ? "" : arg;
    platform_given = true;
  }
  cli::Args args(
      "romulus_switchover_bench [PLATFORM|all] [KILLS] [options]",
      "Failover (kill -9 -> first answer) and planned-migration downtime with romulus processes\n"
      "on loopback, on every platform that can run VMs here or on PLATFORM (kvm or process).");
  args.Uint("kills", &st.kills, "failovers (kills of the primary) per platform; 0: none");
  args.Uint("migrations", &st.migrations, "planned migrations per guest size; 0: none");
  args.Uint("memory-mib", &st.memory_mib, "guest RAM for the failovers, MiB");
  args.Uint("working-set", &st.working_set, "pages the guest's memory workload writes over");
  args.Uint("write-rate", &st.write_rate, "the workload's page writes per second");
  args.Uint("clients", &st.clients, "concurrent ledger clients");
  args.String("binary", &st.binary, "the romulus executable");
  args.Bool("quick", &st.quick, "3 kills and 2 migrations at 256 MiB only, to check that it works");
  args.Bool("verbose", &st.verbose, "show every host's lines and every migration");
  if (auto s = args.Parse(argc - first_option, argv + first_option); !s.ok()) {
    std::fprintf(stderr, "romulus_switchover_bench: %s\n%s", std::string(s.message()).c_str(),
                 args.Help().c_str());
    return 2;
  }
  if (args.help()) {
    std::fputs(args.Help().c_str(), stdout);
    return 0;
  }
  std::vector<uint64_t> sizes = {256, 1024};
  if (st.quick) {
    st.kills = std::min<uint64_t>(st.kills, 3);
    st.migrations = std::min<uint64_t>(st.migrations, 2);
    sizes = {256};
  }
  std::vector<romulus::pb::Platform> platforms;
  if (platform_name.empty()) {
    platforms = vmm::AvailablePlatforms();
  } else {
    auto p = vmm::ParsePlatform(platform_name);
    if (!p.ok()) {
      std::fprintf(stderr, "romulus_switchover_bench: %s\n",
                   std::string(p.status().message()).c_str());
      return 2;
    }
    platforms = {*p};
  }
  if (platforms.empty()) {
    std::fprintf(stderr, "romulus_switchover_bench: no platform can run VMs here\n");
    return 1;
  }
  if (::access(st.binary.c_str(), X_OK) != 0) {
    std::fprintf(stderr, "romulus_switchover_bench: cannot run %s\n", st.binary.c_str());
    return 1;
  }

  std::printf("romulus_switchover_bench%s: %s; %s\n", st.quick ? " --quick" : "", st.binary.c_str(),
              romulus::bench::MachineLoad().c_str());
  romulus::bench::FailoverDecision decision;
  if (st.kills > 0) {
    romulus::bench::FailoverDecisionOptions d;
    d.kills = static_cast<int>(std::max<uint64_t>(st.kills, 20));
    d.alternate_fence = false;  // the hosts promote by the witness's lease
    auto measured = romulus::bench::MeasureFailoverDecision(d);
    if (!measured.ok()) {
      std::fprintf(stderr, "romulus_switchover_bench: failover decision: %s\n",
                   std::string(measured.status().message()).c_str());
      return 1;
    }
    decision = std::move(*measured);
    std::printf(
        "[baseline] failover decision in this process (heartbeats every %ld ms on 2 paths, dead "
        "after %ld ms; lease %ld ms renewed every %ld ms), %d kills: detection p50 %.1f ms p99 "
        "%.1f ms; lease won p50 %.1f ms p99 %.1f ms\n",
        static_cast<long>(d.interval.count()), static_cast<long>(d.timeout.count()),
        static_cast<long>(d.lease.count()), static_cast<long>(d.renew.count()), d.kills,
        Quantile(decision.detect_ms, 0.5), Quantile(decision.detect_ms, 0.99),
        Quantile(decision.by_lease_ms, 0.5), Quantile(decision.by_lease_ms, 0.99));
    std::fflush(stdout);
  }

  int failures = 0;
  auto run = [&](const char* what, const absl::Status& s) {
    if (s.ok()) return;
    failures++;
    std::printf("[%s] %s FAILED: %s\n", g_platform.c_str(), what, std::string(s.message()).c_str());
    std::fflush(stdout);
  };
  for (romulus::pb::Platform platform : platforms) {
    g_platform = std::string(vmm::PlatformName(platform));
    if (auto s = vmm::CheckPlatform(platform); !s.ok()) {
      run("platform check", s);
      continue;
    }
    auto t0 = Clock::now();
    if (st.kills > 0) {
      run("failover", Failovers(st, decision));
      Line("(failovers took %.0f s)", Secs(Clock::now() - t0));
    }
    for (uint64_t mib : sizes) {
      if (st.migrations == 0) break;
      auto t1 = Clock::now();
      run("migration", Migrations(st, mib));
      Line("(migrations at %lu MiB took %.0f s)", static_cast<unsigned long>(mib),
           Secs(Clock::now() - t1));
    }
  }
  return failures == 0 ? 0 : 1;
}
