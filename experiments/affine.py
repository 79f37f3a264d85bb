"""Robustness to affine transformations (the paper's section 5.2): train on expanded MNIST,
test on affine-transformed digits.

    python -m experiments.affine --model=capsnet --data_dir=PATH/TO/mnist
    python -m experiments.affine --model=baseline --data_dir=PATH/TO/mnist
    python -m experiments.affine --compare=runs/affine_capsnet,runs/affine_baseline

Training digits sit at a random position on a 40x40 black canvas, drawn afresh
every step on the device, and nothing else (`capsjax.data.affine`); the expanded MNIST
test set is placed once for --test_seed. Every epoch also tests the affine digits:
the official affNIST test set with --affnist_dir, else --affine_copies random
affine versions of each MNIST test digit generated for --test_seed ("affine-
transformed MNIST, generated"). metrics.jsonl holds 'test_*' (expanded MNIST) and
'affine_*' per epoch; affine.png shows affine test digits, their reconstructions
and predictions, wrong ones in red.

--model=baseline is the paper's CNN adapted to 40x40 inputs: a 2x2 max pool after
the first convolution and 96 channels in the third (--baseline_pool=2
--baseline_conv3_features=96 unless given), 14.9M parameters against CapsNet's
13.5M (the paper's 35.4M-parameter CNN would have 69.7M here).

--compare=DIR,DIR writes comparison.md and comparison.json to --workdir: for each
run, the epoch of highest validation accuracy (train with --validation_examples),
the images trained on by then, and its expanded MNIST and affine test accuracy,
beside the paper's figures.
--export=FILE.npz writes the generated affine test set instead of training.
"""

import os
from typing import Dict, List, Optional, Sequence, Tuple

from absl import flags
import numpy as np

from capsjax import files, models
from capsjax.data import Dataset, affine
from capsjax.errors import InputError
from capsjax.tasks import classification_losses
from capsjax.training import Task, train_and_evaluate
from capsjax.training.rundir import METRICS_FILE, load_run_identity, read_metrics
from experiments import common

FLAGS = flags.FLAGS
FLAGS.set_default('workdir', 'runs/affine')
flags.DEFINE_integer('affine_copies', 1,
                     'Random affine versions of each MNIST test digit in the generated test set.',
                     lower_bound=1)
flags.DEFINE_string('affnist_dir', None,
                    'Folder of the official affNIST test set (test.mat or test_batches/*.mat); '
                    'without it the affine test set is generated.')
flags.DEFINE_list('compare', None, 'Workdirs of trained runs to compare (see the docstring).')

# The paper's section 5.2: both models at about 99.2% on expanded MNIST.
PAPER = {'capsnet': {'expanded_mnist': 0.9923, 'affnist': 0.79},
         'baseline': {'expanded_mnist': 0.9922, 'affnist': 0.66}}
PICTURE_EXAMPLES = 32
# The baseline CNN for the 40x40 canvas, with about CapsNet's parameter count there.
CANVAS_BASELINE = {'baseline_conv3_features': 96, 'baseline_pool': 2}


def affine_test_set(dataset: Dataset) -> Tuple[str, np.ndarray, np.ndarray,
                                                Optional[Dict[str, np.ndarray]]]:
  """The affine test digits the flags name: the official set, or one generated.

  Args:
    dataset: the MNIST `capsjax.data.Dataset` (its test digits are transformed).

  Returns:
    (name, images uint8 [N, 40, 40, 1], labels int32 [N], the generated set's
    arrays (see `capsjax.data.affine.generate`) or None for the official one).
  """
  if FLAGS.affnist_dir:
    images, labels = affine.read_affnist(FLAGS.affnist_dir)
    count = FLAGS.test_examples or len(images)
    return affine.AFFNIST_NAME, images[:count], labels[:count], None
  count = FLAGS.test_examples or len(dataset.test_images)
  generated = affine.generate(dataset.test_images[:count], dataset.test_labels[:count],
                              FLAGS.affine_copies, FLAGS.test_seed)
  return affine.GENERATED_NAME, generated['image'], generated['label'], generated


def chosen_epoch(workdir: str) -> dict:
  """The record of a run's epoch of highest validation accuracy (the first, on ties)."""
  records = read_metrics(os.path.join(workdir, METRICS_FILE))
  if not records or 'validation_accuracy' not in records[0] or 'affine_accuracy' not in records[0]:
    raise InputError(f'{workdir}: no epochs of an affine run with a validation split; train '
                     f'it with python -m experiments.affine --validation_examples=N.')
  return max(records, key=lambda r: (r['validation_accuracy'], -r['epoch']))


