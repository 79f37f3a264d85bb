"""The paper's results in one command: each experiment in turn, resuming, and one results table.

    python -m experiments.reproduce --data_dir=PATH/TO/mnist                # everything
    python -m experiments.reproduce --estimate_only                         # how long, here
    python -m experiments.reproduce --only=mnist,multimnist --seeds=1

Parts, in this order (--only picks some):
  mnist       the paper's recipe, --epochs epochs, seeds 0..--seeds-1 (the paper: 0.25%
              test error, mean of 3 trials)
  table1      the paper's Table 1: the baseline and the four CapsNet rows, the same
              epochs and seeds (its 3-iteration reconstruction row is the mnist part's runs)
  multimnist  the paper's CapsNet on MultiMNIST, --multimnist_epochs epochs of 60,000
              new pairs (the paper: 60M pairs, 5.0% error)
  affine      CapsNet and the baseline on expanded MNIST with 5,000 training digits held
              out, each until its validation accuracy passes 99.0% (at most
              --affine_epochs epochs), then compared on affine digits at each one's best
              validation epoch (the paper: 79% against 66% on affNIST)
Each part is its experiment's own command (printed before it runs) in a folder of
--workdir, so a stopped reproduction resumes where it stopped and a finished run is
read back. First, one training step of each model is timed on this device
(`experiments.benchmark`) and the time each part still needs is printed. After
each part, --workdir/results.md and results.json hold every result so far: the
paper's figure, ours, epochs, wall time, device.
"""

import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
from typing import Dict, Sequence, Tuple

from absl import flags
import jax

from capsjax.errors import InputError
from capsjax.training import RECIPES
from experiments import common
from experiments.reproduction import (
  PARTS,
  Plan,
  epochs_done,
  hours,
  planned_runs,
  remaining_seconds,
  runs_of,
  write_results,
)
import experiments.table1  # noqa: F401  (its --seeds flag is this command's too)

FLAGS = flags.FLAGS
FLAGS.set_default('workdir', 'runs/reproduce')
flags.DEFINE_list('only', list(PARTS), f'Parts to run, in the order {", ".join(PARTS)}.')
flags.DEFINE_integer('multimnist_epochs', 50, 'Epochs of the MultiMNIST run.', lower_bound=1)
flags.DEFINE_integer('affine_epochs', 50, 'Most epochs of each affine run.', lower_bound=1)
flags.DEFINE_bool('estimate_only', False, 'Print the time each part needs here and stop.')
# Given to each run by reproduce itself: not passed on as given.
OWN_FLAGS = ('epochs', 'seeds', 'workdir', 'data_dir')

# What each step key times: experiments.benchmark's flags.
BENCHMARKS = {
    28: ['--models=capsnet,baseline', '--routing_iters=1,3', '--image_size=28'],
    36: ['--models=capsnet', '--routing_iters=3', '--image_size=36'],
    40: ['--models=capsnet,baseline', '--routing_iters=3', '--image_size=40',
         '--baseline_conv3_features=96', '--baseline_pool=2'],
}



