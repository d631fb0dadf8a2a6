#include "replicator/channel.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include <cerrno>

#include "absl/strings/str_cat.h"
#include "vmm/sys.h"
#include "vmm/vmm.h"

namespace romulus::replicator {
namespace {

namespace asio = boost::asio;
using asio::ip::tcp;

constexpr size_t kNonceBytes = 16;

// Boost.Asio's blocking reads and writes wait again when SO_RCVTIMEO or SO_SNDTIMEO fires, so
// a silent peer would block them for ever: the channel moves its bytes itself (vmm::ReadFully,
// vmm::WriteFully), and a timeout (EAGAIN) is an error.

std::string Nonce() {
  std::string n(kNonceBytes, '\0');
  if (::getrandom(n.data(), n.size(), 0) != static_cast<ssize_t>(n.size())) std::abort();
  return n;
}

std::string Proof(const std::string& key, absl::string_view role, const std::string& a,
                  const std::string& b) {
  return Hmac(key, absl::StrCat("romulus-", role, a, b));
}

pb::Frame HelloFrame(const Identity& me, const std::string& nonce, uint64_t session) {
  pb::Frame f;
  pb::Hello* h = f.mutable_hello();
  h->set_protocol_version(kProtocolVersion);
  h->set_vm_id(me.vm_id);
  h->set_memory_bytes(me.memory_bytes);
  h->set_disk_bytes(me.disk_bytes);
  h->set_platform(me.platform);
  h->set_nonce(nonce);
  h->set_session(session);
  return f;
}

// Checks the peer's Hello against what this side serves.
absl::Status CheckHello(const pb::Frame& f, const Identity& me) {
  if (!f.has_hello()) return absl::PermissionDeniedError("expected a hello first");
  const pb::Hello& h = f.hello();
  if (h.protocol_version() != kProtocolVersion) {
    return absl::FailedPreconditionError(absl::StrCat("peer speaks protocol ", h.protocol_version(),
                                                      ", this side ", kProtocolVersion));
  }
  if (h.vm_id() != me.vm_id || h.memory_bytes() != me.memory_bytes ||
      h.disk_bytes() != me.disk_bytes) {
    return absl::FailedPreconditionError(
        absl::StrCat("peer replicates VM '", h.vm_id().substr(0, 64), "' (", h.memory_bytes(),
                     " B memory, ", h.disk_bytes(), " B disk), this side '", me.vm_id, "' (",
                     me.memory_bytes, " B, ", me.disk_bytes, " B)"));
  }
  if (h.platform() != me.platform) {
    return absl::FailedPreconditionError(absl::StrCat(
        "peer runs the VM on the ", vmm::PlatformName(h.platform()), " platform, this side on the ",
        vmm::PlatformName(me.platform), " platform: neither could resume the other's state"));
  }
  if (h.nonce().size() != kNonceBytes) return absl::PermissionDeniedError("bad nonce");
  return absl::OkStatus();
}

absl::Status CheckProof(const absl::StatusOr<pb::Frame>& f, const std::string& expected) {
  if (!f.ok()) return f.status();
  if (!f->has_auth() || !SameMac(f->auth().hmac(), expected)) {
    return absl::PermissionDeniedError("authentication failed (wrong pre-shared key?)");
  }
  return absl::OkStatus();
}

pb::Frame AuthFrame(const std::string& proof) {
  pb::Frame f;
  f.mutable_auth()->set_hmac(proof);
  return f;
}

}  // namespace

std::string Hmac(absl::string_view key, absl::string_view message) {
  unsigned char out[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()),
       reinterpret_cast<const unsigned char*>(message.data()), message.size(), out, &len);
  return std::string(reinterpret_cast<char*>(out), len);
}

bool SameMac(absl::string_view a, absl::string_view b) {
  return a.size() == b.size() && CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0;
}

