"""Train and evaluate the paper's MNIST CapsNet, or its baseline CNN (--model=baseline).

    python -m experiments.mnist --routing_iters=3 --data_dir=PATH/TO/mnist

This module declares the experiment: MNIST-format data, the classification
loss and the reconstruction picture; `capsjax.training.train_and_evaluate` does
the rest. It writes to --workdir: run.json, metrics.jsonl (a line per epoch),
orbax checkpoints (a rerun resumes from the latest), curves.png and, for a
CapsNet with a decoder, reconstructions.png. The step is pmapped over every
local device (one CPU, each GPU, 8 TPU cores); the whole training set lives on
the devices and the paper's random shifts run inside the jitted step.
"""

import os

from absl import flags

from capsjax import models
from capsjax.data import Dataset
from capsjax.tasks import classification_losses
from capsjax.training import Task, TrainConfig, train_and_evaluate
from experiments import common

FLAGS = flags.FLAGS
FLAGS.set_default('workdir', 'runs/mnist')

PICTURE_EXAMPLES = 32


def mnist_task(config: TrainConfig, dataset: Dataset, workdir: str) -> Task:
  """Classification of `dataset`'s digits, drawing reconstructions.png for a CapsNet with a decoder.

  Args:
    config: the run's `TrainConfig`.
    dataset: a `capsjax.data.Dataset`.
    workdir: where the pictures go.
  """
  pictures = None
  if models.has_decoder(config.model):
    pictures = common.reconstruction_pictures(
        dataset.test_images[:PICTURE_EXAMPLES], dataset.test_labels[:PICTURE_EXAMPLES],
        os.path.join(workdir, 'reconstructions.png'))
  return Task(name=FLAGS.dataset, dataset=dataset, loss_fn=classification_losses,
              pictures=pictures)


def main():
  dataset = common.load_data()
  config = common.config_from_flags(dataset)
  train_and_evaluate(config, mnist_task(config, dataset, FLAGS.workdir), FLAGS.workdir,
                     eval_only=FLAGS.eval_only, log=common.say,
                     progress=common.status)


if __name__ == '__main__':
  common.run_main(main)
