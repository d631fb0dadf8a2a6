// What else this machine is doing while a benchmark runs, for the first line of its output:
// figures taken while other work competes for the CPUs are not comparable with quiet ones.
#ifndef ROMULUS_BENCH_MACHINE_H_
#define ROMULUS_BENCH_MACHINE_H_

#include <fstream>
#include <string>
#include <thread>

#include "absl/strings/str_format.h"

namespace romulus::bench {

// "2 CPUs, load average 3.07 (1 min)", or without the load average where /proc has none.
inline std::string MachineLoad() {
  std::string load;
  std::ifstream("/proc/loadavg") >> load;
  unsigned cpus = std::thread::hardware_concurrency();
  if (load.empty()) return absl::StrFormat("%u CPUs", cpus);
  return absl::StrFormat("%u CPUs, load average %s (1 min)", cpus, load);
}

}  // namespace romulus::bench

#endif  // ROMULUS_BENCH_MACHINE_H_
