// Post-copy migration: the VM moves first and its memory after. The source, its VM paused for
// good, sends the state and what the VM needs to resume (guest RAM below RML_IMAGE_GPA) and the
// list of pages and disk chunks still to come; the destination resumes the guest at once and
// receives the rest on two connections: the main one streams everything in the background, the
// demand one carries what the guest waits for (vmm::MissingPages, BlockDevice::ExpectChunks), so
// that a demand fetch never waits behind the stream.
//
//   source (PostcopySource)                       destination (PostcopyDestination)
//   main:   PostcopyStart  ───────────────────▶  resumes the guest (its Adopt)
//           ◀─────────────────── PostcopyStarted
//   demand: ◀─────────────────── PostcopyRequest  (a fault)
//           pages, chunks ───────────────────▶    placed, the guest goes on
//   main:   pages, chunks ───────────────────▶    placed (the background stream)
//           PostcopyEnd ─────────────────────▶
//           ◀─────────────────────── PostcopyDone (every page and chunk is here)
//           PostcopyCommit ──────────────────▶    the VM is the destination's: outputs leave
//           ◀────────────────── PostcopyCommitted
//
// Until the end the VM's memory is split across the two hosts: if the source dies first, the
// guest is stopped, saying how much never arrived; it never runs on a page that did not arrive.
// Every page and chunk is checked against its hash, its range and whether it was to come at all.
// A destination that stops the guest (or refuses the VM before it runs) says why in its last
// frame on the main connection (pb::Refusal), and the source reports that rather than how the
// end looked from its side (still streaming, it sees "Broken pipe").
// Internal to the replicator.
#ifndef ROMULUS_REPLICATOR_POSTCOPY_H_
#define ROMULUS_REPLICATOR_POSTCOPY_H_

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>

#include "absl/status/statusor.h"
#include "replicator/channel.h"
#include "replicator/replicator.h"
#include "vmm/vmm.h"

namespace romulus::replicator {

class PostcopySource {
 public:
  struct Options {
    std::chrono::milliseconds peer_timeout{5000};
    pb::Compression compression = pb::COMPRESSION_NONE;
  };
  struct Report {
    PostcopyProgress progress;
    double resume_ms = 0;  // start sent -> the destination said the guest runs
    double total_ms = 0;   // start sent -> the destination said every page is here
  };
  explicit PostcopySource(Options options) : options_(std::move(options)) {}
  // The hybrid, before Run: `rounds` passes over the guest's memory while `vm` runs, each
  // sending what the last one left or the guest wrote since (the first, every page that may
  // hold data). Returns with the VM paused for good; Run then sends only the pages the guest
  // wrote after they went, and those never sent.
  absl::Status Precopy(vmm::CheckpointableVm& vm, Channel& main, uint32_t rounds);
  // `vm` is paused for good: its memory and disk do not change any more. Returns once the
  // destination holds everything and took the VM. Errors: Aborted before the commit was sent
  // (the destination cannot have taken the VM: it stops the guest, and the VM may resume here);
  // Unavailable after (it may have taken it and run the guest on).
  absl::StatusOr<Report> Run(vmm::CheckpointableVm& vm, Channel& main, Channel& demand);
  // Any thread.
  PostcopyProgress progress() const;
  bool destination_runs() const;

 private:
  absl::StatusOr<Report> RunPaused(vmm::CheckpointableVm& vm, Channel& main, Channel& demand);
  absl::Status ServeDemand(vmm::CheckpointableVm& vm, Channel& demand);
  absl::Status SendPages(vmm::GuestMemory& memory, Channel& channel, std::vector<uint64_t> gfns,
                         bool demand);
  absl::Status SendChunk(vmm::BlockDevice& disk, Channel& channel, uint64_t chunk, bool demand);

  Options options_;
  mutable std::mutex mu_;
  vmm::DirtyBitmap to_send_, chunks_to_send_;  // under mu_: still to come, at the start
  vmm::DirtyBitmap sent_, chunks_sent_;        // under mu_
  // By Precopy: the pages it sent, those of them the destination holds as they are now, and
  // what the guest wrote in its last round (streamed first: what it uses now).
  vmm::DirtyBitmap precopied_, held_, recent_;
  PostcopyProgress progress_;      // under mu_
  bool destination_runs_ = false;  // under mu_
  bool commit_sent_ = false;       // under mu_
  std::chrono::steady_clock::time_point resumed_at_;
};

class PostcopyDestination {
 public:
  using Adopt = PostcopyAdopt;
  struct Options {
    Identity identity;  // the VM's geometry, as the handshake agreed
    std::chrono::milliseconds peer_timeout{5000};
    // Test hook: runs on the main connection's thread for each page the background stream
    // brought, checked and about to be placed (a test holds it there while the same page is
    // touched and fetched on demand).
    std::function<void(uint64_t gfn)> before_placing = nullptr;
  };
  explicit PostcopyDestination(Options options) : options_(std::move(options)) {}
  // Receives the VM on `main` (after the pages of a hybrid's pre-copy rounds), resumes it through
  // `adopt`, and takes in everything still to come. OK once every page and chunk is here (the guest
  // runs on all of its memory). An error before `adopt` succeeded leaves nothing running; after it,
  // the guest was stopped (with the error as the reason) and is not to run again. Either way the
  // source is told why, on `main`, before it ends.
  absl::Status Run(Channel& main, Channel& demand, const Adopt& adopt);
  // Any thread.
  PostcopyProgress progress() const;

 private:
  class Receiver;
  // Run's work. `*adopting`: `adopt` was called, and from then on a failure has told the source
  // already (PostcopyStarted, or the failure's pb::Refusal).
  absl::Status Receive(Channel& main, Channel& demand, const Adopt& adopt, bool* adopting);
  Options options_;
  mutable std::mutex mu_;
  PostcopyProgress progress_;  // under mu_
  std::chrono::steady_clock::time_point resumed_at_;
  vmm::MissingPages* pages_ = nullptr;  // under mu_, once adopted
};

}  // namespace romulus::replicator

#endif  // ROMULUS_REPLICATOR_POSTCOPY_H_
