"""`capsjax.training.loop` and what it relies on: runs that cannot silently go wrong.

Resume only into the same run, divergence that keeps the last good state, clear
errors for bad input, a cut-off metrics line, one-line errors for InputError
only, shifts keyed by the state's rng, and one loss function for both steps.
"""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image
import pytest

from capsjax import data, files, tasks, visualize
from capsjax.data import mnist
from capsjax.errors import InputError
from capsjax.nn.losses import capsnet_loss_terms
from capsjax.tasks import classification_losses
from capsjax.training import Task, TrainConfig, create_train_state, loop, rundir, steps
from capsjax.training.checkpoint import Checkpointer, Progress
from tests import reference
from tests.conftest import REPO, write_dataset

# lax.conv compiles in a fraction of the time of the default im2col convolutions.
SMALL = dict(conv_features=16, primary_types=4, primary_dim=4, digit_dim=8, batch_size=16,
             conv_impl='xla')
SMALL_FLAGS = ['--conv_features=16', '--primary_types=4', '--primary_dim=4', '--digit_dim=8',
               '--batch_size=16', '--conv_impl=xla', '--progress_seconds=1000']
CONFIG = TrainConfig.create(epochs=1, **SMALL)
# No huge-page restart of the subprocesses: it only costs time here.
ENV = dict(os.environ, GLIBC_TUNABLES='glibc.malloc.hugetlb=0')


def mnist_task(dataset, name='mnist'):
  """The classification Task of `dataset`, as experiments.mnist makes it (without pictures)."""
  return Task(name=name, dataset=dataset, loss_fn=classification_losses)


def run_cli(*flags, timeout=300):
  return subprocess.run([sys.executable, '-m', 'experiments.mnist', *flags], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout, env=ENV)


def strict_records(path):
  """metrics.jsonl parsed as strict JSON: NaN and Infinity are errors."""

  def refuse(constant):
    raise ValueError(f'{path} holds {constant}')

  with open(path) as f:
    return [json.loads(line, parse_constant=refuse) for line in f]


def read_bytes(path):
  with open(path, 'rb') as f:
    return f.read()


def fixed_batch(size=16, dtype=np.float32):
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(size, 28, 28, 1)).astype(np.float32) * 0.2
  labels = np.arange(size) % 10
  for n, label in enumerate(labels):
    images[n, 4 + 2 * label:8 + 2 * label, 6:22] = 1.0
  if dtype == np.uint8:
    images = (images * 255).astype(np.uint8)
  return {'image': jnp.asarray(images), 'label': jnp.asarray(labels, jnp.int32)}


@pytest.fixture(scope='module')
def small_state():
  return create_train_state(jax.random.PRNGKey(0), CONFIG, classification_losses)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return write_dataset(str(tmp_path_factory.mktemp('data')))


@pytest.fixture(scope='module')
def dataset(data_dir):
  return data.load_idx_dir(data_dir)


@dataclasses.dataclass(frozen=True)
class ExplodesInEpoch2(TrainConfig):
  """The learning rate jumps to 1e30 at the first step of epoch 2 (optimizer count 4)."""

  def learning_rate_schedule(self, steps_per_epoch=None):
    return optax.piecewise_constant_schedule(self.optimizer.learning_rate, {4: 1e33})


@pytest.fixture(scope='module')
def diverged_in_epoch_2(tmp_path_factory, dataset):
  """(workdir, Diverged) of a run whose epoch 1 trained and whose epoch 2 diverged.

  Its settings are CONFIG's but for the schedule and epochs=2, so the tests
  that resume a trained epoch 1 (with CONFIG) do it on copies of this workdir.
  """
  workdir = str(tmp_path_factory.mktemp('diverged') / 'run')
  config = ExplodesInEpoch2.from_flat({**CONFIG.flat(), 'epochs': 2})
  with pytest.raises(loop.Diverged) as error:
    loop.train_and_evaluate(config, mnist_task(dataset), workdir, log=lambda _: None)
  return workdir, error.value


@pytest.fixture
def workdir(diverged_in_epoch_2, tmp_path):
  copy = str(tmp_path / 'run')
  shutil.copytree(diverged_in_epoch_2[0], copy)
  return copy


# 1. A resume must be the same run.

