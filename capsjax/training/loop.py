"""The one training loop every experiment uses: `train_and_evaluate` over `train_epoch`.

`train_and_evaluate(config, task, workdir)` runs epochs of the pmapped
`train_step` over a device-resident dataset, evaluates the held-out splits
after each, and keeps the run's folder (`capsjax.training.rundir`): run.json,
metrics.jsonl (train_*, validation_* and test_* means of every term of the
loss, *_error, learning rate, speed; with an EMA, validation_raw_* evaluate
the trained weights themselves), orbax checkpoints of the last two epochs (a
rerun resumes from the latest), curves.png and the task's pictures.

A diverged epoch (a loss or parameter that is NaN or infinite) stops the run
with `Diverged` before anything of it is written, so the last good checkpoint
stays the one to resume from.
"""

import contextlib
import dataclasses
import datetime
import os
import time
from typing import Callable, Dict, Optional, Tuple

import flax.jax_utils
import jax
import jax.numpy as jnp
import numpy as np

from capsjax import data, models, visualize
from capsjax.errors import InputError
from capsjax.training import rundir, steps, stopping
from capsjax.training.checkpoint import Checkpointer, Progress
from capsjax.training.config import RunConfig, TrainConfig
from capsjax.training.lock import WorkdirLock, describe, read_holder
from capsjax.training.state import create_train_state
from capsjax.training.task import Task

Log = Callable[[str], None]


class Diverged(InputError):
  """A loss or parameter became NaN or infinite; nothing of that epoch was saved."""


def split_validation(images, labels, validation_examples, train_examples=0):
  """Hold out the last `validation_examples` of a training split; train on the rest.

  Args:
    images: [N, ...], labels: [N, ...], the training split.
    validation_examples: int, examples held out from its end (0: none).
    train_examples: int, train on the first this many of the rest (0: all of it).

  Returns:
    (train images, train labels, validation images, validation labels): disjoint
    ranges of the inputs, the validation arrays empty when none is held out.

  Raises:
    InputError: nothing would be left to train on.
  """
  kept = len(images) - validation_examples
  if kept <= 0:
    raise InputError(f'--validation_examples={validation_examples} leaves none of the '
                     f'{len(images)} training examples to train on; hold out fewer.')
  return (_first(images[:kept], train_examples), _first(labels[:kept], train_examples),
          images[kept:], labels[kept:])


def _first(array, count):
  return array[:count] if count else array


def local_shards(batch: np.ndarray) -> np.ndarray:
  """This process's share of a global batch, a row per local device.

  The global batch is split evenly over every device of every process, in the
  order of `jax.devices()`, which is the order of pmap's axis; each process
  feeds only its own devices, and the steps' pmean/psum span all of them.

  Args:
    batch: array [B, ...], the same on every process; B divisible by
      `jax.device_count()`.

  Returns:
    array [jax.local_device_count(), B / jax.device_count(), ...].
  """
  shards = batch.reshape(jax.device_count(), -1, *batch.shape[1:])
  return shards[[jax.devices().index(device) for device in jax.local_devices()]]


def evaluate(p_eval, state, images, labels, num_examples: int, batch_size: int) -> Dict[str, float]:
  """Means over exactly num_examples of every term the eval step sums.

  Args:
    p_eval: from `steps.pmap_steps`.
    state, images, labels: replicated state and device-resident split.
    num_examples: examples to evaluate (the last batch is padded and masked).
    batch_size: global evaluation batch, split over every device (`local_shards`).

  Returns:
    dict of term name -> float mean.
  """
  totals = {}
  for start in range(0, num_examples, batch_size):
    indices = np.arange(start, start + batch_size)
    mask = (indices < num_examples).astype(np.float32)
    indices = np.where(mask > 0, indices, 0).astype(np.int32)
    sums = p_eval(state, images, labels, local_shards(indices), local_shards(mask))
    for key, value in jax.device_get(flax.jax_utils.unreplicate(sums)).items():
      totals[key] = totals.get(key, 0.0) + float(value)
  count = totals.pop('count')
  assert int(count) == num_examples
  return {key: value / count for key, value in totals.items()}


