"""glibc's allocator, tuned so that XLA:CPU's per-step buffers are reused.

Profiled on the 2-core AMD EPYC machine (perf, one recipe stage-3 step on
one core): ~30 % of the time was in the kernel, faulting in and zeroing
pages. XLA:CPU allocates each step's temporaries afresh; glibc serves the
large ones with mmap and hands them back with munmap (or trims its heap)
when they are freed, so the next step faults the same pages in again.
Keeping freed memory in the process (a fixed mmap threshold at its maximum,
trimming only past 2 GiB, a padded heap) cut page faults by a third and
the step by 10-12 % on one core (medians of 6 steps: 4.50 -> 3.99 and
4.04 s with similar settings through glibc's MALLOC_* environment variables,
3.73 -> 3.28 s with this call), ~6 % on two (within the spread of
2-thread runs; docs/performance.md). The cost: the process keeps its peak
heap instead of returning it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

# glibc's largest mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX):
# blocks below it come from the heap and are reused; larger ones are mmapped.
MMAP_THRESHOLD = 32 * 1024 * 1024
# Give the heap's top back to the kernel only past 2 GiB free (mallopt
# takes an int: its largest value).
TRIM_THRESHOLD = 2 ** 31 - 1
# Grow the heap 256 MiB at a time: fewer brk calls and page-table updates.
TOP_PAD = 256 * 1024 * 1024


def keep_freed_memory() -> bool:
  """Tunes glibc's malloc as above; False (and nothing changed) where the C
  library is not glibc (macOS, musl)."""
  name = ctypes.util.find_library('c')
  try:
    libc = ctypes.CDLL(name)
    mallopt = libc.mallopt
  except (OSError, AttributeError, TypeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  settings = ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
              (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
              (_M_TOP_PAD, TOP_PAD))
  ok = all(mallopt(param, value) == 1 for param, value in settings)
  if not ok:
    logging.warning('glibc mallopt refused a setting; allocator left as is')
  return ok
