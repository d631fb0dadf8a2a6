#include <cstdio>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "cli/args.h"
#include "cli/commands.h"
#include "cli/ledger_client.h"
#include "cli/load.h"
#include "vmm/journal.h"

namespace romulus::cli {

int LoadCommand(int argc, char** argv) {
  LoadOptions o;
  std::string target = "127.0.0.1:7070";
  std::string standby;
  uint64_t duration_ms = 5000;
  bool json = false;
  Args args("romulus load [options]",
            "Runs concurrent ledger clients against a ledger endpoint, then checks the ledger's\n"
            "invariants over the accounts this run opened. Exits 1 if any invariant fails.");
  args.String("target", &target, "ledger endpoint HOST:PORT");
  args.String("standby", &standby,
              "the mirror's ledger endpoint HOST:PORT: after a failure a client tries the other "
              "address with the same request id (failover; clients of a `romulus proxy` need "
              "not: it does that for them)");
  args.Uint("clients", &o.clients, "concurrent clients, one connection each (1-1024)");
  args.Uint("duration-ms", &duration_ms, "how long to run");
  args.Uint("rate", &o.rate, "requests per second over all clients (0: as fast as possible)");
  args.Uint("accounts", &o.accounts, "accounts to open and use (2-4096)");
  args.Uint("transfer-pct", &o.transfer_pct, "share of transfers (with the two below: 100)");
  args.Uint("deposit-pct", &o.deposit_pct, "share of deposits");
  args.Uint("read-pct", &o.read_pct, "share of reads");
  args.Uint("retry-pct", &o.retry_pct, "share of requests sent twice to check exactly-once");
  args.Uint("timeout-ms", &o.timeout_ms, "how long to wait for one answer before reconnecting");
  args.Uint("seed", &o.seed, "random seed (0: from the clock)");
  args.Bool("json", &json, "print the report as one JSON object");
  if (int rc = args.Prologue(argc, argv); rc >= 0) return rc;
  if (auto s = ParseHostPort(target, &o.host, &o.port); !s.ok()) {
    return args.UsageError(absl::StrCat("--target: ", s.message()));
  }
  if (!standby.empty()) {
    if (auto s = ParseHostPort(standby, &o.standby_host, &o.standby_port); !s.ok()) {
      return args.UsageError(absl::StrCat("--standby: ", s.message()));
    }
  }
  o.duration_s = static_cast<double>(duration_ms) / 1000.0;
  auto report = RunLoad(o);
  if (!report.ok()) {
    std::fprintf(stderr, "romulus load: %s\n", std::string(report.status().message()).c_str());
    return 1;
  }
  std::fputs(json ? (FormatReportJson(*report) + "\n").c_str() : FormatReport(*report).c_str(),
             stdout);
  return report->ok() ? 0 : 1;
}

int JournalCommand(int argc, char** argv) {
  std::string disk;
  Args args("romulus journal --disk PATH",
            "Replays the ledger journal on a disk image and prints its record count, last\n"
            "sequence number, account count and the sum of balances.");
  args.String("disk", &disk, "disk image");
  if (int rc = args.Prologue(argc, argv); rc >= 0) return rc;
  if (disk.empty()) return args.UsageError("--disk is required");
  auto j = vmm::ReplayJournal(disk);
  if (!j.ok()) {
    std::fprintf(stderr, "romulus journal: %s\n", std::string(j.status().message()).c_str());
    return 1;
  }
  int64_t sum = 0;
  for (int64_t b : j->balances) sum += b;
  std::printf("journal %016lx: %lu records, last seq %lu, %zu accounts, balances sum %ld\n",
              static_cast<unsigned long>(j->journal_id), static_cast<unsigned long>(j->records),
              static_cast<unsigned long>(j->last_seq), j->balances.size(), static_cast<long>(sum));
  return 0;
}

}  // namespace romulus::cli
