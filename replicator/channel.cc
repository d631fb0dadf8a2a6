#include "replicator/channel.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <poll.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

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

// A frame's length prefix: little-endian, what follows it (the tag included).
void PutLength(uint8_t* p, uint32_t n) {
  for (int i = 0; i < 4; i++) p[i] = static_cast<uint8_t>(n >> (8 * i));
}

std::string Proof(const std::string& key, absl::string_view role, absl::string_view transcript) {
  return Hmac(key, absl::StrCat("romulus-", role, transcript));
}

pb::Frame HelloFrame(const Channel::Terms& me, const std::string& nonce, uint64_t session) {
  pb::Frame f;
  pb::Hello* h = f.mutable_hello();
  h->set_protocol_version(kProtocolVersion);
  h->set_vm_id(me.identity.vm_id);
  h->set_memory_bytes(me.identity.memory_bytes);
  h->set_disk_bytes(me.identity.disk_bytes);
  h->set_platform(me.identity.platform);
  h->set_nonce(nonce);
  h->set_session(session);
  h->set_cipher(me.protection.cipher);
  h->set_encrypt(me.protection.encrypt);
  h->set_postcopy(me.postcopy);
  h->set_term(me.term);
  if (me.bond != 0) {
    h->set_bond(me.bond);
    h->set_path_index(me.path_index);
    h->set_path_count(me.path_count);
  }
  return f;
}

// Checks the peer's Hello against what this side serves.
absl::Status CheckHello(const pb::Frame& f, const Channel::Terms& terms) {
  const Identity& me = terms.identity;
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
  if (h.bond() != 0 &&
      (h.path_count() < 1 || h.path_count() > kMaxPaths || h.path_index() >= h.path_count())) {
    return absl::InvalidArgumentError(absl::StrCat("path ", h.path_index(), " of ", h.path_count(),
                                                   " (1 to ", kMaxPaths, " paths allowed)"));
  }
  if (h.cipher() != terms.protection.cipher) {
    return absl::FailedPreconditionError(absl::StrCat("peer protects frames with ",
                                                      CipherName(h.cipher()), ", this side with ",
                                                      CipherName(terms.protection.cipher)));
  }
  if (h.encrypt() != terms.protection.encrypt) {
    return absl::FailedPreconditionError(absl::StrCat(
        "peer ", h.encrypt() ? "encrypts" : "sends in clear (encryption: off)", ", this side ",
        terms.protection.encrypt ? "encrypts" : "sends in clear (encryption: off)",
        ": both ends must agree"));
  }
  return absl::OkStatus();
}

