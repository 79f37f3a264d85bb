"""--dtype=bfloat16: bfloat16 products that sum in float32, and gradients close to float32's."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capsjax.nn import conv
from capsjax.tasks import classification_losses
from capsjax.training import TrainConfig, create_train_state

# Wide enough that PrimaryCaps' products contract over 9 * 9 * 64 values in row groups
# (capsjax.nn.conv.MIN_CONTRACTION), small enough to differentiate in seconds.
MODEL = dict(conv_features=64, primary_types=8, primary_dim=8, conv_impl='matmul')
PRODUCTS = ('dot_general', 'conv_general_dilated')


def products(jaxpr):
  """Every dot_general and conv_general_dilated equation of a jaxpr, nested ones included.

  The matmul convolution's primitive is opened up into the products it lowers to.
  """
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in PRODUCTS:
      yield eqn
    if eqn.primitive is conv._conv_p:
      forward = functools.partial(conv._matmul_forward, **eqn.params)
      yield from products(jax.make_jaxpr(forward)(*(v.aval for v in eqn.invars)).jaxpr)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else [value]:
        sub = getattr(sub, 'jaxpr', sub)  # a ClosedJaxpr's Jaxpr
        if hasattr(sub, 'eqns'):
          yield from products(sub)


def loss_and_grads(dtype, images, labels, params=None):
  config = TrainConfig.create(dtype=dtype, shift_pixels=0, **MODEL)
  state = create_train_state(jax.random.PRNGKey(0), config, classification_losses)
  params = state.params if params is None else params

  def mean_loss(params):
    return jnp.mean(classification_losses(state, params, {'image': images, 'label': labels},
                                          False, None)['loss'])

  return state, params, mean_loss


@pytest.fixture(scope='module')
def batch():
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(size=(8, 28, 28, 1)) ** 4, jnp.float32)
  return images, jnp.asarray(rng.integers(0, 10, 8), jnp.int32)


def test_every_bfloat16_product_of_the_gradient_sums_in_float32(batch):
  _, params, mean_loss = loss_and_grads('bfloat16', *batch)
  jaxpr = jax.make_jaxpr(jax.value_and_grad(mean_loss))(params).jaxpr
  found = list(products(jaxpr))
  mixed = [e for e in found if any(v.aval.dtype == jnp.bfloat16 for v in e.invars)]
  for eqn in mixed:
    assert eqn.params['preferred_element_type'] == jnp.float32, eqn
  # The large ones take bfloat16 on both sides: the convolutions' products forward (one per
  # group of kernel rows of PrimaryCaps, one for Conv1), u_hat, and the decoder's three.
  both = [e for e in mixed if all(v.aval.dtype == jnp.bfloat16 for v in e.invars)]
  primary_groups = len(conv._row_groups(9, 9 * MODEL['conv_features']))
  assert len(both) >= primary_groups + 1 + 1 + 3, len(both)
  contraction = [np.prod([e.invars[0].aval.shape[d] for d in e.params['dimension_numbers'][0][0]])
                 for e in both if e.primitive.name == 'dot_general']
  assert sum(size >= conv.MIN_CONTRACTION for size in contraction) >= primary_groups
  # In float32 nothing is rounded: every product takes and sums float32.
  _, params32, mean_loss32 = loss_and_grads('float32', *batch)
  for eqn in products(jax.make_jaxpr(jax.grad(mean_loss32))(params32).jaxpr):
    assert all(v.aval.dtype == jnp.float32 for v in eqn.invars + eqn.outvars), eqn


def test_matmul_convolution_backward_products_take_the_fast_bfloat16_form():
  # XLA's CPU backend runs a product through its fast bf16 kernel only with bfloat16 on both
  # sides and the left operand contracting its last axis (BENCHMARKS.md). Autodiff's own
  # backward would multiply a float32 G, and contract the columns' first axis for the kernel.
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 20, 20, 64), jnp.bfloat16)
  w = jax.random.normal(jax.random.PRNGKey(1), (9, 9, 64, 16), jnp.bfloat16)
  loss = lambda x, w: jnp.sum(conv.conv2d_matmul(x, w, 2).astype(jnp.float32) ** 2)
  found = list(products(jax.make_jaxpr(jax.grad(loss, (0, 1)))(x, w).jaxpr))
  groups = len(conv._row_groups(9, 9 * 64))
  half = [e for e in found if any(v.aval.dtype == jnp.bfloat16 for v in e.invars)]
  # Forward, input gradient and kernel gradient per group of kernel rows, and G.T once.
  assert len(half) == 3 * groups + 1, len(half)
  for eqn in half:
    (lhs_contract, _), _ = eqn.params['dimension_numbers']
    assert all(v.aval.dtype == jnp.bfloat16 for v in eqn.invars), eqn
    assert eqn.params['preferred_element_type'] == jnp.float32, eqn
    assert tuple(lhs_contract) == (eqn.invars[0].aval.ndim - 1,), eqn


def test_bfloat16_gradients_are_float32s_within_bfloat16_rounding(batch):
  _, params, mean_loss32 = loss_and_grads('float32', *batch)
  _, _, mean_loss16 = loss_and_grads('bfloat16', *batch, params=params)
  loss32, grads32 = jax.jit(jax.value_and_grad(mean_loss32))(params)
  loss16, grads16 = jax.jit(jax.value_and_grad(mean_loss16))(params)
  # bfloat16 keeps 8 significant bits: each rounding is off by up to 2^-9 = 0.2%. The loss
  # passes through a few of them. A gradient passes through the rounded activations of every
  # layer above its own: at this (untrained) point the decoder's first layers, whose
  # gradients are sums of products of small rounded terms, were 6-10% off in L2 norm, the
  # convolutions' and the capsule weights' (where the arithmetic is) 0.7-2%.
  # The same test with bfloat16-summed products gave the same figures: the rounding of the
  # activations, not of the sums, sets them.
  tolerance = {"['conv1']['kernel']": 0.03, "['primary_caps']['conv']['kernel']": 0.02,
               "['digit_caps']['weights']": 0.02}
  assert abs(float(loss16) - float(loss32)) < 0.01 * float(loss32)
  for path, g32 in jax.tree_util.tree_flatten_with_path(grads32)[0]:
    g16 = np.asarray(_get(grads16, path), np.float64)
    g32 = np.asarray(g32, np.float64)
    assert g16.dtype == np.float64 and np.all(np.isfinite(g16))
    error = np.linalg.norm(g16 - g32) / np.linalg.norm(g32)
    name = jax.tree_util.keystr(path)
    assert error < tolerance.get(name, 0.12), (name, error)


def _get(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree
