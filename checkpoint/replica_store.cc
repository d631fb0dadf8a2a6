// The mirror's end of the epoch pipeline: a checkpoint is verified whole before it touches the
// replica; a synchronisation builds a staging copy that its full checkpoint commits.
#include <fcntl.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "checkpoint/checkpoint.h"
#include "vmm/xxhash_dispatch.h"

namespace romulus::checkpoint {
namespace {

// Writes a checkpoint's disk writes, already checked against the disk's size, to the image `fd`,
// all or nothing: what they overwrite is read first, and when a write fails (a full disk, an I/O
// error, a short write) the bytes that did reach the file are put back. There is no fsync: the
// replica's memory lives in this process, so a replica outlives the process only through
// SaveSnapshot, which syncs. A failure that could not be taken back sets `*torn`: the image then
// holds neither checkpoint.
absl::Status WriteDiskWrites(int fd, const std::vector<DiskWrite>& writes, const char* what,
                             bool* torn) {
  *torn = false;
  std::vector<std::string> old(writes.size());
  for (size_t i = 0; i < writes.size(); i++) {
    old[i].resize(writes[i].data.size());
    uint64_t off = writes[i].sector * RML_SECTOR_SIZE;
    if (::pread(fd, old[i].data(), old[i].size(), static_cast<off_t>(off)) !=
        static_cast<ssize_t>(old[i].size())) {
      return vmm::ErrnoStatus(absl::StrCat(what, ": reading what it overwrites"));
    }
  }
  std::vector<size_t> written(writes.size(), 0);
  absl::Status failed;
  for (size_t i = 0; i < writes.size() && failed.ok(); i++) {
    const std::string& data = writes[i].data;
    uint64_t off = writes[i].sector * RML_SECTOR_SIZE;
    while (written[i] < data.size()) {
      ssize_t n = ::pwrite(fd, data.data() + written[i], data.size() - written[i],
                           static_cast<off_t>(off + written[i]));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        failed = vmm::ErrnoStatus(what, n == 0 ? EIO : errno);
        break;
      }
      written[i] += static_cast<size_t>(n);
    }
  }
  if (failed.ok()) return failed;
  // Only the bytes that were written go back: their blocks are allocated, so on a full disk
  // writing over them needs no more space.
  for (size_t i = 0; i < writes.size(); i++) {
    uint64_t off = writes[i].sector * RML_SECTOR_SIZE;
    for (size_t done = 0; done < written[i];) {
      ssize_t n =
          ::pwrite(fd, old[i].data() + done, written[i] - done, static_cast<off_t>(off + done));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        *torn = true;
        return absl::Status(failed.code(),
                            absl::StrCat(failed.message(), "; putting back what it overwrote ",
                                         "failed too: ", std::strerror(n == 0 ? EIO : errno)));
      }
      done += static_cast<size_t>(n);
    }
  }
  return failed;
}

// Writes all of `n` bytes at `off`, a short write continued.
absl::Status PwriteAll(int fd, const char* p, size_t n, uint64_t off, const char* what) {
  for (size_t done = 0; done < n;) {
    ssize_t k = ::pwrite(fd, p + done, n - done, static_cast<off_t>(off + done));
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) return vmm::ErrnoStatus(what, k == 0 ? EIO : errno);
    done += static_cast<size_t>(k);
  }
  return absl::OkStatus();
}

// What the mirror's peer and operator read of a disk failure.
std::string DiskFailure(const absl::Status& s) {
  return s.code() == absl::StatusCode::kResourceExhausted
             ? absl::StrCat("the replica disk is full (", s.message(), ")")
             : absl::StrCat("the replica disk failed (", s.message(), ")");
}

}  // namespace

