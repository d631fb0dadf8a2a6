// Block device: sector reads and writes through a buffer in guest memory, backed by an image
// file. Every write is reported to a listener (the checkpoint layer carries it to the mirror).
#ifndef ROMULUS_VMM_BLOCK_DEVICE_H_
#define ROMULUS_VMM_BLOCK_DEVICE_H_

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "proto/romulus.pb.h"
#include "vmm/dirty_bitmap.h"
#include "vmm/guest_memory.h"
#include "vmm/sys.h"

namespace romulus::vmm {

inline constexpr uint64_t kMaxDiskBytes = 64ull << 30;
// The disk travels in chunks of this size (a synchronisation, post-copy); the last may be short.
inline constexpr uint64_t kDiskChunkBytes = 64 * 1024;

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

  // Post-copy: the chunks set in `missing` (kDiskChunkBytes each) have not arrived, and the
  // image holds nothing of them. A command that touches one waits until PlaceChunk puts it
  // there; `on_missing(chunk)` asks for it, once per chunk: it runs with the device's lock held,
  // so it must neither block nor call the device. A command that
  // waits longer than `stall`, or when AbandonChunks is called, fails as a host I/O error that
  // says how many chunks never came (the VM stops); it read or wrote nothing.
  absl::Status ExpectChunks(DirtyBitmap missing, std::function<void(uint64_t chunk)> on_missing,
                            std::chrono::milliseconds stall);
  // Chunk `chunk` arrived: written into the image, and whatever waits for it goes on. OutOfRange
  // for a chunk past the disk, InvalidArgument for a wrong length, AlreadyExists for a chunk
  // that is here (placed before, or never missing): the image is then left as it was.
  absl::Status PlaceChunk(uint64_t chunk, std::string_view data);
  // The chunks still missing will never come (their source is gone): waits fail now.
  void AbandonChunks();
  uint64_t missing_chunks() const;

 private:
  // Waits until the chunks under [offset, offset+bytes) are here (post-copy).
  absl::Status AwaitChunks(uint64_t offset, uint64_t bytes);

  BlockDevice(Fd fd, std::string path, uint64_t sectors)
      : fd_(std::move(fd)), path_(std::move(path)), sectors_(sectors) {}
  Fd fd_;
  std::string path_;
  uint64_t sectors_;
  uint64_t reads_ = 0, writes_ = 0, sectors_written_ = 0;
  std::mutex listener_mu_;
  WriteListener listener_;

  mutable std::mutex chunks_mu_;
  std::condition_variable chunks_cv_;
  DirtyBitmap missing_chunks_, requested_chunks_;  // empty unless post-copy
  uint64_t missing_count_ = 0;
  bool abandoned_ = false;
  std::function<void(uint64_t)> on_missing_;
  std::chrono::milliseconds stall_{0};
};

// xxh3-64 of a whole file (disk images, snapshot files).
absl::StatusOr<uint64_t> FileDigest(int fd, uint64_t bytes);

}  // namespace romulus::vmm

#endif  // ROMULUS_VMM_BLOCK_DEVICE_H_
