"""What every experiment shares: the config's flags, the data flags, and `main`'s error handling.

Every setting of `capsjax.training.TrainConfig` is a flag of the same name,
defined here once from the config's own fields (`capsjax.settings`), so a
config and a command line say the same thing.
"""

import datetime
import os
import shlex
import sys
from typing import Optional

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np

from capsjax import data, models, pretrained, settings, tasks, visualize
from capsjax.analysis import evaluate
from capsjax.errors import InputError
from capsjax.training import (
  RECIPES,
  TrainConfig,
  distributed,
  evaluation_params,
  rundir,
  stopping,
  train_and_evaluate,
)
from capsjax.training.loop import Splits
from capsjax.training.rundir import METRICS_FILE, read_metrics
from experiments import runtime
from experiments.console import end_status_line, is_writer, say, status  # noqa: F401

FLAGS = flags.FLAGS


def _define_setting(field, default):
  """One absl flag from a config field made by `capsjax.settings.setting`."""
  meta, name = field.metadata, settings.flag_name(field)
  if meta['choices']:
    flags.DEFINE_enum(name, default, list(meta['choices']), meta['help'])
  elif isinstance(default, bool):
    flags.DEFINE_bool(name, default, meta['help'])
  elif isinstance(default, int):
    flags.DEFINE_integer(name, default, meta['help'], lower_bound=meta['lower'],
                         upper_bound=meta['upper'])
  else:
    flags.DEFINE_float(name, default, meta['help'], lower_bound=meta['lower'],
                       upper_bound=meta['upper'])


SETTING_FLAGS = []
for _, _field, _default in settings.leaves(TrainConfig):
  if settings.is_setting(_field):
    _define_setting(_field, _default)
    SETTING_FLAGS.append(settings.flag_name(_field))

flags.DEFINE_enum('recipe', 'paper', sorted(RECIPES),
                  'A named recipe, setting the flags it lists that the command line does not: '
                  + '; '.join(f'{name}: ' + (', '.join(f'--{k}={v}' for k, v in values.items())
                                             or 'the defaults')
                              for name, values in RECIPES.items()) + '.')
flags.DEFINE_string('data_dir', None,
                    f'Folder of the four IDX files (default: ${data.DATA_DIR_ENV}, else tfds, '
                    'else a checksummed download).')
flags.DEFINE_enum('dataset', 'mnist', sorted(data.DATASETS), 'Dataset.')
flags.DEFINE_string('workdir', None, "The run's folder: run.json, metrics, checkpoints, pictures.")
flags.DEFINE_bool('eval_only', False, 'Evaluate the latest checkpoint in --workdir and stop.')
flags.DEFINE_bool('pretrained', False,
                  'Use the weights shipped with capsjax for --dataset (capsjax.pretrained) '
                  'instead of a run in --workdir: with --eval_only or --eval_file '
                  '(experiments.mnist) and in experiments.dimensions.')
flags.DEFINE_string('eval_file', None,
                    'Evaluate the latest checkpoint in --workdir on this .npz (image uint8 '
                    '[N, H, W] or [N, H, W, C], label int [N]), print its accuracy, write it to '
                    '--workdir/eval_NAME.json, and stop.')
flags.DEFINE_integer('test_seed', 0,
                     'Seed of a generated test set (MultiMNIST pairs, placed and affine digits).')
flags.DEFINE_string('export', None,
                    'Write the generated test set (--test_examples source digits, 0: all) to '
                    'this .npz and stop (experiments whose test set is generated).')
flags.DEFINE_string('coordinator_address', None,
                    'host:port of process 0, for a run over several processes (hosts), with '
                    '--num_processes and --process_id. Unset on SLURM and multi-host TPU VMs: '
                    'they are read from the environment.')
flags.DEFINE_integer('num_processes', None, 'Processes in the run (with --coordinator_address).',
                     lower_bound=1)
flags.DEFINE_integer('process_id', None, "This process's number, 0 at the coordinator address.",
                     lower_bound=0)


