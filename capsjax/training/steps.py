"""The pure steps, `train_step` and `eval_step`, and their `pmap`ped form over device-resident data.

A batch is {'image': float32 [B, H, W, C] in [0, 1], 'label': int32 [B]}; an
evaluation batch may add 'mask': float32 [B], 0 for padding examples. The steps
reject non-float images and non-integer labels when they are traced; values
can only be checked on the host: call `check_batch` on batches you build.

What a run is scored by is the state's per-example loss function (see
`capsjax.tasks`): the steps minimise the mean of its 'loss' and report the
means of everything it returns.

Both steps take `axis_name`: None on one device under `jit`, or the `pmap` axis
name, in which case gradients and metrics are averaged across devices with
`lax.pmean` (see `pmap_steps`).
"""

import functools

import flax.jax_utils
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from capsjax.data.augment import random_shifts, shift_images
from capsjax.errors import InputError
from capsjax.training.state import MODEL_STATE, TrainState, ema, evaluation_params

AXIS_NAME = 'batch'
BATCH_STREAM = 2**31


def _check_batch_types(batch):
  if not jnp.issubdtype(batch['image'].dtype, jnp.floating):
    raise InputError(f"batch['image'] is {batch['image'].dtype}; the steps take float images "
                     f'in [0, 1]: divide uint8 pixels by 255 (steps.take_batch does).')
  if not jnp.issubdtype(batch['label'].dtype, jnp.integer):
    raise InputError(f"batch['label'] is {batch['label'].dtype}; the steps take integer "
                     f'class indices.')


def check_batch(batch: dict, num_classes: int) -> None:
  """Check a host batch against the batch contract, before it reaches a step.

  Args:
    batch: {'image': float [B, H, W, C], 'label': int [B]} as NumPy or concrete
      JAX arrays.
    num_classes: labels must lie in [0, num_classes).

  Raises:
    InputError: naming what is wrong (dtype, pixel range, label range) and the fix.
  """
  _check_batch_types(batch)
  images, labels = np.asarray(batch['image']), np.asarray(batch['label'])
  if images.size and (images.min() < 0 or images.max() > 1):
    raise InputError(f"batch['image'] holds values in [{images.min()}, {images.max()}]; "
                     f'pixels must lie in [0, 1] (divide 0..255 pixels by 255).')
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise InputError(f"batch['label'] holds labels in [{labels.min()}, {labels.max()}]; "
                     f'they must lie in [0, {num_classes}).')


def _example_ids(batch_size, axis_name):
  first = 0 if axis_name is None else lax.axis_index(axis_name) * batch_size
  return first + jnp.arange(batch_size)


def train_step(state: TrainState, batch: dict, axis_name=None):
  """One optimizer step on a batch, with the paper's random shifts applied on the device.

  Args:
    state: a `TrainState`.
    batch: {'image': float32 [B, H, W, C], 'label': int32 [B]} (this device's share).
    axis_name: the pmap axis to average gradients and metrics over, or None.

  Returns:
    (new_state, metrics): the mean over the (global) batch of every term of
    the state's loss_fn ('loss', 'accuracy', ...), float32 scalars.
  """
  _check_batch_types(batch)
  shift_pixels = state.config.data.shift_pixels
  shift_key, dropout_key = jax.random.split(jax.random.fold_in(state.rng, state.step))
  if axis_name is not None:
    dropout_key = jax.random.fold_in(dropout_key, lax.axis_index(axis_name))
  images = batch['image']
  if shift_pixels:
    shifts = random_shifts(shift_key, _example_ids(images.shape[0], axis_name), shift_pixels)
    images = shift_images(images, shifts, shift_pixels)
  batch = {**batch, 'image': images}

  def mean_loss(params):
    terms = dict(state.loss_fn(state, params, batch, True, dropout_key))
    if state.model_state and MODEL_STATE not in terms:
      # Else the statistics would stay at their initial values, silently.
      raise InputError('the loss function returned no updated model state for a model that '
                       'keeps one (batch statistics); return its terms through '
                       'capsjax.training.state.with_model_state(terms, out).')
    model_state = terms.pop(MODEL_STATE, state.model_state)
    return jnp.mean(terms['loss']), (terms, model_state)

  (_, (terms, model_state)), grads = jax.value_and_grad(mean_loss, has_aux=True)(state.params)
  metrics = {name: jnp.mean(value) for name, value in terms.items()}
  if axis_name is not None:
    # Every device's running statistics move by the mean of theirs, so they stay equal.
    grads, metrics, model_state = lax.pmean((grads, metrics, model_state), axis_name)
  state = state.apply_gradients(grads=grads, model_state=model_state)
  if state.ema is not None:
    _, average = ema(state.config).update(state.params, state.ema)
    state = state.replace(ema=average)
  return state, metrics


