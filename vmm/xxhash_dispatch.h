// XXH3, the hash of every page, chunk, tree node and checkpoint, through libxxhash's runtime
// dispatch on x86-64: the AVX2 (or AVX-512) code where the CPU has it, twice the speed of the
// library's default SSE2 build on 4 KiB pages here, with the same values everywhere.
#ifndef ROMULUS_VMM_XXHASH_DISPATCH_H_
#define ROMULUS_VMM_XXHASH_DISPATCH_H_

#if defined(__x86_64__)
#include <xxh_x86dispatch.h>
#else
#include <xxhash.h>
#endif

#endif  // ROMULUS_VMM_XXHASH_DISPATCH_H_
