"""A run over several processes: two processes of 4 devices train as one of 8.

Two `python -m experiments.mnist` processes on localhost, 4 forced CPU devices
each, joined with --coordinator_address, must give the parameters one process
with 8 devices gives on the same batches, after an epoch and after a SIGTERM to
one process inside the second (both save the same step and stop) and a resume;
and only the first process writes the run's files.
"""

import os
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from capsjax import tasks
from capsjax.errors import InputError
from capsjax.training import distributed, loop, rundir
from capsjax.training.checkpoint import Checkpointer
from tests.conftest import REPO
from tests.test_loop import ENV, SMALL_FLAGS

GLOBAL_DEVICES = 8


def free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def start(flags, devices, extra=()):
  env = dict(ENV, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  return subprocess.Popen([sys.executable, '-m', 'experiments.mnist', *SMALL_FLAGS, *flags,
                           *extra], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def finish(procs):
  outputs = [proc.communicate(timeout=300) for proc in procs]
  for proc, (_, err) in zip(procs, outputs):
    assert proc.returncode == 0, err[-3000:]
  return [out for out, _ in outputs]


def train_two_processes(flags):
  address = f'localhost:{free_port()}'
  return finish([start(flags, GLOBAL_DEVICES // 2,
                       (f'--coordinator_address={address}', '--num_processes=2',
                        f'--process_id={n}')) for n in range(2)])


def params_at(workdir, step):
  config, state, _ = tasks.load_run(workdir)
  with Checkpointer(os.path.join(workdir, 'checkpoints'), create=False) as checkpointer:
    return jax.tree.leaves(checkpointer.restore(state, step)[0].params)


def assert_same_params(first, second):
  assert len(first) == len(second)
  for a, b in zip(first, second):
    # Summing gradients across processes may order the additions differently.
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_two_processes_train_as_one(tmp_path, tiny_dataset):
  common = [f'--data_dir={tiny_dataset}', '--train_examples=64', '--test_examples=40']
  one, two = str(tmp_path / 'one'), str(tmp_path / 'two')
  single = start([*common, f'--workdir={one}', '--epochs=2'], GLOBAL_DEVICES)
  # Two processes train epoch 1; SIGTERM to the second alone, inside epoch 2: both save the
  # same step and stop.
  address = f'localhost:{free_port()}'
  procs = [start([*common, f'--workdir={two}', '--epochs=2', '--progress_seconds=0'],
                 GLOBAL_DEVICES // 2, (f'--coordinator_address={address}', '--num_processes=2',
                                       f'--process_id={n}')) for n in range(2)]
  first_lines = []
  for line in procs[0].stdout:
    first_lines.append(line)
    if line.startswith('  epoch 2/2 step 1/4'):
      procs[1].send_signal(signal.SIGTERM)
      break
  outputs = [proc.communicate(timeout=300) for proc in procs]
  assert [proc.returncode for proc in procs] == [143, 143], outputs[0][1][-2000:]
  assert 'Stopped by a stop request on another process after ' in outputs[0][1]
  first_out, second_out = ''.join(first_lines) + outputs[0][0], outputs[1][0]
  assert 'device(s) over 2 processes' in first_out
  # The log is the first process's alone (gloo, the CPU collectives, prints lines of its own,
  # interleaved from several threads).
  for ours in ('training', 'compiled', 'epoch 1/2'):
    assert ours in first_out and ours not in second_out, ours
  records = rundir.read_metrics(os.path.join(two, rundir.METRICS_FILE))
  assert [r['epoch'] for r in records] == [1] and records[0]['num_devices'] == GLOBAL_DEVICES
  assert os.path.isfile(os.path.join(two, rundir.CURVES_FILE))
  # Both processes saved the one stop step inside epoch 2, and the checkpointer keeps the two
  # newest: epoch 1's end (step 4, compared below) and that step.
  (stopped,) = [name for name in os.listdir(os.path.join(two, 'checkpoints')) if name != 'step_4']
  assert stopped in ('step_5', 'step_6', 'step_7'), stopped
  finish([single])
  assert_same_params(params_at(two, 4), params_at(one, 4))

  out, second_out = train_two_processes([*common, f'--workdir={two}', '--epochs=2'])
  assert 'Resumed from the checkpoint of ' in out
  assert 'Test accuracy' in out and 'Test accuracy' not in second_out
  assert [r['epoch'] for r in rundir.read_metrics(os.path.join(two, rundir.METRICS_FILE))] == [1, 2]
  assert_same_params(params_at(two, 8), params_at(one, 8))
  single_record = rundir.read_metrics(os.path.join(one, rundir.METRICS_FILE))[-1]
  two_record = rundir.read_metrics(os.path.join(two, rundir.METRICS_FILE))[-1]
  for key in ('train_loss', 'test_loss', 'test_accuracy'):
    assert two_record[key] == pytest.approx(single_record[key], rel=1e-5), key


def test_local_shards_of_one_process_is_the_whole_batch():
  batch = np.arange(12 * jax.device_count())
  shards = loop.local_shards(batch)
  assert shards.shape == (jax.local_device_count(), 12)
  np.testing.assert_array_equal(shards.reshape(-1), batch)


@pytest.mark.parametrize('environ, expected', [
    ({}, None),
    ({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '1'}, None),
    ({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '4'}, 'slurm'),
    ({'SLURM_NTASKS': '4'}, None),
    ({'TPU_WORKER_HOSTNAMES': 'localhost'}, None),
    ({'TPU_WORKER_HOSTNAMES': 't1k-w-0,t1k-w-1'}, 'tpu'),
])
def test_cluster_in_environment(environ, expected):
  assert distributed.cluster_in_environment(environ) == expected


@pytest.mark.parametrize('address, count, process, words', [
    ('localhost:1234', None, 0, 'needs --num_processes and --process_id'),
    ('localhost:1234', 2, None, 'needs --num_processes and --process_id'),
    ('localhost:1234', 2, 2, '--process_id=2 must lie in [0, 2)'),
    (None, 2, 1, 'need --coordinator_address'),
])
def test_bad_process_flags_are_input_errors(address, count, process, words):
  with pytest.raises(InputError, match=words.replace('[', r'\[').replace('(', r'\(')
                     .replace(')', r'\)')):
    distributed.initialize(address, count, process, environ={})


def test_one_process_joins_nothing():
  assert distributed.initialize(None, None, None, environ={}) == 1
  assert distributed.initialize(None, 1, 0, environ={}) == 1


def test_bad_process_flags_exit_with_one_line(tmp_path, tiny_dataset):
  proc = start([f'--data_dir={tiny_dataset}', f'--workdir={tmp_path / "run"}',
                '--coordinator_address=localhost:1'], 1)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 1
  assert err.strip() == ('error: --coordinator_address=localhost:1 needs --num_processes and '
                         '--process_id (0 for the process at that address).')
  assert not os.path.exists(tmp_path / 'run')
