"""The routings study: one run per routing with one budget, tabulated beside the papers."""

import json
import subprocess
import sys

from tests.conftest import REPO, write_dataset
from tests.test_routing_iterations import NO_RESTART, SMALL_FLAGS


def run(*flags):
  return subprocess.run([sys.executable, '-m', 'experiments.routings', *flags], cwd=REPO,
                        capture_output=True, text=True, timeout=600, env=NO_RESTART)


def test_command_tabulates_each_variant_and_reads_runs_back(tmp_path):
  data_dir = write_dataset(str(tmp_path / 'data'), num_train=32, num_test=24)
  workdir = tmp_path / 'study'
  flags = ['--variants=inverted_attention,efficient_capsnet', '--epochs=1', '--routing_iters=2',
           f'--data_dir={data_dir}', f'--workdir={workdir}', *SMALL_FLAGS]
  first = run(*flags)
  assert first.returncode == 0, first.stderr[-3000:]
  assert first.stdout.count('compiled and ran the first step') == 2
  with open(workdir / 'routings.json') as f:
    study = json.load(f)
  assert study['variants'] == ['inverted_attention', 'efficient_capsnet']
  assert study['epochs'] == 1 and study['train_examples'] == 32 and study['test_examples'] == 24
  rows = {row['variant']: row for row in study['rows']}
  for name, row in rows.items():
    with open(workdir / name / 'run.json') as f:
      settings = json.load(f)
    with open(workdir / name / 'metrics.jsonl') as f:
      (record,) = [json.loads(line) for line in f]
    # Each run is the variant's model with the shared flags.
    assert settings['batch_size'] == 16 and settings['epochs'] == 1
    assert settings['routing_iters'] == 2 and settings['conv_features'] == 16
    assert row['test_error'] == record['test_error']
    assert row['train_images_per_second'] == record['images_per_sec'] > 0
    assert row['wall_seconds'] == record['epoch_seconds']
  attention, efficient = rows['inverted_attention'], rows['efficient_capsnet']
  with open(workdir / 'inverted_attention' / 'run.json') as f:
    assert {k: v for k, v in json.load(f).items() if k in ('model', 'routing')} == {
        'model': 'capsnet', 'routing': 'inverted_attention'}
  with open(workdir / 'efficient_capsnet' / 'run.json') as f:
    assert json.load(f)['model'] == 'efficient_capsnet'
  assert attention['routing_iters'] == 2 and efficient['routing_iters'] is None
  assert (attention['paper_error_percent'], efficient['paper_error_percent']) == (None, 0.26)
  # Efficient-CapsNet keeps its own layers whatever the CapsNet's size flags: its 161,824
  # parameters and the paper's decoder, 16 x 10 -> 512 -> 1024 -> 784.
  decoder = 160 * 512 + 512 + 512 * 1024 + 1024 + 1024 * 784 + 784
  assert efficient['parameters'] == 161_824 + decoder

  table = (workdir / 'routings.md').read_text()
  lines = [line for line in table.splitlines() if line.startswith('| ') and '---' not in line]
  assert len(lines) == 3 and 'test error %' in lines[0]
  assert lines[1].startswith('| CapsNet, inverted dot-product attention routing | 2 | '
                             f'{attention["parameters"]:,} | '
                             f'{100 * attention["test_error"]:.2f} | ')
  assert lines[1].endswith('| -: Tsai et al. 2020 report CIFAR-10, CIFAR-100 and '
                           'DiverseMultiMNIST, not MNIST |')
  assert lines[2].startswith('| Efficient-CapsNet (self-attention routing) | - | ')
  assert '| 0.26: Mazzia et al. 2021' in lines[2]

  # A rerun reads both runs back.
  again = run(*flags)
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'compiled' not in again.stdout and again.stdout.count('finished before') == 2
  with open(workdir / 'routings.json') as f:
    assert json.load(f)['rows'] == study['rows']


def test_refusals_are_one_line(tmp_path):
  for flags, expected in (
      (['--variants=dynamic,capsules'], '--variants=dynamic,capsules: give distinct names among '
       'dynamic,em,self_attention,'),
      (['--routing=em'], '--routing is set per run by --variants'),
      # The fast recipe averages the weights, which Efficient-CapsNet's batch statistics rule out:
      # refused before any variant trains.
      (['--recipe=fast', '--variants=dynamic,efficient_capsnet'], '--ema_decay=0.999 '
       '(--recipe=fast sets it unless given): Efficient-CapsNet keeps batch statistics')):
    result = run(*flags, f'--workdir={tmp_path / "study"}')
    assert result.returncode == 1 and result.stdout == ''
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f'error: {expected}')
    assert not (tmp_path / 'study').exists()
