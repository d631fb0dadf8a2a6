// The witness: one UDP socket, one thread, a table of leases. Every request must echo the
// challenge the witness last gave its node, so a captured request cannot be replayed to extend
// or take a lease.
// clang-format off
// Boost 1.74 uses std::exchange without including <utility>: include it first.
#include <utility>
#include <boost/asio.hpp>
// clang-format on
#include <sys/socket.h>

#include <map>
#include <mutex>
#include <thread>

#include "absl/strings/str_cat.h"
#include "replicator/replicator.h"
#include "switchover/datagram.h"
#include "switchover/switchover.h"

namespace romulus::switchover {
namespace {

namespace asio = boost::asio;
using asio::ip::udp;
using std::chrono::milliseconds;

constexpr size_t kNonceBytes = 16;
// Socket setup and receive loop: a flood of datagrams without the key must not crowd out the
// nodes' requests. Checking a datagram's MAC costs more than sending one, so a source whose
// datagrams keep failing is not read further for the rest of a window (a node's own address,
// spoofed, still authenticates now and then and is never skipped). The buffer takes a burst
// while the thread is busy, not so large that a request would wait behind a long queue.
constexpr int kReceiveBuffer = 1 << 20;
constexpr int kDrainBatch = 256;
constexpr std::chrono::milliseconds kSourceWindow{1000};
constexpr uint32_t kFailuresBeforeSkip = 64;  // in a window, with no success
constexpr size_t kMaxSources = 4096;          // tracked in a window; the rest are read as usual

struct Lease {
  std::string holder;
  Clock::time_point expiry{};
};

class WitnessImpl : public Witness {
 public:
  explicit WitnessImpl(Options o) : o_(std::move(o)), socket_(io_), started_(Clock::now()) {}

  ~WitnessImpl() override {
    io_.stop();
    if (thread_.joinable()) thread_.join();
  }

  absl::Status Open() {
    if (o_.lease.count() <= 0 || o_.lease.count() > kMaxLeaseMs) {
      return absl::InvalidArgumentError(absl::StrCat("lease must be 1 to ", kMaxLeaseMs, " ms"));
    }
    auto local = ToUdp(o_.listen);
    if (!local.ok()) return local.status();
    boost::system::error_code ec;
    socket_.open(local->protocol(), ec);
    if (!ec) socket_.bind(*local, ec);
    if (!ec) socket_.non_blocking(true, ec);
    if (!ec) {
      int size = kReceiveBuffer;
      if (::setsockopt(socket_.native_handle(), SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof(size)) !=
          0) {
        socket_.set_option(asio::socket_base::receive_buffer_size(kReceiveBuffer), ec);
      }
    }
    if (ec) {
      return absl::UnavailableError(absl::StrCat("witness: cannot listen on ", o_.listen.host, ":",
                                                 o_.listen.port, ": ", ec.message()));
    }
    port_ = socket_.local_endpoint().port();
    Receive();
    thread_ = std::thread([this] { io_.run(); });
    return absl::OkStatus();
  }

  uint16_t port() const override { return port_; }

  std::vector<Holder> holders() const override {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<Holder> out;
    auto now = Clock::now();
    for (const auto& [vm, lease] : leases_) {
      if (lease.holder.empty() || now >= lease.expiry) continue;
      out.push_back(
          {vm, lease.holder, std::chrono::duration_cast<milliseconds>(lease.expiry - now)});
    }
    return out;
  }

  uint64_t rejected() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return rejected_;
  }

 private:
  void Log(const std::string& line) {
    if (o_.log) o_.log(line);
  }

  void Receive() {
    socket_.async_wait(udp::socket::wait_read, [this](const boost::system::error_code& ec) {
      if (ec == asio::error::operation_aborted) return;
      for (int i = 0; i < kDrainBatch; i++) {
        boost::system::error_code rec;
        size_t n = socket_.receive_from(asio::buffer(buffer_), from_, 0, rec);
        if (rec == asio::error::would_block || rec == asio::error::try_again) break;
        if (!rec) ServeUnlessFlooding(absl::string_view(buffer_.data(), n));
      }
      Receive();
    });
  }

  void ServeUnlessFlooding(absl::string_view bytes) {
    auto now = Clock::now();
    if (now - window_start_ >= kSourceWindow) {
      sources_.clear();
      window_start_ = now;
    }
    auto it = sources_.find(from_);
    if (it != sources_.end() && it->second >= kFailuresBeforeSkip) {
      std::lock_guard<std::mutex> lock(mu_);
      ++rejected_;
      return;
    }
    uint64_t rejected_before = rejected();
    Serve(bytes);
    if (rejected() == rejected_before) {
      if (it != sources_.end()) sources_.erase(it);  // it speaks with the key
    } else if (it != sources_.end()) {
      ++it->second;
    } else if (sources_.size() < kMaxSources) {
      sources_.emplace(from_, 1);
    }
  }