def test_resume_with_other_settings_names_each_with_saved_and_new_values(workdir, dataset):
  metrics_before = read_bytes(os.path.join(workdir, 'metrics.jsonl'))
  changed = CONFIG.replace(epochs=5, routing_iters=2, seed=1, learning_rate=2e-3,
                           batch_size=32, dtype='bfloat16', train_examples=48)
  with pytest.raises(InputError) as error:
    loop.train_and_evaluate(changed, mnist_task(dataset, 'fashion_mnist'), workdir,
                            log=lambda _: None)
  message = str(error.value)
  assert message.startswith(f'{workdir} holds a run made with other settings')
  differences = {line for line in message.splitlines() if line.startswith('  ')}
  assert differences == {
      "  batch_size: saved 16, now 32",
      "  dataset: saved 'mnist', now 'fashion_mnist'",
      "  dtype: saved 'float32', now 'bfloat16'",
      "  learning_rate: saved 0.001, now 0.002",
      "  routing_iters: saved 3, now 2",
      "  seed: saved 0, now 1",
      "  train_examples: saved 64, now 48",
  }  # and not epochs (saved 2, now 5), which may change
  assert 'Rerun with the saved values to resume it, or pass another --workdir' in message
  assert read_bytes(os.path.join(workdir, 'metrics.jsonl')) == metrics_before


def test_resume_on_other_data_is_refused(workdir, tmp_path):
  other = data.load_idx_dir(write_dataset(str(tmp_path / 'other'), seed=1))
  with open(os.path.join(workdir, 'run.json')) as f:
    saved = json.load(f)['data_sha256']
  new = rundir.data_fingerprint(other.train_images, other.train_labels, other.test_images,
                                other.test_labels)
  assert new != saved
  with pytest.raises(InputError, match=re.escape(f'data_sha256: saved {saved!r}, now {new!r}')):
    loop.train_and_evaluate(CONFIG, mnist_task(other), workdir, log=lambda _: None)
  with open(os.path.join(workdir, 'run.json')) as f:
    assert json.load(f)['data_sha256'] == saved  # the refused run wrote nothing over it


def test_resume_with_other_architecture_is_refused_before_orbax(workdir, dataset):
  wider = CONFIG.replace(digit_dim=16)
  with pytest.raises(InputError, match=r'\n  digit_dim: saved 8, now 16\n'):
    loop.train_and_evaluate(wider, mnist_task(dataset), workdir, log=lambda _: None)


def test_cli_resume_with_other_flags_exits_with_one_error(workdir, data_dir):
  metrics_before = read_bytes(os.path.join(workdir, 'metrics.jsonl'))
  proc = run_cli('--epochs=3', '--routing_iters=2', f'--data_dir={data_dir}',
                 f'--workdir={workdir}', *SMALL_FLAGS, timeout=120)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert proc.stderr.startswith('error: ') and 'Traceback' not in proc.stderr
  assert '\n  routing_iters: saved 3, now 2\n' in proc.stderr
  assert read_bytes(os.path.join(workdir, 'metrics.jsonl')) == metrics_before


@pytest.fixture(scope='module')
def resumed(diverged_in_epoch_2, dataset, tmp_path_factory):
  """A copy of the run with one epoch trained, its metrics cut off mid-line, resumed to 3 epochs."""
  workdir = str(tmp_path_factory.mktemp('resumed') / 'run')
  shutil.copytree(diverged_in_epoch_2[0], workdir)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
    f.write('{"epoch": 2, "step": 8, "train_lo')  # killed while writing epoch 2
  lines, drawn = [], []
  draw = visualize.training_curves

  def spy(records, path, title=None):
    drawn.append([r['epoch'] for r in records])
    draw(records, path, title)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(visualize, 'training_curves', spy)
    record = loop.train_and_evaluate(CONFIG.replace(epochs=3), mnist_task(dataset), workdir,
                                     log=lines.append)
  return workdir, lines, record, drawn


def test_resume_may_change_epochs(resumed):
  workdir, lines, record, _ = resumed
  assert 'Resumed from the checkpoint of epoch 1 (step 4).' in lines
  assert record['epoch'] == 3 and record['step'] == 12
  with Checkpointer(os.path.join(workdir, 'checkpoints'), create=False) as checkpointer:
    assert [saved.step for saved in checkpointer.saved()] == [12, 8]


def test_curves_are_redrawn_each_epoch_from_every_epoch_of_the_run(resumed):
  workdir, _, _, drawn = resumed
  assert drawn == [[1, 2], [1, 2, 3]]  # epoch 1 from before the resume, the cut-off line not
  assert os.path.isfile(os.path.join(workdir, rundir.CURVES_FILE))