def config_from_flags(dataset: data.Dataset, **overrides) -> TrainConfig:
  """The `TrainConfig` the flags give for `dataset`, with `overrides` applied.

  A setting that --recipe sets takes the recipe's value unless its flag was
  given on the command line.

  Args:
    dataset: a `capsjax.data.Dataset` (its image shape and class count are
      used), or None to take them from `overrides`.
    **overrides: settings, by flag name, to set regardless of the flags.

  Returns:
    A `TrainConfig`.
  """
  recipe = RECIPES[FLAGS.recipe]
  values = {name: recipe[name] if name in recipe and not FLAGS[name].present
            else FLAGS[name].value for name in SETTING_FLAGS}
  if dataset is not None:
    values.update(image_shape=tuple(dataset.train_images.shape[1:]),
                  num_classes=dataset.num_classes)
  values.update(overrides)
  return TrainConfig.create(**values)


def reconstruction_pictures(images, labels, path):
  """A `pictures` callback for a CapsNet with a decoder: digits beside their reconstructions.

  Args:
    images: uint8 [N, H, W, 1], the digits to draw (N about 32).
    labels: int [N].
    path: the .png to write, captioned label and prediction, wrong ones in red.

  Returns:
    callable(state) that draws the picture with the state's evaluation parameters,
    each digit reconstructed from its predicted capsule.
  """
  images = jnp.asarray(images, jnp.float32) / 255.0

  @jax.jit
  def predict(state):
    return state.forward(evaluation_params(state), images)

  def draw(state):
    out = predict(state)
    predictions = np.asarray(jnp.argmax(out.scores, axis=-1))
    visualize.reconstruction_grid(np.asarray(images), np.asarray(out.reconstructions), labels,
                                  predictions, path)

  return draw


def count_parameters(config: TrainConfig) -> int:
  """Parameters of the model `config` builds, from shapes alone (nothing is allocated)."""
  model = models.build(config.model)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, *config.model.image_shape), jnp.float32))
  return models.parameter_counts(shapes['params'])['total']


def finished_record(workdir: str, epochs: int) -> Optional[dict]:
  """The last metrics record of a run in `workdir` that has trained all `epochs`, else None."""
  records = read_metrics(os.path.join(workdir, METRICS_FILE), log=say)
  return records[-1] if records and records[-1]['epoch'] >= epochs else None


def wall_seconds(workdir: str) -> float:
  """The seconds a run in `workdir` took: its epochs' (with their evaluations), summed."""
  return sum(record['epoch_seconds']
             for record in read_metrics(os.path.join(workdir, METRICS_FILE), log=say))


def train_or_read(config: TrainConfig, task, workdir: str, label: str) -> dict:
  """Train (resuming) the run in `workdir`, or read it back if it has trained all its epochs.

  A finished run is read back only if it was made with `config`'s settings (its
  epochs aside, which may be more): what a resume checks, else an InputError
  naming each difference.

  Args:
    config: the run's settings.
    task: its `capsjax.tasks.Task`, built for `workdir`.
    workdir: the run's folder.
    label: how the lines printed name the run, e.g. 'r = 3' or 'caps_r3 seed 0'.

  Returns:
    The run's last metrics record.
  """
  record = finished_record(workdir, config.epochs)
  if record:
    identity = rundir.run_identity(config, task, Splits(config, task, eval_only=False).counts)
    rundir.check_resumable(rundir.read_run_file(workdir), identity, workdir)
    say(f'{label}: finished before, test error {100 * record["test_error"]:.2f}% ({workdir}).')
    return record
  say(f'== {label} ({workdir})')
  train_and_evaluate(config, task, workdir, log=say, progress=status)
  return finished_record(workdir, config.epochs)


