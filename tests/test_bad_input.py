"""Bad input stops a run in one line, before anything is written."""

import os
import subprocess
import sys

import numpy as np
import pytest

from capsjax import data
from capsjax.errors import InputError
from capsjax.tasks import classification_losses
from capsjax.training import Task, TrainConfig, loop
from tests.conftest import REPO, write_dataset
from tests.test_experiment import SMALL_FLAGS


def run_in(tmp_path, *flags):
  """Run experiments.mnist from an empty folder of its own, tmp_path/cwd."""
  cwd = tmp_path / 'cwd'
  cwd.mkdir()
  env = dict(os.environ, PYTHONPATH=str(REPO), GLIBC_TUNABLES='glibc.malloc.hugetlb=0')
  return subprocess.run([sys.executable, '-m', 'experiments.mnist', *SMALL_FLAGS, *flags],
                        cwd=cwd, capture_output=True, text=True, timeout=120, env=env)


def assert_one_line_error(proc, message):
  assert proc.returncode == 1, proc.stderr
  assert 'Traceback' not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and message in last, proc.stderr


@pytest.mark.parametrize('flag, message', [
    ('--learning_rate=nan', '--learning_rate=nan: give a finite number.'),
    ('--learning_rate=inf', '--learning_rate=inf: give a finite number.'),
    ('--ema_decay=1', '--ema_decay=1.0: must be below 1.'),
])
def test_settings_out_of_range_stop_before_anything_is_written(tmp_path, tiny_dataset, flag,
                                                               message):
  proc = run_in(tmp_path, flag, f'--data_dir={tiny_dataset}', f'--workdir={tmp_path / "run"}')
  assert_one_line_error(proc, message)
  assert os.listdir(tmp_path / 'cwd') == [] and not (tmp_path / 'run').exists()


def test_a_negative_seed_is_refused_when_the_flags_are_read(tmp_path, tiny_dataset):
  proc = run_in(tmp_path, '--seed=-1', f'--data_dir={tiny_dataset}',
                f'--workdir={tmp_path / "run"}')
  assert proc.returncode == 1 and 'Traceback' not in proc.stderr
  assert 'flag --seed=-1: -1 is not an integer in the range [0, 4294967295]' in proc.stderr
  assert os.listdir(tmp_path / 'cwd') == [] and not (tmp_path / 'run').exists()


def test_an_empty_workdir_is_refused_not_taken_for_the_current_folder(tmp_path, tiny_dataset):
  proc = run_in(tmp_path, f'--data_dir={tiny_dataset}', '--workdir=')
  assert_one_line_error(proc, '--workdir is empty')
  assert os.listdir(tmp_path / 'cwd') == [] and not (tmp_path / 'run').exists()


def test_images_too_small_for_the_model_leave_no_run_behind(tmp_path):
  data_dir = write_dataset(str(tmp_path / 'data'), size=16)
  workdir = tmp_path / 'run'
  proc = run_in(tmp_path, f'--data_dir={data_dir}', f'--workdir={workdir}')
  assert_one_line_error(proc, 'CapsNet needs images of at least')
  assert not workdir.exists()


def test_affine_digits_larger_than_the_canvas_are_one_line(tmp_path):
  data_dir = write_dataset(str(tmp_path / 'data'), size=48)
  cwd = tmp_path / 'cwd'
  cwd.mkdir()
  env = dict(os.environ, PYTHONPATH=str(REPO), GLIBC_TUNABLES='glibc.malloc.hugetlb=0')
  proc = subprocess.run([sys.executable, '-m', 'experiments.affine', *SMALL_FLAGS,
                         f'--data_dir={data_dir}', f'--workdir={tmp_path / "run"}'],
                        cwd=cwd, capture_output=True, text=True, timeout=120, env=env)
  assert_one_line_error(proc, 'the digits are 48x48, larger than the 40x40 canvas')
  assert not (tmp_path / 'run').exists()


def _dataset(test_size=28, test_count=8):
  rng = np.random.default_rng(0)
  return data.Dataset(
      train_images=rng.integers(0, 255, (32, 28, 28, 1), dtype=np.uint8),
      train_labels=np.arange(32, dtype=np.int32) % 10,
      test_images=rng.integers(0, 255, (test_count, test_size, test_size, 1), dtype=np.uint8),
      test_labels=np.arange(test_count, dtype=np.int32) % 10, num_classes=10, source='made here')


@pytest.mark.parametrize('dataset, message', [
    (_dataset(test_size=32), 'made here: the test images are (32, 32, 1), the training images '
                             '(28, 28, 1); give both splits images of one size.'),
    (_dataset(test_count=0), 'made here: the test split is empty; give it test examples.'),
])
def test_data_problems_stop_before_the_first_step(tmp_path, dataset, message):
  # Before: a Flax shape error or KeyError: 'count' after a whole epoch, with no checkpoint.
  config = TrainConfig.create(batch_size=16, epochs=1)
  with pytest.raises(InputError) as error:
    loop.train_and_evaluate(config, Task('mnist', dataset, classification_losses),
                            str(tmp_path / 'run'), log=lambda _: None)
  assert str(error.value) == message
  assert not (tmp_path / 'run').exists()
