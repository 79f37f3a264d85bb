import math
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import capsjax
from capsjax import models
from capsjax.training import TrainConfig
from tests import reference
from tests.conftest import REPO

SMALL = dict(conv_features=(4, 6, 3), hidden=(16, 8))


def conv2d_same(x, kernel, stride):
  """SAME by its definition: out = ceil(size / stride), zero pad (smaller half low), VALID loops."""
  pads = []
  for size, k in zip(x.shape[1:3], kernel.shape[:2]):
    total = max((math.ceil(size / stride) - 1) * stride + k - size, 0)
    pads.append((total // 2, total - total // 2))
  return reference.conv2d_valid(np.pad(x.astype(np.float64), ((0, 0), *pads, (0, 0))),
                                kernel.astype(np.float64), stride)


@pytest.mark.parametrize('impl', ['matmul', 'xla'])
@pytest.mark.parametrize('size,kernel,stride', [
    ((9, 9), 5, 1), ((8, 10), 5, 1), ((9, 11), 3, 2), ((10, 8), 5, 2), ((7, 12), 4, 2)])
def test_same_convolution_equals_padded_direct_loops(size, kernel, stride, impl):
  rng = np.random.default_rng(kernel * stride + size[0])
  x = rng.normal(size=(2, *size, 3)).astype(np.float32)
  w = rng.normal(size=(kernel, kernel, 3, 4)).astype(np.float32)
  layer = capsjax.Conv2D(4, kernel, stride, impl, padding='SAME')
  params = {'params': {'kernel': jnp.asarray(w), 'bias': jnp.zeros(4)}}
  out = layer.apply(params, jnp.asarray(x))
  assert out.shape == (2, -(-size[0] // stride), -(-size[1] // stride), 4)
  np.testing.assert_allclose(out, conv2d_same(x, w, stride), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('impl', ['matmul', 'xla'])
@pytest.mark.parametrize('size,stride', [(11, 1), (11, 2), (12, 2)])
def test_same_convolution_and_gradients_equal_flax_conv(size, stride, impl):
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, size, size, 5))
  ours = capsjax.Conv2D(6, 5, stride, impl, padding='SAME')
  params = ours.init(jax.random.PRNGKey(1), x)
  params = jax.tree.map(lambda p: p + 0.1, params)  # a non-zero bias too
  theirs = nn.Conv(6, (5, 5), strides=(stride, stride), padding='SAME')
  np.testing.assert_allclose(ours.apply(params, x), theirs.apply(params, x), rtol=1e-4, atol=1e-4)
  # The input gradient passes back through the padding.
  grad = lambda m: jax.grad(lambda p, x: jnp.sum(m.apply(p, x) ** 2), argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree.leaves(grad(ours)), jax.tree.leaves(grad(theirs))):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)


def test_unknown_padding_is_a_clear_error():
  with pytest.raises(ValueError, match="'VALID', 'SAME'"):
    capsjax.Conv2D(2, 3, padding='FULL').init(jax.random.PRNGKey(0), jnp.zeros((1, 5, 5, 1)))


@pytest.fixture(scope='module')
def paper_baseline():
  model = capsjax.BaselineCNN()
  return model, capsjax.init_params(model, jax.random.PRNGKey(0), (28, 28, 1))


def test_parameter_count_of_the_paper_baseline(paper_baseline):
  _, params = paper_baseline
  conv1 = 5 * 5 * 1 * 256 + 256
  conv2 = 5 * 5 * 256 * 256 + 256
  conv3 = 5 * 5 * 256 * 128 + 128
  fc1 = 28 * 28 * 128 * 328 + 328  # SAME padding, no pooling: 28 x 28 x 128 features
  fc2 = 328 * 192 + 192
  logits = 192 * 10 + 10
  counts = capsjax.parameter_counts(params)
  assert counts == {'conv1': 6_656, 'conv2': 1_638_656, 'conv3': 819_328, 'fc1': 32_915_784,
                    'fc2': 63_168, 'logits': 1_930, 'total': 35_445_522}
  assert counts['total'] == conv1 + conv2 + conv3 + fc1 + fc2 + logits
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))


