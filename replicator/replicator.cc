// clang-format off
// Boost 1.74 uses std::exchange without including <utility>: include it first.
#include <utility>
#include <boost/asio.hpp>
// clang-format on
#include "replicator/replicator.h"

#include <sys/random.h>
#include <sys/socket.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <fstream>
#include <mutex>
#include <sstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "replicator/channel.h"

namespace romulus::replicator {
namespace {

namespace asio = boost::asio;
using asio::ip::tcp;
using checkpoint::Checkpoint;
constexpr uint64_t kPage = 4096;
constexpr size_t kDiskBytesPerBatch = 1 << 20;

void Log(const LogFn& log, const std::string& line) {
  if (log) log(line);
}

}  // namespace

absl::StatusOr<std::string> ReadKeyFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read key file ", path));
  std::string key((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  while (!key.empty() && (key.back() == '\n' || key.back() == '\r')) key.pop_back();
  if (key.size() < 16 || key.size() > 4096) {
    return absl::InvalidArgumentError(
        absl::StrCat("key file ", path, " holds ", key.size(), " bytes; 16 to 4096 needed"));
  }
  return key;
}

std::vector<pb::Frame> CheckpointFrames(const Checkpoint& c) {
  std::vector<pb::Frame> frames;
  for (size_t i = 0; i < c.gfns.size(); i += kPagesPerBatch) {
    size_t n = std::min(kPagesPerBatch, c.gfns.size() - i);
    pb::Frame f;
    pb::PageBatch* b = f.mutable_pages();
    b->set_epoch(c.epoch);
    for (size_t j = i; j < i + n; j++) {
      b->add_gfns(c.gfns[j]);
      b->add_hashes(c.hashes[j]);
    }
    b->set_data(reinterpret_cast<const char*>(c.pages.data() + i * kPage), n * kPage);
    frames.push_back(std::move(f));
  }
  pb::Frame disk;
  size_t batched = 0;
  for (const checkpoint::DiskWrite& w : c.disk_writes) {
    if (batched + w.data.size() > kDiskBytesPerBatch && batched > 0) {
      frames.push_back(std::move(disk));
      disk = pb::Frame();
      batched = 0;
    }
    pb::DiskWriteBatch* b = disk.mutable_disk();
    b->set_epoch(c.epoch);
    b->add_sectors(w.sector);
    b->add_data(w.data);
    batched += w.data.size();
  }
  if (batched > 0) frames.push_back(std::move(disk));
  pb::Frame t;
  pb::CheckpointTrailer* tr = t.mutable_trailer();
  tr->set_epoch(c.epoch);
  tr->set_full(c.full);
  tr->set_pages(c.gfns.size());
  tr->set_disk_writes(c.disk_writes.size());
  *tr->mutable_state() = c.state;
  tr->set_digest(c.digest);
  frames.push_back(std::move(t));
  return frames;
}

absl::StatusOr<std::optional<Checkpoint>> CheckpointAssembler::Add(pb::Frame f) {
  auto epoch_ok = [&](uint64_t epoch) -> absl::Status {
    if (!started_) {
      started_ = true;
      cp_ = Checkpoint();
      cp_.epoch = epoch;
      disk_bytes_received_ = 0;
    } else if (epoch != cp_.epoch) {
      return absl::DataLossError(
          absl::StrCat("frame of epoch ", epoch, " inside checkpoint ", cp_.epoch));
    }
    return absl::OkStatus();
  };
  if (f.has_pages()) {
    pb::PageBatch& b = *f.mutable_pages();
    if (auto s = epoch_ok(b.epoch()); !s.ok()) return s;
    size_t n = static_cast<size_t>(b.gfns_size());
    if (n == 0 || n > kPagesPerBatch || static_cast<size_t>(b.hashes_size()) != n ||
        b.data().size() != n * kPage) {
      return absl::DataLossError("page batch with inconsistent counts or sizes");
    }
    if (cp_.gfns.size() + n > memory_pages_) {
      return absl::DataLossError("more pages than guest memory holds");
    }
    cp_.gfns.insert(cp_.gfns.end(), b.gfns().begin(), b.gfns().end());
    cp_.hashes.insert(cp_.hashes.end(), b.hashes().begin(), b.hashes().end());
    cp_.pages.insert(cp_.pages.end(), b.data().begin(), b.data().end());
    return std::nullopt;
  }
  if (f.has_disk()) {
    pb::DiskWriteBatch& b = *f.mutable_disk();
    if (auto s = epoch_ok(b.epoch()); !s.ok()) return s;
    if (b.sectors_size() != b.data_size() || b.sectors_size() == 0) {
      return absl::DataLossError("disk batch with inconsistent counts");
    }
    for (int i = 0; i < b.sectors_size(); i++) {
      disk_bytes_received_ += b.data(i).size();
      // A guest rewrites its journal's last sector often: allow some rewriting, not unbounded.
      if (disk_bytes_received_ > std::max<uint64_t>(2 * disk_bytes_, 64ull << 20)) {
        return absl::DataLossError("more disk writes in one checkpoint than allowed");
      }
      cp_.disk_writes.push_back({b.sectors(i), std::move(*b.mutable_data(i))});
    }
    return std::nullopt;
  }
  if (f.has_trailer()) {
    pb::CheckpointTrailer& t = *f.mutable_trailer();
    if (auto s = epoch_ok(t.epoch()); !s.ok()) return s;
    started_ = false;
    if (t.pages() != cp_.gfns.size() || t.disk_writes() != cp_.disk_writes.size()) {
      return absl::DataLossError(
          absl::StrCat("checkpoint ", t.epoch(), " is truncated: trailer says ", t.pages(),
                       " pages and ", t.disk_writes(), " disk writes, received ", cp_.gfns.size(),
                       " and ", cp_.disk_writes.size()));
    }
    cp_.full = t.full();
    cp_.state = std::move(*t.mutable_state());
    cp_.digest = t.digest();
    return std::optional<Checkpoint>(std::move(cp_));
  }
  return absl::DataLossError("unexpected frame in the checkpoint stream");
}

namespace {

class MirrorImpl : public Mirror {
 public:
  MirrorImpl(checkpoint::ReplicaStore& replica, Options options)
      : replica_(replica), options_(std::move(options)), acceptor_(io_) {}

  ~MirrorImpl() override {
    stop_ = true;
    ::shutdown(acceptor_.native_handle(), SHUT_RDWR);
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (channel_) channel_->Shutdown();
    }
    if (thread_.joinable()) thread_.join();
  }

  absl::Status Listen() {
    boost::system::error_code ec;
    auto addr = asio::ip::make_address(options_.listen, ec);
    if (ec)
      return absl::InvalidArgumentError(absl::StrCat("bad listen address '", options_.listen, "'"));
    tcp::endpoint ep(addr, options_.port);
    acceptor_.open(ep.protocol(), ec);
    if (!ec) acceptor_.set_option(tcp::acceptor::reuse_address(true), ec);
    if (!ec) acceptor_.bind(ep, ec);
    if (!ec) acceptor_.listen(4, ec);
    if (ec) {
      return absl::UnavailableError(absl::StrCat("mirror cannot listen on ", options_.listen, ":",
                                                 options_.port, ": ", ec.message()));
    }
    port_ = acceptor_.local_endpoint().port();
    thread_ = std::thread([this] { Serve(); });
    return absl::OkStatus();
  }

  uint16_t port() const override { return port_; }

  Stats stats() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return stats_;
  }

  void WithReplica(const std::function<void(checkpoint::ReplicaStore&)>& fn) override {
    std::lock_guard<std::mutex> lock(apply_mu_);
    fn(replica_);
  }

 private:
  void Serve() {
    while (!stop_) {
      tcp::socket socket(io_);
      boost::system::error_code ec;
      acceptor_.accept(socket, ec);
      if (ec || stop_) return;
      uint64_t session = 0;
      auto ch = Channel::Accept(std::move(socket), options_.identity, options_.key,
                                options_.peer_timeout, &session);
      if (!ch.ok()) {
        Reject(absl::StrCat("refused a primary: ", ch.status().message()));
        continue;
      }
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (stop_) return;  // stopped during the handshake: the channel was not there to shut
        channel_ = std::move(*ch);
        stats_.connections++;
        stats_.connected = true;
      }
      Log(options_.log, absl::StrCat("primary ", channel_->peer(), " connected"));
      if (session != session_) {
        session_ = session;
        std::lock_guard<std::mutex> lock(apply_mu_);
        replica_.ExpectFullCheckpoint();
      }
      absl::Status why = Receive(*channel_);
      {
        std::lock_guard<std::mutex> lock(mu_);
        stats_.connected = false;
        channel_->Shutdown();
      }
      if (!stop_) Log(options_.log, absl::StrCat("primary disconnected: ", why.message()));
      std::lock_guard<std::mutex> lock(mu_);
      channel_.reset();
    }
  }

