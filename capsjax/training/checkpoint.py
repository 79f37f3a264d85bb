"""Checkpoints of a TrainState and of where it lies in the run, written whole, checked on restore.

    checkpoints/step_<N>/state           the state after optimizer step N (orbax)
    checkpoints/step_<N>/progress.json   `Progress`: its epoch, the steps of that
                                         epoch done and the running sums of their
                                         metrics; the sha256 of every saved array

A checkpoint is written into `step_<N>.partial/` and renamed to `step_<N>/`
when complete, and only then is the oldest beyond `max_to_keep` removed: a
process killed at any moment leaves every earlier checkpoint whole. A restore
takes the newest checkpoint that reads back whole and matches its digests,
saying which newer ones it skipped and why; a writer moves those aside
(`damaged-step_<N>/`) so the run can save that step again. Checkpoints of
earlier versions (`checkpoints/<epoch>/`, one per epoch) still restore.
"""

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import threading
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from capsjax.errors import InputError

PROGRESS_FILE = 'progress.json'
_STEP = re.compile(r'step_(\d+)')
_LEGACY = re.compile(r'\d+')  # one folder per epoch, from before mid-epoch checkpoints


@dataclasses.dataclass(frozen=True)
class Progress:
  """Where a checkpoint lies in its run, and what the epoch it lies in has measured so far.

  epoch: the epoch (from 1) of the checkpoint's last step.
  steps: steps of that epoch done.
  epoch_done: that epoch's metrics line is written, so a resume starts the next epoch.
  sums: training metric -> sum over those steps, added in step order in float64,
    so an epoch resumed in the middle ends with the same means as one that was not.
  seconds: wall time spent in the epoch so far, over every resume.
  timed_images, timed_seconds: images trained and seconds spent on them, not
    counting each process's first (compiling) step: the epoch's images/s.
  """
  epoch: int = 0
  steps: int = 0
  epoch_done: bool = True
  sums: Dict[str, float] = dataclasses.field(default_factory=dict)
  seconds: float = 0.0
  timed_images: int = 0
  timed_seconds: float = 0.0

  @classmethod
  def end_of(cls, epoch: int) -> 'Progress':
    """The progress of a checkpoint at the end of `epoch`, its sums unknown."""
    return cls(epoch=epoch)

  def completed_epochs(self) -> int:
    """Epochs whose metrics lines a resume keeps."""
    return self.epoch if self.epoch_done else self.epoch - 1

  def describe(self, steps_per_epoch: Optional[int] = None) -> str:
    """'epoch 7', or 'step 120/468 of epoch 7' inside an epoch."""
    if self.epoch_done:
      return f'epoch {self.epoch}'
    return f'step {self.steps}{"/" + str(steps_per_epoch) if steps_per_epoch else ""} of epoch ' \
           f'{self.epoch}'


class Saved(NamedTuple):
  """A checkpoint on disk: its folder's name, optimizer step (None for an epoch
  folder of an earlier version, which holds the epoch instead)."""
  name: str
  step: Optional[int]
  epoch: Optional[int]


def _items(state) -> dict:
  # On the host: orbax writes NumPy arrays once, from the primary process, whereas
  # every process of a multi-host run holds its own single-device copy of the state.
  items = {'params': state.params, 'opt_state': state.opt_state, 'step': state.step,
           'rng': state.rng}
  if state.ema is not None:
    items['ema'] = state.ema
  if state.model_state:
    items['model_state'] = state.model_state
  return jax.device_get(items)


def digests(items) -> Dict[str, str]:
  """sha256 of each array of a pytree (its shape, dtype and bytes), by key path.

  Args:
    items: a pytree of arrays.

  Returns:
    dict of key path string -> hex digest.
  """
  result = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(items)[0]:
    array = np.ascontiguousarray(np.asarray(leaf))
    digest = hashlib.sha256(f'{array.shape}{array.dtype}'.encode())
    digest.update(array.tobytes())
    result[jax.tree_util.keystr(path)] = digest.hexdigest()
  return result


