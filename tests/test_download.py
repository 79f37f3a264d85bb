"""The checksummed download replaces a damaged cached copy instead of failing on it."""

import os

from capsjax.data import mnist
from tests.test_data import gzipped_mirror

LABELS = 'train-labels-idx1-ubyte'


def test_a_truncated_cached_file_is_downloaded_again(tmp_path, mnist_dir):
  mirror = gzipped_mirror(mnist_dir, str(tmp_path / 'mirror'))
  cache = tmp_path / 'cache'
  os.makedirs(cache / 'mnist')
  with open(os.path.join(mirror, LABELS + '.gz'), 'rb') as f:
    whole = f.read()
  (cache / 'mnist' / (LABELS + '.gz')).write_bytes(whole[:len(whole) // 2])  # a cut-off copy
  target = mnist.download('mnist', str(cache), base_url='file://' + mirror + '/')
  assert (cache / 'mnist' / (LABELS + '.gz')).read_bytes() == whole
  dataset = mnist.load_idx_dir(target)
  assert len(dataset.train_labels) == 60000
  assert sorted(os.listdir(target)) == sorted(f + '.gz' for f in mnist.DATASETS['mnist'].sha256)
