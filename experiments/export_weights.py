"""Write a trained run's weights as a capsjax weights file (`capsjax.pretrained`).

    python -m experiments.export_weights --workdir=runs/mnist \\
        --out=capsjax/weights/mnist_capsnet.npz --data_dir=PATH/TO/mnist

Takes the evaluation parameters of the run's latest checkpoint (the moving
average when the run keeps one), stores them as float32 when that fits
--max_mb and as bfloat16 otherwise (or as --weights_dtype says), and measures
what is stored, after the cast: its accuracy on the run's test split and on
the first 1,000 test images (what the shipped file's test checks), beside the
accuracy before the cast. Prints the file's size and sha256: the entry for
`capsjax.pretrained.SHIPPED`.
"""

import datetime
import os

from absl import flags
import jax
import numpy as np

from capsjax import data, files, pretrained, tasks
from capsjax.errors import InputError
from capsjax.training import Task, evaluation_params
from capsjax.training.loop import evaluate_state
from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_string('out', None, 'The .npz to write.')
flags.DEFINE_enum('weights_dtype', 'auto', ['auto', *pretrained.STORED_DTYPES],
                  'How to store the parameters: auto is float32 if the file fits --max_mb, '
                  'else bfloat16.')
flags.DEFINE_float('max_mb', pretrained.MAX_BYTES / 1e6,
                   'Largest file to write, in MB (10^6 bytes).', lower_bound=0.1)

FIRST_TEST_IMAGES = 1000


def _accuracies(config, dataset, identity, params, state):
  """(test accuracy, accuracy on the first FIRST_TEST_IMAGES) of `params`, as the run evaluates."""
  task = Task(name=identity['dataset'], dataset=dataset,
              loss_fn=tasks.loss_by_name(identity['loss']))
  state = state.replace(params=params, ema=None)
  first = config.replace(test_examples=FIRST_TEST_IMAGES)
  return (evaluate_state(config, task, state)['test_accuracy'],
          evaluate_state(first, task, state)['test_accuracy'])


def main():
  if not FLAGS.workdir or not FLAGS.out:
    raise InputError('give --workdir (a trained run) and --out (the .npz to write).')
  config, state, identity = tasks.load_run(FLAGS.workdir)
  if state.model_state:
    raise InputError(f'{FLAGS.workdir}: a {config.model.name} keeps batch statistics, which '
                     f'weights files do not hold; export a CapsNet or the baseline.')
  if identity['loss'] != 'classification_losses':
    raise InputError(f'{FLAGS.workdir}: a run of {identity["loss"]}; weights files are made '
                     f'of MNIST-format classification runs (experiments.mnist, table1).')
  dataset = data.load_dataset(identity['dataset'], FLAGS.data_dir, log=common.say)
  if tuple(config.model.image_shape) != dataset.train_images.shape[1:]:
    raise InputError(f'{FLAGS.workdir}: trained on {tuple(config.model.image_shape)} images, '
                     f'not the dataset\'s own {dataset.train_images.shape[1:]} (an affine or '
                     f'MultiMNIST run); export runs of experiments.mnist or table1.')
  params = jax.device_get(evaluation_params(state))
  float32_bytes = sum(np.asarray(p).size * 4 for p in jax.tree.leaves(params))
  dtype = FLAGS.weights_dtype
  if dtype == 'auto':
    # The file is compressed, but trained float32 weights barely shrink.
    dtype = 'float32' if float32_bytes <= FLAGS.max_mb * 1e6 else 'bfloat16'
  cast = pretrained.rounded(params, dtype)
  before, _ = _accuracies(config, dataset, identity, params, state)
  after, first = _accuracies(config, dataset, identity, cast, state)
  device = jax.devices()[0]
  about = {'epoch': identity['epoch'], 'step': int(state.step),
           'source': FLAGS.workdir, 'checkpoint': identity['checkpoint'],
           'test_accuracy': after, 'test_accuracy_before_cast': before,
           f'first_{FIRST_TEST_IMAGES}_test_accuracy': first,
           'device': f'{jax.device_count()} x {device.platform} ({device.device_kind})',
           'date': datetime.date.today().isoformat()}
  size = pretrained.save(FLAGS.out, params, identity, about, dtype, int(FLAGS.max_mb * 1e6))
  common.say(f'Wrote {FLAGS.out}: {size / 1e6:.1f} MB, {dtype}, from '
             f'{identity["checkpoint"]} of {FLAGS.workdir}; test accuracy '
             f'{100 * after:.2f}% ({100 * before:.2f}% before the cast), '
             f'{100 * first:.1f}% on the first {FIRST_TEST_IMAGES} test images.')
  common.say(f"  capsjax.pretrained.SHIPPED entry: Shipped('{os.path.basename(FLAGS.out)}', "
             f"'{files.file_sha256(FLAGS.out)}')")


if __name__ == '__main__':
  common.run_main(main)
