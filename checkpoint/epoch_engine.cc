// The primary's end of the epoch pipeline: pause, harvest, stage, resume; the in-flight budget;
// outputs released by acknowledgements; the pre-copy source of a synchronisation.
#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "checkpoint/checkpoint.h"
#include "vmm/xxhash_dispatch.h"

namespace romulus::checkpoint {
namespace {

using Clock = std::chrono::steady_clock;

// Copies the listed pages of `mem` into `run` and hashes them.
void CopyPages(const uint8_t* mem, PageRun& run) {
  run.pages.resize(run.gfns.size() * vmm::kPageSize);
  for (size_t i = 0; i < run.gfns.size(); i++) {
    std::memcpy(run.pages.data() + i * vmm::kPageSize, mem + run.gfns[i] * vmm::kPageSize,
                vmm::kPageSize);
  }
}

void HashPages(PageRun& run) {
  run.hashes.resize(run.gfns.size());
  for (size_t i = 0; i < run.gfns.size(); i++) {
    run.hashes[i] = XXH3_64bits(run.pages.data() + i * vmm::kPageSize, vmm::kPageSize);
  }
}

}  // namespace

EpochEngine::EpochEngine(vmm::CheckpointableVm& vm, vmm::OutputGate& gate, Options options)
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
  }
  std::lock_guard<std::mutex> take(take_mu_);
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (generation != generation_) return absl::AbortedError("the mirror connection restarted");
    cp->full = next_full_;
  }
  auto t0 = Clock::now();
  if (auto s = vm_.Pause(); !s.ok()) return s;
  // From here to Resume() the vCPU is stopped: only harvesting and copying.
  auto fail = [this](absl::Status s) {
    (void)ResumeVm();
    return s;
  };
  cp->epoch = next_epoch_;
  auto dirty = vm_.HarvestDirty();
  if (!dirty.ok()) return fail(dirty.status());
  if (cp->full && !syncing_) {
    // No pre-copy: everything is pending, and the whole disk is read here. Writes recorded
    // before this pause are in what is read.
    StartSyncState();
    std::lock_guard<std::mutex> lock(disk_mu_);
    disk_writes_.clear();
  }
  if (cp->full) {
    sync_pending_.Merge(*dirty);
    *dirty = std::move(sync_pending_);
  }
  cp->gfns.reserve(dirty->Count());
  dirty->ForEach([&](uint64_t gfn) {
    if (gfn < vm_.memory().pages()) cp->gfns.push_back(gfn);  // the tail word's spare bits
  });
  CopyPages(vm_.memory().data(), *cp);
  if (cp->full) {  // the disk chunks not sent yet, then the writes recorded since the sync began
    for (;;) {
      auto chunk = ReadDiskChunk();
      if (!chunk.ok()) return fail(chunk.status());
      if (!chunk->has_value()) break;
      cp->disk_writes.push_back(std::move(**chunk));
    }
  }
  {
    std::lock_guard<std::mutex> lock(disk_mu_);
    cp->disk_writes.insert(cp->disk_writes.end(), std::make_move_iterator(disk_writes_.begin()),
                           std::make_move_iterator(disk_writes_.end()));
    disk_writes_.clear();
  }
  auto state = vm_.SaveState();
  if (!state.ok()) return fail(state.status());
  cp->state = std::move(*state);
  cp->output_mark = gate_.Mark();
  if (pause_hook_) pause_hook_(*cp);
  if (auto s = ResumeVm(); !s.ok()) return s;
  double pause_ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
  cp->paused_at = t0;
  pause_seconds_.Observe(pause_ms / 1000);
  next_epoch_++;

  // After the resume: hashing and the digest.
  HashPages(*cp);
  cp->digest = CheckpointDigest(*cp, cp->full ? sync_digest_.value() : 0);
  if (cp->full) syncing_ = false;

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
      commit_seconds_.Observe(
          std::chrono::duration<double>(Clock::now() - in_flight_.front()->paused_at).count());
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

absl::Status EpochEngine::ResumeVm() {
  return suspended_ || held_paused_ ? absl::OkStatus() : vm_.Resume();
}

absl::Status EpochEngine::HoldPaused(bool hold) {
  std::lock_guard<std::mutex> take(take_mu_);
  if (hold == held_paused_) return absl::OkStatus();
  held_paused_ = hold;
  if (hold) return vm_.Pause();
  return suspended_ ? absl::OkStatus() : vm_.Resume();
}

absl::Status EpochEngine::Suspend(bool suspend) {
  std::lock_guard<std::mutex> take(take_mu_);
  if (suspend == suspended_) return absl::OkStatus();
  if (suspend) {
    gate_.SetFenced(true);  // first: not one more output leaves
    suspended_ = true;
    return vm_.Pause();
  }
  suspended_ = false;
  absl::Status s = held_paused_ ? absl::OkStatus() : vm_.Resume();
  gate_.SetFenced(false);
  return s;
}

