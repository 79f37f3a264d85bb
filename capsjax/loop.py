"""The one training loop every experiment uses.

`train_and_evaluate` runs epochs of the pmapped `train.train_step` over a
device-resident dataset, evaluates after each, and keeps a workdir:

  run.json        the run's settings and the data's identity; a rerun resumes
                  only if they match (`epochs` may change, unless the learning
                  rate schedule spans the run)
  metrics.jsonl   one JSON object per epoch: train_*, validation_* and test_*
                  means of every term of the loss function, *_error, learning
                  rate, speed (evaluations use `train.evaluation_params`; with an
                  EMA, validation_raw_* evaluate the trained weights themselves)
  checkpoints/    orbax checkpoints of the last two epochs; a rerun resumes from
                  the latest
  *.png           whatever the experiment's `pictures` draws

A diverged epoch (a loss or parameter that is NaN or infinite) stops the run
with `Diverged` before anything of it is written, so the last good checkpoint
stays the one to resume from.
"""

import dataclasses
import hashlib
import json
import os
import time

import flax.jax_utils
import jax
import jax.numpy as jnp
import numpy as np

from capsjax import data, multimnist, train, visualize
from capsjax.checkpoint import Checkpointer
from capsjax.errors import InputError

RUN_FILE = 'run.json'
METRICS_FILE = 'metrics.jsonl'
CURVES_FILE = 'curves.png'


class Diverged(InputError):
  """A loss or parameter became NaN or infinite; nothing of that epoch was saved."""


def data_fingerprint(*arrays):
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


# The experiments' loss functions, by the name run.json records (`load_run`).
LOSSES = {fn.__name__: fn for fn in (train.classification_losses, multimnist.multimnist_losses)}


def run_identity(config, dataset_name, fingerprint, train_examples, test_examples, loss_fn,
                 validation_examples=0):
  """Everything that makes two runs compute the same thing, as JSON-ready values.

  Args:
    config: the `train.TrainConfig`.
    dataset_name: e.g. 'mnist'.
    fingerprint: `data_fingerprint` of the dataset.
    train_examples, test_examples: how many of each split the run uses.
    loss_fn: the per-example loss function (recorded by name).
    validation_examples: how many training examples are held out.

  Returns:
    dict of str -> JSON values.
  """
  identity = {'dataset': dataset_name, 'data_sha256': fingerprint,
              'train_examples': train_examples, 'test_examples': test_examples,
              'loss': loss_fn.__name__, **dataclasses.asdict(config)}
  if validation_examples:  # absent when none: runs from before the split still resume
    identity['validation_examples'] = validation_examples
  return json.loads(json.dumps(identity))


def check_resumable(saved, current, workdir, resumable=('epochs',)):
  """Raise InputError naming every setting in which `current` differs from `saved`.

  Args:
    saved, current: `run_identity` dicts.
    workdir: the run's folder, for the message.
    resumable: names that may differ (`train.TrainConfig.resumable_settings`):
      they change how long a run goes on, not what each of its epochs computes.
  """
  names = sorted(set(saved) | set(current))
  differences = [f'  {name}: saved {saved.get(name)!r}, now {current.get(name)!r}'
                 for name in names
                 if name not in resumable and saved.get(name) != current.get(name)]
  if differences:
    may_change = (f'{", ".join(resumable)} may change on resume' if resumable else
                  'its learning rate schedule spans the run, so not even epochs may change')
    raise InputError(
        f'{workdir} holds a run made with other settings, which a resume would mix up:\n'
        + '\n'.join(differences) +
        f'\nRerun with the saved values to resume it, or pass another --workdir to start a '
        f'new run. ({may_change}.)')


def write_json(path, value):
  """Write `value` as JSON to `path` atomically (a reader never sees half a file)."""
  partial = path + '.partial'
  with open(partial, 'w') as f:
    json.dump(value, f, indent=1, allow_nan=False)
  os.replace(partial, path)


def read_metrics(path, log=print):
  """The records of a metrics.jsonl, skipping a partial last line (a write cut off).

  Args:
    path: the .jsonl file; missing means no records.
    log: called with a line when a partial last line is skipped.

  Returns:
    list of dicts, one per epoch.

  Raises:
    InputError: a line before the last is not JSON.
  """
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  records = []
  for number, line in enumerate(lines, 1):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if number < len(lines):
        raise InputError(f'{path}, line {number}: not JSON; repair or remove the line.')
      log(f'{path}: skipped its partial last line, written while an epoch was cut off '
          f'before its checkpoint.')
  return records