def compare(workdirs: Sequence[str], out_dir: str) -> List[dict]:
  """Write comparison.md and comparison.json for the runs in `workdirs`."""
  rows = []
  for workdir in workdirs:
    identity = load_run_identity(workdir)
    record = chosen_epoch(workdir)
    rows.append({'workdir': workdir, 'model': identity['model'],
                 'affine_test': identity['affine_test'], 'epoch': record['epoch'],
                 'epochs_run': len(read_metrics(os.path.join(workdir, METRICS_FILE))),
                 'images_trained': record['step'] * identity['batch_size'],
                 'validation_accuracy': record['validation_accuracy'],
                 'expanded_mnist_accuracy': record['test_accuracy'],
                 'affine_accuracy': record['affine_accuracy'],
                 'paper': PAPER.get(identity['model'])})
  lines = ['| run | model | epoch (by validation) | images trained on | validation | '
           'expanded MNIST test | affine test | paper: expanded MNIST | paper: affNIST |',
           '|' + ' --- |' * 9]
  for row in rows:
    paper = row['paper'] or {}
    lines.append(
        f'| {row["workdir"]} | {row["model"]} | {row["epoch"]} of {row["epochs_run"]} | '
        f'{row["images_trained"]:,} | '
        f'{100 * row["validation_accuracy"]:.2f}% | {100 * row["expanded_mnist_accuracy"]:.2f}% | '
        f'{100 * row["affine_accuracy"]:.2f}% ({row["affine_test"]}) | '
        + ' | '.join(f'{100 * paper[k]:.2f}%' if k in paper else '-'
                     for k in ('expanded_mnist', 'affnist')) + ' |')
  os.makedirs(out_dir, exist_ok=True)
  files.write_json(os.path.join(out_dir, 'comparison.json'), rows)
  files.write_text(os.path.join(out_dir, 'comparison.md'), '\n'.join(lines) + '\n')
  common.say('\n'.join(lines) + f'\nWrote {out_dir}/comparison.md and comparison.json.')
  return rows


def main() -> None:
  if FLAGS.compare:
    compare(FLAGS.compare, FLAGS.workdir)
    return
  if FLAGS['shift_pixels'].present:
    raise InputError('--shift_pixels does not apply: expanded MNIST places each digit '
                     'anywhere on the 40x40 canvas instead.')
  if FLAGS.export and FLAGS.affnist_dir:
    raise InputError('--export writes the generated test set; drop --affnist_dir.')
  dataset = common.load_data()
  height, width = dataset.train_images.shape[1:3]
  if height > affine.CANVAS or width > affine.CANVAS:
    raise InputError(f'{dataset.source}: the digits are {height}x{width}, larger than the '
                     f'{affine.CANVAS}x{affine.CANVAS} canvas expanded MNIST places them on; '
                     f'give digits of at most that size (MNIST\'s are 28x28).')
  name, images, labels, generated = affine_test_set(dataset)
  if FLAGS.export:
    files.save_npz(FLAGS.export, generated)
    common.say(f'Wrote {len(labels)} digits of {name} (test seed {FLAGS.test_seed}, '
               f'{FLAGS.affine_copies} per MNIST test digit) to {FLAGS.export}.')
    return
  channels = dataset.train_images.shape[-1]
  config = common.config_from_flags(
      dataset, shift_pixels=0, image_shape=(affine.CANVAS, affine.CANVAS, channels),
      **{name: value for name, value in CANVAS_BASELINE.items() if not FLAGS[name].present})
  common.say(f'Affine test set: {name}, {len(labels)} digits.')
  pictures = None
  if models.has_decoder(config.model):
    pictures = common.reconstruction_pictures(images[:PICTURE_EXAMPLES], labels[:PICTURE_EXAMPLES],
                                              os.path.join(FLAGS.workdir, 'affine.png'))
  task = Task(name=f'expanded {FLAGS.dataset}', dataset=dataset, loss_fn=classification_losses,
              make_batch=affine.batch_maker(FLAGS.test_seed),
              more_tests={'affine': (images, labels)},
              settings={'test_seed': FLAGS.test_seed, 'affine_test': name,
                        'affine_copies': None if FLAGS.affnist_dir else FLAGS.affine_copies},
              pictures=pictures)
  train_and_evaluate(config, task, FLAGS.workdir, eval_only=FLAGS.eval_only, log=common.say,
                     progress=common.status)


if __name__ == '__main__':
  common.run_main(main)
