#include "vmm/guest_loader.h"

#include <fcntl.h>
#include <sys/stat.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "guest/abi.h"
#include "vmm/sys.h"

extern "C" const uint8_t romulus_guest_image_start[];
extern "C" const uint8_t romulus_guest_image_end[];

namespace romulus::vmm {
namespace {

constexpr uint64_t kMaxImageBytes = RML_IMAGE_LIMIT - RML_IMAGE_GPA;

}  // namespace

absl::StatusOr<std::vector<uint8_t>> LoadGuestImage(const std::string& path) {
  if (path.empty()) {
    return std::vector<uint8_t>(romulus_guest_image_start, romulus_guest_image_end);
  }
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) return ErrnoStatus(absl::StrCat("open guest image ", path));
  struct stat st;
  if (::fstat(fd.get(), &st) != 0) return ErrnoStatus(absl::StrCat("stat ", path));
  if (static_cast<uint64_t>(st.st_size) > kMaxImageBytes) {
    return absl::InvalidArgumentError(absl::StrCat("guest image ", path, " is ", st.st_size,
                                                   " bytes; at most ", kMaxImageBytes, " fit"));
  }
  std::vector<uint8_t> image(static_cast<size_t>(st.st_size));
  if (::pread(fd.get(), image.data(), image.size(), 0) != static_cast<ssize_t>(image.size())) {
    return ErrnoStatus(absl::StrCat("read guest image ", path));
  }
  return image;
}

absl::StatusOr<uint64_t> PlaceGuest(const std::vector<uint8_t>& image, GuestMemory& mem) {
  rml_image_header h{};
  if (image.size() < sizeof(h)) {
    return absl::InvalidArgumentError(
        absl::StrCat("guest image of ", image.size(), " bytes is too short for its header"));
  }
  std::memcpy(&h, image.data(), sizeof(h));
  if (h.magic != RML_IMAGE_MAGIC)
    return absl::InvalidArgumentError("not a Romulus guest image (bad magic)");
  if (h.abi_version != RML_ABI_VERSION) {
    return absl::InvalidArgumentError(absl::StrCat("guest image speaks ABI ", h.abi_version,
                                                   ", this monitor speaks ", RML_ABI_VERSION));
  }
  uint64_t end = RML_IMAGE_GPA + image.size();
  if (h.image_end < end || h.image_end > RML_IMAGE_LIMIT) {
    return absl::InvalidArgumentError(
        absl::StrFormat("guest image (with bss) ends at 0x%x; it must end below 0x%x", h.image_end,
                        RML_IMAGE_LIMIT));
  }
  if (h.entry < RML_IMAGE_GPA || h.entry >= end) {
    return absl::InvalidArgumentError(
        absl::StrFormat("guest entry 0x%x lies outside the image", h.entry));
  }
  if (!mem.Contains(RML_IMAGE_GPA, RML_IMAGE_LIMIT - RML_IMAGE_GPA)) {
    return absl::InvalidArgumentError("guest memory too small for the guest image");
  }
  mem.Write(RML_IMAGE_GPA, image.data(), image.size());
  return h.entry;
}

}  // namespace romulus::vmm
