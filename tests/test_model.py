import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import capsjax
from capsjax.nn.conv import conv2d, resolve_impl
from capsjax.training import TrainConfig
from tests import reference


@pytest.mark.parametrize('kernel,stride,channels', [(9, 1, 1), (9, 2, 16), (3, 2, 8), (5, 3, 4)])
def test_matmul_convolution_equals_direct_loops(kernel, stride, channels):
  rng = np.random.default_rng(kernel + stride)
  x = rng.normal(size=(2, 20, 17, channels)).astype(np.float32)
  w = rng.normal(size=(kernel, kernel, channels, 6)).astype(np.float32)
  expected = reference.conv2d_valid(x, w, stride)
  for impl in ('matmul', 'xla'):
    np.testing.assert_allclose(conv2d(jnp.asarray(x), jnp.asarray(w), stride, impl), expected,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('size,kernel,stride,channels', [
    ((20, 20), 9, 2, 16), ((17, 19), 5, 3, 4), ((21, 14), 4, 2, 3), ((12, 12), 9, 1, 1)])
def test_matmul_convolution_gradients_equal_direct_loops(size, kernel, stride, channels):
  # The backward pass is a hand-written col2im: check it on sizes the stride does not divide.
  rng = np.random.default_rng(kernel * stride)
  x = rng.normal(size=(2, *size, channels)).astype(np.float32)
  w = rng.normal(size=(kernel, kernel, channels, 5)).astype(np.float32)
  out, vjp = jax.vjp(lambda x, w: conv2d(x, w, stride), jnp.asarray(x), jnp.asarray(w))
  out_grad = rng.normal(size=out.shape).astype(np.float32)
  dx, dw = jax.jit(vjp)(jnp.asarray(out_grad))
  dx_ref, dw_ref = reference.conv2d_valid_vjp(x, w, stride, out_grad)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dw, dw_ref, rtol=1e-4, atol=1e-4)



@pytest.mark.parametrize('size,kernel,stride,channels', [((20, 20), 9, 2, 16), ((17, 19), 5, 3, 4)])
def test_forward_mode_of_the_matmul_convolution(size, kernel, stride, channels):
  rng = np.random.default_rng(kernel + stride)
  x, dx = rng.normal(size=(2, 2, *size, channels)).astype(np.float32)
  w, dw = rng.normal(size=(2, kernel, kernel, channels, 5)).astype(np.float32)
  # The convolution is bilinear: its derivative along (dx, dw) is conv(dx, w) + conv(x, dw).
  expected = reference.conv2d_valid(dx, w, stride) + reference.conv2d_valid(x, dw, stride)
  primals, tangents = tuple(map(jnp.asarray, (x, w))), tuple(map(jnp.asarray, (dx, dw)))
  for impl in ('matmul', 'xla'):
    _, derivative = jax.jvp(lambda x, w, impl=impl: conv2d(x, w, stride, impl), primals, tangents)
    np.testing.assert_allclose(derivative, expected, rtol=1e-4, atol=1e-3)


def test_matmul_convolution_jacobians_forward_and_reverse_agree():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 8, 3))
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, 2))
  conv = lambda x, w: conv2d(x, w, 2)
  for forward, reverse in zip(jax.jacfwd(conv, (0, 1))(x, w), jax.jacrev(conv, (0, 1))(x, w)):
    np.testing.assert_allclose(forward, reverse, rtol=1e-5, atol=1e-6)

def test_unknown_conv_impl_is_a_clear_error():
  with pytest.raises(ValueError, match="'auto', 'matmul', 'xla'"):
    conv2d(jnp.zeros((1, 9, 9, 1)), jnp.zeros((3, 3, 1, 2)), 1, 'cudnn')


@pytest.mark.parametrize('platform, uses_xla_conv', [('cpu', False), ('gpu', True),
                                                     ('tpu', True)])
