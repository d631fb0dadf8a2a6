// System-call helpers used across the project: an owning fd, errno-to-Status conversion, whole
// reads and writes on sockets, and ioctls retried on EINTR.
#ifndef ROMULUS_VMM_SYS_H_
#define ROMULUS_VMM_SYS_H_

#include <pthread.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace romulus::vmm {

class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  Fd(Fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  Fd& operator=(Fd&& o) noexcept {
    if (this != &o) {
      Reset();
      fd_ = std::exchange(o.fd_, -1);
    }
    return *this;
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() { Reset(); }
  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  void Reset() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_ = -1;
};

// A Status for a failed system call, carrying strerror(errno).
inline absl::Status ErrnoStatus(absl::string_view what, int err = errno) {
  return absl::Status(absl::ErrnoToStatusCode(err), absl::StrCat(what, ": ", std::strerror(err)));
}

// Reads exactly `len` bytes from a blocking socket, retrying on EINTR. The peer closing first
// is Unavailable ("WHAT: connection closed"); SO_RCVTIMEO running out is DeadlineExceeded
// ("WHAT: timed out"), and so is `deadline` passing while bytes still trickle in.
// Any other failure is ErrnoStatus(what).
inline absl::Status ReadFully(
    int fd, void* buf, size_t len, absl::string_view what,
    std::chrono::steady_clock::time_point deadline = std::chrono::steady_clock::time_point::max()) {
  auto* p = static_cast<uint8_t*>(buf);
  while (len > 0) {
    if (deadline != std::chrono::steady_clock::time_point::max() &&
        std::chrono::steady_clock::now() > deadline) {
      return absl::DeadlineExceededError(absl::StrCat(what, ": timed out"));
    }
    ssize_t n = ::recv(fd, p, len, 0);
    if (n == 0) return absl::UnavailableError(absl::StrCat(what, ": connection closed"));
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK)
        return absl::DeadlineExceededError(absl::StrCat(what, ": timed out"));
      return ErrnoStatus(what);
    }
    p += n;
    len -= static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

// Writes all of `iov[0..count)` to a blocking socket, retrying on EINTR, and advances `iov` as
// it goes (a written entry's length becomes 0), so that a call again with the same array after
// a timeout writes only the rest. MSG_NOSIGNAL: a peer that went away is an error here, not a
// SIGPIPE that ends the process. SO_SNDTIMEO running out is DeadlineExceeded ("WHAT: timed out");
// any other failure is ErrnoStatus(what).
inline absl::Status WriteFully(int fd, iovec* iov, int count, absl::string_view what) {
  while (count > 0) {
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = static_cast<size_t>(count);
    ssize_t w = ::sendmsg(fd, &msg, MSG_NOSIGNAL);
    if (w < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK)
        return absl::DeadlineExceededError(absl::StrCat(what, ": timed out"));
      return ErrnoStatus(what);
    }
    auto left = static_cast<size_t>(w);
    while (count > 0 && left >= iov->iov_len) {
      left -= iov->iov_len;
      iov->iov_len = 0;
      iov++;
      count--;
    }
    if (count > 0) {
      iov->iov_base = static_cast<uint8_t*>(iov->iov_base) + left;
      iov->iov_len -= left;
    }
  }
  return absl::OkStatus();
}

inline absl::Status WriteFully(int fd, absl::string_view bytes, absl::string_view what) {
  iovec iov{const_cast<char*>(bytes.data()), bytes.size()};
  return WriteFully(fd, &iov, 1, what);
}

// accept(2) failed. A failure of that one connection (aborted, or its protocol failed) is
// retried at once; any other (out of descriptors, buffers or memory) would fail again at once,
// the connection still waiting in the backlog, so a listener pauses this long before it retries.
inline constexpr std::chrono::milliseconds kAcceptRetryPause{100};
inline bool AcceptFailedForThatConnection(int err) {
  return err == ECONNABORTED || err == EPROTO || err == EINTR || err == EAGAIN ||
         err == EWOULDBLOCK;
}

// Names the calling thread (at most 15 characters), as `top -H`, `ps -L` and /proc/PID/task/*/comm
// show it: an operator (and a test) can tell the epoch loop from the replication sender.
inline void NameThread(const char* name) { pthread_setname_np(pthread_self(), name); }

// Runs an ioctl, retrying on EINTR, and returns its non-negative result or an error naming it.
template <typename Arg>
absl::Status Ioctl(int fd, unsigned long request, Arg arg, absl::string_view name,
                   int* result = nullptr) {
  int r;
  do {
    r = ::ioctl(fd, request, arg);
  } while (r < 0 && errno == EINTR);
  if (r < 0) return ErrnoStatus(name);
  if (result) *result = r;
  return absl::OkStatus();
}

}  // namespace romulus::vmm

#endif  // ROMULUS_VMM_SYS_H_
