// A TCP relay on loopback between a primary and its mirror that alters what passes, as a bad
// network or an attacker on the path would.
#ifndef ROMULUS_TESTS_TAMPERING_RELAY_H_
#define ROMULUS_TESTS_TAMPERING_RELAY_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace romulus::testing {

class TamperingRelay {
 public:
  enum Direction { kToMirror = 0, kToPrimary = 1 };
  // Frame mode: the stream is cut into replication frames (a 4-byte little-endian length, then
  // that many bytes) and each frame's bytes after the length are handed over, numbered from 0
  // per connection and direction; the hook may change them (the length is rewritten to match).
  using FrameHook = std::function<void(Direction, uint64_t index, std::string& body)>;
  // Byte mode: every piece read is handed over with its offset in the direction's stream (per
  // connection), and may be changed in place.
  using ByteHook = std::function<void(Direction, uint64_t offset, char* data, size_t n)>;

  // Listens on 127.0.0.1 (any free port) and forwards each connection to 127.0.0.1:`target`.
  static std::unique_ptr<TamperingRelay> Frames(uint16_t target, FrameHook hook);
  static std::unique_ptr<TamperingRelay> Bytes(uint16_t target, ByteHook hook);
  ~TamperingRelay();

  uint16_t port() const { return port_; }
  uint64_t connections() const { return connections_.load(); }

 private:
  TamperingRelay(uint16_t target, FrameHook frames, ByteHook bytes);
  void Accept();
  void Pump(int from, int to, Direction d);

  uint16_t target_ = 0, port_ = 0;
  FrameHook frames_;
  ByteHook bytes_;
  int listener_ = -1;
  std::atomic<bool> stop_{false};
  std::atomic<uint64_t> connections_{0};
  std::mutex mu_;
  std::vector<int> sockets_;  // every socket of every connection, shut down at the end
  std::vector<std::thread> pumps_;
  std::thread acceptor_;
};

}  // namespace romulus::testing

#endif  // ROMULUS_TESTS_TAMPERING_RELAY_H_
