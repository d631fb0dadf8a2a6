// The saved state of a KVM vCPU and of the KVM VM clock. Each type captures itself from KVM and
// applies itself back, in the order KVM needs (see shared/KVM-NOTES.md). Internal to vmm/kvm/.
#ifndef ROMULUS_VMM_KVM_VCPU_STATE_H_
#define ROMULUS_VMM_KVM_VCPU_STATE_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "proto/romulus.pb.h"

namespace romulus::vmm {

class KvmVcpu {
 public:
  // `kvm_fd` is /dev/kvm (for the MSR list), `vcpu_fd` a paused vCPU at a clean point.
  static absl::StatusOr<pb::KvmVcpuState> Save(int kvm_fd, int vcpu_fd);
  // Applies `state` to a freshly created vCPU. Every field is checked before use.
  static absl::Status Restore(int vcpu_fd, const pb::KvmVcpuState& state);
  // Installs the host's supported CPUID on a fresh vCPU (first boot).
  static absl::Status SetSupportedCpuid(int kvm_fd, int vcpu_fd);
};

class KvmClock {
 public:
  static absl::StatusOr<pb::VmClockState> Save(int vm_fd);
  static absl::Status Restore(int vm_fd, const pb::VmClockState& state);
};

}  // namespace romulus::vmm

#endif  // ROMULUS_VMM_KVM_VCPU_STATE_H_
