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

import os
import time
from typing import Callable, Dict, Tuple

import flax.jax_utils
import jax
import jax.numpy as jnp
import numpy as np

from capsjax import data, models, visualize
from capsjax.errors import InputError
from capsjax.training import rundir, steps
from capsjax.training.checkpoint import Checkpointer
from capsjax.training.config import TrainConfig
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
  """Runs the steps of an epoch, timing all but this process's first (compiling) step."""

  def __init__(self, p_train, images, labels, batch_size: int, progress_seconds: float, log: Log):
    """p_train from `steps.pmap_steps`; images and labels replicated; the rest as named."""
    self._p_train, self._images, self._labels = p_train, images, labels
    self._batch_size = batch_size
    self._progress_seconds, self._log = progress_seconds, log
    self._compiled = False

  def train_epoch(self, epoch, replicated, order, check):
    """Train on `order` in batches, dropping a last partial batch.

    Args:
      epoch: its number, for the progress lines.
      replicated: the replicated `TrainState`.
      order: int [N], the example indices in this epoch's order.
      check: callable(step_metrics on the host) raising if training diverged;
        called at each progress line, which reads the metrics anyway.

    Returns:
      (replicated state, list of per-step metric dicts on the host, images/s).
    """
    steps_in_epoch = len(order) // self._batch_size
    step_metrics, timed_images = [], 0
    last_report = started = time.perf_counter()
    for step in range(steps_in_epoch):
      indices = order[step * self._batch_size:(step + 1) * self._batch_size].astype(np.int32)
      replicated, metrics = self._p_train(replicated, self._images, self._labels,
                                          local_shards(indices))
      step_metrics.append(flax.jax_utils.unreplicate(metrics))
      if not self._compiled:  # the first step includes compilation: not timed
        jax.block_until_ready(metrics)
        self._log(f'  compiled and ran the first step in {time.perf_counter() - started:.1f}s')
        started = last_report = time.perf_counter()
        self._compiled = True
      else:
        timed_images += self._batch_size
      if (time.perf_counter() - last_report > self._progress_seconds
          and step + 1 < steps_in_epoch):
        fetched = jax.device_get(step_metrics)  # waits for the device
        check(fetched)
        loss = np.mean([m['loss'] for m in fetched])
        rate = timed_images / max(time.perf_counter() - started, 1e-9)
        self._log(f'  epoch {epoch} step {step + 1}/{steps_in_epoch}  loss {loss:.4f}  '
                  f'{rate:.1f} images/s')
        last_report = time.perf_counter()
    images_per_sec = timed_images / max(time.perf_counter() - started, 1e-9)
    return replicated, jax.device_get(step_metrics), images_per_sec


def _first_nonfinite(step_losses) -> Tuple[int, float]:
  losses = np.asarray(jax.device_get(step_losses), np.float64)
  bad = np.flatnonzero(~np.isfinite(losses))
  return (int(bad[0]), float(losses[bad[0]])) if bad.size else None