absl::StatusOr<std::unique_ptr<ReplicaStore>> ReplicaStore::Create(uint64_t memory_bytes,
                                                                   const std::string& disk_path,
                                                                   uint64_t disk_bytes) {
  auto mem = vmm::GuestMemory::CreateMemfd(memory_bytes);
  if (!mem.ok()) return mem.status();
  if (auto s = vmm::BlockDevice::CreateImage(disk_path, disk_bytes); !s.ok()) return s;
  vmm::Fd fd(::open(disk_path.c_str(), O_RDWR | O_CLOEXEC));
  if (!fd.valid()) return vmm::ErrnoStatus(absl::StrCat("open replica disk ", disk_path));
  return std::unique_ptr<ReplicaStore>(
      new ReplicaStore(std::move(*mem), std::move(fd), disk_path, disk_bytes));
}

absl::StatusOr<std::unique_ptr<ReplicaStore>> ReplicaStore::Adopt(
    std::unique_ptr<vmm::GuestMemory> memory, const std::string& disk_path) {
  vmm::Fd fd(::open(disk_path.c_str(), O_RDWR | O_CLOEXEC));
  if (!fd.valid()) return vmm::ErrnoStatus(absl::StrCat("open disk image ", disk_path));
  struct stat st;
  if (::fstat(fd.get(), &st) != 0) return vmm::ErrnoStatus(absl::StrCat("stat ", disk_path));
  auto store = std::unique_ptr<ReplicaStore>(new ReplicaStore(
      std::move(memory), std::move(fd), disk_path, static_cast<uint64_t>(st.st_size)));
  store->seeded_ = true;
  return store;
}

absl::StatusOr<std::unique_ptr<ReplicaStore>> ReplicaStore::Adopt(
    std::unique_ptr<vmm::GuestMemory> memory, const std::string& disk_path,
    const pb::VmSnapshot& state, uint64_t epoch) {
  auto store = Adopt(std::move(memory), disk_path);
  if (!store.ok()) return store;
  (*store)->seeded_ = false;
  (*store)->state_ = state;
  (*store)->committed_epoch_ = static_cast<int64_t>(epoch);
  return store;
}

absl::StatusOr<ReplicaStore::ResolvedRun> ReplicaStore::Resolve(const PageRun& run,
                                                                const std::string& what) const {
  size_t n = run.gfns.size();
  if (run.hashes.size() != n || run.pages.size() != n * vmm::kPageSize) {
    return absl::DataLossError(
        absl::StrCat(what, " rejected: page count, hash count and page bytes disagree"));
  }
  ResolvedRun r;
  r.ref_pages.resize(run.refs.size() * vmm::kPageSize);
  r.page.resize(n);
  r.content.resize(n);
  // A reference may name a page earlier in the same run, which is not applied yet.
  absl::flat_hash_map<ContentHash, size_t> earlier;
  const uint8_t* held = staging_ ? staging_->memory->data() : memory_->data();
  size_t k = 0;
  for (size_t i = 0; i < n; i++) {
    if (k < run.refs.size() && run.refs[k].index == i) {
      const ContentHash& h = run.refs[k].hash;
      uint8_t* out = r.ref_pages.data() + k * vmm::kPageSize;
      std::optional<uint64_t> base_page;
      if (auto e = earlier.find(h); e != earlier.end()) {
        std::memcpy(out, r.page[e->second], vmm::kPageSize);
      } else if (auto gfn = index_.Find(h)) {
        std::memcpy(out, held + *gfn * vmm::kPageSize, vmm::kPageSize);
      } else if (base_ && (base_page = base_->Find(h))) {
        // The file is shared: what it holds now must still be what was indexed.
        if (auto s = base_->Read(*base_page, out); !s.ok() || HashPage(out) != h) {
          return absl::DataLossError(absl::StrCat(what, " rejected: page ", run.gfns[i],
                                                  " refers to base image page ", *base_page,
                                                  ", which changed since it was indexed"));
        }
      } else {
        return absl::DataLossError(absl::StrFormat(
            "%s rejected: page %u refers to content this replica does not hold (xxh3-128 "
            "%016x%016x)",
            what, run.gfns[i], h.hi, h.lo));
      }
      r.page[i] = out;
      r.content[i] = h;
      k++;
    } else {
      r.page[i] = run.pages.data() + i * vmm::kPageSize;
      r.content[i] = HashPage(r.page[i]);
    }
    if (!run.refs.empty()) earlier.try_emplace(r.content[i], i);
  }
  if (k != run.refs.size()) {
    return absl::DataLossError(absl::StrCat(what, " rejected: references out of order"));
  }
  return r;
}

