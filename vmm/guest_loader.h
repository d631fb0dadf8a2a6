// Loading the guest image into guest memory (the same on every platform).
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

}  // namespace romulus::vmm

#endif  // ROMULUS_VMM_GUEST_LOADER_H_