  void Reject(const std::string& line) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stats_.rejected++;
    }
    Log(options_.log, line);
  }

  // Receives checkpoints until the connection fails or the peer sends something bad.
  absl::Status Receive(Channel& ch) {
    CheckpointAssembler assembler(replica_.memory_bytes(), replica_.disk_bytes());
    while (!stop_) {
      auto f = ch.Receive();
      if (!f.ok()) return f.status();
      {
        std::lock_guard<std::mutex> lock(mu_);
        stats_.bytes += static_cast<uint64_t>(f->ByteSizeLong()) + 4;
      }
      auto cp = assembler.Add(std::move(*f));
      if (!cp.ok()) {
        Reject(absl::StrCat("dropping primary ", ch.peer(), ": ", cp.status().message()));
        return cp.status();
      }
      if (!cp->has_value()) continue;
      absl::Status applied;
      {
        std::lock_guard<std::mutex> lock(apply_mu_);
        applied = replica_.Apply(**cp);
      }
      if (!applied.ok()) {
        Reject(absl::StrCat("dropping primary ", ch.peer(), ": ", applied.message()));
        return applied;
      }
      {
        std::lock_guard<std::mutex> lock(mu_);
        stats_.checkpoints++;
        stats_.committed_epoch = static_cast<int64_t>((*cp)->epoch);
      }
      pb::Frame ack;
      ack.mutable_ack()->set_epoch((*cp)->epoch);
      if (auto s = ch.Send(ack); !s.ok()) return s;
    }
    return absl::CancelledError("stopping");
  }

  checkpoint::ReplicaStore& replica_;
  Options options_;
  asio::io_context io_;
  tcp::acceptor acceptor_;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  uint16_t port_ = 0;
  uint64_t session_ = 0;
  std::mutex apply_mu_;    // held while a checkpoint is applied
  mutable std::mutex mu_;  // stats and the current channel
  std::unique_ptr<Channel> channel_;
  Stats stats_;
};