class Splits:
  """A run's examples, checked against its config and put on the devices.

  train: (images, labels) on the devices; held_out: name -> (images, labels,
  count, p_eval) for the validation and test splits and the task's further
  test sets; counts: what run.json records.
  """

  def __init__(self, config: TrainConfig, task: Task, eval_only: bool):
    """Check the task's data against `config` and put it on the devices.

    Raises:
      InputError: a batch that does not divide among the devices, images or
        labels of the wrong shape, labels out of range, too few examples.
    """
    num_devices = jax.device_count()
    if config.batch_size % num_devices:
      raise InputError(f'--batch_size={config.batch_size} does not divide among the '
                       f'{num_devices} devices; use a multiple of {num_devices}.')
    dataset, shape = task.dataset, tuple(config.model.image_shape)
    batch_images = jax.eval_shape(task.make_batch, dataset.train_images[:1],
                                  dataset.train_labels[:1], np.zeros(1, np.int32), None)['image']
    if shape != batch_images.shape[1:]:
      raise InputError(f'the config is for {shape} images but the batches hold '
                       f'{batch_images.shape[1:]}.')
    if dataset.test_images.shape[1:] != dataset.train_images.shape[1:]:
      raise InputError(f'{dataset.source}: the test images are {dataset.test_images.shape[1:]}, '
                       f'the training images {dataset.train_images.shape[1:]}; give both '
                       f'splits images of one size.')
    counts = config.data
    train_x, train_y, valid_x, valid_y = split_validation(
        dataset.train_images, dataset.train_labels, counts.validation_examples,
        counts.train_examples)
    test_x, test_y = (_first(dataset.test_images, counts.test_examples),
                      _first(dataset.test_labels, counts.test_examples))
    # name -> (images, labels, whether they go through make_batch)
    held_out = {'validation': (valid_x, valid_y, True)} if counts.validation_examples else {}
    held_out['test'] = (test_x, test_y, True)
    for name, (images, labels) in task.more_tests.items():
      if name in held_out or name == 'train':
        raise InputError(f'more_tests: {name!r} is taken by a split of the dataset.')
      if tuple(images.shape[1:]) != shape:
        raise InputError(f'the {name} test set holds {tuple(images.shape[1:])} images; the '
                         f'config is for {shape}.')
      held_out[name] = (images, labels, False)
    if len(train_x) < config.batch_size and not eval_only:
      raise InputError(f'{len(train_x)} training examples are fewer than one batch of '
                       f'{config.batch_size}; lower --batch_size or raise --train_examples.')
    if not len(test_x):
      raise InputError(f'{dataset.source}: the test split is empty; give it test examples.')
    # Every split holds class indices [N]; make_batch may build other labels from them
    # (MultiMNIST's pairs).
    for split, labels in (('training', train_y), *((n, y) for n, (_, y, _) in held_out.items())):
      data.check_labels(labels, config.model.num_classes, f'{dataset.source} ({split} split)')

    self.counts = {'train_examples': len(train_x), 'test_examples': len(test_x),
                   'validation_examples': counts.validation_examples}
    self.steps_per_epoch = len(train_x) // config.batch_size
    self._task, self._batch_size = task, config.batch_size
    self._train_x, self._train_y, self._held_out = train_x, train_y, held_out

  def put_on_devices(self):
    """Copy the examples to every device and make the pmapped steps; returns p_train."""
    put = steps.replicate
    p_train, p_eval = steps.pmap_steps(make_batch=self._task.make_batch)
    p_eval_as_is = steps.pmap_steps()[1] if self._task.more_tests else None
    self.train = put(jnp.asarray(self._train_x)), put(jnp.asarray(self._train_y))
    self.held_out = {
        name: (put(jnp.asarray(x)), put(jnp.asarray(y)), len(x), p_eval if made else p_eval_as_is)
        for name, (x, y, made) in self._held_out.items()}
    return p_train

  def evaluate(self, replicated, raw=()) -> Dict[str, float]:
    """'{split}_{term}' means and '{split}_error' of every held-out split.

    Args:
      replicated: the replicated `TrainState`.
      raw: splits to evaluate with the trained weights too, as '{split}_raw_*'.
    """
    record = {}
    evaluations = [(name, name, replicated) for name in self.held_out]
    evaluations += [(f'{name}_raw', name, replicated.replace(ema=None)) for name in raw]
    for key, name, evaluated in evaluations:
      images, labels, count, p_eval = self.held_out[name]
      means = evaluate(p_eval, evaluated, images, labels, count, self._batch_size)
      record.update({f'{key}_{term}': value for term, value in means.items()})
      record[f'{key}_error'] = 1.0 - means['accuracy']
    return record


