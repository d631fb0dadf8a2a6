// The contract between the reference guest and the monitor: guest-physical layout, I/O ports and
// the fixed-layout structures both sides read and write. Plain C so that the freestanding guest
// and the C++ monitor include the same file.
#ifndef ROMULUS_GUEST_ABI_H_
#define ROMULUS_GUEST_ABI_H_

#include <stdint.h>

#define RML_ABI_VERSION 2u
#define RML_PAGE_SIZE 4096u
#define RML_SECTOR_SIZE 512u

// Guest-physical layout. Below RML_GUEST_LOW lie only structures the monitor builds for the CPU
// on KVM (page tables identity-mapping all of guest RAM with 2 MiB user pages, GDT, TSS); guest
// code never touches them. Everything the guest program uses lies at or above RML_GUEST_LOW,
// which is vm.mmap_min_addr on a stock Debian: the process platform maps guest RAM into its stub
// process at the guest-physical addresses, and only from there up. (ABI 1 kept the boot page,
// console and block buffers below it.)
#define RML_PML4_GPA 0x1000u
#define RML_PDPT_GPA 0x2000u
#define RML_PD_GPA 0x3000u  // four page directories: up to 4 GiB
#define RML_GDT_GPA 0x7000u
#define RML_TSS_GPA 0x8000u  // TSS with an I/O permission bitmap for the ports below
#define RML_GUEST_LOW 0x10000u
#define RML_BOOT_GPA 0x10000u     // struct rml_boot: knobs from the monitor, status from the guest
#define RML_CONSOLE_GPA 0x11000u  // console bytes, length given to RML_PORT_CONSOLE
#define RML_BLOCK_CMD_GPA 0x12000u
#define RML_BLOCK_BUF_GPA 0x14000u
#define RML_BLOCK_BUF_BYTES 0x4000u  // 32 sectors per command
#define RML_REQ_RING_GPA 0x20000u
#define RML_RESP_RING_GPA 0x30000u
#define RML_STACK_TOP 0x100000u
#define RML_IMAGE_GPA 0x100000u
#define RML_IMAGE_LIMIT 0x400000u  // image + bss must end below this address
#define RML_WORKLOAD_GPA 0x400000u

// Port I/O: every port takes a 32-bit `out`, so each spans four port numbers (the TSS I/O
// permission bitmap is checked for all four).
#define RML_PORT_CONSOLE 0x500u  // value: number of bytes at RML_CONSOLE_GPA
#define RML_PORT_RESP 0x504u     // new responses are in the response ring
#define RML_PORT_BLOCK 0x508u    // execute the command at RML_BLOCK_CMD_GPA
#define RML_PORT_IDLE 0x50Cu     // nothing to do: wait up to value us (0: until a request)
#define RML_PORT_PANIC 0x510u    // the guest found a fatal inconsistency; value: code
#define RML_PORT_FIRST RML_PORT_CONSOLE
#define RML_PORT_END (RML_PORT_PANIC + 4u)

#define RML_IMAGE_MAGIC 0x31545347534c4d52ull  // "RMLSGST1"
struct rml_image_header {
  uint64_t magic;
  uint32_t abi_version;
  uint32_t header_bytes;
  uint64_t entry;      // guest-virtual (= physical) address of _start
  uint64_t image_end;  // end of bss: everything below must fit under RML_IMAGE_LIMIT
};

enum rml_pattern { RML_PATTERN_SEQUENTIAL = 0, RML_PATTERN_UNIFORM = 1, RML_PATTERN_HOTCOLD = 2 };

// Written by the guest, read by the monitor when the vCPU is paused.
struct rml_status {
  uint64_t initialized;      // 1 once the guest has formatted its journal
  uint64_t workload_pages;   // page writes done by the memory workload, ever
  uint64_t ledger_seq;       // sequence number of the last applied transaction
  uint64_t ledger_requests;  // requests answered (including duplicates)
  uint64_t journal_records;  // records on disk
  uint64_t accounts_open;
  uint64_t idle_exits;
  uint64_t reserved[9];
};

#define RML_BOOT_MAGIC 0x544f4f42534c4d52ull  // "RMLSBOOT"
struct rml_boot {
  uint64_t magic;
  uint32_t abi_version;
  uint32_t pattern;  // enum rml_pattern
  uint64_t memory_bytes;
  uint64_t tsc_khz;
  uint64_t ws_pages;     // working-set pages from RML_WORKLOAD_GPA; 0 turns the workload off
  uint64_t write_rate;   // page writes per second; 0: as fast as it can
  uint64_t write_limit;  // stop after this many page writes; 0: never
  uint64_t max_accounts;
  uint64_t journal_id;  // tags this boot's journal records; chosen by the monitor
  uint64_t disk_sectors;
  uint64_t seed;
  uint64_t progress_ms;  // console progress line interval; 0: none
  uint64_t reserved[4];
  struct rml_status status;
};