def test_auto_conv_impl_is_chosen_by_platform(monkeypatch, platform, uses_xla_conv):
  monkeypatch.setattr(jax, 'default_backend', lambda: platform)
  assert resolve_impl('auto') == ('xla' if uses_xla_conv else 'matmul')
  assert resolve_impl('matmul') == 'matmul' and resolve_impl('xla') == 'xla'
  jaxpr = str(jax.make_jaxpr(lambda x, w: conv2d(x, w, 2))(jnp.zeros((1, 9, 9, 1)),
                                                          jnp.zeros((3, 3, 1, 2))))
  assert ('conv_general_dilated' in jaxpr) == uses_xla_conv
  assert capsjax.CapsNet().conv_impl == 'auto' and TrainConfig().model.conv_impl == 'auto'


def test_conv_layer_equals_flax_conv_with_same_parameters():
  x = jax.random.uniform(jax.random.PRNGKey(0), (3, 20, 20, 32))
  ours = capsjax.Conv2D(24, 9, 2)
  params = ours.init(jax.random.PRNGKey(1), x)
  params = jax.tree.map(lambda p: p + 0.1, params)  # a non-zero bias too
  theirs = nn.Conv(24, (9, 9), strides=(2, 2), padding='VALID')
  np.testing.assert_allclose(ours.apply(params, x), theirs.apply(params, x), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope='module')
def paper_model():
  model = capsjax.CapsNet()
  return model, capsjax.init_params(model, jax.random.PRNGKey(0), (28, 28, 1))


def test_parameter_count_of_the_paper_configuration(paper_model):
  _, params = paper_model
  conv1 = 9 * 9 * 1 * 256 + 256
  primary = 9 * 9 * 256 * (32 * 8) + 32 * 8
  digit = 1152 * 10 * 8 * 16  # 6 x 6 x 32 = 1152 primary capsules, no bias
  decoder = (160 * 512 + 512) + (512 * 1024 + 1024) + (1024 * 784 + 784)
  counts = capsjax.parameter_counts(params)
  assert counts == {'conv1': conv1, 'decoder': decoder, 'digit_caps': digit,
                    'primary_caps': primary, 'total': conv1 + primary + digit + decoder}
  assert counts['total'] == 8_215_568
  assert params['digit_caps']['weights'].shape == (1152, 10, 16, 8)


def test_output_shapes_lengths_and_masking(paper_model):
  model, params = paper_model
  images = jax.random.uniform(jax.random.PRNGKey(1), (4, 28, 28, 1))
  apply = jax.jit(lambda p, x, y=None: model.apply({'params': p}, x, y))
  out = apply(params, images)
  assert out.capsules.shape == (4, 10, 16) and out.lengths.shape == (4, 10)
  assert out.reconstructions.shape == (4, 28, 28, 1)
  assert out.lengths.dtype == jnp.float32 and out.reconstructions.dtype == jnp.float32
  assert bool(jnp.all((out.lengths >= 0) & (out.lengths < 1)))
  assert bool(jnp.all((out.reconstructions > 0) & (out.reconstructions < 1)))
  np.testing.assert_allclose(out.lengths, jnp.linalg.norm(out.capsules, axis=-1), atol=1e-3)
  # Without labels the decoder sees the longest capsule: same as passing argmax.
  predicted = jnp.argmax(out.lengths, axis=-1)
  np.testing.assert_allclose(apply(params, images, predicted).reconstructions,
                             out.reconstructions, rtol=1e-5)
  other = (predicted + 1) % 10
  assert not np.allclose(apply(params, images, other).reconstructions, out.reconstructions)
  # Integer labels and one-hot labels mask alike.
  np.testing.assert_allclose(apply(params, images, jax.nn.one_hot(other, 10)).reconstructions,
                             apply(params, images, other).reconstructions, rtol=1e-5)


def test_routing_couplings_are_sown(paper_model):
  model, params = paper_model
  _, state = model.apply({'params': params}, jnp.zeros((2, 28, 28, 1)),
                         mutable=['intermediates'])
  (couplings,) = state['intermediates']['digit_caps']['couplings']
  assert couplings.shape == (2, 1152, 10)
  np.testing.assert_allclose(couplings.sum(-1), 1.0, rtol=1e-5)