void ReplicaStore::Record(const PageRun& run, const ResolvedRun& r) {
  for (size_t i = 0; i < run.gfns.size(); i++) index_.Record(run.gfns[i], r.content[i]);
}

absl::Status ReplicaStore::Verify(const Checkpoint& c, const ResolvedRun& r) const {
  auto bad = [&](const std::string& why) {
    return absl::DataLossError(absl::StrCat("checkpoint ", c.epoch, " rejected: ", why));
  };
  uint64_t pages = memory_->pages();
  if (c.epoch > kMaxEpoch) return bad(absl::StrCat("epoch beyond ", kMaxEpoch));
  if (sequence_reset_ || committed_epoch_ < 0) {
    if (!c.full) return bad("a full checkpoint is needed first");
  } else if (c.full ? static_cast<int64_t>(c.epoch) <= committed_epoch_
                    : static_cast<int64_t>(c.epoch) != committed_epoch_ + 1) {
    return absl::FailedPreconditionError(
        absl::StrCat("checkpoint ", c.epoch, " rejected: expected epoch ", committed_epoch_ + 1,
                     " (replayed or out of order)"));
  }
  if (c.hashes.size() != c.gfns.size() || c.pages.size() != c.gfns.size() * vmm::kPageSize) {
    return bad("page count, hash count and page bytes disagree");
  }
  for (size_t i = 0; i < c.gfns.size(); i++) {
    if (c.gfns[i] >= pages || (i > 0 && c.gfns[i] <= c.gfns[i - 1])) {
      return bad(absl::StrCat("page number ", c.gfns[i], " out of range or out of order"));
    }
    if (XXH3_64bits(r.page[i], vmm::kPageSize) != c.hashes[i]) {
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
  uint64_t sync = c.full && staging_ ? staging_->digest.value() : 0;
  if (CheckpointDigest(c, sync) != c.digest) {
    return bad(c.full ? "checkpoint digest mismatch (over the pre-copy stream and the checkpoint)"
                      : "checkpoint digest mismatch");
  }
  return absl::OkStatus();
}

absl::Status ReplicaStore::Apply(const Checkpoint& c) {
  if (!unusable_.empty()) {
    return absl::FailedPreconditionError(
        absl::StrCat("checkpoint ", c.epoch, " refused: the replica is unusable: ", unusable_));
  }
  trees_.reset();
  if (staging_) staging_->holdings.reset();
  auto r = Resolve(c, absl::StrCat("checkpoint ", c.epoch));
  absl::Status s = r.ok() ? Verify(c, *r) : r.status();
  if (c.full) {
    if (s.ok()) s = CommitStaging(c, *r);
    staging_.reset();  // a synchronisation ends with its full checkpoint, good or bad
    if (s.ok()) {
      Record(c, *r);
    } else {
      index_.Clear();  // it indexed the staging copy, which is gone
    }
    return s;
  }
  if (!s.ok()) return s;
  // The disk first, all or nothing, as it can fail; then memory and state, which cannot.
  bool torn = false;
  if (auto w = WriteDiskWrites(disk_.get(), c.disk_writes, "write replica disk", &torn); !w.ok()) {
    return DiskFailed(c.epoch, w, torn);
  }
  for (size_t i = 0; i < c.gfns.size(); i++) {
    std::memcpy(memory_->data() + c.gfns[i] * vmm::kPageSize, r->page[i], vmm::kPageSize);
  }
  Record(c, *r);
  state_ = c.state;
  committed_epoch_ = static_cast<int64_t>(c.epoch);
  sequence_reset_ = false;
  return absl::OkStatus();
}

absl::Status ReplicaStore::DiskFailed(uint64_t epoch, const absl::Status& why, bool torn) {
  std::string line = absl::StrCat("checkpoint ", epoch, " not committed: ", DiskFailure(why));
  if (torn) {
    // Neither checkpoint is on the disk now: nothing here may be resumed, or acknowledged on.
    unusable_ = line;
    committed_epoch_ = -1;
    seeded_ = false;
    staging_.reset();
    index_.Clear();
    return absl::Status(why.code(),
                        absl::StrCat(line,
                                     "; the replica is UNUSABLE (never promotable; restart "
                                     "this mirror to take a new one)"));
  }
  return absl::Status(why.code(),
                      committed_epoch_ >= 0
                          ? absl::StrCat(line, "; the replica stays at epoch ", committed_epoch_)
                          : line);
}

absl::Status ReplicaStore::StartStaging() {
  if (!unusable_.empty()) {
    return absl::FailedPreconditionError(absl::StrCat("the replica is unusable: ", unusable_));
  }
  if (staging_) return absl::OkStatus();
  auto st = std::make_unique<Staging>();
  auto mem = vmm::GuestMemory::CreateMemfd(memory_->size());
  if (!mem.ok()) return mem.status();
  st->memory = std::move(*mem);
  std::string path = disk_path_ + ".sync";
  if (auto s = vmm::BlockDevice::CreateImage(path, disk_bytes_); !s.ok()) return s;
  st->disk = vmm::Fd(::open(path.c_str(), O_RDWR | O_CLOEXEC));
  if (!st->disk.valid()) return vmm::ErrnoStatus(absl::StrCat("open staging disk ", path));
  st->pages = st->same_pages = st->kept_pages = vmm::DirtyBitmap(memory_->pages());
  st->chunks = st->same_chunks = st->kept_chunks =
      vmm::DirtyBitmap((disk_bytes_ + kDiskChunk - 1) / kDiskChunk);
  st->page_hashes.assign(memory_->pages(), 0);
  st->chunk_hashes.assign(st->chunks.pages(), 0);
  staging_ = std::move(st);
  index_.Clear();  // a synchronisation begins: what it indexes lies in the staging copy
  return absl::OkStatus();
}

absl::Status ReplicaStore::StageSyncPages(const PageRun& run) {
  if (auto s = StartStaging(); !s.ok()) return s;
  auto bad = [](const std::string& why) {
    return absl::DataLossError(absl::StrCat("pre-copy rejected: ", why));
  };
  // Check the whole run before writing any of it.
  for (size_t i = 0; i < run.gfns.size(); i++) {
    if (run.gfns[i] >= memory_->pages()) {
      return bad(absl::StrCat("page number ", run.gfns[i], " out of range"));
    }
  }
  auto r = Resolve(run, "pre-copy");
  if (!r.ok()) return r.status();
  for (size_t i = 0; i < run.gfns.size(); i++) {
    if (XXH3_64bits(r->page[i], vmm::kPageSize) != run.hashes[i]) {
      return bad(absl::StrCat("page ", run.gfns[i], " does not match its hash"));
    }
  }
  Record(run, *r);
  for (size_t i = 0; i < run.gfns.size(); i++) {
    std::memcpy(staging_->memory->data() + run.gfns[i] * vmm::kPageSize, r->page[i],
                vmm::kPageSize);
    staging_->pages.Set(run.gfns[i]);
    staging_->page_hashes[run.gfns[i]] = run.hashes[i];
    staging_->digest.AddPage(run.gfns[i], run.hashes[i]);
  }
  return absl::OkStatus();
}

absl::Status ReplicaStore::StageSyncDisk(uint64_t offset, uint64_t length, const std::string* data,
                                         uint64_t hash) {
  if (auto s = StartStaging(); !s.ok()) return s;
  if (offset % kDiskChunk || offset >= disk_bytes_ ||
      length != std::min(kDiskChunk, disk_bytes_ - offset) || (data && data->size() != length)) {
    return absl::DataLossError(absl::StrCat("pre-copy rejected: disk chunk at ", offset, " of ",
                                            length, " bytes does not fit the disk"));
  }
  // A zero chunk needs no write: the staging disk starts out zero.
  static const std::string kZeroChunk(kDiskChunk, '\0');
  uint64_t actual = XXH3_64bits(data ? data->data() : kZeroChunk.data(), length);
  if (actual != hash) {
    return absl::DataLossError(
        absl::StrCat("pre-copy rejected: disk chunk at ", offset, " does not match its hash"));
  }
  if (data) {
    if (auto s =
            PwriteAll(staging_->disk.get(), data->data(), length, offset, "write staging disk");
        !s.ok()) {
      return absl::Status(s.code(), absl::StrCat("pre-copy not staged: ", DiskFailure(s)));
    }
  }
  staging_->chunks.Set(offset / kDiskChunk);
  staging_->chunk_hashes[offset / kDiskChunk] = hash;
  staging_->digest.AddDisk(offset, length, hash);
  return absl::OkStatus();
}

void ReplicaStore::SuspendSync() {
  index_.Clear();
  if (!staging_) return;
  Staging& st = *staging_;
  st.kept_pages.Merge(st.pages);
  st.kept_chunks.Merge(st.chunks);
  st.pages = st.same_pages = vmm::DirtyBitmap(st.pages.pages());
  st.chunks = st.same_chunks = vmm::DirtyBitmap(st.chunks.pages());
  st.digest = SyncDigest();
  st.holdings.reset();
}

absl::Status ReplicaStore::CommitStaging(const Checkpoint& c, const ResolvedRun& r) {
  if (auto s = StartStaging(); !s.ok()) return s;
  Staging& st = *staging_;
  for (size_t i = 0; i < c.gfns.size(); i++) {
    std::memcpy(st.memory->data() + c.gfns[i] * vmm::kPageSize, r.page[i], vmm::kPageSize);
    st.pages.Set(c.gfns[i]);
  }
  bool torn = false;  // the staging copy goes whatever happens to it
  if (auto s = WriteDiskWrites(st.disk.get(), c.disk_writes, "write staging disk", &torn);
      !s.ok()) {
    return absl::Status(s.code(),
                        absl::StrCat("checkpoint ", c.epoch, " not committed: ", DiskFailure(s)));
  }
  for (const DiskWrite& w : c.disk_writes) {
    uint64_t off = w.sector * RML_SECTOR_SIZE;
    if (off % kDiskChunk == 0 && w.data.size() == std::min(kDiskChunk, disk_bytes_ - off)) {
      st.chunks.Set(off / kDiskChunk);
    }
  }
  vmm::DirtyBitmap pages = st.pages, chunks = st.chunks;
  pages.Merge(st.same_pages);
  chunks.Merge(st.same_chunks);
  if (pages.Count() != memory_->pages() || chunks.Count() != chunks.pages()) {
    return absl::DataLossError(absl::StrCat(
        "checkpoint ", c.epoch, " rejected: the synchronisation covered ", pages.Count(), " of ",
        memory_->pages(), " pages and ", chunks.Count(), " of ", chunks.pages(), " disk chunks"));
  }
  // Everything verified: the staging copy becomes the replica, or when the replica held some of
  // it already, what was received is written over it (which costs what differed, not the size).
  if (st.same_pages.Count() + st.same_chunks.Count() == 0) {
    if (::rename((disk_path_ + ".sync").c_str(), disk_path_.c_str()) != 0) {
      auto why = vmm::ErrnoStatus(absl::StrCat("replace replica disk ", disk_path_));
      return absl::Status(
          why.code(), absl::StrCat("checkpoint ", c.epoch, " not committed: ", DiskFailure(why)));
    }
    memory_ = std::move(st.memory);
    disk_ = std::move(st.disk);
  } else if (auto s = CopyReceivedIntoReplica(st, c); !s.ok()) {
    return s;
  }
  seeded_ = false;
  state_ = c.state;
  committed_epoch_ = static_cast<int64_t>(c.epoch);
  sequence_reset_ = false;
  return absl::OkStatus();
}

absl::Status ReplicaStore::CopyReceivedIntoReplica(const Staging& st, const Checkpoint& c) {
  // The disk first, as it can fail; memory last, which cannot. Chunks written over in place are
  // not kept (they may be most of the disk): a failure part-way leaves a disk that is neither
  // the old checkpoint nor the new one, so the replica gives up its commit and keeps its
  // contents only to be compared by the next synchronisation, like a seeded one.
  bool wrote = false;
  auto failed = [&](const absl::Status& why) {
    std::string line = absl::StrCat("checkpoint ", c.epoch, " not committed: ", DiskFailure(why));
    if (!wrote) return absl::Status(why.code(), line);  // the replica is as it was
    if (committed_epoch_ >= 0) {
      absl::StrAppend(&line, "; the replica no longer holds epoch ", committed_epoch_,
                      " and is not promotable until a synchronisation completes");
    }
    committed_epoch_ = -1;
    seeded_ = true;
    return absl::Status(why.code(), line);
  };
  std::string chunk(kDiskChunk, '\0');
  for (uint64_t i = 0; i < st.chunks.pages(); i++) {
    if (!st.chunks.Test(i)) continue;
    uint64_t off = i * kDiskChunk, n = std::min(kDiskChunk, disk_bytes_ - off);
    if (::pread(st.disk.get(), chunk.data(), n, static_cast<off_t>(off)) !=
        static_cast<ssize_t>(n)) {
      return failed(vmm::ErrnoStatus("read staging disk"));
    }
    wrote = true;  // perhaps partly, when it fails
    if (auto s = PwriteAll(disk_.get(), chunk.data(), n, off, "write replica disk"); !s.ok()) {
      return failed(s);
    }
  }
  // The full checkpoint's writes may fall in chunks that were the same: they go over those too.
  bool torn = false;
  if (auto s = WriteDiskWrites(disk_.get(), c.disk_writes, "write replica disk", &torn); !s.ok()) {
    wrote = wrote || torn;
    return failed(s);
  }
  for (uint64_t gfn = 0; gfn < memory_->pages(); gfn++) {
    if (st.pages.Test(gfn)) {
      std::memcpy(memory_->data() + gfn * vmm::kPageSize, st.memory->data() + gfn * vmm::kPageSize,
                  vmm::kPageSize);
    }
  }
  ::unlink((disk_path_ + ".sync").c_str());
  return absl::OkStatus();
}

absl::StatusOr<uint64_t> ReplicaStore::DiskDigest() const {
  return vmm::FileDigest(disk_.get(), disk_bytes_);
}

absl::StatusOr<vmm::SnapshotInfo> ReplicaStore::SaveSnapshot(const std::string& dir) const {
  if (!unusable_.empty()) {
    return absl::FailedPreconditionError(absl::StrCat("the replica is unusable: ", unusable_));
  }
  if (committed_epoch_ < 0) return absl::FailedPreconditionError("no checkpoint committed yet");
  vmm::SnapshotInfo info;
  std::memcpy(&info.guest, memory_->data() + RML_BOOT_GPA + offsetof(rml_boot, status),
              sizeof(info.guest));
  if (auto s = vmm::WriteSnapshot(dir, state_, *memory_, disk_.get(), &info); !s.ok()) return s;
  return info;
}

absl::Status ReplicaStore::Seed(const std::string& dir) {
  trees_.reset();
  staging_.reset();  // what it kept was kept over other contents
  index_.Clear();
  if (auto s = vmm::LoadSnapshotContents(dir, *memory_, disk_bytes_, disk_path_); !s.ok()) {
    return s;
  }
  vmm::Fd disk(::open(disk_path_.c_str(), O_RDWR | O_CLOEXEC));
  if (!disk.valid()) return vmm::ErrnoStatus(absl::StrCat("open replica disk ", disk_path_));
  disk_ = std::move(disk);
  seeded_ = true;
  return absl::OkStatus();
}

absl::StatusOr<const ReplicaTrees*> ReplicaStore::CommittedTrees() {
  if (!has_contents()) return absl::FailedPreconditionError("the replica holds nothing yet");
  return ContentTrees();
}

absl::StatusOr<const ReplicaTrees*> ReplicaStore::HoldingsTrees() {
  bool kept = staging_ && (staging_->kept_pages.Count() + staging_->kept_chunks.Count() > 0);
  if (!kept) return CommittedTrees();
  if (staging_->holdings) return staging_->holdings.get();
  // The replica's own contents count where nothing was kept over them, committed or not: the
  // primary's claims are checked against these hashes, so they are true of what lies here.
  auto trees = ContentTrees();
  if (!trees.ok()) return trees.status();
  std::vector<uint64_t> pages = (*trees)->pages.leaves(), chunks = (*trees)->chunks.leaves();
  staging_->kept_pages.ForEach([&](uint64_t gfn) { pages[gfn] = staging_->page_hashes[gfn]; });
  staging_->kept_chunks.ForEach([&](uint64_t i) { chunks[i] = staging_->chunk_hashes[i]; });
  staging_->holdings = std::make_unique<ReplicaTrees>(
      ReplicaTrees{HashTree(std::move(pages)), HashTree(std::move(chunks))});
  return staging_->holdings.get();
}

absl::StatusOr<const ReplicaTrees*> ReplicaStore::ContentTrees() {
  if (!trees_) {
    auto chunks = HashTree::OverDisk(disk_.get(), disk_bytes_);
    if (!chunks.ok()) return chunks.status();
    trees_ = std::make_unique<ReplicaTrees>(
        ReplicaTrees{HashTree::OverPages(*memory_), std::move(*chunks)});
  }
  return trees_.get();
}

absl::Status ReplicaStore::StageSamePages(size_t level, uint64_t node, uint64_t hash) {
  auto trees = HoldingsTrees();
  if (!trees.ok()) return absl::DataLossError("pre-copy refers to pages this replica lacks");
  const HashTree& t = (*trees)->pages;
  if (level > t.top() || node >= t.width(level) || t.node(level, node) != hash) {
    return absl::DataLossError(absl::StrCat("pre-copy rejected: pages under node ", node,
                                            " of level ", level, " differ from this replica's"));
  }
  if (auto s = StartStaging(); !s.ok()) return s;
  auto [first, end] = t.Leaves(level, node);
  for (uint64_t gfn = first; gfn < end; gfn++) {
    (staging_->kept_pages.Test(gfn) ? staging_->pages : staging_->same_pages).Set(gfn);
  }
  staging_->digest.AddSamePages(level, node, hash);
  return absl::OkStatus();
}

absl::Status ReplicaStore::StageSameDisk(uint64_t offset, uint64_t length, uint64_t hash) {
  auto trees = HoldingsTrees();
  if (!trees.ok()) return absl::DataLossError("pre-copy refers to a disk chunk this replica lacks");
  const std::vector<uint64_t>& chunks = (*trees)->chunks.leaves();
  if (offset % kDiskChunk || offset >= disk_bytes_ ||
      length != std::min(kDiskChunk, disk_bytes_ - offset) || chunks[offset / kDiskChunk] != hash) {
    return absl::DataLossError(absl::StrCat("pre-copy rejected: disk chunk at ", offset, " of ",
                                            length, " bytes is not this replica's"));
  }
  if (auto s = StartStaging(); !s.ok()) return s;
  uint64_t i = offset / kDiskChunk;
  (staging_->kept_chunks.Test(i) ? staging_->chunks : staging_->same_chunks).Set(i);
  staging_->digest.AddDisk(offset, length, hash);
  return absl::OkStatus();
}

absl::StatusOr<ReplicaStore::Committed> ReplicaStore::TakeCommitted() {
  if (!unusable_.empty()) {
    return absl::FailedPreconditionError(absl::StrCat("the replica is unusable: ", unusable_));
  }
  if (committed_epoch_ < 0 || memory_ == nullptr) {
    return absl::FailedPreconditionError("no checkpoint committed yet: nothing to resume");
  }
  staging_.reset();
  trees_.reset();
  index_.Clear();
  disk_ = vmm::Fd();  // the VM opens the image itself
  return Committed{std::move(memory_), state_, committed_epoch_, disk_path_};
}

}  // namespace romulus::checkpoint
