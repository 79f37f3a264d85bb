"""A run's folder: what it is (run.json), what it measured (metrics.jsonl), whether it resumes.

  run.json        the run's settings and the data's identity (`run_identity`);
                  a rerun resumes only if they match (`epochs` may change,
                  unless the learning rate schedule spans the run)
  metrics.jsonl   one JSON object per epoch (`MetricsLog`)
  checkpoints/    orbax checkpoints (`capsjax.training.checkpoint`)
  curves.png      the curves of metrics.jsonl; other pictures as the task draws them
"""

import hashlib
import json
import os
from typing import Callable, List, Optional

import numpy as np

from capsjax.errors import InputError
from capsjax.files import write_json, write_text
from capsjax.training.checkpoint import Checkpointer
from capsjax.training.config import TrainConfig
from capsjax.training.lock import describe, read_holder
from capsjax.training.state import create_train_state

RUN_FILE = 'run.json'
METRICS_FILE = 'metrics.jsonl'
CURVES_FILE = 'curves.png'
CHECKPOINT_DIR = 'checkpoints'
# DataConfig's flags, whose resolved counts run.json records instead.
_COUNTS = ('train_examples', 'validation_examples', 'test_examples')


def data_fingerprint(*arrays: np.ndarray) -> str:
  """sha256 of the arrays' shapes, dtypes and bytes: the identity of a dataset.

  Args:
    *arrays: NumPy arrays (images, labels of each split).

  Returns:
    A hex digest string.
  """
  digest = hashlib.sha256()
  for array in arrays:
    array = np.ascontiguousarray(array)
    digest.update(f'{array.shape}{array.dtype}'.encode())
    digest.update(array.data)
  return digest.hexdigest()


def run_identity(config: TrainConfig, task, counts: dict) -> dict:
  """Everything that makes two runs compute the same thing, as JSON values.

  Args:
    config: the `TrainConfig`.
    task: the `capsjax.training.Task` (its name, dataset, loss, settings and
      further test sets).
    counts: {'train_examples', 'test_examples', 'validation_examples'}: how many
      examples of each split the run uses.

  Returns:
    dict of str -> JSON values: the config's settings by flag name, the data's
    name and fingerprint, the counts, the loss's name, the task's settings.
  """
  data = task.dataset
  identity = {'dataset': task.name,
              'data_sha256': data_fingerprint(data.train_images, data.train_labels,
                                              data.test_images, data.test_labels),
              'train_examples': counts['train_examples'],
              'test_examples': counts['test_examples'], 'loss': task.loss_fn.__name__,
              **{name: value for name, value in config.flat().items() if name not in _COUNTS}}
  if counts.get('validation_examples'):  # absent when none: runs from before the split resume
    identity['validation_examples'] = counts['validation_examples']
  identity.update(task.settings)
  if task.more_tests:  # absent when none: runs from before more_tests resume
    identity['more_tests'] = {name: data_fingerprint(*arrays)
                              for name, arrays in sorted(task.more_tests.items())}
  return json.loads(json.dumps(identity))


def check_resumable(saved: dict, current: dict, workdir: str, resumable=('epochs',)) -> None:
  """Raise InputError naming every setting in which `current` differs from `saved`.

  Args:
    saved, current: `run_identity` dicts.
    workdir: the run's folder, for the message.
    resumable: names that may differ (`TrainConfig.resumable_settings`): they
      change how long a run goes on, not what each of its epochs computes.
  """
  # A setting added after the run was saved is absent from its run.json: the run had
  # the setting's default.
  defaults = json.loads(json.dumps(TrainConfig().flat()))
  saved = {**{name: value for name, value in defaults.items() if name in current}, **saved}
  names = sorted(set(saved) | set(current))
  differences = [f'  {name}: saved {saved.get(name)!r}, now {current.get(name)!r}'
                 for name in names
                 if name not in resumable and saved.get(name) != current.get(name)]
  if differences:
    may_change = f'{", ".join(resumable) or "nothing"} may change on resume'
    if 'epochs' not in resumable:
      may_change += '; its learning rate schedule spans the run, so epochs may not'
    raise InputError(
        f'{workdir} holds a run made with other settings, which a resume would mix up:\n'
        + '\n'.join(differences) +
        f'\nRerun with the saved values to resume it, or pass another --workdir to start a '
        f'new run. ({may_change}.)')


def read_run_file(workdir: str) -> dict:
  """The run.json of `workdir`, checked to be a JSON object.

  Raises:
    InputError: it is missing, unreadable, not JSON, or not an object.
  """
  path = os.path.join(workdir, RUN_FILE)
  try:
    with open(path, encoding='utf-8') as f:
      identity = json.load(f)
  except FileNotFoundError:
    raise InputError(f'{path}: no such file.') from None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise InputError(f'{path} is damaged ({type(e).__name__}: {e}); restore it from a copy, or '
                     f'pass another --workdir to start a new run.') from None
  if not isinstance(identity, dict):
    raise InputError(f'{path} holds a {type(identity).__name__}, not the JSON object of a run; '
                     f'restore it from a copy, or pass another --workdir to start a new run.')
  return identity


