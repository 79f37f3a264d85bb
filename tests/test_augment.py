import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capsjax.data.augment import random_shifts, shift_images


def numpy_shift(image, dy, dx):
  out = np.zeros_like(image)
  h, w = image.shape[:2]
  for y in range(h):
    for x in range(w):
      if 0 <= y - dy < h and 0 <= x - dx < w:
        out[y, x] = image[y - dy, x - dx]
  return out


def test_shift_matches_pixel_loop():
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(6, 9, 7, 2)).astype(np.float32)
  shifts = np.array([[0, 0], [2, -2], [-1, 2], [-2, -2], [1, 0], [0, -1]], np.int32)
  got = jax.jit(shift_images, static_argnums=2)(jnp.asarray(images), jnp.asarray(shifts), 2)
  for n, (dy, dx) in enumerate(shifts):
    np.testing.assert_array_equal(got[n], numpy_shift(images[n], dy, dx))


def test_random_shifts_stay_in_bound_and_cover_it():
  shifts = np.asarray(random_shifts(jax.random.PRNGKey(0), jnp.arange(2000), 2))
  assert shifts.min() == -2 and shifts.max() == 2
  assert set(map(tuple, shifts)) == {(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)}


def test_shifts_preserve_mass_and_keep_pixels_within_bound(mnist_dir):
  from capsjax.data import load_idx_dir
  images = jnp.asarray(load_idx_dir(mnist_dir).test_images[:256], jnp.float32) / 255
  shifts = random_shifts(jax.random.PRNGKey(1), jnp.arange(256), 2)
  shifted = shift_images(images, shifts, 2)
  mass, shifted_mass = images.sum(axis=(1, 2, 3)), shifted.sum(axis=(1, 2, 3))
  border = images.at[:, 2:-2, 2:-2].set(0).sum(axis=(1, 2, 3))
  inside = np.asarray(border == 0)  # nothing within 2 pixels of the edge: nothing can fall off
  assert inside.mean() > 0.8  # 87% of these 256
  np.testing.assert_allclose(shifted_mass[inside], mass[inside], rtol=1e-5)
  assert bool(jnp.all(shifted_mass <= mass + 1e-4))
  for n in range(0, 256, 37):
    ys, xs = np.nonzero(np.asarray(images[n, ..., 0]))
    ys2, xs2 = np.nonzero(np.asarray(shifted[n, ..., 0]))
    assert abs(ys2.min() - ys.min()) <= 2 and abs(xs2.max() - xs.max()) <= 2
    assert (ys2.min() - ys.min(), xs2.min() - xs.min()) == tuple(np.asarray(shifts[n]))


def test_shifts_do_not_depend_on_how_the_batch_is_split():
  key = jax.random.PRNGKey(2)
  whole = random_shifts(key, jnp.arange(16), 2)
  halves = [random_shifts(key, jnp.arange(8) + 8 * d, 2) for d in range(2)]
  np.testing.assert_array_equal(whole, np.concatenate(halves))


@pytest.mark.parametrize('max_shift', [0])
def test_zero_shift_is_identity(max_shift):
  images = jnp.ones((2, 5, 5, 1))
  assert shift_images(images, jnp.zeros((2, 2), jnp.int32), max_shift) is images
