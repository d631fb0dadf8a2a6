// A child process whose output (stdout and stderr together) is read line by line as it comes,
// with every wait bounded: how `romulus demo` runs its hosts and witness, and how the tests run
// `romulus` commands.
#ifndef ROMULUS_CLI_PROCESS_H_
#define ROMULUS_CLI_PROCESS_H_

#include <sys/types.h>

#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace romulus::cli {

class Process {
 public:
  using LineFn = std::function<void(absl::string_view line)>;

  // Runs `binary` with `args` (argv[1] on), its signal mask cleared. `echo`, when set, is called
  // with each line as it arrives (on a thread of this object's). The child is killed if the
  // thread that started it ends first (PR_SET_PDEATHSIG), so start it from a long-lived thread.
  static absl::StatusOr<std::unique_ptr<Process>> Start(const std::string& binary,
                                                        const std::vector<std::string>& args,
                                                        LineFn echo = nullptr);
  // Kills (SIGKILL) and reaps a child that still runs.
  ~Process();

  // The next line, after the one the last call returned, that contains `needle`. Fails after
  // `wait`, or once the child has closed its output without printing one.
  absl::StatusOr<std::string> WaitForLine(absl::string_view needle, std::chrono::milliseconds wait);
  void Signal(int sig);
  // The exit code (128 + the signal, when killed by one), once it exits within `wait`.
  std::optional<int> Wait(std::chrono::milliseconds wait);
  pid_t pid() const { return pid_; }
  // Everything it printed so far.
  std::string output() const;

 private:
  Process(pid_t pid, int pidfd, int out, LineFn echo);
  void ReadLines();

  const pid_t pid_;
  const int pidfd_;  // polled for the exit
  const int out_;    // our end of the socket the child writes its output to
  const LineFn echo_;
  std::optional<int> exit_code_;  // set once reaped (by the owner's thread only)
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::string> lines_;  // complete lines so far
  size_t next_line_ = 0;            // where WaitForLine goes on from
  std::string output_;
  bool closed_ = false;  // the child's output reached its end
  std::thread reader_;
};

}  // namespace romulus::cli

#endif  // ROMULUS_CLI_PROCESS_H_
