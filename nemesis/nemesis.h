// The nemesis: real `romulus` processes (a witness, a proxy, two hosts of one VM) under ledger
// load, and a random but seeded schedule of faults applied to them round after round, like
// Jepsen's: processes killed and frozen, a killed host started again with its old files as the
// primary or as the mirror, CPU starvation, planned migrations, network partitions. After each
// round the cluster is brought back (what was killed restarts as the mirror) and the clients'
// histories and the ledger's state are checked: no acknowledged write lost, no sequence number
// given twice, no state rolled back.
#ifndef ROMULUS_NEMESIS_NEMESIS_H_
#define ROMULUS_NEMESIS_NEMESIS_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace romulus::nemesis {

struct Options {
  std::string binary{};    // the romulus executable
  std::string platform{};  // "kvm" or "process"
  uint64_t rounds = 10;
  uint64_t seed = 1;
  std::string dir{};  // scratch space for the clusters' files (emptied as it goes)
  // The schedule, the table and the summary, a line at a time.
  std::function<void(const std::string& line)> out = nullptr;
  // Every line the processes print, with a timestamp (empty: none kept).
  std::string log_file{};
  // Partitions and one-way loss with nftables: only in a network namespace of this process's
  // own (romulus_nemesis makes one), where its rules affect nothing else on the machine.
  bool network = false;
  std::string stress_ng{};  // the stress-ng executable ("": no CPU starvation)
  // Each host's disk image and memory file on a small tmpfs of its own, which a fault fills:
  // only in a mount namespace of this process's own (romulus_nemesis makes one), so that no
  // mount outlives it.
  bool disk_full = false;
};

struct Round {
  uint64_t round = 0;
  std::vector<std::string> faults;
  std::vector<std::string> violations;
  double longest_wait_ms = 0;  // the longest any client waited for an answer
  uint64_t unanswered = 0;     // requests no host answered in the clients' time
  bool recovered = false;      // a primary protected again and clients served after it
};

struct Report {
  std::vector<Round> rounds;
  uint64_t violations = 0, unrecovered = 0;
};

// Runs `rounds` rounds. Fails only when no cluster can be started at all.
absl::StatusOr<Report> Run(const Options& options);

// "nemesis: N rounds, V violations, U unrecovered, seed S, platform P"
std::string SummaryLine(const Report& report, const Options& options);

}  // namespace romulus::nemesis

#endif  // ROMULUS_NEMESIS_NEMESIS_H_
