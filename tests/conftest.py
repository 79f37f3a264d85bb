import gzip
import os
import pathlib

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
MNIST_DIR = REPO.parent / 'shared' / 'data' / 'mnist'


def write_idx(path, array, magic=None):
  """Write an IDX file (gzipped if path ends in .gz) the way the MNIST files are laid out."""
  array = np.asarray(array, np.uint8)
  magic = magic if magic is not None else 0x800 + array.ndim
  header = magic.to_bytes(4, 'big') + b''.join(d.to_bytes(4, 'big') for d in array.shape)
  payload = header + array.tobytes()
  opener = gzip.open if str(path).endswith('.gz') else open
  with opener(path, 'wb') as f:
    f.write(payload)


def write_dataset(directory, num_train=64, num_test=40, size=28, gz=True, seed=0):
  """A small MNIST-format dataset whose label is readable from the image (a bright square)."""
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  suffix = '.gz' if gz else ''
  for prefix, count in (('train', num_train), ('t10k', num_test)):
    labels = rng.integers(0, 10, size=count)
    images = (rng.uniform(size=(count, size, size)) * 40).astype(np.uint8)
    for n, label in enumerate(labels):
      row, col = 6 + 4 * (label // 4), 6 + 4 * (label % 4)
      images[n, row:row + 4, col:col + 4] = 255
    write_idx(os.path.join(directory, f'{prefix}-images-idx3-ubyte{suffix}'), images)
    write_idx(os.path.join(directory, f'{prefix}-labels-idx1-ubyte{suffix}'), labels)
  return directory


@pytest.fixture
def tiny_dataset(tmp_path):
  return write_dataset(str(tmp_path / 'data'))


@pytest.fixture
def mnist_dir():
  if not MNIST_DIR.is_dir():
    pytest.fail(f'the real MNIST files are expected in {MNIST_DIR}')
  return str(MNIST_DIR)
