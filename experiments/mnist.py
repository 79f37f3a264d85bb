"""Train and evaluate the paper's MNIST CapsNet.

    python -m experiments.mnist --routing_iters=3 --data_dir=../shared/data/mnist

Writes to --workdir: metrics.jsonl (a line per epoch), orbax checkpoints (a rerun
resumes from the latest), and reconstructions.png. The step is pmapped over every
local device (one CPU, each GPU, 8 TPU cores); the whole training set lives on
the devices and the paper's random shifts run inside the jitted step.
"""

import dataclasses
import json
import os
import sys
import time

from absl import app, flags, logging
import flax.jax_utils
import jax
import jax.numpy as jnp
import numpy as np

from capsjax import data, runtime, train
from capsjax.checkpoint import Checkpointer
from capsjax.visualize import reconstruction_grid

DEFAULTS = train.TrainConfig()
FLAGS = flags.FLAGS
flags.DEFINE_integer('routing_iters', DEFAULTS.routing_iters, 'Routing iterations.', lower_bound=1)
flags.DEFINE_integer('epochs', DEFAULTS.epochs, 'Training epochs.', lower_bound=0)
flags.DEFINE_integer('batch_size', DEFAULTS.batch_size,
                     'Global batch size, split evenly over the devices.', lower_bound=1)
flags.DEFINE_float('learning_rate', DEFAULTS.learning_rate, 'Adam learning rate.', lower_bound=0)
flags.DEFINE_float('lr_decay', DEFAULTS.lr_decay,
                   'Learning rate factor per --lr_decay_steps steps (exponential decay).',
                   lower_bound=0, upper_bound=1)
flags.DEFINE_integer('lr_decay_steps', DEFAULTS.lr_decay_steps, 'Steps per --lr_decay.',
                     lower_bound=1)
flags.DEFINE_float('recon_weight', DEFAULTS.recon_weight,
                   'Weight of the reconstruction loss; 0 drops the decoder.', lower_bound=0)
flags.DEFINE_integer('shift_pixels', DEFAULTS.shift_pixels,
                     'Random shifts of up to this many pixels (0: none).', lower_bound=0)
flags.DEFINE_integer('train_examples', 0, 'Train on the first N examples (0: all).', lower_bound=0)
flags.DEFINE_integer('test_examples', 0, 'Evaluate on the first N examples (0: all).',
                     lower_bound=0)
flags.DEFINE_integer('seed', DEFAULTS.seed, 'Seed for the initialisation, order and shifts.')
flags.DEFINE_enum('dtype', DEFAULTS.dtype, sorted(train.DTYPES),
                  'Compute dtype (bfloat16: mixed precision, float32 parameters and loss).')
flags.DEFINE_enum('conv_impl', DEFAULTS.conv_impl, ['matmul', 'xla'],
                  'Convolution: matmul (im2col matrix products) or xla (lax.conv).')
flags.DEFINE_string('workdir', 'runs/mnist', 'Folder for metrics, checkpoints and pictures.')
flags.DEFINE_string('data_dir', None,
                    f'Folder of the four IDX files (default: ${data.DATA_DIR_ENV}, else tfds, '
                    'else a checksummed download).')
flags.DEFINE_enum('dataset', 'mnist', sorted(data.DATASETS), 'Dataset.')
flags.DEFINE_bool('eval_only', False, 'Evaluate the latest checkpoint in --workdir and stop.')
flags.DEFINE_integer('conv_features', DEFAULTS.conv_features, 'Conv1 channels.', lower_bound=1)
flags.DEFINE_integer('primary_types', DEFAULTS.primary_types, 'Primary capsule maps.',
                     lower_bound=1)
flags.DEFINE_integer('primary_dim', DEFAULTS.primary_dim, 'Primary capsule dimension.',
                     lower_bound=1)
flags.DEFINE_integer('digit_dim', DEFAULTS.digit_dim, 'Class capsule dimension.', lower_bound=1)
flags.DEFINE_float('progress_seconds', 20.0, 'Seconds between progress lines within an epoch.')

PICTURE_EXAMPLES = 32


def say(message):
  print(message, flush=True)


def config_from_flags(image_shape, num_classes):
  names = {f.name for f in dataclasses.fields(train.TrainConfig)}
  values = {name: FLAGS[name].value for name in names if name in FLAGS}
  return train.TrainConfig(image_shape=image_shape, num_classes=num_classes, **values)


