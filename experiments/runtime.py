"""Process set-up that makes XLA on the CPU fast: glibc's malloc on transparent huge pages.

XLA's CPU runtime allocates a training step's buffers (about 0.5 GB for the
paper's model at batch 64) afresh on every call, and on 4 KiB pages the step
pays for page faults and TLB misses on all of them. With glibc's malloc asking
for transparent huge pages the step ran 1.2x faster (BENCHMARKS.md). glibc
reads that setting only when a process starts, so an entry point restarts
itself once with it.

`restart_with_huge_pages` restarts the process only when all of these hold:
GLIBC_TUNABLES does not already name glibc.malloc.hugetlb; the system is Linux
with glibc 2.35 or newer and the kernel's transparent huge pages are not
[never]; JAX computes on the CPU; and the command line that started Python
runs the same program again: a script file that exists, `-m module` or
`-c command`, outside IPython, notebook kernels and interactive sessions.
Otherwise it returns False and the program goes on with the default malloc.
"""

import os
import platform
import sys

import jax

TUNABLES_ENV = 'GLIBC_TUNABLES'
HUGE_PAGES_TUNABLE = 'glibc.malloc.hugetlb'
THP_SETTING = '/sys/kernel/mm/transparent_hugepage/enabled'
# glibc.malloc.hugetlb first appeared in glibc 2.35; older versions ignore it.
MIN_GLIBC = (2, 35)


def huge_pages_available(thp_setting=THP_SETTING):
  """Whether glibc's malloc can be told to use transparent huge pages here.

  Args:
    thp_setting: str, the kernel's transparent huge page setting file.

  Returns:
    bool: True on Linux with glibc 2.35 or newer whose kernel grants huge
    pages on request (its setting is not [never]).
  """
  if not sys.platform.startswith('linux'):
    return False
  libc, version = platform.libc_ver()
  try:
    if libc != 'glibc' or tuple(int(part) for part in version.split('.')[:2]) < MIN_GLIBC:
      return False
  except ValueError:
    return False
  try:
    with open(thp_setting) as f:
      return '[never]' not in f.read()
  except OSError:
    return False


def default_platform():
  """The platform JAX computes on by default.

  Returns:
    str: 'cpu', 'cuda', 'gpu', 'tpu', ... as JAX_PLATFORM_NAME or the first of
    JAX_PLATFORMS (or the jax_platforms option) name it, else JAX's default
    backend.
  """
  named = os.environ.get('JAX_PLATFORM_NAME') or jax.config.jax_platforms
  if named:
    return named.split(',')[0].strip().lower()
  # Asking JAX starts its backends, but it starts CUDA or TPU only where it
  # sees that hardware: on a CPU-only machine this is the CPU client the
  # program would create moments later (about 10 ms), and where it starts an
  # accelerator there is no restart and the program goes on with that backend.
  return jax.default_backend()


def _program(orig_argv):
  """What a Python command line runs: '-c', '-m', a script path, or '-' for stdin.

  Args:
    orig_argv: list of str, the interpreter's command line as `sys.orig_argv`.

  Returns:
    str: '-c' or '-m' for a command or module, '-' for a program read from
    stdin (also an interactive prompt), else the script's path as given.
  """
  i = 1
  while i < len(orig_argv):
    arg = orig_argv[i]
    if arg == '--':
      i += 1
      break
    if arg == '-' or not arg.startswith('-'):
      break
    if arg == '--check-hash-based-pycs':  # the only long option with a value
      i += 1
    elif not arg.startswith('--'):
      # Short options combine ('-uc CODE', '-Wignore'), so read flag by flag.
      for k in range(1, len(arg)):
        if arg[k] in 'cm':
          return '-' + arg[k]
        if arg[k] in 'WX':
          if k == len(arg) - 1:  # its value is the next argument
            i += 1
          break
    i += 1
  return orig_argv[i] if i < len(orig_argv) else '-'


def _rerun_problem():
  """Why running this process's command line again would not resume its program.

  Returns:
    str completing "not restarting with huge pages ...", or None when the
    command line runs the same program again from the start.
  """
  if 'IPython' in sys.modules or 'ipykernel' in sys.modules:
    return 'inside IPython or a notebook kernel'
  if hasattr(sys, 'ps1'):
    return 'in an interactive session'
  if not sys.executable or not sys.orig_argv:
    return 'in an embedded Python, which has no command line to run again'
  program = _program(sys.orig_argv)
  if program == '-':
    return 'for a program read from stdin, which a restarted Python could not read again'
  if program not in ('-c', '-m') and not os.path.exists(program):
    return f'because its script {program} is not found from {os.getcwd()}'
  return None


def restart_with_huge_pages():
  """Re-execute this Python process with GLIBC_TUNABLES=glibc.malloc.hugetlb=1, once.

  Call it first thing in a script's main: the process is replaced by a fresh
  one with the same interpreter and command line (`sys.orig_argv`) whose
  malloc uses transparent huge pages. It restarts only when every condition in
  this module's docstring holds; `GLIBC_TUNABLES=glibc.malloc.hugetlb=0` opts
  out. When the restart is unsafe (a notebook, an interactive session, a
  program from stdin) but would otherwise have happened, it says so in one line
  on stderr.

  Returns:
    False when it did not restart (when it does, it does not return).
  """
  tunables = os.environ.get(TUNABLES_ENV, '')
  if HUGE_PAGES_TUNABLE in tunables or not huge_pages_available():
    return False
  if default_platform() != 'cpu':
    return False  # XLA's GPU and TPU buffers do not come from malloc
  setting = f'{HUGE_PAGES_TUNABLE}=1'
  problem = _rerun_problem()
  if problem:
    print(f'capsjax: not restarting with huge pages {problem}; start Python with '
          f'{TUNABLES_ENV}={setting} for the faster CPU step', file=sys.stderr)
    return False
  env = dict(os.environ, **{TUNABLES_ENV: f'{tunables}:{setting}' if tunables else setting})
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
