#include "cli/service_manager.h"

#include <systemd/sd-daemon.h>

#include <algorithm>
#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <thread>

namespace romulus::cli {

// sd_notify blocks while systemd has not read the messages before it (ten may wait), and the
// loop that calls Notify is the one that promotes a mirror: a thread sends instead. What it
// shares with the daemon outlives the daemon's object if systemd never reads again.
struct ServiceManager::Sender {
  static constexpr size_t kMaxQueued = 16;
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::string> queue;  // under mu
  bool done = false;              // under mu

  static void Run(std::shared_ptr<Sender> s) {
    std::unique_lock<std::mutex> lock(s->mu);
    for (;;) {
      s->cv.wait(lock, [&] { return s->done || !s->queue.empty(); });
      if (s->queue.empty()) return;  // done, and everything sent
      std::string m = std::move(s->queue.front());
      s->queue.pop_front();
      lock.unlock();
      // Not being run by systemd is no error; failing to reach it is not fatal to the VM.
      (void)sd_notify(0, m.c_str());
      lock.lock();
      s->cv.notify_all();
    }
  }
};

ServiceManager::ServiceManager() {
  uint64_t usec = 0;
  // > 0 only when WATCHDOG_USEC is set (and WATCHDOG_PID, if set, is this process).
  if (sd_watchdog_enabled(0, &usec) > 0) watchdog_ = std::chrono::microseconds(usec);
  if (std::getenv("NOTIFY_SOCKET") == nullptr) return;  // not started by systemd
  sender_ = std::make_shared<Sender>();
  thread_ = std::thread(Sender::Run, sender_);
}

ServiceManager::~ServiceManager() {
  if (!sender_) return;
  bool sent;
  {
    std::unique_lock<std::mutex> lock(sender_->mu);
    sender_->done = true;
    sender_->cv.notify_all();
    // STOPPING=1 and the last status reach systemd, unless it does not read for a second.
    sent =
        sender_->cv.wait_for(lock, std::chrono::seconds(1), [&] { return sender_->queue.empty(); });
  }
  if (sent) {
    thread_.join();
  } else {
    thread_.detach();  // blocked in sd_notify; it holds its own reference to what it uses
  }
}

std::chrono::milliseconds ServiceManager::Tick(std::chrono::milliseconds tick) const {
  if (watchdog_.count() == 0) return tick;
  auto quarter = std::chrono::duration_cast<std::chrono::milliseconds>(watchdog_ / 4);
  return std::max(std::chrono::milliseconds(1), std::min(tick, quarter));
}

void ServiceManager::Notify(const std::string& message) {
  if (!sender_) return;
  std::lock_guard<std::mutex> lock(sender_->mu);
  // While systemd does not read, pings and status lines are dropped rather than queued without
  // bound; READY and STOPPING always wait their turn.
  bool droppable = message == "WATCHDOG=1" || message.rfind("STATUS=", 0) == 0;
  if (droppable && sender_->queue.size() >= Sender::kMaxQueued) return;
  sender_->queue.push_back(message);
  sender_->cv.notify_all();
}

void ServiceManager::Ready() {
  if (ready_) return;
  ready_ = true;
  Notify("READY=1");
}

bool ServiceManager::StatusDue() const {
  // A state line that carries counts changes every epoch: systemd hears it at most once a
  // second (each message is a datagram it must read), the first one at once.
  return sender_ && (status_.empty() || Clock::now() - last_status_ >= std::chrono::seconds(1));
}

void ServiceManager::Status(const std::string& line) {
  if (!StatusDue() || line == status_) return;
  status_ = line;
  last_status_ = Clock::now();
  // One line: the protocol separates assignments by newlines.
  std::string one = line.substr(0, line.find('\n'));
  Notify("STATUS=" + one);
}

void ServiceManager::Watchdog(Clock::time_point progressed_at) {
  // systemd watches a notify service from READY on; its start is bounded by TimeoutStartSec.
  if (watchdog_.count() == 0 || !ready_) return;
  auto now = Clock::now();
  if (now - progressed_at > watchdog_) return;  // stuck: let systemd's timer run out
  if (now - last_ping_ < watchdog_ / 2) return;
  last_ping_ = now;
  Notify("WATCHDOG=1");
}

void ServiceManager::Stopping() { Notify("STOPPING=1"); }

}  // namespace romulus::cli
