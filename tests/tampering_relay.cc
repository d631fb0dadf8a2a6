#include "tests/tampering_relay.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>

namespace romulus::testing {
namespace {

bool WriteAll(int fd, const char* p, size_t n) {
  while (n > 0) {
    ssize_t w = ::send(fd, p, n, MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return false;
    p += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

bool ReadAll(int fd, char* p, size_t n) {
  while (n > 0) {
    ssize_t r = ::recv(fd, p, n, 0);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    p += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

}  // namespace

std::unique_ptr<TamperingRelay> TamperingRelay::Frames(uint16_t target, FrameHook hook) {
  return std::unique_ptr<TamperingRelay>(new TamperingRelay(target, std::move(hook), nullptr));
}

std::unique_ptr<TamperingRelay> TamperingRelay::Bytes(uint16_t target, ByteHook hook) {
  return std::unique_ptr<TamperingRelay>(new TamperingRelay(target, nullptr, std::move(hook)));
}

TamperingRelay::TamperingRelay(uint16_t target, FrameHook frames, ByteHook bytes)
    : target_(target), frames_(std::move(frames)), bytes_(std::move(bytes)) {
  listener_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  if (listener_ < 0 || ::bind(listener_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      ::listen(listener_, 16) != 0 ||
      ::getsockname(listener_, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    std::abort();  // loopback always works in a test
  }
  port_ = ntohs(addr.sin_port);
  acceptor_ = std::thread([this] { Accept(); });
}

TamperingRelay::~TamperingRelay() {
  stop_ = true;
  ::shutdown(listener_, SHUT_RDWR);
  acceptor_.join();
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (int fd : sockets_) ::shutdown(fd, SHUT_RDWR);
  }
  for (std::thread& t : pumps_) t.join();
  for (int fd : sockets_) ::close(fd);
  ::close(listener_);
}

void TamperingRelay::Accept() {
  while (!stop_) {
    int in = ::accept4(listener_, nullptr, nullptr, SOCK_CLOEXEC);
    if (in < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      return;  // shut down
    }
    int out = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(target_);
    int one = 1;
    ::setsockopt(in, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    ::setsockopt(out, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    bool connected =
        out >= 0 && ::connect(out, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
    std::lock_guard<std::mutex> lock(mu_);
    sockets_.push_back(in);
    if (out >= 0) sockets_.push_back(out);
    if (!connected || stop_) {
      ::shutdown(in, SHUT_RDWR);
      continue;
    }
    connections_++;
    pumps_.emplace_back([this, in, out] { Pump(in, out, kToMirror); });
    pumps_.emplace_back([this, in, out] { Pump(out, in, kToPrimary); });
  }
}

// Forwards until either side closes, then closes both ways (as a lost connection would).
void TamperingRelay::Pump(int from, int to, Direction d) {
  if (frames_) {
    for (uint64_t index = 0; !stop_; index++) {
      unsigned char header[4];
      if (!ReadAll(from, reinterpret_cast<char*>(header), sizeof(header))) break;
      uint32_t n = header[0] | (header[1] << 8) | (header[2] << 16) |
                   (static_cast<uint32_t>(header[3]) << 24);
      if (n > (64u << 20)) break;
      std::string body(n, '\0');
      if (!ReadAll(from, body.data(), n)) break;
      frames_(d, index, body);
      uint32_t m = static_cast<uint32_t>(body.size());
      char out[4] = {static_cast<char>(m), static_cast<char>(m >> 8), static_cast<char>(m >> 16),
                     static_cast<char>(m >> 24)};
      if (!WriteAll(to, out, sizeof(out)) || !WriteAll(to, body.data(), body.size())) break;
    }
  } else {
    char buf[16384];
    uint64_t offset = 0;
    while (!stop_) {
      ssize_t r = ::recv(from, buf, sizeof(buf), 0);
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) break;
      bytes_(d, offset, buf, static_cast<size_t>(r));
      offset += static_cast<uint64_t>(r);
      if (!WriteAll(to, buf, static_cast<size_t>(r))) break;
    }
  }
  ::shutdown(from, SHUT_RDWR);
  ::shutdown(to, SHUT_RDWR);
}

}  // namespace romulus::testing
