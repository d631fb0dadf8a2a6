#include "cli/ledger_client.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "vmm/ledger_protocol.h"

namespace romulus::cli {

absl::Status ParseHostPort(const std::string& text, std::string* host, uint16_t* port) {
  auto colon = text.rfind(':');
  uint32_t p = 0;
  if (colon == std::string::npos || !absl::SimpleAtoi(text.substr(colon + 1), &p) || p == 0 ||
      p > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("'", text, "' is not HOST:PORT"));
  }
  *host = text.substr(0, colon);
  *port = static_cast<uint16_t>(p);
  return absl::OkStatus();
}

absl::StatusOr<LedgerClient> LedgerClient::Connect(const std::string& host, uint16_t port,
                                                   int timeout_ms) {
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  std::string h = host == "localhost" ? "127.0.0.1" : host;
  if (::inet_pton(AF_INET, h.c_str(), &addr.sin_addr) != 1) {
    return absl::InvalidArgumentError(absl::StrCat("'", host, "' is not an IPv4 address"));
  }
  vmm::Fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return vmm::ErrnoStatus("socket");
  timeval tv{timeout_ms / 1000, (timeout_ms % 1000) * 1000};
  ::setsockopt(fd.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  ::setsockopt(fd.get(), SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  int one = 1;
  ::setsockopt(fd.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    // Interrupted by a signal, the connection goes on in the background: wait for its outcome.
    if (errno != EINTR) return vmm::ErrnoStatus(absl::StrCat("connect to ", host, ":", port));
    pollfd p{fd.get(), POLLOUT, 0};
    int err = 0;
    socklen_t len = sizeof(err);
    int n;
    while ((n = ::poll(&p, 1, timeout_ms)) < 0 && errno == EINTR) {
    }
    if (n == 0) err = ETIMEDOUT;
    if (n < 0) err = errno;
    if (n > 0) ::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &err, &len);
    if (err != 0) return vmm::ErrnoStatus(absl::StrCat("connect to ", host, ":", port), err);
  }
  return LedgerClient(std::move(fd));
}

absl::Status LedgerClient::SendBytes(const std::string& bytes) {
  return vmm::WriteFully(fd_.get(), bytes, "send to ledger");
}

absl::StatusOr<pb::LedgerResponse> LedgerClient::Receive() {
  uint8_t header[4];
  if (auto s = vmm::ReadFully(fd_.get(), header, 4, "receive from ledger"); !s.ok()) return s;
  uint32_t len = vmm::DecodeFrameLength(header);
  if (len > vmm::kMaxLedgerFrame) {
    return absl::DataLossError(absl::StrCat("ledger sent a frame of ", len, " bytes"));
  }
  std::string body(len, '\0');
  if (auto s = vmm::ReadFully(fd_.get(), body.data(), len, "receive from ledger"); !s.ok()) {
    return s;
  }
  pb::LedgerResponse r;
  if (!r.ParseFromString(body)) return absl::DataLossError("ledger sent a malformed response");
  return r;
}

absl::StatusOr<pb::LedgerResponse> LedgerClient::Call(const pb::LedgerRequest& request) {
  if (auto s = SendBytes(vmm::EncodeFrame(request)); !s.ok()) return s;
  return Receive();
}

}  // namespace romulus::cli