def subset(images, labels, count):
  return (images[:count], labels[:count]) if count else (images, labels)


def shard_indices(indices, num_devices):
  return indices.reshape(num_devices, -1)


class MetricsLog:
  """metrics.jsonl: one JSON object per epoch, never two for the same epoch."""

  def __init__(self, path, keep_through_epoch):
    self.path = path
    lines = []
    if os.path.exists(path):
      with open(path) as f:
        lines = [line for line in f if line.strip() and
                 json.loads(line)['epoch'] <= keep_through_epoch]
    partial = path + '.partial'
    with open(partial, 'w') as f:
      f.writelines(lines)
    os.replace(partial, path)

  def append(self, record):
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
      f.flush()
      os.fsync(f.fileno())


def evaluate(p_eval, state, images, labels, num_examples, batch_size, num_devices):
  """Loss and accuracy over exactly num_examples, the last batch padded and masked."""
  totals = {'loss': 0.0, 'correct': 0.0, 'count': 0.0}
  for start in range(0, num_examples, batch_size):
    indices = np.arange(start, start + batch_size)
    mask = (indices < num_examples).astype(np.float32)
    indices = np.where(mask > 0, indices, 0).astype(np.int32)
    sums = p_eval(state, images, labels, shard_indices(indices, num_devices),
                  shard_indices(mask, num_devices))
    for key, value in jax.device_get(flax.jax_utils.unreplicate(sums)).items():
      totals[key] += float(value)
  assert int(totals['count']) == num_examples
  return totals['loss'] / num_examples, totals['correct'] / num_examples


def draw_reconstructions(state, images, labels, path):
  model_out = jax.jit(state.apply_fn)({'params': state.params}, images)
  predictions = np.asarray(jnp.argmax(model_out.lengths, axis=-1))
  reconstruction_grid(np.asarray(images), np.asarray(model_out.reconstructions),
                      np.asarray(labels), predictions, path)


def train_epoch(p_train, state, train_images, train_labels, config, epoch, num_examples,
                num_devices):
  """One pass over the training set in a fresh order; returns (state, means, images/s, s)."""
  order = np.random.default_rng([config.seed, epoch]).permutation(num_examples).astype(np.int32)
  steps = num_examples // config.batch_size
  totals, timed_images, timed_seconds = None, 0, 0.0
  last_report = started = time.perf_counter()
  for step in range(steps):
    indices = order[step * config.batch_size:(step + 1) * config.batch_size]
    step_start = time.perf_counter()
    state, metrics = p_train(state, train_images, train_labels,
                             shard_indices(indices, num_devices))
    metrics = flax.jax_utils.unreplicate(metrics)
    totals = metrics if totals is None else jax.tree.map(jnp.add, totals, metrics)
    now = time.perf_counter()
    if step == 0 and int(state.step[0]) == 1:
      jax.block_until_ready(metrics)  # the run's first step includes compilation: not timed
      say(f'  compiled and ran the first step in {time.perf_counter() - step_start:.1f}s')
      started = time.perf_counter()
    else:
      timed_images += config.batch_size
    if now - last_report > FLAGS.progress_seconds and step + 1 < steps:
      loss = float(totals['loss']) / (step + 1)  # waits for the device
      rate = timed_images / max(time.perf_counter() - started, 1e-9)
      say(f'  epoch {epoch} step {step + 1}/{steps}  loss {loss:.4f}  {rate:.1f} images/s')
      last_report = time.perf_counter()
  means = {k: float(v) / steps for k, v in jax.device_get(totals).items()}
  timed_seconds = time.perf_counter() - started
  return state, means, timed_images / max(timed_seconds, 1e-9)


