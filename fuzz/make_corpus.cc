// Writes the fuzz targets' seed corpus: a handful of small valid inputs per target, made with the
// project's own encoders, in the shape fuzz/fuzz_util.h describes. Usage: fuzz_corpus DIR (the
// checked-in corpus is fuzz/corpus). Inputs that reach a defect being fixed elsewhere are left
// out on purpose (see the datagram target).
#include <xxhash.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "checkpoint/checkpoint.h"
#include "fuzz/fuzz_util.h"
#include "fuzz/mirror_harness.h"
#include "fuzz/replication_geometry.h"
#include "replicator/replicator.h"
#include "switchover/datagram.h"
#include "vmm/ledger_protocol.h"

namespace romulus::fuzz {
namespace {

std::string g_dir;

void Write(const std::string& target, const std::string& name, const std::string& bytes) {
  std::filesystem::create_directories(g_dir + "/" + target);
  std::ofstream(g_dir + "/" + target + "/" + name, std::ios::binary | std::ios::trunc) << bytes;
}

std::string Mode(int m) { return std::string(1, static_cast<char>(m)); }

std::string Body(const pb::SwitchoverMessage& m) { return m.SerializeAsString(); }

void Datagrams() {
  pb::SwitchoverMessage hb;
  pb::Heartbeat* h = hb.mutable_heartbeat();
  h->set_vm_id("vm");
  h->set_node("b");
  h->set_role("mirror");
  h->set_session(5);
  h->set_seq(1);
  Write("datagram", "open_heartbeat", Mode(0) + switchover::Seal(kFuzzKey, hb));
  Write("datagram", "body_heartbeat", Mode(1) + Body(hb));

  pb::SwitchoverMessage lr;
  pb::LeaseRequest* r = lr.mutable_lease_request();
  r->set_vm_id("vm");
  r->set_node("n1");
  r->set_request_id(1);
  Write("datagram", "open_lease_request", Mode(0) + switchover::Seal(kFuzzKey, lr));
  // A node's life at the witness: challenge, acquire, renew, hand over, and the new holder
  // releasing it.
  std::string witness = Mode(2) + Record(Body(lr));
  r->set_nonce("*");
  for (auto op : {pb::LEASE_ACQUIRE, pb::LEASE_ACQUIRE, pb::LEASE_TRANSFER}) {
    r->set_op(op);
    r->set_to_node(op == pb::LEASE_TRANSFER ? "n2" : "");
    r->set_request_id(r->request_id() + 1);
    witness += Record(Body(lr));
  }
  Write("datagram", "witness_lease", witness);
  r->set_node("n2");
  r->set_op(pb::LEASE_RELEASE);
  r->set_to_node("");
  Write("datagram", "witness_release",
        Mode(2) + Record(Body(lr)) + Record(Body(lr)) + Record("not a message"));

  // A peer's heartbeats: in order with echoes, then a replay, then another VM's.
  std::string beats = Mode(3);
  for (uint64_t seq = 1; seq <= 3; seq++) {
    h->set_seq(seq);
    h->set_echo_seq(seq > 1 ? 1 : 0);
    h->set_echo_hold_us(seq > 1 ? 200 : 0);
    beats += Record(Body(hb));
  }
  beats += Record(Body(hb));
  h->set_vm_id("other");
  beats += Record(Body(hb));
  Write("datagram", "heartbeats", beats);
}

void Configs() {
  Write("config", "primary", Mode(0) + R"(vm_id: "ledger-1"
memory_mib: 64
disk: "/tmp/d.img"
disk_mib: 16
mirror: "127.0.0.1:7400"
psk_file: "/etc/romulus/key"
epoch_ms: 25
compression: "none"
control_socket: "/tmp/a.sock"
workload { working_set_pages: 64 write_rate: 100 pattern: "hotcold" }
switchover {
  node: "a"
  path { local: "127.0.0.1:7500" remote: "127.0.0.1:7501" }
  path { local: "[::1]:7500" remote: "[::1]:7501" }
  witness: "127.0.0.1:7300"
  fence_command: "true"
}
)");
  Write("config", "mirror", Mode(1) + R"(vm_id: "ledger-1"
memory_mib: 64
port: 7400
psk_file: "/etc/romulus/key"
replica_disk: "/tmp/r.img"
replicate_to: "127.0.0.1:7401"
switchover { node: "b" path { local: "127.0.0.1:7501" remote: "127.0.0.1:7500" } }
)");
  Write("config", "proxy", Mode(4) + R"(listen: "127.0.0.1"
port: 7070
host: "127.0.0.1:7071"
host: "[::1]:7072"
hold_ms: 10000
)");
  Write("config", "syntax_error", Mode(0) + "vm_id: \"a\"\nnot_a_field: 3\n");
  Write("config", "values", Mode(2) + "127.0.0.1:7000");
  Write("config", "values_v6", Mode(2) + "[::1]:65535");
  std::string argv = "--listen|127.0.0.1:7300|--lease-ms=150|--size|4M|--seconds|1.5|--flag";
  for (char& c : argv) c = c == '|' ? '\0' : c;
  Write("config", "command_line", Mode(3) + argv);
}

std::string Frame(const google::protobuf::MessageLite& m) { return vmm::EncodeFrame(m); }

void Ledger() {
  std::string requests = Mode(0);
  pb::LedgerRequest q;
  q.set_client_id(7);
  uint64_t id = 1;
  for (auto op : {pb::OPEN, pb::DEPOSIT, pb::TRANSFER, pb::READ}) {
    q.set_request_id(id++);
    q.set_op(op);
    q.set_account(1);
    q.set_to_account(op == pb::TRANSFER ? 2 : 0);
    q.set_amount(op == pb::READ ? 0 : 100);
    requests += Frame(q);
  }
  Write("ledger", "requests", requests);
  q.set_op(static_cast<pb::LedgerOp>(9));
  std::string bad = Mode(0) + Frame(q);
  q.set_op(pb::READ);
  q.set_client_id(0);
  bad += Frame(q);
  Write("ledger", "bad_requests", bad + std::string("\x05\x00\x00\x00\x08", 5));
  Write("ledger", "oversized_frame", Mode(0) + std::string("\x00\x20\x00\x00zzzz", 8));

  pb::LedgerResponse r;
  r.set_client_id(7);
  r.set_request_id(1);
  r.set_balance(100);
  r.set_seq(3);
  std::string replies = Mode(1) + Frame(r);
  r.set_status(2);
  r.set_error("no such account");
  replies += Frame(r);
  Write("ledger", "responses", replies);
  Write("ledger", "truncated_response", Mode(1) + Frame(r).substr(0, 9));
}

void Control() {
  pb::ControlRequest req;
  req.set_status(true);
  Write("control", "status_request", Mode(0) + Frame(req));
  req.mutable_promote()->set_force(true);
  Write("control", "promote_request", Mode(0) + Frame(req));
  req.mutable_migrate()->set_timeout_ms(1000);
  Write("control", "migrate_request", Mode(0) + Frame(req));
  Write("control", "empty_request", Mode(0) + Frame(pb::ControlRequest()));
  Write("control", "oversized_request", Mode(0) + std::string("\xff\xff\x00\x00", 4));

  pb::ControlReply reply;
  pb::StatusReply* s = reply.mutable_status();
  s->set_role("primary");
  s->set_vm_id("ledger-1");
  s->set_state("protected");
  s->set_peer_connected(true);
  s->set_peer("127.0.0.1:7400");
  s->set_epochs(100);
  s->set_committed_epoch(99);
  s->mutable_sync()->set_done_bytes(1 << 20);
  s->mutable_sync()->set_total_bytes(4 << 20);
  s->mutable_last_sync()->set_done_bytes(4 << 20);
  pb::PathState* p = s->add_paths();
  p->set_name("127.0.0.1:7500 -> 127.0.0.1:7501");
  p->set_up(true);
  p->set_rtt_ms(0.2);
  s->set_witness("127.0.0.1:7300");
  s->set_lease_held(true);
  Write("control", "status_reply", Mode(1) + Frame(reply));
  pb::ControlReply promoted;
  promoted.set_promoted("resumed epoch 9");
  Write("control", "promote_reply", Mode(3) + Frame(promoted));
  pb::ControlReply migrated;
  migrated.set_migrated("handed over");
  migrated.set_downtime_ms(12.5);
  Write("control", "migrate_reply", Mode(5) + Frame(migrated));
  pb::ControlReply error;
  error.set_error("no lease");
  Write("control", "error_reply", Mode(1) + Frame(error));
}

void Replication() {
  using checkpoint::Checkpoint;
  // A checkpoint of a few pages (patterned, so that LZ4 shrinks them; one all zero) and disk
  // writes, in frames as the primary sends them.
  Checkpoint c;
  c.epoch = 4;
  for (uint64_t gfn : {1, 5, 6, 63}) {
    c.gfns.push_back(gfn);
    c.hashes.push_back(gfn * 31);
    for (int i = 0; i < 4096; i++) c.pages.push_back(gfn == 6 ? 0 : static_cast<uint8_t>(i % 7));
  }
  c.disk_writes.push_back({8, std::string(512, 'd')});
  c.disk_writes.push_back({9, std::string(1024, 'e')});
  c.state.set_memory_bytes(kFuzzMemoryBytes);
  c.digest = checkpoint::CheckpointDigest(c);
  for (auto compression : {pb::COMPRESSION_NONE, pb::LZ4}) {
    std::string in = Mode(2);
    for (const pb::Frame& f : replicator::CheckpointFrames(c, compression)) {
      in += Record(f.SerializeAsString());
    }
    Write("replication", compression == pb::LZ4 ? "checkpoint_lz4" : "checkpoint", in);
  }
  Checkpoint sync = c;
  sync.gfns.resize(2);
  sync.hashes.resize(2);
  sync.pages.resize(2 * 4096);
  Write("replication", "sync_pages",
        Mode(2) +
            Record(replicator::PageBatchFrame(0, true, sync, 0, 2, pb::LZ4).SerializeAsString()));

  // Tree queries a primary asks, at each level of the three-level trees.
  std::string queries = Mode(3);
  for (uint32_t level : {2u, 1u}) {
    pb::Frame f;
    f.mutable_tree_query()->set_level(level);
    f.mutable_tree_query()->add_nodes(0);
    f.mutable_tree_query()->add_nodes(1);
    queries += Record(f.SerializeAsString());
  }
  pb::Frame disk_query;
  disk_query.mutable_tree_query()->set_disk(true);
  disk_query.mutable_tree_query()->set_level(1);
  disk_query.mutable_tree_query()->add_nodes(0);
  Write("replication", "tree_queries", queries + Record(disk_query.SerializeAsString()));

  // A comparison with a mirror whose trees differ from the primary's in a few leaves: its roots,
  // then its answer to each question, as the mirror computes them.
  for (uint8_t which : {2, 3}) {
    const checkpoint::ReplicaTrees& own = FuzzTrees(which);
    std::vector<uint64_t> pages = own.pages.leaves(), chunks = own.chunks.leaves();
    pages[pages.size() / 2] ^= 1;
    chunks.back() ^= 1;
    checkpoint::ReplicaTrees mirror{checkpoint::HashTree(pages), checkpoint::HashTree(chunks)};
    pb::Frame roots;
    *roots.mutable_replica_roots() = replicator::RootsOf(&mirror);
    std::string in = Mode(which) + Record(roots.SerializeAsString());
    uint64_t budget = replicator::TreeQueryBudget(mirror);
    auto holdings = replicator::CompareTrees(
        own, roots.replica_roots(), [&](const pb::TreeQuery& q) -> absl::StatusOr<pb::TreeAnswer> {
          auto a = replicator::AnswerTreeQuery(mirror, q, budget);
          if (a.ok()) {
            pb::Frame f;
            *f.mutable_tree_answer() = *a;
            in += Record(f.SerializeAsString());
          }
          return a;
        });
    if (!holdings.ok()) {
      std::fprintf(stderr, "fuzz_corpus: comparison failed: %s\n",
                   std::string(holdings.status().message()).c_str());
      std::exit(1);
    }
    Write("replication", "compare_trees_" + std::to_string(which), in);
  }
}

// The mirror target's seeds: conversations of a primary with the mirror, written as inputs while
// they run against the target's own harness, so that each seed is checked to commit (or hand
// over) as it should. The primary's side is made with the project's encoders, as
// PrimaryImpl uses them.
class Conversation {
 public:
  Conversation(const std::string& name, HandoverMode mode, bool seeded)
      : name_(name), harness_(mode, seeded), input_(MirrorMode(mode, seeded)) {
    Connect(true);
  }
  ~Conversation() { Write("mirror", name_, input_); }

