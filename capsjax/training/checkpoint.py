"""Per-epoch checkpoints of a TrainState with orbax.

orbax writes each checkpoint to a temporary folder and renames it when complete,
so a run killed at any moment leaves the previous checkpoint readable.
"""

import os

import jax
import orbax.checkpoint as ocp


def _items(state):
  # On the host: orbax writes NumPy arrays once, from the primary process, whereas
  # every process of a multi-host run holds its own single-device copy of the state.
  items = {'params': state.params, 'opt_state': state.opt_state, 'step': state.step,
           'rng': state.rng}
  if state.ema is not None:
    items['ema'] = state.ema
  return jax.device_get(items)


class Checkpointer:
  """Saves and restores the parameters, optimizer state, step, key and EMA, by epoch.

  In a run of several processes every process calls each method: the primary
  one writes, all of them read.
  """

  def __init__(self, directory: str, max_to_keep: int = 2, create: bool = True):
    """directory: folder for the checkpoints; max_to_keep: newest kept; create: make
    the folder if missing (False for a reader, which must not write)."""
    self._manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                             enable_async_checkpointing=False))

  def latest_epoch(self):
    """The last epoch saved completely, or 0 if none."""
    return self._manager.latest_step() or 0

  def save(self, epoch, state):
    """Save a (single-device, not replicated) TrainState as `epoch`."""
    self._manager.save(epoch, args=ocp.args.StandardSave(_items(state)))
    self._manager.wait_until_finished()

  def restore(self, state, epoch=None):
    """Return `state` with the values saved at `epoch` (default: the latest)."""
    epoch = epoch or self.latest_epoch()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _items(state))
    items = self._manager.restore(epoch, args=ocp.args.StandardRestore(abstract))
    return state.replace(**items)

  def close(self):
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()
