// The reference guest: a freestanding program that runs at CPL 3 under the Romulus monitor. It
// dirties memory at a configured rate and serves the ledger (accounts, exactly-once requests, a
// journal on its block device). It reaches devices only through the rings and ports of abi.h.
#include "abi.h"

#define BOOT ((volatile struct rml_boot*)RML_BOOT_GPA)
#define REQ_RING ((volatile struct rml_ring_header*)RML_REQ_RING_GPA)
#define RESP_RING ((volatile struct rml_ring_header*)RML_RESP_RING_GPA)
#define BLOCK_CMD ((volatile struct rml_block_cmd*)RML_BLOCK_CMD_GPA)
#define BLOCK_BUF ((unsigned char*)RML_BLOCK_BUF_GPA)
#define CONSOLE ((char*)RML_CONSOLE_GPA)

extern char _start[], __image_end[];
__attribute__((section(".rml_header"), used)) const struct rml_image_header rml_header = {
    RML_IMAGE_MAGIC, RML_ABI_VERSION, sizeof(struct rml_image_header), (uint64_t)_start,
    (uint64_t)__image_end};

// The compiler may emit calls to these for struct copies and zeroing.
void* memcpy(void* d, const void* s, unsigned long n) {
  unsigned char* dp = d;
  const unsigned char* sp = s;
  while (n--) *dp++ = *sp++;
  return d;
}
void* memset(void* d, int c, unsigned long n) {
  unsigned char* dp = d;
  while (n--) *dp++ = (unsigned char)c;
  return d;
}

static inline void out32(uint16_t port, uint32_t v) {
  __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port) : "memory");
}
static inline uint64_t rdtsc(void) {
  uint32_t lo, hi;
  __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
  return ((uint64_t)hi << 32) | lo;
}
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }

static void panic(uint32_t code) {
  for (;;) out32(RML_PORT_PANIC, code);
}

// ---- console -------------------------------------------------------------------------------
static uint32_t con_len;
static void con_str(const char* s) {
  while (*s && con_len < RML_PAGE_SIZE) CONSOLE[con_len++] = *s++;
}
static void con_u64(uint64_t v) {
  char tmp[24];
  int n = 0;
  do {
    tmp[n++] = (char)('0' + v % 10);
    v /= 10;
  } while (v);
  while (n && con_len < RML_PAGE_SIZE) CONSOLE[con_len++] = tmp[--n];
}
static void con_flush(void) {
  out32(RML_PORT_CONSOLE, con_len);
  con_len = 0;
}

// ---- block device --------------------------------------------------------------------------
static void block_io(uint32_t op, uint64_t sector, uint32_t sectors) {
  BLOCK_CMD->op = op;
  BLOCK_CMD->sector = sector;
  BLOCK_CMD->sectors = sectors;
  BLOCK_CMD->status = 1;
  out32(RML_PORT_BLOCK, 0);
  if (BLOCK_CMD->status != 0) panic(0x100 + (uint32_t)(-BLOCK_CMD->status & 0xff));
}

// ---- journal -------------------------------------------------------------------------------
static uint64_t journal_records;   // records on disk
static uint64_t journal_capacity;  // records the disk can hold
static struct rml_journal_record pending[RML_RING_SLOTS];
static uint32_t pending_count;
static unsigned char tail_sector[RML_SECTOR_SIZE];  // the partly filled last sector, if any

#define RECORDS_PER_SECTOR (RML_SECTOR_SIZE / sizeof(struct rml_journal_record))

static void journal_format(void) {
  memset(BLOCK_BUF, 0, RML_SECTOR_SIZE);
  struct rml_journal_header* h = (struct rml_journal_header*)BLOCK_BUF;
  h->magic = RML_JOURNAL_MAGIC;
  h->record_bytes = sizeof(struct rml_journal_record);
  h->journal_id = BOOT->journal_id;
  block_io(RML_BLOCK_WRITE, 0, 1);
  uint64_t sectors = BOOT->disk_sectors;
  journal_capacity = sectors > 1 ? (sectors - 1) * RECORDS_PER_SECTOR : 0;
}