def test_matmul_and_xla_convolutions_give_the_same_model(paper_model):
  model, params = paper_model
  images = jax.random.uniform(jax.random.PRNGKey(2), (2, 28, 28, 1))
  labels = jnp.array([3, 7])

  def loss(p, m):
    out = m.apply({'params': p}, images, labels)
    return jnp.mean(capsjax.capsnet_loss(out.lengths, jax.nn.one_hot(labels, 10),
                                         out.reconstructions, images))

  fast = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, model)
  slow = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, model.clone(conv_impl='xla'))
  np.testing.assert_allclose(fast[0], slow[0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(fast[1]), jax.tree.leaves(slow[1])):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6)


def test_configurable_model_other_input_size_and_channels():
  model = capsjax.CapsNet(num_classes=5, conv_features=16, primary_types=4, primary_dim=4,
                          digit_dim=6, routing_iters=2, decoder_hidden=(32,))
  images = jnp.zeros((3, 36, 36, 3))
  params = capsjax.init_params(model, jax.random.PRNGKey(0), (36, 36, 3))
  # 36 -> 28 after Conv1 -> 10 after PrimaryCaps: 10 * 10 * 4 = 400 primary capsules.
  assert params['digit_caps']['weights'].shape == (400, 5, 6, 4)
  out = model.apply({'params': params}, images)
  assert out.lengths.shape == (3, 5) and out.reconstructions.shape == (3, 36, 36, 3)
  no_decoder = model.clone(use_decoder=False)
  params = capsjax.init_params(no_decoder, jax.random.PRNGKey(0), (36, 36, 3))
  assert 'decoder' not in params
  assert no_decoder.apply({'params': params}, images).reconstructions is None


def test_bfloat16_compute_keeps_float32_parameters_and_outputs(paper_model):
  model, params = paper_model
  images = jax.random.uniform(jax.random.PRNGKey(3), (2, 28, 28, 1))
  out32 = model.apply({'params': params}, images)
  out16 = jax.jit(model.clone(dtype=jnp.bfloat16).apply)({'params': params}, images)
  assert out16.capsules.dtype == jnp.bfloat16 and out16.lengths.dtype == jnp.float32
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  np.testing.assert_allclose(out16.lengths, out32.lengths, rtol=0.1, atol=2e-3)


def test_images_without_channel_axis_are_a_clear_error(paper_model):
  model, params = paper_model
  with pytest.raises(ValueError, match='channel axis'):
    model.apply({'params': params}, jnp.zeros((2, 28, 28)))


@pytest.mark.parametrize('height,width', [(12, 12), (16, 16), (16, 28), (28, 16)])
def test_images_smaller_than_the_kernels_are_a_clear_error(height, width):
  with pytest.raises(ValueError, match=f'at least 17x17 .* got {height}x{width} '):
    capsjax.init_params(capsjax.CapsNet(), jax.random.PRNGKey(0), (height, width, 1))


def test_smallest_images_give_one_position_of_primary_capsules():
  model = capsjax.CapsNet(conv_features=8, primary_types=32, primary_dim=4, digit_dim=4,
                          use_decoder=False)
  params = capsjax.init_params(model, jax.random.PRNGKey(0), (17, 17, 1))
  assert params['digit_caps']['weights'].shape == (32, 10, 4, 4)  # 1 x 1 x 32 capsules
  assert model.apply({'params': params}, jnp.zeros((2, 17, 17, 1))).lengths.shape == (2, 10)


def test_minimum_image_size_follows_the_kernels_and_stride():
  # Conv1 5x5 stride 1, PrimaryCaps 4x4 stride 3: 8x8 in -> 4x4 -> one position.
  model = capsjax.CapsNet(conv_features=8, conv_kernel=5, primary_types=2, primary_dim=4,
                          primary_kernel=4, primary_strides=3, digit_dim=4, use_decoder=False)
  params = capsjax.init_params(model, jax.random.PRNGKey(0), (8, 8, 3))
  assert params['digit_caps']['weights'].shape == (2, 10, 4, 4)
  message = 'at least 8x8 for its 5x5 Conv1 and 4x4 stride-3 PrimaryCaps; got 7x9 '
  with pytest.raises(ValueError, match=message):
    capsjax.init_params(model, jax.random.PRNGKey(0), (7, 9, 3))



