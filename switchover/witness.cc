// The witness: one UDP socket, one thread, a table of leases. Every request must echo the
// challenge the witness last gave its node, so a captured request cannot be replayed to extend
// or take a lease.
// clang-format off
// Boost 1.74 uses std::exchange without including <utility>: include it first.
#include <utility>
#include <boost/asio.hpp>
// clang-format on
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <optional>
#include <thread>

#include "absl/strings/str_cat.h"
#include "replicator/replicator.h"
#include "switchover/authority.h"
#include "switchover/datagram.h"
#include "switchover/switchover.h"

namespace romulus::switchover {
namespace {

namespace asio = boost::asio;
using asio::ip::udp;
using std::chrono::milliseconds;

constexpr size_t kNonceBytes = 16;
constexpr uint32_t kStateVersion = 1;
constexpr size_t kMaxStateBytes = 16 << 20;
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

class WitnessImpl : public Witness {
 public:
  explicit WitnessImpl(Options o) : o_(std::move(o)), socket_(io_) {}

  ~WitnessImpl() override {
    io_.stop();
    if (thread_.joinable()) thread_.join();
  }

  absl::Status Open() {
    if (o_.lease.count() <= 0 || o_.lease.count() > kMaxLeaseMs) {
      return absl::InvalidArgumentError(absl::StrCat("lease must be 1 to ", kMaxLeaseMs, " ms"));
    }
    auto records = LoadState();
    if (!records.ok()) return records.status();
    terms_.emplace(o_.lease, o_.max_entries, std::move(*records), Persister(), Clock::now());
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
    for (const TermTable::Holder& h : terms_->holders(Clock::now())) {
      out.push_back({h.vm_id, h.node, h.remaining, h.term});
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
    auto key = std::make_pair(r.vm_id(), r.node());
    auto nonce = nonces_.find(key);
    if (nonce == nonces_.end()) {
      if (nonces_.size() >= o_.max_entries) {
        ++rejected_;
        out.set_request_id(r.request_id());
        out.set_reason("witness is tracking too many nodes");
        return out;
      }
      nonce = nonces_.emplace(key, RandomBytes(kNonceBytes)).first;
    }
    if (!replicator::SameMac(r.nonce(), nonce->second)) {
      if (!r.nonce().empty()) ++rejected_;
      out.set_request_id(r.request_id());
      out.set_next_nonce(nonce->second);  // a challenge: the node asks again with it
      out.set_reason("challenge");
      return out;
    }
    out = terms_->Decide(r, now, log);
    out.set_request_id(r.request_id());
    nonce->second = RandomBytes(kNonceBytes);
    out.set_next_nonce(nonce->second);
    return out;
  }

  // The terms as the state file has them. A witness without its state file would grant terms
  // that were granted before: it starts only when told this is a first start (init).
  absl::StatusOr<TermTable::Records> LoadState() {
    TermTable::Records records;
    if (o_.state_path.empty()) return records;
    std::ifstream in(o_.state_path, std::ios::binary);
    if (!in) {
      if (errno != ENOENT) {
        return absl::UnavailableError(
            absl::StrCat("witness state ", o_.state_path, ": ", std::strerror(errno)));
      }
      if (!o_.init) {
        return absl::FailedPreconditionError(absl::StrCat(
            "witness state ", o_.state_path,
            " does not exist: without it this witness could grant a term that was granted "
            "before. If this is the witness's first start, or no host runs any of its VMs, "
            "start it once with --init"));
      }
      if (auto s = Persist(records); !s.ok()) return s;
      return records;
    }
    if (o_.init) {
      return absl::FailedPreconditionError(absl::StrCat(
          "--init: witness state ", o_.state_path,
          " exists already; it holds the terms hosts run in (remove it only if no host runs any "
          "of its VMs)"));
    }
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    pb::WitnessState state;
    if (bytes.size() > kMaxStateBytes || !state.ParseFromString(bytes) ||
        state.version() != kStateVersion) {
      return absl::DataLossError(absl::StrCat("witness state ", o_.state_path,
                                              " is damaged or of another version: not starting"));
    }
    for (const pb::WitnessTerm& t : state.vm()) {
      if (t.vm_id().empty() || t.vm_id().size() > kMaxNameBytes ||
          t.holder().size() > kMaxNameBytes || t.confirmed() > t.term() ||
          t.ran_from() >= std::max<uint64_t>(t.term(), 1)) {
        return absl::DataLossError(
            absl::StrCat("witness state ", o_.state_path, " holds a damaged record: not starting"));
      }
      records[t.vm_id()] = {.term = t.term(),
                            .confirmed = t.confirmed(),
                            .holder = t.holder(),
                            .ran_from = t.ran_from()};
    }
    return records;
  }

  absl::Status Persist(const TermTable::Records& records) {
    pb::WitnessState state;
    state.set_version(kStateVersion);
    for (const auto& [vm, r] : records) {
      pb::WitnessTerm* t = state.add_vm();
      t->set_vm_id(vm);
      t->set_term(r.term);
      t->set_confirmed(r.confirmed);
      t->set_holder(r.holder);
      t->set_ran_from(r.ran_from);
    }
    return WriteFileDurably(o_.state_path, state.SerializeAsString());
  }

  TermTable::PersistFn Persister() {
    if (o_.state_path.empty()) return nullptr;
    return [this](const TermTable::Records& records) { return Persist(records); };
  }

  Options o_;
  asio::io_context io_;
  udp::socket socket_;
  udp::endpoint from_;
  std::array<char, kMaxDatagramBytes + 1> buffer_;
  uint16_t port_ = 0;
  std::thread thread_;
  mutable std::mutex mu_;
  std::optional<TermTable> terms_;
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
