#include "vmm/guest_memory.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include "absl/strings/str_cat.h"
#include "vmm/xxhash_dispatch.h"

namespace romulus::vmm {

uint64_t DirtyBitmap::Count() const {
  uint64_t n = 0;
  for (uint64_t w : words_) n += static_cast<uint64_t>(__builtin_popcountll(w));
  return n;
}

void DirtyBitmap::Merge(const DirtyBitmap& other) {
  for (size_t i = 0; i < words_.size() && i < other.words_.size(); i++)
    words_[i] |= other.words_[i];
}

absl::Status GuestMemory::ValidateSize(uint64_t bytes) {
  if (bytes < kMinMemoryBytes || bytes > kMaxMemoryBytes || bytes % (2ull << 20) != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "guest memory must be 16 MiB to 4 GiB in whole 2 MiB units, got ", bytes, " bytes"));
  }
  return absl::OkStatus();
}

GuestMemory::GuestMemory(Fd fd, uint8_t* base, uint64_t size)
    : fd_(std::move(fd)),
      base_(base),
      size_(size),
      monitor_dirty_(new std::atomic<uint64_t>[(size / kPageSize + 63) / 64]()) {}

GuestMemory::~GuestMemory() { ::munmap(base_, size_); }

absl::StatusOr<std::unique_ptr<GuestMemory>> GuestMemory::CreateMemfd(uint64_t bytes) {
  if (auto s = ValidateSize(bytes); !s.ok()) return s;
  Fd fd(::memfd_create("romulus-guest-ram", MFD_CLOEXEC));
  if (!fd.valid()) return ErrnoStatus("memfd_create");
  if (::ftruncate(fd.get(), static_cast<off_t>(bytes)) != 0) return ErrnoStatus("ftruncate memfd");
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
  if (p == MAP_FAILED) return ErrnoStatus("mmap guest memory");
  ::madvise(p, bytes, MADV_DONTDUMP);
  return std::unique_ptr<GuestMemory>(
      new GuestMemory(std::move(fd), static_cast<uint8_t*>(p), bytes));
}

absl::StatusOr<std::unique_ptr<GuestMemory>> GuestMemory::MapFileShared(const std::string& path,
                                                                        uint64_t bytes,
                                                                        bool fresh) {
  if (auto s = ValidateSize(bytes); !s.ok()) return s;
  Fd fd(::open(path.c_str(), O_RDWR | O_CLOEXEC | (fresh ? O_CREAT | O_TRUNC : 0), 0600));
  if (!fd.valid()) return ErrnoStatus(absl::StrCat("open ", path));
  struct stat st;
  if (::fstat(fd.get(), &st) != 0) return ErrnoStatus(absl::StrCat("stat ", path));
  if (fresh) {
    if (::ftruncate(fd.get(), static_cast<off_t>(bytes)) != 0)
      return ErrnoStatus(absl::StrCat("size ", path));
  } else if (static_cast<uint64_t>(st.st_size) != bytes) {
    return absl::FailedPreconditionError(
        absl::StrCat(path, " holds ", st.st_size, " bytes, the guest has ", bytes));
  }
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
  if (p == MAP_FAILED) return ErrnoStatus(absl::StrCat("mmap ", path));
  ::madvise(p, bytes, MADV_DONTDUMP);
  return std::unique_ptr<GuestMemory>(
      new GuestMemory(std::move(fd), static_cast<uint8_t*>(p), bytes));
}

absl::StatusOr<std::unique_ptr<GuestMemory>> GuestMemory::MapFilePrivate(const std::string& path,
                                                                         uint64_t bytes) {
  if (auto s = ValidateSize(bytes); !s.ok()) return s;
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) return ErrnoStatus(absl::StrCat("open ", path));
  struct stat st;
  if (::fstat(fd.get(), &st) != 0) return ErrnoStatus(absl::StrCat("stat ", path));
  if (static_cast<uint64_t>(st.st_size) != bytes) {
    return absl::DataLossError(absl::StrCat(path, " holds ", st.st_size, " bytes, expected ", bytes,
                                            " (truncated or wrong file)"));
  }
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd.get(), 0);
  if (p == MAP_FAILED) return ErrnoStatus(absl::StrCat("mmap ", path));
  return std::unique_ptr<GuestMemory>(
      new GuestMemory(std::move(fd), static_cast<uint8_t*>(p), bytes));
}

void GuestMemory::MarkDirty(uint64_t gpa, uint64_t len) {
  if (len == 0) return;
  for (uint64_t page = gpa / kPageSize; page <= (gpa + len - 1) / kPageSize; page++) {
    monitor_dirty_[page / 64].fetch_or(1ull << (page % 64), std::memory_order_relaxed);
  }
}

DirtyBitmap GuestMemory::TakeMonitorDirty() {
  DirtyBitmap out(pages());
  for (size_t i = 0; i < out.words().size(); i++) {
    out.words()[i] = monitor_dirty_[i].exchange(0, std::memory_order_relaxed);
  }
  return out;
}

uint64_t GuestMemory::Digest() const { return XXH3_64bits(base_, size_); }

}  // namespace romulus::vmm