def test_hessian_vector_product_through_the_matmul_convolution():
  model = capsjax.CapsNet(conv_features=8, primary_types=2, primary_dim=4, digit_dim=4,
                          use_decoder=False)
  images = jax.random.uniform(jax.random.PRNGKey(1), (2, 20, 20, 1))
  targets = jax.nn.one_hot(jnp.array([3, 7]), 10)
  params = capsjax.init_params(model, jax.random.PRNGKey(0), (20, 20, 1))
  direction = jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(2), p.shape), params)

  def hvp(m):
    loss = lambda p: jnp.mean(capsjax.margin_loss(m.apply({'params': p}, images).lengths, targets))
    return jax.jit(lambda p, v: jax.jvp(jax.grad(loss), (p,), (v,))[1])(params, direction)

  fast, slow = hvp(model), hvp(model.clone(conv_impl='xla'))
  for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(slow)):
    scale = float(jnp.max(jnp.abs(b)))  # about 1e-5 at this initialisation
    assert scale > 0
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * scale)


@pytest.mark.parametrize('routing', ['em', 'self_attention', 'inverted_attention'])
def test_each_routing_gives_the_scores_its_paper_defines(routing):
  from capsjax.nn.layers import safe_norm
  from capsjax.tasks import classification_losses
  from capsjax.training import create_train_state, train_step
  model = capsjax.CapsNet(conv_features=16, primary_types=4, primary_dim=4, digit_dim=8,
                          conv_impl='xla', routing=routing)
  images = jax.random.uniform(jax.random.PRNGKey(1), (4, 28, 28, 1))
  params = capsjax.init_params(model, jax.random.PRNGKey(0), (28, 28, 1))
  out, state = model.apply({'params': params}, images, capture_intermediates=True,
                           mutable=['intermediates'])
  u = state['intermediates']['primary_caps']['__call__'][0]
  caps = params['digit_caps']
  u_hat = jnp.einsum('bik,ijdk->bijd', u, caps['weights'])
  if routing == 'em':  # the parent activations a_j, from the children's lengths
    _, expected, _ = jax.vmap(lambda p, a: capsjax.em_routing(
        p, a, caps['beta_u'], caps['beta_a'], 3, normalize_mass=True))(u_hat, safe_norm(u))
  elif routing == 'self_attention':  # the squashed outputs' lengths
    expected = safe_norm(jax.vmap(lambda p: capsjax.self_attention_routing(
        p, caps['log_priors']))(u_hat)[0])
  else:  # Tsai et al.'s linear read-out of the poses
    poses = jax.vmap(lambda p: capsjax.inverted_dot_product_attention_routing(
        p, 3, scale=caps['norm_scale'], bias=caps['norm_bias']))(u_hat)[0]
    expected = jax.nn.sigmoid(jnp.einsum('bjd,jd->bj', poses, caps['readout'])
                              + caps['readout_bias'])
  np.testing.assert_allclose(out.lengths, expected, rtol=1e-4, atol=1e-6)
  assert np.all((out.lengths >= 0) & (out.lengths < 1))
  (couplings,) = state['intermediates']['digit_caps']['couplings']
  np.testing.assert_allclose(couplings.sum(-1), 1.0, rtol=1e-5)
  if routing != 'em':  # the routings' gradients: tests/test_routings.py
    return
  # EM routing, the one known for NaNs in training: a few steps on a fixed batch.
  config = TrainConfig.create(routing=routing, conv_features=16, primary_types=4, primary_dim=4,
                              digit_dim=8, conv_impl='xla', shift_pixels=0, learning_rate=3e-3)
  state = create_train_state(jax.random.PRNGKey(0), config, classification_losses)
  labels = jnp.arange(16) % 10
  batch = {'image': jax.random.uniform(jax.random.PRNGKey(2), (16, 28, 28, 1)) * 0.2
           + jax.nn.one_hot(labels, 28)[:, :, None, None] * 0.8, 'label': labels}
  step = jax.jit(train_step)
  losses = []
  for _ in range(10):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0], losses
