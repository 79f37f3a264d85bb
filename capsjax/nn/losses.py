"""Losses: CapsNet's margin and reconstruction losses and their total; the baseline's."""

from typing import Dict, Optional

import jax
import jax.numpy as jnp

RECONSTRUCTION_WEIGHT = 0.0005


def margin_loss(lengths: jax.Array, targets: jax.Array, m_plus: float = 0.9,
                m_minus: float = 0.1, lam: float = 0.5) -> jax.Array:
  """Margin loss summed over classes: T max(0, m+ - |v|)^2 + lam (1 - T) max(0, |v| - m-)^2.

  Args:
    lengths: [batch, K] float capsule lengths |v_k|.
    targets: [batch, K] multi-hot 0/1 (several classes may be present).
    m_plus, m_minus, lam: the paper's 0.9, 0.1 and 0.5.

  Returns:
    [batch] float32 per-example loss.
  """
  lengths = lengths.astype(jnp.float32)
  targets = targets.astype(jnp.float32)
  present = targets * jnp.square(jnp.maximum(0.0, m_plus - lengths))
  absent = lam * (1.0 - targets) * jnp.square(jnp.maximum(0.0, lengths - m_minus))
  return jnp.sum(present + absent, axis=-1)


def reconstruction_loss(reconstructions: jax.Array, images: jax.Array) -> jax.Array:
  """Sum of squared pixel differences per example.

  Args:
    reconstructions: [batch, ...] decoder output in (0, 1).
    images: [batch, ...] the same shape, pixels in [0, 1].

  Returns:
    [batch] float32.
  """
  diff = reconstructions.astype(jnp.float32) - images.astype(jnp.float32)
  return jnp.sum(jnp.square(diff).reshape(diff.shape[0], -1), axis=-1)


def capsnet_loss_terms(lengths: jax.Array, targets: jax.Array,
                       reconstructions: Optional[jax.Array] = None,
                       images: Optional[jax.Array] = None,
                       recon_weight: float = RECONSTRUCTION_WEIGHT) -> Dict[str, jax.Array]:
  """The paper's total loss and its two terms, per example.

  Args:
    lengths: [batch, K] capsule lengths.
    targets: [batch, K] multi-hot targets.
    reconstructions: [batch, H, W, C] or None (no decoder: margin loss alone).
    images: [batch, H, W, C] pixels in [0, 1]; needed with reconstructions.
    recon_weight: weight of the reconstruction term (0.0005).

  Returns:
    {'loss': margin + recon_weight * reconstruction, 'margin_loss',
    'reconstruction_loss' (0 without a decoder)}, each float32 [batch].
  """
  margin = margin_loss(lengths, targets)
  recon = (reconstruction_loss(reconstructions, images) if reconstructions is not None
           else jnp.zeros_like(margin))
  return {'loss': margin + recon_weight * recon, 'margin_loss': margin,
          'reconstruction_loss': recon}


def capsnet_loss(lengths: jax.Array, targets: jax.Array,
                 reconstructions: Optional[jax.Array] = None, images: Optional[jax.Array] = None,
                 recon_weight: float = RECONSTRUCTION_WEIGHT) -> jax.Array:
  """The paper's total loss: margin loss + recon_weight * reconstruction loss.

  Args: as `capsnet_loss_terms`.

  Returns:
    [batch] float32 per-example loss.
  """
  return capsnet_loss_terms(lengths, targets, reconstructions, images, recon_weight)['loss']


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Softmax cross-entropy, the baseline CNN's loss.

  Args:
    logits: [batch, K] float.
    labels: int [batch] class indices.

  Returns:
    [batch] float32.
  """
  logits = logits.astype(jnp.float32)
  return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]
