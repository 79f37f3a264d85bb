import functools

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

import capsjax
from capsjax.analysis.interpret import (
  PERTURBATIONS,
  coupling_maps,
  decode_perturbations,
  perturbed_capsules,
)
from capsjax.visualize import coupling_figure, dimension_sheet


def test_perturbations_are_k_twentieths_and_symmetric():
  assert PERTURBATIONS.dtype == np.float32 and PERTURBATIONS.shape == (11,)
  for k in range(-5, 6):
    assert PERTURBATIONS[k + 5] == np.float32(k * 0.05) == np.float32(k / 20)
  np.testing.assert_array_equal(PERTURBATIONS, -PERTURBATIONS[::-1])
  assert PERTURBATIONS[5] == 0


def test_perturbed_capsules_offset_one_dimension_of_one_capsule():
  rng = np.random.default_rng(0)
  capsules = rng.normal(size=(4, 6)).astype(np.float32)
  values = np.array([-0.5, 0.0, 0.25], np.float32)
  out = np.asarray(jax.jit(perturbed_capsules)(capsules, 2, values))
  expected = np.zeros((6, 3, 4, 6))
  for d in range(6):
    for v in range(3):
      expected[d, v, 2] = capsules[2].astype(np.float64)
      expected[d, v, 2, d] += np.float64(values[v])
  assert out.shape == (6, 3, 4, 6) and out.dtype == np.float32
  # Only the one perturbed entry per (d, v) may round; the rest is copied or zero.
  np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)
  untouched = ~np.eye(6, dtype=bool)[:, None, None, :] | (np.arange(4) != 2)[None, None, :, None]
  np.testing.assert_array_equal(out[np.broadcast_to(untouched, out.shape)],
                                expected[np.broadcast_to(untouched, out.shape)])


def test_decode_perturbations_feeds_the_perturbed_capsules_and_one_hot_mask():
  rng = np.random.default_rng(1)
  capsules = rng.normal(size=(3, 4)).astype(np.float32)
  seen = {}

  def fake_decoder(caps, mask):
    seen['caps'], seen['mask'] = np.asarray(caps), np.asarray(mask)
    # Each image carries its input's index so the reshape order is checked too.
    return jnp.broadcast_to(jnp.arange(caps.shape[0], dtype=jnp.float32)[:, None, None, None],
                            (caps.shape[0], 5, 7, 1))

  images = decode_perturbations(fake_decoder, capsules, 1)
  assert images.shape == (4, 11, 5, 7, 1)
  np.testing.assert_array_equal(seen['caps'],
                                np.asarray(perturbed_capsules(capsules, 1)).reshape(44, 3, 4))
  np.testing.assert_array_equal(seen['mask'], np.tile([0., 1., 0.], (44, 1)))
  np.testing.assert_array_equal(images[..., 0, 0, 0], np.arange(44).reshape(4, 11))


def test_decode_perturbations_with_a_real_decoder_under_vmap():
  decoder = capsjax.Decoder((8, 8, 1), hidden=(16,))
  capsules = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 4))
  params = decoder.init(jax.random.PRNGKey(1), capsules, jnp.ones((2, 5)))['params']
  apply = lambda caps, mask: decoder.apply({'params': params}, caps, mask)
  classes = jnp.array([3, 0])
  images = jax.jit(jax.vmap(functools.partial(decode_perturbations, apply)))(capsules, classes)
  assert images.shape == (2, 4, 11, 8, 8, 1)
  # The unperturbed column is the ordinary masked reconstruction.
  plain = apply(capsules, jax.nn.one_hot(classes, 5))
  np.testing.assert_allclose(images[:, 0, 5], plain, rtol=1e-5, atol=1e-6)
  assert np.all((images > 0) & (images < 1))


def test_coupling_maps_hand_computed():
  # grid (2, 2, 2): capsule index (y * 2 + x) * 2 + type.
  couplings = np.array([[1, 0, 0], [0, 1, 0],              # (0, 0)
                        [.5, .5, 0], [0, 0, 1],            # (0, 1)
                        [.2, .3, .5], [.2, .3, .5],        # (1, 0)
                        [0, 0, 1], [1, 0, 0]], np.float32)  # (1, 1)
  lengths = np.array([1, 2, 4, 0.5, 1, 3, 0.25, 0], np.float32)
  maps = np.asarray(coupling_maps(couplings, lengths, (2, 2, 2)))
  expected = np.array([[[1, 2], [.8, 0]],
                       [[2, 2], [1.2, 0]],
                       [[0, .5], [2, .25]]])
  np.testing.assert_allclose(maps, expected, rtol=1e-6)


def test_coupling_maps_share_out_each_positions_evidence():
  rng = np.random.default_rng(2)
  couplings = jax.nn.softmax(rng.normal(size=(5 * 4 * 3, 6)), axis=-1)
  lengths = rng.uniform(size=5 * 4 * 3).astype(np.float32)
  maps = np.asarray(jax.jit(coupling_maps, static_argnums=2)(couplings, lengths, (5, 4, 3)))
  assert maps.shape == (6, 5, 4)
  np.testing.assert_allclose(maps.sum(0), lengths.reshape(5, 4, 3).sum(-1), rtol=1e-5)


