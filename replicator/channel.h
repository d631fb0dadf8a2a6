// A replication connection: length-prefixed Frame messages over a blocking Boost.Asio socket,
// opened by a handshake in which both ends prove the pre-shared key (HMAC over a hash of both
// Hello frames); every frame after it is sealed (frame_protection.h). Internal to the replicator.
#ifndef ROMULUS_REPLICATOR_CHANNEL_H_
#define ROMULUS_REPLICATOR_CHANNEL_H_

// clang-format off
// Boost 1.74 uses std::exchange without including <utility>: include it first.
#include <utility>
#include <boost/asio.hpp>
// clang-format on
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "replicator/frame_protection.h"
#include "replicator/replicator.h"

namespace romulus::replicator {

// One logical connection: frames in order both ways. A TcpChannel is one TCP connection; a Bond
// (bond.h) spreads one stream over several of them, one per path.
class Channel {
 public:
  // What a handshake needs: who this side is, the key, and how it protects frames.
  struct Terms {
    Identity identity;
    std::string key;
    Protection protection = {};
    // The primary's path `path_index` of `path_count` of bond `bond` (0: a connection alone).
    uint64_t bond = 0;
    uint32_t path_index = 0, path_count = 1;
    pb::PostcopyConnection postcopy = pb::POSTCOPY_NONE;  // a post-copy source's connection
    uint64_t term = 0;  // the primary's: the witness's term it runs the VM in (0: none)
  };
  // Primary side: connects (within `timeout`) and runs the handshake. Its `protection` (the
  // cipher resolved to the cheapest here when unspecified) is what both directions use.
  static absl::StatusOr<std::unique_ptr<Channel>> Connect(boost::asio::io_context& io,
                                                          const std::string& host, uint16_t port,
                                                          const Terms& terms, uint64_t session,
                                                          std::chrono::milliseconds timeout);
  // Mirror side: runs the handshake on an accepted socket; returns the primary's session (and,
  // if asked, its whole Hello: which bond and path this is). The primary's cipher is accepted;
  // whether frames are encrypted must agree with `protection`.
  static absl::StatusOr<std::unique_ptr<Channel>> Accept(boost::asio::ip::tcp::socket socket,
                                                         const Terms& terms,
                                                         std::chrono::milliseconds timeout,
                                                         uint64_t* peer_session,
                                                         pb::Hello* peer_hello = nullptr);

  virtual ~Channel() = default;

  // Any thread (sends are serialised).
  virtual absl::Status Send(const pb::Frame& frame) = 0;
  // The next frame that is not a keepalive; `on_frame` (if set) runs for every frame, keepalives
  // included: each is a sign of the peer's life.
  virtual absl::StatusOr<pb::Frame> Receive() = 0;
  // Before the first Send or Receive.
  virtual void set_on_frame(std::function<void()> on_frame) = 0;
  // From now on a thread sends a keepalive whenever nothing was sent for `idle`, so that the
  // peer's receive timeout measures this side's life, not how long its work takes (a long
  // commit, hashing a large memory). Ends with Shutdown.
  virtual void KeepAlive(std::chrono::milliseconds idle) = 0;
  // Waits, at most `within`, until what Send took has been handed to the kernel (a last reply
  // before the connection ends). A TcpChannel's Send already has.
  virtual void Flush(std::chrono::milliseconds within) { (void)within; }
  // Any thread: makes blocked Send/Receive calls return with an error.
  virtual void Shutdown() = 0;
  virtual std::string peer() const = 0;
  virtual uint64_t bytes_sent() const = 0;
  // Bytes of frames received on this connection, headers and tags included.
  virtual uint64_t bytes_received() const = 0;
  // How this connection's frames are protected, e.g. "aes-256-gcm" or "chacha20-poly1305,
  // in clear".
  virtual std::string protection() const = 0;
  // Each path's state (one for a TcpChannel).
  virtual std::vector<PathStats> paths() const = 0;
};

class TcpChannel final : public Channel {
 public:
  ~TcpChannel() override;
  absl::Status Send(const pb::Frame& frame) override;
  absl::StatusOr<pb::Frame> Receive() override;
  void set_on_frame(std::function<void()> on_frame) override { on_frame_ = std::move(on_frame); }
  void KeepAlive(std::chrono::milliseconds idle) override;
  void Shutdown() override;
  std::string peer() const override { return peer_; }
  uint64_t bytes_sent() const override { return bytes_sent_.load(); }
  uint64_t bytes_received() const override { return bytes_received_.load(); }
  std::string protection() const override;
  std::vector<PathStats> paths() const override;

 private:
  friend class Channel;
  TcpChannel(boost::asio::ip::tcp::socket socket, std::chrono::milliseconds timeout);
  // A frame as bytes (the handshake's Hellos are hashed as they crossed the wire).
  absl::Status SendBody(const std::string& body);
  absl::Status WriteFrame(std::string& frame);  // with send_mu_ held
  absl::StatusOr<pb::Frame> ReceiveFrame(std::string* body = nullptr);
  // After the handshake: from now on frames are sealed with `send_key` and opened with
  // `receive_key`.
  absl::Status Protect(const Protection& protection, absl::string_view send_key,
                       absl::string_view receive_key);
  std::chrono::steady_clock::time_point last_receive() const {
    return std::chrono::steady_clock::time_point(
        std::chrono::steady_clock::duration(last_receive_ns_.load()));
  }
  boost::asio::ip::tcp::socket socket_;
  std::chrono::milliseconds timeout_;
  std::atomic<int64_t> last_receive_ns_{0};  // when the peer was last heard from
  std::string peer_;
  std::string send_what_, receive_what_;  // what a failed send or receive is called
  std::atomic<uint64_t> bytes_sent_{0}, bytes_received_{0};
  std::function<void()> on_frame_;
  Protection protection_;
  std::unique_ptr<FrameSealer> opener_;  // used by the one receiving thread
  std::mutex send_mu_;
  std::unique_ptr<FrameSealer> sealer_;  // under send_mu_: frames are sealed in sending order
  std::chrono::steady_clock::time_point last_send_;  // under send_mu_
  std::mutex keepalive_mu_;
  std::condition_variable keepalive_cv_;
  bool shut_ = false;  // under keepalive_mu_
  std::thread keepalive_;
};

// Receives a channel's frames on a thread of its own, up to `depth` ahead of the caller, so that
// reading, opening (the cipher) and parsing the next frames overlaps the caller's work on this
// one: on a mirror, staging and committing. The first error ends the reading and is what Next
// returns from then on. The connection ends with it: the destructor shuts the channel down.
class FrameReadAhead {
 public:
  FrameReadAhead(Channel& channel, size_t depth);
  ~FrameReadAhead();
  FrameReadAhead(const FrameReadAhead&) = delete;
  FrameReadAhead& operator=(const FrameReadAhead&) = delete;

  // The next frame, as Channel::Receive would have returned it; DeadlineExceeded when none came
  // by `until`.
  absl::StatusOr<pb::Frame> Next(
      std::chrono::steady_clock::time_point until = std::chrono::steady_clock::time_point::max());

 private:
  Channel& channel_;
  const size_t depth_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<absl::StatusOr<pb::Frame>> frames_;  // under mu_; an error is the last
  bool stop_ = false;                             // under mu_
  std::thread thread_;
};

}  // namespace romulus::replicator

#endif  // ROMULUS_REPLICATOR_CHANNEL_H_
