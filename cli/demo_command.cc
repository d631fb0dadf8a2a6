// romulus demo: a mirror, a primary and ledger clients on this machine.
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

}  // namespace

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
