// Block device: sector reads and writes through a buffer in guest memory, backed by an image
// file. Every write is reported to a listener (the checkpoint layer carries it to the mirror).
#ifndef ROMULUS_VMM_BLOCK_DEVICE_H_
#define ROMULUS_VMM_BLOCK_DEVICE_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>

#include "absl/status/statusor.h"
#include "proto/romulus.pb.h"
#include "vmm/guest_memory.h"
#include "vmm/sys.h"

namespace romulus::vmm {

inline constexpr uint64_t kMaxDiskBytes = 64ull << 30;

class BlockDevice {
 public:
  using WriteListener = std::function<void(uint64_t sector, std::span<const uint8_t> data)>;
  // Opens an existing image: a whole number of sectors, at most 64 GiB.
  static absl::StatusOr<std::unique_ptr<BlockDevice>> Open(const std::string& path);
  // Creates (or resizes) an image of `bytes` filled with zeroes.
  static absl::Status CreateImage(const std::string& path, uint64_t bytes);

  uint64_t sectors() const { return sectors_; }
  const std::string& path() const { return path_; }
  int fd() const { return fd_.get(); }
  // Any thread; once this returns the previous listener is not running.
  void SetWriteListener(WriteListener listener) {
    std::lock_guard<std::mutex> lock(listener_mu_);
    listener_ = std::move(listener);
  }

  // Executes the command at RML_BLOCK_CMD_GPA. A bad command is answered with an error status
  // in guest memory; only a host I/O failure is returned as an error.
  absl::Status OnDoorbell(GuestMemory& mem);

  pb::BlockDeviceState Save() const;
  absl::Status Restore(const pb::BlockDeviceState& state);

 private:
  BlockDevice(Fd fd, std::string path, uint64_t sectors)
      : fd_(std::move(fd)), path_(std::move(path)), sectors_(sectors) {}
  Fd fd_;
  std::string path_;
  uint64_t sectors_;
  uint64_t reads_ = 0, writes_ = 0, sectors_written_ = 0;
  std::mutex listener_mu_;
  WriteListener listener_;
};

// xxh3-64 of a whole file (disk images, snapshot files).
absl::StatusOr<uint64_t> FileDigest(int fd, uint64_t bytes);

}  // namespace romulus::vmm

#endif  // ROMULUS_VMM_BLOCK_DEVICE_H_
