"""The paper's affine-robustness data: expanded MNIST for training, affine test digits.

Expanded MNIST (the paper's section 5.2) puts each 28x28 digit at a uniformly
random position on a 40x40 black canvas. Training draws the positions afresh every
step inside the jitted step; the test set is the same function under a fixed key,
example i placed by fold_in(key, i), so it is the same for a seed whatever the
batch or device count.

The affine test digits are either the official affNIST test set (`read_affnist`,
the authors' MATLAB files, when a user has them) or a set generated here from the
MNIST test digits (`generate`), named "affine-transformed MNIST, generated": each
digit rotated, sheared and scaled at random, then moved to a random position that
keeps it whole on the canvas, with bilinear resampling.
"""

import glob
import os
import re
from typing import Callable, Dict, Optional, Sequence, Tuple

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
from scipy import io as scipy_io
from scipy import ndimage

from capsjax.errors import InputError

CANVAS = 40
MAX_ROTATION_DEGREES = 20.0
MAX_SHEAR = 0.2
SCALE_RANGE = (0.8, 1.2)
# Pixels kept clear at the canvas's edge, so bilinear sampling's spread stays inside.
MARGIN = 2
GENERATED_NAME = 'affine-transformed MNIST, generated'
AFFNIST_NAME = 'affNIST test set'


def place(images: jax.Array, offsets: jax.Array, canvas: int = CANVAS) -> jax.Array:
  """Paste each image onto a black canvas with its top-left corner at an offset.

  Args:
    images: [B, h, w, C], any dtype.
    offsets: int [B, 2], (row, column) of each image's top-left pixel, in
      [0, canvas - h] and [0, canvas - w].
    canvas: static int, the canvas side.

  Returns:
    [B, canvas, canvas, C] of images' dtype.
  """
  blank = jnp.zeros((canvas, canvas, images.shape[-1]), images.dtype)
  return jax.vmap(lambda image, offset: lax.dynamic_update_slice(
      blank, image, (offset[0], offset[1], 0)))(images, offsets)


def random_offsets(key: jax.Array, indices: jax.Array, digit_shape: Sequence[int],
                   canvas: int = CANVAS) -> jax.Array:
  """Uniform top-left positions that keep a digit whole, one per example.

  Args:
    key: PRNG key; example b draws from fold_in(key, indices[b]).
    indices: int [B], the examples' indices in their split.
    digit_shape: static (h, w).
    canvas: static int.

  Returns:
    int32 [B, 2] (row, column) offsets, each uniform over [0, canvas - h] x [0, canvas - w].
  """
  high = jnp.array([canvas - digit_shape[0] + 1, canvas - digit_shape[1] + 1])
  return jax.vmap(lambda i: jax.random.randint(jax.random.fold_in(key, i), (2,), 0, high))(
      indices).astype(jnp.int32)


def batch_maker(test_seed: int, canvas: int = CANVAS) -> Callable[..., Dict[str, jax.Array]]:
  """The loop's batch maker for expanded MNIST (see `capsjax.training.steps.pmap_steps`).

  Args:
    test_seed: int; evaluation batches (key None) place example i by
      fold_in(PRNGKey(test_seed), i).
    canvas: int, the canvas side.

  Returns:
    make_batch(images uint8 [N, h, w, C], labels, indices, key) ->
    {'image': float32 [B, canvas, canvas, C] in [0, 1], 'label': int32 [B]}.
  """
  test_key = jax.random.PRNGKey(test_seed)

  def make_batch(images: jax.Array, labels: jax.Array, indices: jax.Array,
                 key: Optional[jax.Array] = None) -> Dict[str, jax.Array]:
    offsets = random_offsets(test_key if key is None else key, indices, images.shape[1:3],
                             canvas)
    placed = place(images[indices], offsets, canvas)
    return {'image': placed.astype(jnp.float32) / 255.0, 'label': labels[indices]}

  return make_batch