def study_settings(config: TrainConfig, dataset: data.Dataset, **specific) -> dict:
  """What every run of a study trains with, for its JSON and its table's header.

  Args:
    config: the config the flags give (`config_from_flags`).
    dataset: the `capsjax.data.Dataset` the runs train on.
    **specific: the study's own settings, placed after 'dataset'.

  Returns:
    dict: dataset, the study's settings, epochs, train_examples, test_examples
    (the counts used), batch_size, recipe, device and date.
  """
  device = jax.devices()[0]
  return {'dataset': FLAGS.dataset, **specific, 'epochs': config.epochs,
          'train_examples': config.data.train_examples or len(dataset.train_images),
          'test_examples': config.data.test_examples or len(dataset.test_images),
          'batch_size': config.batch_size, 'recipe': FLAGS.recipe,
          'device': f'{jax.device_count()} x {device.platform} ({device.device_kind})',
          'date': datetime.date.today().isoformat()}


def trained_run():
  """(config, state, identity) of the shipped weights (--pretrained) or of the run in --workdir.

  See `capsjax.tasks.load_run` and `capsjax.pretrained.load_run`.
  """
  if FLAGS.pretrained:
    return pretrained.load_run(FLAGS.dataset)
  if not FLAGS.workdir:
    raise InputError('give --workdir, the folder of a trained run, or --pretrained for the '
                     'shipped weights.')
  return tasks.load_run(FLAGS.workdir)


def output_folder(name: str) -> str:
  """Where a command that reads a trained run writes: --workdir; with --pretrained, the
  --workdir given (made if missing, refused if it holds a run, whose own results the
  shipped weights' would overwrite) or else runs/pretrained-<name>."""
  if not FLAGS.pretrained:
    return FLAGS.workdir
  folder = FLAGS.workdir if FLAGS['workdir'].present else os.path.join('runs',
                                                                       f'pretrained-{name}')
  if os.path.exists(os.path.join(folder, rundir.RUN_FILE)):
    raise InputError(f'--workdir={folder} holds a trained run, whose results the shipped '
                     f'weights\' would overwrite; give --pretrained another --workdir.')
  try:
    os.makedirs(folder, exist_ok=True)
  except OSError as e:
    raise InputError(f'cannot make {folder} ({e.strerror}); give --workdir, a folder to '
                     f'write into.') from None
  return folder


def load_data() -> data.Dataset:
  """The dataset --dataset and --data_dir name (see `capsjax.data.load_dataset`)."""
  return data.load_dataset(FLAGS.dataset, FLAGS.data_dir, log=say)


def _module_name() -> str:
  """The running experiment as `python -m` names it: 'experiments.mnist'."""
  return os.path.splitext(os.path.relpath(sys.argv[0]))[0].replace(os.sep, '.')


def run_main(body, pretrained_ok: bool = False):
  """absl main for an experiment: set up the process, run `body()`, report input errors.

  With --eval_file, the run in --workdir (or with --pretrained, the shipped
  weights) is evaluated on that file instead of `body()`. --pretrained is
  refused unless `pretrained_ok` (the experiments that have shipped weights).

  Set-up is joining the run's other processes (see `capsjax.training.distributed`),
  or for a single process a restart onto huge pages (see `experiments.runtime`).
  An `InputError` (bad flags, data, workdir; divergence) ends the process with
  one line on stderr and exit status 1; anything else keeps its traceback.
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
      if FLAGS.pretrained and not pretrained_ok:
        raise InputError(f'--pretrained: there are no shipped weights for {_module_name()}; '
                         f'use it with experiments.mnist or experiments.dimensions.')
      if FLAGS.eval_file:
        run = trained_run()  # first: shipped weights that are missing fail before anything
        evaluate.evaluate_file(output_folder(FLAGS.dataset), FLAGS.eval_file, log=say, run=run)
      else:
        body()
    except InputError as e:
      sys.exit(f'error: {e}')
    except stopping.Stopped as e:
      end_status_line()
      if is_writer():
        print(f'{e}\n  resume: python -m {_module_name()} {shlex.join(sys.argv[1:])}',
              file=sys.stderr,
              flush=True)
      sys.exit(e.exit_status)

  app.run(main)