  // The connection drops and the primary connects again (a new session: a restarted primary).
  void Reconnect(bool new_session) {
    input_ += OpRecord(new_session ? kOpNewSession : kOpReconnect);
    harness_.Disconnect();
    Connect(new_session);
  }
  std::vector<pb::Frame> Send(const pb::Frame& f) {
    input_ += OpRecord(kOpFrame, &f);
    auto replies = harness_.Receive(f);
    if (!replies.ok()) Fail(std::string(replies.status().message()));
    return *replies;
  }
  const pb::ReplicaRoots& roots() const { return roots_; }
  void Fail(const std::string& why) {
    std::fprintf(stderr, "fuzz_corpus: mirror seed %s: %s\n", name_.c_str(), why.c_str());
    std::exit(1);
  }

 private:
  void Connect(bool new_session) {
    auto roots = harness_.Connect(new_session);
    if (!roots.ok()) Fail(std::string(roots.status().message()));
    roots_ = roots->replica_roots();
  }
  std::string name_;
  MirrorHarness harness_;
  std::string input_;
  pb::ReplicaRoots roots_;
};

// The primary's VM: memory (patterned pages among the first 16, the rest zero: they travel as
// flags) and a disk image.
struct Vm {
  std::vector<uint8_t> memory = std::vector<uint8_t>(kFuzzReplicaMemoryBytes);
  std::string disk = std::string(kFuzzDiskBytes, '\0');
  uint64_t next_epoch = 0;

