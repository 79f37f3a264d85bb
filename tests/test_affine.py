"""Expanded MNIST placement, the generated affine test set, and the affNIST reader."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import io as scipy_io

from capsjax.data import affine
from capsjax.errors import InputError
from capsjax.training import rundir
from tests.conftest import REPO, write_dataset
from tests.test_loop import ENV, SMALL_FLAGS


def digits(count, seed=0):
  """MNIST-like uint8 digits [count, 28, 28, 1]: a smooth blob of strokes in the 20x20 centre."""
  rng = np.random.default_rng(seed)
  images = np.zeros((count, 28, 28), np.float64)
  rows, cols = np.mgrid[0:28, 0:28]
  for n in range(count):
    for _ in range(3):
      r, c = rng.uniform(8, 20, 2)
      images[n] += np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / rng.uniform(3, 12))
  images = images / images.max(axis=(1, 2), keepdims=True) * 255
  images[images < 20] = 0  # a black background, as MNIST's
  return np.rint(images).astype(np.uint8)[..., None]


def test_placement_keeps_every_digit_whole_where_its_offset_says():
  images = digits(6)
  offsets = jnp.array([[0, 0], [12, 12], [0, 12], [12, 0], [5, 7], [3, 11]], jnp.int32)
  placed = np.asarray(affine.place(jnp.asarray(images), offsets))
  assert placed.shape == (6, 40, 40, 1) and placed.dtype == np.uint8
  for image, (row, col), canvas in zip(images, np.asarray(offsets), placed):
    np.testing.assert_array_equal(canvas[row:row + 28, col:col + 28], image)
    outside = canvas.copy()
    outside[row:row + 28, col:col + 28] = 0
    assert not outside.any()


def test_random_offsets_are_uniform_over_the_positions_that_fit():
  draws = 169 * 300
  offsets = np.asarray(affine.random_offsets(jax.random.PRNGKey(0), jnp.arange(draws), (28, 28)))
  assert offsets.min() == 0 and offsets.max() == 12
  counts = np.zeros((13, 13), int)
  np.add.at(counts, (offsets[:, 0], offsets[:, 1]), 1)
  # 300 expected per position, standard deviation about 17: 5 of them either way.
  assert counts.min() > 300 - 85 and counts.max() < 300 + 85, counts
  chi2 = np.sum((counts - 300) ** 2 / 300)
  assert chi2 < 168 + 5 * np.sqrt(2 * 168)  # 168 degrees of freedom


def test_test_placement_depends_on_the_index_and_seed_alone():
  images = jnp.asarray(digits(10))
  labels = jnp.arange(10, dtype=jnp.int32)
  make_batch = affine.batch_maker(test_seed=3)
  whole = make_batch(images, labels, jnp.arange(10))
  part = make_batch(images, labels, jnp.array([7, 2]))
  np.testing.assert_array_equal(part['image'], whole['image'][jnp.array([7, 2])])
  fixed = affine.expanded_test_set(np.asarray(images), np.asarray(labels), test_seed=3)
  np.testing.assert_array_equal(fixed['image'],
                                np.rint(np.asarray(whole['image']) * 255).astype(np.uint8))
  other = affine.expanded_test_set(np.asarray(images), np.asarray(labels), test_seed=4)
  assert not np.array_equal(other['offset'], fixed['offset'])
  # Training batches draw new positions from the step's key.
  trained = make_batch(images, labels, jnp.arange(10), jax.random.PRNGKey(5))
  assert not np.array_equal(trained['image'], whole['image'])
  assert whole['image'].shape == (10, 40, 40, 1) and whole['image'].dtype == jnp.float32


def test_transform_matrix_by_hand():
  matrices = affine.transform_matrix(np.array([90.0, 0.0, 0.0]), np.array([0.0, 0.2, 0.0]),
                                     np.array([[1.0, 1.0], [1.0, 1.0], [1.1, 0.9]]))
  np.testing.assert_allclose(matrices[0], [[0, -1], [1, 0]], atol=1e-12)
  np.testing.assert_allclose(matrices[1], [[1, 0.2], [0, 1]])
  np.testing.assert_allclose(matrices[2], [[1.1, 0], [0, 0.9]])


@pytest.fixture(scope='module')
def generated():
  images = digits(40)
  return images, affine.generate(images, np.arange(40) % 10, copies=3, seed=7)


def test_generated_set_is_deterministic_for_a_seed(generated):
  images, first = generated
  again = affine.generate(images, np.arange(40) % 10, copies=3, seed=7)
  for name in first:
    np.testing.assert_array_equal(first[name], again[name])
  other = affine.generate(images[:4], np.arange(4), copies=1, seed=8)
  assert not np.allclose(other['rotation_degrees'], first['rotation_degrees'][:4])


def test_generated_parameters_stay_in_their_ranges(generated):
  images, result = generated
  assert result['image'].shape == (120, 40, 40, 1) and result['image'].dtype == np.uint8
  np.testing.assert_array_equal(result['index'], np.repeat(np.arange(40), 3))
  np.testing.assert_array_equal(result['label'], np.repeat(np.arange(40) % 10, 3))
  assert np.all(np.abs(result['rotation_degrees']) <= 20)
  assert np.all(np.abs(result['shear']) <= 0.2)
  assert np.all((result['scale'] >= 0.8) & (result['scale'] <= 1.2))
  # The draws cover their ranges rather than sitting in a corner of them.
  assert np.ptp(result['rotation_degrees']) > 30 and np.ptp(result['shear']) > 0.3


def test_generated_digits_keep_their_mass_inside_the_canvas_where_the_parameters_say(generated):
  images, result = generated
  centre = np.array([13.5, 13.5])
  rows, cols = np.mgrid[0:40, 0:40]
  for n in range(len(result['index'])):
    source = images[result['index'][n], ..., 0].astype(np.float64)
    out = result['image'][n, ..., 0].astype(np.float64)
    # Nothing reaches the margin, so nothing was cut off ...
    assert not out[:affine.MARGIN - 1].any() and not out[-(affine.MARGIN - 1):].any()
    assert not out[:, :affine.MARGIN - 1].any() and not out[:, -(affine.MARGIN - 1):].any()
    matrix = affine.transform_matrix(result['rotation_degrees'][n:n + 1],
                                     result['shear'][n:n + 1], result['scale'][n:n + 1])[0]
    # ... and the mass is the source's, times the map's change of area.
    assert out.sum() == pytest.approx(source.sum() * abs(np.linalg.det(matrix)), rel=0.03)
    # The centre of mass lands where the affine map sends the source's.
    src_rows, src_cols = np.mgrid[0:28, 0:28]
    source_centroid = np.array([np.sum(src_cols * source),
                                np.sum(src_rows * source)]) / source.sum()
    expected = matrix @ (source_centroid - centre) + result['translation'][n]
    got = np.array([np.sum(cols * out), np.sum(rows * out)]) / out.sum()
    np.testing.assert_allclose(got, expected, atol=0.3)


def write_affnist(path, images, labels):
  """A .mat file in the official affNIST layout: struct affNISTdata, image [1600, N]."""
  pixels = images.reshape(len(images), 1600).T.astype(np.uint8)
  one_of_n = np.eye(10, dtype=np.uint8)[labels].T
  scipy_io.savemat(path, {'affNISTdata': {'image': pixels, 'label_int': labels[None].astype(
      np.uint8), 'label_one_of_n': one_of_n}})


def test_affnist_reader_reads_the_whole_file_and_numbered_batches_in_order(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (30, 40, 40, 1), dtype=np.uint8)
  labels = rng.integers(0, 10, 30)
  write_affnist(str(tmp_path / 'test.mat'), images, labels)
  got_images, got_labels = affine.read_affnist(str(tmp_path))
  np.testing.assert_array_equal(got_images, images)
  np.testing.assert_array_equal(got_labels, labels)
  assert got_images.dtype == np.uint8 and got_labels.dtype == np.int32

  batches = tmp_path / 'split' / 'test_batches'
  batches.mkdir(parents=True)
  for number, part in zip((1, 2, 10), (slice(0, 10), slice(10, 20), slice(20, 30))):
    write_affnist(str(batches / f'{number}.mat'), images[part], labels[part])
  got_images, got_labels = affine.read_affnist(str(tmp_path / 'split'))
  np.testing.assert_array_equal(got_images, images)  # 1, 2, 10: by number, not by name
  np.testing.assert_array_equal(got_labels, labels)


def test_affnist_reader_names_what_is_wrong(tmp_path):
  with pytest.raises(InputError, match='neither test.mat nor test_batches'):
    affine.read_affnist(str(tmp_path))
  scipy_io.savemat(str(tmp_path / 'test.mat'), {'something': np.zeros(3)})
  with pytest.raises(InputError, match='is not an affNIST file'):
    affine.read_affnist(str(tmp_path))
  os.remove(tmp_path / 'test.mat')
  scipy_io.savemat(str(tmp_path / 'test.mat'), {'affNISTdata': {
      'image': np.zeros((784, 2), np.uint8), 'label_int': np.zeros((1, 2), np.uint8)}})
  with pytest.raises(InputError, match=r'is \(784, 2\), not \[1600, N\]'):
    affine.read_affnist(str(tmp_path))


def run_affine(*flags):
  return subprocess.run([sys.executable, '-m', 'experiments.affine', *SMALL_FLAGS, *flags],
                        cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV)


def test_command_trains_on_placed_digits_tests_affine_ones_and_compares(tmp_path):
  directory = write_dataset(str(tmp_path / 'data'), num_train=80, num_test=24)
  workdir = tmp_path / 'run'
  proc = run_affine(f'--data_dir={directory}', f'--workdir={workdir}', '--epochs=2',
                    '--validation_examples=16', '--affine_copies=2')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Affine test set: affine-transformed MNIST, generated, 48 digits.' in proc.stdout
  with open(workdir / 'run.json') as f:
    identity = json.load(f)
  assert identity['image_shape'] == [40, 40, 1] and identity['shift_pixels'] == 0
  assert identity['affine_test'] == affine.GENERATED_NAME and identity['affine_copies'] == 2
  records = rundir.read_metrics(str(workdir / 'metrics.jsonl'))
  assert [r['step'] for r in records] == [4, 8]  # 64 of the 80 in batches of 16
  for record in records:
    assert 0 <= record['affine_accuracy'] <= 1 and 0 <= record['test_accuracy'] <= 1
  assert (workdir / 'affine.png').exists() and (workdir / 'curves.png').exists()

  # The affine accuracy is the model's on the exported set, digit for digit.
  exported = tmp_path / 'affine.npz'
  proc = run_affine(f'--data_dir={directory}', f'--export={exported}', '--affine_copies=2')
  assert proc.returncode == 0, proc.stderr[-3000:]
  with np.load(exported) as f:
    assert f['image'].shape == (48, 40, 40, 1) and f['image'].dtype == np.uint8
    assert set(f.files) >= {'label', 'rotation_degrees', 'shear', 'scale', 'translation'}
  proc = run_affine(f'--eval_file={exported}', f'--workdir={workdir}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(workdir / 'eval_affine.json') as f:
    assert json.load(f)['accuracy'] == pytest.approx(records[-1]['affine_accuracy'])

  out = tmp_path / 'table'
  proc = run_affine(f'--compare={workdir}', f'--workdir={out}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out / 'comparison.json') as f:
    (row,) = json.load(f)
  best = max(records, key=lambda r: (r['validation_accuracy'], -r['epoch']))
  assert row['epoch'] == best['epoch'] and row['affine_accuracy'] == best['affine_accuracy']
  assert row['images_trained'] == 64 * best['epoch']
  assert row['paper'] == {'expanded_mnist': 0.9923, 'affnist': 0.79}
  assert f'| capsnet | {best["epoch"]} of 2 | {64 * best["epoch"]} |' in \
      (out / 'comparison.md').read_text()


def test_command_refuses_shifts_and_a_run_without_validation_to_compare(tmp_path):
  proc = run_affine(f'--workdir={tmp_path / "run"}', '--shift_pixels=2')
  assert proc.returncode == 1 and 'error: --shift_pixels does not apply' in proc.stderr
  assert not (tmp_path / 'run').exists()
  proc = run_affine(f'--compare={tmp_path / "nothing"}', f'--workdir={tmp_path / "table"}')
  assert proc.returncode == 1 and 'no trained run there' in proc.stderr
  assert not (tmp_path / 'table').exists()
