// romulus demo: a witness and two hosts of one protected VM, as `romulus` processes on this
// machine, and ledger clients going through a `romulus proxy`; the primary is killed under load,
// returns as the mirror, and the VM migrates back to it.
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <mutex>
#include <thread>

#include "absl/strings/ascii.h"
#include "absl/strings/str_format.h"
#include "cli/args.h"
#include "cli/commands.h"
#include "cli/control.h"
#include "cli/host.h"
#include "cli/load.h"
#include "cli/local_hosts.h"
#include "cli/timeline.h"
#include "guest/abi.h"
#include "replicator/replicator.h"
#include "vmm/journal.h"
#include "vmm/vmm.h"

namespace romulus::cli {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;
using Host = LocalHosts::Host;

double Ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }
double MiB(uint64_t bytes) { return static_cast<double>(bytes) / (1 << 20); }
// How long the demo's proxy holds a request before it answers that no primary did: far above a
// failover's few hundred milliseconds, so that a slow machine shows a long pause, not an error.
constexpr int64_t kProxyHoldMs = 20000;
// The answered requests each act keeps for --plot (16 bytes each): a 600 s act of 4 clients
// answers fewer at a few thousand a second.
constexpr uint64_t kPlotSamples = 1 << 22;

// Ledger clients run on a thread of their own while an act goes on.
class Clients {
 public:
  explicit Clients(LoadOptions o) : thread_([this, o] { report_ = RunLoad(o); }) {}
  ~Clients() {
    if (thread_.joinable()) thread_.join();
  }
  absl::StatusOr<LoadReport> Finish() {
    thread_.join();
    return report_;
  }

 private:
  absl::StatusOr<LoadReport> report_;
  std::thread thread_;
};

// Answers the proxy gave itself because no primary answered in time (or it could not read a
// frame), and reconnects: what the clients would have seen of a failover or a migration.
uint64_t ClientVisibleErrors(const LoadReport& r) {
  uint64_t n = r.reconnects;
  for (uint32_t status : {RML_ERR_UNAVAILABLE, RML_ERR_MALFORMED}) {
    if (auto it = r.by_status.find(status); it != r.by_status.end()) n += it->second;
  }
  return n;
}

// "acknowledged writes lost: 0; invariants hold (...)" or what went wrong.
std::string Verdict(const LoadReport& r) {
  if (r.ok() && ClientVisibleErrors(r) == 0) {
    return absl::StrFormat(
        "acknowledged writes lost: 0; %d requests, every balance is the newest write a client "
        "saw acknowledged, %d retries answered identically; no client saw an error or "
        "reconnected",
        r.requests, r.retries_checked);
  }
  if (r.ok()) {
    return absl::StrFormat(
        "acknowledged writes lost: 0, but the clients saw %d errors or reconnects",
        ClientVisibleErrors(r));
  }
  return absl::StrFormat(
      "acknowledged writes lost on %d accounts, %d requests unanswered, %d "
      "invariants violated (first: %s)",
      r.lost_acknowledged, r.unresolved, r.violations.size(),
      r.violations.empty() ? "none" : r.violations.front());
}

// Where --plot can write its file: checked before the demo starts, not a minute later.
absl::Status CheckWritable(const std::string& path) {
  std::error_code ec;
  std::filesystem::path p(path);
  bool exists = std::filesystem::exists(p, ec);
  std::string dir = p.parent_path().empty() ? "." : p.parent_path().string();
  const char* what = nullptr;
  if (exists && std::filesystem::is_directory(p, ec)) {
    what = "it is a directory";
  } else if (exists ? ::access(path.c_str(), W_OK) != 0 : ::access(dir.c_str(), W_OK) != 0) {
    what = std::strerror(errno);
  }
  if (what == nullptr) return absl::OkStatus();
  return absl::FailedPreconditionError(
      absl::StrCat("cannot write the timeline to ", path, ": ", what));
}

// "2026-12-07 20:55 UTC", now.
std::string UtcNow() {
  std::time_t now = std::time(nullptr);
  std::tm tm{};
  ::gmtime_r(&now, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M UTC", &tm);
  return buf;
}

}  // namespace

