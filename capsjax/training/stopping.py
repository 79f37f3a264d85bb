"""Stopping a run cleanly: on SIGTERM or Ctrl-C, after the current step, with a checkpoint.

SLURM, Kubernetes and preemptible TPU VMs send SIGTERM some seconds before they
kill a process; Ctrl-C sends SIGINT. `StopRequests` records the first of either,
and the loop (`capsjax.training.loop`) then finishes its step, saves a
checkpoint and raises `Stopped`. The first signal also restores the system's
default action, so a second one ends the process at once. In a run of several
processes, `any_process` makes every process stop (and save) at the same step.
"""

import signal
import threading
from typing import Optional, Sequence, Tuple

import jax
import numpy as np

# The exit status a shell gives a process a signal ended: 128 + its number.
EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Stopped(Exception):
  """A run stopped on a signal after saving a checkpoint; `exit_status` is 130 or 143."""

  def __init__(self, message: str, exit_status: int):
    super().__init__(message)
    self.exit_status = exit_status


class StopRequests:
  """A context that catches SIGTERM and SIGINT, so the run can stop between steps.

  `signal_number` is None until the first arrives. Outside the main thread
  (where Python allows no handlers) nothing is caught.
  """

  def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)):
    self._signals = tuple(signals)
    self._previous = {}
    self.signal_number: Optional[int] = None

  def _handle(self, signal_number, frame):
    del frame
    self.signal_number = signal_number
    for number in self._signals:  # a second signal takes the system's action: stop now
      signal.signal(number, signal.SIG_DFL)

  def __enter__(self) -> 'StopRequests':
    if threading.current_thread() is threading.main_thread():
      self._previous = {number: signal.signal(number, self._handle) for number in self._signals}
    return self

  def __exit__(self, *exc_info):
    for number, handler in self._previous.items():
      signal.signal(number, handler)

  @property
  def name(self) -> str:
    return signal.Signals(self.signal_number).name if self.signal_number else ''


def any_process(*flags: bool) -> Tuple[bool, ...]:
  """Each flag, true if it is true on any process of the run.

  With one process this is the flags themselves; with several it gathers them
  from every process (a collective every process must call at the same point).
  """
  if jax.process_count() == 1:
    return tuple(bool(flag) for flag in flags)
  from jax.experimental import multihost_utils
  gathered = multihost_utils.process_allgather(np.asarray(flags, np.int32))
  return tuple(bool(value) for value in np.asarray(gathered).reshape(-1, len(flags)).any(axis=0))