def test_coupling_maps_follow_the_primary_capsule_layout():
  # A 1x1 convolution of an image lit at one pixel gives capsules only at that position.
  layer = capsjax.PrimaryCapsules(num_types=3, capsule_dim=2, kernel_size=1, strides=1)
  image = np.zeros((1, 5, 4, 1), np.float32)
  image[0, 3, 1] = 1
  params = layer.init(jax.random.PRNGKey(0), image)
  lengths = jnp.linalg.norm(layer.apply(params, image), axis=-1)[0]
  maps = np.array(coupling_maps(jnp.full((60, 2), 0.5), lengths, (5, 4, 3)))
  assert maps[:, 3, 1].min() > 0
  maps[:, 3, 1] = 0
  np.testing.assert_array_equal(maps, 0)


def _runs(flags):
  """Lengths of the runs of True in a 1-D bool array."""
  edges = np.diff(np.concatenate([[0], flags.astype(int), [0]]))
  return np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)


def test_dimension_sheet_lays_out_dimensions_by_values(tmp_path):
  images = np.full((2, 3, 5, 7, 6, 1), 0.5, np.float32)
  images[1, 2, 4] = 0.8
  path = str(tmp_path / 'sheet.png')
  dimension_sheet(images, path, title='t', captions=['a', 'b'], values=np.arange(5) / 10,
                  scale=2)
  pixels = np.asarray(Image.open(path).convert('RGB'))
  grey = np.all(pixels == 127, axis=-1)
  # Rows of tiles: 2 blocks of 3 dimensions; columns: 5 values; tiles 14 x 12 pixels.
  np.testing.assert_array_equal(_runs(grey.any(axis=1)), [14] * 6)
  np.testing.assert_array_equal(_runs(grey.any(axis=0)), [12] * 5)
  # The bright tile (204) fills the last dimension's last value of the second block.
  bright = np.all(pixels == 204, axis=-1)
  bottom, right = np.flatnonzero(grey.any(1))[-1], np.flatnonzero(grey.any(0))[-1]
  assert np.all(bright[bottom - 13:bottom + 1, right - 11:right + 1])
  # ... and nothing next to it: the tile is exactly there (anti-aliased text may hit 204 too).
  assert bright[bottom - 14:bottom + 2, right - 12:right + 2].sum() == 14 * 12
  assert not (tmp_path / 'sheet.png.partial.png').exists()


def test_dimension_sheet_of_one_example(tmp_path):
  path = str(tmp_path / 'one.png')
  dimension_sheet(np.full((16, 11, 28, 28, 1), 0.5, np.float32), path, PERTURBATIONS)
  pixels = np.asarray(Image.open(path).convert('RGB'))
  grey = np.all(pixels == 127, axis=-1)
  np.testing.assert_array_equal(_runs(grey.any(axis=1)), [56] * 16)
  np.testing.assert_array_equal(_runs(grey.any(axis=0)), [56] * 11)


def test_coupling_figure_colours_and_highlight(tmp_path):
  image = np.full((2, 10, 10, 1), 0.8, np.float32)
  maps = np.zeros((2, 4, 3, 3), np.float32)
  maps[:, 0], maps[:, 1] = 2.0, 1.0  # class 1 at half the row's peak
  path = str(tmp_path / 'coupling.png')
  coupling_figure(image, maps, np.array([1, 2]), np.array([1, 3]), path, scale=3)
  pixels = np.asarray(Image.open(path).convert('RGB')).astype(int)
  # The half-peak maps are orange on the shared scale; the digits lead their rows.
  orange = np.all(pixels == (255, 127, 0), axis=-1)
  assert orange.sum() == 2 * 30 * 30
  rows, cols = np.flatnonzero(orange.any(1)), np.flatnonzero(orange.any(0))
  assert rows.size == 60 and cols.size == 30
  for top in rows[[0, 30]]:
    assert np.all(pixels[top:top + 30, :30] == 204)
  # Blue (the highlight: frame and caption) surrounds and captions the predicted map only;
  # no heat colour, grey or black is bluish.
  red, green, blue = np.moveaxis(pixels, -1, 0)
  bluish = (blue > red + 60) & (blue > green + 30)
  first, second = bluish[:rows[30] - 4], bluish[rows[30] - 4:]
  xs = np.flatnonzero(first.any(0))
  assert cols[0] - 3 <= xs.min() and xs.max() <= cols[-1] + 3
  assert first[rows[29] + 4:].any()  # the caption, below the frame
  xs = np.flatnonzero(second.any(0))
  assert xs.min() > cols[-1] + 3 and xs.max() - xs.min() <= 30 + 6
  assert not (tmp_path / 'coupling.png.partial.png').exists()