// Single-producer single-consumer rings of 64-byte slots. The request ring is produced by the
// monitor and consumed by the guest; the response ring the other way round. Indices run freely
// and are taken modulo RML_RING_SLOTS.
#define RML_RING_SLOTS 512u
struct rml_ring_header {
  uint32_t head;  // written by the producer only
  uint32_t pad0[15];
  uint32_t tail;  // written by the consumer only
  uint32_t pad1[15];
};

enum rml_op { RML_OP_OPEN = 1, RML_OP_DEPOSIT = 2, RML_OP_TRANSFER = 3, RML_OP_READ = 4 };
enum rml_status_code {
  RML_OK = 0,
  RML_ERR_UNKNOWN_OP = 1,
  RML_ERR_NO_ACCOUNT = 2,
  RML_ERR_INSUFFICIENT_FUNDS = 3,
  RML_ERR_STALE_REQUEST = 4,  // an id older than the client's last one: never applied
  RML_ERR_LEDGER_FULL = 5,
  RML_ERR_SESSIONS_FULL = 6,
  RML_ERR_JOURNAL_FULL = 7,
  RML_ERR_BAD_AMOUNT = 8,
  RML_ERR_BAD_CLIENT = 9,
  // Never from the guest: `romulus proxy` answers these itself (with an error text).
  RML_ERR_UNAVAILABLE = 10,  // no primary answered within the proxy's hold bound
  RML_ERR_MALFORMED = 11,    // the proxy could not read the client's frame; it then closes
};

struct rml_request {
  uint64_t tag;  // chosen by the monitor, echoed in the response
  uint64_t client_id;
  uint64_t request_id;
  uint32_t op;
  uint32_t account;
  uint32_t to_account;
  uint32_t pad;
  int64_t amount;
  uint64_t reserved[2];
};

struct rml_response {
  uint64_t tag;
  uint64_t client_id;
  uint64_t request_id;
  uint32_t status;
  uint32_t account;
  int64_t balance;
  int64_t to_balance;
  uint64_t seq;
  uint64_t reserved;
};

#define RML_RING_BYTES (sizeof(struct rml_ring_header) + RML_RING_SLOTS * 64u)

enum rml_block_op { RML_BLOCK_READ = 1, RML_BLOCK_WRITE = 2 };
struct rml_block_cmd {
  uint32_t op;
  uint32_t sectors;
  uint64_t sector;
  int32_t status;  // 0 ok, negative: error
  uint32_t pad;
};

// The ledger journal: sector 0 holds the header, records follow from sector 1, eight a sector.
#define RML_JOURNAL_MAGIC 0x4c4e524au         // "JRNL"
#define RML_JOURNAL_RECORD_MAGIC 0x44434552u  // "RECD"
struct rml_journal_header {
  uint32_t magic;
  uint32_t record_bytes;
  uint64_t journal_id;
};
struct rml_journal_record {
  uint32_t magic;
  uint16_t op;
  uint16_t pad;
  uint64_t seq;
  uint64_t client_id;
  uint64_t request_id;
  uint32_t account;
  uint32_t to_account;
  int64_t amount;
  uint64_t journal_id;
  uint32_t pad2;
  uint32_t checksum;  // FNV-1a over the 60 bytes before it
};

static inline uint32_t rml_fnv1a(const void* data, uint32_t len) {
  const unsigned char* p = (const unsigned char*)data;
  uint32_t h = 2166136261u;
  for (uint32_t i = 0; i < len; i++) h = (h ^ p[i]) * 16777619u;
  return h;
}

#define RML_MAX_ACCOUNTS 65536u
#define RML_MAX_SESSIONS 16384u
#define RML_MAX_AMOUNT 1000000000000ll

#ifdef __cplusplus
static_assert(sizeof(rml_request) == 64);
static_assert(sizeof(rml_response) == 64);
static_assert(sizeof(rml_journal_record) == 64);
static_assert(sizeof(rml_ring_header) == 128);
static_assert(sizeof(rml_boot) <= RML_PAGE_SIZE);
#endif

#endif  // ROMULUS_GUEST_ABI_H_
