"""The command line: `python -m experiments.mnist`, run as a user would."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from tests.conftest import REPO, write_dataset

# lax.conv compiles in a fraction of the matmul convolution's time, and tests/test_model.py
# shows the two convolutions agree.
SMALL_FLAGS = ['--conv_features=16', '--primary_types=4', '--primary_dim=4', '--digit_dim=8',
               '--batch_size=16', '--progress_seconds=1000', '--conv_impl=xla']
# The smoke run's CapsNet: narrower than the paper's (compiling and training that one took this
# test most of a minute), yet wide enough to learn in its 20 steps. tests/test_notebook.py trains
# the paper's CapsNet, with the default convolutions, on real MNIST.
SMOKE_FLAGS = ['--conv_features=64', '--primary_types=8', '--primary_dim=8', '--conv_impl=xla']
# No huge-page restart for the runs that stop on an error: it would only double their start.
NO_RESTART = dict(os.environ, GLIBC_TUNABLES='glibc.malloc.hugetlb=0')


def command(*flags):
  return [sys.executable, '-m', 'experiments.mnist', *flags]


def run(*flags, env=None, timeout=400):
  proc = subprocess.run(command(*flags), cwd=REPO, capture_output=True, text=True,
                        timeout=timeout, env=env)
  return proc


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_smoke_run_on_real_mnist(tmp_path, mnist_dir):
  workdir = str(tmp_path / 'run')
  proc = run('--routing_iters=3', f'--data_dir={mnist_dir}', '--epochs=2', '--train_examples=160',
             '--test_examples=90', '--batch_size=16', *SMOKE_FLAGS, f'--workdir={workdir}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = read_metrics(workdir)
  assert [r['epoch'] for r in records] == [1, 2]
  record = records[-1]
  for key in ('epoch', 'step', 'train_loss', 'train_accuracy', 'test_loss', 'test_accuracy',
              'test_error', 'learning_rate', 'images_per_sec', 'epoch_seconds', 'num_devices'):
    assert key in record, key
  assert record['step'] == 20 and record['num_devices'] == 1
  correct = record['test_accuracy'] * 90
  assert abs(correct - round(correct)) < 1e-6  # every one of the 90 examples counted once
  assert record['test_accuracy'] > 0.2 and record['train_loss'] < 0.9
  assert abs(record['test_error'] + record['test_accuracy'] - 1) < 1e-9
  assert record['images_per_sec'] > 0 and record['learning_rate'] < 1e-3
  picture = Image.open(os.path.join(workdir, 'reconstructions.png'))
  colours = np.unique(np.asarray(picture.convert('RGB')).reshape(-1, 3), axis=0)
  assert picture.size[0] > 500 and len(colours) > 10
  curves = Image.open(os.path.join(workdir, 'curves.png'))
  assert curves.size[0] > 800 and curves.size[1] > 200
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', 'step_20'))
  last = proc.stdout.strip().splitlines()[-1]
  assert last == (f'Test accuracy {100 * record["test_accuracy"]:.2f}%, test error '
                  f'{100 * record["test_error"]:.2f}% on 90 images after epoch 2.')


BAD_FLAGS = [
    ('--batch_size=0', 'batch_size'),
    ('--routing_iters=0', 'routing_iters'),
    ('--dataset=cifar10', 'dataset'),
    ('--dtype=float16', 'dtype'),
]

# `python -m experiments.mnist` with each line of flags (JSON) on stdin in turn, all in this
# one process: prints a JSON line of each one's exit status and stderr.
RUN_EACH = '''
import contextlib, io, json, runpy, sys
from absl import flags
for line in sys.stdin:
  flags.FLAGS.unparse_flags()  # from the defaults, as in a new process
  sys.argv = ['mnist', *json.loads(line)]
  stderr = io.StringIO()
  try:
    with contextlib.redirect_stderr(stderr):
      runpy.run_module('experiments.mnist', run_name='__main__', alter_sys=True)
    status = 0
  except SystemExit as e:  # as the interpreter ends with it
    status = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
    if isinstance(e.code, str):
      stderr.write(e.code + '\\n')
  print(json.dumps([status, stderr.getvalue()]), flush=True)
'''


@pytest.fixture(scope='module')
def refused(tmp_path_factory):
  """flag -> (exit status, stderr, workdir) of experiments.mnist given each of BAD_FLAGS.

  One process runs them all: a Python and JAX start for each would be most of their time.
  test_a_bad_flag_on_the_command_line_exits_cleanly runs one as its own command line.
  """
  tmp = tmp_path_factory.mktemp('bad_flags')
  data_dir = write_dataset(str(tmp / 'data'))
  workdirs = [tmp / f'run{n}' for n in range(len(BAD_FLAGS))]
  lines = ''.join(json.dumps([flag, f'--data_dir={data_dir}', f'--workdir={workdir}']) + '\n'
                  for (flag, _), workdir in zip(BAD_FLAGS, workdirs))
  proc = subprocess.run([sys.executable, '-c', RUN_EACH], input=lines, cwd=REPO,
                        capture_output=True, text=True, timeout=120, env=NO_RESTART)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = [json.loads(line) for line in proc.stdout.splitlines()]
  assert len(results) == len(BAD_FLAGS), proc.stdout
  return {flag: (status, stderr, workdir)
          for (flag, _), (status, stderr), workdir in zip(BAD_FLAGS, results, workdirs)}


@pytest.mark.parametrize('flag,message', BAD_FLAGS)
def test_bad_flags_exit_cleanly(refused, flag, message):
  status, stderr, workdir = refused[flag]
  assert status != 0 and message in stderr
  assert 'Traceback' not in stderr and not workdir.exists()


def test_a_bad_flag_on_the_command_line_exits_cleanly(tmp_path, tiny_dataset):
  workdir = tmp_path / 'run'
  proc = run('--batch_size=0', f'--data_dir={tiny_dataset}', f'--workdir={workdir}',
             env=NO_RESTART, timeout=60)
  assert proc.returncode != 0 and 'batch_size' in proc.stderr
  assert 'Traceback' not in proc.stderr and not workdir.exists()


def test_missing_and_corrupt_data_exit_cleanly(tmp_path):
  workdir = tmp_path / 'run'
  proc = run(f'--data_dir={tmp_path / "nowhere"}', f'--workdir={workdir}', env=NO_RESTART,
             timeout=60)
  assert proc.returncode == 1 and proc.stderr.strip().endswith('nowhere: no such folder.')
  assert 'Traceback' not in proc.stderr and not workdir.exists()
  data_dir = write_dataset(str(tmp_path / 'data'))
  path = os.path.join(data_dir, 'train-labels-idx1-ubyte.gz')
  with open(path, 'wb') as f:
    f.write(b'\x1f\x8b garbage')
  proc = run(f'--data_dir={data_dir}', f'--workdir={workdir}', env=NO_RESTART, timeout=60)
  assert proc.returncode == 1 and 'train-labels-idx1-ubyte.gz: cannot be read' in proc.stderr
  assert 'Traceback' not in proc.stderr and not workdir.exists()


def test_batch_that_does_not_divide_among_devices(tmp_path, tiny_dataset):
  env = dict(NO_RESTART, XLA_FLAGS='--xla_force_host_platform_device_count=4')
  workdir = tmp_path / 'run'
  proc = run('--batch_size=18', f'--data_dir={tiny_dataset}', f'--workdir={workdir}', env=env,
             timeout=60)
  assert proc.returncode == 1
  assert 'does not divide among the 4 devices; use a multiple of 4' in proc.stderr
  assert not workdir.exists()


def test_eval_only_without_checkpoint(tmp_path, tiny_dataset):
  workdir = tmp_path / 'run'
  proc = run('--eval_only', f'--data_dir={tiny_dataset}', f'--workdir={workdir}',
             env=NO_RESTART, timeout=60)
  assert proc.returncode == 1 and 'no checkpoint in' in proc.stderr and not workdir.exists()
