"""Long runs lose nothing: checkpoints inside an epoch, clean stops, damaged storage, one
trainer per folder, and the time left.

The reference for every resume is the same run trained without a stop: a resumed run
must end with its parameters and metrics.jsonl bit for bit (timings aside).
"""

import errno
import glob
import io
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from capsjax import data
from capsjax.errors import InputError
from capsjax.tasks import classification_losses, load_run
from capsjax.training import Task, TrainConfig, create_train_state, loop, stopping
from capsjax.training.checkpoint import Checkpointer, Progress
from capsjax.training.lock import LOCK_FILE, WorkdirLock
from tests.conftest import REPO, write_dataset

SMALL = dict(conv_features=16, primary_types=4, primary_dim=4, digit_dim=8, batch_size=16,
             conv_impl='xla')
# 8 steps an epoch, 3 epochs.
CONFIG = TrainConfig.create(epochs=3, progress_seconds=1000, **SMALL)
FLAGS = ['--conv_features=16', '--primary_types=4', '--primary_dim=4', '--digit_dim=8',
         '--batch_size=16', '--conv_impl=xla', '--epochs=3', '--progress_seconds=0']
TIMINGS = ('images_per_sec', 'epoch_seconds')
ENV = dict(os.environ, GLIBC_TUNABLES='glibc.malloc.hugetlb=0')


def quiet(_):
  pass


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return write_dataset(str(tmp_path_factory.mktemp('data')), num_train=128, num_test=32)


@pytest.fixture(scope='module')
def task(data_dir):
  return Task(name='mnist', dataset=data.load_idx_dir(data_dir), loss_fn=classification_losses)


def final_params(workdir):
  _, state, _ = load_run(workdir)
  return jax.tree.leaves((state.params, state.opt_state, state.rng))


def records_without_timings(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in f]


def assert_same_run(workdir, reference):
  assert records_without_timings(workdir) == records_without_timings(reference)
  for a, b in zip(final_params(workdir), final_params(reference), strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, task):
  """A run of CONFIG trained from start to end without a stop, and its progress lines."""
  workdir = str(tmp_path_factory.mktemp('uninterrupted') / 'run')
  lines = []
  loop.train_and_evaluate(CONFIG.replace(progress_seconds=0), task, workdir, log=lines.append)
  return workdir, lines


def test_sigterm_mid_epoch_saves_the_step_and_the_resume_equals_the_uninterrupted_run(
    tmp_path, task, uninterrupted):
  workdir = str(tmp_path / 'run')

  def progress(line):  # SIGTERM as a batch system sends it, in the middle of epoch 2
    if line.startswith('  epoch 2/3 step 3/8'):
      os.kill(os.getpid(), signal.SIGTERM)

  previous = signal.getsignal(signal.SIGTERM)
  with pytest.raises(stopping.Stopped) as stopped:
    loop.train_and_evaluate(CONFIG.replace(progress_seconds=0), task, workdir, log=quiet,
                            progress=progress)
  assert signal.getsignal(signal.SIGTERM) is previous  # the handler is the caller's again
  assert stopped.value.exit_status == 143
  assert str(stopped.value).startswith('Stopped by SIGTERM after step 4/8 of epoch 2; its '
                                       f'checkpoint is in {workdir}/checkpoints.')
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['step_12', 'step_8']
  assert not os.path.exists(os.path.join(workdir, LOCK_FILE))
  with open(os.path.join(workdir, 'checkpoints', 'step_12', 'progress.json')) as f:
    progress_record = json.load(f)
  assert (progress_record['epoch'], progress_record['steps'],
          progress_record['epoch_done']) == (2, 4, False)
  assert [r['epoch'] for r in records_without_timings(workdir)] == [1]

  lines = []
  loop.train_and_evaluate(CONFIG, task, workdir, log=lines.append)
  assert 'Resumed from the checkpoint of step 4/8 of epoch 2 (step 12).' in lines
  assert_same_run(workdir, uninterrupted[0])


