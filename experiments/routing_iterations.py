"""The paper's appendix: how many routing iterations to use?

    python -m experiments.routing_iterations --data_dir=PATH/TO/mnist --iterations=1,2,3,5

Trains one CapsNet per number of routing iterations r in --iterations, each an
ordinary `experiments.mnist` run in --workdir/rR, so an interrupted study resumes
where it stopped and a finished run is read back, not trained again (after
checking that its run.json has the settings the flags give). Every other flag
(--epochs, --routing, --recipe, the data flags, ...) applies to every run. For
dynamic routing it then measures, on the run's test images, the mean change of
the routing logits |b_ij(t) - b_ij(t-1)| at each routing iteration t = 1..r-1
(`capsjax.analysis.interpret.routing_logit_changes`), kept in
--workdir/rR/logit_changes.json so a rerun reads it back too. Writes
--workdir/routing_iterations.md and .json (per r: the last epoch's training and
test loss and error, epochs, wall time, parameters, the logit changes) and
routing_iterations.png: error per epoch of every run, and the logit changes.

--routing=em and inverted_attention train and tabulate the same way; their
iterations update assignments, not logits b_ij, and no change is measured.
"""

import functools
import json
import os
from typing import List, Optional, Sequence, Tuple

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from capsjax import files, models, tasks, visualize
from capsjax.analysis import interpret
from capsjax.data import Dataset
from capsjax.errors import InputError
from capsjax.nn.layers import ITERATED_ROUTINGS
from capsjax.training import TrainConfig, evaluation_params, rundir
from experiments import common, mnist

FLAGS = flags.FLAGS
flags.DEFINE_list('iterations', ['1', '2', '3', '5'],
                  'Routing iterations r of each run, comma-separated; run r trains in '
                  '--workdir/rR.')
FLAGS.set_default('workdir', 'runs/routing_iterations')

CHANGES_FILE = 'logit_changes.json'
STUDY_NAME = 'routing_iterations'


def parse_iterations(values: Sequence[str]) -> List[int]:
  """The distinct routing iterations of --iterations, as ints >= 1 in the given order."""
  try:
    iterations = [int(value) for value in values]
  except ValueError:
    raise InputError(f'--iterations={",".join(values)}: give whole numbers of routing '
                     f'iterations, e.g. --iterations=1,2,3,5.') from None
  if not iterations or min(iterations) < 1 or len(set(iterations)) != len(iterations):
    raise InputError(f'--iterations={",".join(values)}: give distinct numbers of routing '
                     f'iterations >= 1, e.g. --iterations=1,2,3,5.')
  return iterations


def check_flags(config: TrainConfig) -> None:
  """Raise an `InputError` for flags the study cannot honour, before anything is trained."""
  if FLAGS.eval_only:
    raise InputError('--eval_only is not a routing_iterations flag: rerunning the command reads '
                     'finished runs back; evaluate one run with python -m experiments.mnist '
                     '--eval_only --workdir=WORKDIR/rR.')
  if FLAGS['routing_iters'].present:
    raise InputError('--routing_iters is set per run by --iterations (e.g. --iterations=1,3).')
  if config.model.name != 'capsnet':
    raise InputError(f'--model={config.model.name} has no routing; the study trains CapsNets.')
  if config.model.routing not in ITERATED_ROUTINGS:
    raise InputError(f'--routing={config.model.routing} has no routing iterations (one pass); '
                     f'choose one of {", ".join(ITERATED_ROUTINGS)}.')


def train_or_read(r: int, dataset: Dataset) -> Tuple[TrainConfig, str, dict]:
  """Train (resuming) the run with r routing iterations, or read it back if finished.

  Returns:
    (its config, its folder, its last metrics record).
  """
  config = common.config_from_flags(dataset, routing_iters=r)
  workdir = os.path.join(FLAGS.workdir, f'r{r}')
  task = mnist.mnist_task(config, dataset, workdir)
  return config, workdir, common.train_or_read(config, task, workdir, f'r = {r}')


def mean_logit_changes(config: TrainConfig, params, images: np.ndarray) -> List[float]:
  """Mean |b_ij(t) - b_ij(t-1)| over `images` of each logit update t = 1..r-1 of a run.

  Args:
    config: the run's config (dynamic routing).
    params: its parameters (single device).
    images: uint8 [N, H, W, C], the run's test images.

  Returns:
    r - 1 floats.
  """
  model = models.build(config.model)
  measure = jax.jit(functools.partial(interpret.model_logit_changes, model))
  batch = min(config.batch_size, len(images))
  total = np.zeros(config.model.routing_iters - 1)
  for start in range(0, len(images), batch):
    chunk = images[start:start + batch]
    padded = np.concatenate([chunk, np.zeros((batch - len(chunk), *chunk.shape[1:]), chunk.dtype)])
    per_image = measure(params, jnp.asarray(padded, jnp.float32) / 255.0)
    total += np.asarray(per_image, np.float64)[:len(chunk)].sum(axis=0)
  return (total / len(images)).tolist()