# The system errors a failed write of a checkpoint is most likely to meet.
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
                 errno.EIO)


def _reason(error: Exception) -> str:
  """An exception as one short line, for the message that names a skipped checkpoint."""
  if isinstance(error, OSError) and error.strerror:
    return error.strerror
  text = ' '.join(str(error).split())
  # tensorstore puts the system's words somewhere in a long message, in a form that differs
  # between its versions ('...: No space left on device [os_error_code=28]'): look for them.
  code = re.search(r"os_error_code='?(\d+)", text)
  if code:
    return os.strerror(int(code.group(1)))
  for number in _WRITE_ERRNOS:
    if os.strerror(number) in text:
      return os.strerror(number)
  return f'{type(error).__name__}: {text[:160]}' if text else type(error).__name__


@contextlib.contextmanager
def _quiet_orbax():
  """Keep orbax's threads from printing tracebacks of a failed write that `save` reports."""
  logger, hook = logging.getLogger('absl'), threading.excepthook
  level = logger.level
  logger.setLevel(logging.CRITICAL)
  threading.excepthook = lambda args: None
  try:
    yield
  finally:
    logger.setLevel(level)
    threading.excepthook = hook


class Checkpointer:
  """Saves and restores a TrainState with its `Progress`, keyed by optimizer step.

  In a run of several processes every process calls each method: the primary
  one writes, all of them read.
  """

  def __init__(self, directory: str, max_to_keep: int = 2, create: bool = True,
               log: Callable[[str], None] = print):
    """directory: folder of the checkpoints; max_to_keep: newest kept; create: make
    the folder if missing and move damaged checkpoints aside (False for a reader,
    which must not write); log: called with a line for each checkpoint skipped."""
    self.directory = os.path.abspath(directory)
    self._max_to_keep, self._writes, self._log = max_to_keep, create, log
    self._primary = jax.process_index() == 0
    self._orbax = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    if create and self._primary:
      os.makedirs(self.directory, exist_ok=True)
      for name in os.listdir(self.directory):  # a save cut off by a crash
        if name.endswith('.partial'):
          shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

  def saved(self) -> List[Saved]:
    """The checkpoints on disk, newest first (not checked to be whole)."""
    if not os.path.isdir(self.directory):
      return []
    found = []
    for name in os.listdir(self.directory):
      if _STEP.fullmatch(name):
        found.append(Saved(name, int(_STEP.fullmatch(name).group(1)), None))
      elif _LEGACY.fullmatch(name):
        found.append(Saved(name, None, int(name)))
    # An earlier version's epoch folders are older than any step folder.
    return sorted(found, key=lambda s: (s.step is not None, s.step or s.epoch), reverse=True)

  def save(self, state, progress: Progress) -> str:
    """Save a (single-device, not replicated) TrainState at its step, with `progress`.

    Returns:
      The checkpoint's folder.

    Raises:
      InputError: the folder cannot be written (a read-only or full disk); the
        checkpoints saved before are untouched.
    """
    items = _items(state)
    name = f'step_{int(items["step"])}'
    final = os.path.join(self.directory, name)
    partial = final + '.partial'
    record = {**dataclasses.asdict(progress), 'sha256': digests(items)}
    try:
      with _quiet_orbax():
        self._write(items, record, partial, final)
    except Exception as e:  # noqa: BLE001 (orbax raises many kinds for one failed write)
      if self._primary:
        shutil.rmtree(partial, ignore_errors=True)
      kept = [s.name for s in self.saved()]
      raise InputError(
          f'could not write a checkpoint in {self.directory} ({_reason(e)}); '
          + (f'the checkpoints saved before ({", ".join(kept)}) are intact' if kept else
             'none was saved before') +
          '. Free space or make the folder writable, then rerun the same command to resume.'
      ) from None
    _sync_processes(f'capsjax checkpoint {name} saved')
    return final

  def _write(self, items, record, partial, final):
    name = os.path.basename(final)
    if self._primary:
      shutil.rmtree(partial, ignore_errors=True)
      os.makedirs(partial)
    _sync_processes(f'capsjax checkpoint {name} folder')
    self._orbax.save(os.path.join(partial, 'state'), args=ocp.args.StandardSave(items))
    if self._primary:
      _write_synced(os.path.join(partial, PROGRESS_FILE), json.dumps(record, allow_nan=False))
      if os.path.exists(final):  # the same step saved again after a resume: replace it
        shutil.rmtree(final)
      os.rename(partial, final)
      _sync_folder(self.directory)
      for old in self.saved()[self._max_to_keep:]:
        shutil.rmtree(os.path.join(self.directory, old.name), ignore_errors=True)

  def restore(self, state, step: Optional[int] = None) -> Tuple[object, Progress]:
    """The newest checkpoint (or the one of `step`) that reads back whole.

    Args:
      state: a TrainState of the run's structure; its values are replaced.
      step: the optimizer step of the checkpoint to restore (default: the newest
        whole one, skipping damaged ones with a line each).

    Returns:
      (state with the saved values, its `Progress`).

    Raises:
      InputError: no checkpoint, none that reads back whole, or none of `step`.
    """
    candidates = [s for s in self.saved() if step is None or s.step == step]
    if not candidates:
      raise InputError(f'{self.directory}: no checkpoint'
                       + (f' of step {step}' if step is not None else '') + '.')
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _items(state))
    skipped = []
    for saved in candidates:
      try:
        items, progress = self._read(saved, abstract)
      except _Damaged as e:
        skipped.append(f'{saved.name} ({e})')
        self._log(f'Skipped the checkpoint {os.path.join(self.directory, saved.name)}: {e}.')
        self._move_aside(saved)
        continue
      return state.replace(**items), progress
    raise InputError(f'{self.directory}: no checkpoint reads back whole: '
                     + '; '.join(skipped) + '. Restore the folder from a copy, or pass '
                     'another --workdir to start a new run.')

  def _read(self, saved: Saved, abstract) -> Tuple[dict, Progress]:
    folder = os.path.join(self.directory, saved.name)
    if saved.step is None:  # an epoch folder of an earlier version: no progress, no digests
      try:
        items = self._orbax.restore(os.path.join(folder, 'default'),
                                    args=ocp.args.StandardRestore(abstract))
      except Exception as e:  # noqa: BLE001
        raise _Damaged(_reason(e)) from None
      return items, Progress.end_of(saved.epoch)
    try:
      with open(os.path.join(folder, PROGRESS_FILE), encoding='utf-8') as f:
        record = json.load(f)
      expected = record.pop('sha256')
      progress = Progress(**record)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
      raise _Damaged(f'its {PROGRESS_FILE} is unreadable, {_reason(e)}') from None
    try:
      items = self._orbax.restore(os.path.join(folder, 'state'),
                                  args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # noqa: BLE001
      raise _Damaged(_reason(e)) from None
    actual = digests(items)
    differ = sorted(set(expected) ^ set(actual)
                    | {key for key in actual if expected.get(key) != actual[key]})
    if differ:
      more = ', ...' if len(differ) > 3 else ''
      raise _Damaged(f'its arrays differ from the digests saved with them '
                     f'({", ".join(differ[:3])}{more})')
    return items, progress

  def _move_aside(self, saved: Saved):
    if not (self._writes and self._primary):
      return
    target = os.path.join(self.directory, f'damaged-{saved.name}')
    try:
      shutil.rmtree(target, ignore_errors=True)
      os.rename(os.path.join(self.directory, saved.name), target)
      self._log(f'  moved it to {target}; delete it once you have looked at it.')
    except OSError:
      pass  # a folder we cannot change: the next save of that step replaces it

  def close(self):
    self._orbax.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()


class _Damaged(Exception):
  """A checkpoint that does not read back whole; the message says why."""


def _write_synced(path: str, text: str):
  with open(path, 'w', encoding='utf-8') as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())


def _sync_folder(path: str):
  """Make a rename inside `path` durable (where the platform allows it)."""
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def _sync_processes(name: str):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
