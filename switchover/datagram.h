// The UDP datagrams of heartbeats and leases: versioned, bounded, authenticated. Internal to
// the switchover library.
#ifndef ROMULUS_SWITCHOVER_DATAGRAM_H_
#define ROMULUS_SWITCHOVER_DATAGRAM_H_

// clang-format off
// Boost 1.74 uses std::exchange without including <utility>: include it first.
#include <utility>
#include <boost/asio/ip/udp.hpp>
// clang-format on
#include <chrono>
#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "proto/romulus.pb.h"
#include "switchover/switchover.h"

namespace romulus::switchover {

inline constexpr uint32_t kDatagramVersion = 1;
inline constexpr size_t kMaxDatagramBytes = 1024;
inline constexpr size_t kMaxNameBytes = 128;  // VM ids and node names
// The longest lease a witness grants; a longer one in a reply is not believed.
inline constexpr uint32_t kMaxLeaseMs = 60000;

using Clock = std::chrono::steady_clock;

// The bytes to send for `message`, MAC'd with `key`.
std::string Seal(const std::string& key, const pb::SwitchoverMessage& message);
// The message in untrusted `bytes`, or why it is refused (size, version, MAC, parse).
absl::StatusOr<pb::SwitchoverMessage> Open(const std::string& key, absl::string_view bytes);

// The UDP endpoint of a numeric address and port ("bad address 'HOST'" otherwise).
absl::StatusOr<boost::asio::ip::udp::endpoint> ToUdp(const Endpoint& e);

// Random bytes from the kernel.
std::string RandomBytes(size_t n);
uint64_t RandomU64();

}  // namespace romulus::switchover

#endif  // ROMULUS_SWITCHOVER_DATAGRAM_H_
