"""The tasks a model is trained on, each a per-example loss and its metrics.

A loss function is (state, params, batch, train, rng) -> dict of float32 [B]
holding 'loss' (what training minimises) and 'accuracy'; run.json records it
by name, and `load_run` finds it again by that name.
"""

from typing import Optional

import jax

from capsjax.errors import InputError
from capsjax.tasks.classification import classification_losses
from capsjax.tasks.multimnist import multimnist_losses
from capsjax.training import rundir
from capsjax.training.state import LossFn

# The loss functions, by the name run.json records.
LOSSES = {fn.__name__: fn for fn in (classification_losses, multimnist_losses)}
# What one example's label is, and which further arrays an evaluation file
# holds, for a run trained with each loss (`capsjax.analysis.evaluate`).
LABEL_SHAPES = {classification_losses.__name__: (), multimnist_losses.__name__: (2,)}
EXTRA_ARRAYS = {multimnist_losses.__name__: ('digits',)}


def loss_by_name(name: str, workdir: str = '') -> LossFn:
  """The registered loss function `name`, or InputError naming the ones there are."""
  if name not in LOSSES:
    raise InputError(f'{workdir}: its loss {name!r} is none of {sorted(LOSSES)}; pass the '
                     f'function itself, as load_run(workdir, loss_fn).')
  return LOSSES[name]


def load_run(workdir: str, loss_fn: Optional[LossFn] = None):
  """The settings and latest checkpointed state of the run in `workdir`.

  Args:
    workdir: a folder `capsjax.training.train_and_evaluate` wrote.
    loss_fn: the run's loss function; None: the one run.json names, if it is
      one of `LOSSES` (give your own if you trained with another).

  Returns:
    (config, state, identity): the `TrainConfig`, the single-device `TrainState`
    of the latest checkpoint, and the run.json dict with 'epoch' added.

  Raises:
    InputError: no run or no complete checkpoint in workdir, or a loss of its
      own not given.
  """
  identity = rundir.load_run_identity(workdir)
  loss_fn = loss_fn or loss_by_name(identity.get('loss'), workdir)
  return rundir.restore_run(workdir, identity, loss_fn, jax.random.PRNGKey(0))
