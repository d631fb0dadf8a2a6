// Replication frames from an untrusted peer, at the decoder level (replicator/replicator.h): each
// record is a serialized pb::Frame, handed to the decoder that takes its kind on the mirror or
// the primary. Pages, disk writes and trailers go through a CheckpointAssembler of a small
// replica (pre-copy page batches through DecodePageBatch), tree queries are answered from small
// trees, and replica roots start a CompareTrees whose questions the following records answer.
// Input: a byte choosing the trees (fuzz/replication_geometry.h), then records.
#include <cstdint>
#include <optional>

#include "fuzz/fuzz_util.h"
#include "fuzz/replication_geometry.h"
#include "replicator/replicator.h"

namespace romulus::fuzz {
namespace {

std::optional<pb::Frame> ParseFrame(absl::string_view bytes) {
  pb::Frame f;
  if (!f.ParseFromArray(bytes.data(), static_cast<int>(bytes.size()))) return std::nullopt;
  return f;
}

void Run(Input& in) {
  const checkpoint::ReplicaTrees& trees = FuzzTrees(in.Byte());
  uint64_t budget = replicator::TreeQueryBudget(trees);
  std::optional<replicator::CheckpointAssembler> assembler;
  assembler.emplace(kFuzzMemoryBytes, kFuzzDiskBytes);
  while (auto record = in.Next()) {
    auto f = ParseFrame(*record);
    if (!f) continue;
    if (f->has_pages() && f->pages().sync()) {
      (void)replicator::DecodePageBatch(f->pages(), kFuzzMemoryPages);
    } else if (f->has_tree_query()) {
      (void)replicator::AnswerTreeQuery(trees, f->tree_query(), budget);
    } else if (f->has_replica_roots()) {
      // The primary's side: the mirror's answers are the records that follow.
      replicator::AskMirror ask = [&in](const pb::TreeQuery&) -> absl::StatusOr<pb::TreeAnswer> {
        auto answer = in.Next();
        if (!answer) return absl::DataLossError("no answer");
        auto a = ParseFrame(*answer);
        if (!a || !a->has_tree_answer()) return absl::DataLossError("not a tree answer");
        return a->tree_answer();
      };
      auto holdings = replicator::CompareTrees(trees, f->replica_roots(), ask);
      if (holdings.ok()) (void)replicator::SamePagesFrames(trees.pages, *holdings);
    } else {
      auto cp = assembler->Add(std::move(*f));
      if (!cp.ok()) {
        // The mirror drops the connection; the next one starts a fresh stream.
        assembler.emplace(kFuzzMemoryBytes, kFuzzDiskBytes);
      } else if (cp->has_value()) {
        (void)checkpoint::CheckpointDigest(**cp);
      }
    }
  }
}

}  // namespace
}  // namespace romulus::fuzz

ROMULUS_FUZZ_TARGET(Run)
