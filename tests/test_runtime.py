"""The restart onto huge pages that the experiments do first thing."""

import os
import subprocess
import sys

import pytest

from experiments import runtime
from tests.conftest import REPO

# Prints what it runs with, restarts, and shows how much of a large, touched
# malloc block (as XLA's buffers are) the kernel backed with huge pages. Not a
# NumPy array: NumPy asks for huge pages for its own large arrays.
SCRIPT = r'''
import ctypes, os, sys
from experiments import runtime
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


def python(args, env_tunables=None, platforms='cpu', stdin=None):
  """Python in the repository, on JAX_PLATFORMS=cpu unless told: the same answer on any machine."""
  env = {k: v for k, v in os.environ.items()
         if k not in (runtime.TUNABLES_ENV, 'JAX_PLATFORMS', 'JAX_PLATFORM_NAME')}
  if env_tunables is not None:
    env[runtime.TUNABLES_ENV] = env_tunables
  env['JAX_PLATFORMS'] = platforms
  proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, input=stdin,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  return proc


def run(env_tunables, platforms='cpu'):
  proc = python(['-c', SCRIPT, 'first', '--second=2'], env_tunables, platforms)
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


def test_huge_pages_unavailable_when_the_kernel_says_never(tmp_path, monkeypatch):
  setting = tmp_path / 'enabled'
  setting.write_text('always madvise [never]\n')
  assert not runtime.huge_pages_available(str(setting))
  assert not runtime.huge_pages_available(str(tmp_path / 'missing'))
  setting.write_text('always [madvise] never\n')
  linux_glibc = sys.platform.startswith('linux') and runtime.platform.libc_ver()[0] == 'glibc'
  monkeypatch.setattr(runtime.platform, 'libc_ver', lambda: ('glibc', '2.35'))
  assert runtime.huge_pages_available(str(setting)) == linux_glibc


@needs_huge_pages
def test_does_not_restart_a_program_read_from_stdin():
  # Restarted, `python -` would read an empty stdin and exit 0 having run nothing.
  script = ('from experiments import runtime\n'
            'print("BEFORE", flush=True)\n'
            'print("RETURNED", runtime.restart_with_huge_pages())\n'
            'print("AFTER")\n')
  proc = python(['-'], stdin=script)
  assert proc.stdout.splitlines() == ['BEFORE', 'RETURNED False', 'AFTER']
  assert proc.stderr.count('\n') == 1 and 'stdin' in proc.stderr
  assert 'GLIBC_TUNABLES=glibc.malloc.hugetlb=1' in proc.stderr


@needs_huge_pages
def test_does_not_restart_a_notebook_kernel():
  in_kernel = "import sys, types; sys.modules['ipykernel'] = types.ModuleType('ipykernel')\n"
  proc = python(['-c', in_kernel + SCRIPT, 'first'])
  assert [line for line in proc.stdout.splitlines() if line.startswith('RUN')] == [
      "RUN None ['first']"]
  assert proc.stderr.startswith('capsjax: not restarting with huge pages inside IPython or a '
                                'notebook kernel;') and proc.stderr.count('\n') == 1


@needs_huge_pages
def test_does_not_restart_for_an_accelerator():
  # No backend starts: with JAX_PLATFORMS=cuda on a machine without CUDA that would fail.
  runs, _ = run(None, platforms='cuda')
  assert runs == ["RUN None ['first', '--second=2']"]


class Restarted(Exception):
  pass


@pytest.fixture
def no_execve(monkeypatch):
  """Restarts raise `Restarted`, not replace pytest; the decision's other inputs say yes."""
  def execve(executable, argv, env):
    raise Restarted(argv)

  monkeypatch.setattr(runtime.os, 'execve', execve)
  monkeypatch.delenv(runtime.TUNABLES_ENV, raising=False)
  monkeypatch.setattr(runtime, 'default_platform', lambda: 'cpu')
  monkeypatch.setattr(runtime, '_rerun_problem', lambda: None)
  return monkeypatch


@needs_huge_pages
def test_no_restart_with_a_glibc_older_than_the_tunable(no_execve):
  no_execve.setattr(runtime.platform, 'libc_ver', lambda: ('glibc', '2.31'))
  assert runtime.restart_with_huge_pages() is False
  no_execve.setattr(runtime.platform, 'libc_ver', lambda: ('glibc', '2.35'))
  with pytest.raises(Restarted):
    runtime.restart_with_huge_pages()


def test_restart_needs_the_cpu_and_a_command_line_to_rerun(no_execve):
  no_execve.setattr(runtime, 'huge_pages_available', lambda: True)
  with pytest.raises(Restarted):
    runtime.restart_with_huge_pages()
  no_execve.setattr(runtime, 'default_platform', lambda: 'cuda')
  assert runtime.restart_with_huge_pages() is False
  no_execve.setattr(runtime, 'default_platform', lambda: 'cpu')
  no_execve.setattr(runtime, '_rerun_problem', lambda: 'in a test')
  assert runtime.restart_with_huge_pages() is False


def test_default_platform_named_by_the_environment(monkeypatch):
  monkeypatch.setenv('JAX_PLATFORM_NAME', 'CUDA')
  assert runtime.default_platform() == 'cuda'


@pytest.mark.parametrize('argv,program', [
    (['python'], '-'), (['python', '-'], '-'), (['python', '-u', '-'], '-'),
    (['python', '-c', 'print(1)', 'x.py'], '-c'), (['python', '-uc', 'print(1)'], '-c'),
    (['python', '-m', 'experiments.mnist', '--epochs=1'], '-m'), (['python', '-mpytest'], '-m'),
    (['python', '-W', 'ignore', '-Xdev', '-O', 'run.py', '-c'], 'run.py'),
    (['python', '-Wignore', '-X', 'dev', 'run.py'], 'run.py'),
    (['python', '--check-hash-based-pycs', 'always', '--', '-run.py'], '-run.py'),
])
def test_program_of_a_command_line(argv, program):
  assert runtime._program(argv) == program


def test_rerun_needs_the_script_file(monkeypatch, tmp_path):
  for name in ('IPython', 'ipykernel'):
    monkeypatch.delitem(sys.modules, name, raising=False)
  monkeypatch.chdir(tmp_path)
  (tmp_path / 'train.py').write_text('')
  monkeypatch.setattr(sys, 'orig_argv', ['python', '-u', 'train.py', '--epochs=1'])
  assert runtime._rerun_problem() is None
  monkeypatch.setattr(sys, 'orig_argv', ['python', 'gone.py'])
  assert runtime._rerun_problem() == f'because its script gone.py is not found from {tmp_path}'
  monkeypatch.setattr(sys, 'orig_argv', ['python'])
  assert 'stdin' in runtime._rerun_problem()
