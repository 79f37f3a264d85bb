"""The restart onto huge pages that the experiments do first thing."""

import os
import subprocess
import sys

import pytest

from capsjax import runtime
from tests.conftest import REPO

# Prints what it runs with, restarts, and shows how much of a large, touched
# malloc block (as XLA's buffers are) the kernel backed with huge pages. Not a
# NumPy array: NumPy asks for huge pages for its own large arrays.
SCRIPT = r'''
import ctypes, os, sys
from capsjax import runtime
print('RUN', os.environ.get('GLIBC_TUNABLES'), sys.argv[1:], flush=True)
runtime.restart_with_huge_pages()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
size = 256 * 2 ** 20
block = libc.malloc(size)
ctypes.memset(block, 1, size)
with open('/proc/self/smaps_rollup') as f:
  kib = [int(line.split()[1]) for line in f if line.startswith('AnonHugePages:')][0]
print('HUGE_KIB', kib)
'''

needs_huge_pages = pytest.mark.skipif(not runtime.huge_pages_available(),
                                      reason='no glibc or transparent huge pages here')


def run(env_tunables):
  env = {k: v for k, v in os.environ.items() if k != runtime.TUNABLES_ENV}
  if env_tunables is not None:
    env[runtime.TUNABLES_ENV] = env_tunables
  proc = subprocess.run([sys.executable, '-c', SCRIPT, 'first', '--second=2'], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  runs = [line for line in lines if line.startswith('RUN')]
  huge_kib = int(lines[-1].split()[1])
  return runs, huge_kib


@needs_huge_pages
def test_restarts_once_with_huge_pages_and_the_same_arguments():
  runs, huge_kib = run(None)
  assert runs == ["RUN None ['first', '--second=2']",
                  "RUN glibc.malloc.hugetlb=1 ['first', '--second=2']"]
  assert huge_kib >= 128 * 1024  # most of the 256 MiB block sits on huge pages


@needs_huge_pages
def test_keeps_the_users_tunables_and_respects_an_opt_out():
  runs, _ = run('glibc.malloc.arena_max=2')
  assert runs[-1] == "RUN glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1 ['first', '--second=2']"
  runs, huge_kib = run('glibc.malloc.hugetlb=0')
  assert runs == ["RUN glibc.malloc.hugetlb=0 ['first', '--second=2']"]
  with open(runtime.THP_SETTING) as f:
    if '[madvise]' in f.read():  # huge pages only where malloc asks: here it did not
      assert huge_kib < 128 * 1024


def test_huge_pages_unavailable_when_the_kernel_says_never(tmp_path):
  setting = tmp_path / 'enabled'
  setting.write_text('always madvise [never]\n')
  assert not runtime.huge_pages_available(str(setting))
  assert not runtime.huge_pages_available(str(tmp_path / 'missing'))
  setting.write_text('always [madvise] never\n')
  linux_glibc = sys.platform.startswith('linux') and runtime.platform.libc_ver()[0] == 'glibc'
  assert runtime.huge_pages_available(str(setting)) == linux_glibc