@jax.jit
def _all_finite(tree):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def divergence_check(epoch: int, steps_in_epoch: int, first_step: int, checkpoint_dir: str):
  """A `check` for `EpochTrainer.train_epoch`: raises `Diverged` at the first non-finite loss.

  The returned callable(step_metrics, what=None) also raises, naming `what`,
  when a non-finite value was found elsewhere (a parameter, an evaluation).
  """

  def check(step_metrics, what=None):
    bad = _first_nonfinite([m['loss'] for m in step_metrics])
    if not bad and not what:
      return
    step, value = bad or (len(step_metrics) - 1, what)
    good = (f'the last good checkpoint, of epoch {epoch - 1}, stays in {checkpoint_dir}'
            if epoch > 1 else 'no checkpoint was written')
    raise Diverged(
        f'training diverged: the loss is {value} at step {step + 1}/{steps_in_epoch} of epoch '
        f'{epoch} (step {first_step + step + 1} of the run); nothing of that epoch was saved '
        f'and {good}. Lower --learning_rate (in a new --workdir), or resume with the same '
        f'command, which repeats the same steps.')

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
                       log: Log = print) -> dict:
  """Train `config` on `task` in `workdir` (resuming what is there), or evaluate it.

  Args:
    config: a `TrainConfig`; its model's image_shape and num_classes must be the data's.
    task: the `Task`: data, loss, batches, further test sets, pictures.
    workdir: the run's folder.
    eval_only: evaluate the latest checkpoint and stop, writing nothing.
    log: called with each line of progress.

  Returns:
    The last epoch's metrics record (with eval_only or nothing left to train:
    the evaluation of the checkpoint, 'epoch' being its epoch).

  Raises:
    InputError: settings that do not fit the data, the devices or the saved run.
    Diverged: a NaN or infinite loss or parameter.
  """
  writer = jax.process_index() == 0  # every process computes the same; one writes
  if not writer:
    log = lambda line: None  # noqa: E731
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
  with Checkpointer(checkpoint_dir, create=not eval_only) as checkpointer:
    start_epoch = rundir.open_run(workdir, identity, config.resumable_settings(), checkpointer,
                                  write=writer and not eval_only)
    if eval_only and not start_epoch:
      raise InputError(f'--eval_only: no complete checkpoint in {checkpoint_dir} to evaluate.')
    if start_epoch:
      state = checkpointer.restore(state)
      log(f'Resumed from the checkpoint of epoch {start_epoch} (step {int(state.step)}).')
    metrics_log = (rundir.MetricsLog(os.path.join(workdir, rundir.METRICS_FILE), start_epoch, log)
                   if writer and not eval_only else None)
    log(_start_line(config, task, splits))
    p_train = splits.put_on_devices()
    replicated = steps.replicate(state)
    # With an EMA, the validation split is evaluated with the trained weights too
    # ('validation_raw_*'), so whether the average helps is judged on held-out data.
    raw = ('validation',) if config.optimizer.ema_decay and 'validation' in splits.held_out else ()
    schedule = config.learning_rate_schedule(splits.steps_per_epoch)
    trainer = EpochTrainer(p_train, *splits.train, config.batch_size,
                           config.run.progress_seconds, log)
    title = f'{workdir}: {task.name}, {models.describe(config.model)}'
    record = None
    last_epoch = start_epoch if eval_only else max(start_epoch, config.epochs)

    for epoch in range(start_epoch + 1, last_epoch + 1):
      epoch_start = time.perf_counter()
      order = np.random.default_rng([config.seed, epoch]).permutation(
          splits.counts['train_examples'])
      check = divergence_check(epoch, splits.steps_per_epoch, int(state.step), checkpoint_dir)
      replicated, step_metrics, images_per_sec = trainer.train_epoch(epoch, replicated, order,
                                                                     check)
      check(step_metrics)
      state = flax.jax_utils.unreplicate(replicated)
      if not bool(_all_finite(state.params)):
        check(step_metrics, 'finite but a parameter is not')
      record = {'epoch': epoch, 'step': int(state.step),
                **{f'train_{name}': float(np.mean([m[name] for m in step_metrics]))
                   for name in step_metrics[0]},
                **splits.evaluate(replicated, raw),
                'learning_rate': float(schedule(int(state.step))),
                'images_per_sec': images_per_sec,
                'epoch_seconds': time.perf_counter() - epoch_start,
                'num_devices': jax.device_count()}
      if not np.all(np.isfinite(list(record.values()))):
        check(step_metrics, 'finite but the evaluation is not')
      if writer:  # the metrics line before the checkpoint: a resume drops lines past it
        metrics_log.append(record)
        visualize.training_curves(metrics_log.records,
                                  os.path.join(workdir, rundir.CURVES_FILE), title=title)
      checkpointer.save(epoch, state)
      if task.pictures and writer:
        task.pictures(state)
      log(epoch_line(record, config.epochs))

    if record is None:  # nothing left to train (or --eval_only): evaluate the checkpoint
      record = {'epoch': last_epoch, 'step': int(state.step), **splits.evaluate(replicated)}
      if task.pictures and writer and not eval_only:
        task.pictures(state)
  log(f'Test accuracy {100 * record["test_accuracy"]:.2f}%, test error '
      f'{100 * record["test_error"]:.2f}% on {splits.counts["test_examples"]} images after '
      f'epoch {last_epoch}.')
  return record


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
