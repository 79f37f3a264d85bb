"""What every experiment shares: the recipe's flags, the data flags, and `main`'s error handling.

Each TrainConfig field is a flag of the same name, so a config and a command
line say the same thing.
"""

import dataclasses
import sys

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np

from capsjax import conv, data, distributed, evaluate, runtime, train, visualize
from capsjax.errors import InputError

DEFAULTS = train.TrainConfig()
FLAGS = flags.FLAGS
flags.DEFINE_enum('model', DEFAULTS.model, train.MODELS,
                  "capsnet (the paper's CapsNet) or baseline (the paper's CNN).")
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
flags.DEFINE_enum('lr_schedule', DEFAULTS.lr_schedule, train.LR_SCHEDULES,
                  "exponential (the paper's, by --lr_decay) or cosine (a linear warm-up over "
                  '--warmup_epochs, then a cosine decay to 0 at the last epoch\'s end; such a '
                  'run resumes only with the same --epochs).')
flags.DEFINE_float('warmup_epochs', DEFAULTS.warmup_epochs,
                   'Epochs of linear learning rate warm-up (cosine schedule).', lower_bound=0)
flags.DEFINE_float('ema_decay', DEFAULTS.ema_decay,
                   'Evaluate an exponential moving average of the weights with this decay '
                   '(0: the trained weights).', lower_bound=0, upper_bound=0.999999)
flags.DEFINE_float('weight_decay', DEFAULTS.weight_decay,
                   'Decoupled weight decay of the kernels, as AdamW (0: Adam, the paper\'s).',
                   lower_bound=0)
flags.DEFINE_enum('recipe', 'paper', sorted(train.RECIPES),
                  'A named recipe, setting the flags it lists that the command line does not: '
                  + '; '.join(f'{name}: ' + (', '.join(f'--{k}={v}' for k, v in values.items())
                                             or 'the defaults')
                              for name, values in train.RECIPES.items()) + '.')
flags.DEFINE_float('recon_weight', DEFAULTS.recon_weight,
                   'Weight of the reconstruction loss; 0 drops the decoder.', lower_bound=0)
flags.DEFINE_integer('shift_pixels', DEFAULTS.shift_pixels,
                     'Random shifts of up to this many pixels (0: none).', lower_bound=0)
flags.DEFINE_integer('seed', DEFAULTS.seed, 'Seed for the initialisation, order and shifts.')
flags.DEFINE_enum('dtype', DEFAULTS.dtype, sorted(train.DTYPES),
                  'Compute dtype (bfloat16: mixed precision, float32 parameters and loss).')
flags.DEFINE_enum('conv_impl', DEFAULTS.conv_impl, list(conv.CONV_IMPLS),
                  'Convolution: auto (matmul on the CPU, xla on GPU and TPU), matmul (im2col '
                  'matrix products) or xla (lax.conv).')
flags.DEFINE_integer('conv_features', DEFAULTS.conv_features, 'Conv1 channels.', lower_bound=1)
flags.DEFINE_integer('primary_types', DEFAULTS.primary_types, 'Primary capsule maps.',
                     lower_bound=1)
flags.DEFINE_integer('primary_dim', DEFAULTS.primary_dim, 'Primary capsule dimension.',
                     lower_bound=1)
flags.DEFINE_integer('digit_dim', DEFAULTS.digit_dim, 'Class capsule dimension.', lower_bound=1)
flags.DEFINE_float('dropout_rate', DEFAULTS.dropout_rate, "Baseline CNN's dropout rate.",
                   lower_bound=0, upper_bound=1)
flags.DEFINE_integer('baseline_conv3_features', DEFAULTS.baseline_conv3_features,
                     "Channels of the baseline CNN's third convolution.", lower_bound=1)
flags.DEFINE_integer('baseline_pool', DEFAULTS.baseline_pool,
                     "Max pooling window and stride after the baseline CNN's first convolution "
                     "(1: none, the paper's).", lower_bound=1)

flags.DEFINE_integer('train_examples', 0, 'Train on the first N examples (0: all).', lower_bound=0)
flags.DEFINE_integer('validation_examples', 0,
                     'Hold out the last N training examples and evaluate them every epoch, '
                     'to choose settings by (0: none).', lower_bound=0)
flags.DEFINE_integer('test_examples', 0, 'Evaluate on the first N examples (0: all).',
                     lower_bound=0)
flags.DEFINE_string('data_dir', None,
                    f'Folder of the four IDX files (default: ${data.DATA_DIR_ENV}, else tfds, '
                    'else a checksummed download).')