def open_run(workdir: str, identity: dict, resumable: tuple, checkpointer: Checkpointer,
             write: bool) -> int:
  """Check that `workdir` may be resumed (or started) as the run `identity` describes.

  Args:
    workdir: the run's folder.
    identity: the `run_identity` of the run asked for.
    resumable: settings that may differ from the saved run's.
    checkpointer: the run's `Checkpointer`.
    write: write run.json (the first process of a run does; an evaluation
      does not).

  Returns:
    Whether `workdir` holds checkpoints to resume from.

  Raises:
    InputError: the saved run differs, or checkpoints have no run.json to
      check them against.
  """
  saved = checkpointer.saved()
  if saved:
    if not os.path.exists(os.path.join(workdir, RUN_FILE)):
      raise InputError(
          f'{workdir} holds checkpoints (the newest {saved[0].name}) but no {RUN_FILE}, so '
          f'whether they were trained with these settings cannot be checked; restore its '
          f'{RUN_FILE}, or pass another --workdir to start a new run.')
    check_resumable(read_run_file(workdir), identity, workdir, resumable)
  if write:
    write_json(os.path.join(workdir, RUN_FILE), identity)
  return bool(saved)


def read_metrics(path: str, log: Callable[[str], None] = print) -> List[dict]:
  """The records of a metrics.jsonl, skipping a partial last line (a write cut off).

  Args:
    path: the .jsonl file; missing means no records.
    log: called with a line when a partial last line is skipped.

  Returns:
    list of dicts, one per epoch, each with an int 'epoch'.

  Raises:
    InputError: a line before the last is not a JSON object with an 'epoch'.
  """
  if not os.path.exists(path):
    return []
  with open(path, encoding='utf-8', errors='replace') as f:
    lines = [line for line in f if line.strip()]
  records = []
  for number, line in enumerate(lines, 1):
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      if number < len(lines):
        raise InputError(f'{path}, line {number}: not JSON; repair or remove the line.')
      log(f'{path}: skipped its partial last line, written while an epoch was cut off '
          f'before its checkpoint.')
      continue
    if not isinstance(record, dict) or not isinstance(record.get('epoch'), int):
      raise InputError(f'{path}, line {number}: not the record of an epoch (a JSON object with '
                       f'an integer "epoch"); repair or remove the line.')
    records.append(record)
  return records


class MetricsLog:
  """metrics.jsonl: one JSON object per epoch, never two for the same epoch.

  `records` holds what the file holds, so the curves are drawn without reading it back.
  """

  def __init__(self, path: str, keep_through_epoch: int, log: Callable[[str], None] = print):
    """Open the log, keeping only the epochs that a checkpoint covers.

    Args:
      path: the .jsonl file (created if missing).
      keep_through_epoch: lines of later epochs are dropped (their checkpoints
        were never written), and so is a partial last line.
      log: called with a line when a partial last line is dropped.
    """
    self.path = path
    self.records = [r for r in read_metrics(path, log) if r['epoch'] <= keep_through_epoch]
    write_text(path, ''.join(json.dumps(r) + '\n' for r in self.records))

  def append(self, record: dict) -> None:
    with open(self.path, 'a') as f:
      f.write(json.dumps(record, allow_nan=False) + '\n')
      f.flush()
      os.fsync(f.fileno())
    self.records.append(record)


def load_run_identity(workdir: str) -> dict:
  """The `run_identity` dict a trained run recorded in its run.json.

  Args:
    workdir: a folder `capsjax.training.train_and_evaluate` wrote.

  Raises:
    InputError: no trained run (run.json and checkpoints/) in workdir, or a
      damaged run.json.
  """
  if (not os.path.isfile(os.path.join(workdir, RUN_FILE))
      or not os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR))):
    raise InputError(f'{workdir}: no trained run there ({RUN_FILE} and {CHECKPOINT_DIR}/ are '
                     f'missing); train one first, e.g. python -m experiments.mnist '
                     f'--workdir={workdir}.')
  return read_run_file(workdir)


def config_from_identity(identity: dict) -> TrainConfig:
  """The `TrainConfig` a `run_identity` dict (a run.json) records."""
  try:
    return TrainConfig.from_flat(identity)
  except (TypeError, ValueError) as e:
    raise InputError(f'{RUN_FILE} does not describe a config this version can build: {e}') from None


def restore_run(workdir: str, identity: dict, loss_fn, rng, step: Optional[int] = None,
                log: Callable[[str], None] = print):
  """The config and checkpointed state of the run `identity` describes; writes nothing.

  Args:
    workdir: the run's folder.
    identity: its run.json (`load_run_identity`).
    loss_fn: the run's loss function.
    rng: PRNG key for the state's structure (overwritten by the checkpoint).
    step: the optimizer step of the checkpoint to restore (default: the newest
      that reads back whole).
    log: called with a line for each damaged checkpoint skipped, and when a
      training process is writing the run.

  Returns:
    (config, single-device TrainState, identity with 'epoch' (the epoch of the
    checkpoint's last step), 'epoch_done' and 'checkpoint' (a description such
    as 'epoch 7' or 'step 120 of epoch 7') added).
  """
  config = config_from_identity(identity)
  holder = read_holder(workdir)
  if holder:
    log(f'A training process ({describe(holder)}) is writing {workdir}; reading its newest '
        f'checkpoint.')
  checkpoint_dir = os.path.join(workdir, CHECKPOINT_DIR)
  with Checkpointer(checkpoint_dir, create=False, log=log) as checkpointer:
    if not checkpointer.saved():
      raise InputError(f'{checkpoint_dir}: no complete checkpoint; let the run train longer.')
    state, where = checkpointer.restore(create_train_state(
        rng, config, loss_fn, identity['train_examples'] // config.batch_size), step)
  return config, state, {**identity, 'epoch': where.epoch, 'epoch_done': where.epoch_done,
                         'checkpoint': where.describe()}