def curve_colours(records, path):
  visualize.training_curves(records, path)
  pixels = np.asarray(Image.open(path).convert('RGB')).reshape(-1, 3).astype(int)
  # Each split's own colour, the same in every panel (whichever other splits are drawn):
  # train, validation, test.
  return [int(np.sum(np.abs(pixels - colour).sum(axis=1) < 30))
          for colour in ((31, 119, 180), (255, 127, 14), (214, 39, 40))]


def test_training_curves_draw_the_series_the_records_hold(tmp_path):
  # A held-out split is drawn when the records hold its '{split}_error', as the loop's do.
  records = [{'epoch': e, 'train_loss': 1 / e, 'test_loss': 1.2 / e, 'train_accuracy': 1 - 0.1 / e,
              'test_accuracy': 1 - 0.05 / e, 'test_error': 0.05 / e,
              'learning_rate': 1e-3 * 0.9 ** e} for e in (1, 2, 3)]
  without = curve_colours(records, str(tmp_path / 'a.png'))
  with_validation = curve_colours(
      [{**r, 'validation_loss': r['test_loss'] * 0.9, 'validation_accuracy': 0.97,
        'validation_error': 0.03} for r in records],
      str(tmp_path / 'b.png'))
  assert without[0] > 200 and without[1] == 0 and without[2] > 200
  assert all(count > 200 for count in with_validation)
  assert Image.open(tmp_path / 'a.png').size[0] > 800


# 2. Divergence keeps the last good state.

def test_divergence_in_epoch_2_keeps_epoch_1(diverged_in_epoch_2, small_state):
  workdir, error = diverged_in_epoch_2
  schedule = ExplodesInEpoch2().learning_rate_schedule()
  assert float(schedule(3)) == pytest.approx(1e-3) and float(schedule(4)) == pytest.approx(1e30)
  # The step at lr 1e30 has a finite loss; the next one does not.
  assert re.search(r'the loss is (nan|inf|-inf) at step 2/4 of epoch 2 \(step 6 of the run\)',
                   str(error)), str(error)
  assert 'the last good checkpoint, of epoch 1, stays in' in str(error)
  with Checkpointer(os.path.join(workdir, 'checkpoints'), create=False) as checkpointer:
    assert [saved.step for saved in checkpointer.saved()] == [4]
    restored, progress = checkpointer.restore(small_state)
  assert int(restored.step) == 4 and progress.epoch == 1 and progress.epoch_done
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(restored.params))
  assert [r['epoch'] for r in strict_records(os.path.join(workdir, 'metrics.jsonl'))] == [1]


def test_cli_divergence_exits_with_one_line_and_saves_nothing(tmp_path, data_dir):
  workdir = tmp_path / 'run'
  proc = run_cli('--learning_rate=1e30', '--epochs=1', '--train_examples=32',
                 '--test_examples=16', f'--data_dir={data_dir}', f'--workdir={workdir}',
                 *SMALL_FLAGS)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert proc.stderr.startswith('error: training diverged: the loss is ')
  assert len(proc.stderr.strip().splitlines()) == 1
  assert 'no checkpoint was written' in proc.stderr
  checkpoints = workdir / 'checkpoints'
  assert not checkpoints.exists() or not os.listdir(checkpoints)
  metrics = workdir / 'metrics.jsonl'
  assert not metrics.exists() or metrics.read_text() == ''


# 3. Bad input gets a clear error.

@pytest.mark.parametrize('step', [steps.train_step, jax.jit(steps.train_step), steps.eval_step],
                         ids=['train_step', 'jit_train_step', 'eval_step'])
def test_steps_reject_uint8_images_saying_divide_by_255(small_state, step):
  with pytest.raises(InputError, match=r"batch\['image'\] is uint8; .*divide uint8 pixels by 255"):
    step(small_state, fixed_batch(dtype=np.uint8))