flags.DEFINE_enum('dataset', 'mnist', sorted(data.DATASETS), 'Dataset.')
flags.DEFINE_string('workdir', None, "The run's folder: run.json, metrics, checkpoints, pictures.")
flags.DEFINE_bool('eval_only', False, 'Evaluate the latest checkpoint in --workdir and stop.')
flags.DEFINE_string('eval_file', None,
                    'Evaluate the latest checkpoint in --workdir on this .npz (image uint8 '
                    '[N, H, W] or [N, H, W, C], label int [N]), print its accuracy, write it to '
                    '--workdir/eval_NAME.json, and stop.')
flags.DEFINE_integer('test_seed', 0,
                     'Seed of a generated test set (MultiMNIST pairs, placed and affine digits).')
flags.DEFINE_string('export', None,
                    'Write the generated test set (--test_examples source digits, 0: all) to '
                    'this .npz and stop (experiments whose test set is generated).')
flags.DEFINE_float('progress_seconds', 20.0, 'Seconds between progress lines within an epoch.')
flags.DEFINE_string('coordinator_address', None,
                    'host:port of process 0, for a run over several processes (hosts), with '
                    '--num_processes and --process_id. Unset on SLURM and multi-host TPU VMs: '
                    'they are read from the environment.')
flags.DEFINE_integer('num_processes', None, 'Processes in the run (with --coordinator_address).',
                     lower_bound=1)
flags.DEFINE_integer('process_id', None, "This process's number, 0 at the coordinator address.",
                     lower_bound=0)


def is_writer():
  """Whether this process writes the run's files and lines (the first of a multi-process run)."""
  return jax.process_index() == 0


def say(message):
  if is_writer():
    print(message, flush=True)


def config_from_flags(dataset, **overrides):
  """The `train.TrainConfig` the flags give for `dataset`, with `overrides` applied.

  A field that --recipe sets takes the recipe's value unless its flag was given
  on the command line.

  Args:
    dataset: a `capsjax.data.Dataset` (its image shape and class count are used).
    **overrides: TrainConfig fields to set regardless of the flags.

  Returns:
    A `train.TrainConfig`.
  """
  recipe = train.RECIPES[FLAGS.recipe]
  values = {f.name: recipe[f.name] if f.name in recipe and not FLAGS[f.name].present
            else FLAGS[f.name].value
            for f in dataclasses.fields(train.TrainConfig) if f.name in FLAGS}
  values.update({'image_shape': dataset.train_images.shape[1:],
                 'num_classes': dataset.num_classes, **overrides})
  return train.TrainConfig(**values)


def reconstruction_pictures(images, labels, path):
  """A `pictures` callback for a CapsNet with a decoder: digits beside their reconstructions.

  Args:
    images: uint8 [N, H, W, 1], the digits to draw (N about 32).
    labels: int [N].
    path: the .png to write, captioned label and prediction, wrong ones in red.

  Returns:
    callable(state) that draws the picture with the state's evaluation parameters.
  """
  images = jnp.asarray(images, jnp.float32) / 255.0

  def draw(state):
    out = jax.jit(state.apply_fn)({'params': train.evaluation_params(state)}, images)
    predictions = np.asarray(jnp.argmax(out.lengths, axis=-1))
    visualize.reconstruction_grid(np.asarray(images), np.asarray(out.reconstructions), labels,
                                  predictions, path)

  return draw


def load_data():
  """The dataset --dataset and --data_dir name (see `capsjax.data.load_dataset`)."""
  return data.load_dataset(FLAGS.dataset, FLAGS.data_dir, log=say)


def run_main(body):
  """absl main for an experiment: set up the process, run `body()`, report input errors.

  With --eval_file, the run in --workdir is evaluated on that file instead of `body()`.

  Set-up is joining the run's other processes (see `capsjax.distributed`), or
  for a single process a restart onto huge pages (see `capsjax.runtime`). An
  `InputError` (bad flags, data, workdir; divergence) ends the process with one
  line on stderr and exit status 1; anything else keeps its traceback.
  """

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    logging.set_verbosity(logging.WARNING)
    # Asking JAX's platform (which the restart does) before joining the other
    # processes is not allowed, and a restart would leave them: a run over several
    # processes keeps the default malloc.
    if FLAGS.coordinator_address is None and distributed.cluster_in_environment() is None:
      runtime.restart_with_huge_pages()
    try:
      distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
      if FLAGS.eval_file:
        evaluate.evaluate_file(FLAGS.workdir, FLAGS.eval_file, log=say)
      else:
        body()
    except InputError as e:
      sys.exit(f'error: {e}')

  app.run(main)