  Vm() {
    for (uint64_t gfn = 0; gfn < 16; gfn++) {
      if (gfn % 5 != 4) Dirty(gfn, static_cast<uint8_t>(gfn));
    }
    // Every eighth sector of the first three chunks (the rest travels as flags: a chunk fits a
    // record uncompressed).
    for (uint64_t i = 0; i < 3 * checkpoint::kDiskChunk; i++) {
      if (i / 512 % 8 == 0) disk[i] = static_cast<char>(1 + i % 11);
    }
  }
  void Dirty(uint64_t gfn, uint8_t seed) {
    for (uint64_t i = 0; i < 4096; i++) memory[gfn * 4096 + i] = static_cast<uint8_t>(seed + i % 7);
  }
  uint64_t PageHash(uint64_t gfn) const { return XXH3_64bits(memory.data() + gfn * 4096, 4096); }
  checkpoint::SyncChunk Chunk(uint64_t i) const {
    checkpoint::SyncChunk c;
    c.offset = i * checkpoint::kDiskChunk;
    c.data = disk.substr(c.offset, checkpoint::kDiskChunk);
    c.hash = XXH3_64bits(c.data.data(), c.data.size());
    return c;
  }
  checkpoint::ReplicaTrees Trees() const {
    std::vector<uint64_t> pages, chunks;
    for (uint64_t gfn = 0; gfn < kFuzzReplicaPages; gfn++) pages.push_back(PageHash(gfn));
    for (uint64_t i = 0; i < kFuzzDiskBytes / checkpoint::kDiskChunk; i++) {
      chunks.push_back(Chunk(i).hash);
    }
    return {checkpoint::HashTree(pages), checkpoint::HashTree(chunks)};
  }
  checkpoint::PageRun Pages(const std::vector<uint64_t>& gfns) const {
    checkpoint::PageRun run;
    for (uint64_t gfn : gfns) {
      run.gfns.push_back(gfn);
      run.hashes.push_back(PageHash(gfn));
      run.pages.insert(run.pages.end(), memory.begin() + static_cast<ptrdiff_t>(gfn * 4096),
                       memory.begin() + static_cast<ptrdiff_t>((gfn + 1) * 4096));
    }
    return run;
  }
  // A checkpoint of `gfns` (written first) and one disk write, as the epoch engine takes it.
  checkpoint::Checkpoint Take(bool full, const std::vector<uint64_t>& gfns, uint64_t sector,
                              uint64_t sync_digest = 0) {
    for (uint64_t gfn : gfns) Dirty(gfn, static_cast<uint8_t>(next_epoch * 13 + gfn));
    checkpoint::Checkpoint c;
    static_cast<checkpoint::PageRun&>(c) = Pages(gfns);
    c.epoch = next_epoch++;
    c.full = full;
    std::string data(512, static_cast<char>('a' + c.epoch % 26));
    disk.replace(sector * 512, 512, data);
    c.disk_writes.push_back({sector, data});
    c.state.set_format_version(vmm::kSnapshotFormatVersion);
    c.state.set_memory_bytes(kFuzzReplicaMemoryBytes);
    c.state.set_disk_bytes(kFuzzDiskBytes);
    c.state.add_vcpus();
    c.output_mark = c.epoch;
    c.digest = checkpoint::CheckpointDigest(c, sync_digest);
    return c;
  }
};

// Sends `c` and checks that the mirror commits it.
void Commit(Conversation& talk, const checkpoint::Checkpoint& c, pb::Compression compression,
            replicator::Dedup* dedup = nullptr) {
  std::vector<pb::Frame> replies;
  for (const pb::Frame& f : replicator::CheckpointFrames(c, compression, dedup)) {
    replies = talk.Send(f);
  }
  if (replies.size() != 1 || !replies[0].has_ack() || replies[0].ack().epoch() != c.epoch) {
    talk.Fail("checkpoint " + std::to_string(c.epoch) + " was not acknowledged");
  }
}

// A synchronisation as the primary runs it: the comparison of trees (queries the mirror answers),
// the pages the mirror holds as such, the other pages and the disk chunks, then the full
// checkpoint that commits it all. `stop_after` batches of pages: the connection drops there.
// With `dedup`, pages whose content the mirror received before travel as references.
void Synchronise(Conversation& talk, Vm& vm, pb::Compression compression,
                 size_t stop_after = SIZE_MAX, replicator::Dedup* dedup = nullptr) {
  checkpoint::ReplicaTrees own = vm.Trees();
  auto holdings = replicator::CompareTrees(
      own, talk.roots(), [&](const pb::TreeQuery& q) -> absl::StatusOr<pb::TreeAnswer> {
        pb::Frame f;
        *f.mutable_tree_query() = q;
        auto replies = talk.Send(f);
        if (replies.size() != 1 || !replies[0].has_tree_answer()) talk.Fail("no tree answer");
        return replies[0].tree_answer();
      });
  if (!holdings.ok()) talk.Fail(std::string(holdings.status().message()));
  pb::Frame done;
  done.mutable_tree_query()->set_done(true);
  talk.Send(done);
  checkpoint::SyncDigest digest;
  std::vector<bool> held(kFuzzReplicaPages);
  for (const pb::Frame& f : replicator::SamePagesFrames(own.pages, *holdings)) {
    for (int i = 0; i < f.same_pages().nodes_size(); i++) {
      uint64_t node = f.same_pages().nodes(i);
      digest.AddSamePages(f.same_pages().level(), node, f.same_pages().hashes(i));
      auto [first, end] = own.pages.Leaves(f.same_pages().level(), node);
      for (uint64_t gfn = first; gfn < end; gfn++) held[gfn] = true;
    }
    talk.Send(f);
  }
  std::vector<uint64_t> pending;
  for (uint64_t gfn = 0; gfn < kFuzzReplicaPages; gfn++) {
    if (!held[gfn]) pending.push_back(gfn);
  }
  checkpoint::PageRun run = vm.Pages(pending);
  // Batches of at most 8 pages with contents, so that each frame fits a record.
  for (size_t begin = 0, n = 0, batches = 0; begin < pending.size(); begin += n, batches++) {
    if (batches == stop_after) return;
    size_t contents = 0;
    for (n = 0; begin + n < pending.size() && n < replicator::kPagesPerBatch; n++) {
      const uint8_t* page = run.pages.data() + (begin + n) * 4096;
      if (std::any_of(page, page + 4096, [](uint8_t b) { return b != 0; }) && ++contents > 8) {
        break;
      }
    }
    talk.Send(replicator::PageBatchFrame(vm.next_epoch, true, run, begin, n, compression, dedup));
    for (size_t i = begin; i < begin + n; i++) digest.AddPage(run.gfns[i], run.hashes[i]);
  }
  for (uint64_t i = 0; i < kFuzzDiskBytes / checkpoint::kDiskChunk; i++) {
    checkpoint::SyncChunk chunk = vm.Chunk(i);
    talk.Send(replicator::SyncDiskFrame(chunk, &holdings->chunks, compression));
    digest.AddDisk(chunk.offset, chunk.data.size(), chunk.hash);
  }
  // Pages written while the pre-copy ran travel in the full checkpoint.
  Commit(talk, vm.Take(true, {2, 40}, 3, digest.value()), compression, dedup);
}

void Incremental(Conversation& talk, Vm& vm, pb::Compression compression) {
  Commit(talk, vm.Take(false, {1, 9, 63}, 130 + vm.next_epoch), compression);
}

void HandOver(Conversation& talk, uint64_t epoch, bool resumes) {
  pb::Frame f;
  f.mutable_handover()->set_epoch(epoch);
  auto replies = talk.Send(f);
  if (replies.size() != 1 || !replies[0].has_handover_reply() ||
      replies[0].handover_reply().resumed() != resumes) {
    talk.Fail("unexpected answer to the hand-over");
  }
}

void Mirror() {
  {
    // Pages of equal content travel once, then as references the mirror resolves from what it
    // received: in the pre-copy, and in a checkpoint that copies a page it holds.
    Conversation talk("dedup", kNoHandovers, false);
    Vm vm;
    for (uint64_t gfn : {20, 21, 33}) vm.Dirty(gfn, 3);  // page 3's content
    replicator::Dedup dedup(kFuzzReplicaPages);
    Synchronise(talk, vm, pb::COMPRESSION_NONE, SIZE_MAX, &dedup);
    vm.Dirty(50, 6);  // page 6's content
    checkpoint::Checkpoint c = vm.Take(false, {}, 140);
    static_cast<checkpoint::PageRun&>(c) = vm.Pages({50});
    c.digest = checkpoint::CheckpointDigest(c);
    Commit(talk, c, pb::LZ4, &dedup);
    if (dedup.deduplicated < 4) talk.Fail("expected pages sent as references");
  }
  {
    Conversation talk("full_sync", kNoHandovers, false);
    Vm vm;
    Synchronise(talk, vm, pb::COMPRESSION_NONE);
  }
  {
    Conversation talk("incremental", kNoHandovers, true);
    Vm vm;
    Synchronise(talk, vm, pb::LZ4);
    Incremental(talk, vm, pb::LZ4);
    Incremental(talk, vm, pb::COMPRESSION_NONE);
  }
  {
    Conversation talk("handover", kHandoverResumes, true);
    Vm vm;
    Synchronise(talk, vm, pb::LZ4);
    Incremental(talk, vm, pb::LZ4);
    HandOver(talk, vm.next_epoch - 1, true);
  }
  {
    // The host cannot resume the VM: the primary carries on.
    Conversation talk("handover_refused", kHandoverFails, true);
    Vm vm;
    Synchronise(talk, vm, pb::LZ4);
    HandOver(talk, vm.next_epoch - 1, false);
    Incremental(talk, vm, pb::LZ4);
  }
  {
    // The link fails halfway through the pre-copy; the same primary reconnects and claims what
    // the mirror kept instead of sending it again.
    Conversation talk("resume_kept", kNoHandovers, true);
    Vm vm;
    Synchronise(talk, vm, pb::LZ4, 1);
    talk.Reconnect(false);
    if (talk.roots().empty()) talk.Fail("nothing kept after the drop");
    Synchronise(talk, vm, pb::LZ4);
    Incremental(talk, vm, pb::LZ4);
  }
  {
    // A restarted primary (a new session, epochs numbered afresh) whose VM moved on: only what
    // differs travels.
    Conversation talk("new_session", kNoHandovers, true);
    Vm vm;
    Synchronise(talk, vm, pb::LZ4);
    Incremental(talk, vm, pb::LZ4);
    talk.Reconnect(true);
    vm.next_epoch = 0;
    vm.Dirty(20, 99);
    vm.disk[2 * checkpoint::kDiskChunk] = 'x';
    Synchronise(talk, vm, pb::LZ4);
    Incremental(talk, vm, pb::LZ4);
  }
}

}  // namespace
}  // namespace romulus::fuzz

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: fuzz_corpus DIR\n");
    return 2;
  }
  romulus::fuzz::g_dir = argv[1];
  romulus::fuzz::Datagrams();
  romulus::fuzz::Configs();
  romulus::fuzz::Ledger();
  romulus::fuzz::Control();
  romulus::fuzz::Replication();
  romulus::fuzz::Mirror();
  return 0;
}
