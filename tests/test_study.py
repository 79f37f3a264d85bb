"""The paper's MNIST study as commands: Table 1 and the capsule-dimension pictures."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

import capsjax
from capsjax.analysis import interpret
from tests.conftest import REPO, write_dataset

# lax.conv compiles in a fraction of the matmul convolution's time: these tests are about
# the commands, and tests/test_model.py shows the two convolutions agree.
SMALL_FLAGS = ['--conv_features=16', '--primary_types=4', '--primary_dim=4', '--digit_dim=8',
               '--batch_size=16', '--progress_seconds=1000', '--conv_impl=xla']
NO_RESTART = dict(os.environ, GLIBC_TUNABLES='glibc.malloc.hugetlb=0')


def run(module, *flags, timeout=600):
  return subprocess.run([sys.executable, '-m', f'experiments.{module}', *flags], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout, env=NO_RESTART)


def test_table1_writes_five_rows_and_resumes_without_retraining(tmp_path):
  data_dir = write_dataset(str(tmp_path / 'data'), num_train=32, num_test=24)
  workdir = str(tmp_path / 'table')
  flags = ['--epochs=1', '--seeds=1', f'--data_dir={data_dir}', f'--workdir={workdir}',
           *SMALL_FLAGS]
  first = run('table1', *flags)
  assert first.returncode == 0, first.stderr[-3000:]
  assert first.stdout.count('compiled and ran the first step') == 5
  with open(os.path.join(workdir, 'table1.json')) as f:
    table = json.load(f)
  rows = {row['row']: row for row in table['rows']}
  assert list(rows) == ['baseline', 'capsnet_r1', 'capsnet_r1_recon', 'capsnet_r3',
                        'capsnet_r3_recon']
  assert rows['baseline']['parameters'] == 35_445_522
  assert rows['capsnet_r1_recon']['parameters'] > rows['capsnet_r1']['parameters']  # decoder
  assert rows['capsnet_r3']['parameters'] == rows['capsnet_r1']['parameters']
  assert [rows[r]['paper_error_percent'] for r in rows] == [0.39, 0.34, 0.29, 0.35, 0.25]
  for name, row in rows.items():
    with open(os.path.join(workdir, name, 'seed0', 'metrics.jsonl')) as f:
      (record,) = [json.loads(line) for line in f]
    # The table reports the last epoch's test error of each run, nothing chosen afterwards.
    assert row['test_error_percent_mean'] == 100 * record['test_error']
    assert row['test_error_percent_std'] is None and row['epochs'] == 1
    assert row['wall_seconds'] == record['epoch_seconds']
  with open(os.path.join(workdir, 'table1.md')) as f:
    table_lines = [line for line in f if line.startswith('| ') and '---' not in line]
  assert len(table_lines) == 6  # header and five rows
  assert table_lines[1].startswith('| baseline CNN | - | - | 35,445,522 |')
  assert table_lines[5].startswith('| CapsNet | 3 | yes |')
  assert table_lines[5].rstrip().endswith('| 0.25 +- 0.005 | 1 | '
                                          f'{rows["capsnet_r3_recon"]["wall_seconds"] / 60:.1f}'
                                          ' min |')

  # A finished table is read back; a row whose run is gone is trained again, alone.
  for path in os.listdir(os.path.join(workdir, 'capsnet_r3', 'seed0')):
    subprocess.run(['rm', '-rf', os.path.join(workdir, 'capsnet_r3', 'seed0', path)], check=True)
  again = run('table1', *flags)
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.count('compiled and ran the first step') == 1
  assert '== capsnet_r3 seed 0' in again.stdout
  assert again.stdout.count('finished before') == 4
  with open(os.path.join(workdir, 'table1.json')) as f:
    rerun = {row['row']: row for row in json.load(f)['rows']}
  for name in ('baseline', 'capsnet_r1', 'capsnet_r1_recon', 'capsnet_r3_recon'):
    assert rerun[name] == rows[name]


def small_trained_run(tmp_path, *extra):
  data_dir = write_dataset(str(tmp_path / 'data'), num_train=32, num_test=16)
  workdir = str(tmp_path / 'run')
  proc = run('mnist', '--epochs=1', f'--data_dir={data_dir}', f'--workdir={workdir}',
             *SMALL_FLAGS, *extra)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return data_dir, workdir


def test_dimensions_command_draws_both_pictures(tmp_path):
  data_dir, workdir = small_trained_run(tmp_path)
  proc = run('dimensions', f'--workdir={workdir}', f'--data_dir={data_dir}', '--digits=3')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'for 3 test digits' in proc.stdout
  sheet = np.asarray(Image.open(os.path.join(workdir, 'dimensions.png')).convert('RGB'))
  couplings = np.asarray(Image.open(os.path.join(workdir, 'couplings.png')).convert('RGB'))
  # Three blocks of 8 rows (digit_dim) by 11 columns of 28-pixel tiles at least.
  assert sheet.shape[0] > 3 * 8 * 28 and sheet.shape[1] > 11 * 28
  assert couplings.shape[0] > 3 * 28 and couplings.shape[1] > 11 * 28  # digit + 10 maps
  assert len(np.unique(couplings.reshape(-1, 3), axis=0)) > 20
  # A run it cannot write into (here the picture's name is taken by a folder): one line.
  os.remove(os.path.join(workdir, 'couplings.png'))
  os.mkdir(os.path.join(workdir, 'couplings.png'))
  proc = run('dimensions', f'--workdir={workdir}', f'--data_dir={data_dir}', '--digits=3')
  assert proc.returncode == 1 and 'Traceback' not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      f'error: could not write the pictures into {workdir} (Is a directory); copy the run to a '
      f'folder you can write and pass that as --workdir.')


def test_dimensions_command_errors_are_one_clear_line(tmp_path):
  empty = tmp_path / 'nothing'
  proc = run('dimensions', f'--workdir={empty}', timeout=120)
  assert proc.returncode == 1 and 'Traceback' not in proc.stderr
  assert proc.stderr.strip().startswith('error: ') and 'no trained run there' in proc.stderr
  assert not empty.exists()
  data_dir, workdir = small_trained_run(tmp_path, '--recon_weight=0')
  proc = run('dimensions', f'--workdir={workdir}', f'--data_dir={data_dir}', timeout=120)
  assert proc.returncode == 1 and 'Traceback' not in proc.stderr
  assert 'without a decoder' in proc.stderr and '--recon_weight > 0' in proc.stderr
  assert not os.path.exists(os.path.join(workdir, 'dimensions.png'))


def test_analyse_decodes_exactly_the_perturbed_predicted_capsule():
  model = capsjax.CapsNet(conv_features=8, primary_types=2, primary_dim=4, digit_dim=4)
  images = jax.random.uniform(jax.random.PRNGKey(1), (2, 20, 20, 1))
  params = capsjax.init_params(model, jax.random.PRNGKey(0), (20, 20, 1))
  result = interpret.analyse(model, params, images)
  out = model.apply({'params': params}, images)
  predictions = np.argmax(np.asarray(out.lengths), axis=-1)
  np.testing.assert_array_equal(result['predictions'], predictions)
  assert result['perturbed'].shape == (2, 4, 11, 20, 20, 1)
  assert result['couplings'].shape == (2, 10, 2, 2)  # 20 -> 12 (Conv1) -> 2 (PrimaryCaps)
  decoder = capsjax.Decoder((20, 20, 1), model.decoder_hidden)
  for n in range(2):
    for d in range(4):
      for v, value in enumerate([k / 20 for k in range(-5, 6)]):
        capsules = np.zeros((10, 4))
        capsules[predictions[n]] = np.asarray(out.capsules[n], np.float64)[predictions[n]]
        capsules[predictions[n], d] += value
        mask = jax.nn.one_hot(predictions[n:n + 1], 10)
        expected = decoder.apply({'params': params['decoder']},
                                 jnp.asarray(capsules[None], jnp.float32), mask)[0]
        np.testing.assert_allclose(result['perturbed'][n, d, v], expected, atol=1e-5)