  void Serve(absl::string_view bytes) {
    auto m = switchover::Open(o_.key, bytes);
    std::string log;
    pb::SwitchoverMessage reply;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!m.ok() || !m->has_lease_request()) {
        ++rejected_;
        return;  // nothing is said to a peer that does not know the key
      }
      const pb::LeaseRequest& r = m->lease_request();
      if (r.vm_id().empty() || r.node().empty() || r.vm_id().size() > kMaxNameBytes ||
          r.node().size() > kMaxNameBytes || r.to_node().size() > kMaxNameBytes) {
        ++rejected_;
        return;
      }
      *reply.mutable_lease_reply() = Decide(r, Clock::now(), &log);
    }
    if (!log.empty()) Log(log);
    boost::system::error_code ec;
    socket_.send_to(asio::buffer(Seal(o_.key, reply)), from_, 0, ec);
  }

  pb::LeaseReply Decide(const pb::LeaseRequest& r, Clock::time_point now, std::string* log) {
    pb::LeaseReply out;
    out.set_request_id(r.request_id());
    auto key = std::make_pair(r.vm_id(), r.node());
    auto nonce = nonces_.find(key);
    if (nonce == nonces_.end()) {
      if (nonces_.size() >= o_.max_entries) {
        ++rejected_;
        out.set_reason("witness is tracking too many nodes");
        return out;
      }
      nonce = nonces_.emplace(key, RandomBytes(kNonceBytes)).first;
    }
    Lease& lease = leases_[r.vm_id()];
    bool live = !lease.holder.empty() && now < lease.expiry;
    auto remaining = [&] {
      return live ? static_cast<uint32_t>(
                        std::chrono::duration_cast<milliseconds>(lease.expiry - now).count())
                  : 0u;
    };
    out.set_holder(live ? lease.holder : "");
    out.set_ttl_ms(remaining());
    if (!replicator::SameMac(r.nonce(), nonce->second)) {
      if (!r.nonce().empty()) ++rejected_;
      out.set_next_nonce(nonce->second);  // a challenge: the node asks again with it
      out.set_reason("challenge");
      return out;
    }
    nonce->second = RandomBytes(kNonceBytes);
    out.set_next_nonce(nonce->second);

    switch (r.op()) {
      case pb::LEASE_ACQUIRE:
        if (now - started_ < o_.lease) {
          out.set_reason(absl::StrCat(
              "witness started ", std::chrono::duration_cast<milliseconds>(now - started_).count(),
              " ms ago; it grants leases one lease period after start"));
        } else if (!live || lease.holder == r.node()) {
          if (!live) *log = absl::StrCat("lease of ", r.vm_id(), " granted to ", r.node());
          lease.holder = r.node();
          lease.expiry = now + o_.lease;
          out.set_granted(true);
          out.set_holder(r.node());
          out.set_ttl_ms(static_cast<uint32_t>(o_.lease.count()));
        } else {
          out.set_reason(
              absl::StrCat("lease held by ", lease.holder, " for another ", remaining(), " ms"));
        }
        break;
      case pb::LEASE_RELEASE:
        if (live && lease.holder == r.node()) {
          lease.holder.clear();
          *log = absl::StrCat("lease of ", r.vm_id(), " released by ", r.node());
          out.set_holder("");
          out.set_ttl_ms(0);
        }
        break;
      case pb::LEASE_TRANSFER:
        if (live && lease.holder == r.node() && !r.to_node().empty()) {
          lease.holder = r.to_node();
          lease.expiry = now + o_.lease;
          *log =
              absl::StrCat("lease of ", r.vm_id(), " handed from ", r.node(), " to ", r.to_node());
          out.set_granted(true);
          out.set_holder(r.to_node());
          out.set_ttl_ms(static_cast<uint32_t>(o_.lease.count()));
        } else {
          out.set_reason(absl::StrCat(r.node(), " does not hold the lease"));
        }
        break;
      default:
        out.set_reason("unknown lease operation");
    }
    return out;
  }

  Options o_;
  asio::io_context io_;
  udp::socket socket_;
  udp::endpoint from_;
  std::array<char, kMaxDatagramBytes + 1> buffer_;
  const Clock::time_point started_;
  uint16_t port_ = 0;
  std::thread thread_;
  mutable std::mutex mu_;
  std::map<std::string, Lease> leases_;
  std::map<std::pair<std::string, std::string>, std::string> nonces_;
  uint64_t rejected_ = 0;
  // Failed datagrams from each source in the window (receive loop only).
  std::map<udp::endpoint, uint32_t> sources_;
  Clock::time_point window_start_{};
};

}  // namespace

absl::StatusOr<std::unique_ptr<Witness>> Witness::Start(Options options) {
  auto w = std::make_unique<WitnessImpl>(std::move(options));
  if (auto s = w->Open(); !s.ok()) return s;
  return w;
}

}  // namespace romulus::switchover
