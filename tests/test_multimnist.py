"""MultiMNIST: the pair generator, the two-digit loss, the two-longest metric, the command."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image
import pytest

from capsjax import BaselineCNN, data, tasks
from capsjax.analysis import evaluate
from capsjax.data import multimnist
from capsjax.nn import layers
from capsjax.nn.losses import reconstruction_loss
from capsjax.tasks.multimnist import multimnist_losses, pair_metrics
from capsjax.training import TrainConfig, TrainState, create_train_state, evaluation_params, rundir
from tests.conftest import REPO
from tests.test_loop import ENV

# A CapsNet small enough to compile in seconds, on MultiMNIST's 36x36 inputs; one routing
# iteration, for the same reason (routing is tested in tests/test_routing.py).
SMALL = dict(conv_features=16, primary_types=4, primary_dim=4, digit_dim=8, conv_impl='xla',
             routing_iters=1, image_shape=(36, 36, 1), shift_pixels=0)
SMALL_FLAGS = ['--conv_features=16', '--primary_types=4', '--primary_dim=4', '--digit_dim=8',
               '--conv_impl=xla', '--routing_iters=1', '--progress_seconds=1000']
# Pairs are made under jit throughout: op by op, each call takes seconds.
make_pairs = jax.jit(multimnist.make_pairs, static_argnums=4)


@pytest.fixture(scope='module')
def digits(mnist_dir):
  """The first 600 MNIST test digits, uint8 [600, 28, 28, 1], and their labels."""
  dataset = data.load_idx_dir(mnist_dir)
  return dataset.test_images[:600], dataset.test_labels[:600]


@pytest.fixture(scope='module')
def pairs(digits):
  images, labels = digits
  return jax.device_get(make_pairs(jax.random.PRNGKey(3), images, labels, jnp.arange(600) % 600,
                                   10))


def place(digit, dy, dx):
  """A 28x28 digit on a 36x36 canvas, 4 + dy rows and 4 + dx columns from the corner (NumPy)."""
  canvas = np.zeros((36, 36) + digit.shape[2:], np.uint8)
  canvas[4 + dy:32 + dy, 4 + dx:32 + dx] = digit
  return canvas


def test_pairs_have_two_classes_and_are_shifted_originals_merged_by_clipping(digits, pairs):
  images, labels = digits
  assert pairs['image'].shape == (600, 36, 36, 1) and pairs['image'].dtype == np.uint8
  assert pairs['digits'].shape == (600, 2, 36, 36, 1) and pairs['digits'].dtype == np.uint8
  assert pairs['label'].shape == (600, 2) and pairs['shifts'].shape == (600, 2, 2)
  np.testing.assert_array_equal(pairs['indices'][:, 0], np.arange(600))
  np.testing.assert_array_equal(pairs['label'], labels[pairs['indices']])
  assert np.all(pairs['label'][:, 0] != pairs['label'][:, 1])
  assert np.abs(pairs['shifts']).max() <= 4
  assert len({tuple(s) for s in pairs['shifts'].reshape(-1, 2)}) == 81  # every shift occurs
  for n in range(600):
    for d in range(2):
      dy, dx = pairs['shifts'][n, d]
      np.testing.assert_array_equal(pairs['digits'][n, d],
                                    place(images[pairs['indices'][n, d]], dy, dx))
  total = pairs['digits'].astype(np.int64).sum(axis=1)
  np.testing.assert_array_equal(pairs['image'], np.minimum(total, 255))
  assert np.any(total > 255)  # overlapping strokes were clipped


def test_partners_are_uniform_over_the_other_classes():
  labels = jnp.asarray(np.repeat([0, 1, 2], [5, 10, 15]))
  keys = jax.random.split(jax.random.PRNGKey(0), 50000)
  partners = np.asarray(multimnist.partner_indices(keys, labels, jnp.ones(50000, jnp.int32), 3))
  counts = np.bincount(partners, minlength=30)
  assert np.all(counts[5:15] == 0)  # never class 1
  # 20 candidates: each about 2,500 times (binomial standard deviation 49).
  assert np.all(np.abs(counts[np.r_[0:5, 15:30]] - 2500) < 250)


def test_pairs_are_a_function_of_the_key_and_the_base_alone(digits, pairs):
  images, labels = digits
  again = jax.device_get(make_pairs(jax.random.PRNGKey(3), images, labels,
                                    jnp.arange(100, 110), 10))
  for name in again:
    np.testing.assert_array_equal(again[name], pairs[name][100:110])  # same, in any batch
  other = jax.device_get(make_pairs(jax.random.PRNGKey(4), images, labels,
                                    jnp.arange(100, 110), 10))
  assert not np.array_equal(other['indices'][:, 1], pairs['indices'][100:110, 1])


@pytest.mark.parametrize('lengths, labels, accuracy, digit_accuracy', [
    ([0.9, 0.8, 0.1, 0.0], [0, 1], 1.0, 1.0),
    ([0.9, 0.8, 0.1, 0.0], [1, 0], 1.0, 1.0),
    ([0.9, 0.8, 0.1, 0.0], [0, 2], 0.0, 0.5),
    ([0.1, 0.2, 0.3, 0.0], [0, 3], 0.0, 0.0),
    ([0.5, 0.5, 0.5, 0.0], [0, 1], 1.0, 1.0),  # a three-way tie goes to the lower classes
    ([0.5, 0.5, 0.5, 0.0], [1, 2], 0.0, 0.5),
    ([0.2, 0.7, 0.7, 0.7], [1, 2], 1.0, 1.0),
    ([0.2, 0.7, 0.7, 0.7], [2, 3], 0.0, 0.5),
])
def test_two_longest_rule(lengths, labels, accuracy, digit_accuracy):
  metrics = pair_metrics(jnp.asarray([lengths]), jnp.asarray([labels]))
  assert float(metrics['accuracy'][0]) == accuracy
  assert float(metrics['digit_accuracy'][0]) == digit_accuracy


@pytest.fixture(scope='module')
def small_state():
  config = TrainConfig.create(**SMALL)
  return create_train_state(jax.random.PRNGKey(0), config, multimnist_losses)


@pytest.fixture(scope='module')
def batch(digits):
  images, labels = digits
  return jax.jit(multimnist.batch_maker(0))(jnp.asarray(images), jnp.asarray(labels),
                                            jnp.arange(6))


def test_loss_is_the_two_digit_margin_loss_plus_each_digits_reconstruction(small_state, batch):
  # Under jit, as the training step runs it (op by op it takes seconds).
  terms = jax.jit(multimnist_losses, static_argnums=3)(small_state, small_state.params, batch,
                                                       True, None)
  out = small_state.apply_fn({'params': small_state.params}, batch['image'])
  lengths = np.asarray(out.lengths, np.float64)
  targets = np.zeros((6, 10))
  targets[np.arange(6)[:, None], np.asarray(batch['label'])] = 1
  expected = np.sum(targets * np.maximum(0, 0.9 - lengths) ** 2
                    + 0.5 * (1 - targets) * np.maximum(0, lengths - 0.1) ** 2, axis=1)
  np.testing.assert_allclose(terms['margin_loss'], expected, rtol=1e-5)
  # Each digit's reconstruction is the decoder given that digit's capsule alone.
  recon = 0
  for d in range(2):
    single = small_state.apply_fn({'params': small_state.params}, batch['image'],
                                  batch['label'][:, d]).reconstructions
    recon = recon + reconstruction_loss(single, batch['digits'][:, d])
  np.testing.assert_allclose(terms['reconstruction_loss'], recon, rtol=1e-5)
  np.testing.assert_allclose(terms['loss'], terms['margin_loss'] + 0.0005 * recon, rtol=1e-5)


def test_each_reconstruction_term_sends_no_gradient_to_the_other_digits_capsule(small_state,
                                                                              batch):
  decoder = layers.Decoder((36, 36, 1))
  capsules = jax.random.normal(jax.random.PRNGKey(1), (6, 10, 8))
  labels = batch['label']
  masks = jax.nn.one_hot(labels, 10)
  params = jax.jit(decoder.init)(jax.random.PRNGKey(2), capsules, masks)

  def digit_loss(capsules, d):
    return jnp.sum(reconstruction_loss(decoder.apply(params, capsules, masks)[:, d],
                                       batch['digits'][:, d]))

  digit_grad = jax.jit(jax.grad(digit_loss), static_argnums=1)
  for d in range(2):
    grad = np.asarray(digit_grad(capsules, d))
    rows = np.arange(6)
    assert np.all(grad[rows, np.asarray(labels[:, 1 - d])] == 0)
    assert np.all(np.abs(grad[rows, np.asarray(labels[:, d])]).sum(-1) > 0)
    others = np.ones((6, 10), bool)
    others[rows[:, None], np.asarray(labels)] = False
    assert np.all(grad[others] == 0)


def test_baseline_loss_is_sigmoid_cross_entropy_on_both_classes(batch):
  # The paper's CNN at 36x36 has 56.9M parameters; a narrow one has the same loss.
  model = BaselineCNN(conv_features=(8, 8, 8), hidden=(16, 16), conv_impl='xla')
  config = TrainConfig.create(model='baseline', image_shape=(36, 36, 1))
  state = TrainState.create(
      apply_fn=model.apply,
      params=jax.jit(model.init)(jax.random.PRNGKey(0), batch['image'])['params'],
      tx=optax.sgd(0.0), rng=jax.random.PRNGKey(1), config=config,
      loss_fn=multimnist_losses)
  terms = multimnist_losses(state, state.params, batch, False, None)
  logits = np.asarray(state.apply_fn({'params': state.params}, batch['image'], train=False),
                      np.float64)
  targets = np.zeros((6, 10))
  targets[np.arange(6)[:, None], np.asarray(batch['label'])] = 1
  probs = 1 / (1 + np.exp(-logits))
  expected = -np.sum(targets * np.log(probs) + (1 - targets) * np.log(1 - probs), axis=1)
  np.testing.assert_allclose(terms['loss'], expected, rtol=1e-4)


def run(*flags):
  return subprocess.run([sys.executable, '-m', 'experiments.multimnist', *SMALL_FLAGS, *flags],
                        cwd=REPO, capture_output=True, text=True, timeout=600, env=ENV)


def test_command_trains_draws_and_exports(tmp_path, mnist_dir):
  workdir = str(tmp_path / 'run')
  common = [f'--data_dir={mnist_dir}', f'--workdir={workdir}', '--train_examples=192',
            '--test_examples=96', '--batch_size=32']
  proc = run(*common, '--epochs=1')
  assert proc.returncode == 0, proc.stderr[-3000:]
  record = rundir.read_metrics(os.path.join(workdir, 'metrics.jsonl'))[0]
  assert record['step'] == 6
  for key in ('test_accuracy', 'test_digit_accuracy', 'test_error', 'train_reconstruction_loss'):
    assert np.isfinite(record[key]), key
  assert record['test_digit_accuracy'] >= record['test_accuracy']
  with open(os.path.join(workdir, 'run.json')) as f:
    identity = json.load(f)
  assert identity['image_shape'] == [36, 36, 1] and identity['test_seed'] == 0
  assert identity['loss'] == 'multimnist_losses' and identity['shift_pixels'] == 0
  picture = Image.open(os.path.join(workdir, 'multimnist.png'))
  assert picture.size[0] > 1000

  path = str(tmp_path / 'pairs.npz')
  exported = run(f'--data_dir={mnist_dir}', f'--export={path}', '--test_examples=96')
  assert exported.returncode == 0, exported.stderr[-3000:]
  with np.load(path) as f:
    assert f['image'].shape == (96, 36, 36, 1) and f['image'].dtype == np.uint8
    assert f['digits'].shape == (96, 2, 36, 36, 1) and f['label'].shape == (96, 2)
    assert f['shifts'].shape == (96, 2, 2)
    np.testing.assert_array_equal(f['image'], np.minimum(f['digits'].astype(int).sum(1), 255))
    assert np.all(f['label'][:, 0] != f['label'][:, 1])
  # --eval_file's evaluation scores the exported pairs with the run's own loss, digits and all.
  # In this process: the flag itself is the same for every experiment (tests/test_affine.py).
  evaluate.evaluate_file(workdir, path, log=lambda line: None)
  with open(os.path.join(workdir, 'eval_pairs.json')) as f:
    result = json.load(f)
  _, state, _ = tasks.load_run(workdir)  # finds its loss by the name run.json records
  with np.load(path) as f:
    batch = {'image': jnp.asarray(f['image'], jnp.float32) / 255.0,
             'digits': jnp.asarray(f['digits'], jnp.float32) / 255.0,
             'label': jnp.asarray(f['label'], jnp.int32)}
  terms = jax.jit(multimnist_losses, static_argnums=3)(
      state, evaluation_params(state), batch, False, None)
  assert result['examples'] == 96
  for term in ('accuracy', 'digit_accuracy', 'loss', 'reconstruction_loss'):
    assert result[term] == pytest.approx(float(np.mean(terms[term])), rel=1e-4), term


def test_shift_pixels_is_refused(tmp_path, mnist_dir):
  proc = run(f'--data_dir={mnist_dir}', f'--workdir={tmp_path / "run"}', '--shift_pixels=2')
  assert proc.returncode == 1 and 'error: --shift_pixels does not apply' in proc.stderr
  assert not os.path.exists(tmp_path / 'run')
