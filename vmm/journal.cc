#include "vmm/journal.h"

#include <fcntl.h>

#include <cstring>

#include "absl/strings/str_cat.h"
#include "guest/abi.h"
#include "vmm/sys.h"

namespace romulus::vmm {

absl::StatusOr<JournalReplay> ReplayJournal(const std::string& disk_path) {
  Fd fd(::open(disk_path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) return ErrnoStatus(absl::StrCat("open ", disk_path));
  rml_journal_header h{};
  if (::pread(fd.get(), &h, sizeof(h), 0) != sizeof(h) || h.magic != RML_JOURNAL_MAGIC ||
      h.record_bytes != sizeof(rml_journal_record)) {
    return absl::NotFoundError(absl::StrCat(disk_path, " holds no ledger journal"));
  }
  JournalReplay out;
  out.journal_id = h.journal_id;
  std::vector<rml_journal_record> chunk(8192);
  uint64_t offset = RML_SECTOR_SIZE;
  for (;;) {
    ssize_t n = ::pread(fd.get(), chunk.data(), chunk.size() * sizeof(rml_journal_record),
                        static_cast<off_t>(offset));
    if (n <= 0) return out;
    size_t count = static_cast<size_t>(n) / sizeof(rml_journal_record);
    for (size_t i = 0; i < count; i++) {
      const rml_journal_record& r = chunk[i];
      if (r.magic != RML_JOURNAL_RECORD_MAGIC || r.journal_id != h.journal_id ||
          r.checksum != rml_fnv1a(&r, 60) || r.seq != out.last_seq + 1) {
        return out;
      }
      switch (r.op) {
        case RML_OP_OPEN:
          if (r.account != out.balances.size()) return out;
          out.balances.push_back(0);
          break;
        case RML_OP_DEPOSIT:
          if (r.account >= out.balances.size()) return out;
          out.balances[r.account] += r.amount;
          break;
        case RML_OP_TRANSFER:
          if (r.account >= out.balances.size() || r.to_account >= out.balances.size()) return out;
          out.balances[r.account] -= r.amount;
          out.balances[r.to_account] += r.amount;
          break;
        default:
          return out;
      }
      out.records++;
      out.last_seq = r.seq;
    }
    offset += count * sizeof(rml_journal_record);
  }
}

}  // namespace romulus::vmm