def run(dataset):
  """Train (or evaluate) as the flags say; returns the final test accuracy."""
  num_devices = jax.local_device_count()
  config = config_from_flags(dataset.train_images.shape[1:], dataset.num_classes)
  if config.batch_size % num_devices:
    raise ValueError(f'--batch_size={config.batch_size} does not divide among the '
                     f'{num_devices} local devices; use a multiple of {num_devices}.')
  train_x, train_y = subset(dataset.train_images, dataset.train_labels, FLAGS.train_examples)
  test_x, test_y = subset(dataset.test_images, dataset.test_labels, FLAGS.test_examples)
  if len(train_x) < config.batch_size and not FLAGS.eval_only:
    raise ValueError(f'{len(train_x)} training examples are fewer than one batch of '
                     f'{config.batch_size}; lower --batch_size or raise --train_examples.')

  checkpoint_dir = os.path.join(FLAGS.workdir, 'checkpoints')
  if FLAGS.eval_only and not os.path.isdir(checkpoint_dir):
    raise ValueError(f'--eval_only: no checkpoint in {checkpoint_dir} to evaluate.')
  checkpointer = Checkpointer(checkpoint_dir)
  state = train.create_train_state(jax.random.PRNGKey(config.seed), config)
  start_epoch = checkpointer.latest_epoch()
  if start_epoch:
    state = checkpointer.restore(state)
    say(f'Resumed from the checkpoint of epoch {start_epoch} (step {int(state.step)}).')
  elif FLAGS.eval_only:
    raise ValueError(f'--eval_only: no complete checkpoint in {checkpoint_dir} to evaluate.')
  log = MetricsLog(os.path.join(FLAGS.workdir, 'metrics.jsonl'), start_epoch)

  say(f'{dataset.source}: {len(train_x)} training and {len(test_x)} test images; '
      f'{num_devices} {jax.devices()[0].platform} device(s); global batch {config.batch_size}; '
      f'{config.routing_iters} routing iterations; {config.dtype}.')
  replicate = train.replicate
  p_train, p_eval = train.pmap_steps()
  train_images, train_labels = replicate(jnp.asarray(train_x)), replicate(jnp.asarray(train_y))
  test_images, test_labels = replicate(jnp.asarray(test_x)), replicate(jnp.asarray(test_y))
  replicated = replicate(state)
  picture_images = jnp.asarray(test_x[:PICTURE_EXAMPLES], jnp.float32) / 255.0
  picture_path = os.path.join(FLAGS.workdir, 'reconstructions.png')
  schedule = config.learning_rate_schedule()
  test_accuracy = None
  last_epoch = start_epoch if FLAGS.eval_only else max(start_epoch, config.epochs)

  for epoch in range(start_epoch + 1, last_epoch + 1):
    epoch_start = time.perf_counter()
    replicated, means, images_per_sec = train_epoch(
        p_train, replicated, train_images, train_labels, config, epoch, len(train_x),
        num_devices)
    test_loss, test_accuracy = evaluate(p_eval, replicated, test_images, test_labels,
                                        len(test_x), config.batch_size, num_devices)
    state = flax.jax_utils.unreplicate(replicated)
    step = int(state.step)
    record = {
        'epoch': epoch, 'step': step, 'train_loss': means['loss'],
        'train_margin_loss': means['margin_loss'],
        'train_reconstruction_loss': means['reconstruction_loss'],
        'train_accuracy': means['accuracy'], 'test_loss': test_loss,
        'test_accuracy': test_accuracy, 'test_error': 1.0 - test_accuracy,
        'learning_rate': float(schedule(step)), 'images_per_sec': images_per_sec,
        'epoch_seconds': time.perf_counter() - epoch_start, 'num_devices': num_devices,
    }
    log.append(record)  # before the checkpoint: a resume drops lines past the checkpoint
    checkpointer.save(epoch, state)
    if config.recon_weight > 0:
      draw_reconstructions(state, picture_images, test_y[:PICTURE_EXAMPLES], picture_path)
    say(f'epoch {epoch}/{config.epochs}  train loss {means["loss"]:.4f} '
        f'acc {100 * means["accuracy"]:.2f}%  test loss {test_loss:.4f} '
        f'acc {100 * test_accuracy:.2f}%  lr {record["learning_rate"]:.2e}  '
        f'{images_per_sec:.1f} images/s  {record["epoch_seconds"]:.1f}s')

  if test_accuracy is None:  # nothing left to train (or --eval_only): evaluate the checkpoint
    _, test_accuracy = evaluate(p_eval, replicated, test_images, test_labels,
                                        len(test_x), config.batch_size, num_devices)
    if config.recon_weight > 0:
      draw_reconstructions(state, picture_images, test_y[:PICTURE_EXAMPLES], picture_path)
  checkpointer.close()
  say(f'Test accuracy {100 * test_accuracy:.2f}%, test error {100 * (1 - test_accuracy):.2f}% '
      f'on {len(test_x)} images after epoch {last_epoch}.')
  return test_accuracy


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)
  runtime.restart_with_huge_pages()
  try:
    dataset = data.load_dataset(FLAGS.dataset, FLAGS.data_dir, log=say)
    run(dataset)
  except (data.DataError, ValueError) as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main)
