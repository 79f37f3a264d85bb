"""The paper's Table 1: baseline CNN against CapsNet with 1 and 3 routing iterations,
each with and without the reconstruction loss, over several seeds.

    python -m experiments.table1 --data_dir=PATH/TO/mnist --seeds=3

Every row and seed is an ordinary `experiments.mnist` run in its own folder,
--workdir/ROW/seedS, so an interrupted table resumes where it stopped and a
finished run is read back, not trained again. Writes --workdir/table1.md and
table1.json: the last epoch's test error per row (mean +- std over seeds) beside
the paper's, parameter counts, epochs, wall time and device. Every other flag
(--epochs, --train_examples, --batch_size, --recipe, the data flags, ...) applies
to every row, and the header says what the rows ran with.
"""

import os
from typing import Sequence, Tuple

from absl import flags
import numpy as np

from capsjax import files
from capsjax.data import Dataset
from capsjax.errors import InputError
from capsjax.training import TrainConfig
from experiments import common, mnist
from experiments.paper import ROWS, Row

FLAGS = flags.FLAGS
flags.DEFINE_integer('seeds', 3, 'Runs per row, with seeds 0..N-1.', lower_bound=1)
FLAGS.set_default('workdir', 'runs/table1')


def describe(row: Row) -> Tuple[str, str, str]:
  """(model, routing, reconstruction) as the paper's table names them."""
  if row.settings['model'] == 'baseline':
    return 'baseline CNN', '-', '-'
  return ('CapsNet', str(row.settings['routing_iters']),
          'yes' if row.settings['recon_weight'] > 0 else 'no')


def run_row(row: Row, dataset: Dataset) -> dict:
  """Train (or read back) every seed of a row; returns its summary dict."""
  runs = []
  for seed in range(FLAGS.seeds):
    config = common.config_from_flags(dataset, seed=seed, **row.settings)
    workdir = os.path.join(FLAGS.workdir, row.name, f'seed{seed}')
    record = common.train_or_read(config, mnist.mnist_task(config, dataset, workdir), workdir,
                                  f'{row.name} seed {seed}')
    runs.append({'seed': seed, 'test_error': record['test_error'],
                 'seconds': common.wall_seconds(workdir)})
  errors = 100 * np.array([r['test_error'] for r in runs])
  model, routing, reconstruction = describe(row)
  return {'row': row.name, 'model': model, 'routing': routing, 'reconstruction': reconstruction,
          'parameters': common.count_parameters(config), 'epochs': config.epochs,
          'test_error_percent_mean': float(errors.mean()),
          'test_error_percent_std': float(errors.std(ddof=1)) if len(errors) > 1 else None,
          'paper_error_percent': row.paper_error, 'paper_std': row.paper_std,
          'wall_seconds': sum(r['seconds'] for r in runs), 'runs': runs}


def markdown(rows: Sequence[dict], header: str) -> str:
  """Table 1 as Markdown: our error beside the paper's, per row."""
  fmt = lambda mean, std: f'{mean:.2f}' + (f' +- {std:.3f}' if std is not None else '')
  lines = [header, '',
           '| model | routing | reconstruction | parameters | test error % (ours) | '
           'paper | epochs | wall time |',
           '| --- | --- | --- | --- | --- | --- | --- | --- |']
  for r in rows:
    lines.append(
        f'| {r["model"]} | {r["routing"]} | {r["reconstruction"]} | {r["parameters"]:,} | '
        f'{fmt(r["test_error_percent_mean"], r["test_error_percent_std"])} | '
        f'{fmt(r["paper_error_percent"], r["paper_std"])} | {r["epochs"]} | '
        f'{r["wall_seconds"] / 60:.1f} min |')
  return '\n'.join(lines) + '\n'


def table_settings(config: TrainConfig, dataset: Dataset) -> Tuple[dict, str]:
  """What every row ran with (the flags with --recipe applied), and the table's header line.

  Args:
    config: the config the flags give (`common.config_from_flags`); each row
      changes only its model settings and seed.
    dataset: the `capsjax.data.Dataset`.

  Returns:
    (settings dict for table1.json, header line).
  """
  settings = common.study_settings(config, dataset, seeds=FLAGS.seeds)
  train_examples, test_examples = settings['train_examples'], settings['test_examples']
  header = (f'Table 1 on {settings["dataset"]}: test error of the last epoch, '
            f'{settings["seeds"]} seed(s), {config.epochs} epoch(s), '
            f'{train_examples:,} training and {test_examples:,} test images, batch '
            f'{config.batch_size}, recipe {FLAGS.recipe}; {settings["device"]}, '
            f'{settings["date"]}. Paper: 3 trials of full training.')
  return settings, header


def main() -> None:
  if FLAGS.eval_only:
    raise InputError('--eval_only is not a table1 flag: rerunning the command reads finished '
                     'runs back; evaluate one run with python -m experiments.mnist --eval_only '
                     '--workdir=WORKDIR/ROW/seedS.')
  dataset = common.load_data()
  rows = [run_row(row, dataset) for row in ROWS]
  settings, header = table_settings(common.config_from_flags(dataset), dataset)
  table = markdown(rows, header)
  if not common.is_writer():
    return
  os.makedirs(FLAGS.workdir, exist_ok=True)
  files.write_text(os.path.join(FLAGS.workdir, 'table1.md'), table)
  files.write_json(os.path.join(FLAGS.workdir, 'table1.json'), {**settings, 'rows': rows})
  common.say(table)


if __name__ == '__main__':
  common.run_main(main)
