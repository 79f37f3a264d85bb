import jax
import jax.numpy as jnp
import numpy as np

import capsjax
from tests import reference


def test_margin_loss_matches_reference_with_multi_hot_targets():
  rng = np.random.default_rng(0)
  lengths = rng.uniform(0, 1, size=(16, 10)).astype(np.float32)
  targets = (rng.uniform(size=(16, 10)) < 0.2).astype(np.float32)
  got = capsjax.margin_loss(jnp.asarray(lengths), jnp.asarray(targets))
  assert got.shape == (16,)
  np.testing.assert_allclose(got, reference.margin_loss(lengths, targets), rtol=1e-5, atol=1e-7)


def test_margin_loss_hand_values():
  # Present class at 0.5: (0.9 - 0.5)^2 = 0.16; absent at 0.3: 0.5 * (0.3 - 0.1)^2 = 0.02;
  # absent at 0.05 and present at 0.95 cost nothing.
  lengths = jnp.array([[0.5, 0.3, 0.05, 0.95]])
  targets = jnp.array([[1, 0, 0, 1]])
  np.testing.assert_allclose(capsjax.margin_loss(lengths, targets), [0.18], rtol=1e-5)
  np.testing.assert_allclose(
      capsjax.margin_loss(lengths, targets, m_plus=1.0, m_minus=0.0, lam=1.0),
      [0.25 + 0.09 + 0.0025 + 0.0025], rtol=1e-5)


def test_reconstruction_loss_is_sum_of_squared_differences():
  images = jnp.zeros((2, 3, 3, 1))
  recon = images.at[0, 0, 0, 0].set(0.5).at[1].set(1.0)
  np.testing.assert_allclose(capsjax.reconstruction_loss(recon, images), [0.25, 9.0])


def test_total_loss_weights_reconstruction_by_0_0005():
  rng = np.random.default_rng(1)
  lengths = jnp.asarray(rng.uniform(size=(4, 10)), jnp.float32)
  targets = jax.nn.one_hot(jnp.arange(4), 10)
  images = jnp.asarray(rng.uniform(size=(4, 28, 28, 1)), jnp.float32)
  recon = jnp.asarray(rng.uniform(size=(4, 28, 28, 1)), jnp.float32)
  expected = (reference.margin_loss(np.asarray(lengths), np.asarray(targets)) +
              0.0005 * np.sum((np.asarray(recon) - np.asarray(images)) ** 2, axis=(1, 2, 3)))
  np.testing.assert_allclose(capsjax.capsnet_loss(lengths, targets, recon, images), expected,
                             rtol=1e-5)
  np.testing.assert_allclose(capsjax.capsnet_loss(lengths, targets),
                             reference.margin_loss(np.asarray(lengths), np.asarray(targets)),
                             rtol=1e-5)


def test_cross_entropy_matches_float64_log_softmax():
  rng = np.random.default_rng(2)
  logits = rng.normal(scale=3.0, size=(6, 10))
  labels = rng.integers(0, 10, size=6)
  shifted = logits - logits.max(axis=1, keepdims=True)
  expected = np.log(np.exp(shifted).sum(axis=1)) - shifted[np.arange(6), labels]
  got = capsjax.cross_entropy_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(labels))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
