"""On-device data augmentation: the paper's random shifts with zero padding."""

import jax
import jax.numpy as jnp


def shift_images(images: jax.Array, shifts: jax.Array, max_shift: int) -> jax.Array:
  """Translate each image by whole pixels, filling with zeros.

  Args:
    images: [batch, height, width, channels].
    shifts: int32 [batch, 2], (dy, dx) per image, each in [-max_shift, max_shift].
    max_shift: static int, the bound on |dy| and |dx|.

  Returns:
    [batch, height, width, channels]: out[y, x] = images[y - dy, x - dx], 0 outside.
  """
  if max_shift == 0:
    return images
  _, height, width, channels = images.shape
  pad = ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0))
  padded = jnp.pad(images, pad)
  crop = lambda image, start: jax.lax.dynamic_slice(image, (*start, 0), (height, width, channels))
  return jax.vmap(crop)(padded, max_shift - shifts)


def random_shifts(key: jax.Array, example_ids: jax.Array, max_shift: int) -> jax.Array:
  """Per-example random (dy, dx) in [-max_shift, max_shift], one key per example id.

  Keying on the example's position in the global batch makes the shifts the
  same however the batch is split across devices.

  Args:
    key: PRNG key for this step.
    example_ids: int32 [batch] positions in the global batch.
    max_shift: static int.

  Returns:
    int32 [batch, 2].
  """
  draw = lambda i: jax.random.randint(jax.random.fold_in(key, i), (2,), -max_shift, max_shift + 1)
  return jax.vmap(draw)(example_ids)