def expanded_test_set(images: np.ndarray, labels: np.ndarray, test_seed: int,
                      canvas: int = CANVAS) -> Dict[str, np.ndarray]:
  """The expanded MNIST test set as uint8, exactly what evaluation batches hold.

  Args:
    images: uint8 [N, h, w, C]; labels: int [N].
    test_seed: int, as for `batch_maker`.
    canvas: int.

  Returns:
    {'image': uint8 [N, canvas, canvas, C], 'label': int32 [N], 'offset': int32 [N, 2]}.
  """
  indices = jnp.arange(len(images))
  offsets = random_offsets(jax.random.PRNGKey(test_seed), indices, images.shape[1:3], canvas)
  placed = jax.jit(place, static_argnums=2)(jnp.asarray(images), offsets, canvas)
  return {'image': np.asarray(placed), 'label': np.asarray(labels, np.int32),
          'offset': np.asarray(offsets)}


def transform_matrix(rotation_degrees: np.ndarray, shear: np.ndarray,
                     scale: np.ndarray) -> np.ndarray:
  """The 2x2 linear maps of the generated set, acting on (x, y) = (column, row).

  A = R(rotation) @ [[1, shear], [0, 1]] @ diag(scale_x, scale_y): scale each
  axis, shear x by y, then rotate.

  Args:
    rotation_degrees: float [N]; shear: float [N]; scale: float [N, 2] (x, y).

  Returns:
    float64 [N, 2, 2].
  """
  theta = np.radians(rotation_degrees)
  cos, sin = np.cos(theta), np.sin(theta)
  rotation = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)
  shearing = np.zeros((len(theta), 2, 2))
  shearing[:, 0, 0] = shearing[:, 1, 1] = 1
  shearing[:, 0, 1] = shear
  scaling = np.zeros((len(theta), 2, 2))
  scaling[:, 0, 0], scaling[:, 1, 1] = scale[:, 0], scale[:, 1]
  return rotation @ shearing @ scaling


def _warp(image, matrix, translation, canvas):
  """One digit under x_out = matrix @ (x_in - centre) + translation, bilinearly resampled."""
  height, width = image.shape
  centre = np.array([(width - 1) / 2, (height - 1) / 2])
  rows, cols = np.mgrid[0:canvas, 0:canvas]
  out_xy = np.stack([cols.ravel(), rows.ravel()]).astype(np.float64)
  src_xy = np.linalg.solve(matrix, out_xy - translation[:, None]) + centre[:, None]
  values = ndimage.map_coordinates(image.astype(np.float64), [src_xy[1], src_xy[0]], order=1,
                                   mode='constant', cval=0.0)
  return values.reshape(canvas, canvas)


