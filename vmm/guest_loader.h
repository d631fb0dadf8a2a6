// Loading the guest image and setting up the CPU so that the guest starts in long mode at CPL 3.
#ifndef ROMULUS_VMM_GUEST_LOADER_H_
#define ROMULUS_VMM_GUEST_LOADER_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "vmm/guest_memory.h"

namespace romulus::vmm {

// Reads a guest image file (at most 3 MiB); an empty path gives the embedded reference guest.
absl::StatusOr<std::vector<uint8_t>> LoadGuestImage(const std::string& path);
// Checks the image header and that image + bss fit, copies it into memory, returns the entry.
absl::StatusOr<uint64_t> PlaceGuest(const std::vector<uint8_t>& image, GuestMemory& mem);
// Identity-maps guest RAM with 2 MiB user pages, builds the GDT and starts the vCPU at `entry`
// at CPL 3 with IOPL 3 (port I/O exits straight to the monitor).
absl::Status SetUpLongMode(int vcpu_fd, GuestMemory& mem, uint64_t entry);

}  // namespace romulus::vmm

#endif  // ROMULUS_VMM_GUEST_LOADER_H_