EpochEngine::Stats EpochEngine::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

absl::Status EpochEngine::BeginSync() {
  std::lock_guard<std::mutex> take(take_mu_);
  if (auto s = vm_.Pause(); !s.ok()) return s;
  auto dirty = vm_.HarvestDirty();  // from here on the dirty log tracks what pre-copy must resend
  if (dirty.ok()) {
    std::lock_guard<std::mutex> lock(disk_mu_);
    disk_writes_.clear();  // the disk is read after this point, so it holds these writes
  }
  if (auto s = ResumeVm(); !s.ok()) return s;
  if (!dirty.ok()) return dirty.status();
  StartSyncState();
  syncing_ = true;
  return absl::OkStatus();
}

void EpochEngine::StartSyncState() {
  sync_pending_ = vmm::DirtyBitmap(vm_.memory().pages());
  for (uint64_t& w : sync_pending_.words()) w = ~0ull;
  sync_disk_offset_ = 0;
  sync_digest_ = SyncDigest();
}

PageRun EpochEngine::NextSyncPages(size_t max_pages) {
  std::lock_guard<std::mutex> take(take_mu_);
  PageRun run;
  std::vector<uint64_t>& words = sync_pending_.words();
  for (uint64_t w = 0; w < words.size() && run.gfns.size() < max_pages; w++) {
    while (words[w] && run.gfns.size() < max_pages) {
      uint64_t gfn = w * 64 + static_cast<uint64_t>(__builtin_ctzll(words[w]));
      words[w] &= words[w] - 1;
      if (gfn < vm_.memory().pages()) run.gfns.push_back(gfn);
    }
  }
  CopyPages(vm_.memory().data(), run);
  HashPages(run);
  for (size_t i = 0; i < run.gfns.size(); i++) sync_digest_.AddPage(run.gfns[i], run.hashes[i]);
  return run;
}

absl::StatusOr<std::optional<SyncChunk>> EpochEngine::NextSyncDisk() {
  std::lock_guard<std::mutex> take(take_mu_);
  auto w = ReadDiskChunk();
  if (!w.ok()) return w.status();
  if (!w->has_value()) return std::nullopt;
  SyncChunk c{(*w)->sector * RML_SECTOR_SIZE, std::move((*w)->data), 0};
  c.hash = XXH3_64bits(c.data.data(), c.data.size());
  sync_digest_.AddDisk(c.offset, c.data.size(), c.hash);
  return c;
}

absl::StatusOr<std::optional<DiskWrite>> EpochEngine::ReadDiskChunk() {
  uint64_t disk_bytes = vm_.disk().sectors() * RML_SECTOR_SIZE;
  if (sync_disk_offset_ >= disk_bytes) return std::nullopt;
  uint64_t off = sync_disk_offset_;
  DiskWrite w{off / RML_SECTOR_SIZE, std::string(std::min(kDiskChunk, disk_bytes - off), '\0')};
  if (::pread(vm_.disk().fd(), w.data.data(), w.data.size(), static_cast<off_t>(off)) !=
      static_cast<ssize_t>(w.data.size())) {
    return vmm::ErrnoStatus("read disk for synchronisation");
  }
  sync_disk_offset_ += w.data.size();
  return w;
}

absl::StatusOr<ReplicaTrees> EpochEngine::SyncTrees() {
  std::lock_guard<std::mutex> take(take_mu_);
  if (!syncing_) return absl::FailedPreconditionError("no synchronisation begun");
  auto chunks = HashTree::OverDisk(vm_.disk().fd(), vm_.disk().sectors() * RML_SECTOR_SIZE);
  if (!chunks.ok()) return chunks.status();
  return ReplicaTrees{HashTree::OverPages(vm_.memory()), std::move(*chunks)};
}

void EpochEngine::SkipSyncPages(const HashTree& pages, size_t level, uint64_t node) {
  std::lock_guard<std::mutex> take(take_mu_);
  auto [first, end] = pages.Leaves(level, node);
  for (uint64_t gfn = first; gfn < end; gfn++) sync_pending_.Clear(gfn);
  sync_digest_.AddSamePages(level, node, pages.node(level, node));
}

absl::StatusOr<uint64_t> EpochEngine::RefreshSync() {
  std::lock_guard<std::mutex> take(take_mu_);
  if (auto s = vm_.Pause(); !s.ok()) return s;
  auto dirty = vm_.HarvestDirty();
  if (auto s = ResumeVm(); !s.ok()) return s;
  if (!dirty.ok()) return dirty.status();
  sync_pending_.Merge(*dirty);
  return sync_pending_.Count();
}

}  // namespace romulus::checkpoint