def eval_step(state: TrainState, batch: dict, axis_name=None) -> dict:
  """Sums over a batch of every term of the state's loss_fn, without augmentation, at
  the state's `evaluation_params`.

  Args:
    state: a `TrainState`.
    batch: {'image', 'label'} as for `train_step`, optionally 'mask' float32 [B]
      (0 for padding examples, which then count nowhere).
    axis_name: the pmap axis to sum over, or None.

  Returns:
    {'loss': sum of per-example losses, 'accuracy': number right, ..., 'count':
    number of real examples}, float32 scalars, summed over devices.
  """
  _check_batch_types(batch)
  mask = batch.get('mask', jnp.ones(batch['image'].shape[:1], jnp.float32))
  terms = dict(state.loss_fn(state, evaluation_params(state), batch, False, None))
  terms.pop(MODEL_STATE, None)
  sums = {name: jnp.sum(value * mask) for name, value in terms.items()}
  sums['count'] = jnp.sum(mask)
  return sums if axis_name is None else lax.psum(sums, axis_name)


def take_batch(images, labels, indices, key=None):
  """Gather a batch from a device-resident dataset: the default batch maker of `pmap_steps`.

  Args:
    images: uint8 [N, H, W, C]; labels: int32 [N].
    indices: int32 [B].
    key: unused; batch makers that draw their examples take a PRNG key (None
      when evaluating), see `pmap_steps`.

  Returns:
    {'image': float32 [B, H, W, C] in [0, 1], 'label': int32 [B]}.
  """
  return {'image': images[indices].astype(jnp.float32) / 255.0, 'label': labels[indices]}


def replicate(tree, devices=None):
  """Copy a pytree to every device, laid out exactly as `pmap_steps` returns its state.

  `flax.jax_utils.replicate` alone can give arrays on a differently named mesh
  from pmap's outputs, which makes the second step compile again.

  Args:
    tree: a pytree of arrays (a TrainState, a dataset).
    devices: the devices, default every device of every process, of which this
      process holds a copy on each of its own (`jax.local_devices()`).

  Returns:
    The tree with a leading axis of size len(devices) (by default
    `jax.local_device_count()`), one copy per device.
  """
  # pmap's own default (None) spans every process's devices; a list of local
  # devices would not, with more than one process.
  stacked = flax.jax_utils.replicate(tree, devices or jax.local_devices())
  return jax.pmap(lambda x: x, axis_name=AXIS_NAME, devices=devices)(stacked)


def batch_key(state: TrainState) -> jax.Array:
  """The PRNG key a batch maker draws a training step's batch with.

  A stream of its own, apart from the step's shift and dropout keys (which
  derive from fold_in(rng, step)): no training step reaches 2**31.

  Args:
    state: a `TrainState`.

  Returns:
    A PRNG key.
  """
  return jax.random.fold_in(jax.random.fold_in(state.rng, BATCH_STREAM), state.step)


def pmap_steps(devices=None, make_batch=take_batch):
  """`pmap`ped steps that read their batch from a replicated, device-resident dataset.

  make_batch(images, labels, indices, key) -> batch builds each batch on the
  device from the dataset's arrays (default `take_batch`, a gather); key is
  `batch_key(state)` in training and None in evaluation, where a batch must
  depend on the indices alone (MultiMNIST pairs, `capsjax.data.multimnist`).

  Returns (p_train, p_eval):
    p_train(state, images, labels, indices [D, B/G]) -> (state, metrics), the
      state donated;
    p_eval(state, images, labels, indices [D, B/G], mask [D, B/G]) -> sums.
  D is this process's device count and G that of every process (D = G with one
  process); `capsjax.training.loop.local_shards` cuts a global batch B so. State, images
  and labels are replicated over the D devices with `replicate`.
  """

  def train(state, images, labels, indices):
    return train_step(state, make_batch(images, labels, indices, batch_key(state)), AXIS_NAME)

  def evaluate(state, images, labels, indices, mask):
    return eval_step(state, {**make_batch(images, labels, indices, None), 'mask': mask},
                     AXIS_NAME)

  pmap = functools.partial(jax.pmap, axis_name=AXIS_NAME, devices=devices)
  return pmap(train, donate_argnums=0), pmap(evaluate)
