// romulus_nemesis: the nemesis (nemesis.h) as a program. It runs its cluster in a network
// namespace of its own, where its nftables rules cut paths between the processes and affect
// nothing else on this machine; it prints the schedule, a table of rounds and one summary line,
// and exits 1 when any round broke an invariant.
#include <sched.h>
#include <sys/mount.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "cli/args.h"
#include "nemesis/nemesis.h"
#include "vmm/vmm.h"

namespace {

// Its own network namespace, before any thread starts (unshare moves only the calling thread):
// loopback up, which gives 127.0.0.1 and 127.0.0.2. Empty when done, else why not.
std::string OwnNetwork() {
  if (::unshare(CLONE_NEWNET) != 0) return absl::StrCat("unshare(CLONE_NEWNET): ", strerror(errno));
  if (std::system("ip link set lo up") != 0) return "ip link set lo up failed";
  if (std::system("command -v nft >/dev/null") != 0) return "nft is not installed";
  return "";
}

// Its own mount namespace, in which nothing it mounts is seen outside or outlives it.
std::string OwnMounts() {
  if (::unshare(CLONE_NEWNS) != 0) return absl::StrCat("unshare(CLONE_NEWNS): ", strerror(errno));
  if (::mount("none", "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0) {
    return absl::StrCat("making / private: ", strerror(errno));
  }
  return "";
}

std::string Which(const std::string& program) {
  for (const char* dir : {"/usr/bin", "/usr/local/bin", "/bin"}) {
    std::string path = absl::StrCat(dir, "/", program);
    if (::access(path.c_str(), X_OK) == 0) return path;
  }
  return "";
}

}  // namespace

int main(int argc, char** argv) {
  uint64_t rounds = 10, seed = 1;
  std::string platform_name, binary = ROMULUS_BINARY, log_file, dir;
  bool no_network = false;
  romulus::cli::Args args(
      "romulus_nemesis",
      "Runs a witness, a proxy and two hosts of one VM (real `romulus` processes) under ledger\n"
      "load, and applies a seeded random schedule of faults round after round: SIGKILL and\n"
      "SIGSTOP/SIGCONT of any process (hosts, the process platform's stubs, witness, proxy), a\n"
      "killed host restarted with its old files as the primary or as the mirror, CPU starvation\n"
      "(stress-ng), planned migrations, the mirror's disk full (a small tmpfs), and network\n"
      "partitions and one-way loss (nftables), in network and mount namespaces of its own.\n"
      "After each round it brings the cluster back (what was killed returns as the mirror) and\n"
      "checks the clients' histories and the ledger's state. The same seed draws the same\n"
      "schedule (the roles it names are resolved when each round starts).");
  args.Uint("rounds", &rounds, "rounds to run (1-100000)");
  args.Uint("seed", &seed, "the schedule's seed");
  args.String("platform", &platform_name, "kvm or process (default: kvm where it can run)");
  args.String("binary", &binary, "the romulus executable");
  args.String("log", &log_file, "append every process's output here (default: DIR/nemesis.log)");
  args.String("dir", &dir, "scratch directory (default: a new one under the temp directory)");
  args.Bool("no-network", &no_network,
            "no network and mount namespaces: no partitions and no disk-full faults");
  if (int rc = args.Prologue(argc - 1, argv + 1); rc >= 0) return rc;
  if (rounds < 1 || rounds > 100000) return args.UsageError("--rounds must be 1 to 100000");
  auto requested = romulus::vmm::ParsePlatform(platform_name);
  if (!requested.ok()) return args.UsageError(requested.status().message());
  auto platform = romulus::vmm::ChoosePlatform(*requested);
  if (!platform.ok()) {
    std::fprintf(stderr, "romulus_nemesis: %s\n", std::string(platform.status().message()).c_str());
    return 1;
  }
  romulus::nemesis::Options o;
  o.binary = binary;
  o.platform = std::string(romulus::vmm::PlatformName(*platform));
  o.rounds = rounds;
  o.seed = seed;
  bool own_dir = dir.empty();
  if (own_dir) {
    dir =
        std::filesystem::temp_directory_path() / absl::StrFormat("romulus-nemesis-%d", ::getpid());
  }
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) {
    std::fprintf(stderr, "romulus_nemesis: cannot create %s: %s\n", dir.c_str(),
                 ec.message().c_str());
    return 1;
  }
  o.dir = dir;
  o.log_file = log_file.empty() ? dir + "/nemesis.log" : log_file;
  o.out = [](const std::string& line) {
    std::printf("%s\n", line.c_str());
    std::fflush(stdout);
  };
  if (!no_network) {
    std::string why = OwnNetwork();
    o.network = why.empty();
    if (!why.empty()) std::printf("nemesis: no network faults: %s\n", why.c_str());
  }
  if (!no_network) {
    std::string why = OwnMounts();
    o.disk_full = why.empty();
    if (!why.empty()) std::printf("nemesis: no disk-full faults: %s\n", why.c_str());
  }
  o.stress_ng = Which("stress-ng");
  std::printf("nemesis: seed %llu, platform %s, %llu rounds; log %s\n",
              static_cast<unsigned long long>(seed), o.platform.c_str(),
              static_cast<unsigned long long>(rounds), o.log_file.c_str());
  if (o.stress_ng.empty()) std::printf("nemesis: no CPU starvation: stress-ng is not installed\n");
  std::printf(
      "nemesis: not checked directly: at most one host released outputs in a term (the ledger's "
      "answers do not carry the term; two hosts answering from diverged states shows as a "
      "sequence number given twice or going back)\n");
  auto report = romulus::nemesis::Run(o);
  if (!report.ok()) {
    std::fprintf(stderr, "romulus_nemesis: %s\n", std::string(report.status().message()).c_str());
    return 1;
  }
  std::printf("%s\n", romulus::nemesis::SummaryLine(*report, o).c_str());
  // The scratch files go when the run passed; a failed run keeps them (and the log) to look at.
  if (own_dir && report->violations == 0) {
    for (const auto& e : std::filesystem::directory_iterator(dir, ec)) {
      if (e.path().filename() != "nemesis.log") std::filesystem::remove_all(e.path(), ec);
    }
  }
  return report->violations > 0 ? 1 : 0;
}