class PrimaryImpl : public Primary {
 public:
  PrimaryImpl(checkpoint::EpochEngine& engine, vmm::OutputGate& gate, Options options)
      : engine_(engine), gate_(gate), options_(std::move(options)) {
    if (::getrandom(&session_, sizeof(session_), 0) != sizeof(session_)) std::abort();
    session_ |= 1;
    SetState(options_.run_unprotected ? "no mirror: running UNPROTECTED, outputs released"
                                      : "no mirror yet: outputs held until one commits");
    if (options_.run_unprotected) gate_.SetHolding(false);
  }

  ~PrimaryImpl() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
      if (channel_) channel_->Shutdown();
    }
    cv_.notify_all();
    if (epoch_thread_.joinable()) epoch_thread_.join();
    if (connect_thread_.joinable()) connect_thread_.join();
  }

  void Start() {
    epoch_thread_ = std::thread([this] { EpochLoop(); });
    connect_thread_ = std::thread([this] { ConnectLoop(); });
  }

  Stats stats() const override {
    std::lock_guard<std::mutex> lock(mu_);
    Stats s = stats_;
    s.connected = connected_;
    s.held_outputs = gate_.held();
    auto e = engine_.stats();
    s.lag_epochs = e.epochs > e.acknowledged ? e.epochs - e.acknowledged : 0;
    return s;
  }

 private:
  void SetState(std::string state) {
    std::lock_guard<std::mutex> lock(mu_);
    if (state != stats_.state) {
      stats_.state = state;
      Log(options_.log, state);
    }
  }

  // Takes a checkpoint every epoch while a mirror is connected and queues it for sending.
  void EpochLoop() {
    auto next = std::chrono::steady_clock::now();
    std::unique_lock<std::mutex> lock(mu_);
    while (!stop_) {
      next += options_.epoch;
      auto now = std::chrono::steady_clock::now();
      if (next < now) next = now;  // a stretched epoch: start the next one now
      cv_.wait_until(lock, next, [this] { return stop_; });
      if (stop_ || !connected_) continue;
      lock.unlock();
      auto cp = engine_.TakeCheckpoint(std::chrono::milliseconds(1000));
      lock.lock();
      if (!cp.ok()) continue;  // budget spent (mirror slow) or connection restarted: retry
      stats_.checkpoints++;
      if (!(*cp)->full) stats_.dirty_pages += (*cp)->gfns.size();
      auto pause = engine_.stats().last_pause_ms;
      stats_.pause_ms.push_back(pause);
      if (stats_.pause_ms.size() > 2000)
        stats_.pause_ms.erase(stats_.pause_ms.begin(), stats_.pause_ms.begin() + 1000);
      queue_.push_back(*cp);
      cv_.notify_all();
    }
  }

  void ConnectLoop() {
    asio::io_context io;
    std::string last_error;
    while (true) {
      {
        std::unique_lock<std::mutex> lock(mu_);
        if (stop_) return;
      }
      auto ch = Channel::Connect(io, options_.mirror_host, options_.mirror_port, options_.identity,
                                 options_.key, session_, options_.peer_timeout);
      if (!ch.ok()) {
        std::string err(ch.status().message());
        if (err != last_error) Log(options_.log, absl::StrCat("mirror unreachable: ", err));
        last_error = err;
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait_for(lock, std::chrono::milliseconds(200), [this] { return stop_; });  // back-off
        continue;
      }
      last_error.clear();
      if (options_.run_unprotected) gate_.SetHolding(true);
      engine_.Restart();  // the first checkpoint on a connection carries everything
      {
        std::lock_guard<std::mutex> lock(mu_);
        channel_ = std::move(*ch);
        queue_.clear();
        ack_failed_ = false;  // a failure of the previous connection's ack reader is history
        connected_ = true;
        stats_.resyncs++;
      }
      SetState(absl::StrCat("protected: replicating to ", channel_->peer()));
      std::thread acks([this] { AckLoop(); });
      absl::Status why = SendLoop();
      channel_->Shutdown();
      acks.join();
      {
        std::lock_guard<std::mutex> lock(mu_);
        connected_ = false;
        queue_.clear();
        channel_.reset();
      }
      engine_.Restart();
      if (why.code() == absl::StatusCode::kCancelled) return;  // stopping, not a lost mirror
      if (options_.run_unprotected) gate_.SetHolding(false);
      SetState(absl::StrCat(options_.run_unprotected ? "mirror lost, running UNPROTECTED: "
                                                     : "mirror lost, outputs held: ",
                            why.message()));
    }
  }

  absl::Status SendLoop() {
    for (;;) {
      std::shared_ptr<const Checkpoint> cp;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [this] { return stop_ || !queue_.empty() || ack_failed_; });
        if (stop_) return absl::CancelledError("stopping");
        if (ack_failed_) {
          ack_failed_ = false;
          return ack_error_;
        }
        cp = queue_.front();
        queue_.pop_front();
      }
      for (const pb::Frame& f : CheckpointFrames(*cp)) {
        if (auto s = channel_->Send(f); !s.ok()) return s;
      }
      std::lock_guard<std::mutex> lock(mu_);
      stats_.bytes_sent = channel_->bytes_sent();
    }
  }

  void AckLoop() {
    for (;;) {
      auto f = channel_->Receive();
      if (!f.ok() || !f->has_ack()) {
        std::lock_guard<std::mutex> lock(mu_);
        ack_failed_ = true;
        ack_error_ =
            f.ok() ? absl::DataLossError("mirror sent something other than an ack") : f.status();
        cv_.notify_all();
        return;
      }
      engine_.Acknowledge(f->ack().epoch());
      std::lock_guard<std::mutex> lock(mu_);
      stats_.acked++;
    }
  }

  checkpoint::EpochEngine& engine_;
  vmm::OutputGate& gate_;
  Options options_;
  uint64_t session_ = 0;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false, connected_ = false, ack_failed_ = false;
  absl::Status ack_error_;
  std::deque<std::shared_ptr<const Checkpoint>> queue_;
  std::unique_ptr<Channel> channel_;
  Stats stats_;
  std::thread epoch_thread_, connect_thread_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Mirror>> Mirror::Start(checkpoint::ReplicaStore& replica,
                                                      Options options) {
  auto m = std::make_unique<MirrorImpl>(replica, std::move(options));
  if (auto s = m->Listen(); !s.ok()) return s;
  return m;
}

absl::StatusOr<std::unique_ptr<Primary>> Primary::Start(checkpoint::EpochEngine& engine,
                                                        vmm::OutputGate& gate, Options options) {
  if (options.epoch < std::chrono::milliseconds(5) ||
      options.epoch > std::chrono::milliseconds(1000)) {
    return absl::InvalidArgumentError("the epoch must be 5 to 1000 ms");
  }
  auto p = std::make_unique<PrimaryImpl>(engine, gate, std::move(options));
  p->Start();
  return p;
}

}  // namespace romulus::replicator