// Writes the pending records after the existing ones, a few sectors per command.
static void journal_flush(void) {
  uint32_t done = 0;
  while (done < pending_count) {
    uint64_t first = journal_records;
    uint64_t sector = 1 + first / RECORDS_PER_SECTOR;
    uint32_t in_sector = (uint32_t)(first % RECORDS_PER_SECTOR);
    uint32_t room = RML_BLOCK_BUF_BYTES / sizeof(struct rml_journal_record) - in_sector;
    uint32_t n = pending_count - done < room ? pending_count - done : room;
    memcpy(BLOCK_BUF, tail_sector, RML_SECTOR_SIZE);
    memcpy(BLOCK_BUF + in_sector * sizeof(struct rml_journal_record), &pending[done],
           n * sizeof(struct rml_journal_record));
    uint32_t used = in_sector + n;
    uint32_t sectors = (uint32_t)((used + RECORDS_PER_SECTOR - 1) / RECORDS_PER_SECTOR);
    block_io(RML_BLOCK_WRITE, sector, sectors);
    if (used % RECORDS_PER_SECTOR)
      memcpy(tail_sector, BLOCK_BUF + (sectors - 1) * RML_SECTOR_SIZE, RML_SECTOR_SIZE);
    else
      memset(tail_sector, 0, RML_SECTOR_SIZE);
    journal_records += n;
    done += n;
  }
  pending_count = 0;
  BOOT->status.journal_records = journal_records;
}

// ---- ledger --------------------------------------------------------------------------------
struct session {
  uint64_t client_id;  // 0: free slot
  uint64_t last_request;
  struct rml_response last_response;
};
static int64_t balances[RML_MAX_ACCOUNTS];
static struct session sessions[RML_MAX_SESSIONS];
static uint64_t accounts_open;
static uint64_t ledger_seq;

static struct session* session_for(uint64_t client_id) {
  uint64_t h = client_id * 0x9E3779B97F4A7C15ull;
  for (uint32_t i = 0; i < RML_MAX_SESSIONS; i++) {
    struct session* s = &sessions[(h + i) % RML_MAX_SESSIONS];
    if (s->client_id == client_id) return s;
    if (s->client_id == 0) {
      s->client_id = client_id;
      return s;
    }
  }
  return 0;
}

static void journal_add(const struct rml_request* r) {
  struct rml_journal_record* j = &pending[pending_count++];
  memset(j, 0, sizeof(*j));
  j->magic = RML_JOURNAL_RECORD_MAGIC;
  j->op = (uint16_t)r->op;
  j->seq = ledger_seq;
  j->client_id = r->client_id;
  j->request_id = r->request_id;
  j->account = r->account;
  j->to_account = r->to_account;
  j->amount = r->amount;
  j->journal_id = BOOT->journal_id;
  j->checksum = rml_fnv1a(j, 60);
}

static uint32_t apply(const struct rml_request* r, struct rml_response* out) {
  uint64_t n = accounts_open;
  switch (r->op) {
    case RML_OP_OPEN:
      if (n >= BOOT->max_accounts || n >= RML_MAX_ACCOUNTS) return RML_ERR_LEDGER_FULL;
      out->account = (uint32_t)n;
      accounts_open = n + 1;
      balances[n] = 0;
      out->balance = 0;
      return RML_OK;
    case RML_OP_DEPOSIT:
      if (r->account >= n) return RML_ERR_NO_ACCOUNT;
      if (r->amount <= 0 || r->amount > RML_MAX_AMOUNT ||
          balances[r->account] > INT64_MAX - r->amount)
        return RML_ERR_BAD_AMOUNT;
      balances[r->account] += r->amount;
      out->balance = balances[r->account];
      return RML_OK;
    case RML_OP_TRANSFER:
      if (r->account >= n || r->to_account >= n || r->account == r->to_account)
        return RML_ERR_NO_ACCOUNT;
      if (r->amount <= 0 || r->amount > RML_MAX_AMOUNT ||
          balances[r->to_account] > INT64_MAX - r->amount)
        return RML_ERR_BAD_AMOUNT;
      if (balances[r->account] < r->amount) return RML_ERR_INSUFFICIENT_FUNDS;
      balances[r->account] -= r->amount;
      balances[r->to_account] += r->amount;
      out->balance = balances[r->account];
      out->to_balance = balances[r->to_account];
      return RML_OK;
    default:
      return RML_ERR_UNKNOWN_OP;
  }
}

