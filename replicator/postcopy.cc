#include "replicator/postcopy.h"

#include <fcntl.h>
#include <linux/magic.h>
#include <sys/random.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "guest/abi.h"
#include "replicator/mirror_session.h"  // Log, PeerText
#include "vmm/xxhash_dispatch.h"

namespace romulus::replicator {
namespace {

using vmm::DirtyBitmap;
using vmm::kDiskChunkBytes;
using vmm::kPageSize;

constexpr uint64_t kLowPages = RML_IMAGE_GPA / kPageSize;  // travel with the state
constexpr size_t kChunksPerRequest = 16;
using Clock = std::chrono::steady_clock;

double MsSince(Clock::time_point t) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t).count();
}

std::string BitmapBytes(const DirtyBitmap& b) {
  std::string out((b.pages() + 7) / 8, '\0');
  std::memcpy(out.data(), b.words().data(), out.size());
  return out;
}

// A bitmap of `bits` from an untrusted peer: exactly its size, nothing set past the end.
absl::StatusOr<DirtyBitmap> ParseBitmap(const std::string& bytes, uint64_t bits,
                                        absl::string_view what) {
  if (bytes.size() != (bits + 7) / 8) {
    return absl::DataLossError(
        absl::StrCat(what, ": ", bytes.size(), " bytes for ", bits, " bits"));
  }
  DirtyBitmap b(bits);
  std::memcpy(b.words().data(), bytes.data(), bytes.size());
  if (bits % 64 && !b.words().empty() && (b.words().back() >> (bits % 64)) != 0) {
    return absl::DataLossError(absl::StrCat(what, ": bits set past the end"));
  }
  return b;
}

uint64_t ChunkCount(uint64_t disk_bytes) {
  return (disk_bytes + kDiskChunkBytes - 1) / kDiskChunkBytes;
}

// Calls `fn(offset, length)` for each region of `fd`'s first `bytes` that may hold data: holes
// (never written) read as zeros and are skipped without being read.
template <typename Fn>
void ForEachDataRegion(int fd, uint64_t bytes, Fn&& fn) {
  off_t at = 0;
  while (static_cast<uint64_t>(at) < bytes) {
    off_t data = ::lseek(fd, at, SEEK_DATA);
    if (data < 0) {
      if (errno == ENXIO) return;                                        // only a hole is left
      fn(static_cast<uint64_t>(at), bytes - static_cast<uint64_t>(at));  // cannot tell: all
      return;
    }
    if (static_cast<uint64_t>(data) >= bytes) return;
    off_t hole = ::lseek(fd, data, SEEK_HOLE);
    uint64_t end = hole < 0 ? bytes : std::min<uint64_t>(static_cast<uint64_t>(hole), bytes);
    fn(static_cast<uint64_t>(data), end - static_cast<uint64_t>(data));
    at = static_cast<off_t>(end);
  }
}

// Pages of guest RAM (at or above kLowPages) that may hold data. Found without reading them: the
// scan is part of the downtime (a first word of each page read costs 30 ms a GiB here). Where
// guest RAM is a shared tmpfs file (a memfd) its holes are zeros; elsewhere every page may hold
// data. A page of zeros in a data region travels as a zero flag.
DirtyBitmap PagesToCome(const vmm::GuestMemory& memory) {
  DirtyBitmap to_come(memory.pages());
  auto mark = [&](uint64_t offset, uint64_t length) {
    uint64_t end = std::min((offset + length + kPageSize - 1) / kPageSize, memory.pages());
    for (uint64_t gfn = std::max(offset / kPageSize, kLowPages); gfn < end; gfn++) to_come.Set(gfn);
  };
  struct statfs fs;
  int access = ::fcntl(memory.fd(), F_GETFL);
  if (::fstatfs(memory.fd(), &fs) == 0 && fs.f_type == TMPFS_MAGIC && access >= 0 &&
      (access & O_ACCMODE) == O_RDWR) {
    ForEachDataRegion(memory.fd(), memory.size(), mark);
  } else {
    mark(0, memory.size());
  }
  return to_come;
}

// Disk chunks that may hold data (the image's holes are zeros).
DirtyBitmap ChunksToCome(int fd, uint64_t disk_bytes) {
  DirtyBitmap to_come(ChunkCount(disk_bytes));
  ForEachDataRegion(fd, disk_bytes, [&](uint64_t offset, uint64_t length) {
    for (uint64_t c = offset / kDiskChunkBytes; c <= (offset + length - 1) / kDiskChunkBytes; c++) {
      to_come.Set(c);
    }
  });
  return to_come;
}

absl::Status SourceGone(const absl::Status& receiving) {
  return absl::UnavailableError(absl::StrCat("the source is gone (", receiving.message(), ")"));
}

// The destination's last frame on the main connection when it ends the post-copy (it stopped the
// guest, or did not take the VM): why, so that the source can say so.
void TellTheSource(Channel& main, absl::string_view why) {
  pb::Frame f;
  f.mutable_refusal()->set_reason(std::string(why.substr(0, kMaxPeerText)));
  (void)main.Send(f);  // the source may be gone: then there is nobody to tell
}

