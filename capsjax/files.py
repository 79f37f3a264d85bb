"""Files written whole: a reader, or a run resumed after a crash, never sees half of one.

Every file capsjax writes (run.json, metrics.jsonl, pictures, .npz exports,
downloads, benchmark JSON) goes through `atomic_path`: it is written under a
temporary name beside its destination and renamed over it only when complete.
"""

import contextlib
import hashlib
import json
import os
from typing import Any, Iterator, Mapping

import numpy as np

from capsjax.errors import InputError


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = '') -> Iterator[str]:
  """A temporary path to write `path` through, renamed into place on success.

  Args:
    path: the destination file.
    suffix: appended to the temporary name, for writers that infer a format from
      it ('.png', '.npz').

  Yields:
    The temporary path, in the destination's folder (so the rename is atomic).
    If the block raises, the temporary file is removed and `path` is untouched.

  Raises:
    InputError: the destination's folder does not exist.
  """
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    raise InputError(f'{path}: the folder {folder} does not exist; create it or write elsewhere.')
  partial = f'{path}.partial{suffix}'
  try:
    yield partial
    os.replace(partial, path)
  finally:
    if os.path.exists(partial):
      os.remove(partial)


def write_text(path: str, text: str) -> None:
  """Write `text` to `path` atomically."""
  with atomic_path(path) as partial, open(partial, 'w') as f:
    f.write(text)


def write_json(path: str, value: Any) -> None:
  """Write `value` as JSON to `path` atomically; NaN and infinity are refused (not JSON)."""
  # Serialise first, so a value that is not JSON leaves no temporary file behind.
  text = json.dumps(value, indent=1, allow_nan=False)
  write_text(path, text + '\n')


def save_npz(path: str, arrays: Mapping[str, Any]) -> None:
  """Write arrays to a compressed .npz atomically.

  Args:
    path: the .npz file.
    arrays: dict of name -> array-like.
  """
  with atomic_path(path, '.npz') as partial:
    np.savez_compressed(partial, **{name: np.asarray(value) for name, value in arrays.items()})


def file_sha256(path: str) -> str:
  """sha256 hex digest of a file's bytes, read in blocks."""
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()
