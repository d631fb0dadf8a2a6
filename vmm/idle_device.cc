#include "vmm/idle_device.h"

#include <chrono>

namespace romulus::vmm {

void IdleDevice::Kick() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    kicked_ = true;
  }
  cv_.notify_all();
}

void IdleDevice::Wait(uint32_t us) {
  idle_exits_++;
  auto timeout = std::chrono::microseconds(us == 0 ? 1000000 : us);
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait_for(lock, timeout, [this] { return kicked_; });
  kicked_ = false;
}

pb::IdleDeviceState IdleDevice::Save() const {
  pb::IdleDeviceState s;
  s.set_idle_exits(idle_exits_);
  return s;
}

}  // namespace romulus::vmm
