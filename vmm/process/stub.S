// The process platform's stub: the only code of its own a stub process holds. It never runs on
// its own: the monitor (its tracer) points it at the gate to make one system call during set-up
// and gets it back at the int3; after set-up the guest runs in the same process and this code
// has nothing left to do (the seccomp filter admits no system call at all).
#include "stub_layout.h"
  .section .text, "ax"
  .globl _start
_start:
  int3
  .org RML_STUB_GATE - RML_STUB_BASE
gate:
  syscall
  int3
  .section .bss, "aw", @nobits
  .balign 4096
data:
  .skip 4096
  .section .note.GNU-stack, "", @progbits
