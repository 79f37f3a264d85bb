"""Train and evaluate the paper's MNIST CapsNet, or its baseline CNN (--model=baseline).

    python -m experiments.mnist --routing_iters=3 --data_dir=../shared/data/mnist

This module declares the experiment: MNIST-format data, the model --model names,
the classification loss and the reconstruction picture; `capsjax.loop` does the
rest. It writes to --workdir: run.json, metrics.jsonl (a line per epoch), orbax
checkpoints (a rerun resumes from the latest) and, for a CapsNet with a decoder,
reconstructions.png. The step is pmapped over every local device (one CPU,
each GPU, 8 TPU cores); the whole training set lives on the devices and the
paper's random shifts run inside the jitted step.
"""

import os

from absl import flags

from capsjax import loop, train
from experiments import common

FLAGS = flags.FLAGS
FLAGS.set_default('workdir', 'runs/mnist')

PICTURE_EXAMPLES = 32


def reconstruction_pictures(dataset, workdir):
  """A `pictures` callback for a CapsNet with a decoder: test digits beside their reconstructions.

  Args:
    dataset: the run's `capsjax.data.Dataset`.
    workdir: where reconstructions.png goes.

  Returns:
    callable(state) that draws the picture.
  """
  return common.reconstruction_pictures(dataset.test_images[:PICTURE_EXAMPLES],
                                        dataset.test_labels[:PICTURE_EXAMPLES],
                                        os.path.join(workdir, 'reconstructions.png'))


def train_mnist(config, dataset, workdir, eval_only=False):
  """Train (or evaluate) `config` on an MNIST-format dataset in `workdir`.

  Args:
    config: a `train.TrainConfig`.
    dataset: a `capsjax.data.Dataset`.
    workdir: the run's folder.
    eval_only: evaluate the latest checkpoint and stop.

  Returns:
    The last metrics record (see `capsjax.loop.train_and_evaluate`).
  """
  has_decoder = config.model == 'capsnet' and config.recon_weight > 0
  return loop.train_and_evaluate(
      config, dataset, workdir, dataset_name=FLAGS.dataset,
      loss_fn=train.classification_losses, train_examples=FLAGS.train_examples,
      test_examples=FLAGS.test_examples, validation_examples=FLAGS.validation_examples,
      eval_only=eval_only,
      pictures=reconstruction_pictures(dataset, workdir) if has_decoder else None,
      progress_seconds=FLAGS.progress_seconds, log=common.say)


def main():
  dataset = common.load_data()
  train_mnist(common.config_from_flags(dataset), dataset, FLAGS.workdir, FLAGS.eval_only)


if __name__ == '__main__':
  common.run_main(main)