absl::Status DestinationSaid(const pb::Refusal& refusal) {
  return absl::AbortedError(absl::StrCat("the destination said: ", PeerText(refusal.reason())));
}

// How the main connection ended, in the destination's words when it said why (TellTheSource)
// rather than as `seen`: a source writing on after the destination ended sees only "Broken pipe"
// or a reset, and would count a failure it did not understand. Shuts `main` down first, so that
// reading stops at what has arrived (the connection is over either way, and a destination that
// is alive and said nothing must not hold this side): what the destination sent before it ended
// is still read, a reset notwithstanding.
absl::Status InTheDestinationsWords(Channel& main, const absl::Status& seen) {
  main.Shutdown();
  while (true) {
    auto f = main.Receive();
    if (!f.ok()) return seen;
    if (f->has_refusal()) return DestinationSaid(f->refusal());
  }
}

pb::Frame ChunkFrame(uint64_t chunk, std::string data) {
  pb::Frame f;
  pb::PostcopyChunk* c = f.mutable_postcopy_chunk();
  c->set_chunk(chunk);
  c->set_hash(XXH3_64bits(data.data(), data.size()));
  c->set_data(std::move(data));
  return f;
}

}  // namespace

// ---- The source ----

PostcopyProgress PostcopySource::progress() const {
  std::lock_guard<std::mutex> lock(mu_);
  PostcopyProgress p = progress_;
  if (destination_runs_) p.seconds = MsSince(resumed_at_) / 1000;
  return p;
}

bool PostcopySource::destination_runs() const {
  std::lock_guard<std::mutex> lock(mu_);
  return destination_runs_;
}

absl::Status PostcopySource::SendPages(vmm::GuestMemory& memory, Channel& channel,
                                       std::vector<uint64_t> gfns, bool demand) {
  checkpoint::PageRun run;
  run.gfns = std::move(gfns);
  run.pages.resize(run.gfns.size() * kPageSize);
  for (size_t i = 0; i < run.gfns.size(); i++) {
    const uint8_t* page = memory.data() + run.gfns[i] * kPageSize;
    std::memcpy(run.pages.data() + i * kPageSize, page, kPageSize);
    run.hashes.push_back(XXH3_64bits(page, kPageSize));
  }
  pb::Frame f = PageBatchFrame(0, false, run, 0, run.gfns.size(), options_.compression);
  uint64_t before = channel.bytes_sent();
  if (auto s = channel.Send(f); !s.ok()) return s;
  std::lock_guard<std::mutex> lock(mu_);
  for (uint64_t gfn : run.gfns) {
    if (!sent_.Test(gfn)) {
      sent_.Set(gfn);
      progress_.pages_here++;
      if (demand) progress_.demand_pages++;
    }
  }
  progress_.bytes += channel.bytes_sent() - before;
  return absl::OkStatus();
}

absl::Status PostcopySource::SendChunk(vmm::BlockDevice& disk, Channel& channel, uint64_t chunk,
                                       bool demand) {
  uint64_t disk_bytes = disk.sectors() * RML_SECTOR_SIZE;
  uint64_t offset = chunk * kDiskChunkBytes;
  std::string data(std::min(kDiskChunkBytes, disk_bytes - offset), '\0');
  if (::pread(disk.fd(), data.data(), data.size(), static_cast<off_t>(offset)) !=
      static_cast<ssize_t>(data.size())) {
    return vmm::ErrnoStatus(absl::StrCat("read disk chunk ", chunk));
  }
  uint64_t before = channel.bytes_sent();
  if (auto s = channel.Send(ChunkFrame(chunk, std::move(data))); !s.ok()) return s;
  std::lock_guard<std::mutex> lock(mu_);
  if (!chunks_sent_.Test(chunk)) {
    chunks_sent_.Set(chunk);
    progress_.chunks_here++;
    if (demand) progress_.demand_chunks++;
  }
  progress_.bytes += channel.bytes_sent() - before;
  return absl::OkStatus();
}

absl::Status PostcopySource::ServeDemand(vmm::CheckpointableVm& vm, Channel& demand) {
  while (true) {
    auto f = demand.Receive();
    if (!f.ok()) return f.status();
    if (!f->has_postcopy_request()) {
      return absl::DataLossError("post-copy: the destination sent something else than a request");
    }
    const pb::PostcopyRequest& r = f->postcopy_request();
    if (static_cast<size_t>(r.gfns_size()) > kPagesPerBatch ||
        static_cast<size_t>(r.chunks_size()) > kChunksPerRequest) {
      return absl::DataLossError("post-copy: a request for too much at once");
    }
    std::vector<uint64_t> gfns;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (uint64_t gfn : r.gfns()) {
        if (gfn >= to_send_.pages() || !to_send_.Test(gfn)) {
          return absl::DataLossError(absl::StrFormat(
              "post-copy: the destination asked for page %#x, not one to come", gfn));
        }
        gfns.push_back(gfn);
      }
      for (uint64_t c : r.chunks()) {
        if (c >= chunks_to_send_.pages() || !chunks_to_send_.Test(c)) {
          return absl::DataLossError(absl::StrCat(
              "post-copy: the destination asked for disk chunk ", c, ", not one to come"));
        }
      }
    }
    if (!gfns.empty()) {
      if (auto s = SendPages(vm.memory(), demand, std::move(gfns), true); !s.ok()) return s;
    }
    for (uint64_t c : r.chunks()) {
      if (auto s = SendChunk(vm.disk(), demand, c, true); !s.ok()) return s;
    }
  }
}