@pytest.mark.parametrize('image_scale,labels,message', [
    (255.0, np.arange(16) % 10, r'pixels must lie in \[0, 1\]'),
    (1.0, np.arange(16), r'labels in \[0, 15\]; they must lie in \[0, 10\)'),
    (1.0, np.arange(16) % 10 - 1, r'labels in \[-1, 8\]; they must lie in \[0, 10\)'),
], ids=['pixels_over_1', 'label_10_and_up', 'negative_label'])
def test_check_batch_names_the_range_broken(image_scale, labels, message):
  batch = fixed_batch()
  batch = {'image': np.asarray(batch['image']) * image_scale, 'label': labels.astype(np.int32)}
  with pytest.raises(InputError, match=message):
    steps.check_batch(batch, num_classes=10)


def test_check_batch_accepts_a_good_batch():
  assert steps.check_batch(fixed_batch(), num_classes=10) is None


def test_loop_refuses_labels_out_of_range(dataset, tmp_path):
  labels = dataset.train_labels.copy()
  labels[5] = 10
  bad = dataclasses.replace(dataset, train_labels=labels, source='by hand')
  workdir = tmp_path / 'run'
  with pytest.raises(InputError, match=re.escape('by hand (training split): labels span 0..10, '
                                                 'outside 0..9; give class indices of the 10')):
    loop.train_and_evaluate(CONFIG, mnist_task(bad), str(workdir), log=lambda _: None)
  assert not workdir.exists()


def test_tfds_labels_out_of_range_stop_without_a_download(monkeypatch, tmp_path):
  rng = np.random.default_rng(0)
  splits = [(rng.integers(0, 256, (8, 28, 28, 1), dtype=np.uint8), labels)
            for labels in (np.array([0, 1, 2, 3, 4, 5, 6, 12]), np.arange(8))]
  fake = types.ModuleType('tensorflow_datasets')
  fake.load = lambda name, **kwargs: name
  fake.as_numpy = lambda loaded: splits
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', fake)
  monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)

  def download(*args, **kwargs):
    raise AssertionError('fell back to a download')

  monkeypatch.setattr(mnist, 'download', download)
  with pytest.raises(data.DataError, match=re.escape('tfds mnist train: labels span 0..12, '
                                                     'outside 0..9; give class indices')):
    data.load_dataset('mnist', cache_dir=str(tmp_path), log=lambda _: None)


# 4. A metrics line cut off by a kill.

def test_partial_last_metrics_line_is_dropped_and_the_resume_proceeds(resumed):
  workdir, lines, _, _ = resumed
  path = os.path.join(workdir, 'metrics.jsonl')
  assert f'{path}: skipped its partial last line, written while an epoch was cut off before ' \
         f'its checkpoint.' in lines
  assert [r['epoch'] for r in strict_records(path)] == [1, 2, 3]


def test_broken_metrics_line_before_the_last_stops_the_resume(workdir, dataset):
  path = os.path.join(workdir, 'metrics.jsonl')
  with open(path) as f:
    good = f.read()
  with open(path, 'w') as f:
    f.write('{"epoch": 1, "st\n' + good)
  with pytest.raises(InputError, match=re.escape(f'{path}, line 1: not JSON; repair or remove')):
    loop.train_and_evaluate(CONFIG.replace(epochs=2), mnist_task(dataset), workdir,
                            log=lambda _: None)
  with open(path) as f:
    assert f.read() == '{"epoch": 1, "st\n' + good


# 5. Only InputError becomes a one-line error.

def run_main_raising(exception):
  code = textwrap.dedent(f'''
      from capsjax.errors import InputError
      from experiments import common

      def body():
        raise {exception}

      common.run_main(body)
  ''')
  return subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                        timeout=120, env=ENV)


def test_run_main_reports_input_error_in_one_line():
  proc = run_main_raising("InputError('bad thing')")
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == 'error: bad thing'
  assert 'Traceback' not in proc.stderr


def test_run_main_keeps_the_traceback_of_other_value_errors():
  proc = run_main_raising("ValueError('boom')")
  assert proc.returncode not in (0, None)
  assert 'Traceback' in proc.stderr and 'ValueError: boom' in proc.stderr
  assert 'error: boom' not in proc.stderr


# 6. The shifts come from the state's rng.

def first_step_loss(state, rng):
  _, metrics = jax.jit(steps.train_step)(state.replace(rng=rng), fixed_batch())
  return float(metrics['loss'])


def test_shifts_follow_the_state_rng():
  state = create_train_state(jax.random.PRNGKey(0), CONFIG.replace(recon_weight=0.0),
                             classification_losses)
  key_a, key_b = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
  loss_a = first_step_loss(state, key_a)
  assert first_step_loss(state, key_a) == loss_a
  assert first_step_loss(state, key_b) != loss_a


