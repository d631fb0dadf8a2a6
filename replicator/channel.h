// A replication connection: length-prefixed Frame messages over a blocking Boost.Asio socket,
// opened by the HMAC handshake. Internal to the replicator.
#ifndef ROMULUS_REPLICATOR_CHANNEL_H_
#define ROMULUS_REPLICATOR_CHANNEL_H_

// clang-format off
// Boost 1.74 uses std::exchange without including <utility>: include it first.
#include <utility>
#include <boost/asio.hpp>
// clang-format on
#include <chrono>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "replicator/replicator.h"

namespace romulus::replicator {

class Channel {
 public:
  // Primary side: connects and runs the handshake.
  static absl::StatusOr<std::unique_ptr<Channel>> Connect(boost::asio::io_context& io,
                                                          const std::string& host, uint16_t port,
                                                          const Identity& me,
                                                          const std::string& key, uint64_t session,
                                                          std::chrono::milliseconds timeout);
  // Mirror side: runs the handshake on an accepted socket; returns the primary's session.
  static absl::StatusOr<std::unique_ptr<Channel>> Accept(boost::asio::ip::tcp::socket socket,
                                                         const Identity& me, const std::string& key,
                                                         std::chrono::milliseconds timeout,
                                                         uint64_t* peer_session);

  absl::Status Send(const pb::Frame& frame);
  absl::StatusOr<pb::Frame> Receive();
  // Any thread: makes blocked Send/Receive calls return with an error.
  void Shutdown();
  std::string peer() const { return peer_; }
  uint64_t bytes_sent() const { return bytes_sent_; }

 private:
  Channel(boost::asio::ip::tcp::socket socket, std::chrono::milliseconds timeout);
  boost::asio::ip::tcp::socket socket_;
  std::string peer_;
  std::string send_what_, receive_what_;  // what a failed send or receive is called
  uint64_t bytes_sent_ = 0;
};

}  // namespace romulus::replicator

#endif  // ROMULUS_REPLICATOR_CHANNEL_H_
