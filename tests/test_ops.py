import jax
import jax.numpy as jnp
import numpy as np
import pytest

import capsjax
from tests import reference


@pytest.mark.parametrize('shape,axis', [((5, 8), -1), ((3, 4, 16), -1), ((6, 2, 3), 0)])
def test_squash_matches_float64_reference(shape, axis):
  s = np.random.default_rng(0).normal(size=shape).astype(np.float32) * 2
  got = capsjax.squash(jnp.asarray(s), axis=axis)
  np.testing.assert_allclose(got, reference.squash(s, axis=axis), rtol=1e-5, atol=1e-6)


def test_squash_hand_values():
  # |s| = 5 for (3, 4): scale 25/26, direction (0.6, 0.8).
  got = capsjax.squash(jnp.array([3.0, 4.0]))
  np.testing.assert_allclose(got, [25 / 26 * 0.6, 25 / 26 * 0.8], rtol=1e-6)
  # |s| = 1: length 1/2.
  np.testing.assert_allclose(jnp.linalg.norm(capsjax.squash(jnp.array([0.0, 1.0, 0.0]))), 0.5,
                             rtol=1e-6)


def test_squash_lengths_in_unit_interval_and_direction_kept():
  directions = jax.random.normal(jax.random.PRNGKey(1), (1000, 16))
  directions = directions / jnp.linalg.norm(directions, axis=-1, keepdims=True)
  s = directions * jnp.logspace(-4, 1.5, 1000)[:, None]
  v = capsjax.squash(s)
  lengths = jnp.linalg.norm(v, axis=-1)
  assert bool(jnp.all(lengths >= 0)) and bool(jnp.all(lengths < 1))
  cos = jnp.sum(v * s, -1) / (lengths * jnp.linalg.norm(s, axis=-1))
  np.testing.assert_allclose(cos, 1.0, rtol=1e-4)
  assert bool(jnp.all(jnp.diff(lengths) >= 0))  # monotone in |s|


@pytest.mark.parametrize('scale', [0.0, 1e-30, 1e-20, 1e-8])
def test_squash_zero_and_tiny_vectors_have_finite_value_and_gradient(scale):
  s = jnp.full((4, 8), scale, jnp.float32)
  v = capsjax.squash(s)
  assert bool(jnp.all(jnp.isfinite(v))) and float(jnp.abs(v).max()) < 1e-6
  grad = jax.grad(lambda s: jnp.sum(capsjax.squash(s)))(s)
  assert bool(jnp.all(jnp.isfinite(grad)))


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16, jnp.float32])
def test_squash_keeps_dtype(dtype):
  s = jax.random.normal(jax.random.PRNGKey(2), (7, 8)).astype(dtype)
  v = capsjax.squash(s)
  assert v.dtype == dtype
  np.testing.assert_allclose(np.asarray(v, np.float32),
                             reference.squash(np.asarray(s, np.float32)), atol=1e-2)


def test_safe_norm_finite_gradient_at_zero():
  norm, grad = jax.value_and_grad(lambda x: capsjax.safe_norm(x))(jnp.zeros(16))
  assert float(norm) < 1e-3 and bool(jnp.all(jnp.isfinite(grad)))
  np.testing.assert_allclose(capsjax.safe_norm(jnp.array([[3.0, 4.0]])), [5.0], rtol=1e-6)
