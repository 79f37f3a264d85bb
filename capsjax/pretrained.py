"""Trained weights shipped with capsjax, loaded in a line.

    model, params = capsjax.pretrained.load('mnist')
    out = model.apply({'params': params}, images)  # images float32 [N, 28, 28, 1] in [0, 1]
    predictions = out.lengths.argmax(-1)

Each shipped file is an .npz of plain arrays (read without pickle): one array
per parameter, named by its path in the tree ('params/conv1/kernel'), stored
as float32, or as bfloat16 bits in uint16 when float32 would not fit the
repository's 20 MB; 'run.json', the run's settings and dataset as
`capsjax.training` records them; and 'about.json', where the weights come
from (run, epoch, device, date) and their test accuracy measured after the
cast. `experiments.export_weights` writes such a file from a trained run.
"""

import json
import os
from typing import Any, Dict, Mapping, NamedTuple, Tuple
import zipfile
import zlib

import flax
from flax import linen as nn
import jax
import ml_dtypes
import numpy as np

from capsjax import files, models, tasks
from capsjax.errors import InputError
from capsjax.training import create_train_state, rundir

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'weights')
# What a shipped file may weigh: the repository's limit for one file.
MAX_BYTES = 20 * 10**6
STORED_DTYPES = ('float32', 'bfloat16')
_RUN_KEY, _ABOUT_KEY, _PARAMS = 'run.json', 'about.json', 'params/'


class Shipped(NamedTuple):
  """One shipped weights file: its name in `WEIGHTS_DIR` and the sha256 of its bytes."""
  file: str
  sha256: str


# By the dataset they were trained on.
SHIPPED: Dict[str, Shipped] = {
    # The paper's CapsNet and recipe, seed 0, all 50 epochs (on a GPU): 99.60% test
    # accuracy, 99.61% stored as bfloat16; docs/results/mnist.md has the run.
    'mnist': Shipped('mnist_capsnet.npz',
                     'eeb9fa868b9b42c8766191c653e5b50bee465db8cc106827c71ae8a6f3232402'),
}


def save(path: str, params: Mapping[str, Any], identity: Mapping[str, Any],
         about: Mapping[str, Any], dtype: str = 'float32', max_bytes: int = MAX_BYTES) -> int:
  """Write a weights file (see the module docstring) atomically.

  Args:
    path: the .npz to write.
    params: the parameter tree, float arrays.
    identity: the run's run.json dict (`capsjax.training.rundir.run_identity`).
    about: JSON values describing the weights (source run, accuracy, date).
    dtype: 'float32' or 'bfloat16', how the parameters are stored.
    max_bytes: the largest file to write.

  Returns:
    The file's size in bytes.

  Raises:
    InputError: an unknown dtype, or a file over max_bytes (nothing is written).
  """
  if dtype not in STORED_DTYPES:
    raise InputError(f'weights dtype {dtype!r}: give one of {", ".join(STORED_DTYPES)}.')
  arrays = {_PARAMS + name: _stored(np.asarray(value), dtype) for name, value in
            flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep='/').items()}
  arrays[_RUN_KEY] = np.array(json.dumps(dict(identity), sort_keys=True))
  arrays[_ABOUT_KEY] = np.array(json.dumps({**about, 'dtype': dtype}, sort_keys=True))
  with files.atomic_path(path, '.npz') as partial:
    np.savez_compressed(partial, **arrays)
    size = os.path.getsize(partial)
    if size > max_bytes:
      raise InputError(f'{path} would be {size / 1e6:.1f} MB as {dtype}, over the '
                       f'{max_bytes / 1e6:g} MB allowed; store it as bfloat16 or allow more.')
  return size


def _stored(array: np.ndarray, dtype: str) -> np.ndarray:
  """`array` as a file stores it: float32, or bfloat16 (rounded to nearest) bits in uint16."""
  array = np.asarray(array, np.float32)
  return array.astype(ml_dtypes.bfloat16).view(np.uint16) if dtype == 'bfloat16' else array


def _unstored(array: np.ndarray, dtype: str) -> np.ndarray:
  """The float32 values of an array `_stored` as `dtype`."""
  return (array.view(ml_dtypes.bfloat16) if dtype == 'bfloat16' else array).astype(np.float32)


