"""Process set-up that makes XLA on the CPU fast: glibc's malloc on transparent huge pages.

XLA's CPU runtime allocates a training step's buffers (about 0.5 GB for the
paper's model at batch 64) afresh on every call, and on 4 KiB pages the step
pays for page faults and TLB misses on all of them. With glibc's malloc asking
for transparent huge pages the step ran 1.2x faster (BENCHMARKS.md). glibc
reads that setting only when a process starts, so an entry point restarts
itself once with it. Linux with glibc only; elsewhere, or when the kernel has
huge pages off, nothing happens.
"""

import os
import platform
import sys

TUNABLES_ENV = 'GLIBC_TUNABLES'
HUGE_PAGES_TUNABLE = 'glibc.malloc.hugetlb'
THP_SETTING = '/sys/kernel/mm/transparent_hugepage/enabled'


def huge_pages_available(thp_setting=THP_SETTING):
  """Whether this is Linux with glibc and the kernel grants huge pages on request."""
  if not sys.platform.startswith('linux') or platform.libc_ver()[0] != 'glibc':
    return False
  try:
    with open(thp_setting) as f:
      return '[never]' not in f.read()
  except OSError:
    return False


def restart_with_huge_pages():
  """Re-execute this Python process with GLIBC_TUNABLES=glibc.malloc.hugetlb=1, once.

  Call it first thing in an entry point's main: the process is replaced by a
  fresh one with the same interpreter and command line (`sys.orig_argv`) whose
  malloc uses transparent huge pages. It returns without restarting when huge
  pages are unavailable or GLIBC_TUNABLES already names glibc.malloc.hugetlb,
  so `GLIBC_TUNABLES=glibc.malloc.hugetlb=0` opts out.

  Returns:
    False when it did not restart (when it does, it does not return).
  """
  tunables = os.environ.get(TUNABLES_ENV, '')
  if HUGE_PAGES_TUNABLE in tunables or not huge_pages_available():
    return False
  setting = f'{HUGE_PAGES_TUNABLE}=1'
  env = dict(os.environ, **{TUNABLES_ENV: f'{tunables}:{setting}' if tunables else setting})
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
