"""Training API: a config, `create_train_state`, and pure `train_step` / `eval_step`.

A batch is {'image': float32 [B, H, W, C] in [0, 1], 'label': int32 [B]}; an
evaluation batch may add 'mask': float32 [B], 0 for padding examples.

Both steps take `axis_name`: None on one device under `jit`, or the `pmap` axis
name, in which case gradients and metrics are averaged across devices with
`lax.pmean` (see `pmap_steps`).
"""

import dataclasses
import functools
from typing import Tuple

import flax
import flax.jax_utils
import jax
import jax.numpy as jnp
from jax import lax
import optax
from flax.training import train_state

from capsjax.augment import random_shifts, shift_images
from capsjax.losses import margin_loss, reconstruction_loss
from capsjax.model import CapsNet, init_params

AXIS_NAME = 'batch'
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything a training run is configured by; the defaults are the paper's MNIST recipe.

  The learning rate decays exponentially: lr * lr_decay ** (step / lr_decay_steps).
  A zero recon_weight drops the decoder (the paper's "without reconstruction").
  """
  routing_iters: int = 3
  epochs: int = 50
  batch_size: int = 128
  learning_rate: float = 1e-3
  lr_decay: float = 0.96
  lr_decay_steps: int = 2000
  recon_weight: float = 0.0005
  shift_pixels: int = 2
  seed: int = 0
  dtype: str = 'float32'
  conv_impl: str = 'matmul'
  image_shape: Tuple[int, int, int] = (28, 28, 1)
  num_classes: int = 10
  conv_features: int = 256
  primary_types: int = 32
  primary_dim: int = 8
  digit_dim: int = 16

  def model(self):
    """The `CapsNet` this config trains."""
    if self.dtype not in DTYPES:
      raise ValueError(f'dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}.')
    return CapsNet(num_classes=self.num_classes, conv_features=self.conv_features,
                   primary_types=self.primary_types, primary_dim=self.primary_dim,
                   digit_dim=self.digit_dim, routing_iters=self.routing_iters,
                   use_decoder=self.recon_weight > 0, conv_impl=self.conv_impl,
                   dtype=DTYPES[self.dtype])

  def learning_rate_schedule(self):
    return optax.exponential_decay(self.learning_rate, self.lr_decay_steps, self.lr_decay)


class TrainState(train_state.TrainState):
  """Flax's TrainState plus the (static) config the steps read."""
  config: TrainConfig = flax.struct.field(pytree_node=False, default=None)


def create_train_state(rng, config):
  """Initialise parameters and the Adam optimizer for `config`.

  Args:
    rng: PRNG key for the parameters.
    config: a `TrainConfig`.

  Returns:
    A `TrainState` on the default device (replicate it for `pmap_steps`).
  """
  model = config.model()
  params = init_params(model, rng, config.image_shape)
  state = TrainState.create(apply_fn=model.apply, params=params,
                            tx=optax.adam(config.learning_rate_schedule()), config=config)
  # An int32 array, as train_step returns it, so the second step does not recompile.
  return state.replace(step=jnp.zeros((), jnp.int32))


def _losses(state, params, images, labels, mask_labels):
  out = state.apply_fn({'params': params}, images, mask_labels)
  targets = jax.nn.one_hot(labels, state.config.num_classes)
  margin = margin_loss(out.lengths, targets)
  recon = (reconstruction_loss(out.reconstructions, images) if out.reconstructions is not None
           else jnp.zeros_like(margin))
  correct = (jnp.argmax(out.lengths, axis=-1) == labels).astype(jnp.float32)
  return margin + state.config.recon_weight * recon, margin, recon, correct


def _example_ids(batch_size, axis_name):
  first = 0 if axis_name is None else lax.axis_index(axis_name) * batch_size
  return first + jnp.arange(batch_size)


def train_step(state, batch, axis_name=None):
  """One optimizer step on a batch, with the paper's random shifts applied on the device.

  Args:
    state: a `TrainState`.
    batch: {'image': float32 [B, H, W, C], 'label': int32 [B]} (this device's share).
    axis_name: the pmap axis to average gradients and metrics over, or None.

  Returns:
    (new_state, metrics): metrics holds scalar 'loss', 'margin_loss',
    'reconstruction_loss' and 'accuracy', means over the (global) batch.
  """
  config = state.config
  images, labels = batch['image'], batch['label']
  if config.shift_pixels:
    step_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), state.step)
    shifts = random_shifts(step_key, _example_ids(images.shape[0], axis_name),
                           config.shift_pixels)
    images = shift_images(images, shifts, config.shift_pixels)

  def loss_fn(params):
    loss, margin, recon, correct = _losses(state, params, images, labels, labels)
    return jnp.mean(loss), (margin, recon, correct)

  (loss, (margin, recon, correct)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  metrics = {'loss': loss, 'margin_loss': jnp.mean(margin),
             'reconstruction_loss': jnp.mean(recon), 'accuracy': jnp.mean(correct)}
  if axis_name is not None:
    grads, metrics = lax.pmean((grads, metrics), axis_name)
  return state.apply_gradients(grads=grads), metrics


def eval_step(state, batch, axis_name=None):
  """Sums of loss and correct predictions on a batch (decoder masked by the prediction).

  Args:
    state: a `TrainState`.
    batch: {'image', 'label'} as for `train_step`, optionally 'mask' float32 [B]
      (0 for padding examples, which then count nowhere).
    axis_name: the pmap axis to sum over, or None.

  Returns:
    {'loss': sum of per-example losses, 'correct': number right, 'count': number
    of real examples}, float32 scalars, summed over devices.
  """
  images, labels = batch['image'], batch['label']
  mask = batch.get('mask', jnp.ones(labels.shape, jnp.float32))
  loss, _, _, correct = _losses(state, state.params, images, labels, None)
  sums = {'loss': jnp.sum(loss * mask), 'correct': jnp.sum(correct * mask),
          'count': jnp.sum(mask)}
  return sums if axis_name is None else lax.psum(sums, axis_name)


def take_batch(images, labels, indices):
  """Gather a batch from a device-resident dataset.

  Args:
    images: uint8 [N, H, W, C]; labels: int32 [N].
    indices: int32 [B].

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
    devices: the devices, default all local ones.

  Returns:
    The tree with a leading axis of size len(devices), one copy per device.
  """
  devices = devices or jax.local_devices()
  stacked = flax.jax_utils.replicate(tree, devices)
  return jax.pmap(lambda x: x, axis_name=AXIS_NAME, devices=devices)(stacked)


def pmap_steps(devices=None):
  """`pmap`ped steps that read their batch from a replicated, device-resident dataset.

  Returns (p_train, p_eval):
    p_train(state, images, labels, indices [D, B/D]) -> (state, metrics), the
      state donated;
    p_eval(state, images, labels, indices [D, B/D], mask [D, B/D]) -> sums.
  State, images and labels are replicated over the D devices with `replicate`.
  """

  def train(state, images, labels, indices):
    return train_step(state, take_batch(images, labels, indices), AXIS_NAME)

  def evaluate(state, images, labels, indices, mask):
    return eval_step(state, {**take_batch(images, labels, indices), 'mask': mask}, AXIS_NAME)

  pmap = functools.partial(jax.pmap, axis_name=AXIS_NAME, devices=devices)
  return pmap(train, donate_argnums=0), pmap(evaluate)
