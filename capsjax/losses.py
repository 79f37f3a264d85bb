"""CapsNet losses: margin loss, reconstruction loss and the paper's total."""

import jax.numpy as jnp

RECONSTRUCTION_WEIGHT = 0.0005


def margin_loss(lengths, targets, m_plus=0.9, m_minus=0.1, lam=0.5):
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


def reconstruction_loss(reconstructions, images):
  """Sum of squared pixel differences per example.

  Args:
    reconstructions: [batch, ...] decoder output in (0, 1).
    images: [batch, ...] the same shape, pixels in [0, 1].

  Returns:
    [batch] float32.
  """
  diff = reconstructions.astype(jnp.float32) - images.astype(jnp.float32)
  return jnp.sum(jnp.square(diff).reshape(diff.shape[0], -1), axis=-1)


def capsnet_loss(lengths, targets, reconstructions=None, images=None,
                 recon_weight=RECONSTRUCTION_WEIGHT):
  """The paper's total loss: margin loss + recon_weight * reconstruction loss.

  Args:
    lengths: [batch, K] capsule lengths.
    targets: [batch, K] multi-hot targets.
    reconstructions: [batch, H, W, C] or None (no decoder: margin loss alone).
    images: [batch, H, W, C] pixels in [0, 1]; needed with reconstructions.
    recon_weight: weight of the reconstruction term (0.0005).

  Returns:
    [batch] float32 per-example loss.
  """
  loss = margin_loss(lengths, targets)
  if reconstructions is not None:
    loss = loss + recon_weight * reconstruction_loss(reconstructions, images)
  return loss
