import gzip
import hashlib
import os
import shutil

import numpy as np
import pytest

from capsjax import data
from capsjax.data import mnist
from tests.conftest import find_mnist, write_dataset, write_idx


@pytest.mark.parametrize('gz', [True, False])
def test_round_trip_of_written_idx_files(tmp_path, gz):
  directory = write_dataset(str(tmp_path), num_train=30, num_test=20, gz=gz)
  ds = data.load_idx_dir(directory)
  assert ds.train_images.shape == (30, 28, 28, 1) and ds.train_images.dtype == np.uint8
  assert ds.test_labels.shape == (20,) and ds.test_labels.dtype == np.int32
  suffix = '.gz' if gz else ''
  raw = (gzip.open if gz else open)(os.path.join(directory, 'train-images-idx3-ubyte' + suffix),
                                    'rb').read()
  np.testing.assert_array_equal(ds.train_images.reshape(-1), np.frombuffer(raw[16:], np.uint8))


def test_truncated_file_names_file_and_sizes(tmp_path):
  directory = write_dataset(str(tmp_path), gz=False)
  path = os.path.join(directory, 't10k-images-idx3-ubyte')
  with open(path, 'rb') as f:
    content = f.read()
  with open(path, 'wb') as f:
    f.write(content[:-100])
  with pytest.raises(data.DataError, match=r't10k-images-idx3-ubyte: header says 40 x 28 x 28 .*'
                     r'truncated'):
    data.load_idx_dir(directory)


def test_wrong_magic_is_reported(tmp_path):
  directory = write_dataset(str(tmp_path))
  write_idx(os.path.join(directory, 'train-labels-idx1-ubyte.gz'), np.zeros(64), magic=2051)
  with pytest.raises(data.DataError, match='train-labels-idx1-ubyte.gz: magic number 2051, '
                     'expected 2049'):
    data.load_idx_dir(directory)


def test_corrupt_gzip_is_reported(tmp_path):
  directory = write_dataset(str(tmp_path))
  path = os.path.join(directory, 'train-images-idx3-ubyte.gz')
  with open(path, 'r+b') as f:
    f.seek(30)
    f.write(b'\xff' * 50)
  with pytest.raises(data.DataError, match='train-images-idx3-ubyte.gz: cannot be read'):
    data.load_idx_dir(directory)


def test_missing_file_and_folder_and_mismatched_counts(tmp_path):
  with pytest.raises(data.DataError, match='no such folder'):
    data.load_idx_dir(str(tmp_path / 'nowhere'))
  directory = write_dataset(str(tmp_path / 'a'))
  os.remove(os.path.join(directory, 't10k-labels-idx1-ubyte.gz'))
  with pytest.raises(data.DataError, match=r't10k-labels-idx1-ubyte\[.gz\]: file not found'):
    data.load_idx_dir(directory)
  directory = write_dataset(str(tmp_path / 'b'))
  write_idx(os.path.join(directory, 'train-labels-idx1-ubyte.gz'), np.zeros(63))
  with pytest.raises(data.DataError, match='64 images but .* 63 labels'):
    data.load_idx_dir(directory)


def test_real_mnist_files(mnist_dir):
  ds = data.load_dataset('mnist', mnist_dir)
  assert ds.train_images.shape == (60000, 28, 28, 1) and ds.test_images.shape == (10000, 28, 28, 1)
  assert np.bincount(ds.train_labels).min() > 5000 and ds.test_labels.max() == 9
  # The first training labels of the canonical MNIST file.
  np.testing.assert_array_equal(ds.train_labels[:8], [5, 0, 4, 1, 9, 2, 1, 3])


def gzipped_mirror(folder, directory):
  """A folder of the four .gz files, as a download mirror holds them, from raw or .gz files."""
  os.makedirs(directory)
  for name in data.DATASETS['mnist'].sha256:
    raw = os.path.join(folder, name)
    if os.path.isfile(raw):
      with open(raw, 'rb') as f, gzip.open(os.path.join(directory, name + '.gz'), 'wb') as out:
        shutil.copyfileobj(f, out)
    else:
      shutil.copy(raw + '.gz', directory)
  return directory


