"""MultiMNIST (the paper's section 6): name and separate two highly overlapping digits.

    python -m experiments.multimnist --data_dir=PATH/TO/mnist

Every training step draws new pairs on the device: each training digit in turn
is a base, overlaid with a digit of another class, both shifted by up to 4
pixels on a 36x36 canvas (`capsjax.data.multimnist`). The test set is fixed for
--test_seed: pair i has test digit i as its base (10,000 pairs, or the first
--test_examples). The model is the paper's CapsNet on 36x36 inputs (PrimaryCaps
10x10x32, 3 routing iterations) or --model=baseline; the loss is the margin loss
with both classes as targets plus a reconstruction of each digit from its own
capsule. The metric is the paper's: an example is right when its two longest
capsules are exactly its two classes; per-digit accuracy is reported too.

Writes to --workdir what every experiment writes (see `capsjax.training.loop`) and
multimnist.png, the paper's Figure 5: inputs beside the reconstructions from the
true and the predicted capsules, red over green. --export=FILE.npz writes the
test set instead of training.
"""

import os
from typing import Callable, Dict, Tuple

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from capsjax import models
from capsjax.data import Dataset, multimnist
from capsjax.errors import InputError
from capsjax.tasks import multimnist_losses
from capsjax.tasks.multimnist import pair_metrics, top2
from capsjax.training import Task, TrainConfig, TrainState, evaluation_params, train_and_evaluate
from capsjax.visualize import pair_sheet
from experiments import common

FLAGS = flags.FLAGS
FLAGS.set_default('workdir', 'runs/multimnist')
# --export writes image uint8 [N, 36, 36, 1], label [N, 2], digits uint8 [N, 2, 36, 36, 1],
# shifts [N, 2, 2] (dy, dx) and indices [N, 2] into the MNIST test split.

PICTURE_POOL = 256  # test pairs searched for right and wrong examples to draw
PICTURE_EACH = 8


def figure5(dataset: Dataset, make_batch: Callable[..., Dict[str, jax.Array]],
            config: TrainConfig, workdir: str) -> Callable[[TrainState], None]:
  """A `pictures` callback drawing multimnist.png from the first test pairs, right and wrong.

  Args:
    dataset: the single-digit `capsjax.data.Dataset`.
    make_batch: the run's batch maker (`capsjax.data.multimnist.batch_maker`).
    config: the run's `TrainConfig` (a CapsNet with a decoder).
    workdir: where multimnist.png goes.

  Returns:
    callable(state).
  """
  count = min(PICTURE_POOL, len(dataset.test_images))
  batch = jax.jit(make_batch)(dataset.test_images, dataset.test_labels, jnp.arange(count))
  path = os.path.join(workdir, 'multimnist.png')
  num_classes = config.model.num_classes

  @jax.jit
  def reconstruct(state: TrainState) -> Tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    params = evaluation_params(state)
    scores = state.forward(params, batch['image']).scores
    predictions = top2(scores)
    decode = lambda classes: state.forward(params, batch['image'], jax.nn.one_hot(
        classes, num_classes)).reconstructions
    return (decode(batch['label']), decode(predictions), predictions,
            pair_metrics(scores, batch['label'])['accuracy'] > 0)

  def draw(state: TrainState) -> None:
    true, predicted, predictions, right = jax.device_get(reconstruct(state))
    labels = np.asarray(batch['label'])
    chosen = np.concatenate([np.flatnonzero(right)[:PICTURE_EACH],
                             np.flatnonzero(~right)[:PICTURE_EACH]])
    pair_sheet(np.asarray(batch['image'])[chosen], true[chosen], predicted[chosen],
               labels[chosen], predictions[chosen], path)

  return draw


def multimnist_task(config: TrainConfig, dataset: Dataset, workdir: str) -> Task:
  """MultiMNIST pairs of `dataset`'s digits, made on the device, with Figure 5 for a CapsNet
  with a decoder."""
  make_batch = multimnist.batch_maker(FLAGS.test_seed, dataset.num_classes)
  return Task(name=FLAGS.dataset, dataset=dataset, loss_fn=multimnist_losses,
              make_batch=make_batch, settings={'test_seed': FLAGS.test_seed},
              pictures=(figure5(dataset, make_batch, config, workdir)
                        if models.has_decoder(config.model) else None))


def export(dataset: Dataset, path: str) -> None:
  """Write the generated test set to `path` (see --export)."""
  count = FLAGS.test_examples or len(dataset.test_images)
  if count > len(dataset.test_images):
    raise InputError(f'--test_examples={count}: the test set has one pair per test digit, '
                     f'{len(dataset.test_images)} in all.')
  pairs = jax.jit(multimnist.make_pairs, static_argnums=4)(
      jax.random.PRNGKey(FLAGS.test_seed), dataset.test_images, dataset.test_labels,
      jnp.arange(count), dataset.num_classes)
  multimnist.export(path, pairs)
  common.say(f'Wrote {count} MultiMNIST test pairs (test seed {FLAGS.test_seed}) to {path}.')


def main() -> None:
  if FLAGS['shift_pixels'].present:
    raise InputError('--shift_pixels does not apply: MultiMNIST shifts each digit by up to '
                     f'{multimnist.MAX_SHIFT} pixels as it makes the pairs.')
  dataset = common.load_data()
  if FLAGS.export:
    export(dataset, FLAGS.export)
    return
  height, width, channels = dataset.train_images.shape[1:]
  config = common.config_from_flags(
      dataset, shift_pixels=0,
      image_shape=(height + 2 * multimnist.PAD, width + 2 * multimnist.PAD, channels))
  train_and_evaluate(config, multimnist_task(config, dataset, FLAGS.workdir), FLAGS.workdir,
                     eval_only=FLAGS.eval_only, log=common.say,
                     progress=common.status)

if __name__ == '__main__':
  common.run_main(main)
