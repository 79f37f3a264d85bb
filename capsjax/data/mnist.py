"""MNIST-format datasets (MNIST, Fashion-MNIST): IDX files, tfds, or a checksummed download.

Where the data comes from, first that works:
  1. `data_dir` (or the environment variable CAPSJAX_DATA_DIR): the four IDX files,
     raw or .gz. Files that are there but wrong stop with a `DataError`.
  2. The folder an OS package installs (Debian's dataset-fashion-mnist).
  3. tensorflow-datasets, when installed (the tfds extra: `pip install -e '.[tfds]'`).
  4. A direct download into `cache_dir`, verified by sha256 of the uncompressed files.
"""

import dataclasses
import gzip
import hashlib
import os
import shutil
import struct
from typing import Callable, Optional, Sequence
import urllib.request
import zlib

import numpy as np

from capsjax.errors import InputError
from capsjax.files import atomic_path

DATA_DIR_ENV = 'CAPSJAX_DATA_DIR'
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser('~'), '.cache', 'capsjax')
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049
SPLIT_FILES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}


class DataError(InputError):
  """Data missing or malformed; the message names the file and the fix."""


@dataclasses.dataclass(frozen=True)
class DatasetSource:
  """Where a dataset lives; sha256 digests are of the uncompressed IDX files."""
  tfds_name: str
  url: str
  sha256: dict
  system_dir: str = ''
  num_classes: int = 10