class MetricsLog:
  """metrics.jsonl: one JSON object per epoch, never two for the same epoch.

  `records` holds what the file holds, so the curves are drawn without reading it back.
  """

  def __init__(self, path, keep_through_epoch, log=print):
    """Open the log, keeping only the epochs that a checkpoint covers.

    Args:
      path: the .jsonl file (created if missing).
      keep_through_epoch: lines of later epochs are dropped (their checkpoints
        were never written), and so is a partial last line.
      log: called with a line when a partial last line is dropped.
    """
    self.path = path
    self.records = [r for r in read_metrics(path, log) if r['epoch'] <= keep_through_epoch]
    partial = path + '.partial'
    with open(partial, 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in self.records)
    os.replace(partial, path)

  def append(self, record):
    with open(self.path, 'a') as f:
      f.write(json.dumps(record, allow_nan=False) + '\n')
      f.flush()
      os.fsync(f.fileno())
    self.records.append(record)


@jax.jit
def _all_finite(tree):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def _first(array, count):
  return array[:count] if count else array


def split_validation(images, labels, validation_examples, train_examples=0):
  """Hold out the last `validation_examples` of a training split; train on (the first N of) the rest.

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


def local_shards(batch):
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


def evaluate(p_eval, state, images, labels, num_examples, batch_size):
  """Means over exactly num_examples of every term the eval step sums.

  Args:
    p_eval: from `train.pmap_steps`.
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


def _first_nonfinite(step_losses):
  losses = np.asarray(jax.device_get(step_losses), np.float64)
  bad = np.flatnonzero(~np.isfinite(losses))
  return (int(bad[0]), float(losses[bad[0]])) if bad.size else None


def _diverged(epoch, step_in_epoch, steps, first_step, value, checkpoint_dir, last_good):
  good = (f'the last good checkpoint, of epoch {last_good}, stays in {checkpoint_dir}'
          if last_good else 'no checkpoint was written')
  return Diverged(
      f'training diverged: the loss is {value} at step {step_in_epoch + 1}/{steps} of epoch '
      f'{epoch} (step {first_step + step_in_epoch + 1} of the run); nothing of that epoch was '
      f'saved and {good}. Lower --learning_rate (in a new --workdir), or resume with the same '
      f'command, which repeats the same steps.')


class EpochRunner:
  """Runs the steps of an epoch, timing all but this process's first (compiling) step."""

  def __init__(self, p_train, images, labels, batch_size, progress_seconds, log):
    """p_train from `train.pmap_steps`; images and labels replicated; the rest as named."""
    self._p_train, self._images, self._labels = p_train, images, labels
    self._batch_size = batch_size
    self._progress_seconds, self._log = progress_seconds, log
    self._compiled = False

  def run(self, epoch, replicated, order, check):
    """Train on `order` in batches, dropping a last partial batch.

    Args:
      epoch: its number, for the progress lines.
      replicated: the replicated `train.TrainState`.
      order: int [N], the example indices in this epoch's order.
      check: callable(step_metrics on the host) raising if training diverged;
        called at each progress line, which reads the metrics anyway.

    Returns:
      (replicated state, list of per-step metric dicts on the host, images/s).
    """
    steps = len(order) // self._batch_size
    step_metrics, timed_images = [], 0
    last_report = started = time.perf_counter()
    for step in range(steps):
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
      if time.perf_counter() - last_report > self._progress_seconds and step + 1 < steps:
        fetched = jax.device_get(step_metrics)  # waits for the device
        check(fetched)
        loss = np.mean([m['loss'] for m in fetched])
        rate = timed_images / max(time.perf_counter() - started, 1e-9)
        self._log(f'  epoch {epoch} step {step + 1}/{steps}  loss {loss:.4f}  {rate:.1f} images/s')
        last_report = time.perf_counter()
    images_per_sec = timed_images / max(time.perf_counter() - started, 1e-9)
    return replicated, jax.device_get(step_metrics), images_per_sec


def _model_words(config):
  if config.model == 'capsnet':
    return f'CapsNet, {config.routing_iters} routing iterations'
  return f'{config.model} model'


