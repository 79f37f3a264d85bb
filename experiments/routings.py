"""The routings side by side on MNIST: one run each, with the same training budget.

    python -m experiments.routings --data_dir=PATH/TO/mnist --recipe=fast --epochs=1 \
        --warmup_epochs=0.1 --ema_decay=0

Trains one run per variant in --variants: the paper's CapsNet with each routing of
`capsjax.routing` (dynamic, em, self_attention, inverted_attention; nothing else
changes) and Efficient-CapsNet (efficient_capsnet, its own layers and routing).
Each is an ordinary `experiments.mnist` run in --workdir/VARIANT, so an interrupted
study resumes where it stopped and a finished run is read back, not trained again
(after checking that its run.json has the settings the flags give). Every other
flag (--epochs, --recipe, --batch_size, --routing_iters, the data flags, ...)
applies to every run: that is the shared budget. Writes --workdir/routings.md and
routings.json: per variant its parameters, the last epoch's test error, its
training images/s and wall time, beside the MNIST test error its paper reports
(from that paper's own network and training, not this budget).
"""

import dataclasses
import os
from typing import Optional, Sequence, Tuple

from absl import flags

from capsjax import files
from capsjax.data import Dataset
from capsjax.errors import InputError
from capsjax.nn.layers import ITERATED_ROUTINGS
from capsjax.training import TrainConfig
from experiments import common, mnist


@dataclasses.dataclass(frozen=True)
class Variant:
  """One row of the study: the settings it overrides, and its paper's MNIST figure."""
  name: str
  settings: dict
  description: str
  paper_error: Optional[float]  # MNIST test error %, None where the paper reports none
  source: str


VARIANTS = (
    Variant('dynamic', {'model': 'capsnet', 'routing': 'dynamic'}, 'CapsNet, dynamic routing',
            0.25, 'Sabour et al. 2017, Table 1: 3 iterations, reconstruction, mean of 3 trials'),
    Variant('em', {'model': 'capsnet', 'routing': 'em'}, 'CapsNet, EM routing', 0.44,
            'Hinton et al. 2018, for their matrix-capsule network (310k parameters, no '
            'reconstruction), as '
            'Mazzia et al. 2021 (Table 2) cite it'),
    Variant('self_attention', {'model': 'capsnet', 'routing': 'self_attention'},
            'CapsNet, self-attention routing', None,
            'Mazzia et al. 2021 report it inside Efficient-CapsNet only'),
    Variant('inverted_attention', {'model': 'capsnet', 'routing': 'inverted_attention'},
            'CapsNet, inverted dot-product attention routing', None,
            'Tsai et al. 2020 report CIFAR-10, CIFAR-100 and DiverseMultiMNIST, not MNIST'),
    Variant('efficient_capsnet', {'model': 'efficient_capsnet'},
            'Efficient-CapsNet (self-attention routing)', 0.26,
            'Mazzia et al. 2021, Table 2: one model (0.16% for an ensemble)'),
)

FLAGS = flags.FLAGS
flags.DEFINE_list('variants', [variant.name for variant in VARIANTS],
                  'The variants to train, comma-separated; each trains in --workdir/VARIANT.')
FLAGS.set_default('workdir', 'runs/routings')


def chosen_variants(names: Sequence[str]) -> Tuple[Variant, ...]:
  """The variants --variants names, in the order given; an InputError for unknown names."""
  known = {variant.name: variant for variant in VARIANTS}
  unknown = [name for name in names if name not in known]
  if unknown or not names or len(set(names)) != len(names):
    raise InputError(f'--variants={",".join(names)}: give distinct names among '
                     f'{",".join(known)}.')
  return tuple(known[name] for name in names)


