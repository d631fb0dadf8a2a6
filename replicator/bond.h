// Parallel paths: one logical connection over several Channels (one TCP connection per path,
// each with its own handshake and keys), so that what runs above it (the sessions, the assembler,
// the digests) still sees one ordered frame stream.
//
// Each frame of the stream carries a sequence number; the sender hands it to the live path with
// the fewest bytes waiting, and keeps it until the receiver confirms it (`acked`, cumulative,
// on data frames and on small ack frames at least every kAckInterval). The receiver puts frames
// back in order. When a path fails, what was sent on it and not confirmed is sent again on the
// others, marked `resent` (the receiver drops a copy it already has, and the original of one that
// overtook it); only when every path has failed does the bond fail, after handing on what had
// arrived in order. Memory is bounded on both sides: at most kWindowFrames frames and
// kWindowBytes (plus one frame) unconfirmed; the receiver refuses a frame beyond that window, one
// out of order on its path, and a repeated one while no resend has arrived. Keepalives are no part
// of the stream: each path carries its own. Send returns once a frame is queued (Flush waits for
// the queues to drain). A failed path does not rejoin: the next connection opens all paths
// again. Internal to the replicator.
#ifndef ROMULUS_REPLICATOR_BOND_H_
#define ROMULUS_REPLICATOR_BOND_H_

#include <chrono>
#include <memory>
#include <vector>

#include "replicator/channel.h"

namespace romulus::replicator {

inline constexpr size_t kWindowFrames = 64;
inline constexpr size_t kWindowBytes = 32u << 20;
inline constexpr std::chrono::milliseconds kAckInterval{5};

// `paths` (at least one, none null): the handshaken connections of one bond, by path index.
std::unique_ptr<Channel> MakeBond(std::vector<std::unique_ptr<Channel>> paths, LogFn log);

}  // namespace romulus::replicator

#endif  // ROMULUS_REPLICATOR_BOND_H_
