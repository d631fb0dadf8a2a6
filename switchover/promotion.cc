// Endpoints, the commands a host runs (fencing, before running unprotected), and the rule for
// who may promote.
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <climits>

#include "absl/strings/str_cat.h"
#include "switchover/switchover.h"

extern char** environ;

namespace romulus::switchover {

absl::StatusOr<Endpoint> ParseEndpoint(absl::string_view text) {
  auto bad = [&] {
    return absl::InvalidArgumentError(absl::StrCat("'", text, "' is not ADDR:PORT"));
  };
  size_t colon = text.rfind(':');
  if (colon == absl::string_view::npos || colon == 0) return bad();
  absl::string_view host = text.substr(0, colon), port = text.substr(colon + 1);
  if (host.front() == '[') {
    if (host.size() < 3 || host.back() != ']') return bad();
    host = host.substr(1, host.size() - 2);
  }
  unsigned value = 0;
  auto [end, ec] = std::from_chars(port.data(), port.data() + port.size(), value);
  if (ec != std::errc() || end != port.data() + port.size() || port.empty() || value > 65535) {
    return bad();
  }
  return Endpoint{std::string(host), static_cast<uint16_t>(value)};
}

absl::Status RunCommand(absl::string_view what, const std::string& command,
                        std::chrono::milliseconds timeout) {
  const char* argv[] = {"/bin/sh", "-c", command.c_str(), nullptr};
  // In a process group of its own, so that a command that hangs is killed with everything it
  // started (a `sleep` the shell forked would otherwise outlive it, and hold its output open).
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETPGROUP);
  posix_spawnattr_setpgroup(&attr, 0);
  pid_t pid;
  int err = posix_spawn(&pid, "/bin/sh", nullptr, &attr, const_cast<char**>(argv), environ);
  posix_spawnattr_destroy(&attr);
  if (err != 0) {
    return absl::InternalError(absl::StrCat(what, ": cannot start /bin/sh: ", strerror(err)));
  }
  int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
  bool exited = true;
  if (pidfd >= 0) {
    pollfd p{pidfd, POLLIN, 0};
    // A negative poll timeout waits forever: whatever the caller passed, the wait ends.
    auto ms = static_cast<int>(std::clamp<int64_t>(timeout.count(), 0, INT_MAX));
    exited = ::poll(&p, 1, ms) == 1;
    ::close(pidfd);
  }
  if (!exited) ::kill(-pid, SIGKILL);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (!exited) {
    return absl::DeadlineExceededError(
        absl::StrCat(what, " '", command, "' did not finish in ", timeout.count(), " ms (killed)"));
  }
  if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return absl::OkStatus();
  return absl::AbortedError(absl::StrCat(what, " '", command, "' failed: ",
                                         WIFEXITED(status)
                                             ? absl::StrCat("exit ", WEXITSTATUS(status))
                                             : absl::StrCat("signal ", WTERMSIG(status))));
}

absl::Status RunFenceCommand(const std::string& command, std::chrono::milliseconds timeout) {
  return RunCommand("fencing command", command, timeout);
}

absl::Status AuthorizePromotion(const PromotionPolicy& policy, bool force) {
  absl::Status s;
  if (policy.lease != nullptr) {
    s = policy.lease->AcquireWithin(policy.wait);
  } else if (!policy.fence_command.empty()) {
    s = RunFenceCommand(policy.fence_command, policy.wait);
  } else {
    s = absl::FailedPreconditionError(
        "neither a witness nor a fencing command is configured, so the old primary may still be "
        "running: not promoting (an operator who knows it is down can run romulus promote "
        "--force)");
  }
  if (s.ok() || force) return absl::OkStatus();
  return s;
}

}  // namespace romulus::switchover
