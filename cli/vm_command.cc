#include <signal.h>
#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <ctime>

#include "absl/strings/str_format.h"
#include "cli/args.h"
#include "cli/commands.h"
#include "cli/signals.h"
#include "vmm/ledger_endpoint.h"
#include "vmm/vmm.h"

namespace romulus::cli {
namespace {

void Say(const std::string& line) {
  std::fprintf(stdout, "romulus vm: %s\n", line.c_str());
  std::fflush(stdout);
}

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "romulus vm: %s\n", std::string(s.message()).c_str());
  return 1;
}

std::string StatusLine(const rml_status& g) {
  return absl::StrFormat(
      "workload_pages=%d ledger_seq=%d journal_records=%d accounts=%d requests=%d",
      g.workload_pages, g.ledger_seq, g.journal_records, g.accounts_open, g.ledger_requests);
}

}  // namespace

int VmCommand(int argc, char** argv) {
  vmm::VmConfig config;
  std::string disk = "romulus-disk.img", pattern = "uniform", listen = "127.0.0.1";
  std::string snapshot_to, restore_from, platform_name;
  uint64_t disk_size = 64ull << 20, port = 7070, accounts = config.max_accounts;
  double snapshot_after = 0, run_for = 0;
  bool quiet = false;
  config.workload.working_set_pages = 4096;
  config.workload.write_rate = 20000;
  Args args("romulus vm [options]",
            "Runs the reference guest (on KVM where /dev/kvm can run VMs, else on the process\n"
            "platform): a memory workload and the ledger service, reached over TCP. With "
            "--snapshot-to it writes a snapshot (on SIGUSR1, or after\n"
            "--snapshot-after seconds) and exits; --restore-from resumes such a snapshot in a new\n"
            "process. SIGINT/SIGTERM stop it.");
  args.String("platform", &platform_name,
              "kvm or process (default: kvm where /dev/kvm can run VMs, else process); a "
              "restored snapshot runs on the platform that wrote it");
  args.Size("memory", &config.memory_bytes, "guest RAM, 16M to 4G in 2M steps");
  args.String("disk", &disk,
              "disk image (created with --disk-size when missing; on restore, overwritten with the "
              "snapshot's disk)");
  args.Size("disk-size", &disk_size, "size of a newly created disk image");
  args.Uint("working-set", &config.workload.working_set_pages,
            "pages the memory workload writes over (0: off)");
  args.Uint("write-rate", &config.workload.write_rate,
            "workload page writes per second (0: as fast as possible)");
  args.Uint("write-limit", &config.workload.write_limit,
            "stop the workload after this many writes (0: never)");
  args.String("pattern", &pattern,
              "workload pattern: sequential, uniform or hotcold (90% of writes to 10% of pages)");
  args.Uint("seed", &config.workload.seed, "workload random seed");
  args.Uint("accounts", &accounts, "most ledger accounts the guest will open (1-65536)");
  args.String("listen", &listen, "address of the ledger endpoint");
  args.Uint("ledger-port", &port, "TCP port of the ledger endpoint (0: any free port)");
  args.Uint("progress-ms", &config.progress_ms, "guest console progress interval (0: none)");
  args.Bool("quiet", &quiet, "do not print the guest console");
  args.String("guest-image", &config.guest_image_path,
              "guest image to run instead of the built-in reference guest");
  args.String("snapshot-to", &snapshot_to, "snapshot directory to write, then exit");
  args.Seconds("snapshot-after", &snapshot_after,
               "write the snapshot after this many seconds (0: only on SIGUSR1)");
  args.String("restore-from", &restore_from, "snapshot directory to resume instead of booting");
  args.Seconds("run-for", &run_for, "stop after this many seconds (0: run until a signal)");
  if (int rc = args.Prologue(argc, argv); rc >= 0) return rc;
  if (pattern == "sequential")
    config.workload.pattern = RML_PATTERN_SEQUENTIAL;
  else if (pattern == "uniform")
    config.workload.pattern = RML_PATTERN_UNIFORM;
  else if (pattern == "hotcold")
    config.workload.pattern = RML_PATTERN_HOTCOLD;
  else
    return args.UsageError("--pattern must be sequential, uniform or hotcold");
  if (port > 65535) return args.UsageError("--ledger-port must be at most 65535");
  config.max_accounts = static_cast<uint32_t>(std::min<uint64_t>(accounts, UINT32_MAX));
  if (auto s = vmm::ValidateVmConfig(config); !s.ok()) return args.UsageError(s.message());
  if (snapshot_after > 0 && snapshot_to.empty()) {
    return args.UsageError("--snapshot-after needs --snapshot-to");
  }
  auto requested = vmm::ParsePlatform(platform_name);
  if (!requested.ok()) return args.UsageError(requested.status().message());
  auto platform = vmm::ChoosePlatform(*requested);
  if (!platform.ok()) return Fail(platform.status());
  config.platform = *platform;

  sigset_t signals = TakeSignals();

  auto console = [quiet](absl::string_view line) {
    if (!quiet) {
      std::fprintf(stdout, "guest: %.*s\n", static_cast<int>(line.size()), line.data());
      std::fflush(stdout);
    }
  };
  config.console = console;
  config.disk_path = disk;
  absl::StatusOr<std::unique_ptr<vmm::Vm>> vm;
  if (!restore_from.empty()) {
    vm = vmm::Vm::Restore(restore_from, disk, console);
    if (!vm.ok()) return Fail(vm.status());
    Say(absl::StrFormat("platform %s: restored %s memory_xxh3=%016x %s",
                        vmm::PlatformName((*vm)->platform()), restore_from,
                        (*vm)->memory().Digest(), StatusLine((*vm)->guest_status())));
  } else {
    Say(absl::StrFormat("platform %s", vmm::PlatformName(config.platform)));
    struct stat st;
    if (::stat(disk.c_str(), &st) != 0) {
      if (auto s = vmm::BlockDevice::CreateImage(disk, disk_size); !s.ok()) return Fail(s);
      Say(absl::StrFormat("created disk image %s (%d MiB)", disk, disk_size >> 20));
    }
    vm = vmm::Vm::Boot(config);
    if (!vm.ok()) return Fail(vm.status());
    Say(absl::StrFormat(
        "booted the reference guest: %d MiB RAM, disk %s, workload %d pages at %d writes/s (%s)",
        config.memory_bytes >> 20, disk, config.workload.working_set_pages,
        config.workload.write_rate, pattern));
  }
  vmm::OutputGate gate;  // open: nothing holds outputs until replication arrives
  auto endpoint =
      vmm::LedgerEndpoint::Start((*vm)->ledger(), gate, listen, static_cast<uint16_t>(port),
                                 [](absl::string_view line) { Say(std::string(line)); });
  if (!endpoint.ok()) return Fail(endpoint.status());
  Say(absl::StrFormat("ledger listening on %s:%d", listen, (*endpoint)->port()));
  if (auto s = (*vm)->Start(); !s.ok()) return Fail(s);

  using Clock = std::chrono::steady_clock;
  auto start = Clock::now();
  auto at = [&](double seconds) {
    return start +
           std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
  };
  bool snapshot_now = false;
  for (;;) {
    int sig = WaitSignal(signals, std::chrono::milliseconds(50));
    if (sig == SIGINT || sig == SIGTERM) break;
    if (sig == SIGUSR1) {
      if (snapshot_to.empty())
        Say("SIGUSR1 ignored: no --snapshot-to directory");
      else
        snapshot_now = true;
    }
    if (snapshot_after > 0 && Clock::now() >= at(snapshot_after)) snapshot_now = true;
    if (run_for > 0 && Clock::now() >= at(run_for)) break;
    if (snapshot_now) {
      auto t0 = Clock::now();
      if (auto s = (*vm)->Pause(); !s.ok()) return Fail(s);
      auto info = (*vm)->SaveSnapshot(snapshot_to);
      if (!info.ok()) return Fail(info.status());
      double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
      Say(absl::StrFormat("snapshot %s memory_xxh3=%016x disk_xxh3=%016x %s took_ms=%.1f",
                          snapshot_to, info->memory_xxh3, info->disk_xxh3, StatusLine(info->guest),
                          ms));
      (void)(*vm)->Stop();
      return 0;
    }
    if ((*vm)->exited()) break;
  }
  absl::Status result = (*vm)->Stop();
  if (!result.ok()) return Fail(result);
  Say("stopped: " + StatusLine((*vm)->guest_status()));
  return 0;
}

}  // namespace romulus::cli