absl::Status PostcopySource::Precopy(vmm::CheckpointableVm& vm, Channel& main, uint32_t rounds) {
  vmm::GuestMemory& memory = vm.memory();
  precopied_ = held_ = DirtyBitmap(memory.pages());
  // Each round sends what the harvest before it found written (the first, everything that may
  // hold data), while the guest runs; the harvest after it tells which of those it wrote again.
  auto harvest = [&]() -> absl::StatusOr<DirtyBitmap> {
    if (auto s = vm.Pause(); !s.ok()) return s;
    auto dirty = vm.HarvestDirty();
    if (!dirty.ok()) return dirty.status();
    for (size_t w = 0; w < held_.words().size(); w++) held_.words()[w] &= ~dirty->words()[w];
    return dirty;
  };
  auto first = harvest();  // from now on the harvests count what the guest writes
  if (!first.ok()) return first.status();
  DirtyBitmap send = PagesToCome(memory);
  for (uint32_t round = 0; round < rounds; round++) {
    if (auto s = vm.Resume(); !s.ok()) return s;
    uint64_t before = main.bytes_sent();
    std::vector<uint64_t> gfns;
    absl::Status sent;
    auto flush = [&] {
      checkpoint::PageRun run;
      run.gfns = std::move(gfns);
      gfns.clear();
      run.pages.resize(run.gfns.size() * kPageSize);
      for (size_t i = 0; i < run.gfns.size(); i++) {
        uint8_t* to = run.pages.data() + i * kPageSize;
        std::memcpy(to, memory.data() + run.gfns[i] * kPageSize, kPageSize);
        run.hashes.push_back(XXH3_64bits(to, kPageSize));  // of the copy, which may be torn
      }
      sent = main.Send(PageBatchFrame(0, true, run, 0, run.gfns.size(), options_.compression));
    };
    send.ForEach([&](uint64_t gfn) {
      if (!sent.ok()) return;
      precopied_.Set(gfn);
      held_.Set(gfn);
      gfns.push_back(gfn);
      if (gfns.size() == kPagesPerBatch) flush();
    });
    if (sent.ok() && !gfns.empty()) flush();
    if (!sent.ok()) return InTheDestinationsWords(main, sent);
    auto dirty = harvest();
    if (!dirty.ok()) return dirty.status();
    std::lock_guard<std::mutex> lock(mu_);
    progress_.precopy_rounds = round + 1;
    progress_.precopy_bytes += main.bytes_sent() - before;
    send = std::move(*dirty);
    recent_ = send;
  }
  return absl::OkStatus();
}

absl::StatusOr<PostcopySource::Report> PostcopySource::Run(vmm::CheckpointableVm& vm, Channel& main,
                                                           Channel& demand) {
  auto report = RunPaused(vm, main, demand);
  if (report.ok()) return report;
  bool after_end;
  {
    std::lock_guard<std::mutex> lock(mu_);
    after_end = commit_sent_;
  }
  return absl::Status(after_end ? absl::StatusCode::kUnavailable : absl::StatusCode::kAborted,
                      report.status().message());
}

