// romulus: high availability for virtual machines by continuous checkpointing.
#include <cstdio>
#include <cstring>

#include "cli/commands.h"
#include "cli/config_help.h"
#include "cli/control.h"

namespace {

constexpr char kUsage[] =
    "usage: romulus COMMAND [options]   (romulus COMMAND --help for its options)\n"
    "\n"
    "commands:\n"
    "  demo     a mirror, a replicated primary and ledger clients on this machine, with live\n"
    "           status; then the replica is resumed and checked (the README's main command)\n"
    "  primary  run the VM and replicate it to a mirror (--config FILE)\n"
    "  mirror   hold the replica of a primary's VM (--config FILE)\n"
    "  vm       run the reference guest under the monitor (ledger service, memory workload),\n"
    "           snapshot it to a directory or resume it from one\n"
    "  load     drive a ledger with concurrent clients; report ops/s and latency; check\n"
    "           its invariants (sum of balances, exactly-once retries, sequence numbers)\n"
    "  status   ask a running primary or mirror for its status (--socket PATH)\n"
    "  promote  make a mirror resume its replica as the primary (--socket PATH [--force])\n"
    "  migrate  hand a primary's VM over to its mirror (--socket PATH)\n"
    "  proxy    one ledger address for a VM's clients: forwards to the primary, holds\n"
    "           requests through a failover or a migration (--config FILE)\n"
    "  witness  grant the active lease of VMs to one host at a time (a third host)\n"
    "  journal  replay the ledger journal on a disk image and print what it holds\n"
    "  help     this list; `romulus help config`: every config field, its default and unit\n"
    "           (`--markdown`: the same as docs/configuration.md)\n";

}  // namespace

int main(int argc, char** argv) {
  if (argc >= 3 && !std::strcmp(argv[1], "help")) {
    if (!std::strcmp(argv[2], "config")) {
      if (argc == 3) {
        std::fputs(romulus::cli::ConfigHelp().c_str(), stdout);
        return 0;
      }
      if (argc == 4 && !std::strcmp(argv[3], "--markdown")) {
        std::fputs(romulus::cli::ConfigHelpMarkdown().c_str(), stdout);
        return 0;
      }
      std::fprintf(stderr, "usage: romulus help config [--markdown]\n");
      return 2;
    }
    std::fprintf(stderr,
                 "romulus help: no topic '%s' (topics: config; or romulus COMMAND --help)\n",
                 argv[2]);
    return 2;
  }
  if (argc < 2 || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h") ||
      !std::strcmp(argv[1], "help")) {
    std::fputs(kUsage, argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  const char* cmd = argv[1];
  if (!std::strcmp(cmd, "vm")) return romulus::cli::VmCommand(argc - 2, argv + 2);
  if (!std::strcmp(cmd, "load")) return romulus::cli::LoadCommand(argc - 2, argv + 2);
  if (!std::strcmp(cmd, "demo")) return romulus::cli::DemoCommand(argc - 2, argv + 2);
  if (!std::strcmp(cmd, "primary")) return romulus::cli::PrimaryCommand(argc - 2, argv + 2);
  if (!std::strcmp(cmd, "mirror")) return romulus::cli::MirrorCommand(argc - 2, argv + 2);
  if (!std::strcmp(cmd, "status")) return romulus::cli::StatusCommand(argc - 2, argv + 2);
  if (!std::strcmp(cmd, "promote")) return romulus::cli::PromoteCommand(argc - 2, argv + 2);
  if (!std::strcmp(cmd, "migrate")) return romulus::cli::MigrateCommand(argc - 2, argv + 2);
  if (!std::strcmp(cmd, "proxy")) return romulus::cli::ProxyCommand(argc - 2, argv + 2);
  if (!std::strcmp(cmd, "witness")) return romulus::cli::WitnessCommand(argc - 2, argv + 2);
  if (!std::strcmp(cmd, "journal")) return romulus::cli::JournalCommand(argc - 2, argv + 2);
  std::fprintf(stderr, "romulus: unknown command '%s'\n%s", cmd, kUsage);
  return 2;
}