def test_without_shifts_the_rng_changes_nothing():
  state = create_train_state(jax.random.PRNGKey(0),
                             CONFIG.replace(recon_weight=0.0, shift_pixels=0),
                             classification_losses)
  assert (first_step_loss(state, jax.random.PRNGKey(1))
          == first_step_loss(state, jax.random.PRNGKey(2)))


def test_create_train_state_keys_the_rng_and_checkpoints_keep_it(small_state, tmp_path):
  other = create_train_state(jax.random.PRNGKey(1), CONFIG, classification_losses)
  assert not np.array_equal(small_state.rng, other.rng)
  with Checkpointer(str(tmp_path)) as checkpointer:
    checkpointer.save(small_state, Progress.end_of(1))
    restored, _ = checkpointer.restore(other)
  np.testing.assert_array_equal(restored.rng, small_state.rng)


# 7. Compilation is excluded from every process's speed.

def test_resumed_run_announces_compilation_once_and_does_not_time_it(resumed):
  workdir, lines, _, _ = resumed
  compiled = [line for line in lines if 'compiled and ran the first step' in line]
  assert len(compiled) == 1
  seconds = float(re.search(r'in ([0-9.]+)s', compiled[0]).group(1))
  epoch_2 = strict_records(os.path.join(workdir, 'metrics.jsonl'))[1]
  assert epoch_2['epoch'] == 2
  # Timing the compilation too would give at most 64 images in `seconds`.
  assert epoch_2['images_per_sec'] > 2 * 64 / max(seconds, 0.1)


# 8. One loss function for the library and the steps.

def test_capsnet_loss_terms_match_a_float64_reference():
  rng = np.random.default_rng(0)
  lengths = rng.uniform(0, 1, size=(6, 10)).astype(np.float32)
  targets = np.eye(10, dtype=np.float32)[rng.integers(0, 10, size=6)]
  images = rng.uniform(size=(6, 28, 28, 1)).astype(np.float32)
  reconstructions = rng.uniform(size=(6, 28, 28, 1)).astype(np.float32)
  terms = capsnet_loss_terms(lengths, targets, reconstructions, images, recon_weight=0.0005)
  margin = reference.margin_loss(lengths, targets)
  recon = np.sum((reconstructions.astype(np.float64) - images) ** 2, axis=(1, 2, 3))
  np.testing.assert_allclose(terms['margin_loss'], margin, rtol=1e-5)
  np.testing.assert_allclose(terms['reconstruction_loss'], recon, rtol=1e-5)
  np.testing.assert_allclose(terms['loss'], margin + 0.0005 * recon, rtol=1e-5)
  no_decoder = capsnet_loss_terms(lengths, targets)
  np.testing.assert_allclose(no_decoder['loss'], margin, rtol=1e-5)
  assert not np.any(no_decoder['reconstruction_loss'])


@pytest.mark.parametrize('training', [True, False], ids=['train', 'eval'])
def test_classification_losses_of_a_capsnet_are_its_loss_terms(small_state, training):
  batch = fixed_batch()
  images, labels = batch['image'], batch['label']
  # The decoder reconstructs from the true class's capsule in training and evaluation alike.
  out = small_state.apply_fn({'params': small_state.params}, images, labels)
  expected = capsnet_loss_terms(out.lengths, jax.nn.one_hot(labels, 10), out.reconstructions,
                                images, CONFIG.model.recon_weight)
  got = classification_losses(small_state, small_state.params, batch, training, None)
  assert set(got) == set(expected) | {'accuracy'}
  for name, value in expected.items():
    np.testing.assert_array_equal(got[name], value, err_msg=name)
  np.testing.assert_array_equal(got['accuracy'], jnp.argmax(out.lengths, -1) == labels)


# 5. A validation split held out from the training set.

def test_split_validation_holds_out_the_end_and_trains_on_the_rest():
  images, labels = np.arange(10) * 10, np.arange(10)
  train_x, train_y, valid_x, valid_y = loop.split_validation(images, labels, 3)
  np.testing.assert_array_equal(train_y, np.arange(7))
  np.testing.assert_array_equal(valid_y, [7, 8, 9])
  np.testing.assert_array_equal(valid_x, [70, 80, 90])
  train_x, train_y, _, valid_y = loop.split_validation(images, labels, 3, train_examples=4)
  np.testing.assert_array_equal(train_y, np.arange(4))
  assert not set(train_y) & set(valid_y)
  assert len(loop.split_validation(images, labels, 0)[2]) == 0
  with pytest.raises(InputError, match='--validation_examples=10 leaves none of the 10'):
    loop.split_validation(images, labels, 10)