def test_download_verifies_content_and_skips_verified_files(tmp_path, mnist_dir):
  mirror = 'file://' + gzipped_mirror(mnist_dir, str(tmp_path / 'mirror')) + '/'
  target = mnist.download('mnist', str(tmp_path), base_url=mirror)
  assert sorted(os.listdir(target)) == sorted(f + '.gz' for f in data.DATASETS['mnist'].sha256)
  ds = data.load_idx_dir(target)
  assert len(ds.train_labels) == 60000
  before = {f: os.stat(os.path.join(target, f)).st_mtime_ns for f in os.listdir(target)}
  mnist.download('mnist', str(tmp_path), base_url='file:///nonexistent/')  # nothing fetched
  assert before == {f: os.stat(os.path.join(target, f)).st_mtime_ns for f in os.listdir(target)}


def test_download_rejects_wrong_content_and_leaves_nothing(tmp_path):
  mirror = write_dataset(str(tmp_path / 'mirror'))
  with pytest.raises(data.DataError, match='sha256 of the content is .* expected '
                     + data.DATASETS['mnist'].sha256['train-images-idx3-ubyte']):
    mnist.download('mnist', str(tmp_path / 'cache'), base_url='file://' + mirror + '/')
  assert os.listdir(tmp_path / 'cache' / 'mnist') == []


def test_no_source_explains_how_to_provide_the_data(tmp_path, monkeypatch):
  monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
  monkeypatch.setattr(mnist, 'DATASETS', {'mnist': data.DATASETS['mnist'].__class__(
      tfds_name='no_such_tfds_dataset', url='file:///nonexistent/',
      sha256=data.DATASETS['mnist'].sha256)})
  logged = []
  with pytest.raises(data.DataError, match='--data_dir=FOLDER or set CAPSJAX_DATA_DIR'):
    data.load_dataset('mnist', cache_dir=str(tmp_path), log=logged.append)
  assert any(line.strip().startswith('download:') for line in logged)


def test_environment_variable_names_the_folder(tmp_path, monkeypatch):
  monkeypatch.setenv(data.DATA_DIR_ENV, write_dataset(str(tmp_path), num_train=12))
  assert len(data.load_dataset('mnist').train_labels) == 12


def test_fashion_mnist_from_the_debian_package(monkeypatch):
  monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
  source = data.DATASETS['fashion_mnist']
  if not os.path.isdir(source.system_dir):
    pytest.skip('apt-get install dataset-fashion-mnist (.ci/run installs it)')
  ds = data.load_dataset('fashion_mnist')
  assert ds.train_images.shape == (60000, 28, 28, 1) and ds.source == source.system_dir
  for name, digest in source.sha256.items():
    with gzip.open(os.path.join(source.system_dir, name + '.gz'), 'rb') as f:
      assert hashlib.sha256(f.read()).hexdigest() == digest


def test_tests_find_mnist_in_the_workspace_then_the_environment_then_the_download(tmp_path):
  shared, named = str(tmp_path / 'shared'), str(tmp_path / 'named')
  os.makedirs(shared)
  downloads = []
  download = lambda name: downloads.append(name) or str(tmp_path / 'cache')
  assert find_mnist(shared, {data.DATA_DIR_ENV: named}, download) == shared
  missing = str(tmp_path / 'missing')
  assert find_mnist(missing, {data.DATA_DIR_ENV: named}, download) == named
  assert downloads == []
  assert find_mnist(missing, {}, download) == str(tmp_path / 'cache') and downloads == ['mnist']


def test_tests_without_any_mnist_fail_saying_what_was_tried(tmp_path):
  def offline(name):
    raise OSError('Network is unreachable')

  with pytest.raises(pytest.fail.Exception,
                     match=f'{tmp_path}/missing does not exist, .CAPSJAX_DATA_DIR is not set, and '
                           r'the checksummed download failed \(Network is unreachable\)'):
    find_mnist(str(tmp_path / 'missing'), {}, offline)


def test_a_folder_of_mnist_does_not_pass_for_fashion_mnist(mnist_dir, monkeypatch, tmp_path):
  assert mnist.known_dataset(mnist_dir) == 'mnist'
  assert mnist.known_dataset(write_dataset(str(tmp_path / 'own'))) is None
  assert mnist.known_dataset(str(tmp_path / 'missing')) is None
  with pytest.raises(data.DataError, match=f'{mnist_dir} holds the mnist files, not fashion_mnist'):
    data.load_dataset('fashion_mnist', mnist_dir)
  monkeypatch.setenv(data.DATA_DIR_ENV, mnist_dir)
  with pytest.raises(data.DataError, match='or unset CAPSJAX_DATA_DIR'):
    data.load_dataset('fashion_mnist')
