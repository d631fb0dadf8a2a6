// romulus primary, romulus mirror and romulus demo.
#include <signal.h>
#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <thread>

#include "absl/strings/str_format.h"
#include "checkpoint/checkpoint.h"
#include "cli/args.h"
#include "cli/commands.h"
#include "cli/config.h"
#include "cli/control.h"
#include "cli/host.h"
#include "cli/load.h"
#include "cli/signals.h"
#include "replicator/replicator.h"
#include "vmm/journal.h"
#include "vmm/ledger_endpoint.h"
#include "vmm/vmm.h"

namespace romulus::cli {
namespace {

using Clock = std::chrono::steady_clock;

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(p * static_cast<double>(v.size())))];
}

// One status line from two successive samples `dt` seconds apart.
struct Rates {
  double epochs_per_s, mb_per_s, dirty_per_epoch, pause_p50, pause_p99;
};
Rates RatesBetween(const replicator::Primary::Stats& a, const replicator::Primary::Stats& b,
                   double dt) {
  Rates r{};
  uint64_t epochs = b.checkpoints - a.checkpoints;
  r.epochs_per_s = static_cast<double>(epochs) / dt;
  r.mb_per_s = static_cast<double>(b.bytes_sent - std::min(a.bytes_sent, b.bytes_sent)) / dt / 1e6;
  r.dirty_per_epoch =
      epochs ? static_cast<double>(b.dirty_pages - a.dirty_pages) / static_cast<double>(epochs) : 0;
  std::vector<double> recent(
      b.pause_ms.end() - std::min<size_t>(b.pause_ms.size(), std::max<uint64_t>(epochs, 1)),
      b.pause_ms.end());
  r.pause_p50 = Percentile(recent, 0.5);
  r.pause_p99 = Percentile(recent, 0.99);
  return r;
}

// "synchronising: 120.0/320.0 MiB (37%), 95.1 MB/s, ETA 2.1 s, round 1"
std::string SyncLine(const replicator::Primary::SyncProgress& p) {
  double rate = p.seconds > 0 ? static_cast<double>(p.done_bytes) / p.seconds : 0;
  double left = static_cast<double>(p.total_bytes - std::min(p.done_bytes, p.total_bytes));
  return absl::StrFormat(
      "synchronising: %.1f/%.1f MiB (%.0f%%), %.1f MB/s (%.1f MB on the wire), ETA %s, round %d",
      static_cast<double>(p.done_bytes) / (1 << 20), static_cast<double>(p.total_bytes) / (1 << 20),
      p.total_bytes ? 100.0 * static_cast<double>(p.done_bytes) / static_cast<double>(p.total_bytes)
                    : 0.0,
      rate / 1e6, static_cast<double>(p.wire_bytes) / 1e6,
      rate > 0 ? absl::StrFormat("%.1f s", left / rate) : std::string("?"), p.round);
}

std::string StatusLine(const replicator::Primary::Stats& s, const Rates& r) {
  if (s.sync.active) {
    return absl::StrFormat("%s | held outputs %d", SyncLine(s.sync), s.held_outputs);
  }
  if (!s.connected) return absl::StrFormat("%s | held outputs %d", s.state, s.held_outputs);
  return absl::StrFormat(
      "%s | %.0f epochs/s, pause p50 %.2f ms p99 %.2f ms, %.0f dirty pages/epoch, %.1f MB/s, "
      "held outputs %d, replica lag %d epochs",
      s.connected ? "protected" : "UNPROTECTED", r.epochs_per_s, r.pause_p50, r.pause_p99,
      r.dirty_per_epoch, r.mb_per_s, s.held_outputs, s.lag_epochs);
}

rml_pattern PatternOf(const std::string& p) {
  if (p == "sequential") return RML_PATTERN_SEQUENTIAL;
  if (p == "hotcold") return RML_PATTERN_HOTCOLD;
  return RML_PATTERN_UNIFORM;
}

