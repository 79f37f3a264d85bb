"""The training state: parameters, optimizer state, step, key and the weights' moving average."""

from typing import Any, Callable

import flax
from flax.training import train_state
import jax
import jax.numpy as jnp
import optax

from capsjax import models
from capsjax.errors import InputError
from capsjax.training.config import TrainConfig

LossFn = Callable[..., dict]
# The term of a loss's dict that carries a training forward pass's updated model state
# (see `TrainState.model_state`) out of the loss to `train_step`; not a per-example term.
MODEL_STATE = 'model_state'


def with_model_state(terms: dict, out: models.ModelOutput) -> dict:
  """A loss's per-example `terms`, plus `out`'s updated model state (if any) as MODEL_STATE."""
  return terms if out.model_state is None else {**terms, MODEL_STATE: out.model_state}


class TrainState(train_state.TrainState):
  """Flax's TrainState plus the run's random key and its (static) config and loss.

  rng: the key every random choice of a step derives from (shifts, dropout),
    folded with the step number.
  ema: the `optax.EmaState` of the parameters when config.optimizer.ema_decay > 0,
    else None; `evaluation_params` reads it.
  model_state: the model's collections besides 'params' ({'batch_stats': ...}
    for Efficient-CapsNet's batch normalisation), {} for models without;
    `train_step` updates it from the loss's MODEL_STATE term.
  config: the run's `TrainConfig`.
  loss_fn: the per-example loss, (state, params, batch, train, rng) -> dict of
    float32 [B] holding 'loss' (see `capsjax.tasks`), and in training the forward
    pass's updated model state as MODEL_STATE (`with_model_state`).
  """
  rng: jax.Array = None
  ema: optax.EmaState = None
  model_state: Any = flax.struct.field(default_factory=dict)
  config: TrainConfig = flax.struct.field(pytree_node=False, default=None)
  loss_fn: LossFn = flax.struct.field(pytree_node=False, default=None)

  def forward(self, params, images, decode=None, train=False, rng=None) -> models.ModelOutput:
    """Run the state's model at `params` (see `capsjax.models.Architecture.forward`)."""
    return models.architecture(self.config.model).forward(self.apply_fn, params, images,
                                                          decode, train, rng, self.model_state)


def ema(config: TrainConfig) -> optax.GradientTransformation:
  """The bias-corrected moving average of the parameters that a run evaluates."""
  return optax.ema(config.optimizer.ema_decay, debias=True)


def create_train_state(rng: jax.Array, config: TrainConfig, loss_fn: LossFn,
                       steps_per_epoch: int = None) -> TrainState:
  """Initialise parameters, the optimizer (`TrainConfig.optimizer_transform`) and (if
  configured) the EMA for `config`.

  Args:
    rng: PRNG key; the parameters and every random choice of training derive from it.
    config: a `TrainConfig`.
    loss_fn: the per-example loss, (state, params, batch, train, rng) -> dict of
      float32 [B] holding 'loss' (see `capsjax.tasks`).
    steps_per_epoch: int, optimizer steps per epoch; needed by schedules that
      span the run (lr_schedule 'cosine').

  Returns:
    A `TrainState` on the default device (replicate it for `pmap_steps`).
  """
  model = models.build(config.model)
  params_key, state_key = jax.random.split(rng)
  variables = models.init_variables(model, params_key, config.model.image_shape)
  params = variables.pop('params')
  if variables and config.optimizer.ema_decay:
    # Its running statistics follow the trained weights, not their average.
    raise InputError(f'--ema_decay={config.optimizer.ema_decay} with --model={config.model.name}: '
                     "the moving average of the weights would be evaluated with the batch "
                     "statistics of the trained weights; use --ema_decay=0 with this model.")
  state = TrainState.create(apply_fn=model.apply, params=params, model_state=variables,
                            tx=config.optimizer_transform(steps_per_epoch),
                            rng=state_key, config=config, loss_fn=loss_fn,
                            ema=ema(config).init(params) if config.optimizer.ema_decay else None)
  # An int32 array, as train_step returns it, so the second step does not recompile.
  return state.replace(step=jnp.zeros((), jnp.int32))


def evaluation_params(state: TrainState):
  """The parameters a state is evaluated with: the bias-corrected moving average of
  the trained parameters if ema_decay > 0 (as `optax.ema(decay, debias=True)`
  returns it), else the trained parameters.

  Args:
    state: a `TrainState`.

  Returns:
    A params pytree shaped like state.params.
  """
  if state.ema is None:
    return state.params
  average = optax.tree.bias_correction(state.ema.ema, state.config.optimizer.ema_decay,
                                       state.ema.count)
  # Before the first step there is no average yet (and its correction divides by 0).
  return jax.tree.map(lambda a, p: jnp.where(state.ema.count > 0, a, p), average, state.params)