class EpochTrainer:
  """Runs the steps of an epoch from wherever it stands, saving on a timer or a stop request.

  Times all but this process's first (compiling) step, and prints progress
  lines with the time left in the epoch and in the run.
  """

  def __init__(self, p_train, images, labels, batch_size: int, steps_per_epoch: int,
               run: RunConfig, log: Log, progress: Log, stops: stopping.StopRequests,
               last_epoch: int):
    """p_train from `steps.pmap_steps`; images and labels replicated; run: the
    `RunConfig` (progress and checkpoint intervals); log: lines to keep; progress:
    status lines; stops: the run's `StopRequests`; last_epoch: the run's last."""
    self._p_train, self._images, self._labels = p_train, images, labels
    self._batch_size, self._steps_per_epoch = batch_size, steps_per_epoch
    self._run, self._log, self._progress, self._stops = run, log, progress, stops
    self._last_epoch = last_epoch
    self._compiled = False
    self.evaluation_seconds = 0.0  # of the last epoch's evaluation, for the time left

  def seconds_left(self, epoch: int, steps_done: int, rate: float) -> Tuple[float, float]:
    """(seconds left in `epoch` after `steps_done` steps, seconds left in the run)."""
    epoch_steps = self._steps_per_epoch * self._batch_size / max(rate, 1e-9)
    in_epoch = (self._steps_per_epoch - steps_done) * self._batch_size / max(rate, 1e-9)
    return in_epoch, (in_epoch + self.evaluation_seconds
                      + (self._last_epoch - epoch) * (epoch_steps + self.evaluation_seconds))

  def train_epoch(self, epoch: int, replicated, order: np.ndarray, progress: Progress,
                  save: Callable, check: Callable, on_step: Callable[[], None] = lambda: None):
    """Train the rest of an epoch: the batches of `order` after `progress.steps`.

    Args:
      epoch: its number.
      replicated: the replicated `TrainState`.
      order: int [N], the example indices in this epoch's order (a last partial
        batch is dropped).
      progress: the `Progress` of the epoch so far (steps done, metric sums).
      save: callable(replicated, progress) writing a checkpoint inside the epoch,
        called every `checkpoint_every_minutes` and on a stop request.
      check: callable(step_metrics on the host, first step's index in the epoch)
        raising if training diverged.
      on_step: called after each step (the lock's refresh).

    Returns:
      (replicated state, the epoch's `Progress`, whether a stop was requested;
      if it was, the state was saved).
    """
    pending = []  # the metrics of the steps since the last fold, on the device
    mark = started = last_report = last_save = time.perf_counter()
    save_seconds = 60 * self._run.checkpoint_every_minutes

    def fold(progress, timed=True):
      """Bring the pending steps' metrics to the host, check them, add them to the sums."""
      nonlocal mark
      fetched = jax.device_get(pending)  # waits for the device
      check(fetched, progress.steps)
      sums = dict(progress.sums)
      for metrics in fetched:  # in step order, in float64: the same sums however split
        for name, value in metrics.items():
          sums[name] = sums.get(name, 0.0) + float(value)
      now = time.perf_counter()
      progress = dataclasses.replace(
          progress, steps=progress.steps + len(fetched), sums=sums,
          seconds=progress.seconds + now - mark,
          timed_seconds=progress.timed_seconds + (now - mark if timed else 0.0),
          timed_images=progress.timed_images + (self._batch_size * len(fetched) if timed else 0))
      pending.clear()
      mark = now
      return progress

    for step in range(progress.steps, self._steps_per_epoch):
      indices = order[step * self._batch_size:(step + 1) * self._batch_size].astype(np.int32)
      replicated, metrics = self._p_train(replicated, self._images, self._labels,
                                          local_shards(indices))
      pending.append(flax.jax_utils.unreplicate(metrics))
      if not self._compiled:  # the first step includes compilation: not timed
        progress = fold(progress, timed=False)
        self._log(f'  compiled and ran the first step in {time.perf_counter() - started:.1f}s')
        self._compiled = True
        last_report = time.perf_counter()
      on_step()
      done = step + 1
      if done == self._steps_per_epoch:
        break
      now = time.perf_counter()
      stop, save_due = stopping.any_process(
          self._stops.signal_number is not None,
          save_seconds > 0 and now - last_save >= save_seconds)
      report_due = now - last_report > self._run.progress_seconds
      if report_due or stop or save_due:
        progress = fold(progress)
      if report_due:
        self._progress(self.progress_line(epoch, progress))
        last_report = time.perf_counter()
      if stop or save_due:
        save(replicated, progress)
        last_save = time.perf_counter()
        # The save's time is the epoch's, but not training's: images/s leaves it out.
        progress = dataclasses.replace(progress, seconds=progress.seconds + last_save - mark)
        mark = last_save
        if stop:
          return replicated, progress, True
    if pending:
      progress = fold(progress)
    return replicated, progress, False

  def progress_line(self, epoch: int, progress: Progress) -> str:
    """'  epoch 7/50 step 120/468  loss 0.0190  86.7 images/s  4m02s left in the epoch, ...'"""
    line = (f'  epoch {epoch}/{self._last_epoch} step {progress.steps}/{self._steps_per_epoch}  '
            f'loss {progress.sums["loss"] / progress.steps:.4f}')
    if progress.timed_images:  # none yet right after this process's compiling step
      rate = progress.timed_images / progress.timed_seconds
      in_epoch, in_run = self.seconds_left(epoch, progress.steps, rate)
      line += (f'  {rate:.1f} images/s  {duration(in_epoch)} left in the epoch, '
               f'{duration(in_run)} in the run')
    return line


