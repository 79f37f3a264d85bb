"""MultiMNIST (the paper's section 6): the two-digit loss and the paper's metric.

Predictions are the two highest scores (ties go to the lower class, as
`lax.top_k` breaks them); an example is right when they are exactly its two
classes. The pairs themselves are made by `capsjax.data.multimnist`.
"""

from typing import Any, Dict, Mapping, Optional

import jax
import jax.numpy as jnp

from capsjax import models
from capsjax.data.multimnist import DIGITS
from capsjax.nn.losses import margin_loss, reconstruction_loss
from capsjax.training.state import TrainState, with_model_state


def top2(scores: jax.Array) -> jax.Array:
  """The two highest-scoring classes, the higher first; ties go to the lower class.

  Args:
    scores: float [B, K].

  Returns:
    int32 [B, 2].
  """
  return jax.lax.top_k(scores, DIGITS)[1].astype(jnp.int32)


def pair_metrics(scores: jax.Array, labels: jax.Array) -> Dict[str, jax.Array]:
  """The paper's metric and per-digit accuracy of two-class predictions.

  Args:
    scores: float [B, K], capsule lengths or logits.
    labels: int [B, 2], two different classes per example.

  Returns:
    {'accuracy': 1.0 where the two top classes are exactly the labels,
    'digit_accuracy': the fraction of the two labels among the two top classes},
    float32 [B] each.
  """
  found = jnp.any(top2(scores)[:, :, None] == labels[:, None, :], axis=1)  # [B, 2]
  return {'accuracy': jnp.all(found, axis=1).astype(jnp.float32),
          'digit_accuracy': jnp.mean(found.astype(jnp.float32), axis=1)}


def multi_hot(labels: jax.Array, num_classes: int) -> jax.Array:
  """int [B, M] class lists -> float32 [B, K] with 1 at each listed class."""
  return jnp.max(jax.nn.one_hot(labels, num_classes), axis=1)


def multimnist_losses(state: TrainState, params: Mapping[str, Any],
                      batch: Dict[str, jax.Array], train: bool,
                      rng: Optional[jax.Array]) -> Dict[str, jax.Array]:
  """Per-example terms of MultiMNIST, a loss_fn for `capsjax.training.create_train_state`.

  CapsNet: margin loss with both classes as targets, plus recon_weight times
  the sum of two reconstruction losses: the decoder runs once per digit with
  every capsule masked but that digit's true class, against that digit's own
  shifted image (in training and evaluation alike, as for
  `capsjax.tasks.classification.classification_losses`). Baseline CNN: sigmoid
  cross-entropy against the two classes, with dropout in training.

  Args:
    state: a `capsjax.training.TrainState` (its model and config are read).
    params: the parameters to evaluate at.
    batch: {'image': float [B, 36, 36, C], 'label': int [B, 2], 'digits':
      float [B, 2, 36, 36, C]} (see `capsjax.data.multimnist.batch_maker`).
    train: bool, whether this is a training step.
    rng: PRNG key for dropout (training only).

  Returns:
    dict of float32 [B]: 'loss', 'accuracy' (both classes right, the paper's
    metric), 'digit_accuracy', and for CapsNet 'margin_loss' and
    'reconstruction_loss'.
  """
  config = state.config.model
  images, labels = batch['image'], batch['label']
  targets = multi_hot(labels, config.num_classes)
  masks = jax.nn.one_hot(labels, config.num_classes)  # [B, 2, K]: one capsule each
  out = state.forward(params, images, decode=masks, train=train, rng=rng)
  if models.architecture(config).scores == 'lengths':
    margin = margin_loss(out.scores, targets)
    recon = jnp.zeros_like(margin)
    if out.reconstructions is not None:
      recon = sum(reconstruction_loss(out.reconstructions[:, d], batch['digits'][:, d])
                  for d in range(DIGITS))
    terms = {'loss': margin + config.recon_weight * recon, 'margin_loss': margin,
             'reconstruction_loss': recon}
  else:
    logits = out.scores.astype(jnp.float32)
    terms = {'loss': jnp.sum(jnp.logaddexp(0.0, logits) - targets * logits, axis=-1)}
  return with_model_state({**terms, **pair_metrics(out.scores, labels)}, out)
