"""The shipped weights (`capsjax.pretrained`): the file's bytes, its accuracy, and its format."""

import json
import os
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from capsjax import files, pretrained
from capsjax.data import load_dataset
from capsjax.errors import InputError
from tests.conftest import REPO, find_mnist

FIRST = 1000


def _bfloat16_bits(values):
  """float32 -> bfloat16 bits by integer round-to-nearest-even (finite values)."""
  bits = np.asarray(values, np.float32).view(np.uint32).astype(np.uint64)
  return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def _run(*args, cwd=REPO):
  return subprocess.run([sys.executable, '-m', *args], cwd=cwd, capture_output=True, text=True,
                        timeout=600, env={**os.environ, 'PYTHONPATH': str(REPO)})


def test_shipped_mnist_weights_load_as_a_capsnet_that_classifies_test_digits():
  path = pretrained.shipped_path('mnist')  # checks the sha256
  assert os.path.getsize(path) <= pretrained.MAX_BYTES
  assert files.file_sha256(path) == pretrained.SHIPPED['mnist'].sha256
  _, identity, about = pretrained.read(path)
  assert identity['dataset'] == 'mnist' and about['test_accuracy'] >= 0.99
  model, params = pretrained.load('mnist')
  dataset = load_dataset('mnist', find_mnist())
  # Straight through the module (the command-line test below goes through the training
  # loop's evaluation): 250 digits, of which 99% or more are right.
  images = jnp.asarray(dataset.test_images[-250:], jnp.float32) / 255.0
  lengths = np.asarray(model.apply({'params': params}, images).lengths)
  assert lengths.shape == (250, 10)
  assert np.mean(lengths.argmax(-1) == dataset.test_labels[-250:]) >= 0.99


def test_weights_file_stores_bfloat16_rounded_to_nearest_even_and_float32_exactly(tmp_path):
  rng = np.random.default_rng(0)
  params = {'layer': {'kernel': rng.normal(size=(3, 5)).astype(np.float32) * 1e-2,
                      'bias': np.array([1.0, 1.00390625, 1.01171875, -2.5e-5], np.float32)}}
  about = {'epoch': 3}
  for dtype in pretrained.STORED_DTYPES:
    path = str(tmp_path / f'{dtype}.npz')
    pretrained.save(path, params, {'dataset': 'mnist'}, about, dtype)
    read, identity, read_about = pretrained.read(path)
    assert identity == {'dataset': 'mnist'} and read_about == {'epoch': 3, 'dtype': dtype}
    for name in ('kernel', 'bias'):
      got, want = read['layer'][name], params['layer'][name]
      assert got.dtype == np.float32 and got.shape == want.shape
      if dtype == 'float32':
        np.testing.assert_array_equal(got, want)
      else:
        expected = (_bfloat16_bits(want).astype(np.uint32) << 16).view(np.float32)
        np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(got, pretrained.rounded(params, dtype)['layer'][name])
  # 1.00390625 is halfway between two bfloat16 values: it rounds to the even one, 1.0.
  assert read['layer']['bias'][1] == 1.0 and read['layer']['bias'][2] == 1.015625
  with np.load(str(tmp_path / 'bfloat16.npz'), allow_pickle=False) as f:
    assert f['params/layer/kernel'].dtype == np.uint16
    assert json.loads(str(f['about.json']))['dtype'] == 'bfloat16'


def test_weights_files_refuse_oversize_damage_and_unknown_names(tmp_path, monkeypatch):
  params = {'w': np.ones((100, 100), np.float32) * np.arange(100, dtype=np.float32)}
  path = str(tmp_path / 'w.npz')
  with pytest.raises(InputError, match='over the 0.001 MB allowed'):
    pretrained.save(path, params, {}, {}, 'float32', max_bytes=1000)
  assert os.listdir(tmp_path) == []  # nothing half written
  with pytest.raises(InputError, match="weights dtype 'float16'"):
    pretrained.save(path, params, {}, {}, 'float16')
  pretrained.save(path, params, {}, {}, 'float32')
  monkeypatch.setattr(pretrained, 'WEIGHTS_DIR', str(tmp_path))
  monkeypatch.setitem(pretrained.SHIPPED, 'digits', pretrained.Shipped('w.npz', '0' * 64))
  with pytest.raises(InputError, match='is not the shipped file'):
    pretrained.shipped_path('digits')
  with pytest.raises(InputError, match="no shipped weights for 'fashion_mnist'; there are: "):
    pretrained.shipped_path('fashion_mnist')
  np.savez(str(tmp_path / 'plain.npz'), image=np.zeros(3))
  with pytest.raises(InputError, match="not a capsjax weights file \\(it lacks 'run.json'\\)"):
    pretrained.read(str(tmp_path / 'plain.npz'))
  with open(path, 'rb') as f:
    head = f.read(os.path.getsize(path) // 2)
  with open(tmp_path / 'cut.npz', 'wb') as f:  # a download cut short
    f.write(head)
  with pytest.raises(InputError, match='not a capsjax weights file'):
    pretrained.read(str(tmp_path / 'cut.npz'))


def test_command_line_evaluates_the_shipped_weights_and_refuses_what_it_cannot_do(tmp_path):
  data_dir = find_mnist()
  _, _, about = pretrained.read(pretrained.shipped_path('mnist'))
  proc = _run('experiments.mnist', '--pretrained', '--eval_only', f'--test_examples={FIRST}',
              f'--data_dir={data_dir}')
  assert proc.returncode == 0, proc.stderr
  # The shipped file's accuracy on the first 1,000 test digits, as the exporter measured it.
  # (measured on another device, maybe: one digit's difference at most.)
  line = [line for line in proc.stdout.splitlines() if line.startswith('Test accuracy')]
  accuracy = float(re.match(r'Test accuracy ([\d.]+)%', line[0]).group(1)) / 100
  assert abs(accuracy - about[f'first_{FIRST}_test_accuracy']) <= 1.001 / FIRST
  assert accuracy >= 0.99
  assert f'on {FIRST} images, the shipped weights' in line[0]
  for args, message in (
      (('experiments.mnist', '--pretrained'), '--pretrained evaluates the shipped weights: add '
                                              '--eval_only'),
      (('experiments.multimnist', '--pretrained', '--eval_only'),
       'there are no shipped weights for experiments.multimnist')):
    proc = _run(*args, f'--data_dir={data_dir}', f'--workdir={tmp_path / "unused"}')
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
  assert not os.path.exists(tmp_path / 'unused')


def test_dimensions_and_eval_file_read_the_shipped_weights(tmp_path):
  data_dir = find_mnist()
  dataset = load_dataset('mnist', data_dir)
  eval_file = str(tmp_path / 'mine.npz')
  np.savez(eval_file, image=dataset.test_images[:50, :, :, 0], label=dataset.test_labels[:50])
  proc = _run('experiments.mnist', '--pretrained', f'--eval_file={eval_file}',
              f'--workdir={tmp_path}')
  assert proc.returncode == 0, proc.stderr
  result = json.load(open(tmp_path / 'eval_mine.json'))
  assert result['examples'] == 50 and result['accuracy'] >= 0.96
  assert result['checkpoint'].startswith('the shipped weights')
  proc = _run('experiments.dimensions', '--pretrained', '--digits=1', f'--data_dir={data_dir}',
              cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr
  pictures = tmp_path / 'runs' / 'pretrained-mnist'
  assert sorted(os.listdir(pictures)) == ['couplings.png', 'dimensions.png']