def duration(seconds: float) -> str:
  """A duration as people read it: '42s', '4m02s', '7h12m'."""
  seconds = int(round(max(seconds, 0)))
  if seconds < 60:
    return f'{seconds}s'
  if seconds < 3600:
    return f'{seconds // 60}m{seconds % 60:02d}s'
  return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'


def _first_nonfinite(step_losses) -> Tuple[int, float]:
  losses = np.asarray(jax.device_get(step_losses), np.float64)
  bad = np.flatnonzero(~np.isfinite(losses))
  return (int(bad[0]), float(losses[bad[0]])) if bad.size else None


@jax.jit
def _all_finite(tree):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def divergence_check(epoch: int, steps_in_epoch: int, epoch_first_step: int,
                     last_good: Callable[[], str]):
  """A `check` for `EpochTrainer.train_epoch`: raises `Diverged` at the first non-finite loss.

  Args:
    epoch, steps_in_epoch: where the run is.
    epoch_first_step: the run's optimizer step at the start of the epoch.
    last_good: callable returning what the last good checkpoint is, for the message.

  Returns:
    callable(step_metrics, first=0, what=None): step_metrics, a list of the
    host metric dicts of the steps from the epoch's step index `first` on;
    raises at a non-finite loss among them, or, naming `what`, when a
    non-finite value was found elsewhere (a parameter, an evaluation).
  """

  def check(step_metrics, first=0, what=None):
    bad = _first_nonfinite([m['loss'] for m in step_metrics])
    if not bad and not what:
      return
    step, value = bad or (len(step_metrics) - 1, what)
    step += first
    raise Diverged(
        f'training diverged: the loss is {value} at step {step + 1}/{steps_in_epoch} of epoch '
        f'{epoch} (step {epoch_first_step + step + 1} of the run); {last_good()}. Lower '
        f'--learning_rate (in a new --workdir), or resume with the same command, which repeats '
        f'the same steps.')

  return check


def epoch_line(record: dict, epochs: int) -> str:
  """The line a finished epoch prints."""
  return (f'epoch {record["epoch"]}/{epochs}  train loss {record["train_loss"]:.4f} '
          f'acc {100 * record["train_accuracy"]:.2f}%  '
          + (f'validation acc {100 * record["validation_accuracy"]:.2f}%  '
             if 'validation_accuracy' in record else '')
          + (f'(trained weights {100 * record["validation_raw_accuracy"]:.2f}%)  '
             if 'validation_raw_accuracy' in record else '')
          + f'test loss {record["test_loss"]:.4f} '
          f'acc {100 * record["test_accuracy"]:.2f}%  lr {record["learning_rate"]:.2e}  '
          f'{record["images_per_sec"]:.1f} images/s  {record["epoch_seconds"]:.1f}s')


