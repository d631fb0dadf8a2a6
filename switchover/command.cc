// Running an operator's program (a fencing command, a health check, smartctl) with a deadline.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "switchover/switchover.h"

namespace romulus::switchover {

absl::StatusOr<ProgramResult> RunProgram(const std::vector<std::string>& argv,
                                         std::chrono::milliseconds timeout, size_t max_output) {
  if (argv.empty()) return absl::InvalidArgumentError("no program to run");
  int out[2] = {-1, -1};
  if (max_output > 0 && ::pipe2(out, O_CLOEXEC) != 0) {
    return absl::InternalError(absl::StrCat("pipe: ", std::strerror(errno)));
  }
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  if (max_output > 0) {
    posix_spawn_file_actions_adddup2(&actions, out[1], STDOUT_FILENO);
    posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, "/dev/null", O_WRONLY, 0);
  }
  // In a process group of its own, so that a program that hangs is killed with everything it
  // started (a `sleep` a shell forked would otherwise outlive it, and hold its output open).
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETPGROUP);
  posix_spawnattr_setpgroup(&attr, 0);
  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid;
  int err = ::posix_spawn(&pid, argv[0].c_str(), &actions, &attr, args.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  posix_spawnattr_destroy(&attr);
  if (out[1] >= 0) ::close(out[1]);
  if (err != 0) {
    if (out[0] >= 0) ::close(out[0]);
    return absl::InternalError(absl::StrCat("cannot start ", argv[0], ": ", std::strerror(err)));
  }
  ProgramResult result;
  int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
  bool exited = false;
  auto deadline = std::chrono::steady_clock::now() + timeout;
  // Until the program exits or its time is up; its output is read meanwhile, past the bound
  // too (and dropped), so that it never blocks on a full pipe.
  while (pidfd >= 0 && !exited) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      result.timed_out = true;
      break;
    }
    pollfd p[2] = {{pidfd, POLLIN, 0}, {out[0], POLLIN, 0}};
    int r =
        ::poll(p, out[0] >= 0 ? 2 : 1, static_cast<int>(std::min<int64_t>(left.count(), INT_MAX)));
    if (r < 0 && errno != EINTR) break;
    if (r <= 0) continue;
    if (p[0].revents != 0) exited = true;
    // After the exit, only what is in the pipe now: a child it left behind may hold it open.
    if (exited && out[0] >= 0) ::fcntl(out[0], F_SETFL, O_NONBLOCK);
    while (out[0] >= 0 && (p[1].revents != 0 || exited)) {
      char buf[4096];
      ssize_t n = ::read(out[0], buf, sizeof(buf));
      if (n < 0 && errno == EINTR) continue;
      if (n == 0) {
        ::close(out[0]);
        out[0] = -1;
      }
      if (n <= 0) break;
      result.output.append(buf,
                           std::min(max_output - result.output.size(), static_cast<size_t>(n)));
      if (!exited) break;  // back to poll, which also watches the deadline
    }
  }
  if (out[0] >= 0) ::close(out[0]);
  if (pidfd >= 0) ::close(pidfd);
  // pidfd_open failed (no such system call before Linux 5.3) or the time is up: kill it all.
  if (!exited) ::kill(-pid, SIGKILL);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (pidfd < 0) return absl::InternalError(absl::StrCat("pidfd_open: ", std::strerror(errno)));
  if (WIFEXITED(status)) {
    result.exit_code = WEXITSTATUS(status);
  } else if (WIFSIGNALED(status) && !result.timed_out) {
    result.signal = WTERMSIG(status);
  }
  return result;
}

absl::Status RunCommand(absl::string_view what, const std::string& command,
                        std::chrono::milliseconds timeout) {
  auto ran = RunProgram({"/bin/sh", "-c", command}, timeout);
  if (!ran.ok()) return absl::InternalError(absl::StrCat(what, ": ", ran.status().message()));
  if (ran->timed_out) {
    return absl::DeadlineExceededError(
        absl::StrCat(what, " '", command, "' did not finish in ", timeout.count(), " ms (killed)"));
  }
  if (ran->exit_code == 0) return absl::OkStatus();
  return absl::AbortedError(absl::StrCat(what, " '", command, "' failed: ",
                                         ran->exit_code >= 0
                                             ? absl::StrCat("exit ", ran->exit_code)
                                             : absl::StrCat("signal ", ran->signal)));
}

absl::Status RunFenceCommand(const std::string& command, std::chrono::milliseconds timeout) {
  return RunCommand("fencing command", command, timeout);
}

}  // namespace romulus::switchover