pb::StatusReply PrimaryStatus(const std::string& vm_id, const replicator::Primary::Stats& s) {
  pb::StatusReply r;
  r.set_role("primary");
  r.set_vm_id(vm_id);
  r.set_state(s.state);
  r.set_peer_connected(s.connected || s.sync.active);
  r.set_peer(s.peer);
  r.set_epochs(s.checkpoints);
  r.set_committed_epoch(static_cast<int64_t>(s.acked) - 1);
  r.set_lag_epochs(s.lag_epochs);
  r.set_held_outputs(s.held_outputs);
  r.set_pause_p50_ms(Percentile(s.pause_ms, 0.5));
  r.set_pause_p99_ms(Percentile(s.pause_ms, 0.99));
  r.set_bytes(s.bytes_sent);
  r.set_resyncs(s.resyncs);
  if (s.sync.active) {
    pb::SyncStatus* y = r.mutable_sync();
    y->set_done_bytes(s.sync.done_bytes);
    y->set_total_bytes(s.sync.total_bytes);
    y->set_wire_bytes(s.sync.wire_bytes);
    y->set_round(s.sync.round);
    double rate = s.sync.seconds > 0 ? static_cast<double>(s.sync.done_bytes) / s.sync.seconds : 0;
    y->set_mb_per_s(rate / 1e6);
    y->set_eta_s(rate > 0 ? static_cast<double>(s.sync.total_bytes - s.sync.done_bytes) / rate : 0);
  }
  return r;
}

}  // namespace