def test_the_40x40_baseline_pools_to_a_parameter_count_near_capsnets():
  config = TrainConfig.create(model='baseline', image_shape=(40, 40, 1),
                              baseline_conv3_features=96, baseline_pool=2)
  params = jax.eval_shape(lambda key: capsjax.init_params(models.build(config.model), key,
                                                          (40, 40, 1)), jax.random.PRNGKey(0))
  counts = capsjax.parameter_counts(params)
  # conv1 on 40x40, pooled 2x2: conv2 and conv3 on 20x20, so fc1 sees 20x20x96 features.
  assert counts['conv3'] == 5 * 5 * 256 * 96 + 96
  assert counts['fc1'] == 20 * 20 * 96 * 328 + 328
  assert counts['total'] == 14_920_434  # CapsNet on 40x40: 13,475,648


def test_pooling_after_the_first_convolution_takes_the_maximum_of_each_window():
  model = capsjax.BaselineCNN(conv_features=(2,), hidden=(), pool=2, num_classes=1)
  images = jax.random.uniform(jax.random.PRNGKey(3), (2, 6, 6, 1))
  params = capsjax.init_params(model, jax.random.PRNGKey(0), (6, 6, 1))
  is_conv = lambda module, method: isinstance(module, capsjax.Conv2D) and method == '__call__'
  _, captured = model.apply({'params': params}, images, capture_intermediates=is_conv)
  features = captured['intermediates']['conv1']['__call__'][0]
  relu = np.maximum(np.asarray(features, np.float64), 0)
  pooled = relu.reshape(2, 3, 2, 3, 2, 2).max(axis=(2, 4))  # 2x2 windows, stride 2
  expected = pooled.reshape(2, -1) @ np.asarray(params['logits']['kernel'], np.float64) + \
      np.asarray(params['logits']['bias'], np.float64)
  np.testing.assert_allclose(model.apply({'params': params}, images), expected, rtol=1e-5,
                             atol=1e-6)


def test_logits_shape_and_dtype(paper_baseline):
  model, params = paper_baseline
  logits = jax.jit(model.apply)({'params': params}, jnp.full((2, 28, 28, 1), 0.5))
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))


@pytest.fixture(scope='module')
def small_baseline():
  model = capsjax.BaselineCNN(**SMALL)
  images = jax.random.uniform(jax.random.PRNGKey(1), (3, 10, 10, 1))
  return model, capsjax.init_params(model, jax.random.PRNGKey(0), (10, 10, 1)), images


def test_dropout_only_in_training(small_baseline):
  model, params, images = small_baseline
  variables = {'params': params}
  apply = lambda m, key, train: m.apply(variables, images, train, rngs={'dropout': key})
  evaluated = model.apply(variables, images)
  np.testing.assert_array_equal(apply(model, jax.random.PRNGKey(2), False), evaluated)
  np.testing.assert_array_equal(apply(model, jax.random.PRNGKey(3), False), evaluated)
  trained = apply(model, jax.random.PRNGKey(2), True)
  assert trained.shape == (3, 10) and trained.dtype == jnp.float32
  assert not np.allclose(trained, apply(model, jax.random.PRNGKey(3), True))
  no_dropout = model.clone(dropout_rate=0.0)
  np.testing.assert_allclose(apply(no_dropout, jax.random.PRNGKey(2), True), evaluated, rtol=1e-6)


def test_conv_impls_and_bfloat16_compute(small_baseline):
  model, params, images = small_baseline
  logits = model.apply({'params': params}, images)
  np.testing.assert_allclose(model.clone(conv_impl='xla').apply({'params': params}, images),
                             logits, rtol=1e-4, atol=1e-5)
  logits16 = model.clone(dtype=jnp.bfloat16).apply({'params': params}, images)
  assert logits16.dtype == jnp.float32
  np.testing.assert_allclose(logits16, logits, rtol=0.1, atol=0.05)


def test_images_without_channel_axis_are_a_clear_error(small_baseline):
  model, params, _ = small_baseline
  with pytest.raises(ValueError, match='channel axis'):
    model.apply({'params': params}, jnp.zeros((2, 10, 10)))


def test_summary_prints_the_baseline_layers_and_total():
  result = subprocess.run([sys.executable, '-m', 'experiments.summary', '--model=baseline'],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert 'Baseline CNN for (28, 28, 1) images' in result.stdout
  for name in ('conv1', 'conv2', 'conv3', 'fc1', 'fc2', 'logits'):
    assert f'  {name} ' in result.stdout
  assert '35,445,522' in result.stdout
