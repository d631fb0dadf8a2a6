#include "vmm/guest_loader.h"

#include <fcntl.h>
#include <linux/kvm.h>
#include <sys/stat.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "guest/abi.h"
#include "vmm/kvm.h"

extern "C" const uint8_t romulus_guest_image_start[];
extern "C" const uint8_t romulus_guest_image_end[];

namespace romulus::vmm {
namespace {

constexpr uint64_t kMaxImageBytes = RML_IMAGE_LIMIT - RML_IMAGE_GPA;

// Page-table and segment bits.
constexpr uint64_t kPresent = 1, kWritable = 2, kUser = 4, kHuge = 0x80;
constexpr uint64_t kCr0Pe = 1, kCr0Mp = 2, kCr0Et = 0x10, kCr0Ne = 0x20, kCr0Wp = 0x10000,
                   kCr0Pg = 0x80000000;
constexpr uint64_t kCr4Pae = 0x20, kCr4Osfxsr = 0x200, kCr4Osxmmexcpt = 0x400;
constexpr uint64_t kEferLme = 0x100, kEferLma = 0x400;
constexpr uint64_t kRflagsIopl3 = 3ull << 12, kRflagsReserved = 2, kRflagsIf = 0x200;

// GDT layout: null, (unused), user data, user code (64-bit), TSS (two slots).
constexpr uint16_t kUserDataSel = (2 << 3) | 3, kUserCodeSel = (3 << 3) | 3, kTssSel = 4 << 3;

uint64_t SegmentDescriptor(const kvm_segment& s) {
  uint64_t d = (s.limit & 0xffff) | ((s.base & 0xffffffull) << 16) |
               (static_cast<uint64_t>(s.type) << 40) | (static_cast<uint64_t>(s.s) << 44) |
               (static_cast<uint64_t>(s.dpl) << 45) | (static_cast<uint64_t>(s.present) << 47) |
               (static_cast<uint64_t>((s.limit >> 16) & 0xf) << 48) |
               (static_cast<uint64_t>(s.l) << 53) | (static_cast<uint64_t>(s.db) << 54) |
               (static_cast<uint64_t>(s.g) << 55) | ((s.base >> 24 & 0xffull) << 56);
  return d;
}

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

absl::Status SetUpLongMode(int vcpu_fd, GuestMemory& mem, uint64_t entry) {
  // Page tables: one PML4 entry, up to four PDPT entries, 2 MiB pages for all of RAM.
  uint64_t pml4 = RML_PDPT_GPA | kPresent | kWritable | kUser;
  mem.Write(RML_PML4_GPA, &pml4, sizeof(pml4));
  uint64_t huge_pages = mem.size() / (2ull << 20);
  for (uint64_t gib = 0; gib < (huge_pages + 511) / 512; gib++) {
    uint64_t pdpte = (RML_PD_GPA + gib * kPageSize) | kPresent | kWritable | kUser;
    mem.Write(RML_PDPT_GPA + gib * 8, &pdpte, sizeof(pdpte));
  }
  for (uint64_t i = 0; i < huge_pages; i++) {
    uint64_t pde = (i << 21) | kPresent | kWritable | kUser | kHuge;
    mem.Write(RML_PD_GPA + i * 8, &pde, sizeof(pde));
  }

  kvm_sregs sregs{};
  if (auto s = Ioctl(vcpu_fd, KVM_GET_SREGS, &sregs, "KVM_GET_SREGS"); !s.ok()) return s;
  kvm_segment code{};
  code.base = 0;
  code.limit = 0xffffffff;
  code.selector = kUserCodeSel;
  code.type = 11;  // execute/read, accessed
  code.present = 1;
  code.dpl = 3;
  code.s = 1;
  code.l = 1;
  code.g = 1;
  kvm_segment data = code;
  data.selector = kUserDataSel;
  data.type = 3;  // read/write, accessed
  data.l = 0;
  data.db = 1;
  // The I/O permission bitmap admits exactly the Romulus ports. Under PVM the guest's CPL-3
  // code runs with hardware IOPL 0, so IOPL alone does not let `out` through; the bitmap does.
  constexpr uint32_t kIoMapOffset = 0x68, kIoMapPorts = 0x600;
  uint8_t tss_bytes[kIoMapOffset + kIoMapPorts / 8 + 1];
  std::memset(tss_bytes, 0, kIoMapOffset);
  std::memset(tss_bytes + kIoMapOffset, 0xff, sizeof(tss_bytes) - kIoMapOffset);
  uint16_t iomap_base = kIoMapOffset;
  std::memcpy(tss_bytes + 0x66, &iomap_base, sizeof(iomap_base));
  for (uint32_t port = RML_PORT_FIRST; port < RML_PORT_END; port++) {
    tss_bytes[kIoMapOffset + port / 8] &= static_cast<uint8_t>(~(1u << (port % 8)));
  }
  mem.Write(RML_TSS_GPA, tss_bytes, sizeof(tss_bytes));
  kvm_segment tss{};
  tss.base = RML_TSS_GPA;
  tss.limit = sizeof(tss_bytes) - 1;
  tss.selector = kTssSel;
  tss.type = 11;  // 64-bit busy TSS
  tss.present = 1;

  uint64_t gdt[6] = {0, 0, SegmentDescriptor(data), SegmentDescriptor(code), SegmentDescriptor(tss),
                     0 /* TSS base bits 63:32 */};
  mem.Write(RML_GDT_GPA, gdt, sizeof(gdt));

  sregs.cs = code;
  sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data;
  sregs.tr = tss;
  sregs.ldt = {};
  sregs.ldt.unusable = 1;
  sregs.gdt.base = RML_GDT_GPA;
  sregs.gdt.limit = sizeof(gdt) - 1;
  sregs.idt.base = 0;
  sregs.idt.limit = 0;  // no IDT: any fault escalates to a triple fault the monitor reports
  sregs.cr0 = kCr0Pe | kCr0Mp | kCr0Et | kCr0Ne | kCr0Wp | kCr0Pg;
  sregs.cr3 = RML_PML4_GPA;
  sregs.cr4 = kCr4Pae | kCr4Osfxsr | kCr4Osxmmexcpt;
  sregs.efer = kEferLme | kEferLma;
  if (auto s = Ioctl(vcpu_fd, KVM_SET_SREGS, &sregs, "KVM_SET_SREGS"); !s.ok()) return s;

  kvm_regs regs{};
  regs.rip = entry;
  regs.rsp = RML_STACK_TOP;
  regs.rflags = kRflagsReserved | kRflagsIopl3 | kRflagsIf;
  return Ioctl(vcpu_fd, KVM_SET_REGS, &regs, "KVM_SET_REGS");
}

}  // namespace romulus::vmm