absl::StatusOr<PostcopySource::Report> PostcopySource::RunPaused(vmm::CheckpointableVm& vm,
                                                                 Channel& main, Channel& demand) {
  vmm::GuestMemory& memory = vm.memory();
  uint64_t disk_bytes = vm.disk().sectors() * RML_SECTOR_SIZE;
  auto state = vm.SaveState();
  if (!state.ok()) return state.status();
  if (precopied_.pages() == 0) {
    // What the guest wrote in the last moments (since the last checkpoint) goes first.
    auto dirty = vm.HarvestDirty();
    if (dirty.ok()) recent_ = std::move(*dirty);
    precopied_ = held_ = DirtyBitmap(memory.pages());
  }
  // To come: every page that may hold data, and every pre-copied one (which may be a hole now),
  // unless the destination holds it as it is.
  DirtyBitmap pages = PagesToCome(memory);
  for (size_t w = 0; w < pages.words().size(); w++) {
    pages.words()[w] = (pages.words()[w] | precopied_.words()[w]) & ~held_.words()[w];
  }
  for (uint64_t gfn = 0; gfn < std::min(kLowPages, pages.pages()); gfn++) pages.Clear(gfn);
  DirtyBitmap chunks = ChunksToCome(vm.disk().fd(), disk_bytes);
  {
    std::lock_guard<std::mutex> lock(mu_);
    to_send_ = pages;
    chunks_to_send_ = chunks;
    sent_ = DirtyBitmap(pages.pages());
    chunks_sent_ = DirtyBitmap(chunks.pages());
    progress_.pages = pages.Count();
    progress_.chunks = chunks.Count();
  }
  pb::Frame start;
  pb::PostcopyStart* st = start.mutable_postcopy_start();
  *st->mutable_state() = std::move(*state);
  checkpoint::PageRun low;
  for (uint64_t gfn = 0; gfn < kLowPages; gfn++) {
    const uint8_t* page = memory.data() + gfn * kPageSize;
    if (vmm::AllZero(page, kPageSize)) continue;
    low.gfns.push_back(gfn);
    low.hashes.push_back(XXH3_64bits(page, kPageSize));
    low.pages.insert(low.pages.end(), page, page + kPageSize);
  }
  if (!low.gfns.empty()) {
    pb::Frame f = PageBatchFrame(0, false, low, 0, low.gfns.size(), options_.compression);
    st->mutable_low()->Swap(f.mutable_pages());
  }
  st->set_missing_pages(BitmapBytes(pages));
  st->set_missing_chunks(BitmapBytes(chunks));
  Clock::time_point started = Clock::now();
  main.KeepAlive(options_.peer_timeout / 4);
  demand.KeepAlive(options_.peer_timeout / 4);
  if (auto s = main.Send(start); !s.ok()) return InTheDestinationsWords(main, s);
  auto reply = main.Receive();
  if (!reply.ok()) return InTheDestinationsWords(main, reply.status());
  if (reply->has_refusal()) return DestinationSaid(reply->refusal());
  if (!reply->has_postcopy_started()) {
    return absl::DataLossError("post-copy: the destination did not answer the start");
  }
  if (!reply->postcopy_started().running()) {
    return absl::AbortedError(absl::StrCat("the destination did not resume the VM: ",
                                           reply->postcopy_started().error().substr(0, 200)));
  }
  Report report;
  report.resume_ms = MsSince(started);
  {
    std::lock_guard<std::mutex> lock(mu_);
    destination_runs_ = true;
    resumed_at_ = Clock::now();
  }

  absl::Status demand_status;
  std::thread demand_thread([&] {
    vmm::NameThread("rml-pc-demand");
    demand_status = ServeDemand(vm, demand);
  });
  // The background stream: what the guest wrote lately first, then the rest in address order.
  auto stream = [&]() -> absl::Status {
    for (int pass = 0; pass < 2; pass++) {
      std::vector<uint64_t> batch;
      absl::Status s;
      pages.ForEach([&](uint64_t gfn) {
        if (!s.ok()) return;
        bool recent = gfn < recent_.pages() && recent_.Test(gfn);
        if ((pass == 0) != recent) return;
        {
          std::lock_guard<std::mutex> lock(mu_);
          if (sent_.Test(gfn)) return;  // fetched on demand
        }
        batch.push_back(gfn);
        if (batch.size() == kPagesPerBatch) {
          s = SendPages(memory, main, std::move(batch), false);
          batch.clear();
        }
      });
      if (!s.ok()) return s;
      if (!batch.empty()) {
        if (auto s2 = SendPages(memory, main, std::move(batch), false); !s2.ok()) return s2;
      }
    }
    absl::Status s;
    chunks.ForEach([&](uint64_t c) {
      if (!s.ok()) return;
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (chunks_sent_.Test(c)) return;
      }
      s = SendChunk(vm.disk(), main, c, false);
    });
    if (!s.ok()) return s;
    pb::Frame end;
    end.mutable_postcopy_end()->set_pages(pages.Count());
    end.mutable_postcopy_end()->set_chunks(chunks.Count());
    if (auto s2 = main.Send(end); !s2.ok()) return s2;
    auto done = main.Receive();
    if (!done.ok()) return done.status();
    if (done->has_refusal()) return DestinationSaid(done->refusal());
    if (!done->has_postcopy_done()) {
      return absl::DataLossError("post-copy: the destination did not say it holds everything");
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      progress_.faults = done->postcopy_done().faults();
      progress_.fault_wait_p50_ms = done->postcopy_done().fault_wait_p50_ms();
      progress_.fault_wait_p99_ms = done->postcopy_done().fault_wait_p99_ms();
      commit_sent_ = true;  // from here the destination may own the VM without this side knowing
    }
    pb::Frame commit;
    commit.mutable_postcopy_commit();
    if (auto s2 = main.Send(commit); !s2.ok()) return s2;
    auto committed = main.Receive();
    if (!committed.ok()) return committed.status();
    if (committed->has_refusal()) return DestinationSaid(committed->refusal());
    if (!committed->has_postcopy_committed()) {
      return absl::DataLossError("post-copy: the destination did not confirm the commit");
    }
    return absl::OkStatus();
  };
  absl::Status streamed = stream();
  if (!streamed.ok()) streamed = InTheDestinationsWords(main, streamed);
  demand.Shutdown();
  demand_thread.join();
  if (!streamed.ok()) {
    return absl::Status(streamed.code(), absl::StrCat("post-copy failed with the VM at the "
                                                      "destination: ",
                                                      streamed.message()));
  }
  report.total_ms = MsSince(started);
  std::lock_guard<std::mutex> lock(mu_);
  progress_.done = true;
  report.progress = progress_;
  report.progress.seconds = MsSince(resumed_at_) / 1000;
  return report;
}