def generate(images: np.ndarray, labels: np.ndarray, copies: int, seed: int,
             canvas: int = CANVAS) -> Dict[str, np.ndarray]:
  """The generated affine test set: `copies` random affine versions of every digit.

  Rotation uniform in +-20 degrees, shear in +-0.2, scale in [0.8, 1.2] on each
  axis; then a translation, uniform over those that keep every lit pixel of
  the transformed digit at least MARGIN pixels inside the canvas.

  Args:
    images: uint8 [N, h, w, 1] (or [N, h, w]); labels: int [N].
    copies: int K >= 1, versions per digit.
    seed: int; the set is a function of (images, copies, seed).
    canvas: int, the output side.

  Returns:
    {'image': uint8 [N*K, canvas, canvas, 1], 'label': int32 [N*K], 'index': int32
    [N*K] (the source digit; digit i's versions are rows i*K to i*K+K-1),
    'rotation_degrees': float32 [N*K], 'shear': float32 [N*K], 'scale': float32
    [N*K, 2] (x, y), 'translation': float32 [N*K, 2], the canvas (x, y) where the
    digit's centre lands}.
  """
  if copies < 1:
    raise InputError(f'--affine_copies must be at least 1, got {copies}.')
  images = np.asarray(images).reshape(len(images), *np.shape(images)[1:3])
  count = len(images) * copies
  rng = np.random.default_rng(seed)
  rotation = rng.uniform(-MAX_ROTATION_DEGREES, MAX_ROTATION_DEGREES, count)
  shear = rng.uniform(-MAX_SHEAR, MAX_SHEAR, count)
  scale = rng.uniform(*SCALE_RANGE, (count, 2))
  placement = rng.uniform(0, 1, (count, 2))
  matrices = transform_matrix(rotation, shear, scale)
  index = np.repeat(np.arange(len(images)), copies)
  height, width = images.shape[1:]
  centre = np.array([(width - 1) / 2, (height - 1) / 2])
  out = np.zeros((count, canvas, canvas), np.uint8)
  translation = np.zeros((count, 2))
  for n in range(count):
    image = images[index[n]]
    rows, cols = np.nonzero(image)
    lit = matrices[n] @ (np.stack([cols, rows]) - centre[:, None])  # the lit pixels, moved
    low = MARGIN - lit.min(axis=1)
    high = canvas - 1 - MARGIN - lit.max(axis=1)
    # A digit too large to fit with the margin is centred (none of MNIST's is).
    translation[n] = np.where(high >= low, low + placement[n] * (high - low),
                              (canvas - 1) / 2)
    out[n] = np.clip(np.rint(_warp(image, matrices[n], translation[n], canvas)), 0, 255)
  return {'image': out[..., None], 'label': np.asarray(labels, np.int32)[index],
          'index': index.astype(np.int32), 'rotation_degrees': rotation.astype(np.float32),
          'shear': shear.astype(np.float32), 'scale': scale.astype(np.float32),
          'translation': translation.astype(np.float32)}


def _batch_number(path):
  found = re.search(r'(\d+)\.mat$', path)
  return int(found.group(1)) if found else -1


def read_affnist(directory: str) -> Tuple[np.ndarray, np.ndarray]:
  """The official affNIST test set from its MATLAB files.

  The authors publish it as test.mat (all 320,000 digits) and as test_batches/
  1.mat ... 32.mat; each holds a struct 'affNISTdata' whose 'image' is uint8
  [1600, N], a 40x40 digit per column (row after row), and whose 'label_int' is
  [1, N]. test.mat is read if present, else every test_batches/*.mat in order.

  Args:
    directory: the folder of test.mat or of test_batches/ (or the test_batches
      folder itself).

  Returns:
    (images uint8 [N, 40, 40, 1], labels int32 [N]).

  Raises:
    InputError: no such files, or files without that layout.
  """
  whole = os.path.join(directory, 'test.mat')
  paths = ([whole] if os.path.isfile(whole) else
           sorted(glob.glob(os.path.join(directory, 'test_batches', '*.mat')) or
                  glob.glob(os.path.join(directory, '*.mat')), key=_batch_number))
  if not paths:
    raise InputError(f'--affnist_dir={directory}: neither test.mat nor test_batches/*.mat is '
                     f'there; unpack the affNIST test set (test.mat.zip or test_batches.zip) '
                     f'into it.')
  images, labels = [], []
  for path in paths:
    try:
      record = scipy_io.loadmat(path)['affNISTdata'][0, 0]
      pixels, label = record['image'], record['label_int']
    except (KeyError, ValueError, TypeError, IndexError, NotImplementedError) as e:
      raise InputError(f'{path} is not an affNIST file (a struct affNISTdata with image '
                       f'[1600, N] and label_int [1, N]): {e}') from None
    if pixels.shape[0] != CANVAS * CANVAS:
      raise InputError(f'{path}: affNISTdata.image is {pixels.shape}, not [1600, N].')
    images.append(np.asarray(pixels, np.uint8).T.reshape(-1, CANVAS, CANVAS, 1))
    labels.append(np.asarray(label).reshape(-1).astype(np.int32))
  return np.concatenate(images), np.concatenate(labels)
