#include "cli/service_manager.h"

#include <systemd/sd-daemon.h>

#include <algorithm>

namespace romulus::cli {

ServiceManager::ServiceManager() {
  uint64_t usec = 0;
  // > 0 only when WATCHDOG_USEC is set (and WATCHDOG_PID, if set, is this process).
  if (sd_watchdog_enabled(0, &usec) > 0) watchdog_ = std::chrono::microseconds(usec);
}

std::chrono::milliseconds ServiceManager::Tick(std::chrono::milliseconds tick) const {
  if (watchdog_.count() == 0) return tick;
  auto quarter = std::chrono::duration_cast<std::chrono::milliseconds>(watchdog_ / 4);
  return std::max(std::chrono::milliseconds(1), std::min(tick, quarter));
}

void ServiceManager::Notify(const std::string& message) {
  // Not being run by systemd is no error; a failure to reach it is not fatal to the VM either.
  (void)sd_notify(0, message.c_str());
}

void ServiceManager::Ready() {
  if (ready_) return;
  ready_ = true;
  Notify("READY=1");
}

void ServiceManager::Status(const std::string& line) {
  // A state line that carries counts changes every epoch: systemd hears it at most once a
  // second (each message is a datagram it must read), the first one at once.
  auto now = Clock::now();
  if (line == status_ || (!status_.empty() && now - last_status_ < std::chrono::seconds(1))) return;
  status_ = line;
  last_status_ = now;
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