// ---- The destination ----

PostcopyProgress PostcopyDestination::progress() const {
  std::lock_guard<std::mutex> lock(mu_);
  PostcopyProgress p = progress_;
  if (pages_) {  // under way
    vmm::MissingPages::Stats stats = pages_->stats();
    p.pages_here = p.pages - stats.missing;
    p.faults = stats.faults;
    p.fault_wait_p50_ms = std::chrono::duration<double, std::milli>(stats.wait_p50).count();
    p.fault_wait_p99_ms = std::chrono::duration<double, std::milli>(stats.wait_p99).count();
    p.seconds = MsSince(resumed_at_) / 1000;
  }
  return p;
}

absl::Status PostcopyDestination::Run(Channel& main, Channel& demand, const Adopt& adopt) {
  bool adopting = false;
  absl::Status received = Receive(main, demand, adopt, &adopting);
  // From the adoption on the source is told (PostcopyStarted, or by the failure that stops the
  // guest); before it, only here.
  if (!received.ok() && !adopting) TellTheSource(main, received.message());
  return received;
}

absl::Status PostcopyDestination::Receive(Channel& main, Channel& demand, const Adopt& adopt,
                                          bool* adopting) {
  const uint64_t memory_pages = options_.identity.memory_bytes / kPageSize;
  const uint64_t chunk_count = ChunkCount(options_.identity.disk_bytes);
  auto memory = vmm::GuestMemory::CreateMemfd(options_.identity.memory_bytes);
  if (!memory.ok()) return memory.status();
  // The hybrid's pre-copy rounds: pages while the guest still runs at the source, each checked
  // against its hash; later rounds overwrite earlier ones. Bounded: a source that never stops
  // pre-copying is dropped.
  const uint64_t max_staged = (PostcopyMigration::kMaxPrecopyRounds + 1) * memory_pages;
  uint64_t staged_pages = 0;
  absl::StatusOr<pb::Frame> first;
  while (true) {
    first = main.Receive();
    if (!first.ok()) return first.status();
    if (!first->has_pages() || !first->pages().sync()) break;
    auto run = DecodePageBatch(first->pages(), memory_pages);
    if (!run.ok()) return run.status();
    if (!run->refs.empty()) {
      return absl::DataLossError("post-copy pages come whole, not as references");
    }
    staged_pages += run->gfns.size();
    if (staged_pages > max_staged) {
      return absl::DataLossError("post-copy: the source pre-copied more rounds than allowed");
    }
    for (size_t i = 0; i < run->gfns.size(); i++) {
      const uint8_t* page = run->pages.data() + i * kPageSize;
      if (XXH3_64bits(page, kPageSize) != run->hashes[i]) {
        return absl::DataLossError(absl::StrFormat(
            "post-copy: pre-copied page %#x does not match its hash", run->gfns[i]));
      }
      std::memcpy((*memory)->data() + run->gfns[i] * kPageSize, page, kPageSize);
    }
    std::lock_guard<std::mutex> lock(mu_);
    progress_.precopy_bytes += first->ByteSizeLong();
  }
  if (!first->has_postcopy_start()) {
    return absl::DataLossError("post-copy: the source did not begin with the VM's state");
  }
  const pb::PostcopyStart& st = first->postcopy_start();
  auto missing = ParseBitmap(st.missing_pages(), memory_pages, "post-copy: pages to come");
  if (!missing.ok()) return missing.status();
  auto missing_chunks = ParseBitmap(st.missing_chunks(), chunk_count, "post-copy: chunks to come");
  if (!missing_chunks.ok()) return missing_chunks.status();
  for (uint64_t gfn = 0; gfn < kLowPages; gfn++) {
    if (missing->Test(gfn)) {
      return absl::DataLossError("post-copy: a page that travels with the state is to come");
    }
  }
  // A pre-copied page still to come becomes missing (a hole) when the VM adopts this memory.
  // The pages sent with the state replace what was there.
  std::memset((*memory)->data(), 0, std::min(kLowPages, memory_pages) * kPageSize);
  if (st.has_low()) {
    auto low = DecodePageBatch(st.low(), memory_pages);
    if (!low.ok()) return low.status();
    if (!low->refs.empty())
      return absl::DataLossError("post-copy pages come whole, not as references");
    for (size_t i = 0; i < low->gfns.size(); i++) {
      const uint8_t* page = low->pages.data() + i * kPageSize;
      if (low->gfns[i] >= kLowPages || XXH3_64bits(page, kPageSize) != low->hashes[i]) {
        return absl::DataLossError("post-copy: the memory sent with the state is damaged");
      }
      std::memcpy((*memory)->data() + low->gfns[i] * kPageSize, page, kPageSize);
    }
  }

  // What the guest waits for, asked for by the requester thread.
  struct Asked {
    std::mutex mu;
    std::condition_variable cv;
    std::deque<uint64_t> pages, chunks;
    DirtyBitmap pages_asked, chunks_asked;
    bool stop = false;
  } asked;
  asked.pages_asked = DirtyBitmap(memory_pages);
  asked.chunks_asked = DirtyBitmap(chunk_count);
  auto on_page = [&asked](uint64_t gfn) {
    std::lock_guard<std::mutex> lock(asked.mu);
    asked.pages_asked.Set(gfn);
    asked.pages.push_back(gfn);
    asked.cv.notify_all();
  };
  auto on_chunk = [&asked](uint64_t chunk) {
    std::lock_guard<std::mutex> lock(asked.mu);
    asked.chunks_asked.Set(chunk);
    asked.chunks.push_back(chunk);
    asked.cv.notify_all();
  };
  const DirtyBitmap to_come = *missing, chunks_to_come = *missing_chunks;
  *adopting = true;
  auto target = adopt(std::move(*memory), st.state(), std::move(*missing),
                      std::move(*missing_chunks), on_page, on_chunk);
  pb::Frame started;
  started.mutable_postcopy_started()->set_running(target.ok());
  if (!target.ok()) {
    started.mutable_postcopy_started()->set_error(std::string(target.status().message()));
    (void)main.Send(started);
    return target.status();
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    progress_.pages = to_come.Count();
    progress_.chunks = chunks_to_come.Count();
    pages_ = target->pages;
    resumed_at_ = Clock::now();
  }
  main.KeepAlive(options_.peer_timeout / 4);
  demand.KeepAlive(options_.peer_timeout / 4);

  // The first failure ends everything: it stops the guest, and the connections with it.
  std::mutex failed_mu;
  absl::Status failed;
  bool finished = false;  // every page and chunk is here: closing the connections is no failure
  // Signalled as pages and chunks are placed, and on failure (under mu_).
  std::condition_variable arrived;
  std::atomic<bool> failing{false};
  auto fail = [&](absl::Status why) {
    {
      std::lock_guard<std::mutex> lock(failed_mu);
      if (!failed.ok() || finished) return;
      failed = why;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      failing = true;
    }
    arrived.notify_all();
    target->disk->AbandonChunks();
    std::string reason = absl::StrFormat(
        "post-copy stopped the guest: %s; %d pages and %d disk chunks never arrived", why.message(),
        target->pages->stats().missing, target->disk->missing_chunks());
    target->stop(reason);
    // Before the end: a source still streaming would otherwise see only its writes fail.
    TellTheSource(main, reason);
    main.Shutdown();
    demand.Shutdown();
    std::lock_guard<std::mutex> lock(asked.mu);
    asked.stop = true;
    asked.cv.notify_all();
  };
  if (auto s = main.Send(started); !s.ok()) fail(s);

  // Places what arrived, checked: a page or chunk must be one that was to come, match its hash,
  // and arrive once; on the demand connection, only what was asked for. The one allowed
  // duplicate: asked for on demand while the background stream brought it. Whether a page or
  // chunk that is here already was asked for is read after placing failed, not before placing:
  // the guest may touch it in between, and the demand connection bring it and place it first
  // (it is asked for before its request leaves, so a page placed from there reads as asked).
  auto take = [&](const pb::Frame& f, bool on_demand) -> absl::Status {
    auto asked_for = [&](bool page, uint64_t i) {
      std::lock_guard<std::mutex> lock(asked.mu);
      return page ? asked.pages_asked.Test(i) : asked.chunks_asked.Test(i);
    };
    if (f.has_pages()) {
      auto run = DecodePageBatch(f.pages(), memory_pages);
      if (!run.ok()) return run.status();
      if (!run->refs.empty())
        return absl::DataLossError("post-copy pages come whole, not as references");
      for (size_t i = 0; i < run->gfns.size(); i++) {
        uint64_t gfn = run->gfns[i];
        const uint8_t* page = run->pages.data() + i * kPageSize;
        if (!to_come.Test(gfn)) {
          return absl::DataLossError(absl::StrFormat("page %#x was not one to come", gfn));
        }
        if (XXH3_64bits(page, kPageSize) != run->hashes[i]) {
          return absl::DataLossError(absl::StrFormat("page %#x does not match its hash", gfn));
        }
        if (on_demand && !asked_for(true, gfn)) {
          return absl::DataLossError(absl::StrFormat("page %#x came unasked", gfn));
        }
        if (!on_demand && options_.before_placing) options_.before_placing(gfn);
        absl::Status s = target->pages->Place(gfn, page);
        if (absl::IsAlreadyExists(s)) {
          if (asked_for(true, gfn)) continue;
          return absl::DataLossError(absl::StrFormat("page %#x arrived twice", gfn));
        }
        if (!s.ok()) return s;
        std::lock_guard<std::mutex> lock(mu_);  // a waiter sees the page here, or is woken
        if (on_demand) progress_.demand_pages++;
        arrived.notify_all();
      }
      return absl::OkStatus();
    }
    if (f.has_postcopy_chunk()) {
      const pb::PostcopyChunk& c = f.postcopy_chunk();
      if (c.chunk() >= chunk_count || !chunks_to_come.Test(c.chunk())) {
        return absl::DataLossError(absl::StrCat("disk chunk ", c.chunk(), " was not one to come"));
      }
      if (XXH3_64bits(c.data().data(), c.data().size()) != c.hash()) {
        return absl::DataLossError(
            absl::StrCat("disk chunk ", c.chunk(), " does not match its hash"));
      }
      if (on_demand && !asked_for(false, c.chunk())) {
        return absl::DataLossError(absl::StrCat("disk chunk ", c.chunk(), " came unasked"));
      }
      absl::Status s = target->disk->PlaceChunk(c.chunk(), c.data());
      if (absl::IsAlreadyExists(s)) {
        if (asked_for(false, c.chunk())) return absl::OkStatus();
        return absl::DataLossError(absl::StrCat("disk chunk ", c.chunk(), " arrived twice"));
      }
      if (!s.ok()) return s;
      std::lock_guard<std::mutex> lock(mu_);
      progress_.chunks_here++;
      if (on_demand) progress_.demand_chunks++;
      arrived.notify_all();
      return absl::OkStatus();
    }
    return absl::DataLossError("post-copy: an unexpected frame");
  };

  std::thread requester([&] {
    vmm::NameThread("rml-pc-ask");
    std::unique_lock<std::mutex> lock(asked.mu);
    while (!asked.stop) {
      if (asked.pages.empty() && asked.chunks.empty()) {
        asked.cv.wait(lock);
        continue;
      }
      pb::Frame f;
      pb::PostcopyRequest* r = f.mutable_postcopy_request();
      while (!asked.pages.empty() && static_cast<size_t>(r->gfns_size()) < kPagesPerBatch) {
        r->add_gfns(asked.pages.front());
        asked.pages.pop_front();
      }
      while (!asked.chunks.empty() && static_cast<size_t>(r->chunks_size()) < kChunksPerRequest) {
        r->add_chunks(asked.chunks.front());
        asked.chunks.pop_front();
      }
      lock.unlock();
      absl::Status s = demand.Send(f);
      lock.lock();
      if (!s.ok()) {
        lock.unlock();
        fail(s);
        lock.lock();
      }
    }
  });
  std::thread demand_reader([&] {
    vmm::NameThread("rml-pc-fetch");
    while (true) {
      auto f = demand.Receive();
      absl::Status s = f.ok() ? take(*f, true) : SourceGone(f.status());
      if (!s.ok()) {
        fail(s);
        return;
      }
    }
  });

  absl::Status main_status;
  while (true) {
    auto f = main.Receive();
    if (!f.ok()) {
      main_status = SourceGone(f.status());
      break;
    }
    if (f->has_postcopy_end()) {
      // The last pages fetched on demand may still be on their way on the other connection (the
      // background stream leaves out what demand sent): wait for them, a peer timeout at most.
      bool all_here;
      {
        std::unique_lock<std::mutex> lock(mu_);
        all_here = arrived.wait_for(lock, options_.peer_timeout, [&] {
          return failing || (target->pages->complete() && target->disk->missing_chunks() == 0);
        });
        all_here = all_here && !failing;
      }
      if (!all_here) {
        main_status =
            absl::DataLossError("the source ended the post-copy with pages or chunks missing");
      } else {
        pb::Frame done;
        vmm::MissingPages::Stats faults = target->pages->stats();
        done.mutable_postcopy_done()->set_faults(faults.faults);
        done.mutable_postcopy_done()->set_fault_wait_p50_ms(
            std::chrono::duration<double, std::milli>(faults.wait_p50).count());
        done.mutable_postcopy_done()->set_fault_wait_p99_ms(
            std::chrono::duration<double, std::milli>(faults.wait_p99).count());
        // Everything is here, but the VM is the source's until it says otherwise (it may
        // still resume it if this side went now).
        absl::Status sent = main.Send(done);
        absl::StatusOr<pb::Frame> commit = sent.ok() ? main.Receive() : sent;
        if (!commit.ok()) {
          main_status = SourceGone(commit.status());
        } else if (!commit->has_postcopy_commit()) {
          main_status = absl::DataLossError("post-copy: the source did not commit the move");
        } else {
          // From now on nothing stops the guest, not even the source going before it reads the
          // confirmation.
          {
            std::lock_guard<std::mutex> lock(failed_mu);
            finished = failed.ok();
          }
          pb::Frame committed;
          committed.mutable_postcopy_committed();
          (void)main.Send(committed);
          std::lock_guard<std::mutex> lock(mu_);
          progress_.done = finished;
        }
      }
      break;
    }
    if (auto s = take(*f, false); !s.ok()) {
      main_status = s;
      break;
    }
  }
  if (!main_status.ok()) {
    fail(main_status);
  } else {
    std::lock_guard<std::mutex> lock(asked.mu);
    asked.stop = true;
    asked.cv.notify_all();
  }
  demand.Shutdown();
  requester.join();
  demand_reader.join();
  {
    // The guest's memory outlives this call only as long as the VM: no pointer into it is kept.
    std::lock_guard<std::mutex> lock(mu_);
    vmm::MissingPages::Stats stats = target->pages->stats();
    progress_.pages_here = progress_.pages - stats.missing;
    progress_.faults = stats.faults;
    progress_.fault_wait_p50_ms = std::chrono::duration<double, std::milli>(stats.wait_p50).count();
    progress_.fault_wait_p99_ms = std::chrono::duration<double, std::milli>(stats.wait_p99).count();
    progress_.seconds = MsSince(resumed_at_) / 1000;
    pages_ = nullptr;
  }
  std::lock_guard<std::mutex> lock(failed_mu);
  return failed;
}