Channel::Channel(tcp::socket socket, std::chrono::milliseconds timeout)
    : socket_(std::move(socket)), timeout_(timeout) {
  last_receive_ns_ = std::chrono::steady_clock::now().time_since_epoch().count();
  boost::system::error_code ec;
  auto ep = socket_.remote_endpoint(ec);
  peer_ = ec ? "unknown" : absl::StrCat(ep.address().to_string(), ":", ep.port());
  send_what_ = absl::StrCat("send to ", peer_);
  receive_what_ = absl::StrCat("receive from ", peer_);
  socket_.set_option(tcp::no_delay(true), ec);
  // Blocking reads and writes give up after the timeout instead of waiting on a dead peer.
  timeval tv{static_cast<time_t>(timeout.count() / 1000),
             static_cast<suseconds_t>((timeout.count() % 1000) * 1000)};
  ::setsockopt(socket_.native_handle(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  ::setsockopt(socket_.native_handle(), SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
}

absl::StatusOr<std::unique_ptr<Channel>> Channel::Connect(asio::io_context& io,
                                                          const std::string& host, uint16_t port,
                                                          const Identity& me,
                                                          const std::string& key, uint64_t session,
                                                          std::chrono::milliseconds timeout) {
  boost::system::error_code ec;
  auto addr = asio::ip::make_address(host == "localhost" ? "127.0.0.1" : host, ec);
  if (ec) return absl::InvalidArgumentError(absl::StrCat("'", host, "' is not an IP address"));
  tcp::socket socket(io);
  socket.connect(tcp::endpoint(addr, port), ec);
  if (ec)
    return absl::UnavailableError(
        absl::StrCat("connect to mirror ", host, ":", port, ": ", ec.message()));
  std::unique_ptr<Channel> ch(new Channel(std::move(socket), timeout));
  std::string mine = Nonce();
  if (auto s = ch->Send(HelloFrame(me, mine, session)); !s.ok()) return s;
  auto hello = ch->Receive();
  if (!hello.ok()) return hello.status();
  if (auto s = CheckHello(*hello, me); !s.ok()) return s;
  const std::string& theirs = hello->hello().nonce();
  if (auto s = ch->Send(AuthFrame(Proof(key, "primary", theirs, mine))); !s.ok()) return s;
  if (auto s = CheckProof(ch->Receive(), Proof(key, "mirror", mine, theirs)); !s.ok()) return s;
  return ch;
}

absl::StatusOr<std::unique_ptr<Channel>> Channel::Accept(tcp::socket socket, const Identity& me,
                                                         const std::string& key,
                                                         std::chrono::milliseconds timeout,
                                                         uint64_t* peer_session) {
  std::unique_ptr<Channel> ch(new Channel(std::move(socket), timeout));
  auto hello = ch->Receive();
  if (!hello.ok()) return hello.status();
  if (auto s = CheckHello(*hello, me); !s.ok()) return s;
  const std::string& theirs = hello->hello().nonce();
  std::string mine = Nonce();
  if (auto s = ch->Send(HelloFrame(me, mine, 0)); !s.ok()) return s;
  if (auto s = CheckProof(ch->Receive(), Proof(key, "primary", mine, theirs)); !s.ok()) return s;
  if (auto s = ch->Send(AuthFrame(Proof(key, "mirror", theirs, mine))); !s.ok()) return s;
  *peer_session = hello->hello().session();
  return ch;
}

absl::Status Channel::Send(const pb::Frame& frame) {
  std::string body = frame.SerializeAsString();
  if (body.size() > kMaxFrameBytes) return absl::InternalError("frame too large to send");
  uint32_t n = static_cast<uint32_t>(body.size());
  uint8_t header[4] = {static_cast<uint8_t>(n), static_cast<uint8_t>(n >> 8),
                       static_cast<uint8_t>(n >> 16), static_cast<uint8_t>(n >> 24)};
  iovec iov[2] = {{header, sizeof(header)}, {body.data(), body.size()}};
  std::lock_guard<std::mutex> lock(send_mu_);
  for (;;) {
    absl::Status s = vmm::WriteFully(socket_.native_handle(), iov, 2, send_what_);
    if (s.ok()) break;
    // A peer that cannot take more (a mirror in a long commit) but is heard from is alive: its
    // sends are what the timeout measures, so the write goes on.
    if (s.code() != absl::StatusCode::kDeadlineExceeded ||
        std::chrono::steady_clock::now() - last_receive() > timeout_) {
      return s;
    }
  }
  bytes_sent_ += 4 + body.size();
  last_send_ = std::chrono::steady_clock::now();
  return absl::OkStatus();
}

void Channel::KeepAlive(std::chrono::milliseconds idle) {
  keepalive_ = std::thread([this, idle] {
    pb::Frame keepalive;
    keepalive.set_keepalive(true);
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(keepalive_mu_);
        if (keepalive_cv_.wait_for(lock, idle / 2, [this] { return shut_; })) return;
      }
      bool due;
      {
        std::lock_guard<std::mutex> send_lock(send_mu_);
        due = std::chrono::steady_clock::now() - last_send_ >= idle;
      }
      if (due && !Send(keepalive).ok()) return;
    }
  });
}

Channel::~Channel() {
  Shutdown();
  if (keepalive_.joinable()) keepalive_.join();
}

absl::StatusOr<pb::Frame> Channel::Receive() {
  for (;;) {
    auto f = ReceiveFrame();
    if (f.ok()) {
      last_receive_ns_ = std::chrono::steady_clock::now().time_since_epoch().count();
      if (on_frame_) on_frame_();
    }
    if (!f.ok() || !f->has_keepalive()) return f;
  }
}

absl::StatusOr<pb::Frame> Channel::ReceiveFrame() {
  uint8_t header[4];
  if (auto s = vmm::ReadFully(socket_.native_handle(), header, sizeof(header), receive_what_);
      !s.ok())
    return s;
  uint32_t n =
      header[0] | (header[1] << 8) | (header[2] << 16) | (static_cast<uint32_t>(header[3]) << 24);
  if (n == 0 || n > kMaxFrameBytes) {
    return absl::DataLossError(absl::StrCat("frame of ", n, " bytes from ", peer_, " (1 to ",
                                            kMaxFrameBytes, " allowed)"));
  }
  std::string body(n, '\0');
  if (auto s = vmm::ReadFully(socket_.native_handle(), body.data(), n, receive_what_); !s.ok()) {
    return s;
  }
  pb::Frame f;
  if (!f.ParseFromString(body))
    return absl::DataLossError(absl::StrCat("malformed frame from ", peer_));
  return f;
}

void Channel::Shutdown() {
  {
    std::lock_guard<std::mutex> lock(keepalive_mu_);
    shut_ = true;
  }
  keepalive_cv_.notify_all();
  ::shutdown(socket_.native_handle(), SHUT_RDWR);
}

}  // namespace romulus::replicator
