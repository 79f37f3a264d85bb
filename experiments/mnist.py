"""Train and evaluate the paper's MNIST CapsNet, or its baseline CNN (--model=baseline).

    python -m experiments.mnist --routing_iters=3 --data_dir=PATH/TO/mnist
    python -m experiments.mnist --pretrained --eval_only   # shipped weights (capsjax.pretrained)

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
import numpy as np

from capsjax import models
from capsjax.data import Dataset
from capsjax.errors import InputError
from capsjax.tasks import classification_losses
from capsjax.training import Task, TrainConfig, train_and_evaluate
from capsjax.training.loop import evaluate_state
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


def evaluate_pretrained(run: tuple, dataset: Dataset) -> dict:
  """--pretrained --eval_only: the accuracy of the shipped weights `run` (config, state,
  identity) on `dataset`'s test split (its first --test_examples if given)."""
  config, state, identity = run
  if FLAGS['test_examples'].present:
    config = config.replace(test_examples=FLAGS.test_examples)
  record = evaluate_state(config, Task(name=FLAGS.dataset, dataset=dataset,
                                       loss_fn=classification_losses), state)
  common.say(f'Test accuracy {100 * record["test_accuracy"]:.2f}%, test error '
             f'{100 * record["test_error"]:.2f}% on '
             f'{min(config.data.test_examples or np.inf, len(dataset.test_images))} images, '
             f'{identity["checkpoint"]}.')
  return record


def main():
  if FLAGS.pretrained and not FLAGS.eval_only:
    raise InputError('--pretrained evaluates the shipped weights: add --eval_only (or '
                     '--eval_file=FILE.npz); training starts from scratch without --pretrained.')
  if FLAGS.pretrained:
    run = common.trained_run()  # before the data: a dataset without weights fails at once
    evaluate_pretrained(run, common.load_data())
    return
  dataset = common.load_data()
  config = common.config_from_flags(dataset)
  train_and_evaluate(config, mnist_task(config, dataset, FLAGS.workdir), FLAGS.workdir,
                     eval_only=FLAGS.eval_only, log=common.say,
                     progress=common.status)


if __name__ == '__main__':
  common.run_main(main, pretrained_ok=True)
