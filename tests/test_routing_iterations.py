"""The routing-iterations study: the logit change per iteration, and its command."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

import capsjax
from capsjax import data, models, tasks, visualize
from capsjax.analysis import interpret
from capsjax.training import evaluation_params
from tests import reference
from tests.conftest import REPO, write_dataset

# As tests/test_study.py: lax.conv compiles in a fraction of the matmul convolution's time.
SMALL_FLAGS = ['--conv_features=16', '--primary_types=4', '--primary_dim=4', '--digit_dim=8',
               '--batch_size=16', '--progress_seconds=1000', '--conv_impl=xla']
NO_RESTART = dict(os.environ, GLIBC_TUNABLES='glibc.malloc.hugetlb=0')


def test_logit_changes_by_hand():
  # Two children, two parents, 1-D: both children predict 2 for parent 0; for parent 1
  # they disagree (+1, -1), so s_1 = 0 and v_1 = 0 whatever the couplings.
  u_hat = jnp.asarray([[[2.0], [1.0]], [[2.0], [-1.0]]])
  # t = 1: c = 1/2, s_0 = 2, v_0 = squash(2) = 4/5: b gains 2 * 4/5 = 1.6 for parent 0, 0 for 1.
  # t = 2: c_i0 = sigmoid(1.6) = p, s_0 = 4p, v_0 = 16p^2 / (1 + 16p^2), the mean update.
  p = 1 / (1 + math.exp(-1.6))
  expected = [0.8, 16 * p * p / (1 + 16 * p * p)]
  assert interpret.routing_logit_changes(u_hat, 1).shape == (0,)
  np.testing.assert_allclose(interpret.routing_logit_changes(u_hat, 2), expected[:1], rtol=1e-6)
  np.testing.assert_allclose(interpret.routing_logit_changes(u_hat, 3), expected, rtol=1e-6)
  with pytest.raises(ValueError, match='num_iters must be >= 1'):
    interpret.routing_logit_changes(u_hat, 0)
  with pytest.raises(ValueError, match='for one example'):
    interpret.routing_logit_changes(u_hat[None], 2)


@pytest.mark.parametrize('num_iters', [2, 5])
def test_logit_changes_follow_procedure_1_in_float64(num_iters):
  rng = np.random.default_rng(num_iters)
  u_hat = rng.normal(size=(3, 30, 10, 8)).astype(np.float32) * 0.5
  logits = [reference.routing_logits(u, num_iters) for u in u_hat]  # b(0) .. b(r)
  expected = [np.abs(np.diff(b, axis=0))[:num_iters - 1].mean(axis=(1, 2)) for b in logits]
  changes = jax.jit(jax.vmap(lambda u: interpret.routing_logit_changes(u, num_iters)))(u_hat)
  assert changes.shape == (3, num_iters - 1) and changes.dtype == jnp.float32
  np.testing.assert_allclose(changes, expected, rtol=2e-5)
  # The logits are the ones dynamic_routing routes with: its couplings are softmax(b(r - 1)).
  b = logits[0][num_iters - 1]
  couplings = np.exp(b) / np.exp(b).sum(axis=1, keepdims=True)
  np.testing.assert_allclose(capsjax.dynamic_routing(u_hat[0], num_iters)[1], couplings,
                             rtol=2e-5)


def test_figure_of_runs_without_logit_changes():
  records = {r: [{'epoch': e, 'train_accuracy': 0.9 + 0.01 * e, 'test_accuracy': 0.9 + 0.005 * e}
                 for e in (1, 2, 3)] for r in (1, 3)}
  figure = visualize.routing_iterations_figure(records, {1: None, 3: None}, title='EM routing')
  errors, changes = figure.axes
  assert len(errors.lines) == 4  # train and test of each run
  assert [t.get_text() for t in changes.get_legend().get_texts()] == [
      'r = 1: not measured (dynamic routing only)', 'r = 3: not measured (dynamic routing only)']


def run(*flags):
  return subprocess.run([sys.executable, '-m', 'experiments.routing_iterations', *flags],
                        cwd=REPO, capture_output=True, text=True, timeout=600, env=NO_RESTART)


def test_command_writes_table_json_and_picture_and_reads_runs_back(tmp_path):
  data_dir = write_dataset(str(tmp_path / 'data'), num_train=32, num_test=24)
  workdir = tmp_path / 'study'
  flags = ['--iterations=1,2', '--epochs=1', f'--data_dir={data_dir}', f'--workdir={workdir}',
           *SMALL_FLAGS]
  first = run(*flags)
  assert first.returncode == 0, first.stderr[-3000:]
  assert first.stdout.count('compiled and ran the first step') == 2
  with open(workdir / 'routing_iterations.json') as f:
    study = json.load(f)
  assert study['iterations'] == [1, 2] and study['routing'] == 'dynamic'
  assert study['epochs'] == 1 and study['test_examples'] == 24
  runs = {run['iterations']: run for run in study['runs']}
  assert list(runs) == [1, 2]
  for r, summary in runs.items():
    with open(workdir / f'r{r}' / 'metrics.jsonl') as f:
      (record,) = [json.loads(line) for line in f]
    assert summary['epochs'] == 1 and summary['wall_seconds'] == record['epoch_seconds']
    assert summary['test_error'] == record['test_error']
    assert summary['train_error'] == 1 - record['train_accuracy']
    assert summary['train_loss'] == record['train_loss']
    assert summary['test_loss'] == record['test_loss']
  assert runs[1]['parameters'] == runs[2]['parameters'] > 0  # routing has no parameters
  assert runs[1]['logit_changes'] == [] and not (workdir / 'r1' / 'logit_changes.json').exists()
  (change,) = runs[2]['logit_changes']

  # The change is that of the run's own routing, over its test images.
  config, state, _ = tasks.load_run(str(workdir / 'r2'))
  model, params = models.build(config.model), evaluation_params(state)
  images = jnp.asarray(data.load_dataset('mnist', data_dir).test_images, jnp.float32) / 255.0
  u_hat = interpret.prediction_vectors(model, params, images)
  np.testing.assert_allclose(capsjax.batched_dynamic_routing(u_hat, 2)[0],
                             model.apply({'params': params}, images).capsules, rtol=1e-5,
                             atol=1e-7)
  per_image = interpret.model_logit_changes(model, params, images)
  assert per_image.shape == (24, 1) and np.all(per_image > 0)
  np.testing.assert_allclose(change, np.mean(per_image), rtol=1e-5)

  table = (workdir / 'routing_iterations.md').read_text()
  rows = [line for line in table.splitlines() if line.startswith('| ') and '---' not in line]
  assert len(rows) == 3 and 'test error %' in rows[0]
  assert rows[1].startswith(f'| 1 | {runs[1]["parameters"]:,} | 1 | ')
  assert rows[1].endswith('| - (no update) |')
  assert rows[2].endswith(f'| {change:.3g} |')
  assert f'{100 * runs[2]["test_error"]:.2f}' in rows[2]
  picture = np.asarray(Image.open(workdir / 'routing_iterations.png').convert('RGB'))
  assert picture.shape[0] > 300 and picture.shape[1] > 2 * picture.shape[0]
  assert len(np.unique(picture.reshape(-1, 3), axis=0)) > 50

  # A rerun reads both runs and the measured change back: nothing is trained or measured.
  measured = (workdir / 'r2' / 'logit_changes.json').stat().st_mtime_ns
  again = run(*flags)
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'compiled' not in again.stdout and again.stdout.count('finished before') == 2
  assert (workdir / 'r2' / 'logit_changes.json').stat().st_mtime_ns == measured
  with open(workdir / 'routing_iterations.json') as f:
    assert json.load(f)['runs'] == study['runs']