// ---- The source's connections ----

class PostcopyMigration::Impl {
 public:
  explicit Impl(Options options)
      : options_(std::move(options)),
        source_({.peer_timeout = options_.peer_timeout, .compression = options_.compression}) {}

  absl::StatusOr<Report> Run(vmm::CheckpointableVm& vm) {
    if (options_.precopy_rounds > kMaxPrecopyRounds) {
      return absl::InvalidArgumentError(
          absl::StrCat("at most ", kMaxPrecopyRounds, " pre-copy rounds"));
    }
    // Both connections first: a destination that refuses them costs the VM nothing.
    uint64_t session = 0;
    if (::getrandom(&session, sizeof(session), 0) != sizeof(session)) std::abort();
    Channel::Terms terms{.identity = options_.identity,
                         .key = options_.key,
                         .protection = options_.protection,
                         .bond = 0,
                         .path_index = 0,
                         .path_count = 1,
                         .postcopy = pb::POSTCOPY_MAIN};
    auto main =
        Channel::Connect(io_, options_.host, options_.port, terms, session, options_.peer_timeout);
    if (!main.ok()) return Refused(main.status());
    terms.postcopy = pb::POSTCOPY_DEMAND;
    auto demand =
        Channel::Connect(io_, options_.host, options_.port, terms, session, options_.peer_timeout);
    if (!demand.ok()) return Refused(demand.status());
    Log(options_.log, absl::StrFormat("post-copy: connected to %s:%d (%s)", options_.host,
                                      options_.port, (*main)->protection()));
    if (options_.precopy_rounds > 0) {
      auto t0 = Clock::now();
      if (auto s = source_.Precopy(vm, **main, options_.precopy_rounds); !s.ok()) {
        (void)vm.Pause();  // it may have failed with the guest running
        return Refused(s);
      }
      PostcopyProgress p = source_.progress();
      Log(options_.log,
          absl::StrFormat("post-copy: %u pre-copy rounds sent %.1f MiB in %.1f s", p.precopy_rounds,
                          static_cast<double>(p.precopy_bytes) / (1 << 20), MsSince(t0) / 1000));
    } else if (auto s = vm.Pause(); !s.ok()) {
      return s;
    }
    auto paused = Clock::now();
    if (options_.before_start) {
      if (auto s = options_.before_start(); !s.ok()) return Refused(s);
    }
    auto ran = source_.Run(vm, **main, **demand);
    if (!ran.ok()) return ran.status();
    Report report;
    report.progress = ran->progress;
    double before_start = MsSince(paused) - ran->total_ms;  // state saved, bitmaps made
    report.downtime_ms = before_start + ran->resume_ms;
    report.total_ms = MsSince(paused);
    return report;
  }

  PostcopyProgress progress() const { return source_.progress(); }

 private:
  static absl::Status Refused(const absl::Status& s) {
    return absl::AbortedError(absl::StrCat("post-copy did not start: ", s.message()));
  }

  Options options_;
  boost::asio::io_context io_;
  PostcopySource source_;
};

PostcopyMigration::PostcopyMigration(Options options)
    : impl_(std::make_unique<Impl>(std::move(options))) {}
PostcopyMigration::~PostcopyMigration() = default;
absl::StatusOr<PostcopyMigration::Report> PostcopyMigration::Run(vmm::CheckpointableVm& vm) {
  return impl_->Run(vm);
}
PostcopyProgress PostcopyMigration::progress() const { return impl_->progress(); }

}  // namespace romulus::replicator
