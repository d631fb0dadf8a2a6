#include "vmm/block_device.h"

#include <fcntl.h>
#include <sys/stat.h>

#include <algorithm>
#include <vector>

#include "absl/strings/str_cat.h"
#include "guest/abi.h"
#include "vmm/xxhash_dispatch.h"

namespace romulus::vmm {

absl::StatusOr<std::unique_ptr<BlockDevice>> BlockDevice::Open(const std::string& path) {
  Fd fd(::open(path.c_str(), O_RDWR | O_CLOEXEC));
  if (!fd.valid()) return ErrnoStatus(absl::StrCat("open disk image ", path));
  struct stat st;
  if (::fstat(fd.get(), &st) != 0) return ErrnoStatus(absl::StrCat("stat ", path));
  uint64_t bytes = static_cast<uint64_t>(st.st_size);
  if (bytes == 0 || bytes % RML_SECTOR_SIZE != 0 || bytes > kMaxDiskBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("disk image ", path, " is ", bytes,
                     " bytes: need a whole number of 512-byte sectors, "
                     "at most 64 GiB"));
  }
  return std::unique_ptr<BlockDevice>(
      new BlockDevice(std::move(fd), path, bytes / RML_SECTOR_SIZE));
}

absl::Status BlockDevice::CreateImage(const std::string& path, uint64_t bytes) {
  if (bytes == 0 || bytes % RML_SECTOR_SIZE != 0 || bytes > kMaxDiskBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("disk size ", bytes, " must be a whole number of sectors, at most 64 GiB"));
  }
  Fd fd(::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  if (!fd.valid()) return ErrnoStatus(absl::StrCat("create disk image ", path));
  if (::ftruncate(fd.get(), static_cast<off_t>(bytes)) != 0) {
    return ErrnoStatus(absl::StrCat("size disk image ", path));
  }
  return absl::OkStatus();
}

absl::Status BlockDevice::OnDoorbell(GuestMemory& mem) {
  rml_block_cmd cmd;
  std::memcpy(&cmd, mem.data() + RML_BLOCK_CMD_GPA, sizeof(cmd));
  int32_t status = 0;
  uint64_t bytes = static_cast<uint64_t>(cmd.sectors) * RML_SECTOR_SIZE;
  uint8_t* buf = mem.data() + RML_BLOCK_BUF_GPA;
  if (cmd.sectors == 0 || bytes > RML_BLOCK_BUF_BYTES || cmd.sector >= sectors_ ||
      cmd.sectors > sectors_ - cmd.sector) {
    status = -EINVAL;
  } else if (cmd.op != RML_BLOCK_READ && cmd.op != RML_BLOCK_WRITE) {
    status = -ENOSYS;
  } else if (auto s = AwaitChunks(cmd.sector * RML_SECTOR_SIZE, bytes); !s.ok()) {
    return s;
  } else if (cmd.op == RML_BLOCK_READ) {
    ssize_t n = ::pread(fd_.get(), buf, bytes, static_cast<off_t>(cmd.sector * RML_SECTOR_SIZE));
    if (n != static_cast<ssize_t>(bytes)) return ErrnoStatus(absl::StrCat("read ", path_));
    mem.MarkDirty(RML_BLOCK_BUF_GPA, bytes);
    reads_++;
  } else if (cmd.op == RML_BLOCK_WRITE) {
    ssize_t n = ::pwrite(fd_.get(), buf, bytes, static_cast<off_t>(cmd.sector * RML_SECTOR_SIZE));
    if (n != static_cast<ssize_t>(bytes)) return ErrnoStatus(absl::StrCat("write ", path_));
    writes_++;
    sectors_written_ += cmd.sectors;
    std::lock_guard<std::mutex> lock(listener_mu_);
    if (listener_) listener_(cmd.sector, std::span<const uint8_t>(buf, bytes));
  }
  mem.Write(RML_BLOCK_CMD_GPA + offsetof(rml_block_cmd, status), &status, sizeof(status));
  return absl::OkStatus();
}

absl::Status BlockDevice::ExpectChunks(DirtyBitmap missing,
                                       std::function<void(uint64_t chunk)> on_missing,
                                       std::chrono::milliseconds stall) {
  uint64_t chunks = (sectors_ * RML_SECTOR_SIZE + kDiskChunkBytes - 1) / kDiskChunkBytes;
  if (missing.pages() != chunks) {
    return absl::InvalidArgumentError(
        absl::StrCat("a bitmap of ", missing.pages(), " chunks for a disk of ", chunks));
  }
  std::lock_guard<std::mutex> lock(chunks_mu_);
  missing_count_ = missing.Count();
  missing_chunks_ = std::move(missing);
  requested_chunks_ = DirtyBitmap(chunks);
  on_missing_ = std::move(on_missing);
  stall_ = stall;
  abandoned_ = false;
  return absl::OkStatus();
}

