import atexit
import gzip
import os
import pathlib
import shutil
import tempfile

# Many tests compile the same small programs again, in this process and in the training
# processes they start (a resume, an evaluation, each process of a multi-process run), and
# tests on both of pytest-xdist's workers train the same small models, so the session
# shares JAX's persistent compilation cache: a folder made by the first process (xdist's
# controller, whose environment its workers and their subprocesses inherit) and deleted
# when it exits. With a size limit JAX locks the folder (with `filelock`) around each read
# and write, so that no process reads an entry another is still writing; without
# `filelock` each process keeps a folder of its own. Set before JAX is imported.
try:
  import filelock
except ImportError:
  filelock = None
JIT_CACHE = os.environ.get('CAPSJAX_TESTS_JIT_CACHE') if filelock else None
if not JIT_CACHE:
  JIT_CACHE = tempfile.mkdtemp(prefix='capsjax-tests-jit-')
  atexit.register(shutil.rmtree, JIT_CACHE, ignore_errors=True)
  if filelock:
    os.environ['CAPSJAX_TESTS_JIT_CACHE'] = JIT_CACHE
    os.environ['JAX_COMPILATION_CACHE_MAX_SIZE'] = str(16 << 30)  # a limit never reached
os.environ.update(JAX_COMPILATION_CACHE_DIR=JIT_CACHE,
                  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
                  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='-1')

import numpy as np  # noqa: E402  (after the cache's settings)
import pytest  # noqa: E402

from capsjax import data  # noqa: E402
from capsjax.data import mnist  # noqa: E402

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


def find_mnist(shared=MNIST_DIR, environ=os.environ, download=mnist.download):
  """The folder of the real MNIST files, from the first source there is.

  Args:
    shared: the workspace's copy (../shared/data/mnist beside the repository).
    environ: environment variables; $CAPSJAX_DATA_DIR names a folder of the files.
    download: callable('mnist') -> folder, the checksummed download into the cache.

  Returns:
    str, a folder holding the four IDX files (raw or .gz).

  Raises:
    pytest's failure, saying what was tried, when no source works.
  """
  if pathlib.Path(shared).is_dir():
    return str(shared)
  if environ.get(data.DATA_DIR_ENV):
    return environ[data.DATA_DIR_ENV]
  try:
    return download('mnist')
  except (data.DataError, OSError) as e:
    pytest.fail(f'these tests need the real MNIST files: {shared} does not exist, '
                f'${data.DATA_DIR_ENV} is not set, and the checksummed download failed ({e}). '
                f'Set {data.DATA_DIR_ENV} to a folder of the four IDX files, or give this '
                f'machine network access.')


@pytest.fixture(scope='session')
def mnist_dir():
  return find_mnist()