def train_and_evaluate(config: TrainConfig, task: Task, workdir: str, *, eval_only: bool = False,
                       log: Log = print, progress: Optional[Log] = None) -> dict:
  """Train `config` on `task` in `workdir` (resuming what is there), or evaluate it.

  Checkpoints are written at each epoch's end and every
  `config.run.checkpoint_every_minutes` inside an epoch; a resume continues from
  the newest whole one at its step, with the same batches, shifts and dropout,
  so a run stopped and resumed ends with the parameters and metrics.jsonl of
  one that was not (but for its timings). SIGTERM or SIGINT saves a checkpoint
  after the current step and raises `Stopped`.

  Args:
    config: a `TrainConfig`; its model's image_shape and num_classes must be the data's.
    task: the `Task`: data, loss, batches, further test sets, pictures.
    workdir: the run's folder.
    eval_only: evaluate the latest checkpoint and stop, writing nothing.
    log: called with each line to keep.
    progress: called with each progress line inside an epoch (default: `log`);
      a terminal may show them in place.

  Returns:
    The last epoch's metrics record (with eval_only or nothing left to train:
    the evaluation of the checkpoint, 'epoch' being its epoch).

  Raises:
    InputError: settings that do not fit the data, the devices or the saved run;
      another process training in `workdir`; a folder that cannot be written.
    Diverged: a NaN or infinite loss or parameter.
    Stopped: SIGTERM or SIGINT; a checkpoint of the last step was saved.
  """
  writer = jax.process_index() == 0  # every process computes the same; one writes
  if not writer:
    log = lambda line: None  # noqa: E731
  progress_log = progress if progress is not None and writer else log
  if not workdir:
    raise InputError("--workdir is empty; name the run's folder, e.g. --workdir=runs/mnist.")
  splits = Splits(config, task, eval_only)
  checkpoint_dir = os.path.join(workdir, rundir.CHECKPOINT_DIR)
  if eval_only and not os.path.isdir(checkpoint_dir):
    raise InputError(f'--eval_only: no checkpoint in {checkpoint_dir} to evaluate.')
  identity = rundir.run_identity(config, task, splits.counts)
  # Before anything is written: building the model checks that it fits the images.
  state = create_train_state(jax.random.PRNGKey(config.seed), config, task.loss_fn,
                             splits.steps_per_epoch)
  if eval_only:
    return _evaluate_checkpoint(config, task, workdir, splits, identity, state, log)
  lock = contextlib.nullcontext()
  if writer:
    try:
      os.makedirs(workdir, exist_ok=True)
    except OSError as e:
      raise InputError(f'cannot make the folder {workdir} ({e.strerror}); give a --workdir '
                       f'that can be written.') from None
    lock = WorkdirLock(workdir, log)
  with lock, Checkpointer(checkpoint_dir, log=log) as checkpointer, \
       stopping.StopRequests() as stops:
    try:
      return _train(config, task, workdir, splits, identity, state, checkpointer, stops,
                    lock if writer else None, log, progress_log)
    except OSError as e:  # the run's own files: a full or read-only disk
      saved = checkpointer.saved()
      raise InputError(
          f'could not write {e.filename or "in " + workdir} ({e.strerror or e}); '
          + (f'the checkpoint {saved[0].name} is intact' if saved else 'no checkpoint was saved')
          + '. Free space or make the folder writable, then rerun the same command to resume.'
      ) from None