def test_checkpoints_on_a_timer_inside_epochs_change_nothing(tmp_path, task, uninterrupted):
  workdir = str(tmp_path / 'run')
  saved = []
  save = Checkpointer.save

  def spy(self, state, progress):
    saved.append((progress.epoch, progress.steps, progress.epoch_done))
    return save(self, state, progress)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(Checkpointer, 'save', spy)
    # Every step is past a timer of 1e-9 minutes: a checkpoint after each.
    loop.train_and_evaluate(CONFIG.replace(checkpoint_every_minutes=1e-9), task, workdir,
                            log=quiet)
  assert saved == [(epoch, steps, steps == 8) for epoch in (1, 2, 3) for steps in range(1, 9)]
  assert len(os.listdir(os.path.join(workdir, 'checkpoints'))) == 2  # the newest two kept
  assert_same_run(workdir, uninterrupted[0])


def test_progress_lines_give_the_time_left(uninterrupted):
  lines = uninterrupted[1]
  steps = [line for line in lines if line.startswith('  epoch 2/3 step ')]
  assert [line.split()[3] for line in steps] == [f'{n}/8' for n in range(1, 8)]
  assert all(' images/s  ' in line and ' left in the epoch, ' in line
             and line.endswith(' in the run')
             for line in steps)


def test_time_left_by_hand():
  trainer = loop.EpochTrainer(None, None, None, batch_size=10, steps_per_epoch=100,
                              run=CONFIG.run, log=quiet, progress=quiet,
                              stops=stopping.StopRequests(), last_epoch=3)
  trainer.evaluation_seconds = 5.0
  # 60 steps of 10 images at 50 images/s, then the evaluation, then epoch 3: 1000 / 50 + 5.
  assert trainer.seconds_left(epoch=2, steps_done=40, rate=50.0) == (12.0, 12 + 5 + 25)
  progress = Progress(epoch=2, steps=40, epoch_done=False, sums={'loss': 8.0},
                      timed_images=400, timed_seconds=8.0)
  assert trainer.progress_line(2, progress) == (
      '  epoch 2/3 step 40/100  loss 0.2000  50.0 images/s  12s left in the epoch, 42s in the run')
  assert [loop.duration(s) for s in (0.4, 59, 61, 3599, 3600, 26000)] == [
      '0s', '59s', '1m01s', '59m59s', '1h00m', '7h13m']


def test_a_run_over_an_hour_says_when_it_should_end():
  lines = []
  loop._expected_end(epoch=2, last_epoch=50, record={'epoch_seconds': 700.0}, elapsed=1400,
                     log=lines.append)
  (line,) = lines
  assert line.startswith('  48 epochs left, about 9h20m: expected to end 20')
  loop._expected_end(epoch=2, last_epoch=3, record={'epoch_seconds': 700.0}, elapsed=1400,
                     log=lines.append)
  assert len(lines) == 1  # a run of under an hour: no such line


class Terminal(io.StringIO):
  def isatty(self):
    return True


@pytest.mark.parametrize('terminal', [True, False])
def test_progress_is_one_line_rewritten_on_a_terminal_and_plain_lines_in_a_log(terminal,
                                                                               monkeypatch):
  from experiments import console  # defines no flags: safe beside any experiment's
  out = Terminal() if terminal else io.StringIO()
  monkeypatch.setattr(sys, 'stdout', out)
  console.status('  epoch 1/3 step 1/8  loss 0.9')
  console.status('  epoch 1/3 step 2/8  loss 0.8')
  console.say('epoch 1/3  train loss 0.8')
  if terminal:
    assert out.getvalue() == ('\repoch 1/3 step 1/8  loss 0.9\x1b[K'
                              '\repoch 1/3 step 2/8  loss 0.8\x1b[K'
                              '\nepoch 1/3  train loss 0.8\n')
  else:
    assert out.getvalue() == ('  epoch 1/3 step 1/8  loss 0.9\n  epoch 1/3 step 2/8  loss 0.8\n'
                              'epoch 1/3  train loss 0.8\n')


