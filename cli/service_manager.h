// What a daemon tells systemd (the notify protocol, libsystemd's sd_notify): READY=1 once its
// role is established, STATUS= with the one-line state `romulus status` shows, WATCHDOG=1 while
// the loop that proves progress makes it, STOPPING=1 on the way out. Started by anything else
// (no NOTIFY_SOCKET), every call does nothing.
#ifndef ROMULUS_CLI_SERVICE_MANAGER_H_
#define ROMULUS_CLI_SERVICE_MANAGER_H_

#include <chrono>
#include <memory>
#include <string>
#include <thread>

namespace romulus::cli {

class ServiceManager {
 public:
  using Clock = std::chrono::steady_clock;
  ServiceManager();
  ~ServiceManager();
  ServiceManager(const ServiceManager&) = delete;
  ServiceManager& operator=(const ServiceManager&) = delete;

  // The service's WatchdogSec (0 without one): the daemon's loop must call Watchdog at least
  // every quarter of it.
  std::chrono::microseconds watchdog_interval() const { return watchdog_; }
  // `tick`, shortened so that the watchdog is pinged in time.
  std::chrono::milliseconds Tick(std::chrono::milliseconds tick) const;

  void Ready();
  // Sends the line when it differs from the last one sent, at most once a second.
  void Status(const std::string& line);
  // Whether Status could send now (run by systemd, and a second since the last line): a caller
  // whose line is costly to make asks first.
  bool StatusDue() const;
  // Pings the watchdog when the daemon's progress (the time it last proved it, e.g. a pass of
  // the primary's epoch loop) is within the watchdog interval, at most twice per interval. A
  // loop that is stuck stops the pings, and systemd kills the daemon. Only once READY was sent:
  // before it, the unit's TimeoutStartSec is what bounds the start.
  void Watchdog(Clock::time_point progressed_at);
  void Stopping();

 private:
  struct Sender;
  void Notify(const std::string& message);  // queued for the sender thread
  std::shared_ptr<Sender> sender_;          // null when not run by systemd
  std::thread thread_;
  std::chrono::microseconds watchdog_{0};
  Clock::time_point last_ping_{}, last_status_{};
  std::string status_;
  bool ready_ = false;
};

}  // namespace romulus::cli

#endif  // ROMULUS_CLI_SERVICE_MANAGER_H_