int DemoCommand(int argc, char** argv) {
  uint64_t seconds = 8, clients = 4, memory_mib = 256, ws = 4096, rate = 20000, epoch_ms = 25;
  bool json = false;
  std::string compression = "lz4", platform_name, plot;
  Args args(
      "romulus demo [options]",
      "On this machine, as `romulus` processes on loopback: a witness, and two hosts of one\n"
      "protected VM with heartbeats on two paths. Host a runs the reference guest (the ledger\n"
      "and a memory workload) and replicates it to host b; ledger clients know only the\n"
      "address of a `romulus proxy`, which forwards to whichever host is the primary.\n"
      "  act 1, failover: host a is killed (-9) under load; host b takes the witness's lease\n"
      "    and resumes the VM; the proxy holds and resends the clients' requests there, and\n"
      "    their answers are checked against its ledger.\n"
      "  act 2, re-protection: host a returns as the mirror, seeded from the memory and disk\n"
      "    it was killed with, and receives only what differs.\n"
      "  act 3, planned migration: `romulus migrate` moves the VM back to host a under load.\n"
      "Each process's own log lines are shown, prefixed [a], [b], [proxy] and [witness].");
  args.Uint("seconds", &seconds, "how long the clients run in acts 1 and 3 (2-600)");
  args.Uint("clients", &clients, "concurrent ledger clients (1-1024)");
  args.Uint("memory-mib", &memory_mib, "guest memory in MiB");
  args.Uint("working-set", &ws, "pages the memory workload writes over");
  args.Uint("write-rate", &rate, "workload page writes per second");
  args.Uint("epoch-ms", &epoch_ms, "checkpoint epoch in milliseconds (5-1000)");
  args.String("compression", &compression, "page compression on the wire: none or lz4");
  args.String("platform", &platform_name,
              "kvm or process (default: kvm where /dev/kvm can run VMs, else process)");
  args.Bool("json", &json, "print only a summary, as one JSON object");
  args.String("plot", &plot,
              "also draw the clients' latency over the acts, the kill, promotion, "
              "re-protection and migration marked, in this SVG file");
  if (int rc = args.Prologue(argc, argv); rc >= 0) return rc;
  if (auto comp = replicator::ParseCompression(compression); !comp.ok()) {
    return args.UsageError(comp.status().message());
  }
  if (seconds < 2 || seconds > 600) {
    return args.UsageError("--seconds must be 2 to 600");
  }
  if (clients < 1 || clients > 1024) {
    return args.UsageError("--clients must be 1 to 1024");
  }
  if (epoch_ms < 5 || epoch_ms > 1000) {
    return args.UsageError("--epoch-ms must be 5 to 1000");
  }
  vmm::VmConfig vc;  // checked here, so that a bad size fails before any process starts
  vc.memory_bytes = memory_mib << 20;
  vc.workload = {.working_set_pages = ws, .write_rate = rate};
  if (auto s = vmm::ValidateVmConfig(vc); !s.ok()) return args.UsageError(s.message());
  auto requested = vmm::ParsePlatform(platform_name);
  if (!requested.ok()) return Fail("demo", requested.status());
  auto platform = vmm::ChoosePlatform(*requested);
  if (!platform.ok()) return Fail("demo", platform.status());
  const std::string platform_str(vmm::PlatformName(*platform));
  if (!plot.empty()) {
    if (auto s = CheckWritable(plot); !s.ok()) return Fail("demo", s);
  }
  const std::string started_utc = UtcNow();
  std::error_code ec;
  std::string binary = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (ec) return Fail("demo", absl::InternalError("cannot find this program: " + ec.message()));

  std::mutex out_mu;  // the hosts' lines arrive on their reader threads
  auto print = [&](const std::string& line) {
    if (json) return;
    std::lock_guard<std::mutex> lock(out_mu);
    std::printf("%s\n", line.c_str());
    std::fflush(stdout);
  };
  auto say = [&](const std::string& line) { print("romulus demo: " + line); };

  std::string dir =
      std::filesystem::temp_directory_path() / absl::StrFormat("romulus-demo-%d", ::getpid());
  std::filesystem::create_directories(dir);
  struct Cleanup {
    std::string dir;
    ~Cleanup() { std::filesystem::remove_all(dir); }
  } cleanup{dir};  // declared first: the processes are gone before their files are
  const uint64_t disk_mib = 64;
  say(absl::StrFormat(
      "platform %s: starting a witness, host a (the primary: a %d MiB VM with a %d MiB disk, "
      "workload %d pages at %d writes/s) and host b (its mirror), all on loopback",
      platform_str, memory_mib, disk_mib, ws, rate));
  auto t0 = Clock::now();
  auto hosts = LocalHosts::Start(
      {.binary = binary,
       .dir = dir,
       .memory_mib = memory_mib,
       .disk_mib = disk_mib,
       .working_set_pages = ws,
       .write_rate = rate,
       .epoch_ms = static_cast<uint32_t>(epoch_ms),
       .compression = compression,
       .platform = platform_str,
       .echo = [&](absl::string_view l) { print(absl::StrCat("romulus demo:   ", l)); },
       .proxy_hold = milliseconds(kProxyHoldMs)});
  if (!hosts.ok()) return Fail("demo", hosts.status());
  LocalHosts& h = **hosts;
  auto status = [&](Host host) { return QueryStatus(h.control_socket(host)); };
  auto first = status(Host::kA);
  if (!first.ok()) return Fail("demo", first.status());
  const pb::SyncStatus& sync = first->last_sync();
  say(absl::StrFormat(
      "protected %.1f s after starting: the first synchronisation sent %.1f MiB of memory and "
      "disk while the VM ran, %.1f MiB on the wire (%s)",
      std::chrono::duration<double>(Clock::now() - t0).count(), MiB(sync.done_bytes()),
      MiB(sync.wire_bytes()), compression));
  auto half = std::chrono::duration_cast<Clock::duration>(
      std::chrono::duration<double>(static_cast<double>(seconds) / 2));

  // Act 1: failover.
  say(absl::StrFormat(
      "act 1, failover: %d ledger clients through the proxy (127.0.0.1:%d, in front of host a's "
      "ledger 127.0.0.1:%d and host b's 127.0.0.1:%d) for %d s; host a is killed (-9) halfway",
      clients, h.proxy_port(), h.ledger_port(Host::kA), h.ledger_port(Host::kB), seconds));
  LoadOptions load = h.LoadThroughProxy();
  load.clients = clients;
  load.duration_s = static_cast<double>(seconds);
  load.max_samples = plot.empty() ? 0 : kPlotSamples;
  auto act1_start = Clock::now();  // the timeline's origin
  Clients act1(load);
  std::this_thread::sleep_for(half);  // the moment of the kill, by design
  auto before_kill = status(Host::kA);
  if (!before_kill.ok()) return Fail("demo", before_kill.status());
  auto killed = Clock::now();
  h.process(Host::kA).Signal(SIGKILL);
  say("host a killed (-9)");
  auto promoted = h.process(Host::kB).WaitForLine("promoted (", milliseconds(30000));
  // The proxy found host b's ledger open: from then on the held requests go there.
  auto found = h.proxy()->WaitForLine(absl::StrCat("primary: 127.0.0.1:", h.ledger_port(Host::kB)),
                                      milliseconds(30000));
  double failover_ms = found.ok() ? Ms(Clock::now() - killed) : -1;
  auto report1 = act1.Finish();
  auto act1_end = Clock::now();
  if (!promoted.ok()) return Fail("demo", promoted.status());
  if (!found.ok()) return Fail("demo", found.status());
  if (!report1.ok()) return Fail("demo", report1.status());
  print(std::string(absl::StripTrailingAsciiWhitespace(FormatReport(*report1))));
  say(absl::StrFormat(
      "failover: host b resumed the VM; the proxy sent the held requests there %.0f ms after "
      "the kill (the clients' longest wait %.1f ms); %s",
      failover_ms, report1->max_us / 1000, Verdict(*report1)));

  // Act 2: re-protection.
  say("act 2, re-protection: host a returns as the mirror, seeded from its memory file and disk");
  auto t_rejoin = Clock::now();
  if (auto s = h.Rejoin(Host::kA); !s.ok()) return Fail("demo", s);
  if (auto l = h.process(Host::kB).WaitForLine("protected: replicating", milliseconds(120000));
      !l.ok()) {
    return Fail("demo", l.status());
  }
  auto resync = status(Host::kB);
  if (!resync.ok()) return Fail("demo", resync.status());
  const pb::SyncStatus& again = resync->last_sync();
  auto reprotected = Clock::now();
  double reprotect_s = std::chrono::duration<double>(reprotected - t_rejoin).count();
  say(absl::StrFormat(
      "protected again %.2f s after host a started: %.1f MiB on the wire for %.1f MiB of memory "
      "and disk (%.1f MiB already at host a; a full copy sent %.1f MiB)",
      reprotect_s, MiB(again.wire_bytes()), MiB(again.done_bytes()), MiB(again.unchanged_bytes()),
      MiB(sync.wire_bytes())));

  // Act 3: planned migration back.
  say(absl::StrFormat(
      "act 3, planned migration: %d clients through the proxy (now forwarding to host b) for %d "
      "s; halfway, romulus migrate --socket %s",
      clients, seconds, h.control_socket(Host::kB)));
  load = h.LoadThroughProxy();
  load.clients = clients;
  load.duration_s = static_cast<double>(seconds);
  load.max_samples = plot.empty() ? 0 : kPlotSamples;
  auto act3_start = Clock::now();
  Clients act3(load);
  std::this_thread::sleep_for(half);  // the moment of the migration, by design
  auto before_migration = status(Host::kB);
  if (!before_migration.ok()) return Fail("demo", before_migration.status());
  auto migrated = RequestMigration(h.control_socket(Host::kB), milliseconds(10000));
  auto handed_over = Clock::now();
  auto report3 = act3.Finish();
  auto act3_end = Clock::now();
  if (!migrated.ok()) return Fail("demo", migrated.status());
  if (!report3.ok()) return Fail("demo", report3.status());
  say("host b: " + migrated->line);
  auto back = h.process(Host::kA).WaitForLine("protected: replicating", milliseconds(120000));
  if (!back.ok()) return Fail("demo", back.status());
  print(std::string(absl::StripTrailingAsciiWhitespace(FormatReport(*report3))));
  say(absl::StrFormat(
      "migrated back: downtime %.1f ms (the clients' longest wait %.1f ms); host a is the "
      "primary again and host b its mirror; %s",
      migrated->downtime_ms, report3->max_us / 1000, Verdict(*report3)));

  // Every answer a client saw left only once its epoch, journal writes included, was committed
  // at the mirror: the mirror's disk holds the journal of every one of them.
  auto stopped = h.Stop();
  if (!stopped.ok()) say(absl::StrCat("stopping: ", stopped.message()));
  auto journal = vmm::ReplayJournal(h.disk(Host::kB));
  bool journal_ok = journal.ok() && journal->last_seq >= report3->last_seq;
  say(absl::StrFormat("host b's replica disk after stopping: %s; the clients saw up to seq %d: %s",
                      journal.ok() ? absl::StrFormat("a journal of %d records up to seq %d",
                                                     journal->records, journal->last_seq)
                                   : std::string(journal.status().message()),
                      report3->last_seq,
                      journal_ok ? "every acknowledged transaction is on the mirror's disk"
                                 : "TRANSACTIONS MISSING"));
  bool ok = report1->ok() && report3->ok() && ClientVisibleErrors(*report1) == 0 &&
            ClientVisibleErrors(*report3) == 0 && stopped.ok() && journal_ok;
  // Epochs committed and pause times: host a's until it was killed, host b's until it handed
  // the VM back.
  int64_t epochs = std::max<int64_t>(before_kill->committed_epoch() + 1, 0) +
                   std::max<int64_t>(before_migration->committed_epoch() + 1, 0);
  std::string summary = absl::StrFormat(
      "{\"platform\":\"%s\",\"epochs_committed\":%d,\"pause_p50_ms\":%.3f,"
      "\"pause_p99_ms\":%.3f,\"initial_sync_wire_mib\":%.1f,\"failover_ms\":%.1f,"
      "\"failover_longest_wait_ms\":%.1f,\"client_visible_errors\":%d,"
      "\"lost_acknowledged\":%d,\"act1\":%s,\"reprotect_s\":%.3f,\"reprotect_wire_mib\":%.1f,"
      "\"reprotect_memory_and_disk_mib\":%.1f,\"reprotect_unchanged_mib\":%.1f,"
      "\"migration_downtime_ms\":%.1f,\"clients_longest_wait_ms\":%.1f,\"act3\":%s,"
      "\"replica_journal_seq\":%d,\"ok\":%s}",
      platform_str, epochs, before_migration->pause_p50_ms(), before_migration->pause_p99_ms(),
      MiB(sync.wire_bytes()), failover_ms, report1->max_us / 1000,
      ClientVisibleErrors(*report1) + ClientVisibleErrors(*report3),
      report1->lost_acknowledged + report3->lost_acknowledged, FormatReportJson(*report1),
      reprotect_s, MiB(again.wire_bytes()), MiB(again.done_bytes()), MiB(again.unchanged_bytes()),
      migrated->downtime_ms, report3->max_us / 1000, FormatReportJson(*report3),
      journal.ok() ? journal->last_seq : 0, ok ? "true" : "false");
  if (!plot.empty()) {
    auto at = [&](Clock::time_point t) {
      return std::chrono::duration<double>(t - act1_start).count();
    };
    Timeline t;
    t.title = absl::StrFormat(
        "romulus demo, platform %s, %s: the ledger clients' latency through the proxy",
        platform_str, started_utc);
    t.x_label = "time the request was sent (s since act 1's clients started)";
    for (const LoadReport* r : {&*report1, &*report3}) {
      for (const LoadSample& s : r->samples) t.points.push_back({at(s.sent), s.latency_us / 1000});
      t.points_dropped += r->samples_dropped;
    }
    t.spans = {{at(act1_start), at(act1_end), "act 1: failover"},
               {at(t_rejoin), at(reprotected), "act 2: re-protection (no load)"},
               {at(act3_start), at(act3_end), "act 3: planned migration"}};
    t.events = {{at(killed), "host a killed (-9)"},
                {at(killed) + failover_ms / 1000,
                 absl::StrFormat("host b promoted: the proxy switched to it %.0f ms after the kill",
                                 failover_ms)},
                {at(reprotected),
                 absl::StrFormat("host a protected again, %.2f s after it started", reprotect_s)},
                {at(handed_over), absl::StrFormat("VM migrated back to host a: downtime %.1f ms",
                                                  migrated->downtime_ms)}};
    if (auto s = WriteTimelineSvg(t, plot); !s.ok()) return Fail("demo", s);
    say(absl::StrFormat("timeline written to %s", plot));
  }
  if (json) {
    std::printf("%s\n", summary.c_str());
  } else {
    say(absl::StrFormat(
        "summary (platform %s): %d epochs committed, pause p50 %.2f ms p99 %.2f ms; failover %.0f "
        "ms to the proxy's switch (clients' longest wait %.1f ms), lost acknowledged writes %d; "
        "re-protection %.1f MiB on the wire of %.1f MiB; migration downtime %.1f ms (clients' "
        "longest wait %.1f ms), lost %d; errors the clients saw %d; %s",
        platform_str, epochs, before_migration->pause_p50_ms(), before_migration->pause_p99_ms(),
        failover_ms, report1->max_us / 1000, report1->lost_acknowledged, MiB(again.wire_bytes()),
        MiB(again.done_bytes()), migrated->downtime_ms, report3->max_us / 1000,
        report3->lost_acknowledged, ClientVisibleErrors(*report1) + ClientVisibleErrors(*report3),
        ok ? "every check passed" : "CHECKS FAILED"));
  }
  return ok ? 0 : 1;
}

}  // namespace romulus::cli