def check_flags(config: TrainConfig, variants: Sequence[Variant]) -> None:
  """Raise an `InputError` for flags the study cannot honour, before anything is trained.

  Args:
    config: the config the flags give (`common.config_from_flags(None)`).
    variants: the chosen variants.
  """
  if FLAGS.eval_only:
    raise InputError('--eval_only is not a routings flag: rerunning the command reads finished '
                     'runs back; evaluate one run with python -m experiments.mnist --eval_only '
                     '--workdir=WORKDIR/VARIANT.')
  for name in ('model', 'routing'):
    if FLAGS[name].present:
      raise InputError(f'--{name} is set per run by --variants (e.g. --variants=dynamic,em).')
  if FLAGS.dataset != 'mnist':
    raise InputError(f'--dataset={FLAGS.dataset}: the study sets each routing beside the MNIST '
                     f'figure of its paper; train other datasets one routing at a time with '
                     f'python -m experiments.mnist --routing=NAME.')
  if config.stop_at_validation_accuracy:
    raise InputError('--stop_at_validation_accuracy ends each run at its own epoch; the study '
                     'gives every routing the same budget of --epochs.')
  if config.optimizer.ema_decay and any(v.name == 'efficient_capsnet' for v in variants):
    raise InputError(f'--ema_decay={config.optimizer.ema_decay:g} (--recipe={FLAGS.recipe} sets '
                     f'it unless given): Efficient-CapsNet keeps batch statistics and cannot '
                     f'average its weights; give --ema_decay=0 to every variant, or leave '
                     f'efficient_capsnet out of --variants.')


def run_variant(variant: Variant, dataset: Dataset) -> dict:
  """Train (or read back) one variant's run; returns its row of the study."""
  config = common.config_from_flags(dataset, **variant.settings)
  workdir = os.path.join(FLAGS.workdir, variant.name)
  record = common.train_or_read(config, mnist.mnist_task(config, dataset, workdir), workdir,
                                variant.name)
  iterated = config.model.name == 'capsnet' and config.model.routing in ITERATED_ROUTINGS
  iterations = config.model.routing_iters if iterated else None
  return {'variant': variant.name, 'description': variant.description, 'workdir': workdir,
          'routing_iters': iterations, 'parameters': common.count_parameters(config),
          'epochs': record['epoch'], 'test_error': record['test_error'],
          'train_images_per_second': record['images_per_sec'],
          'wall_seconds': common.wall_seconds(workdir),
          'paper_error_percent': variant.paper_error, 'paper_source': variant.source}


def markdown(rows: Sequence[dict], header: str) -> str:
  """The study as Markdown: a row per variant, its paper's figure beside ours."""
  lines = [header, '',
           '| variant | iterations | parameters | test error % | training images/s | '
           'wall time | its paper (MNIST test error %) |',
           '| --- | --- | --- | --- | --- | --- | --- |']
  for row in rows:
    paper = (f'{row["paper_error_percent"]:.2f}: ' if row['paper_error_percent'] is not None
             else '-: ') + row['paper_source']
    lines.append(
        f'| {row["description"]} | {row["routing_iters"] or "-"} | {row["parameters"]:,} | '
        f'{100 * row["test_error"]:.2f} | {row["train_images_per_second"]:.1f} | '
        f'{row["wall_seconds"] / 60:.1f} min | {paper} |')
  return '\n'.join(lines) + '\n'


def study_settings(config: TrainConfig, dataset: Dataset,
                   variants: Sequence[Variant]) -> Tuple[dict, str]:
  """What every run trained with (the flags with --recipe applied), and the table's header."""
  settings = common.study_settings(config, dataset, variants=[v.name for v in variants],
                                   routing_iters=config.model.routing_iters)
  header = (f'Routings on {settings["dataset"]}, the same budget for each: {config.epochs} '
            f'epoch(s) of {settings["train_examples"]:,} training images, batch '
            f'{config.batch_size}, recipe {FLAGS.recipe} (peak learning rate '
            f'{config.optimizer.learning_rate:g}, {config.optimizer.lr_schedule} schedule); test '
            f'error of the last epoch on {settings["test_examples"]:,} images; '
            f'{settings["device"]}, {settings["date"]}. Training images/s: the run\'s own last '
            f'epoch. The papers\' figures come from their own networks and full training.')
  return settings, header


def main() -> None:
  variants = chosen_variants(FLAGS.variants)
  check_flags(common.config_from_flags(None), variants)  # before the data is loaded
  dataset = common.load_data()
  rows = [run_variant(variant, dataset) for variant in variants]
  if not common.is_writer():
    return
  settings, header = study_settings(common.config_from_flags(dataset), dataset, variants)
  table = markdown(rows, header)
  files.write_text(os.path.join(FLAGS.workdir, 'routings.md'), table)
  files.write_json(os.path.join(FLAGS.workdir, 'routings.json'), {**settings, 'rows': rows})
  common.say(table)
  common.say(f'Wrote routings.md and routings.json in {FLAGS.workdir}.')


if __name__ == '__main__':
  common.run_main(main)
