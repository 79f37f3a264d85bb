"""The tasks' losses: evaluation scores the reconstruction from the true class, as training does."""

import jax
import jax.numpy as jnp
import numpy as np

from capsjax import tasks
from capsjax.training import TrainConfig, create_train_state, eval_step

TINY = dict(conv_features=8, primary_types=2, primary_dim=4, digit_dim=4, conv_impl='xla',
            batch_size=8)


def _reconstruction_sums(state, images, masks):
  """float64 sum over the batch of squared reconstruction errors with the given capsule masks."""
  out = jax.jit(state.apply_fn)({'params': state.params}, images, masks)
  recon = np.asarray(out.reconstructions, np.float64)
  target = np.asarray(images, np.float64)
  if recon.ndim == 5:  # [B, M, H, W, C]: one target per mask (MultiMNIST's digits)
    return recon, out.lengths
  return float(np.sum((recon - target) ** 2)), out.lengths


def test_mnist_evaluation_reconstructs_from_the_true_class():
  config = TrainConfig.create(**TINY)
  state = create_train_state(jax.random.PRNGKey(1), config, tasks.classification_losses, 1)
  # Longer class capsules and a more sensitive decoder than at initialisation, so that
  # which capsule is masked changes the reconstruction clearly.
  decoder = state.params['decoder']
  first = decoder['Dense_0']
  decoder = dict(decoder, Dense_0=dict(first, kernel=30 * first['kernel']))
  params = dict(state.params, decoder=decoder,
                digit_caps=jax.tree.map(lambda w: 30 * w, state.params['digit_caps']))
  state = state.replace(params=params)
  images = jax.random.uniform(jax.random.PRNGKey(2), (8, 28, 28, 1))
  _, lengths = _reconstruction_sums(state, images, None)
  predicted = np.argmax(np.asarray(lengths), axis=1)
  labels = (predicted + 1) % 10  # every prediction wrong: the two masks differ everywhere
  from_labels, _ = _reconstruction_sums(state, images, jnp.asarray(labels))
  from_predictions, _ = _reconstruction_sums(state, images, None)
  tolerance = 1e-5 * from_labels  # float32 sums of about 500
  assert abs(from_labels - from_predictions) > 20 * tolerance  # the test can tell them apart
  sums = eval_step(state, {'image': images, 'label': jnp.asarray(labels, jnp.int32)})
  np.testing.assert_allclose(float(sums['reconstruction_loss']), from_labels, rtol=0,
                             atol=tolerance)
  assert float(sums['accuracy']) == 0.0


def test_multimnist_evaluation_reconstructs_each_digit_from_its_true_class():
  config = TrainConfig.create(**TINY, image_shape=(36, 36, 1), shift_pixels=0)
  state = create_train_state(jax.random.PRNGKey(1), config, tasks.multimnist_losses, 1)
  keys = jax.random.split(jax.random.PRNGKey(3), 2)
  digits = jax.random.uniform(keys[0], (8, 2, 36, 36, 1))
  images = jnp.clip(digits.sum(1), 0, 1)
  labels = jnp.stack([jnp.arange(8) % 10, (jnp.arange(8) + 3) % 10], 1).astype(jnp.int32)
  recon, _ = _reconstruction_sums(state, images, jax.nn.one_hot(labels, 10))
  expected = float(np.sum((recon - np.asarray(digits, np.float64)) ** 2))
  sums = eval_step(state, {'image': images, 'label': labels, 'digits': digits})
  np.testing.assert_allclose(float(sums['reconstruction_loss']), expected, rtol=1e-5)
