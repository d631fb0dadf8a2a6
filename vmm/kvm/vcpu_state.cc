#include "vmm/kvm/vcpu_state.h"

#include <linux/kvm.h>

#include <memory>
#include <mutex>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "vmm/kvm/kvm_api.h"

namespace romulus::vmm {
namespace {

constexpr int kMaxCpuidEntries = 256;
constexpr int kMaxMsrs = 1024;

template <typename T>
std::string AsBytes(const T& v) {
  return std::string(reinterpret_cast<const char*>(&v), sizeof(T));
}

template <typename T>
absl::Status FromBytes(const std::string& bytes, T* out, const char* what) {
  if (bytes.size() != sizeof(T)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("vCPU state: %s is %d bytes, expected %d", what, bytes.size(), sizeof(T)));
  }
  std::memcpy(out, bytes.data(), sizeof(T));
  return absl::OkStatus();
}

using CpuidList = KvmList<KvmCpuid2Header, kvm_cpuid_entry2>;
using MsrList = KvmList<KvmMsrsHeader, kvm_msr_entry>;

// KVM_GET_MSRS stops at the first MSR it cannot read, so the list is probed one index at a time
// and the readable ones are remembered for the life of the process.
absl::StatusOr<std::vector<uint32_t>> ReadableMsrs(int kvm_fd, int vcpu_fd) {
  static std::mutex mu;
  static std::vector<uint32_t>* cached = nullptr;
  std::lock_guard<std::mutex> lock(mu);
  if (cached) return *cached;
  KvmMsrListHeader probe{};
  if (::ioctl(kvm_fd, kKvmGetMsrIndexList, &probe) < 0 && errno != E2BIG) {
    return ErrnoStatus("KVM_GET_MSR_INDEX_LIST");
  }
  if (probe.nmsrs > kMaxMsrs) return absl::InternalError("KVM reports too many MSRs");
  KvmList<KvmMsrListHeader, uint32_t> list(probe.nmsrs);
  list.header()->nmsrs = probe.nmsrs;
  if (auto s = Ioctl(kvm_fd, kKvmGetMsrIndexList, list.get(), "KVM_GET_MSR_INDEX_LIST"); !s.ok()) {
    return s;
  }
  auto readable = std::make_unique<std::vector<uint32_t>>();
  for (uint32_t i = 0; i < list.header()->nmsrs; i++) {
    MsrList one(1);
    one.header()->nmsrs = 1;
    one.entries()[0].index = list.entries()[i];
    if (::ioctl(vcpu_fd, kKvmGetMsrs, one.get()) == 1) readable->push_back(list.entries()[i]);
  }
  cached = readable.release();
  return *cached;
}

// KVM_SET_MSRS stops at the first MSR it refuses. Some readable MSRs cannot be written back
// without devices this VM does not create (e.g. MSR_KVM_ASYNC_PF_INT needs an in-kernel LAPIC);
// a refused MSR is accepted only when the vCPU already holds the saved value.
absl::Status RestoreMsrs(int vcpu_fd, const pb::KvmVcpuState& in) {
  size_t n = static_cast<size_t>(in.msrs_size());
  size_t done = 0;
  while (done < n) {
    MsrList msrs(n - done);
    msrs.header()->nmsrs = static_cast<uint32_t>(n - done);
    for (size_t i = done; i < n; i++) {
      msrs.entries()[i - done].index = in.msrs(static_cast<int>(i)).index();
      msrs.entries()[i - done].data = in.msrs(static_cast<int>(i)).value();
    }
    int set = 0;
    if (auto s = Ioctl(vcpu_fd, kKvmSetMsrs, msrs.get(), "KVM_SET_MSRS", &set); !s.ok()) return s;
    done += static_cast<size_t>(set);
    if (done == n) break;
    const pb::Msr& refused = in.msrs(static_cast<int>(done));
    MsrList current(1);
    current.header()->nmsrs = 1;
    current.entries()[0].index = refused.index();
    if (::ioctl(vcpu_fd, kKvmGetMsrs, current.get()) != 1 ||
        current.entries()[0].data != refused.value()) {
      return absl::InvalidArgumentError(
          absl::StrFormat("KVM refused MSR 0x%x = 0x%x and the vCPU holds a different value",
                          refused.index(), refused.value()));
    }
    done++;
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status KvmVcpu::SetSupportedCpuid(int kvm_fd, int vcpu_fd) {
  CpuidList cpuid(kMaxCpuidEntries);
  cpuid.header()->nent = kMaxCpuidEntries;
  if (auto s = Ioctl(kvm_fd, kKvmGetSupportedCpuid, cpuid.get(), "KVM_GET_SUPPORTED_CPUID");
      !s.ok()) {
    return s;
  }
  return Ioctl(vcpu_fd, kKvmSetCpuid2, cpuid.get(), "KVM_SET_CPUID2");
}

absl::StatusOr<pb::KvmVcpuState> KvmVcpu::Save(int kvm_fd, int vcpu_fd) {
  pb::KvmVcpuState out;
  {
    CpuidList cpuid(kMaxCpuidEntries);
    cpuid.header()->nent = kMaxCpuidEntries;
    if (auto s = Ioctl(vcpu_fd, kKvmGetCpuid2, cpuid.get(), "KVM_GET_CPUID2"); !s.ok()) return s;
    for (uint32_t i = 0; i < cpuid.header()->nent && i < kMaxCpuidEntries; i++) {
      const kvm_cpuid_entry2& e = cpuid.entries()[i];
      pb::CpuidEntry* p = out.add_cpuid();
      p->set_function(e.function);
      p->set_index(e.index);
      p->set_flags(e.flags);
      p->set_eax(e.eax);
      p->set_ebx(e.ebx);
      p->set_ecx(e.ecx);
      p->set_edx(e.edx);
    }
  }
  kvm_sregs sregs{};
  if (auto s = Ioctl(vcpu_fd, KVM_GET_SREGS, &sregs, "KVM_GET_SREGS"); !s.ok()) return s;
  out.set_sregs(AsBytes(sregs));
  kvm_regs regs{};
  if (auto s = Ioctl(vcpu_fd, KVM_GET_REGS, &regs, "KVM_GET_REGS"); !s.ok()) return s;
  out.set_regs(AsBytes(regs));
  // KVM_CAP_XSAVE2 reports 4096 here, the size of struct kvm_xsave; larger sizes (AMX) would
  // need KVM_GET_XSAVE2 and are refused rather than silently truncated.
  int xsave_size = ::ioctl(vcpu_fd, KVM_CHECK_EXTENSION, KVM_CAP_XSAVE2);
  if (xsave_size > static_cast<int>(sizeof(KvmXsave))) {
    return absl::UnimplementedError(
        absl::StrCat("XSAVE state of ", xsave_size, " bytes is not supported"));
  }
  KvmXsave xsave{};
  if (auto s = Ioctl(vcpu_fd, kKvmGetXsave, &xsave, "KVM_GET_XSAVE"); !s.ok()) return s;
  out.set_xsave(AsBytes(xsave));
  kvm_xcrs xcrs{};
  if (auto s = Ioctl(vcpu_fd, KVM_GET_XCRS, &xcrs, "KVM_GET_XCRS"); !s.ok()) return s;
  out.set_xcrs(AsBytes(xcrs));
  kvm_debugregs dbg{};
  if (auto s = Ioctl(vcpu_fd, KVM_GET_DEBUGREGS, &dbg, "KVM_GET_DEBUGREGS"); !s.ok()) return s;
  out.set_debugregs(AsBytes(dbg));

  auto indices = ReadableMsrs(kvm_fd, vcpu_fd);
  if (!indices.ok()) return indices.status();
  MsrList msrs(indices->size());
  msrs.header()->nmsrs = static_cast<uint32_t>(indices->size());
  for (size_t i = 0; i < indices->size(); i++) msrs.entries()[i].index = (*indices)[i];
  int got = 0;
  if (auto s = Ioctl(vcpu_fd, kKvmGetMsrs, msrs.get(), "KVM_GET_MSRS", &got); !s.ok()) return s;
  if (got != static_cast<int>(indices->size())) {
    return absl::InternalError(absl::StrFormat("KVM_GET_MSRS read %d of %d MSRs (stopped at 0x%x)",
                                               got, indices->size(), msrs.entries()[got].index));
  }
  for (size_t i = 0; i < indices->size(); i++) {
    pb::Msr* m = out.add_msrs();
    m->set_index(msrs.entries()[i].index);
    m->set_value(msrs.entries()[i].data);
  }

  kvm_mp_state mp{};
  if (auto s = Ioctl(vcpu_fd, KVM_GET_MP_STATE, &mp, "KVM_GET_MP_STATE"); !s.ok()) return s;
  out.set_mp_state(mp.mp_state);
  kvm_vcpu_events events{};
  if (auto s = Ioctl(vcpu_fd, KVM_GET_VCPU_EVENTS, &events, "KVM_GET_VCPU_EVENTS"); !s.ok()) {
    return s;
  }
  out.set_events(AsBytes(events));
  return out;
}

absl::Status KvmVcpu::Restore(int vcpu_fd, const pb::KvmVcpuState& in) {
  // Decode and check everything before touching the vCPU.
  if (in.cpuid_size() == 0 || in.cpuid_size() > kMaxCpuidEntries) {
    return absl::InvalidArgumentError(
        absl::StrCat("vCPU state: ", in.cpuid_size(), " CPUID entries (1-256 allowed)"));
  }
  if (in.msrs_size() > kMaxMsrs) return absl::InvalidArgumentError("vCPU state: too many MSRs");
  kvm_sregs sregs;
  kvm_regs regs;
  KvmXsave xsave;
  kvm_xcrs xcrs;
  kvm_debugregs dbg;
  kvm_vcpu_events events;
  if (auto s = FromBytes(in.sregs(), &sregs, "sregs"); !s.ok()) return s;
  if (auto s = FromBytes(in.regs(), &regs, "regs"); !s.ok()) return s;
  if (auto s = FromBytes(in.xsave(), &xsave, "xsave"); !s.ok()) return s;
  if (auto s = FromBytes(in.xcrs(), &xcrs, "xcrs"); !s.ok()) return s;
  if (auto s = FromBytes(in.debugregs(), &dbg, "debugregs"); !s.ok()) return s;
  if (auto s = FromBytes(in.events(), &events, "events"); !s.ok()) return s;

  CpuidList cpuid(static_cast<size_t>(in.cpuid_size()));
  cpuid.header()->nent = static_cast<uint32_t>(in.cpuid_size());
  for (int i = 0; i < in.cpuid_size(); i++) {
    const pb::CpuidEntry& p = in.cpuid(i);
    kvm_cpuid_entry2& e = cpuid.entries()[i];
    e.function = p.function();
    e.index = p.index();
    e.flags = p.flags();
    e.eax = p.eax();
    e.ebx = p.ebx();
    e.ecx = p.ecx();
    e.edx = p.edx();
  }
  // Order matters: CPUID, SREGS (EFER), REGS, XSAVE, XCRS, DEBUGREGS, MSRS (TSC first in the
  // list as KVM reports it), MP_STATE, VCPU_EVENTS.
  if (auto s = Ioctl(vcpu_fd, kKvmSetCpuid2, cpuid.get(), "KVM_SET_CPUID2"); !s.ok()) return s;
  if (auto s = Ioctl(vcpu_fd, KVM_SET_SREGS, &sregs, "KVM_SET_SREGS"); !s.ok()) return s;
  if (auto s = Ioctl(vcpu_fd, KVM_SET_REGS, &regs, "KVM_SET_REGS"); !s.ok()) return s;
  if (auto s = Ioctl(vcpu_fd, kKvmSetXsave, &xsave, "KVM_SET_XSAVE"); !s.ok()) return s;
  if (auto s = Ioctl(vcpu_fd, KVM_SET_XCRS, &xcrs, "KVM_SET_XCRS"); !s.ok()) return s;
  if (auto s = Ioctl(vcpu_fd, KVM_SET_DEBUGREGS, &dbg, "KVM_SET_DEBUGREGS"); !s.ok()) return s;
  if (auto s = RestoreMsrs(vcpu_fd, in); !s.ok()) return s;
  kvm_mp_state mp{in.mp_state()};
  if (auto s = Ioctl(vcpu_fd, KVM_SET_MP_STATE, &mp, "KVM_SET_MP_STATE"); !s.ok()) return s;
  return Ioctl(vcpu_fd, KVM_SET_VCPU_EVENTS, &events, "KVM_SET_VCPU_EVENTS");
}

absl::StatusOr<pb::VmClockState> KvmClock::Save(int vm_fd) {
  kvm_clock_data clock{};
  if (auto s = Ioctl(vm_fd, KVM_GET_CLOCK, &clock, "KVM_GET_CLOCK"); !s.ok()) return s;
  pb::VmClockState out;
  out.set_clock_ns(clock.clock);
  return out;
}

absl::Status KvmClock::Restore(int vm_fd, const pb::VmClockState& state) {
  // Without KVM_CLOCK_REALTIME the guest's clock resumes where it stopped.
  kvm_clock_data clock{};
  clock.clock = state.clock_ns();
  return Ioctl(vm_fd, KVM_SET_CLOCK, &clock, "KVM_SET_CLOCK");
}

}  // namespace romulus::vmm