int PrimaryCommand(int argc, char** argv) {
  std::string path;
  if (int rc =
          ConfigOnly("primary", "romulus primary --config FILE",
                     "Runs the reference guest and replicates it, every epoch, to the mirror "
                     "named in FILE.\nLedger answers leave only once the mirror has committed "
                     "their epoch (unless\nrun_unprotected is set and no mirror is connected). "
                     "With a `switchover` block it sends\nheartbeats on every path; with a "
                     "witness it starts the VM only once it holds the\nlease, and pauses the VM "
                     "and holds every output whenever the lease lapses.",
                     argc, argv, &path);
      rc >= 0) {
    return rc;
  }
  auto c = LoadPrimaryConfig(path);
  if (!c.ok()) return Fail("primary", c.status());
  auto key = replicator::ReadKeyFile(c->psk_file());
  if (!key.ok()) return Fail("primary", key.status());
  if (auto s = vmm::CheckKvm(); !s.ok()) return Fail("primary", s);
  sigset_t signals = TakeSignals();
  vmm::VmConfig vc;
  vc.memory_bytes = c->memory_mib() << 20;
  vc.disk_path = c->disk();
  vc.memory_path = c->memory_file();
  vc.workload.working_set_pages = c->workload().working_set_pages();
  vc.workload.write_rate = c->workload().write_rate();
  vc.workload.pattern = PatternOf(c->workload().pattern());
  vc.progress_ms = 0;
  vmm::OutputGate gate;  // ledger answers and console lines leave through it
  vc.output_gate = &gate;
  vc.console = [](absl::string_view line) {
    std::printf("romulus primary: guest: %.*s\n", static_cast<int>(line.size()), line.data());
    std::fflush(stdout);
  };
  if (auto s = vmm::ValidateVmConfig(vc); !s.ok()) return Fail("primary", s);
  struct stat st;
  if (::stat(vc.disk_path.c_str(), &st) != 0) {
    if (auto s = vmm::BlockDevice::CreateImage(vc.disk_path, c->disk_mib() << 20); !s.ok())
      return Fail("primary", s);
  }
  // With a witness, this host runs the VM only while it holds the lease: losing it (another
  // host may be promoted) pauses the VM and fences the outputs until it is regained.
  std::atomic<checkpoint::EpochEngine*> fenceable{nullptr};
  auto suspend = [&](bool on) {
    if (auto* e = fenceable.load(); e != nullptr) (void)e->Suspend(on);
  };
  auto ha = StartSwitchover(
      c->switchover(), c->vm_id(), "primary", *key,
      {.on_lease_gained = [&] { suspend(false); }, .on_lease_lost = [&] { suspend(true); }},
      Logger("primary"));
  if (!ha.ok()) return Fail("primary", ha.status());
  if (ha->lease) {
    if (auto s = ha->lease->AcquireWithin(std::chrono::milliseconds(3000)); !s.ok()) {
      return Fail("primary", absl::FailedPreconditionError(absl::StrCat(
                                 "not starting the VM without the lease: ", s.message())));
    }
  }
  auto vm = vmm::Vm::Boot(vc);
  if (!vm.ok()) return Fail("primary", vm.status());
  checkpoint::EpochEngine engine(**vm, gate, {.max_in_flight_bytes = c->max_in_flight_mib() << 20});
  auto endpoint =
      vmm::LedgerEndpoint::Start((*vm)->ledger(), gate, c->ledger_listen(),
                                 static_cast<uint16_t>(c->ledger_port()), Logger("primary"));
  if (!endpoint.ok()) return Fail("primary", endpoint.status());
  uint16_t ledger_port = (*endpoint)->port();  // a migration may close the endpoint early
  if (auto s = (*vm)->Start(); !s.ok()) return Fail("primary", s);
  fenceable = &engine;
  if (ha->lease && !ha->lease->held()) suspend(true);  // lost while the VM was being built
  std::string host = c->mirror().substr(0, c->mirror().rfind(':'));
  uint16_t port =
      static_cast<uint16_t>(std::atoi(c->mirror().c_str() + c->mirror().rfind(':') + 1));
  auto primary =
      replicator::Primary::Start(engine, gate,
                                 {.identity = {c->vm_id(), vc.memory_bytes, c->disk_mib() << 20},
                                  .key = *key,
                                  .mirror_host = host,
                                  .mirror_port = port,
                                  .epoch = std::chrono::milliseconds(c->epoch_ms()),
                                  .run_unprotected = c->run_unprotected(),
                                  .compression = *replicator::ParseCompression(c->compression()),
                                  .on_traffic = ha->TrafficHook(),
                                  .log = Logger("primary")});
  if (!primary.ok()) return Fail("primary", primary.status());
  // Planned migration. With a witness the lease goes to the mirror once it committed the last
  // checkpoint (this host then counts as fenced); if the mirror still refuses, it is taken back.
  auto migrate =
      [&, p = primary->get()](std::chrono::milliseconds timeout) -> absl::StatusOr<std::string> {
    bool transferred = false;
    auto report = p->HandOver(timeout, [&]() -> absl::Status {
      if (!ha->lease) return absl::OkStatus();
      std::string peer = ha->heartbeat ? ha->heartbeat->peer_node() : "";
      if (peer.empty()) {
        return absl::FailedPreconditionError(
            "the mirror's node name is unknown (no heartbeat heard): the lease cannot go to it");
      }
      auto s = ha->lease->TransferTo(peer, std::chrono::milliseconds(1000));
      transferred = s.ok();
      return s;
    });
    if (report.ok()) {
      // Clients still connected here would wait for a paused VM: closing the ledger sends
      // them to the mirror's address at once. (The main loop has stopped using it.)
      endpoint->reset();
      return absl::StrFormat(
          "handed over at epoch %u (%u pages in the last checkpoint): committed %.1f ms and "
          "resumed at the mirror %.1f ms after the VM paused here (downtime); the VM stays "
          "paused on this host",
          report->epoch, report->final_pages, report->commit_ms, report->downtime_ms);
    }
    if (transferred && report.status().code() == absl::StatusCode::kAborted) {
      ha->lease->Want(true);
      if (auto s = ha->lease->AcquireWithin(std::chrono::milliseconds(3000)); !s.ok()) {
        return absl::UnavailableError(
            absl::StrCat(report.status().message(), "; but the lease did not come back (",
                         s.message(), "): the VM stays paused here until it does"));
      }
    }
    return report.status();
  };
  auto control = MaybeControl(c->control_socket(), {.status =
                                                        [&, p = primary->get()] {
                                                          auto r =
                                                              PrimaryStatus(c->vm_id(), p->stats());
                                                          ha->AddStatus(&r);
                                                          return r;
                                                        },
                                                    .migrate = migrate});
  if (!control.ok()) return Fail("primary", control.status());
  std::printf("romulus primary: VM '%s' running, ledger on %s:%d, replicating to %s every %u ms\n",
              c->vm_id().c_str(), c->ledger_listen().c_str(), ledger_port, c->mirror().c_str(),
              c->epoch_ms());
  auto last = (*primary)->stats();
  auto t_last = Clock::now();
  for (;;) {
    int sig = WaitSignal(signals, std::chrono::milliseconds(1000));
    if (sig == SIGINT || sig == SIGTERM) break;
    if ((*vm)->exited()) break;
    auto now = (*primary)->stats();
    double dt = std::chrono::duration<double>(Clock::now() - t_last).count();
    std::printf("romulus primary: %s\n", StatusLine(now, RatesBetween(last, now, dt)).c_str());
    std::fflush(stdout);
    last = now;
    t_last = Clock::now();
  }
  control->reset();
  fenceable = nullptr;
  ha->lease.reset();  // joins the thread that suspends the engine (the heartbeats outlive the
                      // primary, which feeds them the mirror's acknowledgements)
  primary->reset();
  endpoint->reset();
  absl::Status s = (*vm)->Stop();
  if (!s.ok()) return Fail("primary", s);
  std::printf("romulus primary: stopped\n");
  return 0;
}

