#include "switchover/authority.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "switchover/datagram.h"

namespace romulus::switchover {
namespace {

using std::chrono::milliseconds;

uint32_t Ms(TermTable::Clock::duration d) {
  return static_cast<uint32_t>(std::chrono::duration_cast<milliseconds>(d).count());
}

}  // namespace

TermTable::TermTable(milliseconds lease, size_t max_vms, Records records, PersistFn persist,
                     Clock::time_point started)
    : lease_(lease),
      max_vms_(max_vms),
      records_(std::move(records)),
      persist_(std::move(persist)),
      started_(started) {}

bool TermTable::HolderReleasesOnlyAcknowledged(const std::string& vm, uint64_t term) const {
  auto it = releases_.find(vm);
  return it != releases_.end() && it->second.first == term && it->second.second;
}

bool TermTable::Live(const std::string& vm, Clock::time_point now) const {
  auto e = expiry_.find(vm);
  return e != expiry_.end() && now < e->second;
}

absl::Status TermTable::Commit(const std::string& vm, const Record& next) {
  auto it = records_.find(vm);
  if (it != records_.end() && it->second == next) return absl::OkStatus();
  if (persist_) {
    Records proposed = records_;
    proposed[vm] = next;
    if (auto s = persist_(proposed); !s.ok()) return s;
  }
  records_[vm] = next;
  return absl::OkStatus();
}

pb::LeaseReply TermTable::Decide(const pb::LeaseRequest& r, Clock::time_point now,
                                 std::string* log) {
  if (r.op() == pb::LEASE_ACQUIRE) return Acquire(r, now, log);
  pb::LeaseReply out;
  const std::string& vm = r.vm_id();
  auto it = records_.find(vm);
  bool any_live = it != records_.end() && Live(vm, now);
  bool live = any_live && it->second.holder == r.node();
  if (it != records_.end()) out.set_term(it->second.term);
  if (any_live) {
    out.set_holder(it->second.holder);
    out.set_ttl_ms(Ms(expiry_[vm] - now));
  }
  switch (r.op()) {
    case pb::LEASE_RELEASE:
      // The term stays this node's: it may take it again while no other node took a newer one.
      if (live) {
        expiry_.erase(vm);
        *log =
            absl::StrCat("lease of ", vm, " (term ", it->second.term, ") released by ", r.node());
        out.set_holder("");
        out.set_ttl_ms(0);
      }
      break;
    case pb::LEASE_TRANSFER: {
      if (!live || r.to_node().empty()) {
        out.set_reason(absl::StrCat(r.node(), " does not hold the lease"));
        break;
      }
      // A new term for the node the VM moves to; it ran once that node confirms it.
      Record next{
          .term = it->second.term + 1, .confirmed = it->second.confirmed, .holder = r.to_node()};
      if (auto s = Commit(vm, next); !s.ok()) {
        out.set_reason(absl::StrCat("witness cannot record the term: ", s.message()));
        break;
      }
      expiry_[vm] = now + lease_;
      *log = absl::StrCat("lease of ", vm, " handed from ", r.node(), " to ", r.to_node(),
                          " in term ", next.term);
      out.set_granted(true);
      out.set_holder(r.to_node());
      out.set_term(next.term);
      out.set_ttl_ms(Ms(lease_));
      break;
    }
    default:
      out.set_reason("unknown lease operation");
  }
  return out;
}

pb::LeaseReply TermTable::Acquire(const pb::LeaseRequest& r, Clock::time_point now,
                                  std::string* log) {
  pb::LeaseReply out;
  const std::string& vm = r.vm_id();
  auto it = records_.find(vm);
  if (it == records_.end() && records_.size() >= max_vms_) {
    out.set_reason("witness is tracking too many VMs");
    return out;
  }
  const Record current = it == records_.end() ? Record{} : it->second;
  bool live = !current.holder.empty() && Live(vm, now);
  out.set_term(current.term);
  out.set_holder(live ? current.holder : "");
  out.set_ttl_ms(live ? Ms(expiry_[vm] - now) : 0);
  uint64_t state = r.state_term();
  // The holder, given a new term when it began releasing without a mirror, whose reply with
  // it was lost: its VM, the newest, ran on from the term before.
  if (r.node() == current.holder && current.ran_from != 0 && state == current.ran_from &&
      current.confirmed == current.term) {
    state = current.term;
  }
  if (state > current.term) {
    out.set_reason(absl::StrCat("this node's state is of term ", state,
                                ", newer than any this witness granted (", current.term,
                                "): was the witness's state file lost or replaced? Not granting"));
    return out;
  }
  auto grant = [&](const Record& next) {
    if (auto s = Commit(vm, next); !s.ok()) {
      out.set_reason(absl::StrCat("witness cannot record the term: ", s.message()));
      return out;
    }
    if (next.term != current.term) {
      *log = absl::StrCat("term ", next.term, " of ", vm, " granted to ", r.node());
    } else if (!live) {
      *log = absl::StrCat("lease of ", vm, " (term ", next.term, ") granted to ", r.node());
    }
    expiry_[vm] = now + lease_;
    releases_[vm] = {next.term, r.releases_only_acknowledged()};
    out.set_granted(true);
    out.set_holder(r.node());
    out.set_term(next.term);
    out.set_confirmed(records_[vm].confirmed);
    out.set_ttl_ms(Ms(lease_));
    return out;
  };
  // The holder runs on in its own term (a renewal, a confirmation, a retake of its lapsed lease),
  // unless it releases without a mirror while a mirror may hold a replica of that term: from
  // then on the replica falls behind, so the holder gets a new term, and no replica of the old
  // one can be promoted (its host is superseded until a synchronisation brings it the new term).
  auto grant_holder = [&](Record next) {
    bool leaves_the_mirror_behind = !r.releases_only_acknowledged() &&
                                    next.confirmed == next.term && r.mirror_term() >= next.term;
    if (leaves_the_mirror_behind) {
      next = Record{.term = next.term + 1,
                    .confirmed = next.term + 1,
                    .holder = r.node(),
                    .ran_from = next.term};
    }
    grant(next);
    if (leaves_the_mirror_behind && out.granted()) {
      *log = absl::StrCat(*log, ": it releases without a mirror, whose replica of term ",
                          next.term - 1, " falls behind");
    }
    return out;
  };
  if (live && current.holder == r.node()) {
    // A renewal; or a request of the node a hand-over named, which confirms its term unless
    // tentative. It confirms it only from the state the hand-over gave it: a recipient's
    // requests carry the handed term once it took it tentatively, while a promotion that raced
    // the hand-over would resume an older replica in it.
    Record next = current;
    if (!r.tentative() && next.confirmed != next.term) {
      if (state < next.term) {
        out.set_reason(absl::StrCat("term ", next.term, " was handed to ", r.node(),
                                    " for a migration, not for its state of term ", state,
                                    ": not confirming it"));
        return out;
      }
      next.confirmed = next.term;
    }
    return grant_holder(next);
  }
  if (state < current.confirmed) {
    out.set_superseded(true);
    out.set_reason(absl::StrCat("superseded: this node's state is of term ", state,
                                ", and the VM ran in term ", current.confirmed, " since (",
                                current.holder, " holds term ", current.term, ")"));
    return out;
  }
  if (live && r.takeover() && state == current.term && current.confirmed == current.term &&
      HolderReleasesOnlyAcknowledged(vm, current.term)) {
    out =
        grant(Record{.term = current.term + 1, .confirmed = current.term + 1, .holder = r.node()});
    if (out.granted()) {
      *log = absl::StrCat(*log, ": a takeover, ", current.holder, "'s lease of term ", current.term,
                          " ended early (it releases only what ", r.node(), " acknowledged)");
    }
    return out;
  }
  if (live) {
    out.set_reason(absl::StrCat("lease held by ", current.holder, " (term ", current.term,
                                ") for another ", out.ttl_ms(), " ms"));
    return out;
  }
  if (now - started_ < lease_) {
    out.set_reason(absl::StrCat("witness started ", Ms(now - started_),
                                " ms ago; it grants leases one lease period after start"));
    return out;
  }
  // The lease is free. Its last holder takes its own term again, if no term came after it;
  // anyone else starts a new one.
  if (current.holder == r.node() && state == current.term && current.term != 0) {
    Record next = current;
    next.confirmed = next.term;
    return grant_holder(next);
  }
  return grant(Record{.term = current.term + 1, .confirmed = current.term + 1, .holder = r.node()});
}

std::vector<TermTable::Holder> TermTable::holders(Clock::time_point now) const {
  std::vector<Holder> out;
  for (const auto& [vm, expiry] : expiry_) {
    auto it = records_.find(vm);
    if (now >= expiry || it == records_.end()) continue;
    out.push_back({vm, it->second.holder, it->second.term,
                   std::chrono::duration_cast<milliseconds>(expiry - now)});
  }
  return out;
}

LeaseState::Event LeaseState::OnReply(const pb::LeaseReply& r, pb::LeaseOp op, bool unprotected,
                                      bool wants, Clock::time_point sent_at,
                                      Clock::time_point now) {
  Event ev;
  if (r.superseded()) {
    Drop(now);
    ev.superseded = true;
    return ev;
  }
  if (!r.granted() || op != pb::LEASE_ACQUIRE || !wants) return ev;
  if (r.term() < term_) return ev;  // not believed: terms only grow
  // Counted from the send, less 1 % and 1 ms for the two clocks' drift.
  milliseconds ttl(r.ttl_ms());
  auto until = sent_at + ttl - ttl / 100 - milliseconds(1);
  if (r.term() != term_) {
    held_until_ = now;  // a lease of the old term counts no longer
    term_ = r.term();
  }
  if (until <= now) return ev;
  if (unprotected && r.request_id() >= unprotected_id_) {
    unprotected_term_ = term_;
    unprotected_id_ = r.request_id();
  }
  ev.gained = !Held(now);
  if (ev.gained) held_since_ = now;
  held_until_ = std::max(held_until_, until);
  return ev;
}

uint64_t ReadTermFile(const std::string& disk_path) {
  std::string path = disk_path + ".term";
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return 0;
  char buf[32];
  ssize_t n = ::read(fd, buf, sizeof(buf) - 1);
  ::close(fd);
  if (n <= 0) return 0;
  absl::string_view text = absl::StripAsciiWhitespace(absl::string_view(buf, n));
  uint64_t term = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), term);
  return ec == std::errc() && end == text.data() + text.size() ? term : 0;
}

absl::Status WriteFileDurably(const std::string& path, const std::string& bytes) {
  std::string tmp = absl::StrCat(path, ".tmp-", ::getpid());
  auto fail = [&](absl::string_view what) {
    absl::Status s =
        absl::UnavailableError(absl::StrCat(what, " ", tmp, ": ", std::strerror(errno)));
    ::unlink(tmp.c_str());
    return s;
  };
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return fail("create");
  size_t done = 0;
  while (done < bytes.size()) {
    ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      if (n == 0) errno = EIO;
      ::close(fd);
      return fail("write");
    }
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0) {
    ::close(fd);
    return fail("fsync");
  }
  ::close(fd);
  if (::rename(tmp.c_str(), path.c_str()) != 0) return fail("rename into place");
  // The rename itself is durable once the directory is.
  std::string dir = path.substr(0, path.rfind('/') == std::string::npos ? 0 : path.rfind('/'));
  int dfd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
  return absl::OkStatus();
}

absl::Status WriteTermFile(const std::string& disk_path, uint64_t term) {
  return WriteFileDurably(disk_path + ".term", absl::StrCat(term, "\n"));
}

}  // namespace romulus::switchover
