// Debian 12's UAPI headers (linux-libc-dev 6.1) get some KVM structures wrong in C++; the exact
// layouts, and a header + entries list as KVM expects it. Internal to vmm/kvm/.
#ifndef ROMULUS_VMM_KVM_KVM_API_H_
#define ROMULUS_VMM_KVM_KVM_API_H_

#include <linux/kvm.h>

#include <cstdint>
#include <vector>

#include "vmm/sys.h"

namespace romulus::vmm {

// Debian 12's UAPI headers (linux-libc-dev 6.1) declare flexible array members with
// __DECLARE_FLEX_ARRAY, which in C++ inserts an empty struct: sizeof, the offset of the array and
// so the ioctl numbers of the structs below come out wrong. These are their exact C layouts.
struct KvmMsrListHeader {
  uint32_t nmsrs;
};
struct KvmMsrsHeader {
  uint32_t nmsrs;
  uint32_t pad;
};
struct KvmCpuid2Header {
  uint32_t nent;
  uint32_t padding;
};
struct KvmXsave {
  uint32_t region[1024];
};
inline constexpr unsigned long kKvmGetMsrIndexList = _IOWR(KVMIO, 0x02, KvmMsrListHeader);
inline constexpr unsigned long kKvmGetSupportedCpuid = _IOWR(KVMIO, 0x05, KvmCpuid2Header);
inline constexpr unsigned long kKvmGetMsrs = _IOWR(KVMIO, 0x88, KvmMsrsHeader);
inline constexpr unsigned long kKvmSetMsrs = _IOW(KVMIO, 0x89, KvmMsrsHeader);
inline constexpr unsigned long kKvmSetCpuid2 = _IOW(KVMIO, 0x90, KvmCpuid2Header);
inline constexpr unsigned long kKvmGetCpuid2 = _IOWR(KVMIO, 0x91, KvmCpuid2Header);
inline constexpr unsigned long kKvmGetXsave = _IOR(KVMIO, 0xa4, KvmXsave);
inline constexpr unsigned long kKvmSetXsave = _IOW(KVMIO, 0xa5, KvmXsave);
static_assert(kKvmGetSupportedCpuid == 0xc008ae05ul);
static_assert(kKvmGetMsrs == 0xc008ae88ul);
static_assert(kKvmGetXsave == 0x9000aea4ul);

// A KVM header followed by `n` entries, laid out as the kernel expects.
template <typename Header, typename Entry>
class KvmList {
 public:
  explicit KvmList(size_t n) : bytes_(sizeof(Header) + n * sizeof(Entry)) {}
  Header* header() { return reinterpret_cast<Header*>(bytes_.data()); }
  Entry* entries() { return reinterpret_cast<Entry*>(bytes_.data() + sizeof(Header)); }
  void* get() { return bytes_.data(); }

 private:
  std::vector<uint8_t> bytes_;  // zeroed
};

}  // namespace romulus::vmm

#endif  // ROMULUS_VMM_KVM_KVM_API_H_
