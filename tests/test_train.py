import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from capsjax.tasks import classification_losses
from capsjax.training import TrainConfig, create_train_state, steps
from capsjax.training.checkpoint import Checkpointer, Progress
from tests.conftest import REPO

# lax.conv compiles faster than the default; tests/test_model.py shows the two agree.
SMALL = dict(conv_features=16, primary_types=4, primary_dim=4, digit_dim=8, conv_impl='xla')


def fixed_batch(size=16, seed=0):
  rng = np.random.default_rng(seed)
  labels = np.arange(size) % 10
  images = rng.uniform(size=(size, 28, 28, 1)).astype(np.float32) * 0.2
  for n, label in enumerate(labels):
    images[n, 4 + 2 * label:8 + 2 * label, 6:22] = 1.0  # a bar whose height is the label
  return {'image': jnp.asarray(images), 'label': jnp.asarray(labels, jnp.int32)}


def test_train_steps_lower_the_loss_on_a_fixed_batch():
  config = TrainConfig.create(shift_pixels=0, batch_size=16, **SMALL)
  state = create_train_state(jax.random.PRNGKey(0), config, classification_losses)
  batch = fixed_batch()
  step = jax.jit(steps.train_step)
  losses, cache_sizes = [], []
  for _ in range(12):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
    # Other tests' jits of train_step share this cache: only its growth counts.
    cache_sizes.append(step._cache_size())
  assert losses[-1] < 0.6 * losses[0], losses
  assert int(state.step) == 12
  assert cache_sizes[-1] == cache_sizes[0]  # the first state has the same types as the later ones
  np.testing.assert_allclose(metrics['loss'], metrics['margin_loss'] +
                             0.0005 * metrics['reconstruction_loss'], rtol=1e-5)


def test_recon_weight_zero_trains_without_decoder():
  config = TrainConfig.create(recon_weight=0.0, **SMALL)
  state = create_train_state(jax.random.PRNGKey(0), config, classification_losses)
  assert 'decoder' not in state.params
  _, metrics = jax.jit(steps.train_step)(state, fixed_batch())
  assert float(metrics['reconstruction_loss']) == 0.0


def test_eval_step_padding_counts_nowhere():
  config = TrainConfig.create(**SMALL)
  state = create_train_state(jax.random.PRNGKey(0), config, classification_losses)
  batch = fixed_batch(10)
  padded = {k: jnp.concatenate([v, v[:6]]) for k, v in batch.items()}
  padded['mask'] = jnp.concatenate([jnp.ones(10), jnp.zeros(6)])
  plain, masked = steps.eval_step(state, batch), jax.jit(steps.eval_step)(state, padded)
  assert float(masked['count']) == 10
  np.testing.assert_allclose(masked['loss'], plain['loss'], rtol=1e-5)
  assert float(masked['accuracy']) == float(plain['accuracy'])


def test_checkpoint_round_trip(tmp_path):
  config = TrainConfig.create(**SMALL)
  state = create_train_state(jax.random.PRNGKey(0), config, classification_losses)
  state, _ = jax.jit(steps.train_step)(state, fixed_batch())
  with Checkpointer(str(tmp_path)) as checkpointer:
    checkpointer.save(state, Progress.end_of(3))
    fresh = create_train_state(jax.random.PRNGKey(1), config, classification_losses)
    restored, progress = checkpointer.restore(fresh)
    assert [saved.name for saved in checkpointer.saved()] == ['step_1']
  assert progress == Progress.end_of(3) and int(restored.step) == 1
  for a, b in zip(jax.tree.leaves((state.params, state.opt_state)),
                  jax.tree.leaves((restored.params, restored.opt_state))):
    np.testing.assert_array_equal(a, b)


PMAP_SCRIPT = r'''
import json, jax, jax.numpy as jnp, numpy as np, flax.jax_utils
from capsjax.tasks import classification_losses
from capsjax.training import TrainConfig, create_train_state, steps
assert jax.local_device_count() == 8, jax.devices()
config = TrainConfig.create(batch_size=16, **SMALL)
rng = np.random.default_rng(0)
images = jnp.asarray(rng.integers(0, 256, size=(64, 28, 28, 1)), jnp.uint8)
labels = jnp.asarray(rng.integers(0, 10, size=64), jnp.int32)
result = {}
for devices in (jax.devices()[:1], jax.devices()):
  p_train, p_eval = steps.pmap_steps(devices)
  put = lambda x: steps.replicate(x, devices)
  state = put(create_train_state(jax.random.PRNGKey(0), config, classification_losses))
  data = (put(images), put(labels))
  losses = []
  for step in range(3):
    indices = np.arange(16 * step, 16 * step + 16, dtype=np.int32).reshape(len(devices), -1)
    state, metrics = p_train(state, *data, indices)
    losses.append(float(metrics['loss'][0]))
  mask = np.ones((len(devices), 16 // len(devices)), np.float32)
  sums = p_eval(state, *data, np.arange(16, dtype=np.int32).reshape(len(devices), -1), mask)
  if hasattr(p_train, '_cache_size'):
    assert p_train._cache_size() == 1, 'the steps after the first compiled again'
  params = jax.tree.leaves(flax.jax_utils.unreplicate(state).params)
  result[len(devices)] = dict(losses=losses, eval=float(sums['loss'][0]),
                              params=[float(jnp.sum(p)) for p in params])
print('RESULT' + json.dumps(result))
'''


def test_eight_device_pmap_matches_one_device():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  script = f'SMALL = {SMALL!r}\n' + PMAP_SCRIPT
  proc = subprocess.run([sys.executable, '-c', script], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.split('RESULT')[-1])
  one, eight = result['1'], result['8']
  assert one['losses'][2] != one['losses'][0]  # training moved
  np.testing.assert_allclose(eight['losses'], one['losses'], rtol=2e-5)
  np.testing.assert_allclose(eight['eval'], one['eval'], rtol=2e-5)
  np.testing.assert_allclose(eight['params'], one['params'], rtol=1e-4, atol=1e-5)