def _evaluate_checkpoint(config, task, workdir, splits, identity, state, log) -> dict:
  """--eval_only: the held-out splits' metrics of the newest whole checkpoint; writes nothing."""
  holder = read_holder(workdir)
  if holder:
    log(f'A training process ({describe(holder)}) is writing {workdir}; evaluating its newest '
        f'checkpoint.')
  with Checkpointer(os.path.join(workdir, rundir.CHECKPOINT_DIR), create=False,
                    log=log) as checkpointer:
    rundir.open_run(workdir, identity, config.resumable_settings(), checkpointer, write=False)
    if not checkpointer.saved():
      raise InputError(f'--eval_only: no complete checkpoint in {checkpointer.directory} to '
                       f'evaluate.')
    state, where = checkpointer.restore(state)
  splits.put_on_devices()
  record = {'epoch': where.epoch, 'step': int(state.step),
            **splits.evaluate(steps.replicate(state))}
  _final_line(record, splits, where, log)
  return record


def evaluate_state(config: TrainConfig, task: Task, state) -> Dict[str, float]:
  """The held-out splits' metrics of a trained state, over every device; writes nothing.

  Args:
    config: the `TrainConfig` the state was trained with (its data settings
      choose the splits).
    task: the `Task` whose splits and loss evaluate it.
    state: a single-device `TrainState`.

  Returns:
    dict: '{split}_{term}' means and '{split}_error' for the test split, the
    validation split if the config holds one out, and the task's further tests.
  """
  splits = Splits(config, task, eval_only=True)
  splits.put_on_devices()
  return splits.evaluate(steps.replicate(state))


def _final_line(record, splits, where: Progress, log):
  log(f'Test accuracy {100 * record["test_accuracy"]:.2f}%, test error '
      f'{100 * record["test_error"]:.2f}% on {splits.counts["test_examples"]} images after '
      f'{where.describe(splits.steps_per_epoch)}.')


