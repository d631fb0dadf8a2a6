// Raw loopback TCP throughput: what one connection on this machine carries with no protocol,
// no copy out of guest memory and no protection. The ceiling that replication figures are read
// against.
#ifndef ROMULUS_BENCH_LOOPBACK_H_
#define ROMULUS_BENCH_LOOPBACK_H_

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <thread>
#include <vector>

namespace romulus::bench {

// MB/s (10^6 bytes) of `bytes` written through one loopback connection and read at the other
// end; 0 when a socket cannot be set up.
inline double RawLoopbackMBps(uint64_t bytes) {
  int listener = ::socket(AF_INET, SOCK_STREAM, 0);
  if (listener < 0) return 0;
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(a);
  if (::bind(listener, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 ||
      ::getsockname(listener, reinterpret_cast<sockaddr*>(&a), &len) != 0 ||
      ::listen(listener, 1) != 0) {
    ::close(listener);
    return 0;
  }
  int out = ::socket(AF_INET, SOCK_STREAM, 0);
  if (out < 0 || ::connect(out, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
    if (out >= 0) ::close(out);
    ::close(listener);
    return 0;
  }
  // Accepted only once connected, so that the sink never waits on a connection that failed.
  std::thread sink([listener] {
    int c = ::accept(listener, nullptr, nullptr);
    if (c < 0) return;
    std::vector<char> buf(1 << 20);
    while (::read(c, buf.data(), buf.size()) > 0) {
    }
    ::close(c);
  });
  std::vector<char> buf(1 << 20, 'x');
  auto t0 = std::chrono::steady_clock::now();
  for (uint64_t sent = 0; sent < bytes;) {
    ssize_t n = ::write(out, buf.data(), std::min<uint64_t>(buf.size(), bytes - sent));
    if (n <= 0) break;
    sent += static_cast<uint64_t>(n);
  }
  ::close(out);
  sink.join();  // the time includes the reader draining what was written
  ::close(listener);
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return static_cast<double>(bytes) / std::max(secs, 1e-9) / 1e6;
}

}  // namespace romulus::bench

#endif  // ROMULUS_BENCH_LOOPBACK_H_
