// Idle device: the guest says it has nothing to do for a while; the vCPU thread sleeps until a
// request arrives, the deadline passes, or the monitor needs the vCPU (pause, stop).
#ifndef ROMULUS_VMM_IDLE_DEVICE_H_
#define ROMULUS_VMM_IDLE_DEVICE_H_

#include <condition_variable>
#include <cstdint>
#include <mutex>

#include "proto/romulus.pb.h"

namespace romulus::vmm {

class IdleDevice {
 public:
  // Any thread: ends the current or the next wait.
  void Kick();
  // vCPU thread: waits up to `us` microseconds (0: up to one second) or until kicked.
  void Wait(uint32_t us);
  pb::IdleDeviceState Save() const;
  void Restore(const pb::IdleDeviceState& state) { idle_exits_ = state.idle_exits(); }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool kicked_ = false;
  uint64_t idle_exits_ = 0;
};

}  // namespace romulus::vmm

#endif  // ROMULUS_VMM_IDLE_DEVICE_H_
