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

The loss and the paper's metric are in `capsjax.tasks.multimnist`.
"""

from typing import Any, Callable, Dict, Mapping, Optional

import jax
import jax.numpy as jnp

from capsjax.data.augment import random_shifts, shift_images
from capsjax.files import save_npz

PAD = 4
MAX_SHIFT = 4
DIGITS = 2


def partner_indices(keys: jax.Array, labels: jax.Array, base_labels: jax.Array,
                    num_classes: int) -> jax.Array:
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


def make_pairs(key: jax.Array, images: jax.Array, labels: jax.Array, base_indices: jax.Array,
               num_classes: int = 10) -> Dict[str, jax.Array]:
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


def batch_maker(test_seed: int, num_classes: int = 10) -> Callable[..., Dict[str, jax.Array]]:
  """The loop's batch maker for MultiMNIST (see `capsjax.training.steps.pmap_steps`).

  Args:
    test_seed: int; the test set is `make_pairs` under PRNGKey(test_seed).
    num_classes: int.

  Returns:
    make_batch(images, labels, indices, key) -> {'image': float32 [B, 36, 36, C],
    'label': int32 [B, 2], 'digits': float32 [B, 2, 36, 36, C]}, pixels in
    [0, 1]; key None means the test set's fixed key.
  """
  test_key = jax.random.PRNGKey(test_seed)

  def make_batch(images: jax.Array, labels: jax.Array, indices: jax.Array,
                 key: Optional[jax.Array] = None) -> Dict[str, jax.Array]:
    pairs = make_pairs(test_key if key is None else key, images, labels, indices, num_classes)
    return {'image': pairs['image'].astype(jnp.float32) / 255.0, 'label': pairs['label'],
            'digits': pairs['digits'].astype(jnp.float32) / 255.0}

  return make_batch


def export(path: str, pairs: Mapping[str, Any]) -> None:
  """Write generated pairs to an .npz others can read with NumPy alone.

  Args:
    path: the .npz file; written under a temporary name and renamed.
    pairs: `make_pairs`' output (on the host or device).
  """
  save_npz(path, jax.device_get(pairs))