def step_seconds(sizes: Sequence[int], batch_size: int, dtype: str) -> Dict[str, float]:
  """Seconds of one training step of the paper's models at `batch_size` (split over the
  local devices) in `dtype` on this device, by 'capsnet rN SIZE' and 'baseline SIZE',
  from `experiments.benchmark`."""
  per_device = max(1, batch_size // jax.local_device_count())
  seconds = {}
  with tempfile.TemporaryDirectory() as folder:
    for size in sizes:
      out = os.path.join(folder, f'{size}.json')
      subprocess.run([sys.executable, '-m', 'experiments.benchmark', *BENCHMARKS[size],
                      f'--batch_sizes={per_device}', f'--dtypes={dtype}', '--modes=train',
                      '--routing_batch=0', '--repeats=3', f'--json={out}'],
                     check=True, stdout=subprocess.DEVNULL)
      for row in json.load(open(out))['model']:
        iters = f' r{row["routing_iters"]}' if row['routing_iters'] else ''
        seconds[f'{row["model"]}{iters} {size}'] = row['ms'] / 1e3
  return seconds


def run_child(command: Sequence[str]) -> int:
  """Run `command` in a session of its own, passing SIGINT and SIGTERM on to it.

  Only this process receives a terminal's Ctrl-C or a signal to the process
  group, and forwards it once, so the child saves its checkpoint and stops (a
  second signal stops it at once, as it would alone). Returns the child's exit
  status, 128 + N if a signal N ended it.
  """
  handlers = {}
  child = subprocess.Popen(command, start_new_session=True)
  try:
    for signum in (signal.SIGINT, signal.SIGTERM):
      handlers[signum] = signal.signal(signum, lambda number, _: child.send_signal(number))
    status = child.wait()
  finally:
    for signum, handler in handlers.items():
      signal.signal(signum, handler)
  return 128 - status if status < 0 else status


# Flags that make no sense for a reproduction: it trains, and sets these per run.
REFUSED_FLAGS = ('eval_only', 'eval_file', 'export', 'pretrained', 'model', 'seed',
                 'routing_iters', 'recon_weight', 'validation_examples',
                 'stop_at_validation_accuracy')


def check_flags(parts: Sequence[str]) -> None:
  """Raise an `InputError` for a flag reproduce cannot honour (before anything runs)."""
  given = [name for name in REFUSED_FLAGS if FLAGS[name].present]
  if given:
    raise InputError(f'--{given[0]} is not a reproduce flag: each part sets its runs\' models, '
                     f'seeds and splits; run the experiment itself for other settings.')
  if FLAGS['shift_pixels'].present and {'multimnist', 'affine'} & set(parts):
    raise InputError('--shift_pixels applies to the MNIST runs only (MultiMNIST and affine '
                     'place their digits themselves): add --only=mnist,table1.')
  if 'model' in RECIPES[FLAGS.recipe]:
    raise InputError(f'--recipe={FLAGS.recipe} trains another model than the paper\'s; give '
                     f'a recipe of the paper\'s CapsNet (paper or fast).')


def recipe_value(name: str):
  """A setting as the runs will have it: the flag if given, else the recipe's, else the default."""
  recipe = RECIPES[FLAGS.recipe]
  return recipe[name] if name in recipe and not FLAGS[name].present else FLAGS[name].value


def main() -> None:
  unknown = [part for part in FLAGS.only if part not in PARTS]
  if unknown:
    raise InputError(f'--only={",".join(FLAGS.only)}: {", ".join(unknown)} is not a part; '
                     f'choose among {",".join(PARTS)}.')
  parts = [part for part in PARTS if part in FLAGS.only]
  check_flags(parts)
  plan = Plan(seeds=FLAGS.seeds, epochs=recipe_value('epochs'),
              multimnist_epochs=FLAGS.multimnist_epochs, affine_epochs=FLAGS.affine_epochs,
              batch_size=recipe_value('batch_size'),
              train_examples=FLAGS.train_examples, test_examples=FLAGS.test_examples,
              passed=passed_flags())
  todo = planned_runs(parts, FLAGS.workdir, plan)
  sizes = sorted({int(run.step.split()[-1]) for runs in todo.values() for run in runs})
  common.say(f'Timing a training step of each model on {jax.devices()[0].device_kind} '
             f'(experiments.benchmark)...')
  seconds = step_seconds(sizes, plan.batch_size, FLAGS.dtype)
  common.say('| part | runs | epochs left | time left here |\n| --- | --- | --- | --- |')
  for part, runs in todo.items():
    left = sum(max(0, r.epochs - epochs_done(r.workdir)) for r in runs)
    common.say(f'| {part} | {len(runs)} | {left} | '
               f'{hours(sum(remaining_seconds(r, seconds, plan) for r in runs))} |')
  if FLAGS.estimate_only:
    return
  for part in parts:
    runs = runs_of(part, FLAGS.workdir, plan)
    folders = ([os.path.join(FLAGS.workdir, 'table1')] if part == 'table1'
               else [run.workdir for run in runs])
    for run, folder in zip(runs, folders):
      command = run.command(FLAGS.data_dir, folder)
      common.say(f'== {part}: python -m {shlex.join(command[2:])}')
      status = run_child(command)
      if status:
        sys.exit(status)
    if part == 'affine':
      status = run_child([sys.executable, '-m', 'experiments.affine',
                          f'--compare={",".join(folders)}',
                          f'--workdir={os.path.join(FLAGS.workdir, "affine")}'])
      if status:
        sys.exit(status)
    common.say(write_results(FLAGS.workdir, plan))


def passed_flags() -> Tuple[str, ...]:
  """The training flags given on this command line, for every run (`--recipe`, `--dtype`...)."""
  names = [*common.SETTING_FLAGS, 'recipe', 'dataset', 'test_seed']
  return tuple(FLAGS[name].serialize() for name in names
               if FLAGS[name].present and name not in OWN_FLAGS)


if __name__ == '__main__':
  common.run_main(main)