def _train(config, task, workdir, splits, identity, state, checkpointer, stops, lock, log,
           progress_log) -> dict:
  writer = lock is not None
  steps_per_epoch = splits.steps_per_epoch
  rundir.open_run(workdir, identity, config.resumable_settings(), checkpointer, write=writer)
  where = Progress()  # a new run: before epoch 1
  if checkpointer.saved():
    state, where = checkpointer.restore(state)
    log(f'Resumed from the checkpoint of {where.describe(steps_per_epoch)} '
        f'(step {int(state.step)}).')
  metrics_log = (rundir.MetricsLog(os.path.join(workdir, rundir.METRICS_FILE),
                                   where.completed_epochs(), log) if writer else None)
  log(_start_line(config, task, splits))
  p_train = splits.put_on_devices()
  replicated = steps.replicate(state)
  # With an EMA, the validation split is evaluated with the trained weights too
  # ('validation_raw_*'), so whether the average helps is judged on held-out data.
  raw = ('validation',) if config.optimizer.ema_decay and 'validation' in splits.held_out else ()
  schedule = config.learning_rate_schedule(steps_per_epoch)
  last_epoch = max(where.completed_epochs(), config.epochs)
  trainer = EpochTrainer(p_train, *splits.train, config.batch_size, steps_per_epoch, config.run,
                         log, progress_log, stops, last_epoch)
  title = f'{workdir}: {task.name}, {models.describe(config.model)}'
  last_saved = [where if checkpointer.saved() else None]

  def last_good():
    if last_saved[0] is None:
      return 'no checkpoint was written'
    return (f'the last good checkpoint, of {last_saved[0].describe(steps_per_epoch)}, stays in '
            f'{checkpointer.directory} and nothing after it was saved')

  def save(replicated, epoch_progress, check):
    state = flax.jax_utils.unreplicate(replicated)
    if not bool(_all_finite(state.params)):
      check([], epoch_progress.steps, 'finite but a parameter is not')
    checkpointer.save(state, epoch_progress)
    last_saved[0] = epoch_progress
    return state

  def stop_now(epoch_progress):
    name = stops.name or 'a stop request on another process'
    raise stopping.Stopped(
        f'Stopped by {name} after {epoch_progress.describe(steps_per_epoch)}; its checkpoint '
        f'is in {checkpointer.directory}. Rerun the same command to resume from it.',
        stopping.EXIT_STATUS.get(stops.signal_number, 143))

  record = None
  first_epoch = where.epoch + 1 if where.epoch_done else where.epoch
  target = config.stop_at_validation_accuracy
  # A run that reached its target before a stop (or a rerun) trains no further.
  reached = target and stopping.any_process(
      writer and any(r.get('validation_accuracy', 0) >= target for r in metrics_log.records))[0]
  if reached:
    log(f'The run reached --stop_at_validation_accuracy={target:g} before; it trains no further.')
    first_epoch = last_epoch + 1
  run_started = time.perf_counter()
  for epoch in range(first_epoch, last_epoch + 1):
    epoch_progress = where if where.epoch == epoch and not where.epoch_done else Progress(
        epoch=epoch, epoch_done=False)
    order = np.random.default_rng([config.seed, epoch]).permutation(
        splits.counts['train_examples'])
    check = divergence_check(epoch, steps_per_epoch,
                             int(state.step) - epoch_progress.steps, last_good)
    replicated, epoch_progress, stopped = trainer.train_epoch(
        epoch, replicated, order, epoch_progress,
        lambda r, p: save(r, p, check), check, on_step=lock.refresh if lock else lambda: None)
    if stopped:
      stop_now(epoch_progress)
    evaluation_start = time.perf_counter()
    state = flax.jax_utils.unreplicate(replicated)
    if not bool(_all_finite(state.params)):
      check([], epoch_progress.steps - 1, 'finite but a parameter is not')
    sums = epoch_progress.sums
    record = {'epoch': epoch, 'step': int(state.step),
              **{f'train_{name}': value / epoch_progress.steps for name, value in sums.items()},
              **splits.evaluate(replicated, raw),
              'learning_rate': float(schedule(int(state.step))),
              'images_per_sec': epoch_progress.timed_images / max(epoch_progress.timed_seconds,
                                                                   1e-9),
              'num_devices': jax.device_count()}
    if not np.all(np.isfinite(list(record.values()))):
      check([], epoch_progress.steps - 1, 'finite but the evaluation is not')
    trainer.evaluation_seconds = time.perf_counter() - evaluation_start
    record['epoch_seconds'] = epoch_progress.seconds + trainer.evaluation_seconds
    if writer:  # the metrics line before the checkpoint: a resume drops lines past it
      metrics_log.append(record)
      visualize.training_curves(metrics_log.records,
                                os.path.join(workdir, rundir.CURVES_FILE), title=title)
    epoch_progress = dataclasses.replace(epoch_progress, epoch_done=True,
                                         seconds=record['epoch_seconds'])
    save(replicated, epoch_progress, check)
    if task.pictures and writer:
      task.pictures(state)
    log(epoch_line(record, last_epoch))
    _expected_end(epoch, last_epoch, record, time.perf_counter() - run_started, log)
    if stopping.any_process(stops.signal_number is not None)[0]:
      stop_now(epoch_progress)
    where = epoch_progress
    if target and record['validation_accuracy'] >= target:
      log(f'Validation accuracy {100 * record["validation_accuracy"]:.2f}% reached '
          f'--stop_at_validation_accuracy={target:g}: training ends after epoch {epoch}.')
      break

  if record is None:  # nothing left to train: evaluate the checkpoint
    record = {'epoch': where.epoch, 'step': int(state.step), **splits.evaluate(replicated)}
    if task.pictures and writer:
      task.pictures(state)
  _final_line(record, splits, where, log)
  return record


def _expected_end(epoch, last_epoch, record, elapsed, log):
  """For a run of over an hour, a line with the time left and when it should end."""
  if epoch == last_epoch:
    return
  left = (last_epoch - epoch) * record['epoch_seconds']
  if elapsed + left < 3600:
    return
  end = datetime.datetime.now().astimezone() + datetime.timedelta(seconds=left)
  log(f'  {last_epoch - epoch} epochs left, about {duration(left)}: expected to end '
      f'{end:%Y-%m-%d %H:%M %Z}.')


def _start_line(config: TrainConfig, task: Task, splits: Splits) -> str:
  counts, devices = splits.counts, jax.devices()
  return (f'{task.dataset.source}: {counts["train_examples"]} training, '
          + (f'{counts["validation_examples"]} validation (the last of the training split) and '
             if counts['validation_examples'] else '')
          + f'{counts["test_examples"]} test images; {len(devices)} {devices[0].platform} '
          f'device(s)' + (f' over {jax.process_count()} processes'
                          if jax.process_count() > 1 else '')
          + f'; global batch {config.batch_size}; {models.describe(config.model)}; '
          f'{config.model.dtype}.')
