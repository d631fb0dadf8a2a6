// The commands take SIGINT, SIGTERM and SIGUSR1 synchronously on their main thread.
#ifndef ROMULUS_CLI_SIGNALS_H_
#define ROMULUS_CLI_SIGNALS_H_

#include <signal.h>

#include <chrono>

namespace romulus::cli {

// Blocks SIGINT, SIGTERM and SIGUSR1 in the calling thread (and the threads it starts later) and
// returns the set for WaitSignal. Call it before starting any thread.
inline sigset_t TakeSignals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGUSR1);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  return set;
}

// The signal that arrived within `timeout`, or -1.
inline int WaitSignal(const sigset_t& set, std::chrono::milliseconds timeout) {
  timespec ts{static_cast<time_t>(timeout.count() / 1000),
              static_cast<long>((timeout.count() % 1000) * 1000000)};
  return sigtimedwait(&set, nullptr, &ts);
}

}  // namespace romulus::cli

#endif  // ROMULUS_CLI_SIGNALS_H_
