#include "replicator/bond.h"

#include <algorithm>
#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>
#include <thread>

#include "absl/strings/str_cat.h"
#include "vmm/sys.h"

namespace romulus::replicator {
namespace {

// Frames handed on before an ack goes at once (besides the timer): the sender's window is
// kWindowFrames, so acks come well before it fills.
constexpr uint64_t kAckEvery = 8;
// An ack may be lost with the path it went on (written, then the path failed): the last one goes
// again after a path fails, and at least this often, or a sender whose window is full would wait
// for ever for a confirmation that left on a dead path.
constexpr std::chrono::milliseconds kReAckInterval{100};
// What a frame may weigh in the receiver's accounting beyond its body (seq and ack fields).
constexpr size_t kFrameOverhead = 32;

class Bond final : public Channel {
 public:
  Bond(std::vector<std::unique_ptr<Channel>> channels, LogFn log) : log_(std::move(log)) {
    for (auto& c : channels) {
      auto p = std::make_unique<Path>();
      p->channel = std::move(c);
      p->channel->set_on_frame([this] { OnFrame(); });
      paths_.push_back(std::move(p));
    }
    live_ = paths_.size();
    for (size_t i = 0; i < paths_.size(); i++) {
      paths_[i]->reader = std::thread([this, i] {
        vmm::NameThread("rml-bond-rx");
        ReadLoop(i);
      });
      paths_[i]->sender = std::thread([this, i] {
        vmm::NameThread("rml-bond-tx");
        SendLoop(i);
      });
    }
  }

  ~Bond() override {
    Shutdown();
    for (auto& p : paths_) {
      p->reader.join();
      p->sender.join();
    }
  }

  absl::Status Send(const pb::Frame& frame) override {
    // A keepalive is no part of the stream (the receiving channel drops it): it goes on every
    // idle path, as a sign of life, unnumbered.
    if (frame.has_keepalive()) return SendKeepalive(frame);
    size_t size = frame.ByteSizeLong() + kFrameOverhead;
    if (size > kMaxFrameBytes + kFrameOverhead) {
      return absl::InternalError("frame too large to send");
    }
    auto copy = std::make_shared<pb::Frame>(frame);
    std::unique_lock<std::mutex> lock(mu_);
    // Backpressure: no more than the window waits for the peer's confirmation.
    cv_.wait(lock, [&] {
      return shut_ || !error_.ok() ||
             (unconfirmed_.size() < kWindowFrames &&
              (unconfirmed_bytes_ + size <= kWindowBytes || unconfirmed_.empty()));
    });
    if (!error_.ok()) return error_;
    if (shut_) return absl::CancelledError("the connection was shut down");
    uint64_t seq = next_send_++;
    copy->set_seq(seq);
    copy->set_acked(delivered_);
    unconfirmed_[seq] = {std::move(copy), size, 0};
    unconfirmed_bytes_ += size;
    Assign(seq, /*front=*/false);
    return absl::OkStatus();
  }

  absl::StatusOr<pb::Frame> Receive() override {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] {
      return shut_ || !error_.ok() || (!buffer_.empty() && buffer_.begin()->first == next_);
    });
    if (shut_) return absl::CancelledError("the connection was shut down");
    // What arrived in order before the paths failed is handed on first (a last reply).
    if (buffer_.empty() || buffer_.begin()->first != next_) return error_;
    auto it = buffer_.begin();
    pb::Frame f = std::move(it->second.first);
    buffered_bytes_ -= it->second.second;
    buffer_.erase(it);
    delivered_ = next_++;
    if (delivered_ - ack_sent_ >= kAckEvery) cv_.notify_all();
    return f;
  }

  void set_on_frame(std::function<void()> on_frame) override {
    std::lock_guard<std::mutex> lock(on_frame_mu_);
    on_frame_ = std::move(on_frame);
  }

  void KeepAlive(std::chrono::milliseconds idle) override {
    for (auto& p : paths_) p->channel->KeepAlive(idle);
  }

  void Flush(std::chrono::milliseconds within) override {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait_for(lock, within, [&] {
      if (shut_ || !error_.ok()) return true;
      for (const auto& p : paths_) {
        if (p->up && p->pending > 0) return false;
      }
      return true;
    });
  }

  void Shutdown() override {
    std::lock_guard<std::mutex> lock(mu_);
    shut_ = true;
    cv_.notify_all();
    for (auto& p : paths_) p->channel->Shutdown();
  }