def logit_changes(config: TrainConfig, workdir: str, record: dict,
                  dataset: Dataset) -> Optional[List[float]]:
  """The run's mean logit change per routing iteration, measured once and kept in its folder.

  Measured with the run's evaluation weights (its EMA, if any) of its latest
  checkpoint, on the test images it was evaluated on; read back from
  `workdir`/logit_changes.json while that names the same step, test images and run.json.

  Returns:
    r - 1 floats (none for r = 1), or None for routings other than dynamic.
  """
  if config.model.routing != 'dynamic':
    return None
  if config.model.routing_iters == 1:
    return []
  path = os.path.join(workdir, CHANGES_FILE)
  images = dataset.test_images[:config.data.test_examples or None]
  key = {'step': record['step'], 'test_examples': len(images),
         'run_sha256': files.file_sha256(os.path.join(workdir, rundir.RUN_FILE))}
  try:
    with open(path) as f:
      saved = json.load(f)
    if {name: saved.get(name) for name in key} == key:
      return saved['logit_changes']
  except (OSError, ValueError, AttributeError, KeyError, TypeError):
    pass  # not measured yet, or a file to measure again
  _, state, identity = tasks.load_run(workdir)
  if int(state.step) != record['step']:
    common.say(f'{workdir}: its newest checkpoint ({identity["checkpoint"]}) is not its last '
               f'epoch\'s end; measuring the logit changes on it.')
  changes = mean_logit_changes(config, evaluation_params(state), images)
  files.write_json(path, {**key, 'checkpoint': identity['checkpoint'],
                          'logit_changes': changes})
  return changes


def summarize(r: int, config: TrainConfig, workdir: str, record: dict,
              changes: Optional[List[float]]) -> dict:
  """One run's row of the study: its last epoch, wall time, parameters and logit changes."""
  return {'iterations': r, 'workdir': workdir, 'parameters': common.count_parameters(config),
          'epochs': record['epoch'], 'train_loss': record['train_loss'],
          'train_error': 1.0 - record['train_accuracy'], 'test_loss': record['test_loss'],
          'test_error': record['test_error'],
          'wall_seconds': common.wall_seconds(workdir),
          'logit_changes': changes}


def markdown(runs: Sequence[dict], header: str) -> str:
  """The study as Markdown: a row per number of routing iterations."""
  lines = [header, '',
           '| iterations r | parameters | epochs | train loss | train error % | test loss | '
           'test error % | wall time | mean abs logit change, t = 1..r-1 |',
           '| --- | --- | --- | --- | --- | --- | --- | --- | --- |']
  for run in runs:
    changes = run['logit_changes']
    changes = ('not measured' if changes is None else
               ', '.join(f'{c:.3g}' for c in changes) or '- (no update)')
    lines.append(
        f'| {run["iterations"]} | {run["parameters"]:,} | {run["epochs"]} | '
        f'{run["train_loss"]:.4f} | {100 * run["train_error"]:.2f} | {run["test_loss"]:.4f} | '
        f'{100 * run["test_error"]:.2f} | {run["wall_seconds"] / 60:.1f} min | {changes} |')
  return '\n'.join(lines) + '\n'


def study_settings(config: TrainConfig, dataset: Dataset,
                   iterations: Sequence[int]) -> Tuple[dict, str]:
  """What every run trained with (the flags with --recipe applied), and the table's header."""
  settings = common.study_settings(config, dataset, routing=config.model.routing,
                                   iterations=list(iterations),
                                   recon_weight=config.model.recon_weight)
  train_examples, test_examples = settings['train_examples'], settings['test_examples']
  header = (f'Routing iterations on {settings["dataset"]}: {config.model.routing} routing, '
            f'{config.epochs} epoch(s), {train_examples:,} training and {test_examples:,} test '
            f'images, batch {config.batch_size}, recipe {FLAGS.recipe}; {settings["device"]}, '
            f'{settings["date"]}. Train loss and error: means over the last epoch\'s steps '
            f'(shifted images); test: the last epoch\'s evaluation. Logit change: the mean over '
            f'the test images, primary capsules i and classes j of |b_ij(t) - b_ij(t-1)| at '
            f'routing iteration t. Paper: more iterations overfit; 3 recommended.')
  return settings, header


def main() -> None:
  iterations = parse_iterations(FLAGS.iterations)
  check_flags(common.config_from_flags(None))  # before the data is loaded
  dataset = common.load_data()
  config = common.config_from_flags(dataset)
  trained = [(r, *train_or_read(r, dataset)) for r in iterations]
  if not common.is_writer():
    return
  runs = [summarize(r, run_config, workdir, record,
                    logit_changes(run_config, workdir, record, dataset))
          for r, run_config, workdir, record in trained]
  settings, header = study_settings(config, dataset, iterations)
  table = markdown(runs, header)
  files.write_text(os.path.join(FLAGS.workdir, f'{STUDY_NAME}.md'), table)
  files.write_json(os.path.join(FLAGS.workdir, f'{STUDY_NAME}.json'), {**settings, 'runs': runs})
  visualize.routing_iterations_plot(
      {run['iterations']: rundir.read_metrics(os.path.join(run['workdir'], rundir.METRICS_FILE))
       for run in runs},
      {run['iterations']: run['logit_changes'] for run in runs},
      os.path.join(FLAGS.workdir, f'{STUDY_NAME}.png'),
      title=f'Routing iterations: {config.model.routing} routing, {config.epochs} epoch(s), '
            f'{settings["train_examples"]:,} training images')
  common.say(table)
  common.say(f'Wrote {STUDY_NAME}.md, .json and .png in {FLAGS.workdir}.')


if __name__ == '__main__':
  common.run_main(main)