def test_one_signal_asks_a_second_stops_at_once():
  with stopping.StopRequests() as stops:
    assert stops.signal_number is None
    os.kill(os.getpid(), signal.SIGINT)
    assert stops.signal_number == signal.SIGINT and stops.name == 'SIGINT'
    # The next one gets the system's action (the process ends) rather than a request.
    assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# Damaged storage.

@pytest.fixture
def two_checkpoints(tmp_path):
  """A checkpoint folder with step 5 (inside epoch 1) and step 8 (its end), and a state."""
  state = create_train_state(jax.random.PRNGKey(0), CONFIG, classification_losses)
  directory = str(tmp_path / 'checkpoints')
  with Checkpointer(directory, log=quiet) as checkpointer:
    checkpointer.save(state.replace(step=np.int32(5)),
                      Progress(epoch=1, steps=5, epoch_done=False, sums={'loss': 4.5}))
    checkpointer.save(state.replace(step=np.int32(8)), Progress.end_of(1))
  return directory, state


def largest_file(folder):
  return max((p for p in glob.glob(f'{folder}/**', recursive=True) if os.path.isfile(p)),
             key=os.path.getsize)


def truncate(path):
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


def flip_a_bit(path):
  with open(path, 'r+b') as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)[0]
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte ^ 0x10]))


@pytest.mark.parametrize('damage, reason', [
    (lambda step: [os.remove(p) for p in glob.glob(f'{step}/state/**', recursive=True)
                   if os.path.isfile(p)], ''),
    (lambda step: truncate(f'{step}/state/_METADATA'), ''),
    (lambda step: truncate(f'{step}/progress.json'), 'its progress.json is unreadable'),
    (lambda step: flip_a_bit(largest_file(f'{step}/state')), ''),
], ids=['emptied', 'metadata_cut', 'progress_cut', 'bit_flipped'])
def test_a_damaged_newest_checkpoint_is_skipped_for_the_last_whole_one(two_checkpoints, damage,
                                                                       reason):
  directory, state = two_checkpoints
  damage(os.path.join(directory, 'step_8'))
  lines = []
  with Checkpointer(directory, log=lines.append) as checkpointer:
    restored, progress = checkpointer.restore(state)
  assert int(restored.step) == 5 and progress.steps == 5 and progress.sums == {'loss': 4.5}
  assert lines[0].startswith(f'Skipped the checkpoint {directory}/step_8: {reason}')
  # The writer moved it aside, so the run can save step 8 again.
  assert sorted(os.listdir(directory)) == ['damaged-step_8', 'step_5']


def test_a_flipped_bit_is_caught_by_the_digests(two_checkpoints):
  directory, state = two_checkpoints
  flip_a_bit(largest_file(os.path.join(directory, 'step_8', 'state')))
  lines = []
  with Checkpointer(directory, create=False, log=lines.append) as reader:
    assert int(reader.restore(state)[0].step) == 5
  assert 'its arrays differ from the digests saved with them' in lines[0] or \
      'Error' in lines[0]
  assert 'step_8' in os.listdir(directory)  # a reader moves nothing


def test_no_whole_checkpoint_is_one_error_naming_each(two_checkpoints):
  directory, state = two_checkpoints
  for step in ('step_5', 'step_8'):
    truncate(os.path.join(directory, step, 'progress.json'))
  with Checkpointer(directory, create=False, log=quiet) as reader:
    with pytest.raises(InputError, match=r'no checkpoint reads back whole: step_8 \(.*\); '
                                         r'step_5 \('):
      reader.restore(state)


def test_a_failed_write_is_one_line_and_keeps_the_checkpoints_before(two_checkpoints):
  directory, state = two_checkpoints
  # A real write error from inside orbax: files may not grow past 100 kB.
  limits = resource.getrlimit(resource.RLIMIT_FSIZE)
  previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  with Checkpointer(directory, log=quiet) as checkpointer:
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, limits[1]))
    try:
      with pytest.raises(InputError) as error:
        checkpointer.save(state.replace(step=np.int32(12)), Progress(epoch=2, steps=4,
                                                                     epoch_done=False))
    finally:
      resource.setrlimit(resource.RLIMIT_FSIZE, limits)
      signal.signal(signal.SIGXFSZ, previous)
    assert str(error.value) == (
        f'could not write a checkpoint in {directory} (File too large); the checkpoints saved '
        'before (step_8, step_5) are intact. Free space or make the folder writable, then rerun '
        'the same command to resume.')
    assert [saved.name for saved in checkpointer.saved()] == ['step_8', 'step_5']
    assert int(checkpointer.restore(state)[0].step) == 8
  # Whatever of the failed save a writer thread left behind goes at the next start.
  with Checkpointer(directory, log=quiet):
    assert sorted(os.listdir(directory)) == ['step_5', 'step_8']