def test_validation_metrics_are_the_held_out_examples_evaluated(dataset, tmp_path):
  workdir = str(tmp_path / 'run')
  lines = []
  record = loop.train_and_evaluate(CONFIG.replace(validation_examples=16), mnist_task(dataset),
                                   workdir, log=lines.append)
  with open(os.path.join(workdir, rundir.RUN_FILE)) as f:
    identity = json.load(f)
  assert identity['train_examples'] == 48 and identity['validation_examples'] == 16
  assert record['step'] == 3  # 48 examples in batches of 16: the held-out 16 were not trained on
  _, state, _ = tasks.load_run(workdir)
  batch = {'image': jnp.asarray(dataset.train_images[48:], jnp.float32) / 255.0,
           'label': jnp.asarray(dataset.train_labels[48:])}
  sums = jax.device_get(jax.jit(steps.eval_step)(state, batch))
  assert record['validation_accuracy'] == pytest.approx(sums['accuracy'] / 16)
  assert record['validation_loss'] == pytest.approx(sums['loss'] / 16, rel=1e-5)
  assert record['validation_error'] == pytest.approx(1 - record['validation_accuracy'])
  assert rundir.read_metrics(os.path.join(workdir, rundir.METRICS_FILE))[0]['validation_loss'] == \
      pytest.approx(record['validation_loss'])
  assert '16 validation (the last of the training split)' in lines[0]
  assert 'validation acc' in lines[-2]


def test_load_run_needs_a_loss_of_ones_own_given(workdir):
  run_file = os.path.join(workdir, rundir.RUN_FILE)
  with open(run_file) as f:
    identity = json.load(f)
  assert identity['loss'] == 'classification_losses'
  _, found, _ = tasks.load_run(workdir)
  files.write_json(run_file, {**identity, 'loss': 'my_losses'})
  with pytest.raises(InputError, match=r"its loss 'my_losses' is none of .*pass the function "
                                       r'itself, as load_run\(workdir, loss_fn\)'):
    tasks.load_run(workdir)
  _, given, _ = tasks.load_run(workdir, classification_losses)
  jax.tree.map(np.testing.assert_array_equal, found.params, given.params)


def test_a_run_ends_at_its_validation_target_and_resumes_past_it_only_if_raised(dataset, tmp_path):
  config = CONFIG.replace(validation_examples=16, epochs=2)
  free = loop.train_and_evaluate(config, mnist_task(dataset), str(tmp_path / 'free'),
                                 log=lambda _: None)
  accuracies = [r['validation_accuracy'] for r in rundir.read_metrics(
      str(tmp_path / 'free' / rundir.METRICS_FILE))]
  target = max(accuracies)
  assert target > 0 and free['epoch'] == 2
  first = accuracies.index(target) + 1  # the first epoch that reaches it
  workdir, lines = str(tmp_path / 'run'), []
  record = loop.train_and_evaluate(config.replace(stop_at_validation_accuracy=target),
                                   mnist_task(dataset), workdir, log=lines.append)
  assert record['epoch'] == first and record['validation_accuracy'] == target
  assert f'training ends after epoch {first}.' in lines[-2]
  assert len(rundir.read_metrics(os.path.join(workdir, rundir.METRICS_FILE))) == first
  # The same command again trains nothing; a higher target trains on, as a resume may.
  lines.clear()
  again = loop.train_and_evaluate(config.replace(stop_at_validation_accuracy=target),
                                  mnist_task(dataset), workdir, log=lines.append)
  assert any('it trains no further' in line for line in lines) and again['epoch'] == first
  assert len(rundir.read_metrics(os.path.join(workdir, rundir.METRICS_FILE))) == first
  raised = loop.train_and_evaluate(config.replace(stop_at_validation_accuracy=1.0),
                                   mnist_task(dataset), workdir, log=lambda _: None)
  assert raised['epoch'] == 2 or raised['validation_accuracy'] == 1.0
  with pytest.raises(InputError, match='needs a validation split to measure; add '
                                       '--validation_examples=5000'):
    TrainConfig.create(stop_at_validation_accuracy=0.99)
