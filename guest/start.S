// Entry point of the reference guest. The monitor starts it at CPL 3 with the stack set up.
  .section .text.start, "ax"
  .global _start
_start:
  mov $0x100000, %rsp
  call guest_main
  // guest_main never returns; if it did, report it and stay stopped.
1:
  mov $0x510, %dx  // RML_PORT_PANIC
  mov $2, %eax
  out %eax, %dx
  jmp 1b
  .section .note.GNU-stack, "", @progbits
