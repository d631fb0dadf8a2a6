// What every benchmark needs around its measurements: the machine's load for the first line of
// the output (figures taken while other work competes for the CPUs are not comparable with quiet
// ones), quantiles and ratios of samples, a bounded wait, and a one-line exit on failure.
#ifndef ROMULUS_BENCH_BENCH_UTIL_H_
#define ROMULUS_BENCH_BENCH_UTIL_H_

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_format.h"

namespace romulus::bench {

using Clock = std::chrono::steady_clock;

// "2 CPUs, load average 3.07 (1 min)", or without the load average where /proc has none.
inline std::string MachineLoad() {
  std::string load;
  std::ifstream("/proc/loadavg") >> load;
  unsigned cpus = std::thread::hardware_concurrency();
  if (load.empty()) return absl::StrFormat("%u CPUs", cpus);
  return absl::StrFormat("%u CPUs, load average %s (1 min)", cpus, load);
}

inline double Secs(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// The sample below which a fraction `p` of them lie (p 0.5: the median); 0 without samples.
inline double Quantile(std::vector<double> v, double p) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[std::min(v.size() - 1, static_cast<size_t>(p * v.size()))];
}

// a / b, and 0 where there is nothing to compare against.
inline double Ratio(double a, double b) { return b > 0 ? a / b : 0; }

// Polls `pred` until it holds (true) or `seconds` have passed (false).
template <typename Pred>
bool WaitFor(Pred pred, double seconds) {
  auto deadline = Clock::now() + std::chrono::duration<double>(seconds);
  while (!pred()) {
    if (Clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  return true;
}

// Ends a benchmark that cannot go on: "PROGRAM: WHAT" on stderr, exit status 1.
[[noreturn]] inline void Die(const char* program, const std::string& what) {
  std::fprintf(stderr, "%s: %s\n", program, what.c_str());
  std::exit(1);
}

}  // namespace romulus::bench

#endif  // ROMULUS_BENCH_BENCH_UTIL_H_
