"""experiments.table1: its header states what the rows ran with, the recipe's settings included."""

import subprocess
import sys

from tests.conftest import REPO

# In a process of its own: absl's flags are global to a process.
HEADER = '''
import sys
import numpy as np
from absl import flags
from capsjax.data import Dataset
from experiments import common, table1
flags.FLAGS(['table1', *sys.argv[1:]])
images = np.zeros((100, 28, 28, 1), np.uint8)
dataset = Dataset(images, np.zeros(100, np.int32), images[:20], np.zeros(20, np.int32), 10, 'test')
config = common.config_from_flags(dataset)
row = table1.ROWS[1]
row_config = common.config_from_flags(dataset, seed=0, **row.settings)
settings, header = table1.table_settings(config, dataset)
print(header)
print(settings['epochs'], settings['batch_size'], row_config.epochs, row_config.batch_size)
'''


def _header(*flags):
  out = subprocess.run([sys.executable, '-c', HEADER, *flags], cwd=REPO, capture_output=True,
                       text=True, check=True).stdout.splitlines()
  return out[0], out[1].split()


def test_header_gives_the_recipes_epochs_and_batch_that_the_rows_ran():
  header, (epochs, batch, row_epochs, row_batch) = _header('--recipe=fast')
  assert (epochs, batch) == (row_epochs, row_batch) == ('12', '64')  # the fast recipe's
  assert '12 epoch(s)' in header and 'batch 64, recipe fast' in header


def test_header_gives_flags_over_the_recipe():
  header, (epochs, batch, row_epochs, row_batch) = _header('--recipe=fast', '--epochs=3',
                                                           '--train_examples=60')
  assert (epochs, batch) == (row_epochs, row_batch) == ('3', '64')
  assert '3 epoch(s), 60 training and 20 test images, batch 64' in header
