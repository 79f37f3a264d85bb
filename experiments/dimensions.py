"""What each dimension of a class capsule encodes (Figure 4), and where routing sends evidence.

    python -m experiments.dimensions --workdir=runs/mnist --data_dir=PATH/TO/mnist
    python -m experiments.dimensions --pretrained   # shipped weights; into runs/pretrained-mnist

Loads the latest checkpoint of a trained CapsNet run and, for the first
--digits test digits, adds -0.25, -0.20, ..., +0.25 to each of the 16
dimensions of the predicted class capsule in turn and decodes every perturbed
capsule: --workdir/dimensions.png, a block per digit with a row per dimension
and a column per value. --workdir/couplings.png shows, for the same digits, which
share of each primary-capsule position's evidence the last routing iteration
couples to each class. The run's settings and dataset come from its run.json;
--data_dir (or $CAPSJAX_DATA_DIR) says where that dataset's files are.
"""

import functools
import os
from typing import Any, Mapping, Tuple

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from capsjax import data, models, visualize
from capsjax.analysis import interpret
from capsjax.errors import InputError
from capsjax.training import TrainConfig, evaluation_params
from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_integer('digits', 6, 'Test digits to draw, the first N of the test set.',
                     lower_bound=1)


def check_decoder(config: TrainConfig, workdir: str) -> None:
  """Raise an `InputError` unless `config` (of the run in `workdir`) is a CapsNet with a decoder."""
  if config.model.name != 'capsnet':
    raise InputError(f'{workdir} holds a {config.model.name} run; the dimension sheet and the '
                     f'coupling maps are drawn for the paper\'s CapsNet (--model=capsnet) only.')
  if not models.has_decoder(config.model):
    raise InputError(f'{workdir} holds a {config.model.name} run without a decoder '
                     f'(recon_weight {config.model.recon_weight}); the dimension sheet decodes '
                     f'capsules, so train a CapsNet with --recon_weight > 0.')


def draw(config: TrainConfig, params: Mapping[str, Any], images: jax.Array, labels: np.ndarray,
         workdir: str, where: str) -> Tuple[str, str, np.ndarray]:
  """Draw dimensions.png and couplings.png of a trained CapsNet into `workdir`.

  Args:
    config: the run's `capsjax.training.TrainConfig` (a CapsNet with a decoder).
    params: its parameters (single device).
    images: float32 [N, H, W, C] in [0, 1], the digits to draw.
    labels: int [N], their labels.
    workdir: the folder the pictures go to.
    where: words naming the run and epoch, for the titles.

  Returns:
    (sheet path, coupling figure path, predictions int [N]).
  """
  check_decoder(config, workdir)
  result = jax.device_get(jax.jit(functools.partial(interpret.analyse, models.build(config.model)))(
      params, images))
  predictions = result['predictions']
  captions = [f'test digit {n}: label {label}, predicted {prediction}'
              for n, (label, prediction) in enumerate(zip(labels, predictions))]
  sheet = os.path.join(workdir, 'dimensions.png')
  visualize.dimension_sheet(result['perturbed'], sheet, interpret.PERTURBATIONS,
                            captions=captions,
                            title=f'Each row: one dimension of the predicted capsule, '
                                  f'offset -0.25 .. +0.25 ({where})')
  figure = os.path.join(workdir, 'couplings.png')
  visualize.coupling_figure(np.asarray(images), result['couplings'], labels, predictions, figure,
                            title=f'Share of each PrimaryCaps position\'s evidence (coupling x '
                                  f'capsule length) routed to each class ({where})')
  return sheet, figure, predictions


def main() -> None:
  config, state, identity = common.trained_run()
  source = identity['checkpoint'] if FLAGS.pretrained else FLAGS.workdir
  check_decoder(config, source)  # before the data is loaded
  folder = common.output_folder(identity['dataset'])
  dataset = data.load_dataset(identity['dataset'], FLAGS.data_dir, log=common.say)
  labels = dataset.test_labels[:FLAGS.digits]
  images = jnp.asarray(dataset.test_images[:FLAGS.digits], jnp.float32) / 255.0
  if not common.is_writer():
    return
  where = identity['checkpoint'] if FLAGS.pretrained else f'{folder}, {identity["checkpoint"]}'
  try:
    sheet, figure, predictions = draw(config, evaluation_params(state), images, labels, folder,
                                      where)
  except OSError as e:  # a run one may read but not write
    raise InputError(f'could not write the pictures into {folder} ({e.strerror}); copy the '
                     f'run to a folder you can write and pass that as --workdir.') from None
  common.say(f'Wrote {sheet} and {figure} for {FLAGS.digits} test digits '
             f'({int(np.sum(predictions == labels))} predicted right).')


if __name__ == '__main__':
  common.run_main(main, pretrained_ok=True)
