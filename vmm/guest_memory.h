// Guest RAM: a shared mapping of a memfd (or of a snapshot file, privately), plus the record of
// pages the monitor itself wrote, which KVM's dirty log cannot see.
#ifndef ROMULUS_VMM_GUEST_MEMORY_H_
#define ROMULUS_VMM_GUEST_MEMORY_H_

#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "vmm/dirty_bitmap.h"
#include "vmm/sys.h"

namespace romulus::vmm {

inline constexpr uint64_t kPageSize = 4096;
inline constexpr uint64_t kMinMemoryBytes = 16ull << 20;
inline constexpr uint64_t kMaxMemoryBytes = 4ull << 30;

// True when the `n` bytes at `p` (a multiple of 8, at least 8) are all zero. A page in use
// rarely starts with zeros: most answers need one word.
inline bool AllZero(const uint8_t* p, size_t n) {
  uint64_t acc;
  std::memcpy(&acc, p, 8);
  if (acc != 0) return false;
  for (size_t i = 8; i < n; i += 8) {
    uint64_t w;
    std::memcpy(&w, p + i, 8);
    acc |= w;
  }
  return acc == 0;
}

class GuestMemory {
 public:
  // Checks that `bytes` is a size the monitor supports (16 MiB-4 GiB, 2 MiB multiple).
  static absl::Status ValidateSize(uint64_t bytes);
  // Fresh, zeroed memory backed by a memfd.
  static absl::StatusOr<std::unique_ptr<GuestMemory>> CreateMemfd(uint64_t bytes);
  // Guest RAM in a named file, shared: it outlives the process, so that a host whose monitor
  // died still holds the guest's memory as it was (to seed its replica when it returns as a
  // mirror). `fresh`: the file is (re)created zeroed (a boot); otherwise it must exist and hold
  // exactly `bytes` (what a guest left).
  static absl::StatusOr<std::unique_ptr<GuestMemory>> MapFileShared(const std::string& path,
                                                                    uint64_t bytes, bool fresh);
  // Maps a file of exactly `bytes` privately: the file itself is never written.
  static absl::StatusOr<std::unique_ptr<GuestMemory>> MapFilePrivate(const std::string& path,
                                                                     uint64_t bytes);
  ~GuestMemory();
  GuestMemory(const GuestMemory&) = delete;
  GuestMemory& operator=(const GuestMemory&) = delete;

  uint8_t* data() { return base_; }
  const uint8_t* data() const { return base_; }
  uint64_t size() const { return size_; }
  uint64_t pages() const { return size_ / kPageSize; }
  int fd() const { return fd_.get(); }

  // True when [gpa, gpa+len) lies inside guest RAM.
  bool Contains(uint64_t gpa, uint64_t len) const { return gpa <= size_ && len <= size_ - gpa; }
  // Monitor writes into guest RAM go through these so that the next harvest sees them.
  void Write(uint64_t gpa, const void* src, uint64_t len) {
    std::memcpy(base_ + gpa, src, len);
    MarkDirty(gpa, len);
  }
  void MarkDirty(uint64_t gpa, uint64_t len);
  // Returns the pages the monitor wrote since the last call, and forgets them.
  DirtyBitmap TakeMonitorDirty();

  // xxh3-64 of all of guest RAM.
  uint64_t Digest() const;

 private:
  GuestMemory(Fd fd, uint8_t* base, uint64_t size);
  Fd fd_;
  uint8_t* base_;
  uint64_t size_;
  std::unique_ptr<std::atomic<uint64_t>[]> monitor_dirty_;
};

}  // namespace romulus::vmm

#endif  // ROMULUS_VMM_GUEST_MEMORY_H_