def train_and_evaluate(config, dataset, workdir, *, dataset_name,
                       loss_fn=train.classification_losses, train_examples=0, test_examples=0,
                       validation_examples=0, make_batch=train.take_batch, more_tests=None,
                       settings=None, eval_only=False, pictures=None, progress_seconds=20.0, log=print):
  """Train `config` on `dataset` in `workdir` (resuming what is there), or evaluate it.

  Args:
    config: a `train.TrainConfig`; its image_shape and num_classes must be the data's.
    dataset: a `capsjax.data.Dataset` (uint8 images, int32 labels).
    workdir: the run's folder.
    dataset_name: the dataset's name, recorded with the run.
    loss_fn: the per-example loss (see `train.create_train_state`).
    train_examples, test_examples: use the first N of each split (0: all).
    validation_examples: hold out the last N training examples (0: none) and
      evaluate them every epoch as 'validation_*', to choose settings by.
    more_tests: dict of name -> (uint8 images [N, *config.image_shape], int labels
      [N]): further test sets, evaluated every epoch as they are (no make_batch)
      and recorded as '{name}_*' (the affine test digits, say); their identity
      is part of the run's.
    make_batch: builds a batch on the device from the dataset's arrays (see
      `train.pmap_steps`); its images must be of config.image_shape.
    settings: dict of further JSON values that define the run (a generated test
      set's seed, say): recorded in run.json and checked on resume.
    eval_only: evaluate the latest checkpoint and stop.
    pictures: optional callable(state) drawing the run's pictures into workdir,
      called after every epoch (and once with eval_only).
    progress_seconds: seconds between progress lines within an epoch.
    log: called with each line of progress.

  Returns:
    The last epoch's metrics record (with eval_only or nothing left to train:
    the evaluation of the checkpoint, 'epoch' being its epoch).

  Raises:
    InputError: settings that do not fit the data, the devices or the saved run.
    Diverged: a NaN or infinite loss or parameter.
  """
  num_devices = jax.device_count()
  if config.batch_size % num_devices:
    raise InputError(f'--batch_size={config.batch_size} does not divide among the '
                     f'{num_devices} devices; use a multiple of {num_devices}.')
  # Every process computes the same; one writes the files and the log.
  writer = jax.process_index() == 0
  if not writer:
    log, pictures = (lambda line: None), None
  batch_images = jax.eval_shape(make_batch, dataset.train_images[:1], dataset.train_labels[:1],
                                np.zeros(1, np.int32), None)['image']
  if tuple(config.image_shape) != batch_images.shape[1:]:
    raise InputError(f'the config is for {tuple(config.image_shape)} images but the batches '
                     f'hold {batch_images.shape[1:]}.')
  train_x, train_y, valid_x, valid_y = split_validation(
      dataset.train_images, dataset.train_labels, validation_examples, train_examples)
  test_x, test_y = _first(dataset.test_images, test_examples), _first(
      dataset.test_labels, test_examples)
  # name -> (images, labels, whether they go through make_batch)
  held_out = {'validation': (valid_x, valid_y, True)} if validation_examples else {}
  held_out['test'] = (test_x, test_y, True)
  for name, (images, labels) in (more_tests or {}).items():
    if name in held_out or name == 'train':
      raise InputError(f'more_tests: {name!r} is taken by a split of the dataset.')
    if tuple(images.shape[1:]) != tuple(config.image_shape):
      raise InputError(f'the {name} test set holds {tuple(images.shape[1:])} images; the '
                       f'config is for {tuple(config.image_shape)}.')
    held_out[name] = (images, labels, False)
  if len(train_x) < config.batch_size and not eval_only:
    raise InputError(f'{len(train_x)} training examples are fewer than one batch of '
                     f'{config.batch_size}; lower --batch_size or raise --train_examples.')
  for split, labels in (('training', train_y),
                        *((name, y) for name, (_, y, _) in held_out.items())):
    data.check_labels(labels, config.num_classes, f'{dataset.source} ({split} split)')

  checkpoint_dir = os.path.join(workdir, 'checkpoints')
  if eval_only and not os.path.isdir(checkpoint_dir):
    raise InputError(f'--eval_only: no checkpoint in {checkpoint_dir} to evaluate.')
  identity = run_identity(config, dataset_name,
                          data_fingerprint(dataset.train_images, dataset.train_labels,
                                           dataset.test_images, dataset.test_labels),
                          len(train_x), len(test_x), loss_fn, validation_examples)
  identity.update(settings or {})
  if more_tests:  # absent when none: runs from before more_tests still resume
    identity['more_tests'] = {name: data_fingerprint(*arrays)
                              for name, arrays in sorted(more_tests.items())}
  run_file = os.path.join(workdir, RUN_FILE)
  with Checkpointer(checkpoint_dir) as checkpointer:
    start_epoch = checkpointer.latest_epoch()
    if start_epoch and os.path.exists(run_file):
      with open(run_file) as f:
        check_resumable(json.load(f), identity, workdir, config.resumable_settings())
    elif eval_only:
      raise InputError(f'--eval_only: no complete checkpoint in {checkpoint_dir} to evaluate.')
    if writer:
      write_json(run_file, identity)

    steps_per_epoch = len(train_x) // config.batch_size
    state = train.create_train_state(jax.random.PRNGKey(config.seed), config, loss_fn,
                                     steps_per_epoch)
    if start_epoch:
      state = checkpointer.restore(state)
      log(f'Resumed from the checkpoint of epoch {start_epoch} (step {int(state.step)}).')
    metrics_log = (MetricsLog(os.path.join(workdir, METRICS_FILE), start_epoch, log)
                   if writer else None)

    log(f'{dataset.source}: {len(train_x)} training, '
        + (f'{validation_examples} validation (the last of the training split) and '
           if validation_examples else '') + f'{len(test_x)} test images; '
        f'{num_devices} {jax.devices()[0].platform} device(s)'
        + (f' over {jax.process_count()} processes' if jax.process_count() > 1 else '')
        + f'; global batch {config.batch_size}; {_model_words(config)}; {config.dtype}.')
    p_train, p_eval = train.pmap_steps(make_batch=make_batch)
    p_eval_as_is = train.pmap_steps()[1] if more_tests else None
    put = train.replicate
    train_images, train_labels = put(jnp.asarray(train_x)), put(jnp.asarray(train_y))
    held_out_on_devices = {
        name: (put(jnp.asarray(x)), put(jnp.asarray(y)), len(x), p_eval if made else p_eval_as_is)
        for name, (x, y, made) in held_out.items()}
    replicated = put(state)
    schedule = config.learning_rate_schedule(steps_per_epoch)

    # With an EMA, the validation split is evaluated with the trained weights too
    # ('validation_raw_*'), so whether the average helps is judged on held-out data.
    raw = ('validation',) if config.ema_decay and validation_examples else ()

    def evaluate_held_out(replicated):
      """'{split}_{term}' means and '{split}_error' of the validation and test sets."""
      record = {}
      evaluations = [(name, name, replicated) for name in held_out_on_devices]
      evaluations += [(f'{name}_raw', name, replicated.replace(ema=None)) for name in raw]
      for key, name, evaluated in evaluations:
        images, labels, count, evaluator = held_out_on_devices[name]
        means = evaluate(evaluator, evaluated, images, labels, count, config.batch_size)
        record.update({f'{key}_{term}': value for term, value in means.items()})
        record[f'{key}_error'] = 1.0 - means['accuracy']
      return record

    epochs = EpochRunner(p_train, train_images, train_labels, config.batch_size,
                         progress_seconds, log)
    record = None
    last_epoch = start_epoch if eval_only else max(start_epoch, config.epochs)

    for epoch in range(start_epoch + 1, last_epoch + 1):
      epoch_start = time.perf_counter()
      order = np.random.default_rng([config.seed, epoch]).permutation(len(train_x))
      first_step = int(state.step)

      def stop_if_diverged(step_metrics, what=None):
        bad = _first_nonfinite([m['loss'] for m in step_metrics])
        if bad or what:
          step, value = bad or (len(step_metrics) - 1, what)
          raise _diverged(epoch, step, len(order) // config.batch_size, first_step, value,
                          checkpoint_dir, epoch - 1)

      replicated, step_metrics, images_per_sec = epochs.run(epoch, replicated, order,
                                                                 stop_if_diverged)
      stop_if_diverged(step_metrics)
      state = flax.jax_utils.unreplicate(replicated)
      if not bool(_all_finite(state.params)):
        stop_if_diverged(step_metrics, 'finite but a parameter is not')
      step = int(state.step)
      record = {'epoch': epoch, 'step': step}
      for name in step_metrics[0]:
        record[f'train_{name}'] = float(np.mean([m[name] for m in step_metrics]))
      record.update(evaluate_held_out(replicated))
      record.update({'learning_rate': float(schedule(step)), 'images_per_sec': images_per_sec,
                     'epoch_seconds': time.perf_counter() - epoch_start,
                     'num_devices': num_devices})
      if not np.all(np.isfinite(list(record.values()))):
        stop_if_diverged(step_metrics, 'finite but the evaluation is not')
      if writer:  # the metrics line before the checkpoint: a resume drops lines past it
        metrics_log.append(record)
        visualize.training_curves(metrics_log.records, os.path.join(workdir, CURVES_FILE),
                                  title=f'{workdir}: {dataset_name}, {_model_words(config)}')
      checkpointer.save(epoch, state)
      if pictures:
        pictures(state)
      log(f'epoch {epoch}/{config.epochs}  train loss {record["train_loss"]:.4f} '
          f'acc {100 * record["train_accuracy"]:.2f}%  '
          + (f'validation acc {100 * record["validation_accuracy"]:.2f}%  '
             if validation_examples else '')
          + (f'(trained weights {100 * record["validation_raw_accuracy"]:.2f}%)  '
             if raw else '')
          + f'test loss {record["test_loss"]:.4f} '
          f'acc {100 * record["test_accuracy"]:.2f}%  lr {record["learning_rate"]:.2e}  '
          f'{images_per_sec:.1f} images/s  {record["epoch_seconds"]:.1f}s')

    if record is None:  # nothing left to train (or --eval_only): evaluate the checkpoint
      record = {'epoch': last_epoch, 'step': int(state.step), **evaluate_held_out(replicated)}
      if pictures:
        pictures(state)
  log(f'Test accuracy {100 * record["test_accuracy"]:.2f}%, test error '
      f'{100 * record["test_error"]:.2f}% on {len(test_x)} images after epoch {last_epoch}.')
  return record