DATASETS = {
    # Digests from the MNIST README in shared/data/mnist (the canonical content).
    'mnist': DatasetSource(
        tfds_name='mnist',
        url='https://storage.googleapis.com/cvdf-datasets/mnist/',
        sha256={
            'train-images-idx3-ubyte':
                'ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db',
            'train-labels-idx1-ubyte':
                '65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5',
            't10k-images-idx3-ubyte':
                '0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7',
            't10k-labels-idx1-ubyte':
                'ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2',
        }),
    # Digests computed from Debian's dataset-fashion-mnist (0.0~git20200523).
    'fashion_mnist': DatasetSource(
        tfds_name='fashion_mnist',
        url='http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/',
        sha256={
            'train-images-idx3-ubyte':
                'c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888',
            'train-labels-idx1-ubyte':
                'bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9',
            't10k-images-idx3-ubyte':
                '5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b',
            't10k-labels-idx1-ubyte':
                '0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34',
        },
        system_dir='/usr/share/datasets/fashion-mnist'),
}


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A dataset in memory: uint8 images [N, H, W, 1] and int32 labels [N] per split."""
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  source: str


def _idx_path(directory, name):
  for candidate in (name, name + '.gz'):
    path = os.path.join(directory, candidate)
    if os.path.isfile(path):
      return path
  raise DataError(f'{os.path.join(directory, name)}[.gz]: file not found.')


def _read_bytes(path):
  try:
    with (gzip.open(path, 'rb') if path.endswith('.gz') else open(path, 'rb')) as f:
      return f.read()
  except (OSError, EOFError, zlib.error) as e:
    raise DataError(f'{path}: cannot be read ({e}); the file is corrupt or truncated, '
                    f'replace it with a fresh copy.') from None


def parse_idx(data: bytes, path: str, expected_magic: int) -> np.ndarray:
  """Parse the bytes of an IDX file (big-endian uint8 data), checking header and size.

  Args:
    data: the file's (uncompressed) bytes.
    path: its name, for error messages.
    expected_magic: 2051 for images, 2049 for labels.

  Returns:
    uint8 array of the shape the header gives: [N, rows, cols] or [N].
  """
  if len(data) < 4:
    raise DataError(f'{path}: only {len(data)} bytes, too short for an IDX header.')
  (magic,) = struct.unpack('>I', data[:4])
  if magic != expected_magic:
    kind = 'images' if expected_magic == IMAGES_MAGIC else 'labels'
    raise DataError(f'{path}: magic number {magic}, expected {expected_magic} for IDX '
                    f'{kind}; this is not an MNIST-format {kind} file.')
  ndim = magic & 0xFF
  header = 4 + 4 * ndim
  if len(data) < header:
    raise DataError(f'{path}: truncated inside its header ({len(data)} bytes).')
  shape = struct.unpack(f'>{ndim}I', data[4:header])
  expected = header + int(np.prod(shape))
  if len(data) != expected:
    raise DataError(f'{path}: header says {" x ".join(map(str, shape))} so {expected} bytes, '
                    f'but the file holds {len(data)}: it is truncated or corrupt.')
  return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def read_idx(path: str, expected_magic: int) -> np.ndarray:
  """Read one IDX file (raw or .gz); see `parse_idx`."""
  return parse_idx(_read_bytes(path), path, expected_magic)


def _split(directory, split, num_classes):
  images_name, labels_name = SPLIT_FILES[split]
  images_path = _idx_path(directory, images_name)
  labels_path = _idx_path(directory, labels_name)
  images = read_idx(images_path, IMAGES_MAGIC)
  labels = read_idx(labels_path, LABELS_MAGIC)
  if len(images) != len(labels):
    raise DataError(f'{images_path} holds {len(images)} images but {labels_path} holds '
                    f'{len(labels)} labels: the two files are from different sets.')
  check_labels(labels, num_classes, labels_path)
  return images[..., None], labels.astype(np.int32)


def check_labels(labels: np.ndarray, num_classes: int, where: str,
                 label_shape: Sequence[int] = ()) -> None:
  """Raise DataError unless `labels` are integer class indices of one shape, each in range.

  Args:
    labels: array [N, *label_shape].
    num_classes: every label must lie in [0, num_classes).
    where: names the labels' source in the message.
    label_shape: one example's label: () for a class index, (2,) for MultiMNIST's pair.
  """
  labels = np.asarray(labels)
  if labels.ndim == 0 or labels.shape[1:] != tuple(label_shape):
    wanted = f'[N, {", ".join(map(str, label_shape))}]' if label_shape else '[N]'
    raise DataError(f'{where}: labels are shaped {list(labels.shape)}; this run needs {wanted} '
                    f'integer class indices.')
  if not np.issubdtype(labels.dtype, np.integer):
    raise DataError(f'{where}: labels are {labels.dtype}; give integer class indices.')
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise DataError(f'{where}: labels span {labels.min()}..{labels.max()}, outside '
                    f'0..{num_classes - 1}; give class indices of the {num_classes} classes.')


def load_idx_dir(directory: str, num_classes: int = 10, source: Optional[str] = None) -> Dataset:
  """Load the four IDX files of an MNIST-format dataset from a folder.

  Args:
    directory: folder holding train-images-idx3-ubyte, train-labels-idx1-ubyte,
      t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte, each raw or .gz.
    num_classes: labels must lie in [0, num_classes).

  Returns:
    A `Dataset`.

  Raises:
    DataError: a file is missing, truncated, corrupt or inconsistent.
  """
  if not os.path.isdir(directory):
    raise DataError(f'{directory}: no such folder.')
  train = _split(directory, 'train', num_classes)
  test = _split(directory, 'test', num_classes)
  return Dataset(*train, *test, num_classes=num_classes, source=source or directory)


def known_dataset(directory: str) -> Optional[str]:
  """Which of DATASETS a folder holds, told by its training labels file (a few KB), or None.

  Their file names are the same, so a folder of MNIST must not pass for
  Fashion-MNIST; a folder of other data (a subset, your own) is None.

  Args:
    directory: folder of IDX files.

  Returns:
    A key of DATASETS, or None (not one of them, or no readable labels file).
  """
  labels = 'train-labels-idx1-ubyte'
  try:
    digest = content_sha256(_idx_path(directory, labels))
  except (OSError, DataError, zlib.error, EOFError):
    return None
  return next((name for name, source in DATASETS.items() if source.sha256[labels] == digest),
              None)


def content_sha256(path: str) -> str:
  """sha256 of an IDX file's uncompressed content (what DATASETS' digests are of).

  Raises:
    DataError: the file cannot be read or decompressed (truncated, corrupt).
  """
  return hashlib.sha256(_read_bytes(path)).hexdigest()


def _holds(path, digest):
  """Whether `path` is a readable file whose uncompressed content has `digest`."""
  try:
    return os.path.isfile(path) and content_sha256(path) == digest
  except DataError:  # a truncated or corrupt copy: fetch it again
    return False


def download(name: str, cache_dir: str = DEFAULT_CACHE_DIR, base_url: Optional[str] = None) -> str:
  """Download a dataset's four .gz files into cache_dir/name, verifying each.

  A file already there with the right digest is not fetched again; one that is
  not (another content, or truncated so that it does not decompress) is. A new
  file is written under a temporary name and moved into place only once verified.

  Args:
    name: a key of DATASETS.
    cache_dir: parent folder of the per-dataset cache.
    base_url: where the files are (default: the dataset's public mirror).

  Returns:
    The folder holding the verified files.
  """
  source = DATASETS[name]
  target = os.path.join(cache_dir, name)
  os.makedirs(target, exist_ok=True)
  for file_name, digest in source.sha256.items():
    path = os.path.join(target, file_name + '.gz')
    if _holds(path, digest):
      continue
    url = (base_url or source.url) + file_name + '.gz'
    with atomic_path(path, '.gz') as partial:
      with open(partial, 'wb') as out, urllib.request.urlopen(url, timeout=60) as response:
        shutil.copyfileobj(response, out)
      actual = content_sha256(partial)
      if actual != digest:
        raise DataError(f'{url}: sha256 of the content is {actual}, expected {digest}; '
                        f'the download is corrupt or the mirror changed.')
  return target


def _load_tfds(name, num_classes):
  import tensorflow_datasets as tfds  # optional: pip install -e '.[tfds]'
  splits = tfds.as_numpy(tfds.load(DATASETS[name].tfds_name, split=['train', 'test'],
                                    batch_size=-1, as_supervised=True))
  (train_x, train_y), (test_x, test_y) = splits
  for split, labels in (('train', train_y), ('test', test_y)):
    check_labels(labels, num_classes, f'tfds {name} {split}')
  return Dataset(train_x, train_y.astype(np.int32), test_x, test_y.astype(np.int32),
                 num_classes, source='tfds')


def how_to_provide(name: str) -> str:
  """One paragraph telling a user how to make a dataset available offline."""
  source = DATASETS[name]
  files = ', '.join(f + '.gz' for f in source.sha256)
  return (f'No source of {name!r} worked. Put the four IDX files ({files}) in a folder '
          f'and pass --data_dir=FOLDER or set {DATA_DIR_ENV}=FOLDER; they can be fetched '
          f'from {source.url} on a machine with network access'
          + (f', or installed by the OS package that fills {source.system_dir} '
             f'(Debian: apt-get install dataset-{name.replace("_", "-")})'
             if source.system_dir else '')
          + ". With network access, the tfds extra (pip install -e '.[tfds]') or a plain run "
          f'downloads them into {DEFAULT_CACHE_DIR}.')


def load_dataset(name: str = 'mnist', data_dir: Optional[str] = None,
                 cache_dir: str = DEFAULT_CACHE_DIR,
                 log: Callable[[str], None] = print) -> Dataset:
  """Load a dataset from the first source that works (see the module docstring).

  Args:
    name: 'mnist' or 'fashion_mnist'.
    data_dir: folder of IDX files; None to use CAPSJAX_DATA_DIR or the fallbacks.
    cache_dir: where downloads go.
    log: called with a line about each source that failed and the one used.

  Returns:
    A `Dataset`.

  Raises:
    DataError: an explicit folder is bad, or no source worked.
  """
  if name not in DATASETS:
    raise DataError(f'unknown dataset {name!r}; choose one of {sorted(DATASETS)}.')
  source = DATASETS[name]
  data_dir = data_dir or os.environ.get(DATA_DIR_ENV)
  if data_dir:  # the user's explicit choice: its errors are final
    holds = known_dataset(data_dir)
    if holds not in (None, name):
      raise DataError(f'{data_dir} holds the {holds} files, not {name}; pass --data_dir with '
                      f'the {name} files, or unset {DATA_DIR_ENV} if it named that folder.')
    return load_idx_dir(data_dir, source.num_classes)
  if source.system_dir and os.path.isdir(source.system_dir):
    return load_idx_dir(source.system_dir, source.num_classes)
  failures = []
  try:
    return _load_tfds(name, source.num_classes)
  except DataError:  # tfds worked but its data is wrong: say so, don't fall back
    raise
  except Exception as e:  # tfds missing, offline, or its builder failed
    failures.append(f'tfds: {type(e).__name__}: {e}'.splitlines()[0])
  try:
    return load_idx_dir(download(name, cache_dir), source.num_classes,
                        source=f'download ({cache_dir})')
  except (OSError, DataError) as e:
    failures.append(f'download: {e}'.splitlines()[0])
  for failure in failures:
    log(f'  {failure}')
  raise DataError(how_to_provide(name))
