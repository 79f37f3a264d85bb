"""Evaluate a trained run on a file of examples: how does the model do on *my* digits?

A file is an .npz holding 'image': uint8 [N, H, W] or [N, H, W, C], pixels 0..255,
and 'label': int [N], class indices; a MultiMNIST run reads 'label' int [N, 2] and
'digits' uint8 [N, 2, H, W, C] too (what `experiments.multimnist --export` writes).
Every experiment takes such a file as --eval_file (see `experiments.common`).
"""

import datetime
import os
from typing import Any, Callable, Dict, Optional, Sequence
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

from capsjax import data, files, tasks
from capsjax.errors import InputError
from capsjax.training import TrainConfig, loop, steps


def _with_channels(array, name, path, count, shape):
  if array.ndim == len(shape) and shape[-1] == 1:  # [N, H, W]: one channel
    array = array[..., None]
  if array.shape[1:] != tuple(shape):
    raise InputError(f'{path}: {name!r} holds {count} of {array.shape[1:]} but the run was '
                     f'trained on {tuple(shape)}; give images of that size and channels.')
  return array


def read_eval_file(path: str, config: TrainConfig, extra_keys: Sequence[str] = (),
                   label_shape: Sequence[int] = ()) -> Dict[str, np.ndarray]:
  """The arrays of an evaluation file, checked against a run's config.

  Args:
    path: an .npz file (see the module docstring).
    config: the run's `capsjax.training.TrainConfig` (image shape, class count).
    extra_keys: further uint8 image arrays the run's loss reads ('digits').
    label_shape: one example's label, () or (2,) (`capsjax.tasks.LABEL_SHAPES`).

  Returns:
    dict: 'image' uint8 [N, H, W, C], 'label' int32 [N] (or [N, 2]) and the extra
    keys, as NumPy arrays.

  Raises:
    InputError: naming the file, what is wrong (not an .npz, a missing key, a
      dtype, a size, labels out of range) and what the file must hold.
  """
  how = "write one with numpy.savez(path, image=..., label=...)"
  try:
    loaded = np.load(path, allow_pickle=False)
  except FileNotFoundError:
    raise InputError(f'--eval_file={path}: no such file.') from None
  except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
    raise InputError(f'{path} is not an .npz of arrays ({type(e).__name__}: {e}); '
                     f'{how}.') from None
  if not isinstance(loaded, np.lib.npyio.NpzFile):  # one array, as numpy.save writes it
    raise InputError(f'{path} holds one array, not an .npz of named arrays; {how}.')
  with loaded as f:
    try:
      arrays = {name: f[name] for name in f.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
      raise InputError(f'{path}: an array cannot be read ({type(e).__name__}: {e}); '
                       f'{how}.') from None
  missing = [name for name in ('image', 'label', *extra_keys) if name not in arrays]
  if missing:
    raise InputError(f'{path} lacks {", ".join(map(repr, missing))} (it holds '
                     f'{sorted(arrays) or "nothing"}); an evaluation file holds image uint8 '
                     f'[N, H, W] or [N, H, W, C] and label int [N].')
  scalars = [name for name, array in arrays.items() if array.ndim == 0]
  if scalars:
    raise InputError(f'{path}: {", ".join(map(repr, scalars))} hold a single value, not one '
                     f'per example; give image uint8 [N, H, W] and label int [N].')
  images, labels = arrays['image'], arrays['label']
  count = len(images)
  if not count:
    raise InputError(f'{path}: no examples to evaluate.')
  for name in ('image', *extra_keys):
    if arrays[name].dtype != np.uint8:
      raise InputError(f'{path}: {name!r} is {arrays[name].dtype}; give uint8 pixels 0..255.')
    if len(arrays[name]) != count:
      raise InputError(f'{path}: {name!r} holds {len(arrays[name])} examples, image {count}.')
  shape = config.model.image_shape
  result = {'image': _with_channels(images, 'image', path, count, shape)}
  for name in extra_keys:
    result[name] = _with_channels(arrays[name], name, path, count,
                                  (arrays[name].shape[1], *shape))
  if not np.issubdtype(labels.dtype, np.integer) or len(labels) != count:
    raise InputError(f'{path}: label is {labels.dtype} {labels.shape}; give {count} integer '
                     f'class indices.')
  data.check_labels(labels, config.model.num_classes, path, label_shape)
  result['label'] = labels.astype(np.int32)
  return result


def _gather(arrays, labels, indices, key=None):
  """A `steps.pmap_steps` batch maker over a dict of uint8 arrays."""
  del key
  return {**{name: array[indices].astype(jnp.float32) / 255.0 for name, array in arrays.items()},
          'label': labels[indices]}


def result_path(workdir: str, path: str) -> str:
  """Where `evaluate_file` writes its JSON: WORKDIR/eval_<file name without .npz>.json."""
  return os.path.join(workdir, f'eval_{os.path.splitext(os.path.basename(path))[0]}.json')


def evaluate_file(workdir: str, path: str, log: Callable[[str], None] = print,
                  run: Optional[tuple] = None) -> Dict[str, Any]:
  """Evaluate the latest checkpoint of the run in `workdir` on the examples in `path`.

  The run's own loss function scores them, at `evaluation_params` (the
  EMA when the run keeps one), over every device. The result is printed and
  written to `result_path(workdir, path)`; nothing is written if anything fails.

  Args:
    workdir: a trained run's folder, or with `run`, the folder the result goes to.
    path: an .npz evaluation file (see the module docstring).
    log: called with the result line.
    run: (config, state, identity) to evaluate instead of the run in `workdir`,
      as `capsjax.tasks.load_run` or `capsjax.pretrained.load_run` return them.

  Returns:
    dict: 'file', 'file_sha256', 'examples', 'epoch', 'step', and the mean of
    every term of the loss ('accuracy', 'loss', ...), 'error'.
  """
  config, state, identity = run or tasks.load_run(workdir)
  arrays = read_eval_file(path, config, tasks.EXTRA_ARRAYS.get(identity['loss'], ()),
                          tasks.LABEL_SHAPES.get(identity['loss'], ()))
  labels = arrays.pop('label')
  count, devices = len(labels), jax.device_count()
  batch_size = -(-config.batch_size // devices) * devices
  _, p_eval = steps.pmap_steps(make_batch=_gather)
  put = steps.replicate
  means = loop.evaluate(p_eval, put(state), put(jax.tree.map(jnp.asarray, arrays)),
                        put(jnp.asarray(labels)), count, batch_size)
  result = {'file': os.path.abspath(path), 'file_sha256': files.file_sha256(path),
            'examples': count,
            'workdir': os.path.abspath(workdir), 'checkpoint': identity['checkpoint'],
            'epoch': identity['epoch'],
            'step': int(state.step), **means, 'error': 1.0 - means['accuracy'],
            'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}
  out = result_path(workdir, path)
  wrote = f'wrote {out}'
  if jax.process_index() == 0:
    try:
      files.write_json(out, result)
    except OSError as e:  # a run one may read but not write: the result still counts
      wrote = f'could not write {out} ({e.strerror})'
  log(f'{path}: accuracy {100 * means["accuracy"]:.2f}% (error {100 * result["error"]:.2f}%) '
      f'on {count} examples, {"" if run else "checkpoint of "}{identity["checkpoint"]}'
      f'{"" if run else " of " + workdir}; {wrote}.')
  return result