def test_checkpoints_of_earlier_versions_still_restore(tmp_path):
  import orbax.checkpoint as ocp
  state = create_train_state(jax.random.PRNGKey(0), CONFIG, classification_losses)
  items = {'params': state.params, 'opt_state': state.opt_state, 'step': np.int32(8),
           'rng': state.rng}
  # How earlier versions saved the end of epoch 2: checkpoints/2/default.
  manager = ocp.CheckpointManager(str(tmp_path), options=ocp.CheckpointManagerOptions(
      enable_async_checkpointing=False))
  manager.save(2, args=ocp.args.StandardSave(jax.device_get(items)))
  manager.close()
  with Checkpointer(str(tmp_path), log=quiet) as checkpointer:
    restored, progress = checkpointer.restore(
        create_train_state(jax.random.PRNGKey(1), CONFIG, classification_losses))
    assert int(restored.step) == 8 and progress == Progress.end_of(2)
    checkpointer.save(restored.replace(step=np.int32(12)), Progress.end_of(3))
    assert [s.name for s in checkpointer.saved()] == ['step_12', '2']  # the old one is older
  np.testing.assert_array_equal(restored.rng, state.rng)


# One trainer per folder.

def write_lock(workdir, **holder):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, LOCK_FILE), 'w') as f:
    json.dump({'pid': os.getpid(), 'host': socket.gethostname(), 'started': 'then', **holder}, f)


def dead_pid():
  proc = subprocess.Popen(['true'])
  proc.wait()
  return proc.pid


def test_a_live_holder_keeps_the_folder_and_is_named(tmp_path):
  workdir = str(tmp_path)
  write_lock(workdir)
  with pytest.raises(InputError, match=rf'^{workdir} is being trained by another process '
                                       rf'\(pid {os.getpid()} on {socket.gethostname()}, since '
                                       r'then\); wait for it to end or stop it'):
    WorkdirLock(workdir).__enter__()
  write_lock(workdir, host='elsewhere')  # another host, refreshed just now
  with pytest.raises(InputError, match='pid .* on elsewhere'):
    WorkdirLock(workdir).__enter__()


@pytest.mark.parametrize('holder, age', [
    ({'pid': 'dead'}, 0),                            # this host, its process ended
    ({'host': 'elsewhere'}, 16 * 60),                # another host, not refreshed for 16 minutes
    ({'process_start': 'another process'}, 0),       # this host, its pid taken by another process
])
def test_a_stale_lock_is_taken_over_and_released(tmp_path, holder, age):
  workdir = str(tmp_path)
  if holder.get('pid') == 'dead':
    holder = {'pid': dead_pid()}
  write_lock(workdir, **holder)
  path = os.path.join(workdir, LOCK_FILE)
  os.utime(path, (time.time() - age, time.time() - age))
  lines = []
  with WorkdirLock(workdir, log=lines.append):
    with open(path) as f:
      assert json.load(f)['pid'] == os.getpid()
  assert lines == [f'Took over the stale lock {path}.']
  assert not os.path.exists(path)


