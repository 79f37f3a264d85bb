"""Training API: a config, `create_train_state`, and pure `train_step` / `eval_step`.

A batch is {'image': float32 [B, H, W, C] in [0, 1], 'label': int32 [B]}; an
evaluation batch may add 'mask': float32 [B], 0 for padding examples. The steps
reject non-float images and non-integer labels when they are traced; values
can only be checked on the host: call `check_batch` on batches you build.

What a run is scored by is a per-example loss function (`classification_losses`
by default), given to `create_train_state`: the steps minimise the mean of its
'loss' and report the means of everything it returns.

Both steps take `axis_name`: None on one device under `jit`, or the `pmap` axis
name, in which case gradients and metrics are averaged across devices with
`lax.pmean` (see `pmap_steps`).
"""

import dataclasses
import functools
from typing import Callable, Tuple

import flax
import flax.jax_utils
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import optax
from flax.training import train_state

from capsjax.augment import random_shifts, shift_images
from capsjax.baseline import BaselineCNN
from capsjax.errors import InputError
from capsjax.losses import capsnet_loss_terms, cross_entropy_loss
from capsjax.model import CapsNet, init_params

AXIS_NAME = 'batch'
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
MODELS = ('capsnet', 'baseline')
LR_SCHEDULES = ('exponential', 'cosine')
BATCH_STREAM = 2**31


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything a training run is configured by; the defaults are the paper's MNIST recipe.

  model: 'capsnet' (reads routing_iters, recon_weight and the capsule sizes) or
    'baseline' (the paper's CNN; reads dropout_rate, baseline_conv3_features and
    baseline_pool, see `BaselineCNN`).
  lr_schedule: 'exponential', the paper's lr * lr_decay ** (step / lr_decay_steps),
    or 'cosine': a linear warm-up from 0 to learning_rate over warmup_epochs, then
    a cosine decay to 0 at the end of the last epoch (its length is the run's).
  ema_decay: evaluate (and checkpoint) an exponential moving average of the
    parameters with this decay, bias-corrected as `optax.ema` does (0: evaluate
    the trained parameters themselves).
  weight_decay: decoupled weight decay of the kernels (not the biases), as in
    `optax.adamw`: each step subtracts learning rate * weight_decay * kernel
    (0: plain Adam, the paper's).
  A zero recon_weight drops the decoder (the paper's "without reconstruction").
  """
  model: str = 'capsnet'
  routing_iters: int = 3
  epochs: int = 50
  batch_size: int = 128
  learning_rate: float = 1e-3
  lr_decay: float = 0.96
  lr_decay_steps: int = 2000
  lr_schedule: str = 'exponential'
  warmup_epochs: float = 0.0
  ema_decay: float = 0.0
  weight_decay: float = 0.0
  recon_weight: float = 0.0005
  shift_pixels: int = 2
  seed: int = 0
  dtype: str = 'float32'
  conv_impl: str = 'auto'
  image_shape: Tuple[int, int, int] = (28, 28, 1)
  num_classes: int = 10
  conv_features: int = 256
  primary_types: int = 32
  primary_dim: int = 8
  digit_dim: int = 16
  dropout_rate: float = 0.5
  baseline_conv3_features: int = 128
  baseline_pool: int = 1

  def build_model(self):
    """The Flax module this config trains: a `CapsNet` or a `BaselineCNN`."""
    if self.dtype not in DTYPES:
      raise InputError(f'dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}.')
    if self.model == 'baseline':
      return BaselineCNN(num_classes=self.num_classes, dropout_rate=self.dropout_rate,
                         conv_features=(256, 256, self.baseline_conv3_features),
                         pool=self.baseline_pool, conv_impl=self.conv_impl,
                         dtype=DTYPES[self.dtype])
    if self.model != 'capsnet':
      raise InputError(f'model must be one of {MODELS}, got {self.model!r}.')
    return CapsNet(num_classes=self.num_classes, conv_features=self.conv_features,
                   primary_types=self.primary_types, primary_dim=self.primary_dim,
                   digit_dim=self.digit_dim, routing_iters=self.routing_iters,
                   use_decoder=self.recon_weight > 0, conv_impl=self.conv_impl,
                   dtype=DTYPES[self.dtype])

  def learning_rate_schedule(self, steps_per_epoch=None):
    """The optax schedule of the learning rate, step -> float.

    Args:
      steps_per_epoch: int, optimizer steps in an epoch; the cosine schedule
        needs it to fit the run's length, the exponential one ignores it.
    """
    if self.lr_schedule == 'exponential':
      return optax.exponential_decay(self.learning_rate, self.lr_decay_steps, self.lr_decay)
    if self.lr_schedule != 'cosine':
      raise InputError(f'lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}.')
    if not steps_per_epoch:
      raise InputError("the 'cosine' learning rate schedule spans the run: give the steps "
                       'per epoch (create_train_state(..., steps_per_epoch=N)).')
    total = max(self.epochs * steps_per_epoch, 1)
    warmup = min(round(self.warmup_epochs * steps_per_epoch), total - 1)
    return optax.warmup_cosine_decay_schedule(0.0, self.learning_rate, warmup, total)

  def optimizer(self, steps_per_epoch=None):
    """The optax optimizer: Adam on `learning_rate_schedule`, with decoupled weight
    decay of the kernels (parameters of 2 or more dimensions) if weight_decay > 0.

    Args:
      steps_per_epoch: int, optimizer steps in an epoch (see `learning_rate_schedule`).
    """
    schedule = self.learning_rate_schedule(steps_per_epoch)
    if self.weight_decay < 0:
      raise InputError(f'weight_decay must be 0 or more, got {self.weight_decay}.')
    if not self.weight_decay:
      return optax.adam(schedule)
    # Biases only shift activations; decaying them regularises nothing.
    return optax.adamw(schedule, weight_decay=self.weight_decay,
                       mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params))

  def resumable_settings(self):
    """Names of the settings a resume of this run may change: `epochs`, unless the
    learning rate schedule is fitted to the run's length."""
    return ('epochs',) if self.lr_schedule == 'exponential' else ()


# Named recipes: TrainConfig fields each sets (flags given explicitly win).
RECIPES = {
    # The paper's: the TrainConfig defaults.
    'paper': {},
    # The paper's model and shifts in the steps 90 minutes of this project's 2-core CPU
    # train: batches of 64, a higher peak rate warmed up over an epoch and decayed to zero
    # by the last step, and evaluation on a moving average of the weights. 12 epochs of
    # all 60,000 training images are 11,244 steps, about the 11,167 of the 13-epoch runs
    # on 55,000 (a 5,000-image validation split held out) that chose its settings. The
    # README's MNIST results give its runs.
    'fast': {'epochs': 12, 'batch_size': 64, 'learning_rate': 2e-3, 'lr_schedule': 'cosine',
             'warmup_epochs': 1.0, 'ema_decay': 0.999},
}


class TrainState(train_state.TrainState):
  """Flax's TrainState plus the run's random key and its (static) config and loss.

  rng: the key every random choice of a step derives from (shifts, dropout),
    folded with the step number.
  ema: the `optax.EmaState` of the parameters when config.ema_decay > 0, else
    None; `evaluation_params` reads it.
  """
  rng: jax.Array = None
  ema: optax.EmaState = None
  config: TrainConfig = flax.struct.field(pytree_node=False, default=None)
  loss_fn: Callable = flax.struct.field(pytree_node=False, default=None)


def classification_losses(state, params, batch, train, rng):
  """Per-example terms of a classifier: its loss, and 'accuracy' (1 if right, else 0).

  CapsNet: the paper's margin + reconstruction loss; its decoder sees the true
  class's capsule in training and the longest one in evaluation. Baseline CNN:
  cross-entropy, with dropout in training.

  Args:
    state: a `TrainState` (its apply_fn and config are read).
    params: the parameters to evaluate the loss at.
    batch: {'image': float [B, H, W, C] in [0, 1], 'label': int [B]}.
    train: bool, whether this is a training step.
    rng: PRNG key for dropout (training only).

  Returns:
    dict of float32 [B]: 'loss', 'accuracy', and for CapsNet 'margin_loss' and
    'reconstruction_loss'.
  """
  config = state.config
  images, labels = batch['image'], batch['label']
  if config.model == 'baseline':
    scores = state.apply_fn({'params': params}, images, train=train,
                            rngs={'dropout': rng} if train else {})
    terms = {'loss': cross_entropy_loss(scores, labels)}
  else:
    out = state.apply_fn({'params': params}, images, labels if train else None)
    scores = out.lengths
    terms = capsnet_loss_terms(out.lengths, jax.nn.one_hot(labels, config.num_classes),
                               out.reconstructions, images, config.recon_weight)
  terms['accuracy'] = (jnp.argmax(scores, axis=-1) == labels).astype(jnp.float32)
  return terms


def create_train_state(rng, config, loss_fn=classification_losses, steps_per_epoch=None):
  """Initialise parameters, the optimizer (`TrainConfig.optimizer`) and (if configured)
  the EMA for `config`.

  Args:
    rng: PRNG key; the parameters and every random choice of training derive from it.
    config: a `TrainConfig`.
    loss_fn: the per-example loss, (state, params, batch, train, rng) -> dict of
      float32 [B] holding 'loss' (see `classification_losses`).
    steps_per_epoch: int, optimizer steps per epoch; needed by schedules that
      span the run (config.lr_schedule 'cosine').

  Returns:
    A `TrainState` on the default device (replicate it for `pmap_steps`).
  """
  model = config.build_model()
  params_key, state_key = jax.random.split(rng)
  params = init_params(model, params_key, config.image_shape)
  state = TrainState.create(apply_fn=model.apply, params=params,
                            tx=config.optimizer(steps_per_epoch),
                            rng=state_key, config=config, loss_fn=loss_fn,
                            ema=_ema(config).init(params) if config.ema_decay else None)
  # An int32 array, as train_step returns it, so the second step does not recompile.
  return state.replace(step=jnp.zeros((), jnp.int32))


def _ema(config):
  if not 0 <= config.ema_decay < 1:
    raise InputError(f'ema_decay must lie in [0, 1), got {config.ema_decay}.')
  return optax.ema(config.ema_decay, debias=True)


def evaluation_params(state):
  """The parameters a state is evaluated with: the bias-corrected moving average of
  the trained parameters if config.ema_decay > 0 (as `optax.ema(decay, debias=True)`
  returns it), else the trained parameters.

  Args:
    state: a `TrainState`.

  Returns:
    A params pytree shaped like state.params.
  """
  if state.ema is None:
    return state.params
  average = optax.tree.bias_correction(state.ema.ema, state.config.ema_decay, state.ema.count)
  # Before the first step there is no average yet (and its correction divides by 0).
  return jax.tree.map(lambda a, p: jnp.where(state.ema.count > 0, a, p), average, state.params)


def _check_batch_types(batch):
  if not jnp.issubdtype(batch['image'].dtype, jnp.floating):
    raise InputError(f"batch['image'] is {batch['image'].dtype}; the steps take float images "
                     f'in [0, 1]: divide uint8 pixels by 255 (train.take_batch does).')
  if not jnp.issubdtype(batch['label'].dtype, jnp.integer):
    raise InputError(f"batch['label'] is {batch['label'].dtype}; the steps take integer "
                     f'class indices.')


def check_batch(batch, num_classes):
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


def train_step(state, batch, axis_name=None):
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
  config = state.config
  shift_key, dropout_key = jax.random.split(jax.random.fold_in(state.rng, state.step))
  if axis_name is not None:
    dropout_key = jax.random.fold_in(dropout_key, lax.axis_index(axis_name))
  images = batch['image']
  if config.shift_pixels:
    shifts = random_shifts(shift_key, _example_ids(images.shape[0], axis_name),
                           config.shift_pixels)
    images = shift_images(images, shifts, config.shift_pixels)
  batch = {**batch, 'image': images}

  def mean_loss(params):
    terms = state.loss_fn(state, params, batch, True, dropout_key)
    return jnp.mean(terms['loss']), terms

  (_, terms), grads = jax.value_and_grad(mean_loss, has_aux=True)(state.params)
  metrics = {name: jnp.mean(value) for name, value in terms.items()}
  if axis_name is not None:
    grads, metrics = lax.pmean((grads, metrics), axis_name)
  state = state.apply_gradients(grads=grads)
  if state.ema is not None:
    _, ema = _ema(config).update(state.params, state.ema)
    state = state.replace(ema=ema)
  return state, metrics


def eval_step(state, batch, axis_name=None):
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
  mask = batch.get('mask', jnp.ones(batch['label'].shape, jnp.float32))
  terms = state.loss_fn(state, evaluation_params(state), batch, False, None)
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


def batch_key(state):
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
  depend on the indices alone (MultiMNIST pairs, `capsjax.multimnist`).

  Returns (p_train, p_eval):
    p_train(state, images, labels, indices [D, B/G]) -> (state, metrics), the
      state donated;
    p_eval(state, images, labels, indices [D, B/G], mask [D, B/G]) -> sums.
  D is this process's device count and G that of every process (D = G with one
  process); `capsjax.loop.local_shards` cuts a global batch B so. State, images
  and labels are replicated over the D devices with `replicate`.
  """

  def train(state, images, labels, indices):
    return train_step(state, make_batch(images, labels, indices, batch_key(state)), AXIS_NAME)

  def evaluate(state, images, labels, indices, mask):
    return eval_step(state, {**make_batch(images, labels, indices, None), 'mask': mask},
                     AXIS_NAME)

  pmap = functools.partial(jax.pmap, axis_name=AXIS_NAME, devices=devices)
  return pmap(train, donate_argnums=0), pmap(evaluate)
