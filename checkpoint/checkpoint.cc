#include "checkpoint/checkpoint.h"

#include <fcntl.h>
#include <xxhash.h>

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace romulus::checkpoint {
namespace {

using Clock = std::chrono::steady_clock;
constexpr uint64_t kPage = vmm::kPageSize;
constexpr uint64_t kDiskChunk = 64 * 1024;  // the full copy reads the disk in these

}  // namespace

uint64_t Checkpoint::bytes() const {
  uint64_t n = pages.size() + gfns.size() * 16 + static_cast<uint64_t>(state.ByteSizeLong());
  for (const DiskWrite& w : disk_writes) n += w.data.size() + 8;
  return n;
}

uint64_t CheckpointDigest(const Checkpoint& c) {
  XXH3_state_t* st = XXH3_createState();
  XXH3_64bits_reset(st);
  uint64_t head[3] = {c.epoch, c.full ? 1u : 0u, c.gfns.size()};
  XXH3_64bits_update(st, head, sizeof(head));
  XXH3_64bits_update(st, c.gfns.data(), c.gfns.size() * sizeof(uint64_t));
  XXH3_64bits_update(st, c.hashes.data(), c.hashes.size() * sizeof(uint64_t));
  for (const DiskWrite& w : c.disk_writes) {
    uint64_t h[2] = {w.sector, XXH3_64bits(w.data.data(), w.data.size())};
    XXH3_64bits_update(st, h, sizeof(h));
  }
  std::string state = c.state.SerializeAsString();
  XXH3_64bits_update(st, state.data(), state.size());
  uint64_t d = XXH3_64bits_digest(st);
  XXH3_freeState(st);
  return d;
}

EpochEngine::EpochEngine(vmm::Vm& vm, vmm::OutputGate& gate, Options options)
    : vm_(vm), gate_(gate), options_(options) {
  gate_.SetHolding(true);
  vm_.disk().SetWriteListener([this](uint64_t sector, std::span<const uint8_t> data) {
    std::lock_guard<std::mutex> lock(disk_mu_);
    disk_writes_.push_back({sector, std::string(data.begin(), data.end())});
  });
}

EpochEngine::~EpochEngine() { vm_.disk().SetWriteListener(nullptr); }

absl::StatusOr<std::shared_ptr<const Checkpoint>> EpochEngine::TakeCheckpoint(
    std::chrono::milliseconds wait) {
  auto cp = std::make_shared<Checkpoint>();
  uint64_t generation;
  {
    std::unique_lock<std::mutex> lock(mu_);
    if (!cv_.wait_for(lock, wait, [this] {
          return stats_.in_flight_bytes < options_.max_in_flight_bytes &&
                 in_flight_.size() < options_.max_in_flight_checkpoints;
        })) {
      return absl::DeadlineExceededError(
          absl::StrCat("no acknowledgement freed the in-flight budget (", in_flight_.size(),
                       " checkpoints, ", stats_.in_flight_bytes, " bytes)"));
    }
    generation = generation_;
    cp->full = next_full_;
  }
  auto t0 = Clock::now();
  if (auto s = vm_.Pause(); !s.ok()) return s;
  // From here to Resume() the vCPU is stopped: only harvesting and copying.
  cp->epoch = next_epoch_;
  auto dirty = vm_.HarvestDirty();
  if (!dirty.ok()) {
    (void)vm_.Resume();
    return dirty.status();
  }
  const uint8_t* mem = vm_.memory().data();
  if (cp->full) {
    cp->gfns.resize(vm_.memory().pages());
    for (uint64_t i = 0; i < cp->gfns.size(); i++) cp->gfns[i] = i;
    cp->pages.assign(mem, mem + vm_.memory().size());
  } else {
    cp->gfns.reserve(dirty->Count());
    dirty->ForEach([&](uint64_t gfn) { cp->gfns.push_back(gfn); });
    cp->pages.resize(cp->gfns.size() * kPage);
    for (size_t i = 0; i < cp->gfns.size(); i++) {
      std::memcpy(cp->pages.data() + i * kPage, mem + cp->gfns[i] * kPage, kPage);
    }
  }
  {
    std::lock_guard<std::mutex> lock(disk_mu_);
    cp->disk_writes.swap(disk_writes_);
  }
  if (cp->full) {  // the whole disk replaces the writes collected before the first checkpoint
    cp->disk_writes.clear();
    uint64_t disk_bytes = vm_.disk().sectors() * RML_SECTOR_SIZE;
    for (uint64_t off = 0; off < disk_bytes; off += kDiskChunk) {
      DiskWrite w{off / RML_SECTOR_SIZE, std::string(std::min(kDiskChunk, disk_bytes - off), '\0')};
      if (::pread(vm_.disk().fd(), w.data.data(), w.data.size(), static_cast<off_t>(off)) !=
          static_cast<ssize_t>(w.data.size())) {
        (void)vm_.Resume();
        return vmm::ErrnoStatus("read disk for the full checkpoint");
      }
      cp->disk_writes.push_back(std::move(w));
    }
  }
  auto state = vm_.SaveState();
  if (!state.ok()) {
    (void)vm_.Resume();
    return state.status();
  }
  cp->state = std::move(*state);
  cp->output_mark = gate_.Mark();
  if (pause_hook_) pause_hook_(*cp);
  if (auto s = vm_.Resume(); !s.ok()) return s;
  double pause_ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
  next_epoch_++;

  // After the resume: hashing and the digest.
  cp->hashes.resize(cp->gfns.size());
  for (size_t i = 0; i < cp->gfns.size(); i++) {
    cp->hashes[i] = XXH3_64bits(cp->pages.data() + i * kPage, kPage);
  }
  cp->digest = CheckpointDigest(*cp);

  std::lock_guard<std::mutex> lock(mu_);
  if (generation != generation_) {
    return absl::AbortedError("the mirror connection restarted during this checkpoint");
  }
  if (cp->full) next_full_ = false;
  stats_.epochs++;
  stats_.last_pause_ms = pause_ms;
  stats_.in_flight_bytes += cp->bytes();
  stats_.peak_in_flight_bytes = std::max(stats_.peak_in_flight_bytes, stats_.in_flight_bytes);
  in_flight_.push_back(cp);
  return std::shared_ptr<const Checkpoint>(cp);
}

void EpochEngine::Acknowledge(uint64_t epoch) {
  uint64_t mark = 0;
  bool release = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    while (!in_flight_.empty() && in_flight_.front()->epoch <= epoch) {
      mark = in_flight_.front()->output_mark;
      release = true;
      stats_.in_flight_bytes -= in_flight_.front()->bytes();
      stats_.acknowledged = in_flight_.front()->epoch + 1;
      in_flight_.pop_front();
    }
  }
  if (release) gate_.ReleaseThrough(mark);
  cv_.notify_all();
}