def test_an_evaluation_beside_a_trainer_reads_writes_nothing_and_says_so(tmp_path, task,
                                                                         uninterrupted):
  workdir = str(tmp_path / 'run')
  shutil.copytree(uninterrupted[0], workdir)
  write_lock(workdir)  # this process, alive: as a trainer would hold it
  before = {name: os.path.getmtime(os.path.join(workdir, name)) for name in os.listdir(workdir)}
  lines = []
  # Other epochs asked for: an evaluation records nothing, so run.json keeps its own.
  record = loop.train_and_evaluate(CONFIG.replace(epochs=7), task, workdir, eval_only=True,
                                   log=lines.append)
  assert lines[0] == (f'A training process (pid {os.getpid()} on {socket.gethostname()}, since '
                      f'then) is writing {workdir}; evaluating its newest checkpoint.')
  assert record['epoch'] == 3 and lines[-1].endswith('after epoch 3.')
  assert before == {name: os.path.getmtime(os.path.join(workdir, name))
                    for name in os.listdir(workdir)}


# The command line, as a user or a batch system stops it.

def start(*flags):
  return subprocess.Popen([sys.executable, '-m', 'experiments.mnist', *FLAGS, *flags], cwd=REPO,
                          env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_line(proc, prefix, timeout=120):
  deadline = time.time() + timeout
  for line in proc.stdout:
    if line.startswith(prefix):
      return line
    assert time.time() < deadline, f'no line starting {prefix!r}'
  raise AssertionError(f'the run ended without a line starting {prefix!r}: '
                       f'{proc.stderr.read()[-2000:]}')


def test_command_line_stops_resumes_and_ends_as_the_uninterrupted_run(tmp_path, data_dir, task,
                                                                      uninterrupted):
  workdir = str(tmp_path / 'run')
  flags = (f'--data_dir={data_dir}', f'--workdir={workdir}')
  # Ctrl-C once: the step ends, a checkpoint is saved, the command to resume is printed.
  proc = start(*flags)
  wait_for_line(proc, '  epoch 1/3 step 2/8')
  proc.send_signal(signal.SIGINT)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 130, stderr[-3000:]
  message, resume = stderr.strip().splitlines()[-2:]
  assert message.startswith('Stopped by SIGINT after step ') and 'of epoch 1' in message
  assert resume == f'  resume: python -m experiments.mnist {" ".join(FLAGS + list(flags))}'
  assert not os.path.exists(os.path.join(workdir, LOCK_FILE))

  # kill -9 after a checkpoint inside epoch 2: at most the steps since it are lost.
  proc = start(*flags, '--checkpoint_every_minutes=1e-9')
  wait_for_line(proc, '  epoch 2/3 step 5/8')
  # A second trainer in the same folder is refused, naming the first.
  with pytest.raises(InputError, match=rf'being trained by another process \(pid {proc.pid} '):
    loop.train_and_evaluate(CONFIG, task, workdir, log=quiet)
  proc.kill()
  proc.communicate()
  with Checkpointer(os.path.join(workdir, 'checkpoints'), create=False, log=quiet) as reader:
    newest = reader.saved()[0]
  # Step 5's progress line comes after the checkpoint of step 4 (run step 12), not step 5's.
  assert newest.step >= 12, newest

  # (That a second Ctrl-C ends the process at once: test_one_signal_asks_a_second_stops_at_once.)

  # The same command resumes, and the run ends as if nothing had happened.
  done = subprocess.run([sys.executable, '-m', 'experiments.mnist', *FLAGS, *flags], cwd=REPO,
                        env=ENV, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'Resumed from the checkpoint of ' in done.stdout
  assert done.stdout.strip().splitlines()[-1].endswith(' on 32 images after epoch 3.')
  assert not [name for name in os.listdir(os.path.join(workdir, 'checkpoints'))
              if not name.startswith('step_')]
  assert_same_run(workdir, uninterrupted[0])


@pytest.mark.parametrize('message', [
    'OUT_OF_RANGE: Error writing "a/0": Failed to write 9 bytes to file 7: File too large '
    "[os_error_code='27']",
    'OUT_OF_RANGE: Error opening "zarr" driver: Failed to write 9 bytes to file 7: File too large '
    '[tensorstore_spec=\'{"driver":"zarr"}\']',
    'RESOURCE_EXHAUSTED: Error writing "a/0": [os_error_code=27]',
])
def test_the_reason_of_a_failed_write_is_the_systems_words(message):
  from capsjax.training.checkpoint import _reason
  assert _reason(ValueError(message)) == os.strerror(errno.EFBIG)
