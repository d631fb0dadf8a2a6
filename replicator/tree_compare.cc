// Comparing a replica with the VM as hash trees: both ends of the exchange, independent of the
// channel that carries it.
#include <algorithm>

#include "absl/strings/str_cat.h"
#include "replicator/replicator.h"

namespace romulus::replicator {
namespace {

using checkpoint::HashTree;

// One tree, from the root down: every node of `own` whose hash the mirror shares goes to `same`
// (its subtree is not descended); `mirror_leaves` (if not null) receives the mirror's hash of
// every leaf.
absl::Status Descend(bool disk, const HashTree& own, uint64_t mirror_root, const AskMirror& ask,
                     std::vector<std::pair<uint32_t, uint64_t>>& same,
                     std::vector<uint64_t>* mirror_leaves) {
  if (own.width(0) == 0) return absl::OkStatus();
  size_t top = own.top();
  if (mirror_leaves) mirror_leaves->assign(own.width(0), 0);
  std::vector<uint64_t> frontier;  // nodes that differ, at `level`
  if (own.node(top, 0) == mirror_root) {
    same.emplace_back(top, 0);
  } else if (top == 0) {
    if (mirror_leaves) (*mirror_leaves)[0] = mirror_root;
  } else {
    frontier.push_back(0);
  }
  for (size_t level = top; level >= 1 && !frontier.empty(); level--) {
    std::vector<uint64_t> next;
    for (size_t begin = 0; begin < frontier.size(); begin += kMaxTreeQueryNodes) {
      size_t end = std::min(frontier.size(), begin + kMaxTreeQueryNodes);
      pb::TreeQuery q;
      q.set_disk(disk);
      q.set_level(static_cast<uint32_t>(level));
      q.mutable_nodes()->Add(frontier.begin() + static_cast<ptrdiff_t>(begin),
                             frontier.begin() + static_cast<ptrdiff_t>(end));
      auto answer = ask(q);
      if (!answer.ok()) return answer.status();
      uint64_t expected = 0;
      for (size_t i = begin; i < end; i++) {
        auto [first, last] = own.Children(level, frontier[i]);
        expected += last - first;
      }
      if (static_cast<uint64_t>(answer->hashes_size()) != expected) {
        return absl::DataLossError("the mirror's tree answer does not fit the question");
      }
      int k = 0;
      for (size_t i = begin; i < end; i++) {
        auto [first, last] = own.Children(level, frontier[i]);
        for (uint64_t c = first; c < last; c++) {
          uint64_t theirs = answer->hashes(k++);
          if (theirs == own.node(level - 1, c)) {
            same.emplace_back(level - 1, c);
          } else if (level - 1 > 0) {
            next.push_back(c);
          } else if (mirror_leaves) {
            (*mirror_leaves)[c] = theirs;
          }
        }
      }
    }
    frontier = std::move(next);
  }
  if (mirror_leaves) {
    for (auto [level, node] : same) {
      auto [first, last] = own.Leaves(level, node);
      std::copy(own.leaves().begin() + static_cast<ptrdiff_t>(first),
                own.leaves().begin() + static_cast<ptrdiff_t>(last),
                mirror_leaves->begin() + static_cast<ptrdiff_t>(first));
    }
  }
  return absl::OkStatus();
}

uint64_t Nodes(const HashTree& t) {
  uint64_t n = 0;
  for (size_t level = 0; level <= t.top(); level++) n += t.width(level);
  return n;
}

}  // namespace

pb::ReplicaRoots RootsOf(const checkpoint::ReplicaTrees* trees) {
  pb::ReplicaRoots r;
  r.set_empty(trees == nullptr);
  if (trees) {
    const HashTree& p = trees->pages;
    const HashTree& c = trees->chunks;
    if (p.width(p.top()) > 0) r.set_pages(p.node(p.top(), 0));
    if (c.width(c.top()) > 0) r.set_chunks(c.node(c.top(), 0));
  }
  return r;
}

absl::StatusOr<MirrorHoldings> CompareTrees(const checkpoint::ReplicaTrees& own,
                                            const pb::ReplicaRoots& roots, const AskMirror& ask) {
  MirrorHoldings h;
  if (roots.empty()) return h;
  if (auto s = Descend(false, own.pages, roots.pages(), ask, h.same_pages, nullptr); !s.ok()) {
    return s;
  }
  for (auto [level, node] : h.same_pages) {
    auto [first, last] = own.pages.Leaves(level, node);
    h.same_page_count += last - first;
  }
  std::vector<std::pair<uint32_t, uint64_t>> same_chunks;
  if (auto s = Descend(true, own.chunks, roots.chunks(), ask, same_chunks, &h.chunks); !s.ok()) {
    return s;
  }
  for (auto [level, node] : same_chunks) {
    auto [first, last] = own.chunks.Leaves(level, node);
    h.same_chunk_count += last - first;
  }
  return h;
}

uint64_t TreeQueryBudget(const checkpoint::ReplicaTrees& trees) {
  return 2 * (Nodes(trees.pages) + Nodes(trees.chunks));
}

absl::StatusOr<pb::TreeAnswer> AnswerTreeQuery(const checkpoint::ReplicaTrees& trees,
                                               const pb::TreeQuery& q, uint64_t& budget) {
  const HashTree& t = q.disk() ? trees.chunks : trees.pages;
  if (q.level() < 1 || q.level() > t.top() || q.nodes_size() == 0 ||
      static_cast<size_t>(q.nodes_size()) > kMaxTreeQueryNodes) {
    return absl::DataLossError(absl::StrCat("tree query for ", q.nodes_size(), " nodes at level ",
                                            q.level(), " does not fit"));
  }
  pb::TreeAnswer a;
  for (uint64_t node : q.nodes()) {
    if (node >= t.width(q.level())) {
      return absl::DataLossError(
          absl::StrCat("tree query for node ", node, " of level ", q.level(), ": no such node"));
    }
    auto [first, last] = t.Children(q.level(), node);
    if (last - first > budget)
      return absl::DataLossError("tree queries past any comparison's need");
    budget -= last - first;
    for (uint64_t c = first; c < last; c++) a.add_hashes(t.node(q.level() - 1, c));
  }
  return a;
}

std::vector<pb::Frame> SamePagesFrames(const HashTree& pages, const MirrorHoldings& holdings) {
  constexpr size_t kPerFrame = 64 * 1024;  // under 1.2 MiB a frame
  std::vector<pb::Frame> frames;
  for (auto [level, node] : holdings.same_pages) {
    pb::SamePages* s = frames.empty() ? nullptr : frames.back().mutable_same_pages();
    if (!s || s->level() != level || static_cast<size_t>(s->nodes_size()) >= kPerFrame) {
      s = frames.emplace_back().mutable_same_pages();
      s->set_level(level);
    }
    s->add_nodes(node);
    s->add_hashes(pages.node(level, node));
  }
  return frames;
}

}  // namespace romulus::replicator
