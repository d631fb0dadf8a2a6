// What the fuzz targets share. Their inputs' shape: mode bytes, then records, each a 2-byte
// little-endian length and that many bytes (the last one may be cut short). The corpus generator
// writes the same shape, so its seeds are valid inputs that mutations start from.
#ifndef ROMULUS_FUZZ_FUZZ_UTIL_H_
#define ROMULUS_FUZZ_FUZZ_UTIL_H_

#include <poll.h>
#include <stdlib.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>

#include "absl/strings/string_view.h"
#include "google/protobuf/stubs/logging.h"

namespace romulus::fuzz {

// The pre-shared key of the datagram target's peers (and of its seeds).
inline constexpr char kFuzzKey[] = "romulus-fuzz-key-0123456789";

class Input {
 public:
  Input(const uint8_t* data, size_t size) : rest_(reinterpret_cast<const char*>(data), size) {}

  // The next byte; 0 once the input is used up.
  uint8_t Byte() {
    if (rest_.empty()) return 0;
    uint8_t b = static_cast<uint8_t>(rest_[0]);
    rest_.remove_prefix(1);
    return b;
  }
  // The next record; nullopt once the input is used up.
  std::optional<absl::string_view> Next() {
    if (rest_.size() < 2) return std::nullopt;
    size_t n = static_cast<uint8_t>(rest_[0]) | (static_cast<uint8_t>(rest_[1]) << 8);
    rest_.remove_prefix(2);
    absl::string_view r = rest_.substr(0, n);
    rest_.remove_prefix(r.size());
    return r;
  }
  absl::string_view Rest() const { return rest_; }

 private:
  absl::string_view rest_;
};

// One record as Input::Next reads it (for the corpus generator; at most 65535 bytes).
inline std::string Record(absl::string_view bytes) {
  if (bytes.size() > 0xffff) std::abort();
  std::string out;
  out += static_cast<char>(bytes.size() & 0xff);
  out += static_cast<char>((bytes.size() >> 8) & 0xff);
  out.append(bytes.data(), bytes.size());
  return out;
}

// Protobuf logs every string field with invalid UTF-8 that it refuses to parse: mutated inputs
// hold many, and the log would drown the fuzzer's own output.
inline void QuietProtobuf() { google::protobuf::SetLogHandler(nullptr); }

// libFuzzer's entry points for a target that hands every input, as an Input, to `run` (a
// function of namespace romulus::fuzz taking Input&), with protobuf's log quiet.
#define ROMULUS_FUZZ_TARGET(run)                                            \
  extern "C" int LLVMFuzzerInitialize(int*, char***) {                      \
    ::romulus::fuzz::QuietProtobuf();                                       \
    return 0;                                                               \
  }                                                                         \
  extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) { \
    ::romulus::fuzz::Input in(data, size);                                  \
    ::romulus::fuzz::run(in);                                               \
    return 0;                                                               \
  }

// What a peer sends until it closes the connection (at most `limit` bytes), waiting at most
// `timeout` in all; nullopt when it did not close in time.
inline std::optional<std::string> ReadUntilClosed(int fd, size_t limit,
                                                  std::chrono::milliseconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  std::string out;
  char buf[4096];
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    pollfd p{fd, POLLIN, 0};
    if (left.count() <= 0 || ::poll(&p, 1, static_cast<int>(left.count())) == 0) {
      return std::nullopt;
    }
    ssize_t n = ::recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (n <= 0) return out;  // closed (or reset: the peer is gone all the same)
    if (out.size() < limit) out.append(buf, std::min(static_cast<size_t>(n), limit - out.size()));
  }
}

// A directory of this process's own, removed with its contents when the process exits (the
// string is never destroyed, so the exit handler can still use it).
inline const std::string& ScratchDir() {
  static const std::string* dir = [] {
    std::string d = "/tmp/romulus-fuzz-XXXXXX";
    if (::mkdtemp(d.data()) == nullptr) std::abort();
    auto* kept = new std::string(d);
    std::atexit([] {
      std::error_code ec;
      std::filesystem::remove_all(ScratchDir(), ec);
    });
    return kept;
  }();
  return *dir;
}

}  // namespace romulus::fuzz

#endif  // ROMULUS_FUZZ_FUZZ_UTIL_H_
