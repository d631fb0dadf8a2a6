// Kernel interfaces the process platform needs that Debian 12's headers (linux-libc-dev 6.1)
// predate: userfaultfd asynchronous write-protect and the PAGEMAP_SCAN ioctl (both Linux 6.7),
// defined as the kernel's UAPI has them. Internal to vmm/process/.
#ifndef ROMULUS_VMM_PROCESS_UAPI_H_
#define ROMULUS_VMM_PROCESS_UAPI_H_

#include <linux/userfaultfd.h>
#include <sys/ioctl.h>

#include <cstdint>

namespace romulus::vmm::uapi {

inline constexpr uint64_t kUffdFeatureWpUnpopulated = 1ull << 13;
inline constexpr uint64_t kUffdFeatureWpAsync = 1ull << 15;
inline constexpr int kUffdUserModeOnly = 1;  // UFFD_USER_MODE_ONLY: no privileges needed

struct PageRegion {  // struct page_region
  uint64_t start;
  uint64_t end;
  uint64_t categories;
};

struct PmScanArg {  // struct pm_scan_arg
  uint64_t size;
  uint64_t flags;
  uint64_t start;
  uint64_t end;
  uint64_t walk_end;
  uint64_t vec;
  uint64_t vec_len;
  uint64_t max_pages;
  uint64_t category_inverted;
  uint64_t category_mask;
  uint64_t category_anyof_mask;
  uint64_t return_mask;
};

inline constexpr uint64_t kPmScanWpMatching = 1 << 0;    // PM_SCAN_WP_MATCHING
inline constexpr uint64_t kPmScanCheckWpAsync = 1 << 1;  // PM_SCAN_CHECK_WPASYNC
inline constexpr uint64_t kPageIsWritten = 1 << 1;       // PAGE_IS_WRITTEN
inline constexpr unsigned long kPagemapScan = _IOWR('f', 16, PmScanArg);

static_assert(sizeof(PageRegion) == 24);
static_assert(sizeof(PmScanArg) == 96);
static_assert(kPagemapScan == 0xc0606610ul);
static_assert(sizeof(uffdio_api) == 24 && sizeof(uffdio_register) == 32 &&
              sizeof(uffdio_writeprotect) == 24);

}  // namespace romulus::vmm::uapi

#endif  // ROMULUS_VMM_PROCESS_UAPI_H_
