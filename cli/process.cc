#include "cli/process.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace romulus::cli {

absl::StatusOr<std::unique_ptr<Process>> Process::Start(const std::string& binary,
                                                        const std::vector<std::string>& args,
                                                        LineFn echo) {
  // A socket rather than a pipe: shutting our end down stops the reader even while a
  // grandchild (a fencing command) still holds the other end.
  int fds[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) {
    return absl::InternalError(absl::StrCat("socketpair: ", std::strerror(errno)));
  }
  std::vector<std::string> owned = {binary};
  owned.insert(owned.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : owned) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t parent = ::getpid();
  pid_t pid = ::fork();
  if (pid < 0) {
    int e = errno;
    ::close(fds[0]);
    ::close(fds[1]);
    return absl::InternalError(absl::StrCat("fork: ", std::strerror(e)));
  }
  if (pid == 0) {  // only async-signal-safe calls from here to exec
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(127);  // the parent is already gone
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    ::dup2(fds[1], 1);
    ::dup2(fds[1], 2);
    ::execv(argv[0], argv.data());
    static const char kFailed[] = "exec failed\n";
    (void)!::write(2, kFailed, sizeof(kFailed) - 1);
    ::_exit(127);
  }
  ::close(fds[1]);
  int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
  if (pidfd < 0) {
    int e = errno;
    ::kill(pid, SIGKILL);
    ::waitpid(pid, nullptr, 0);
    ::close(fds[0]);
    return absl::InternalError(absl::StrCat("pidfd_open: ", std::strerror(e)));
  }
  return std::unique_ptr<Process>(new Process(pid, pidfd, fds[0], std::move(echo)));
}

Process::Process(pid_t pid, int pidfd, int out, LineFn echo)
    : pid_(pid), pidfd_(pidfd), out_(out), echo_(std::move(echo)) {
  reader_ = std::thread([this] { ReadLines(); });
}

Process::~Process() {
  if (!Wait(std::chrono::milliseconds(0))) {
    ::kill(pid_, SIGKILL);
    (void)Wait(std::chrono::milliseconds(10000));
  }
  ::shutdown(out_, SHUT_RDWR);
  reader_.join();
  ::close(out_);
  ::close(pidfd_);
}

void Process::ReadLines() {
  std::string partial;
  char buf[4096];
  for (;;) {
    ssize_t n = ::read(out_, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    partial.append(buf, static_cast<size_t>(n));
    std::vector<std::string> complete;
    size_t start = 0, nl;
    while ((nl = partial.find('\n', start)) != std::string::npos) {
      complete.push_back(partial.substr(start, nl - start));
      start = nl + 1;
    }
    partial.erase(0, start);
    for (const auto& line : complete) {
      if (echo_) echo_(line);
    }
    std::lock_guard<std::mutex> lock(mu_);
    output_.append(buf, static_cast<size_t>(n));
    for (auto& line : complete) lines_.push_back(std::move(line));
    cv_.notify_all();
  }
  if (!partial.empty() && echo_) echo_(partial);
  std::lock_guard<std::mutex> lock(mu_);
  if (!partial.empty()) lines_.push_back(std::move(partial));
  closed_ = true;
  cv_.notify_all();
}

absl::StatusOr<std::string> Process::WaitForLine(absl::string_view needle,
                                                 std::chrono::milliseconds wait) {
  auto deadline = std::chrono::steady_clock::now() + wait;
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    for (; next_line_ < lines_.size(); next_line_++) {
      if (absl::string_view(lines_[next_line_]).find(needle) != absl::string_view::npos) {
        return lines_[next_line_++];
      }
    }
    if (closed_) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "process %d ended its output without a line containing '%s'", pid_, needle));
    }
    if (cv_.wait_until(lock, deadline) == std::cv_status::timeout && next_line_ == lines_.size()) {
      return absl::DeadlineExceededError(absl::StrFormat(
          "process %d printed no line containing '%s' within %d ms", pid_, needle, wait.count()));
    }
  }
}

void Process::Signal(int sig) {
  if (!exit_code_) ::kill(pid_, sig);
}

std::optional<int> Process::Wait(std::chrono::milliseconds wait) {
  if (exit_code_) return exit_code_;
  pollfd p{pidfd_, POLLIN, 0};
  int ready;
  do {
    ready = ::poll(&p, 1, static_cast<int>(wait.count()));
  } while (ready < 0 && errno == EINTR);
  if (ready <= 0) return std::nullopt;
  int status = 0;
  if (::waitpid(pid_, &status, 0) != pid_) return std::nullopt;
  exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  // What it printed last is read before its exit is reported (unless a grandchild holds its
  // output open).
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait_for(lock, std::chrono::seconds(1), [this] { return closed_; });
  return exit_code_;
}

std::string Process::output() const {
  std::lock_guard<std::mutex> lock(mu_);
  return output_;
}

}  // namespace romulus::cli