// Answers one request exactly once: a repeated request id gets the stored response.
static void serve(const struct rml_request* r, struct rml_response* out) {
  memset(out, 0, sizeof(*out));
  out->tag = r->tag;
  out->client_id = r->client_id;
  out->request_id = r->request_id;
  out->account = r->account;
  if (r->client_id == 0) {
    out->status = RML_ERR_BAD_CLIENT;
    out->seq = ledger_seq;
    return;
  }
  struct session* s = session_for(r->client_id);
  if (!s) {
    out->status = RML_ERR_SESSIONS_FULL;
    out->seq = ledger_seq;
    return;
  }
  if (s->last_request != 0 && r->request_id == s->last_request) {
    *out = s->last_response;
    out->tag = r->tag;
    return;
  }
  if (r->request_id <= s->last_request) {
    out->status = RML_ERR_STALE_REQUEST;
    out->seq = ledger_seq;
    return;
  }
  if (r->op == RML_OP_READ) {
    if (r->account >= accounts_open) {
      out->status = RML_ERR_NO_ACCOUNT;
    } else {
      out->status = RML_OK;
      out->balance = balances[r->account];
    }
    out->seq = ledger_seq;
  } else if (r->op == RML_OP_OPEN || r->op == RML_OP_DEPOSIT || r->op == RML_OP_TRANSFER) {
    if (journal_records + pending_count >= journal_capacity) {
      out->status = RML_ERR_JOURNAL_FULL;
      out->seq = ledger_seq;
      return;  // not remembered: the client may retry once there is room
    }
    out->status = apply(r, out);
    if (out->status == RML_OK) {
      ledger_seq++;
      struct rml_request applied = *r;
      applied.account = out->account;  // OPEN assigns the account
      journal_add(&applied);
    }
    out->seq = ledger_seq;
  } else {
    out->status = RML_ERR_UNKNOWN_OP;
    out->seq = ledger_seq;
  }
  s->last_request = r->request_id;
  s->last_response = *out;
}

static struct rml_response answers[RML_RING_SLOTS];

// Serves every request in the ring: journal first, then responses, then one doorbell.
static int serve_requests(void) {
  volatile struct rml_request* slots =
      (volatile struct rml_request*)(RML_REQ_RING_GPA + sizeof(struct rml_ring_header));
  volatile struct rml_response* out =
      (volatile struct rml_response*)(RML_RESP_RING_GPA + sizeof(struct rml_ring_header));
  uint32_t tail = REQ_RING->tail;
  uint32_t head = REQ_RING->head;
  barrier();
  uint32_t n = head - tail;
  if (n == 0) return 0;
  if (n > RML_RING_SLOTS) panic(3);
  // Answers need room in the response ring; the monitor drains it at every doorbell.
  uint32_t resp_head = RESP_RING->head;
  uint32_t room = RML_RING_SLOTS - (resp_head - RESP_RING->tail);
  if (n > room) n = room;
  if (n == 0) {
    out32(RML_PORT_RESP, 0);
    return 1;
  }
  for (uint32_t i = 0; i < n; i++) {
    struct rml_request r;
    memcpy(&r, (const void*)&slots[(tail + i) % RML_RING_SLOTS], sizeof(r));
    serve(&r, &answers[i]);
  }
  BOOT->status.ledger_seq = ledger_seq;
  BOOT->status.accounts_open = accounts_open;
  if (pending_count) journal_flush();  // durable before any answer leaves
  for (uint32_t i = 0; i < n; i++)
    memcpy((void*)&out[(resp_head + i) % RML_RING_SLOTS], &answers[i], sizeof(answers[i]));
  barrier();
  RESP_RING->head = resp_head + n;
  REQ_RING->tail = tail + n;
  BOOT->status.ledger_requests += n;
  out32(RML_PORT_RESP, n);
  return 1;
}

// ---- memory workload -----------------------------------------------------------------------
static uint64_t rng_state;
static uint64_t next_random(void) {
  uint64_t x = rng_state;
  x ^= x << 13;
  x ^= x >> 7;
  x ^= x << 17;
  rng_state = x;
  return x;
}

static uint64_t seq_cursor;
static uint64_t pick_page(uint64_t ws) {
  switch (BOOT->pattern) {
    case RML_PATTERN_UNIFORM:
      return next_random() % ws;
    case RML_PATTERN_HOTCOLD: {
      // 90 % of writes go to the hottest 10 % of the working set.
      uint64_t hot = ws / 10 ? ws / 10 : 1;
      uint64_t r = next_random();
      return (r % 10) ? (r >> 8) % hot : (r >> 8) % ws;
    }
    default:
      return seq_cursor++ % ws;
  }
}

