"""Efficient-CapsNet: its size, its depthwise primary capsules, its batch statistics."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capsjax.errors import InputError
from capsjax.models import EfficientCapsNet, init_variables, parameter_counts
from capsjax.nn.conv import conv2d_xla, depthwise_conv2d
from capsjax.tasks import classification_losses
from capsjax.training import RECIPES, TrainConfig, create_train_state, train_step
from capsjax.training.checkpoint import Checkpointer, Progress
from capsjax.training.state import MODEL_STATE
from tests.conftest import REPO


def test_parameter_count_is_the_papers_by_hand():
  params = init_variables(EfficientCapsNet(), jax.random.PRNGKey(0), (28, 28, 1))['params']
  counts = parameter_counts(params)
  convs = (5 * 5 * 1 * 32 + 32) + (3 * 3 * 32 * 64 + 64) + (3 * 3 * 64 * 64 + 64) + \
      (3 * 3 * 64 * 128 + 128)
  norms = 2 * (32 + 64 + 64 + 128)                 # scale and offset; statistics are not trained
  primary = 9 * 9 * 128 + 128                      # one 9x9 kernel per map, and a bias
  routing = 16 * 10 * 16 * 8 + 16 * 10             # W [16, 10, 16, 8] and the log priors B
  assert counts['total'] - counts['decoder'] == convs + norms + primary + routing == 161_824
  assert counts['decoder'] == (160 * 512 + 512) + (512 * 1024 + 1024) + (1024 * 784 + 784)


@pytest.mark.parametrize('map_size,kernel_size', [(9, 9), (11, 3)])
def test_depthwise_convolution_correlates_each_channel_with_its_own_kernel(map_size, kernel_size):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, map_size, map_size, 5))
  kernel = rng.normal(size=(kernel_size, kernel_size, 5))
  out = np.asarray(depthwise_conv2d(jnp.asarray(x, jnp.float32), jnp.asarray(kernel, jnp.float32)))
  size = map_size - kernel_size + 1
  expected = np.zeros((2, size, size, 5))
  for b in range(2):
    for i in range(size):
      for j in range(size):
        for c in range(5):
          expected[b, i, j, c] = np.sum(x[b, i:i + kernel_size, j:j + kernel_size, c]
                                        * kernel[:, :, c])
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4)


@pytest.fixture(scope='module')
def model_and_variables():
  model = EfficientCapsNet()
  return model, init_variables(model, jax.random.PRNGKey(0), (28, 28, 1))


def images(n, seed=1):
  return jnp.asarray(np.random.default_rng(seed).uniform(size=(n, 28, 28, 1)), jnp.float32)


def test_training_moves_the_running_statistics_toward_the_batchs(model_and_variables):
  model, variables = model_and_variables
  batch = images(8)
  _, updated = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))(
      variables, batch)
  # The first normalisation's input, by lax.conv instead of the model's im2col products.
  conv1 = variables['params']['conv1']
  x = np.maximum(np.asarray(conv2d_xla(batch, conv1['kernel'], 1)) + np.asarray(conv1['bias']), 0)
  x = x.astype(np.float64).reshape(-1, 32)
  stats = updated['batch_stats']['norm1']
  # Keras's (and flax's) rule: statistics <- 0.99 statistics + 0.01 the batch's (the variance
  # with 1/N), from mean 0 and variance 1.
  np.testing.assert_allclose(stats['mean'], 0.01 * x.mean(0), rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(stats['var'], 0.99 + 0.01 * x.var(0), rtol=1e-5)


def test_evaluation_normalises_each_image_alone_training_by_the_batch(model_and_variables):
  model, variables = model_and_variables
  batch = images(6)
  evaluate = jax.jit(lambda v, x: model.apply(v, x).lengths)
  np.testing.assert_allclose(evaluate(variables, batch)[:2], evaluate(variables, batch[:2]),
                             rtol=1e-5, atol=1e-6)
  train = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'])[0].lengths)
  assert np.max(np.abs(train(variables, batch)[:2] - train(variables, batch[:2]))) > 1e-3


def test_training_steps_update_and_checkpoints_keep_the_statistics(tmp_path):
  config = TrainConfig.create(**{**RECIPES['efficient_capsnet'], 'shift_pixels': 0})
  state = create_train_state(jax.random.PRNGKey(0), config, classification_losses)
  assert set(state.model_state) == {'batch_stats'}
  batch = {'image': images(16), 'label': jnp.arange(16, dtype=jnp.int32) % 10}
  step = jax.jit(train_step)
  trained, _ = step(state, batch)
  trained, metrics = step(trained, batch)
  assert np.isfinite(float(metrics['loss'])) and int(trained.step) == 2
  before = state.model_state['batch_stats']['norm4']['mean']
  after = trained.model_state['batch_stats']['norm4']['mean']
  assert not np.allclose(before, after)
  with Checkpointer(str(tmp_path / 'checkpoints'), log=lambda line: None) as checkpointer:
    checkpointer.save(trained, Progress.end_of(1))
    restored, _ = checkpointer.restore(state)
  for got, want in zip(jax.tree.leaves(restored.model_state), jax.tree.leaves(trained.model_state)):
    np.testing.assert_array_equal(got, want)


PMAP_SCRIPT = r'''
import json, jax, jax.numpy as jnp, numpy as np
from capsjax.tasks import classification_losses
from capsjax.training import RECIPES, TrainConfig, create_train_state, steps
# No decoder, and lax.conv (faster to compile): the statistics are the batch norms'.
config = TrainConfig.create(**{**RECIPES['efficient_capsnet'], 'shift_pixels': 0,
                               'recon_weight': 0.0, 'conv_impl': 'xla'})
rng = np.random.default_rng(0)
images = jnp.asarray(rng.integers(0, 256, size=(16, 28, 28, 1)), jnp.uint8)
labels = jnp.asarray(rng.integers(0, 10, size=16), jnp.int32)
result = {}
for devices in (jax.devices()[:1], jax.devices()):
  p_train, _ = steps.pmap_steps(devices)
  put = lambda x: steps.replicate(x, devices)
  state = put(create_train_state(jax.random.PRNGKey(0), config, classification_losses))
  indices = np.arange(16, dtype=np.int32).reshape(len(devices), -1)
  state, _ = p_train(state, put(images), put(labels), indices)
  stats = state.model_state['batch_stats']['norm1']
  result[len(devices)] = {name: np.asarray(value).tolist() for name, value in stats.items()}
print('RESULT' + json.dumps(result))
'''


def test_devices_normalise_their_shares_and_average_the_statistics():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-c', PMAP_SCRIPT], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.split('RESULT')[-1])
  one, two = (np.asarray(result[n]['mean']) for n in ('1', '2'))
  assert np.array_equal(two[0], two[1])  # every device holds the same statistics
  # The mean of the two halves' means is the whole batch's: the running means agree. (The
  # variances do not: each device's is about its own half's mean.)
  np.testing.assert_allclose(two[0], one[0], rtol=1e-5, atol=1e-8)
  assert not np.allclose(result['2']['var'][0], result['1']['var'][0], rtol=1e-7, atol=0)


def test_a_moving_average_of_the_weights_is_refused_one_line():
  config = TrainConfig.create(**{**RECIPES['efficient_capsnet'], 'ema_decay': 0.999})
  with pytest.raises(InputError, match=r'^--ema_decay=0.999 with --model=efficient_capsnet: '):
    create_train_state(jax.random.PRNGKey(0), config, classification_losses)


def test_a_loss_that_drops_the_statistics_is_refused():
  config = TrainConfig.create(**{**RECIPES['efficient_capsnet'], 'shift_pixels': 0})

  def forgetful_loss(state, params, batch, train, rng):
    terms = classification_losses(state, params, batch, train, rng)
    return {name: value for name, value in terms.items() if name != MODEL_STATE}

  state = create_train_state(jax.random.PRNGKey(0), config, forgetful_loss)
  batch = {'image': images(4), 'label': jnp.arange(4, dtype=jnp.int32)}
  with pytest.raises(InputError, match='returned no updated model state'):
    jax.eval_shape(train_step, state, batch)


def test_images_too_small_for_the_layers_are_one_clear_error():
  with pytest.raises(InputError, match=r'^Efficient-CapsNet needs images of at least 27x27 .* '
                                       r'got images of shape \(1, 20, 20, 1\)'):
    init_variables(EfficientCapsNet(), jax.random.PRNGKey(0), (20, 20, 1))