absl::Status BlockDevice::PlaceChunk(uint64_t chunk, std::string_view data) {
  uint64_t disk = sectors_ * RML_SECTOR_SIZE;
  std::unique_lock<std::mutex> lock(chunks_mu_);
  if (chunk >= missing_chunks_.pages() || chunk >= (disk + kDiskChunkBytes - 1) / kDiskChunkBytes) {
    return absl::OutOfRangeError(absl::StrCat("disk chunk ", chunk, " lies past the disk"));
  }
  uint64_t offset = chunk * kDiskChunkBytes;
  uint64_t length = std::min(kDiskChunkBytes, disk - offset);
  if (data.size() != length) {
    return absl::InvalidArgumentError(
        absl::StrCat("disk chunk ", chunk, " is ", length, " bytes, not ", data.size()));
  }
  if (!missing_chunks_.Test(chunk)) {
    return absl::AlreadyExistsError(absl::StrCat("disk chunk ", chunk, " is here already"));
  }
  // Under the lock: no command touches a missing chunk, and none reads this one half written.
  ssize_t n = ::pwrite(fd_.get(), data.data(), length, static_cast<off_t>(offset));
  if (n != static_cast<ssize_t>(length)) return ErrnoStatus(absl::StrCat("write ", path_));
  missing_chunks_.Clear(chunk);
  missing_count_--;
  chunks_cv_.notify_all();
  return absl::OkStatus();
}

void BlockDevice::AbandonChunks() {
  std::lock_guard<std::mutex> lock(chunks_mu_);
  abandoned_ = true;
  chunks_cv_.notify_all();
}

uint64_t BlockDevice::missing_chunks() const {
  std::lock_guard<std::mutex> lock(chunks_mu_);
  return missing_count_;
}

absl::Status BlockDevice::AwaitChunks(uint64_t offset, uint64_t bytes) {
  std::unique_lock<std::mutex> lock(chunks_mu_);
  if (missing_count_ == 0) return absl::OkStatus();
  uint64_t first = offset / kDiskChunkBytes, last = (offset + bytes - 1) / kDiskChunkBytes;
  auto here = [&] {
    for (uint64_t c = first; c <= last; c++) {
      if (missing_chunks_.Test(c)) return false;
    }
    return true;
  };
  if (here()) return absl::OkStatus();
  std::vector<uint64_t> ask;
  for (uint64_t c = first; c <= last; c++) {
    if (missing_chunks_.Test(c) && !requested_chunks_.Test(c)) {
      requested_chunks_.Set(c);
      ask.push_back(c);
    }
  }
  if (on_missing_) {
    for (uint64_t c : ask) on_missing_(c);
  }
  bool arrived = chunks_cv_.wait_for(lock, stall_, [&] { return abandoned_ || here(); });
  if (!abandoned_ && arrived) return absl::OkStatus();
  return absl::UnavailableError(absl::StrCat(
      "disk chunk ", first, abandoned_ ? " will never arrive" : " did not arrive in time",
      " (post-copy): ", missing_count_, " chunks of the disk are missing"));
}

pb::BlockDeviceState BlockDevice::Save() const {
  pb::BlockDeviceState s;
  s.set_sectors(sectors_);
  s.set_reads(reads_);
  s.set_writes(writes_);
  s.set_sectors_written(sectors_written_);
  return s;
}

absl::Status BlockDevice::Restore(const pb::BlockDeviceState& state) {
  if (state.sectors() != sectors_) {
    return absl::InvalidArgumentError(absl::StrCat("block device state is for ", state.sectors(),
                                                   " sectors, the image has ", sectors_));
  }
  reads_ = state.reads();
  writes_ = state.writes();
  sectors_written_ = state.sectors_written();
  return absl::OkStatus();
}

absl::StatusOr<uint64_t> FileDigest(int fd, uint64_t bytes) {
  XXH3_state_t* st = XXH3_createState();
  XXH3_64bits_reset(st);
  std::vector<uint8_t> buf(1 << 20);
  uint64_t off = 0;
  while (off < bytes) {
    ssize_t n = ::pread(fd, buf.data(), std::min<uint64_t>(buf.size(), bytes - off),
                        static_cast<off_t>(off));
    if (n <= 0) {
      XXH3_freeState(st);
      return n < 0 ? ErrnoStatus("read for digest")
                   : absl::DataLossError("file shorter than expected");
    }
    XXH3_64bits_update(st, buf.data(), static_cast<size_t>(n));
    off += static_cast<uint64_t>(n);
  }
  uint64_t d = XXH3_64bits_digest(st);
  XXH3_freeState(st);
  return d;
}

}  // namespace romulus::vmm