def load_run_identity(workdir):
  """The `run_identity` dict a trained run recorded in its run.json.

  Args:
    workdir: a folder `train_and_evaluate` wrote.

  Raises:
    InputError: no trained run (run.json and checkpoints/) in workdir.
  """
  run_file = os.path.join(workdir, RUN_FILE)
  if not os.path.isfile(run_file) or not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise InputError(f'{workdir}: no trained run there ({RUN_FILE} and checkpoints/ are '
                     f'missing); train one first, e.g. python -m experiments.mnist '
                     f'--workdir={workdir}.')
  with open(run_file) as f:
    return json.load(f)


def config_from_identity(identity):
  """The `train.TrainConfig` a `run_identity` dict (a run.json) records."""
  fields = {field.name for field in dataclasses.fields(train.TrainConfig)}
  values = {name: value for name, value in identity.items() if name in fields}
  return train.TrainConfig(**{**values, 'image_shape': tuple(values['image_shape'])})


def load_run(workdir, loss_fn=None):
  """The settings and latest checkpointed state of the run in `workdir`.

  Args:
    workdir: a folder `train_and_evaluate` wrote.
    loss_fn: the run's loss function; None: the one run.json names, if it is one
      of `LOSSES` (give your own if you trained with another).

  Returns:
    (config, state, identity): the `train.TrainConfig`, the single-device
    `train.TrainState` of the latest checkpoint, and the `run_identity` dict
    ('dataset', 'train_examples', 'loss', ...), with 'epoch' added.

  Raises:
    InputError: no run or no complete checkpoint in workdir, or a loss of its
      own not given.
  """
  identity = load_run_identity(workdir)
  if loss_fn is None:
    if identity['loss'] not in LOSSES:
      raise InputError(f'{workdir}: its loss {identity["loss"]!r} is none of {sorted(LOSSES)}; '
                       f'pass it as load_run(workdir, loss_fn).')
    loss_fn = LOSSES[identity['loss']]
  checkpoint_dir = os.path.join(workdir, 'checkpoints')
  config = config_from_identity(identity)
  with Checkpointer(checkpoint_dir) as checkpointer:
    epoch = checkpointer.latest_epoch()
    if not epoch:
      raise InputError(f'{checkpoint_dir}: no complete checkpoint; let the run finish an epoch.')
    state = checkpointer.restore(train.create_train_state(
        jax.random.PRNGKey(0), config, loss_fn, identity['train_examples'] // config.batch_size))
  return config, state, {**identity, 'epoch': epoch}
