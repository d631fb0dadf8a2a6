#include "switchover/datagram.h"

#include <sys/random.h>

#include <boost/asio/ip/address.hpp>
#include <cstdlib>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "replicator/replicator.h"

namespace romulus::switchover {
namespace {

std::string Mac(const std::string& key, absl::string_view body) {
  return replicator::Hmac(key, absl::StrCat("romulus-dgram", body));
}

}  // namespace

std::string Seal(const std::string& key, const pb::SwitchoverMessage& message) {
  pb::Datagram d;
  d.set_version(kDatagramVersion);
  d.set_body(message.SerializeAsString());
  d.set_mac(Mac(key, d.body()));
  return d.SerializeAsString();
}

absl::StatusOr<pb::SwitchoverMessage> Open(const std::string& key, absl::string_view bytes) {
  if (bytes.size() > kMaxDatagramBytes) {
    return absl::InvalidArgumentError(absl::StrCat("datagram of ", bytes.size(), " bytes"));
  }
  pb::Datagram d;
  if (!d.ParseFromArray(bytes.data(), static_cast<int>(bytes.size()))) {
    return absl::InvalidArgumentError("not a datagram");
  }
  if (d.version() != kDatagramVersion) {
    return absl::FailedPreconditionError(
        absl::StrCat("datagram version ", d.version(), ", this side ", kDatagramVersion));
  }
  if (!replicator::SameMac(d.mac(), Mac(key, d.body()))) {
    return absl::PermissionDeniedError("datagram MAC does not match the pre-shared key");
  }
  pb::SwitchoverMessage m;
  if (!m.ParseFromString(d.body())) return absl::InvalidArgumentError("bad datagram body");
  return m;
}

absl::StatusOr<boost::asio::ip::udp::endpoint> ToUdp(const Endpoint& e) {
  boost::system::error_code ec;
  auto address = boost::asio::ip::make_address(e.host, ec);
  if (ec) return absl::InvalidArgumentError(absl::StrCat("bad address '", e.host, "'"));
  return boost::asio::ip::udp::endpoint(address, e.port);
}

std::string RandomBytes(size_t n) {
  std::string out(n, '\0');
  if (::getrandom(out.data(), n, 0) != static_cast<ssize_t>(n)) std::abort();
  return out;
}

uint64_t RandomU64() {
  std::string b = RandomBytes(sizeof(uint64_t));
  uint64_t v;
  std::memcpy(&v, b.data(), sizeof(v));
  return v;
}

}  // namespace romulus::switchover