  std::string peer() const override {
    std::string s;
    for (const auto& p : paths_) absl::StrAppend(&s, s.empty() ? "" : " + ", p->channel->peer());
    return s;
  }
  // Frames handed over count as sent once they wait for a path, as a TcpChannel's count them
  // once the kernel has them: the pre-copy's progress and rate are measured with this.
  uint64_t bytes_sent() const override {
    uint64_t n = 0;
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& p : paths_) n += p->channel->bytes_sent() + (p->up ? p->pending : 0);
    return n;
  }
  uint64_t bytes_received() const override {
    uint64_t n = 0;
    for (const auto& p : paths_) n += p->channel->bytes_received();
    return n;
  }
  std::string protection() const override {
    return absl::StrCat(paths_[0]->channel->protection(), ", ", paths_.size(), " paths");
  }
  std::vector<PathStats> paths() const override {
    std::vector<PathStats> out;
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& p : paths_) {
      out.push_back({p->channel->peer(), p->up, p->channel->bytes_sent(),
                     p->channel->bytes_received(), p->resent, p->error});
    }
    return out;
  }

 private:
  struct Path {
    std::unique_ptr<Channel> channel;
    std::thread reader, sender;
    // Under mu_:
    bool up = true;
    std::string error;
    std::deque<std::pair<uint64_t, size_t>> queue;  // seq and size of frames to send
    size_t pending = 0;  // bytes queued and being sent: where the next frame goes
    uint64_t resent = 0;
    uint64_t last_original = 0;  // received: the last frame sent on it the first time
  };
  struct Unconfirmed {
    std::shared_ptr<const pb::Frame> frame;
    size_t size;
    size_t path;  // the path it was (last) handed to
  };

  absl::Status SendKeepalive(const pb::Frame& frame) {
    std::vector<Channel*> idle;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!error_.ok()) return error_;
      if (shut_) return absl::CancelledError("the connection was shut down");
      for (auto& p : paths_) {
        if (p->up && p->pending == 0) idle.push_back(p->channel.get());
      }
    }
    // A path that fails here is found failed by its own threads too.
    for (Channel* c : idle) (void)c->Send(frame);
    return absl::OkStatus();
  }

  void OnFrame() {
    std::lock_guard<std::mutex> lock(on_frame_mu_);
    if (on_frame_) on_frame_();
  }

  // With mu_ held: hands frame `seq` to the live path with the fewest bytes waiting (first in
  // its queue when it is sent again: the receiver waits for it).
  void Assign(uint64_t seq, bool front) {
    size_t best = paths_.size();
    for (size_t i = 0; i < paths_.size(); i++) {
      if (paths_[i]->up && (best == paths_.size() || paths_[i]->pending < paths_[best]->pending)) {
        best = i;
      }
    }
    if (best == paths_.size()) return;  // none left: the bond has failed
    Unconfirmed& u = unconfirmed_[seq];
    u.path = best;
    Path& p = *paths_[best];
    if (front) {
      p.queue.emplace_front(seq, u.size);
    } else {
      p.queue.emplace_back(seq, u.size);
    }
    p.pending += u.size;
    cv_.notify_all();
  }

  void SendLoop(size_t i) {
    Path& p = *paths_[i];
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      cv_.wait_for(lock, kAckInterval, [&] {
        return shut_ || !p.up || !p.queue.empty() || delivered_ - ack_sent_ >= kAckEvery;
      });
      if (shut_ || !p.up) return;
      std::shared_ptr<const pb::Frame> frame;
      size_t size = 0;
      auto now = std::chrono::steady_clock::now();
      if (!p.queue.empty()) {
        uint64_t seq;
        std::tie(seq, size) = p.queue.front();
        p.queue.pop_front();
        auto it = unconfirmed_.find(seq);
        if (it == unconfirmed_.end() || it->second.path != i) {  // confirmed meanwhile
          p.pending -= std::min(p.pending, size);
          continue;
        }
        frame = it->second.frame;
      } else if ((delivered_ > ack_sent_ &&
                  (delivered_ - ack_sent_ >= kAckEvery || now - last_ack_ >= kAckInterval)) ||
                 (delivered_ > 0 && now - last_ack_ >= kReAckInterval)) {
        auto ack = std::make_shared<pb::Frame>();
        ack->set_acked(delivered_);
        ack_sent_ = delivered_;
        last_ack_ = now;
        frame = std::move(ack);
      } else {
        continue;
      }
      lock.unlock();
      absl::Status s = p.channel->Send(*frame);
      lock.lock();
      p.pending -= std::min(p.pending, size);  // PathDown may have cleared it
      if (p.pending == 0) cv_.notify_all();    // Flush waits for it
      if (!s.ok()) {
        lock.unlock();
        PathDown(i, s);
        return;
      }
    }
  }

  void ReadLoop(size_t i) {
    Path& p = *paths_[i];
    for (;;) {
      absl::StatusOr<pb::Frame> f = p.channel->Receive();
      if (!f.ok()) {
        PathDown(i, f.status());
        return;
      }
      std::lock_guard<std::mutex> lock(mu_);
      if (f->acked() > peer_acked_) {
        if (f->acked() >= next_send_) {
          Fail(absl::DataLossError(absl::StrCat("peer ", p.channel->peer(), " confirms frame ",
                                                f->acked(), ", only ", next_send_ - 1, " sent")));
          return;
        }
        peer_acked_ = f->acked();
        while (!unconfirmed_.empty() && unconfirmed_.begin()->first <= peer_acked_) {
          unconfirmed_bytes_ -= unconfirmed_.begin()->second.size;
          unconfirmed_.erase(unconfirmed_.begin());
        }
        cv_.notify_all();
      }
      uint64_t seq = f->seq();
      if (seq == 0) {
        if (f->body_case() != pb::Frame::BODY_NOT_SET) {
          Fail(absl::DataLossError(
              absl::StrCat("frame without a sequence number from ", p.channel->peer())));
          return;
        }
        continue;
      }
      // On one path, frames sent the first time come in the order they were numbered.
      if (f->resent()) {
        resends_seen_ = true;
      } else if (seq <= p.last_original) {
        Fail(absl::DataLossError(
            absl::StrCat("frame ", seq, " repeated on path ", i, " (", p.channel->peer(), ")")));
        return;
      } else {
        p.last_original = seq;
      }
      if (seq < next_ || buffer_.count(seq) != 0) {
        // A copy sent again after a path failed, or the original of one that overtook it (a
        // path that came back for a moment): this side has it. Without any resend, it is the
        // peer repeating itself.
        if (f->resent() || resends_seen_) continue;
        Fail(absl::DataLossError(
            absl::StrCat("frame ", seq, " repeated by ", p.channel->peer(), " (not a resend)")));
        return;
      }
      if (seq >= next_ + kWindowFrames) {
        Fail(absl::DataLossError(absl::StrCat("frame ", seq, " from ", p.channel->peer(),
                                              " is beyond the window (next expected ", next_,
                                              ", at most ", kWindowFrames, " ahead)")));
        return;
      }
      size_t size = f->ByteSizeLong();
      if (buffered_bytes_ + size > kWindowBytes + kMaxFrameBytes + kFrameOverhead) {
        Fail(absl::DataLossError(absl::StrCat(p.channel->peer(), " sent over ", kWindowBytes,
                                              " bytes beyond what was confirmed")));
        return;
      }
      f->clear_seq();
      f->clear_acked();
      f->clear_resent();
      buffer_.emplace(seq, std::make_pair(std::move(*f), size));
      buffered_bytes_ += size;
      if (seq == next_) cv_.notify_all();
    }
  }

  // Path `i` failed: what it carried and the peer has not confirmed goes again on the others.
  void PathDown(size_t i, const absl::Status& why) {
    std::string line;
    {
      std::lock_guard<std::mutex> lock(mu_);
      Path& p = *paths_[i];
      if (!p.up) return;
      p.up = false;
      p.error = std::string(why.message());
      live_--;
      p.queue.clear();
      p.pending = 0;
      ack_sent_ = 0;  // the last ack may have gone on it: it goes again on another
      p.channel->Shutdown();
      if (shut_ || !error_.ok()) {
        cv_.notify_all();
        return;
      }
      if (live_ == 0) {
        error_ = absl::UnavailableError(
            absl::StrCat("all ", paths_.size(), " paths failed; the last: ", why.message()));
        cv_.notify_all();
        return;
      }
      uint64_t resent = 0;
      for (auto it = unconfirmed_.rbegin(); it != unconfirmed_.rend(); ++it) {
        if (it->second.path != i) continue;
        auto copy = std::make_shared<pb::Frame>(*it->second.frame);
        copy->set_resent(true);
        it->second.frame = std::move(copy);
        Assign(it->first, /*front=*/true);
        paths_[it->second.path]->resent++;
        resent++;
      }
      line = absl::StrCat("path ", i, " (", p.channel->peer(), ") failed: ", why.message(), "; ",
                          live_, " of ", paths_.size(), " left, ", resent, " frames sent again");
      cv_.notify_all();
    }
    if (log_) log_(line);
  }

  // With mu_ held: the peer broke the protocol; the whole connection ends.
  void Fail(absl::Status why) {
    if (error_.ok()) error_ = std::move(why);
    cv_.notify_all();
    for (auto& p : paths_) p->channel->Shutdown();
  }

  LogFn log_;
  std::vector<std::unique_ptr<Path>> paths_;  // fixed after construction
  std::mutex on_frame_mu_;
  std::function<void()> on_frame_;  // under on_frame_mu_
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool shut_ = false;
  absl::Status error_;  // the bond failed: every call returns it
  size_t live_ = 0;
  // Sending: the next sequence number, frames not yet confirmed (by seq), and the peer's
  // confirmation.
  uint64_t next_send_ = 1;
  std::map<uint64_t, Unconfirmed> unconfirmed_;
  size_t unconfirmed_bytes_ = 0;
  uint64_t peer_acked_ = 0;
  // Receiving: frames ahead of the next one to hand on, the last handed on, the last confirmed.
  std::map<uint64_t, std::pair<pb::Frame, size_t>> buffer_;
  size_t buffered_bytes_ = 0;
  uint64_t next_ = 1, delivered_ = 0, ack_sent_ = 0;
  bool resends_seen_ = false;  // the peer lost a path and sent frames again
  std::chrono::steady_clock::time_point last_ack_{};
};

}  // namespace

std::unique_ptr<Channel> MakeBond(std::vector<std::unique_ptr<Channel>> paths, LogFn log) {
  return std::make_unique<Bond>(std::move(paths), std::move(log));
}

}  // namespace romulus::replicator
