"""experiments.reproduce: its plan, its time estimate and its results table, without training.

`experiments.reproduction` is imported here; the command's flags (`experiments.common`'s)
would clash with `experiments.benchmark`'s in one process, so it runs in subprocesses.
"""

import json
import os
import subprocess
import sys

import pytest

from experiments import reproduction as reproduce
from experiments.paper import ROWS
from tests.conftest import REPO


def _metrics(workdir, errors, seconds=600.0):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    for epoch, error in enumerate(errors, 1):
      f.write(json.dumps({'epoch': epoch, 'test_error': error, 'epoch_seconds': seconds}) + '\n')


def test_plan_trains_the_mnist_runs_once_as_table1_rows_and_passes_training_flags(tmp_path):
  plan = reproduce.Plan(seeds=2, epochs=7, multimnist_epochs=3, affine_epochs=4,
                        passed=('--dtype=bfloat16',))
  todo = reproduce.planned_runs(reproduce.PARTS, str(tmp_path), plan)
  mnist, table1 = todo['mnist'], todo['table1']
  # Table 1's 3-iteration reconstruction row is the mnist part: trained once, there.
  everything = reproduce.runs_of('table1', str(tmp_path), plan)
  assert len(everything) == len(ROWS) * 2 and len(table1) == (len(ROWS) - 1) * 2
  assert {r.workdir for r in mnist} | {r.workdir for r in table1} == {r.workdir for r in everything}
  assert all('capsnet_r3_recon' in r.workdir for r in mnist)
  for run in (*mnist, *todo['multimnist'], *todo['affine']):
    assert run.flags[0] == '--dtype=bfloat16'
  assert mnist[1].command('D', mnist[1].workdir)[2:] == [
      'experiments.mnist', '--dtype=bfloat16', '--routing_iters=3', '--epochs=7', '--seed=1',
      '--data_dir=D', f'--workdir={mnist[1].workdir}']
  assert [r.epochs for r in todo['affine']] == [4, 4] and todo['multimnist'][0].epochs == 3
  assert [r.train_examples for r in todo['affine']] == [55000, 55000]
  small = reproduce.Plan(train_examples=20000)
  assert [r.train_examples for part in ('mnist', 'affine')
          for r in reproduce.runs_of(part, str(tmp_path), small)] == [20000] * 5


def test_time_left_counts_the_epochs_not_done_and_one_test_pass_each(tmp_path):
  run = reproduce.Run('experiments.mnist', [], str(tmp_path / 'run'), epochs=5,
                      train_examples=60000, step='capsnet r3 28')
  _metrics(run.workdir, [0.01, 0.009])
  # 3 epochs left of 468 steps (60,000 // 128) and 10,000 test images at a third of a
  # step's work per image: 468 + 26.04 steps of 0.5 s each.
  expected = 3 * (468 + 10000 / (3 * 128)) * 0.5
  plan = reproduce.Plan(batch_size=128)
  assert reproduce.remaining_seconds(run, {'capsnet r3 28': 0.5}, plan) == pytest.approx(expected)
  # The first 1,000 test images only: 468 + 2.6 steps an epoch.
  plan = reproduce.Plan(batch_size=128, test_examples=1000)
  assert reproduce.remaining_seconds(run, {'capsnet r3 28': 0.5}, plan) == pytest.approx(
      3 * (468 + 1000 / 384) * 0.5)
  assert reproduce.hours(expected) == '12 min' and reproduce.hours(7200) == '2.0 h'


def test_results_table_reads_each_runs_files(tmp_path):
  plan = reproduce.Plan(seeds=2, epochs=2)
  mnist = reproduce.runs_of('mnist', str(tmp_path), plan)
  _metrics(mnist[0].workdir, [0.01, 0.005])
  _metrics(mnist[1].workdir, [0.004], seconds=900.0)
  os.makedirs(tmp_path / 'affine')
  json.dump([{'affine_accuracy': 0.79}, {'affine_accuracy': 0.6612}],
            open(tmp_path / 'affine' / 'comparison.json', 'w'))
  table = reproduce.write_results(str(tmp_path), plan)
  lines = {line.split(' | ')[0]: line for line in table.splitlines() if line.startswith('| ')}
  # Last epochs: 0.5% and 0.4%, mean 0.45, sample std 0.0707; 2 + 1 epochs of 600 / 900 s.
  mnist_line = lines["| MNIST, the paper's recipe (3 iterations, reconstruction)"]
  assert '| 0.45% +- 0.071 test error (2 run(s)) | 2/2, 1/2 | 35 min |' in mnist_line
  assert 'not run yet' in lines['| MultiMNIST (both digits right)']
  assert '79.00% / 66.12% on generated affine digits' in lines['| Affine robustness, CapsNet / CNN']
  saved = json.load(open(tmp_path / 'results.json'))
  assert saved['rows'][0]['runs'] == [r.workdir for r in mnist]


PASSED_SCRIPT = """
import sys
from experiments import reproduce
reproduce.FLAGS(['reproduce', *sys.argv[1:]])
print(list(reproduce.passed_flags()))
"""


def test_passed_flags_are_the_training_flags_given_less_those_each_run_sets():
  proc = subprocess.run([sys.executable, '-c', PASSED_SCRIPT, '--dtype=bfloat16', '--recipe=fast',
                         '--epochs=3', '--seeds=1', '--ema_decay=0.5', '--only=mnist'],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == "['--dtype=bfloat16', '--ema_decay=0.5', '--recipe=fast']"


@pytest.mark.parametrize('flags,message', [
    (['--only=mnist,cifar'], '--only=mnist,cifar: cifar is not a part; choose among '
                             'mnist,table1,multimnist,affine.'),
    (['--recipe=efficient_capsnet'], '--recipe=efficient_capsnet trains another model'),
])
def test_what_reproduce_cannot_honour_is_one_line_before_anything_runs(tmp_path, flags,
                                                                        message):
  proc = subprocess.run([sys.executable, '-m', 'experiments.reproduce', *flags,
                         f'--workdir={tmp_path / "r"}'], cwd=REPO, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 1
  assert proc.stderr.startswith(f'error: {message}') and len(proc.stderr.splitlines()) == 1
  assert not os.path.exists(tmp_path / 'r')
