/* Where the process platform's stub lies in its own address space; included by the stub's
 * assembly and linker script (through the C preprocessor) and by the monitor. The stub is two
 * pages far above any guest RAM (at most 4 GiB): code, then data for system-call arguments. */
#ifndef ROMULUS_VMM_PROCESS_STUB_LAYOUT_H_
#define ROMULUS_VMM_PROCESS_STUB_LAYOUT_H_

#define RML_STUB_BASE 0x10000000000
#define RML_STUB_GATE (RML_STUB_BASE + 0x10) /* syscall; int3 */
#define RML_STUB_DATA (RML_STUB_BASE + 0x1000)
#define RML_STUB_END (RML_STUB_BASE + 0x2000)

#endif /* ROMULUS_VMM_PROCESS_STUB_LAYOUT_H_ */
