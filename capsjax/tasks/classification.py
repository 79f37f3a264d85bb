"""Classification of single digits (MNIST, Fashion-MNIST, expanded MNIST): the loss and accuracy."""

from typing import Any, Dict, Mapping, Optional

import jax
import jax.numpy as jnp

from capsjax import models
from capsjax.nn.losses import capsnet_loss_terms, cross_entropy_loss
from capsjax.training.state import TrainState, with_model_state


def classification_losses(state: TrainState, params: Mapping[str, Any],
                          batch: Dict[str, jax.Array], train: bool,
                          rng: Optional[jax.Array]) -> Dict[str, jax.Array]:
  """Per-example terms of a classifier: its loss, and 'accuracy' (1 if right, else 0).

  CapsNet: the paper's margin + reconstruction loss. Its decoder reconstructs
  from the true class's capsule, in training and in evaluation alike, so a
  held-out 'reconstruction_loss' measures the term the model is trained on.
  (The pictures reconstruct from the predicted capsule, as a user would.)
  Baseline CNN: cross-entropy, with dropout in training.

  Args:
    state: a `capsjax.training.TrainState` (its model and config are read).
    params: the parameters to evaluate the loss at.
    batch: {'image': float [B, H, W, C] in [0, 1], 'label': int [B]}.
    train: bool, whether this is a training step.
    rng: PRNG key for dropout (training only).

  Returns:
    dict of float32 [B]: 'loss', 'accuracy', and for CapsNet 'margin_loss' and
    'reconstruction_loss'.
  """
  config = state.config.model
  images, labels = batch['image'], batch['label']
  out = state.forward(params, images, decode=labels, train=train, rng=rng)
  if models.architecture(config).scores == 'lengths':
    terms = capsnet_loss_terms(out.scores, jax.nn.one_hot(labels, config.num_classes),
                               out.reconstructions, images, config.recon_weight)
  else:
    terms = {'loss': cross_entropy_loss(out.scores, labels)}
  terms['accuracy'] = (jnp.argmax(out.scores, axis=-1) == labels).astype(jnp.float32)
  return with_model_state(terms, out)