void EpochEngine::Restart() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    in_flight_.clear();
    stats_.in_flight_bytes = 0;
    next_full_ = true;
    generation_++;
  }
  cv_.notify_all();
}

EpochEngine::Stats EpochEngine::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

absl::StatusOr<std::unique_ptr<ReplicaStore>> ReplicaStore::Create(uint64_t memory_bytes,
                                                                   const std::string& disk_path,
                                                                   uint64_t disk_bytes) {
  auto mem = vmm::GuestMemory::CreateMemfd(memory_bytes);
  if (!mem.ok()) return mem.status();
  if (auto s = vmm::BlockDevice::CreateImage(disk_path, disk_bytes); !s.ok()) return s;
  vmm::Fd fd(::open(disk_path.c_str(), O_RDWR | O_CLOEXEC));
  if (!fd.valid()) return vmm::ErrnoStatus(absl::StrCat("open replica disk ", disk_path));
  return std::unique_ptr<ReplicaStore>(
      new ReplicaStore(std::move(*mem), std::move(fd), disk_bytes));
}

absl::Status ReplicaStore::Verify(const Checkpoint& c) const {
  auto bad = [&](const std::string& why) {
    return absl::DataLossError(absl::StrCat("checkpoint ", c.epoch, " rejected: ", why));
  };
  uint64_t pages = memory_->pages();
  if (sequence_reset_ || committed_epoch_ < 0) {
    if (!c.full) return bad("a full checkpoint is needed first");
  } else if (c.full ? static_cast<int64_t>(c.epoch) <= committed_epoch_
                    : static_cast<int64_t>(c.epoch) != committed_epoch_ + 1) {
    return absl::FailedPreconditionError(
        absl::StrCat("checkpoint ", c.epoch, " rejected: expected epoch ", committed_epoch_ + 1,
                     " (replayed or out of order)"));
  }
  if (c.full && c.gfns.size() != pages) return bad("a full checkpoint must carry all of memory");
  if (c.hashes.size() != c.gfns.size() || c.pages.size() != c.gfns.size() * kPage) {
    return bad("page count, hash count and page bytes disagree");
  }
  for (size_t i = 0; i < c.gfns.size(); i++) {
    if (c.gfns[i] >= pages || (i > 0 && c.gfns[i] <= c.gfns[i - 1])) {
      return bad(absl::StrCat("page number ", c.gfns[i], " out of range or out of order"));
    }
    if (XXH3_64bits(c.pages.data() + i * kPage, kPage) != c.hashes[i]) {
      return bad(absl::StrCat("page ", c.gfns[i], " does not match its hash"));
    }
  }
  uint64_t sectors = disk_bytes_ / RML_SECTOR_SIZE;
  for (const DiskWrite& w : c.disk_writes) {
    uint64_t n = w.data.size() / RML_SECTOR_SIZE;
    if (w.data.empty() || w.data.size() % RML_SECTOR_SIZE || w.sector >= sectors ||
        n > sectors - w.sector) {
      return bad(absl::StrCat("disk write at sector ", w.sector, " of ", w.data.size(),
                              " bytes does not fit the disk"));
    }
  }
  if (c.state.format_version() != vmm::kSnapshotFormatVersion ||
      c.state.memory_bytes() != memory_->size() || c.state.disk_bytes() != disk_bytes_ ||
      c.state.vcpus_size() != 1) {
    return bad("VM state does not match this replica (version, sizes or vCPUs)");
  }
  if (CheckpointDigest(c) != c.digest) return bad("checkpoint digest mismatch");
  return absl::OkStatus();
}

