"""What an experiment prints: lines to keep, and a progress line a terminal shows in place.

Only the first process of a multi-process run prints. Defines no flags, so it
can be imported beside any experiment.
"""

import shutil
import sys

import jax


def is_writer() -> bool:
  """Whether this process writes the run's files and lines (the first of a multi-process run)."""
  return jax.process_index() == 0


_status = {'shown': False}


def say(message: str) -> None:
  """Print a line to keep (from the writing process only)."""
  if is_writer():
    end_status_line()
    print(message, flush=True)


def status(message: str) -> None:
  """Show a progress line: rewritten in place on a terminal, a plain line in a log file."""
  if not is_writer():
    return
  if not sys.stdout.isatty():
    print(message, flush=True)
    return
  width = shutil.get_terminal_size().columns
  sys.stdout.write('\r' + message.strip()[:width - 1] + '\x1b[K')
  sys.stdout.flush()
  _status['shown'] = True


def end_status_line():
  """End a progress line shown in place, so the next line starts on its own."""
  if _status['shown']:
    sys.stdout.write('\n')
    _status['shown'] = False
