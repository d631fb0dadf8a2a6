// The mirror's receive path with a small replica (fuzz/mirror_harness.h): frames from an
// untrusted primary go through the MirrorSession the Mirror runs per connection (tree queries,
// pre-copy staging, checkpoint assembly and commit, hand-overs), with connections dropped and
// resumed by the same primary or by a new one. As frames arrive it checks what the replica
// promises: its contents and committed epoch change only with a commit the mirror acknowledges
// (a dropped connection, a refused frame, a failed Apply or a hand-over change nothing), epochs
// only move on in sequence, a hand-over resumes only what this connection committed, and the
// trees a resynchronisation is told about are those of the replica's contents.
#include <fcntl.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <vector>

#include "fuzz/mirror_harness.h"

namespace romulus::fuzz {
namespace {

void Check(bool ok, const char* what) {
  if (ok) return;
  std::fprintf(stderr, "mirror_fuzz: invariant broken: %s\n", what);
  __builtin_trap();
}

struct Contents {
  int64_t epoch;
  uint64_t memory, disk;
  bool operator==(const Contents&) const = default;
};

// A digest of the replica's memory that reads only the pages its memfd holds: holes read as
// zero, and hashing them through the mapping would allocate all 16 MiB on every input. Each page
// that is not all zero counts, with its number, so that a zero page written reads as a hole.
uint64_t MemoryDigest(const vmm::GuestMemory& m) {
  XXH3_state_t* st = XXH3_createState();
  XXH3_64bits_reset(st);
  static const uint64_t zero = [] {
    std::vector<uint8_t> page(4096);
    return XXH3_64bits(page.data(), page.size());
  }();
  off_t end = static_cast<off_t>(m.size());
  for (off_t pos = 0; pos < end;) {
    off_t data = ::lseek(m.fd(), pos, SEEK_DATA);
    if (data < 0 || data >= end) break;  // ENXIO: no data after pos
    off_t hole = std::min(::lseek(m.fd(), data, SEEK_HOLE), end);
    Check(hole > data, "the replica's memory cannot be read");
    for (uint64_t gfn = static_cast<uint64_t>(data) / 4096;
         gfn * 4096 < static_cast<uint64_t>(hole); gfn++) {
      uint64_t entry[2] = {gfn, XXH3_64bits(m.data() + gfn * 4096, 4096)};
      if (entry[1] == zero) continue;
      XXH3_64bits_update(st, entry, sizeof(entry));
    }
    pos = hole;
  }
  uint64_t digest = XXH3_64bits_digest(st);
  XXH3_freeState(st);
  return digest;
}

// The replica's committed epoch and digests of its memory and disk image (read through its path:
// a commit may replace the image by the staging copy).
Contents Look(MirrorHarness& h) {
  static std::string* disk = new std::string(kFuzzDiskBytes, '\0');
  vmm::Fd fd(::open(h.disk_path().c_str(), O_RDONLY | O_CLOEXEC));
  Check(fd.valid() &&
            ::pread(fd.get(), disk->data(), disk->size(), 0) == static_cast<ssize_t>(disk->size()),
        "the replica's disk image cannot be read");
  return {h.replica().committed_epoch(), MemoryDigest(h.replica().memory()),
          XXH3_64bits(disk->data(), disk->size())};
}

// The trees the replica compares with (and checks the primary's claims against) are those of
// what it holds: a stale cache would let the primary claim pages the replica no longer has.
void CheckTrees(MirrorHarness& h) {
  checkpoint::ReplicaStore& r = h.replica();
  if (!r.has_contents()) return;
  auto trees = r.CommittedTrees();
  Check(trees.ok(), "the committed replica's trees cannot be read");
  checkpoint::HashTree pages = checkpoint::HashTree::OverPages(r.memory());
  vmm::Fd fd(::open(h.disk_path().c_str(), O_RDONLY | O_CLOEXEC));
  Check(fd.valid(), "the replica's disk image cannot be opened");
  auto chunks = checkpoint::HashTree::OverDisk(fd.get(), r.disk_bytes());
  Check(chunks.ok(), "the replica's disk image cannot be read");
  Check((*trees)->pages.leaves() == pages.leaves(), "page tree differs from the replica's pages");
  Check((*trees)->chunks.leaves() == chunks->leaves(),
        "chunk tree differs from the replica's disk");
}

void Run(Input& in) {
  uint8_t mode = in.Byte();
  MirrorHarness h(HandoverOf(mode), SeededOf(mode));
  // The replica as last seen: only a commit the mirror acknowledges moves it on. It is looked at
  // around each frame that can reach Apply (a trailer) or the host (a hand-over), at each
  // connection and at the end (looking after every frame would cost most of the run): a change
  // made by any other frame shows there, before a commit could hide it.
  static const Contents kFresh = Look(h);  // every input's replica starts out zeroed alike
  Contents known = kFresh;
  bool looked = true;  // nothing happened since: the replica is `known`
  auto unchanged = [&](const char* what) {
    if (!looked) Check(Look(h) == known, what);
    looked = true;
  };
  bool synchronised = false;  // this connection committed a full checkpoint
  bool fresh = true;          // a new primary session: no commit since it connected
  uint64_t acks = 0;
  auto connect = [&](bool new_session) {
    unchanged("the replica changed without a commit");
    auto roots = h.Connect(new_session);
    looked = false;
    unchanged("a connection changed the replica");
    synchronised = false;
    fresh = fresh || new_session;
    if (!roots.ok()) {
      h.Disconnect();  // the host could not read its replica, not the input: the Mirror drops it
      return;
    }
    Check(roots->replica_roots().empty() == !h.replica().HoldingsTrees().ok(),
          "the roots say empty for a replica that holds something, or the other way round");
  };
  auto disconnect = [&] {
    unchanged("the replica changed without a commit");
    h.Disconnect();
    looked = false;
    unchanged("suspending a synchronisation changed the replica");
  };
  connect(true);
  while (auto record = in.Next()) {
    Op op = record->empty() ? kOpFrame : static_cast<Op>(static_cast<uint8_t>((*record)[0]) % 3);
    if (op != kOpFrame) {
      disconnect();
      connect(op == kOpNewSession);
      continue;
    }
    if (!h.connected()) connect(false);  // the primary reconnects after a drop
    if (!h.connected()) continue;
    if (!record->empty()) record->remove_prefix(1);
    pb::Frame f;
    if (!f.ParseFromArray(record->data(), static_cast<int>(record->size()))) continue;
    bool trailer = f.has_trailer(), full = trailer && f.trailer().full();
    bool watched = trailer || f.has_handover();
    if (watched) unchanged("the replica changed without a commit");
    size_t handovers = h.handovers().size();
    auto replies = h.Receive(std::move(f));
    looked = false;
    if (!replies.ok()) {
      if (watched) unchanged("a refused checkpoint or hand-over changed the replica");
      Check(h.handovers().size() == handovers, "a dropped connection handed the VM over");
      continue;
    }
    std::optional<uint64_t> acked;
    bool resumed = false;
    for (const pb::Frame& r : *replies) {
      if (r.has_ack()) {
        Check(!acked && trailer, "an ack for no checkpoint");
        acked = r.ack().epoch();
      } else if (r.has_handover_reply()) {
        const pb::HandoverReply& reply = r.handover_reply();
        resumed = reply.resumed();
        Check(resumed || !reply.error().empty(), "a refused hand-over without a reason");
        if (h.handovers().size() != handovers) {
          Check(synchronised && static_cast<int64_t>(reply.epoch()) == known.epoch &&
                    h.handovers().back() == reply.epoch(),
                "the host was asked to resume an epoch this connection did not commit");
        }
        Check(!resumed ||
                  (HandoverOf(mode) == kHandoverResumes && h.handovers().size() == handovers + 1),
              "a hand-over resumed that the host did not accept");
      } else {
        Check(r.has_tree_answer(), "an unexpected reply");
      }
    }
    Check(h.handed_over() == resumed, "hand-over state and reply disagree");
    if (acked) {
      Contents after = Look(h);
      Check(static_cast<int64_t>(*acked) == after.epoch, "the ack names another epoch");
      if (full) {
        Check(fresh || after.epoch > known.epoch, "a full checkpoint replayed an old epoch");
        synchronised = true;
      } else {
        Check(!fresh && known.epoch >= 0 && after.epoch == known.epoch + 1,
              "an incremental checkpoint out of sequence");
      }
      fresh = false;
      known = after;
      looked = true;
      acks++;
    } else if (watched) {
      unchanged("the replica changed without a commit");
    }
    Check(h.stats().checkpoints == acks, "stats count other commits than the acks");
    if (resumed) break;  // the VM runs on this host: replication has ended
  }
  disconnect();
  if (acks > 0) CheckTrees(h);  // else the replica holds what it was created with
}

}  // namespace
}  // namespace romulus::fuzz

ROMULUS_FUZZ_TARGET(Run)