absl::Status ReplicaStore::Apply(const Checkpoint& c) {
  if (auto s = Verify(c); !s.ok()) return s;
  for (size_t i = 0; i < c.gfns.size(); i++) {
    std::memcpy(memory_->data() + c.gfns[i] * kPage, c.pages.data() + i * kPage, kPage);
  }
  for (const DiskWrite& w : c.disk_writes) {
    if (::pwrite(disk_.get(), w.data.data(), w.data.size(),
                 static_cast<off_t>(w.sector * RML_SECTOR_SIZE)) !=
        static_cast<ssize_t>(w.data.size())) {
      return vmm::ErrnoStatus("write replica disk");  // host I/O failure, not bad input
    }
  }
  state_ = c.state;
  committed_epoch_ = static_cast<int64_t>(c.epoch);
  sequence_reset_ = false;
  return absl::OkStatus();
}

absl::StatusOr<uint64_t> ReplicaStore::DiskDigest() const {
  return vmm::FileDigest(disk_.get(), disk_bytes_);
}

absl::StatusOr<vmm::SnapshotInfo> ReplicaStore::SaveSnapshot(const std::string& dir) const {
  if (committed_epoch_ < 0) return absl::FailedPreconditionError("no checkpoint committed yet");
  vmm::SnapshotInfo info;
  std::memcpy(&info.guest, memory_->data() + RML_BOOT_GPA + offsetof(rml_boot, status),
              sizeof(info.guest));
  if (auto s = vmm::WriteSnapshot(dir, state_, *memory_, disk_.get(), &info); !s.ok()) return s;
  return info;
}

}  // namespace romulus::checkpoint
