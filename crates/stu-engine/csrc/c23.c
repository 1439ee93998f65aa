/* The C23 `strto*` entry points (glibc 2.38+) for glibc 2.36 hosts (Debian 12).
 *
 * With the `cuda` feature, cubecl-llvm links LLVM statically. Built here, that LLVM is Debian
 * unstable's (`xtask/llvm.py`), compiled against a newer glibc: its JSON and inline-assembly
 * parsers call `__isoc23_strtol`, `__isoc23_strtoll` and `__isoc23_strtoull`, which Debian 12's
 * glibc lacks. They differ from the C11 functions only in reading "0b" prefixes when `base` is
 * 0 or 2, which those parsers do not rely on. On glibc 2.38+ this file is empty: libc has them.
 * Compiled as C11 without _GNU_SOURCE, so `strtol` here is not itself redirected to the C23
 * entry point. */
#include <stdlib.h>

#if defined(__GLIBC__) && !(__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 38))
long __isoc23_strtol(const char *s, char **end, int base) { return strtol(s, end, base); }
long long __isoc23_strtoll(const char *s, char **end, int base) { return strtoll(s, end, base); }
unsigned long long __isoc23_strtoull(const char *s, char **end, int base) { return strtoull(s, end, base); }
#endif