def rounded(params: Mapping[str, Any], dtype: str) -> Dict[str, Any]:
  """The float32 parameters a file storing `params` as `dtype` gives back.

  Args:
    params: a parameter tree.
    dtype: 'float32' or 'bfloat16'.

  Returns:
    The tree of float32 NumPy arrays `read` returns for such a file.
  """
  return jax.tree.map(lambda p: _unstored(_stored(p, dtype), dtype), params)


def read(path: str) -> Tuple[Dict[str, Any], dict, dict]:
  """Read a weights file.

  Args:
    path: an .npz that `save` wrote.

  Returns:
    (params, identity, about): the parameter tree as float32 NumPy arrays, the
    run.json dict and the about dict.

  Raises:
    InputError: not such a file.
  """
  how = 'write one with python -m experiments.export_weights'
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {name: f[name] for name in f.files}
    identity = json.loads(str(arrays[_RUN_KEY]))
    about = json.loads(str(arrays[_ABOUT_KEY]))
  except KeyError as e:
    raise InputError(f'{path}: not a capsjax weights file (it lacks {e}); {how}.') from None
  except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
    raise InputError(f'{path}: not a capsjax weights file ({type(e).__name__}: {e}); '
                     f'{how}.') from None
  if about.get('dtype') not in STORED_DTYPES:
    raise InputError(f'{path}: its parameters are stored as {about.get("dtype")!r}, which this '
                     f'version does not read ({", ".join(STORED_DTYPES)}).')
  flat = {name[len(_PARAMS):]: _unstored(array, about['dtype']) for name, array in
          arrays.items() if name.startswith(_PARAMS)}
  return flax.traverse_util.unflatten_dict(flat, sep='/'), identity, about


def shipped_path(name: str) -> str:
  """The path of shipped weights `name`, its sha256 checked.

  Raises:
    InputError: no such weights, or a file whose bytes are not the shipped ones.
  """
  if name not in SHIPPED:
    raise InputError(f'no shipped weights for {name!r}; there are: '
                     f'{", ".join(sorted(SHIPPED)) or "none"}.')
  path = os.path.join(WEIGHTS_DIR, SHIPPED[name].file)
  if not os.path.isfile(path):
    raise InputError(f'{path} is missing from this installation; reinstall capsjax from its '
                     f'repository.')
  digest = files.file_sha256(path)
  if digest != SHIPPED[name].sha256:
    raise InputError(f'{path}: sha256 {digest} is not the shipped file\'s '
                     f'{SHIPPED[name].sha256}; it is damaged or a Git LFS pointer: fetch '
                     f'it again.')
  return path


def load(name: str = 'mnist') -> Tuple[nn.Module, Dict[str, Any]]:
  """The shipped model trained on dataset `name`, and its parameters.

  Args:
    name: the dataset, a key of `SHIPPED` ('mnist').

  Returns:
    (model, params): the Flax module (a `capsjax.CapsNet` for 'mnist') and its
    parameters, float32 arrays; `model.apply({'params': params}, images)` with
    images float32 [N, H, W, C] in [0, 1].
  """
  params, identity, _ = read(shipped_path(name))
  return models.build(rundir.config_from_identity(identity).model), jax.tree.map(
      np.asarray, params)


def load_run(name: str = 'mnist'):
  """The shipped weights `name` as a trained run: what `capsjax.tasks.load_run` returns.

  Returns:
    (config, state, identity): the run's `TrainConfig` (with its moving average
    off, the shipped parameters being those evaluated), a single-device
    `TrainState` holding the parameters, and the run.json dict with 'checkpoint'
    describing the weights.
  """
  path = shipped_path(name)
  params, identity, about = read(path)
  config = rundir.config_from_identity({**identity, 'ema_decay': 0.0})
  state = create_train_state(jax.random.PRNGKey(0), config, tasks.loss_by_name(identity['loss']),
                             identity['train_examples'] // config.batch_size)
  state = state.replace(params=jax.tree.map(jax.numpy.asarray, params))
  described = (f'the shipped weights {os.path.basename(path)} (epoch {about["epoch"]}, '
               f'{about["dtype"]})')
  return config, state, {**identity, 'epoch': about['epoch'], 'checkpoint': described}