int DemoCommand(int argc, char** argv) {
  uint64_t seconds = 10, clients = 4, memory_mib = 256, ws = 4096, rate = 20000, epoch_ms = 25;
  bool json = false;
  std::string compression = "lz4";
  Args args("romulus demo [options]",
            "On this machine: a mirror, a primary running the reference guest with the ledger\n"
            "and a memory workload, and ledger clients, all on loopback. Shows live replication\n"
            "status, then a summary; finally the mirror's replica is saved and resumed as a VM,\n"
            "and its ledger is checked against every answer the clients received.");
  args.Uint("seconds", &seconds, "how long the clients run");
  args.Uint("clients", &clients, "concurrent ledger clients");
  args.Uint("memory-mib", &memory_mib, "guest memory in MiB");
  args.Uint("working-set", &ws, "pages the memory workload writes over");
  args.Uint("write-rate", &rate, "workload page writes per second");
  args.Uint("epoch-ms", &epoch_ms, "checkpoint epoch in milliseconds (5-1000)");
  args.String("compression", &compression, "page compression on the wire: none or lz4");
  args.Bool("json", &json, "print the summary as one JSON object");
  if (auto s = args.Parse(argc, argv); !s.ok()) return Fail("demo", s);
  auto comp = replicator::ParseCompression(compression);
  if (!comp.ok()) return Fail("demo", comp.status());
  if (args.help()) {
    std::fputs(args.Help().c_str(), stdout);
    return 0;
  }
  if (auto s = vmm::CheckKvm(); !s.ok()) return Fail("demo", s);
  auto say = [json](const std::string& line) {
    if (!json) {
      std::printf("romulus demo: %s\n", line.c_str());
      std::fflush(stdout);
    }
  };
  std::string dir =
      std::filesystem::temp_directory_path() / absl::StrFormat("romulus-demo-%d", ::getpid());
  std::filesystem::create_directories(dir);
  struct Cleanup {
    std::string dir;
    ~Cleanup() { std::filesystem::remove_all(dir); }
  } cleanup{dir};
  std::string key = "romulus-demo-key-" + std::to_string(::getpid());
  uint64_t disk_bytes = 64ull << 20;

  vmm::VmConfig vc;
  vc.memory_bytes = memory_mib << 20;
  vc.disk_path = dir + "/primary.img";
  vc.workload = {.working_set_pages = ws, .write_rate = rate};
  vc.progress_ms = 0;
  if (auto s = vmm::ValidateVmConfig(vc); !s.ok()) return Fail("demo", s);
  if (auto s = vmm::BlockDevice::CreateImage(vc.disk_path, disk_bytes); !s.ok())
    return Fail("demo", s);
  replicator::Identity id{"demo-vm", vc.memory_bytes, disk_bytes};
  auto replica =
      checkpoint::ReplicaStore::Create(vc.memory_bytes, dir + "/replica.img", disk_bytes);
  if (!replica.ok()) return Fail("demo", replica.status());
  auto quiet = json ? replicator::LogFn() : replicator::LogFn([](absl::string_view l) {
    std::printf("romulus demo:   %.*s\n", static_cast<int>(l.size()), l.data());
  });
  auto mirror = replicator::Mirror::Start(**replica, {.identity = id, .key = key, .log = quiet});
  if (!mirror.ok()) return Fail("demo", mirror.status());
  auto vm = vmm::Vm::Boot(vc);
  if (!vm.ok()) return Fail("demo", vm.status());
  vmm::OutputGate gate;
  checkpoint::EpochEngine engine(**vm, gate, {});
  auto endpoint = vmm::LedgerEndpoint::Start((*vm)->ledger(), gate, "127.0.0.1", 0, nullptr);
  if (!endpoint.ok()) return Fail("demo", endpoint.status());
  if (auto s = (*vm)->Start(); !s.ok()) return Fail("demo", s);
  say(
      absl::StrFormat("mirror on 127.0.0.1:%d; primary VM %d MiB, workload %d pages at %d "
                      "writes/s, ledger on 127.0.0.1:%d",
                      (*mirror)->port(), memory_mib, ws, rate, (*endpoint)->port()));
  auto primary = replicator::Primary::Start(engine, gate,
                                            {.identity = id,
                                             .key = key,
                                             .mirror_port = (*mirror)->port(),
                                             .epoch = std::chrono::milliseconds(epoch_ms),
                                             .compression = *comp,
                                             .log = quiet});
  if (!primary.ok()) return Fail("demo", primary.status());
  auto t0 = Clock::now(), shown = t0;
  while ((*mirror)->stats().committed_epoch < 0 && Clock::now() - t0 < std::chrono::seconds(60)) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));  // waiting for the initial sync
    if (Clock::now() - shown >= std::chrono::milliseconds(250)) {
      shown = Clock::now();
      auto st = (*primary)->stats();
      if (st.sync.active) say(SyncLine(st.sync));
    }
  }
  if ((*mirror)->stats().committed_epoch < 0)
    return Fail("demo", absl::DeadlineExceededError("no initial sync within 60 s"));
  double sync_s = std::chrono::duration<double>(Clock::now() - t0).count();
  auto sync = (*primary)->stats().sync;
  say(absl::StrFormat(
      "initial sync: %d MiB memory + %d MiB disk committed in %.2f s while the VM ran: %.1f MiB "
      "sent in %d rounds, %.1f MiB on the wire (%s), %d pages left for the final pause; "
      "protected",
      memory_mib, disk_bytes >> 20, sync_s, static_cast<double>(sync.done_bytes) / (1 << 20),
      sync.round + 1, static_cast<double>(sync.wire_bytes) / (1 << 20), compression,
      sync.final_pages));

  LoadOptions lo;
  lo.port = (*endpoint)->port();
  lo.clients = clients;
  lo.duration_s = static_cast<double>(seconds);
  absl::StatusOr<LoadReport> report;
  std::thread load([&] { report = RunLoad(lo); });
  auto first = (*primary)->stats();
  auto last = first;
  auto t_first = Clock::now(), t_last = t_first;
  std::vector<double> all_pauses;
  for (uint64_t i = 0; i < seconds; i++) {
    std::this_thread::sleep_for(std::chrono::seconds(1));  // one status line a second
    auto now = (*primary)->stats();
    double dt = std::chrono::duration<double>(Clock::now() - t_last).count();
    say(StatusLine(now, RatesBetween(last, now, dt)));
    last = now;
    t_last = Clock::now();
  }
  load.join();
  auto end = (*primary)->stats();
  Rates overall =
      RatesBetween(first, end, std::chrono::duration<double>(Clock::now() - t_first).count());
  if (!report.ok()) return Fail("demo", report.status());
  if (!json) std::fputs(FormatReport(*report).c_str(), stdout);

  // The replica, saved and resumed, holds every transaction any client saw acknowledged.
  primary->reset();
  rml_status primary_status = (*vm)->guest_status();
  endpoint->reset();
  (void)(*vm)->Stop();
  int64_t epoch = -1;
  absl::StatusOr<vmm::SnapshotInfo> saved;
  (*mirror)->WithReplica([&](checkpoint::ReplicaStore& r) {
    epoch = r.committed_epoch();
    saved = r.SaveSnapshot(dir + "/replica-snap");
  });
  if (!saved.ok()) return Fail("demo", saved.status());
  mirror->reset();
  auto resumed = vmm::Vm::Restore(dir + "/replica-snap", dir + "/resumed.img", nullptr);
  if (!resumed.ok()) return Fail("demo", resumed.status());
  auto journal = vmm::ReplayJournal(dir + "/resumed.img");
  uint64_t resumed_seq = (*resumed)->guest_status().ledger_seq;
  bool complete = resumed_seq >= report->last_seq && journal.ok() &&
                  journal->last_seq == (*resumed)->guest_status().journal_records;
  say(absl::StrFormat(
      "replica of epoch %d saved and resumed: ledger_seq %d (clients saw up to %d, "
      "primary reached %d), journal %d records: %s",
      epoch, resumed_seq, report->last_seq, primary_status.ledger_seq,
      journal.ok() ? journal->last_seq : 0,
      complete ? "every acknowledged transaction is there" : "TRANSACTIONS MISSING"));
  std::string summary = absl::StrFormat(
      "{\"seconds\":%d,\"initial_sync_s\":%.3f,\"initial_sync_wire_mib\":%.1f,\"epochs\":%d,"
      "\"epochs_per_s\":%.1f,"
      "\"pause_p50_ms\":%.3f,\"pause_p99_ms\":%.3f,\"dirty_pages_per_epoch\":%.0f,\"mb_per_s\":%."
      "2f,"
      "\"ledger_ops_per_s\":%.0f,\"latency_p50_us\":%.0f,\"latency_p99_us\":%.0f,"
      "\"invariants_hold\":%s,\"replica_epoch\":%d,\"replica_complete\":%s}",
      seconds, sync_s, static_cast<double>(sync.wire_bytes) / (1 << 20),
      end.checkpoints - first.checkpoints, overall.epochs_per_s, overall.pause_p50,
      overall.pause_p99, overall.dirty_per_epoch, overall.mb_per_s, report->ops_per_s,
      report->p50_us, report->p99_us, report->ok() ? "true" : "false", epoch,
      complete ? "true" : "false");
  if (json) {
    std::printf("%s\n", summary.c_str());
  } else {
    say(
        absl::StrFormat("summary: %d epochs (%.1f/s), pause p50 %.2f ms p99 %.2f ms, %.0f dirty "
                        "pages/epoch, %.1f MB/s replicated; ledger %.0f ops/s protected, latency "
                        "p50 %.0f us p99 %.0f us",
                        end.checkpoints - first.checkpoints, overall.epochs_per_s,
                        overall.pause_p50, overall.pause_p99, overall.dirty_per_epoch,
                        overall.mb_per_s, report->ops_per_s, report->p50_us, report->p99_us));
  }
  return report->ok() && complete ? 0 : 1;
}

}  // namespace romulus::cli
