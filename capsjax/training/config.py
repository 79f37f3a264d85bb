"""A training run's configuration, nested: model / optimizer / data / run, and the named recipes.

    TrainConfig(model=ModelConfig(routing_iters=1), optimizer=OptimizerConfig(learning_rate=2e-3))

Every leaf is a flag of the same name (`capsjax.settings`), so a config and a
command line say the same thing; a config validates itself when it is made.
The defaults are the paper's MNIST recipe. Everything but `run` defines what a
run computes and is recorded in its run.json (`capsjax.training.rundir`).
"""

import dataclasses

import jax
import optax

from capsjax import settings
from capsjax.errors import InputError
from capsjax.models import ModelConfig
from capsjax.settings import setting

LR_SCHEDULES = ('exponential', 'cosine')


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Adam, its learning rate schedule, weight decay and the evaluated moving average.

  lr_schedule: 'exponential', the paper's lr * lr_decay ** (step / lr_decay_steps),
    or 'cosine': a linear warm-up from 0 to learning_rate over warmup_epochs, then
    a cosine decay to 0 at the end of the last epoch (its length is the run's).
  ema_decay: evaluate (and checkpoint) an exponential moving average of the
    parameters with this decay, bias-corrected as `optax.ema` does (0: evaluate
    the trained parameters themselves).
  weight_decay: decoupled weight decay of the kernels (not the biases), as in
    `optax.adamw`: each step subtracts learning rate * weight_decay * kernel
    (0: plain Adam, the paper's).
  """
  learning_rate: float = setting(1e-3, 'Adam learning rate.', lower=0)
  lr_decay: float = setting(0.96, 'Learning rate factor per --lr_decay_steps steps (exponential '
                            'decay).', lower=0, upper=1)
  lr_decay_steps: int = setting(2000, 'Steps per --lr_decay.', lower=1)
  lr_schedule: str = setting('exponential', "exponential (the paper's, by --lr_decay) or cosine "
                             '(a linear warm-up over --warmup_epochs, then a cosine decay to 0 at '
                             "the last epoch's end; such a run resumes only with the same "
                             '--epochs).', choices=LR_SCHEDULES)
  warmup_epochs: float = setting(0.0, 'Epochs of linear learning rate warm-up (cosine schedule).',
                                 lower=0)
  ema_decay: float = setting(0.0, 'Evaluate an exponential moving average of the weights with '
                             'this decay (0: the trained weights).', lower=0, below=1)
  weight_decay: float = setting(0.0, "Decoupled weight decay of the kernels, as AdamW (0: Adam, "
                                "the paper's).", lower=0)

  def __post_init__(self):
    settings.validate(self)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """How much of the data a run uses, and its augmentation.

  The *_examples settings are what the flags ask for (0: all, or none held
  out); run.json records the counts they resolve to.
  """
  shift_pixels: int = setting(2, 'Random shifts of up to this many pixels (0: none).', lower=0)
  train_examples: int = setting(0, 'Train on the first N examples (0: all).', lower=0)
  validation_examples: int = setting(0, 'Hold out the last N training examples and evaluate them '
                                     'every epoch, to choose settings by (0: none).', lower=0)
  test_examples: int = setting(0, 'Evaluate on the first N examples (0: all).', lower=0)

  def __post_init__(self):
    settings.validate(self)


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """How a run reports; nothing here changes what it computes."""
  progress_seconds: float = setting(20.0, 'Seconds between progress lines within an epoch.',
                                    lower=0)
  checkpoint_every_minutes: float = setting(
      10.0, 'Minutes between checkpoints inside an epoch, besides the one at each epoch end (0: '
      'at epoch ends only). A stopped run loses at most this much training.', lower=0)

  def __post_init__(self):
    settings.validate(self)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything a training run is configured by; the defaults are the paper's MNIST recipe."""
  model: ModelConfig = ModelConfig()
  optimizer: OptimizerConfig = OptimizerConfig()
  data: DataConfig = DataConfig()
  run: RunConfig = RunConfig()
  epochs: int = setting(50, 'Training epochs.', lower=0)
  batch_size: int = setting(128, 'Global batch size, split evenly over the devices.', lower=1)
  seed: int = setting(0, 'Seed for the initialisation, order and shifts.', lower=0,
                      upper=2**32 - 1)
  stop_at_validation_accuracy: float = setting(
      0.0, 'End training after the first epoch whose validation accuracy reaches this fraction, '
      'e.g. 0.99 (needs --validation_examples; 0: train all --epochs).', lower=0, upper=1)

  def __post_init__(self):
    settings.validate(self)
    if self.stop_at_validation_accuracy and not self.data.validation_examples:
      raise InputError(f'--stop_at_validation_accuracy={self.stop_at_validation_accuracy:g} '
                       f'needs a validation split to measure; add --validation_examples=5000.')

  @classmethod
  def create(cls, **flat_values) -> 'TrainConfig':
    """The default config with leaves set by flag name, e.g. create(model='baseline', epochs=3)."""
    return cls().replace(**flat_values)

  def replace(self, **flat_values) -> 'TrainConfig':
    """This config with leaves replaced by flag name, e.g. replace(routing_iters=1, epochs=3)."""
    current = settings.flatten(self)
    unknown = set(flat_values) - set(current)
    if unknown:
      raise InputError(f'no such settings: {", ".join(sorted(unknown))}.')
    return settings.unflatten(TrainConfig, {**current, **flat_values})

  def flat(self) -> dict:
    """Every leaf by flag name, the run settings left out: what run.json records."""
    return {name: value for name, value in settings.flatten(self).items()
            if name not in settings.flatten(RunConfig())}

  @classmethod
  def from_flat(cls, flat: dict) -> 'TrainConfig':
    """The config whose leaves a flat dict (a run.json, a recipe) names; others keep defaults."""
    return settings.unflatten(cls, flat)

  def learning_rate_schedule(self, steps_per_epoch=None):
    """The optax schedule of the learning rate, step -> float.

    Args:
      steps_per_epoch: int, optimizer steps in an epoch; the cosine schedule
        needs it to fit the run's length, the exponential one ignores it.
    """
    opt = self.optimizer
    if opt.lr_schedule == 'exponential':
      return optax.exponential_decay(opt.learning_rate, opt.lr_decay_steps, opt.lr_decay)
    if not steps_per_epoch:
      raise InputError("the 'cosine' learning rate schedule spans the run: give the steps "
                       'per epoch (create_train_state(..., steps_per_epoch=N)).')
    total = max(self.epochs * steps_per_epoch, 1)
    warmup = min(round(opt.warmup_epochs * steps_per_epoch), total - 1)
    return optax.warmup_cosine_decay_schedule(0.0, opt.learning_rate, warmup, total)

  def optimizer_transform(self, steps_per_epoch=None) -> optax.GradientTransformation:
    """Adam on `learning_rate_schedule`, with decoupled weight decay of the kernels
    (parameters of 2 or more dimensions) if weight_decay > 0.

    Args:
      steps_per_epoch: int, optimizer steps in an epoch (see `learning_rate_schedule`).
    """
    schedule = self.learning_rate_schedule(steps_per_epoch)
    if not self.optimizer.weight_decay:
      return optax.adam(schedule)
    # Biases only shift activations; decaying them regularises nothing.
    return optax.adamw(schedule, weight_decay=self.optimizer.weight_decay,
                       mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params))

  def resumable_settings(self) -> tuple:
    """Names of the settings a resume of this run may change, those that say how long it
    trains: `epochs` (unless the learning rate schedule is fitted to the run's length)
    and `stop_at_validation_accuracy`."""
    longer = ('epochs',) if self.optimizer.lr_schedule == 'exponential' else ()
    return (*longer, 'stop_at_validation_accuracy')


# Named recipes: settings each sets, by flag name (flags given explicitly win).
RECIPES = {
    # The paper's: the TrainConfig defaults.
    'paper': {},
    # The paper's model and shifts in about 90 minutes of a 2-core CPU's training
    # (docs/results/mnist.md): batches of 64, a higher peak rate warmed up over an epoch
    # and decayed to zero by the last step, and evaluation on a moving average of the
    # weights. 12 epochs of all 60,000 training images are 11,244 steps, about the 11,167
    # of the 13-epoch runs on 55,000 (a 5,000-image validation split held out) that
    # chose its settings.
    'fast': {'epochs': 12, 'batch_size': 64, 'learning_rate': 2e-3, 'lr_schedule': 'cosine',
             'warmup_epochs': 1.0, 'ema_decay': 0.999},
    # Efficient-CapsNet with its authors' optimizer and batch on MNIST (their code's
    # config.json: Adam at 5e-4, x0.97 an epoch, batches of 16, 150 epochs; its
    # reconstruction weight 0.392 on the mean squared error is this project's 0.0005 on
    # the sum over 784 pixels). An epoch of 60,000 images is 3,750 steps. Unlike theirs:
    # the rate decays smoothly and past their floor of 5e-5 (reached at epoch 76), and
    # the data are augmented by this project's 2-pixel shifts, not their rotations of up
    # to 30 degrees, shifts, squeezes and erasures.
    'efficient_capsnet': {'model': 'efficient_capsnet', 'epochs': 150, 'batch_size': 16,
                          'learning_rate': 5e-4, 'lr_decay': 0.97, 'lr_decay_steps': 3750},
}