static void write_pages(uint64_t count) {
  uint64_t ws = BOOT->ws_pages;
  for (uint64_t i = 0; i < count; i++) {
    uint64_t page = pick_page(ws);
    uint64_t n = ++BOOT->status.workload_pages;
    volatile uint64_t* p = (volatile uint64_t*)(RML_WORKLOAD_GPA + page * RML_PAGE_SIZE);
    p[n % (RML_PAGE_SIZE / 8)] = n;
  }
}

// Pacing baseline: writes due = rate * time since `pace_start`. Under PVM the guest reads the
// host's TSC directly, so after a restore time jumps by however long the VM was stopped; the
// baseline is moved instead of catching up, so the workload never bursts.
static uint64_t pace_start, pace_pages;

// Returns microseconds until more work is due (0: there is work now; ~0: none ever).
static uint64_t workload_step(uint64_t now) {
  uint64_t ws = BOOT->ws_pages;
  uint64_t limit = BOOT->write_limit;
  uint64_t done = BOOT->status.workload_pages;
  if (ws == 0 || (limit && done >= limit)) return ~0ull;
  uint64_t chunk = 64;
  if (limit && limit - done < chunk) chunk = limit - done;
  uint64_t rate = BOOT->write_rate;
  if (rate == 0) {
    write_pages(chunk);
    return 0;
  }
  uint64_t khz = BOOT->tsc_khz ? BOOT->tsc_khz : 1000000;
  uint64_t per_us = khz / 1000 ? khz / 1000 : 1;
  if (now < pace_start || done < pace_pages) {
    pace_start = now;
    pace_pages = done;
  }
  uint64_t elapsed_us = (now - pace_start) / per_us;
  uint64_t due = pace_pages + elapsed_us * rate / 1000000;
  if (due > done + rate / 10 + chunk) {  // more than 100 ms behind: time jumped
    pace_start = now;
    pace_pages = done;
    due = done;
  }
  if (due > done) {
    write_pages(due - done < chunk ? due - done : chunk);
    return 0;
  }
  uint64_t wait = (done + 1 - pace_pages) * 1000000 / rate;
  return wait > elapsed_us ? wait - elapsed_us : 1;
}

// ---- main loop -----------------------------------------------------------------------------
static void progress(uint64_t seconds) {
  con_str("t=");
  con_u64(seconds);
  con_str("s workload_pages=");
  con_u64(BOOT->status.workload_pages);
  con_str(" ledger_seq=");
  con_u64(ledger_seq);
  con_str(" requests=");
  con_u64(BOOT->status.ledger_requests);
  con_str(" accounts=");
  con_u64(accounts_open);
  con_str("\n");
  con_flush();
}

void guest_main(void) {
  if (BOOT->magic != RML_BOOT_MAGIC || BOOT->abi_version != RML_ABI_VERSION) panic(1);
  rng_state = BOOT->seed | 1;
  journal_format();
  BOOT->status.initialized = 1;
  con_str("reference guest up: accounts<=");
  con_u64(BOOT->max_accounts);
  con_str(" working_set_pages=");
  con_u64(BOOT->ws_pages);
  con_str(" journal_records<=");
  con_u64(journal_capacity);
  con_str("\n");
  con_flush();

  uint64_t khz = BOOT->tsc_khz ? BOOT->tsc_khz : 1000000;
  uint64_t start = rdtsc();
  pace_start = start;
  pace_pages = BOOT->status.workload_pages;
  uint64_t next_progress = BOOT->progress_ms ? start + BOOT->progress_ms * khz : ~0ull;
  for (;;) {
    int busy = serve_requests();
    uint64_t now = rdtsc();
    uint64_t wait_us = workload_step(now);
    if (now >= next_progress) {
      progress((now - start) / (khz * 1000));
      next_progress += BOOT->progress_ms * khz;
      if (next_progress < now) next_progress = now + BOOT->progress_ms * khz;
    } else if (next_progress != ~0ull && next_progress - now > BOOT->progress_ms * khz) {
      next_progress = now + BOOT->progress_ms * khz;  // the TSC went backwards (restored elsewhere)
    }
    if (busy || wait_us == 0) continue;
    uint64_t progress_us = next_progress == ~0ull ? ~0ull : (next_progress - now) * 1000 / khz;
    if (progress_us < wait_us) wait_us = progress_us;
    if (wait_us == 0) continue;
    BOOT->status.idle_exits++;
    out32(RML_PORT_IDLE, wait_us > 1000000 ? 1000000 : (uint32_t)wait_us);
  }
}
