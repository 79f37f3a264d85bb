"""MultiMNIST (the paper's section 6): two overlapping digits of different classes, on the device.

An example is a base digit and a partner of another class from the same split,
each 28x28 digit padded by 4 pixels to 36x36 and shifted by whole pixels in
[-4, 4] on each axis, merged by adding and clipping at full intensity (as the
authors' generator does). The two shifted single digits are kept: each is the
target of its own capsule's reconstruction.

Pairs are a pure function of (digits, labels, base indices, key): training
draws new partners and shifts every step inside the jitted step; the test set
is the same function under a fixed key, pair i having test digit i as its base,
so it is the same for a seed whatever the batch or device count.

Predictions are the two longest class capsules (ties go to the lower class, as
`lax.top_k` breaks them); an example is right when they are exactly its two
classes.
"""

import jax
import jax.numpy as jnp

from capsjax.augment import random_shifts, shift_images
from capsjax.data import save_npz
from capsjax.losses import margin_loss, reconstruction_loss

PAD = 4
MAX_SHIFT = 4
DIGITS = 2


def partner_indices(keys, labels, base_labels, num_classes):
  """For each base digit, an example of another class, uniform over all of them.

  Args:
    keys: PRNG keys [B], one per pair.
    labels: int [N], the labels of the split the partners come from.
    base_labels: int [B], the classes the partners must avoid.
    num_classes: static int.

  Returns:
    int32 [B] indices into the split.
  """
  by_class = jnp.argsort(labels, stable=True)
  counts = jnp.bincount(labels, length=num_classes)
  starts = jnp.cumsum(counts) - counts
  # A draw among the N - counts[c] examples of other classes, stepping over class c's block.
  others = labels.shape[0] - counts[base_labels]
  draws = jax.vmap(lambda key, n: jax.random.randint(key, (), 0, n))(keys, others)
  draws = jnp.where(draws >= starts[base_labels], draws + counts[base_labels], draws)
  return by_class[draws].astype(jnp.int32)


def make_pairs(key, images, labels, base_indices, num_classes=10):
  """MultiMNIST pairs from a split of single digits, as uint8.

  Args:
    key: PRNG key; pair b draws its partner and shifts from fold_in(key, base_indices[b]).
    images: uint8 [N, 28, 28, C], the split's digits.
    labels: int [N] their classes.
    base_indices: int [B], the base digit of each pair.
    num_classes: static int.

  Returns:
    {'image': uint8 [B, 36, 36, C] the merged pair, 'label': int32 [B, 2] (base class
    first), 'digits': uint8 [B, 2, 36, 36, C] each shifted digit alone, 'shifts':
    int32 [B, 2, 2] (dy, dx) of each digit, 'indices': int32 [B, 2] the digits'
    indices in the split}.
  """
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(base_indices)
  partner_keys, shift_keys = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
  base_indices = base_indices.astype(jnp.int32)
  indices = jnp.stack([base_indices, partner_indices(partner_keys, labels,
                                                     labels[base_indices], num_classes)], 1)
  shifts = jax.vmap(lambda k: random_shifts(k, jnp.arange(DIGITS), MAX_SHIFT))(shift_keys)
  padding = ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0))
  digits = jnp.stack([shift_images(jnp.pad(images[indices[:, d]], padding), shifts[:, d],
                                   MAX_SHIFT) for d in range(DIGITS)], 1)
  merged = jnp.minimum(digits.astype(jnp.int32).sum(1), 255).astype(jnp.uint8)
  return {'image': merged, 'label': labels[indices].astype(jnp.int32), 'digits': digits,
          'shifts': shifts, 'indices': indices}


def batch_maker(test_seed, num_classes=10):
  """The loop's batch maker for MultiMNIST (see `capsjax.train.pmap_steps`).

  Args:
    test_seed: int; the test set is `make_pairs` under PRNGKey(test_seed).
    num_classes: int.

  Returns:
    make_batch(images, labels, indices, key) -> {'image': float32 [B, 36, 36, C],
    'label': int32 [B, 2], 'digits': float32 [B, 2, 36, 36, C]}, pixels in
    [0, 1]; key None means the test set's fixed key.
  """
  test_key = jax.random.PRNGKey(test_seed)

  def make_batch(images, labels, indices, key=None):
    pairs = make_pairs(test_key if key is None else key, images, labels, indices, num_classes)
    return {'image': pairs['image'].astype(jnp.float32) / 255.0, 'label': pairs['label'],
            'digits': pairs['digits'].astype(jnp.float32) / 255.0}

  return make_batch


def top2(scores):
  """The two highest-scoring classes, the higher first; ties go to the lower class.

  Args:
    scores: float [B, K].

  Returns:
    int32 [B, 2].
  """
  return jax.lax.top_k(scores, DIGITS)[1].astype(jnp.int32)


def pair_metrics(scores, labels):
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


def multi_hot(labels, num_classes):
  """int [B, M] class lists -> float32 [B, K] with 1 at each listed class."""
  return jnp.max(jax.nn.one_hot(labels, num_classes), axis=1)


def multimnist_losses(state, params, batch, train, rng):
  """Per-example terms of MultiMNIST, a `loss_fn` for `capsjax.train.create_train_state`.

  CapsNet: margin loss with both classes as targets, plus recon_weight times
  the sum of two reconstruction losses: the decoder runs once per digit with
  every capsule masked but that digit's, against that digit's own shifted
  image. Baseline CNN: sigmoid cross-entropy against the two classes, with
  dropout in training.

  Args:
    state: a `TrainState` (apply_fn and config are read).
    params: the parameters to evaluate at.
    batch: {'image': float [B, 36, 36, C], 'label': int [B, 2], 'digits':
      float [B, 2, 36, 36, C]} (see `batch_maker`).
    train: bool, whether this is a training step.
    rng: PRNG key for dropout (training only).

  Returns:
    dict of float32 [B]: 'loss', 'accuracy' (both classes right, the paper's
    metric), 'digit_accuracy', and for CapsNet 'margin_loss' and
    'reconstruction_loss'.
  """
  config = state.config
  images, labels = batch['image'], batch['label']
  targets = multi_hot(labels, config.num_classes)
  if config.model == 'baseline':
    scores = state.apply_fn({'params': params}, images, train=train,
                            rngs={'dropout': rng} if train else {})
    logits = scores.astype(jnp.float32)
    terms = {'loss': jnp.sum(jnp.logaddexp(0.0, logits) - targets * logits, axis=-1)}
  else:
    masks = jax.nn.one_hot(labels, config.num_classes)  # [B, 2, K]: one capsule each
    out = state.apply_fn({'params': params}, images, masks)
    scores = out.lengths
    margin = margin_loss(out.lengths, targets)
    recon = jnp.zeros_like(margin)
    if out.reconstructions is not None:
      recon = sum(reconstruction_loss(out.reconstructions[:, d], batch['digits'][:, d])
                  for d in range(DIGITS))
    terms = {'loss': margin + config.recon_weight * recon, 'margin_loss': margin,
             'reconstruction_loss': recon}
  return {**terms, **pair_metrics(scores, labels)}


def export(path, pairs):
  """Write generated pairs to an .npz others can read with NumPy alone.

  Args:
    path: the .npz file; written under a temporary name and renamed.
    pairs: `make_pairs`' output (on the host or device).
  """
  save_npz(path, jax.device_get(pairs))