absl::Status CheckProof(const absl::StatusOr<pb::Frame>& f, const std::string& expected) {
  if (!f.ok()) return f.status();
  if (!f->has_auth() || !SameMac(f->auth().hmac(), expected)) {
    return absl::PermissionDeniedError(
        "authentication failed (wrong pre-shared key, or the handshake was altered on the way)");
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

TcpChannel::TcpChannel(tcp::socket socket, std::chrono::milliseconds timeout)
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
                                                          const Terms& terms, uint64_t session,
                                                          std::chrono::milliseconds timeout) {
  boost::system::error_code ec;
  auto addr = asio::ip::make_address(host == "localhost" ? "127.0.0.1" : host, ec);
  if (ec) return absl::InvalidArgumentError(absl::StrCat("'", host, "' is not an IP address"));
  tcp::socket socket(io);
  // Within the timeout: a path whose packets vanish must not hold a connection attempt for the
  // kernel's minutes of SYN retries.
  socket.open(addr.is_v4() ? tcp::v4() : tcp::v6(), ec);
  if (!ec) socket.non_blocking(true, ec);
  if (!ec) {
    // Asio's connect waits for an unfinished connection whatever the mode: connect(2) itself.
    tcp::endpoint ep(addr, port);
    if (::connect(socket.native_handle(), ep.data(), static_cast<socklen_t>(ep.size())) != 0) {
      ec = boost::system::error_code(errno, boost::system::system_category());
    }
    if (ec.value() == EINPROGRESS) {
      pollfd pfd{socket.native_handle(), POLLOUT, 0};
      int n = ::poll(&pfd, 1, static_cast<int>(timeout.count()));
      int err = 0;
      socklen_t len = sizeof(err);
      if (n == 0) {
        err = ETIMEDOUT;
      } else if (n < 0) {
        err = errno;
      } else {
        ::getsockopt(socket.native_handle(), SOL_SOCKET, SO_ERROR, &err, &len);
      }
      ec = err ? boost::system::error_code(err, boost::system::system_category())
               : boost::system::error_code();
    }
  }
  if (!ec) socket.non_blocking(false, ec);
  if (ec)
    return absl::UnavailableError(
        absl::StrCat("connect to mirror ", host, ":", port, ": ", ec.message()));
  std::unique_ptr<TcpChannel> ch(new TcpChannel(std::move(socket), timeout));
  Terms mine = terms;
  if (mine.protection.cipher == pb::FRAME_CIPHER_UNSPECIFIED) {
    mine.protection.cipher = CheapestCipher();
  }
  std::string hello = HelloFrame(mine, Nonce(), session).SerializeAsString();
  if (auto s = ch->SendBody(hello); !s.ok()) return s;
  std::string their_hello;
  auto theirs = ch->ReceiveFrame(&their_hello);
  if (!theirs.ok()) return theirs.status();
  if (auto s = CheckHello(*theirs, mine); !s.ok()) return s;
  std::string transcript = HandshakeTranscript(hello, their_hello);
  if (auto s = ch->Send(AuthFrame(Proof(terms.key, "primary", transcript))); !s.ok()) return s;
  if (auto s = CheckProof(ch->ReceiveFrame(), Proof(terms.key, "mirror", transcript)); !s.ok()) {
    return s;
  }
  SessionKeys keys = DeriveSessionKeys(terms.key, transcript);
  if (auto s = ch->Protect(mine.protection, keys.primary_to_mirror, keys.mirror_to_primary);
      !s.ok()) {
    return s;
  }
  return ch;
}

absl::StatusOr<std::unique_ptr<Channel>> Channel::Accept(tcp::socket socket, const Terms& terms,
                                                         std::chrono::milliseconds timeout,
                                                         uint64_t* peer_session,
                                                         pb::Hello* peer_hello) {
  std::unique_ptr<TcpChannel> ch(new TcpChannel(std::move(socket), timeout));
  std::string their_hello;
  auto theirs = ch->ReceiveFrame(&their_hello);
  if (!theirs.ok()) return theirs.status();
  // The primary chooses the cipher (its CPU does most of the sealing); this side repeats it.
  // The benchmarks' unprotected baseline only ever meets itself.
  Terms mine = terms;
  pb::FrameCipher proposed = theirs->has_hello() ? theirs->hello().cipher() : pb::AES_256_GCM;
  if ((proposed == pb::AES_256_GCM || proposed == pb::CHACHA20_POLY1305) &&
      terms.protection.cipher != pb::FRAME_CIPHER_NONE) {
    mine.protection.cipher = proposed;
  }
  if (auto s = CheckHello(*theirs, mine); !s.ok()) return s;
  std::string hello = HelloFrame(mine, Nonce(), 0).SerializeAsString();
  if (auto s = ch->SendBody(hello); !s.ok()) return s;
  std::string transcript = HandshakeTranscript(their_hello, hello);
  if (auto s = CheckProof(ch->ReceiveFrame(), Proof(terms.key, "primary", transcript)); !s.ok()) {
    return s;
  }
  if (auto s = ch->Send(AuthFrame(Proof(terms.key, "mirror", transcript))); !s.ok()) return s;
  SessionKeys keys = DeriveSessionKeys(terms.key, transcript);
  if (auto s = ch->Protect(mine.protection, keys.mirror_to_primary, keys.primary_to_mirror);
      !s.ok()) {
    return s;
  }
  *peer_session = theirs->hello().session();
  if (peer_hello) *peer_hello = theirs->hello();
  return ch;
}

absl::Status TcpChannel::Protect(const Protection& protection, absl::string_view send_key,
                                 absl::string_view receive_key) {
  auto sealer = FrameSealer::Create(protection.cipher, protection.encrypt, send_key);
  if (!sealer.ok()) return sealer.status();
  auto opener = FrameSealer::Create(protection.cipher, protection.encrypt, receive_key);
  if (!opener.ok()) return opener.status();
  opener_ = std::move(*opener);
  std::lock_guard<std::mutex> lock(send_mu_);
  sealer_ = std::move(*sealer);
  protection_ = protection;
  return absl::OkStatus();
}

std::string TcpChannel::protection() const {
  return absl::StrCat(CipherName(protection_.cipher), protection_.encrypt ? "" : ", in clear");
}

std::vector<PathStats> TcpChannel::paths() const {
  return {{peer_, true, bytes_sent_.load(), bytes_received_.load(), 0, ""}};
}

absl::Status TcpChannel::SendBody(const std::string& body) {
  if (body.size() > kMaxFrameBytes) return absl::InternalError("frame too large to send");
  std::string frame(4 + body.size(), '\0');
  auto* p = reinterpret_cast<uint8_t*>(frame.data());
  PutLength(p, static_cast<uint32_t>(body.size()));
  std::memcpy(p + 4, body.data(), body.size());
  std::lock_guard<std::mutex> lock(send_mu_);
  return WriteFrame(frame);
}

absl::Status TcpChannel::Send(const pb::Frame& frame) {
  size_t n = frame.ByteSizeLong();
  if (n > kMaxFrameBytes) return absl::InternalError("frame too large to send");
  // Header, body and tag in one buffer: one write, and the body is sealed where it lies.
  std::string buf;
  {
    std::lock_guard<std::mutex> lock(send_mu_);
    size_t tag = sealer_ ? sealer_->tag_bytes() : 0;
    buf.resize(4 + n + tag);
    auto* p = reinterpret_cast<uint8_t*>(buf.data());
    frame.SerializeWithCachedSizesToArray(p + 4);
    PutLength(p, static_cast<uint32_t>(n + tag));
    if (sealer_) {
      if (auto s = sealer_->Seal(absl::string_view(buf.data(), 4), p + 4, n, p + 4 + n); !s.ok()) {
        return s;
      }
    }
    return WriteFrame(buf);
  }
}

// With send_mu_ held.
absl::Status TcpChannel::WriteFrame(std::string& frame) {
  iovec iov = {frame.data(), frame.size()};
  for (;;) {
    absl::Status s = vmm::WriteFully(socket_.native_handle(), &iov, 1, send_what_);
    if (s.ok()) break;
    // A peer that cannot take more (a mirror in a long commit) but is heard from is alive: its
    // sends are what the timeout measures, so the write goes on.
    if (s.code() != absl::StatusCode::kDeadlineExceeded ||
        std::chrono::steady_clock::now() - last_receive() > timeout_) {
      return s;
    }
  }
  bytes_sent_ += frame.size();
  last_send_ = std::chrono::steady_clock::now();
  return absl::OkStatus();
}

void TcpChannel::KeepAlive(std::chrono::milliseconds idle) {
  keepalive_ = std::thread([this, idle] {
    vmm::NameThread("rml-keepalive");
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

TcpChannel::~TcpChannel() {
  Shutdown();
  if (keepalive_.joinable()) keepalive_.join();
}

absl::StatusOr<pb::Frame> TcpChannel::Receive() {
  for (;;) {
    auto f = ReceiveFrame();
    if (f.ok()) {
      last_receive_ns_ = std::chrono::steady_clock::now().time_since_epoch().count();
      if (on_frame_) on_frame_();
    }
    if (!f.ok() || !f->has_keepalive()) return f;
  }
}

absl::StatusOr<pb::Frame> TcpChannel::ReceiveFrame(std::string* body) {
  uint8_t header[4];
  if (auto s = vmm::ReadFully(socket_.native_handle(), header, sizeof(header), receive_what_);
      !s.ok())
    return s;
  uint32_t n =
      header[0] | (header[1] << 8) | (header[2] << 16) | (static_cast<uint32_t>(header[3]) << 24);
  size_t tag = opener_ ? opener_->tag_bytes() : 0;
  if (n <= tag || n > kMaxFrameBytes + tag) {
    return absl::DataLossError(absl::StrCat("frame of ", n, " bytes from ", peer_, " (", tag + 1,
                                            " to ", kMaxFrameBytes + tag, " allowed)"));
  }
  std::string buf(n, '\0');
  auto* p = reinterpret_cast<uint8_t*>(buf.data());
  // A frame arrives whole within the peer timeout: a length altered on the way must not leave
  // this side waiting for megabytes that keepalives would trickle in for hours.
  if (auto s = vmm::ReadFully(socket_.native_handle(), p, n, receive_what_,
                              std::chrono::steady_clock::now() + timeout_);
      !s.ok()) {
    return s;
  }
  bytes_received_ += 4 + n;
  if (opener_) {
    absl::string_view h(reinterpret_cast<const char*>(header), sizeof(header));
    if (auto s = opener_->Open(h, p, n - tag, p + n - tag); !s.ok()) {
      return absl::DataLossError(absl::StrCat(s.message(), " from ", peer_));
    }
    buf.resize(n - tag);
  }
  pb::Frame f;
  if (!f.ParseFromString(buf))
    return absl::DataLossError(absl::StrCat("malformed frame from ", peer_));
  if (body) *body = std::move(buf);
  return f;
}

void TcpChannel::Shutdown() {
  {
    std::lock_guard<std::mutex> lock(keepalive_mu_);
    shut_ = true;
  }
  keepalive_cv_.notify_all();
  ::shutdown(socket_.native_handle(), SHUT_RDWR);
}

FrameReadAhead::FrameReadAhead(Channel& channel, size_t depth)
    : channel_(channel), depth_(std::max<size_t>(depth, 1)) {
  thread_ = std::thread([this] {
    vmm::NameThread("rml-read");
    for (;;) {
      absl::StatusOr<pb::Frame> f = channel_.Receive();
      bool failed = !f.ok();
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return stop_ || frames_.size() < depth_; });
      if (stop_) return;
      frames_.push_back(std::move(f));
      cv_.notify_all();
      if (failed) return;
    }
  });
}

FrameReadAhead::~FrameReadAhead() {
  channel_.Shutdown();  // a Receive blocked on the socket returns
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

absl::StatusOr<pb::Frame> FrameReadAhead::Next(std::chrono::steady_clock::time_point until) {
  std::unique_lock<std::mutex> lock(mu_);
  if (until == std::chrono::steady_clock::time_point::max()) {
    cv_.wait(lock, [this] { return !frames_.empty(); });
  } else if (!cv_.wait_until(lock, until, [this] { return !frames_.empty(); })) {
    return absl::DeadlineExceededError("no frame in time");
  }
  absl::StatusOr<pb::Frame> f = std::move(frames_.front());
  if (f.ok()) {
    frames_.pop_front();
    cv_.notify_all();
  } else {
    frames_.front() = f.status();  // the error stays: it is the answer from now on
  }
  return f;
}

}  // namespace romulus::replicator
