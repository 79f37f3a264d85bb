"""Named recipes, the cosine schedule that spans a run, and the EMA of the weights.

The fast recipe must set exactly the flags it names and leave the paper's model
alone; its schedule must be the formula it claims; the evaluated weights must be
optax's EMA of the trained ones; and its validation split must never be trained on.
"""

import dataclasses
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from capsjax import data, settings, tasks
from capsjax.errors import InputError
from capsjax.tasks import classification_losses
from capsjax.training import (
  RECIPES,
  Task,
  TrainConfig,
  create_train_state,
  evaluation_params,
  loop,
  rundir,
  steps,
)
from capsjax.training.checkpoint import Checkpointer, Progress
from tests.conftest import REPO, write_dataset
from tests.test_loop import SMALL_FLAGS, mnist_task, run_cli, strict_records
from tests.test_train import SMALL, fixed_batch

# The paper's model: what no recipe may change.
MODEL_FIELDS = ('model', 'routing_iters', 'recon_weight', 'shift_pixels', 'conv_features',
                'primary_types', 'primary_dim', 'digit_dim', 'image_shape', 'num_classes')

CONFIG_SCRIPT = """
import json, sys, types
import numpy as np
from capsjax import settings
from experiments import common
common.FLAGS(['experiment', *sys.argv[1:]])
dataset = types.SimpleNamespace(train_images=np.zeros((1, 28, 28, 1), np.uint8), num_classes=10)
print(json.dumps(settings.flatten(common.config_from_flags(dataset))))
"""


def config_from_argv(*argv):
  """The TrainConfig experiments.common makes of a command line (in a process of its own:
  the experiments' flags are global, and other test modules define some of them too)."""
  proc = subprocess.run([sys.executable, '-c', CONFIG_SCRIPT, *argv], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  values = json.loads(proc.stdout.strip().splitlines()[-1])
  return TrainConfig.create(**{**values, 'image_shape': tuple(values['image_shape'])})


def test_fast_recipe_sets_exactly_its_fields_and_keeps_the_model():
  paper, fast = config_from_argv('--recipe=paper'), config_from_argv('--recipe=fast')
  assert paper == TrainConfig()
  assert fast == paper.replace(epochs=12, batch_size=64, learning_rate=2e-3,
                               lr_schedule='cosine', warmup_epochs=1.0, ema_decay=0.999)
  paper_settings, fast_settings = settings.flatten(paper), settings.flatten(fast)
  changed = {name for name in paper_settings if paper_settings[name] != fast_settings[name]}
  assert changed == set(RECIPES['fast'])
  assert not changed & set(MODEL_FIELDS)


def test_flags_given_on_the_command_line_win_over_the_recipe():
  config = config_from_argv('--recipe=fast', '--epochs=3', '--learning_rate=1e-3')
  assert (config.epochs, config.optimizer.learning_rate) == (3, 1e-3)
  assert (config.optimizer.lr_schedule, config.batch_size,
          config.optimizer.ema_decay) == ('cosine', 64, 0.999)


def test_cosine_schedule_warms_up_then_decays_to_zero_at_the_runs_end():
  config = TrainConfig.create(epochs=4, learning_rate=2e-3, lr_schedule='cosine',
                              warmup_epochs=1.0)
  steps_per_epoch = 10
  schedule = config.learning_rate_schedule(steps_per_epoch)
  warmup, total = 10, 40

  def expected(step):  # float64, from the definition
    if step < warmup:
      return 2e-3 * step / warmup
    progress = min(step - warmup, total - warmup) / (total - warmup)
    return 2e-3 * 0.5 * (1 + math.cos(math.pi * progress))

  for step in (0, 1, 5, 10, 11, 25, 39, 40, 45):
    assert float(schedule(step)) == pytest.approx(expected(step), rel=1e-5, abs=1e-12), step
  with pytest.raises(InputError, match='steps per epoch'):
    config.learning_rate_schedule()
  assert config.resumable_settings() == ('stop_at_validation_accuracy',)
  assert TrainConfig().resumable_settings() == ('epochs', 'stop_at_validation_accuracy')


def test_evaluated_weights_are_optaxs_ema_of_the_trained_weights():
  config = TrainConfig.create(shift_pixels=0, batch_size=16, ema_decay=0.9, **SMALL)
  state = create_train_state(jax.random.PRNGKey(0), config, classification_losses)
  # Before any step the evaluated weights are the initial ones.
  for a, b in zip(jax.tree.leaves(evaluation_params(state)), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(a, b)
  ema = optax.ema(0.9, debias=True)
  reference_state = ema.init(state.params)
  step = jax.jit(steps.train_step)
  for n in range(4):
    state, _ = step(state, fixed_batch(seed=n))
    expected, reference_state = ema.update(state.params, reference_state)
  got = evaluation_params(state)
  for a, b, trained in zip(jax.tree.leaves(got), jax.tree.leaves(expected),
                           jax.tree.leaves(state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got),
                                                     jax.tree.leaves(state.params)))
  # eval_step scores the average; the trained weights score differently.
  batch = fixed_batch(seed=9)
  sums = jax.jit(steps.eval_step)(state, batch)
  terms = classification_losses(state, expected, batch, False, None)
  np.testing.assert_allclose(sums['loss'], np.sum(terms['loss']), rtol=1e-5)
  raw = steps.eval_step(state.replace(ema=None), batch)
  assert float(raw['loss']) != pytest.approx(float(sums['loss']), rel=1e-6)


def test_weight_decay_shrinks_kernels_by_lr_times_decay_and_leaves_biases():
  # Two runs from the same initialisation on the same batch take the same Adam step;
  # AdamW's decoupled decay adds -lr * weight_decay * initial value, to kernels only.
  decay, lr = 0.5, 1e-3
  config = TrainConfig.create(shift_pixels=0, learning_rate=lr, **SMALL)
  decayed_config = config.replace(weight_decay=decay)
  step = jax.jit(steps.train_step)
  initial = create_train_state(jax.random.PRNGKey(0), config, classification_losses)
  plain, _ = step(initial, fixed_batch())
  decayed, _ = step(create_train_state(jax.random.PRNGKey(0), decayed_config,
                                       classification_losses), fixed_batch())
  kernels = 0
  for p0, a, b in zip(jax.tree.leaves(initial.params), jax.tree.leaves(plain.params),
                      jax.tree.leaves(decayed.params)):
    p0, a, b = (np.asarray(x, np.float64) for x in (p0, a, b))
    expected = -lr * decay * p0 if p0.ndim >= 2 else np.zeros_like(p0)
    kernels += p0.ndim >= 2
    np.testing.assert_allclose(b - a, expected, atol=1e-7)  # float32 rounding of the params
  assert kernels >= 4
  assert TrainConfig().optimizer.weight_decay == 0  # the paper trains with plain Adam
  with pytest.raises(InputError, match='weight_decay'):
    config.replace(weight_decay=-1.0).optimizer_transform()


def test_checkpoints_keep_the_ema(tmp_path):
  config = TrainConfig.create(ema_decay=0.99, **SMALL)
  state, _ = jax.jit(steps.train_step)(
      create_train_state(jax.random.PRNGKey(0), config, classification_losses), fixed_batch())
  with Checkpointer(str(tmp_path)) as checkpointer:
    checkpointer.save(state, Progress.end_of(1))
    restored, _ = checkpointer.restore(create_train_state(jax.random.PRNGKey(1), config,
                                                       classification_losses))
  assert int(restored.ema.count) == 1
  for a, b in zip(jax.tree.leaves(state.ema), jax.tree.leaves(restored.ema)):
    np.testing.assert_array_equal(a, b)


@pytest.fixture(scope='module')
def marked_dataset(tmp_path_factory):
  """A small dataset whose last 16 training images hold a pixel no other image has."""
  directory = write_dataset(str(tmp_path_factory.mktemp('marked')), num_train=64)
  dataset = data.load_idx_dir(directory)
  images = dataset.train_images.copy()
  images[:, 0, 0] = 0
  images[-16:, 0, 0] = 255
  return dataclasses.replace(dataset, train_images=images)


def test_a_cosine_ema_run_never_trains_on_its_validation_split(marked_dataset, tmp_path):
  seen = []

  def recording_batch(images, labels, indices, key=None):
    batch = steps.take_batch(images, labels, indices, key)
    if key is not None:  # a training batch
      jax.debug.callback(lambda corner: seen.append(np.asarray(corner)),
                         batch['image'][:, 0, 0, 0])
    return batch

  config = TrainConfig.create(epochs=2, batch_size=16, lr_schedule='cosine', warmup_epochs=0.5,
                              ema_decay=0.9, validation_examples=16, **SMALL)
  workdir = str(tmp_path / 'run')
  task = Task(name='mnist', dataset=marked_dataset, loss_fn=classification_losses,
              make_batch=recording_batch)
  record = loop.train_and_evaluate(config, task, workdir, log=lambda _: None)
  jax.effects_barrier()
  assert len(seen) == 6 and all(len(corner) == 16 for corner in seen)  # 48 examples, batch 16
  assert max(float(np.max(corner)) for corner in seen) == 0.0
  records = strict_records(os.path.join(workdir, rundir.METRICS_FILE))
  assert [r['learning_rate'] for r in records] == pytest.approx([
      float(config.learning_rate_schedule(3)(3)), 0.0])
  # The trained weights' validation figures sit beside the EMA's.
  _, state, _ = tasks.load_run(workdir)
  batch = {'image': jnp.asarray(marked_dataset.train_images[48:], jnp.float32) / 255.0,
           'label': jnp.asarray(marked_dataset.train_labels[48:])}
  for key, evaluated in (('validation', state), ('validation_raw', state.replace(ema=None))):
    sums = jax.device_get(jax.jit(steps.eval_step)(evaluated, batch))
    assert record[f'{key}_loss'] == pytest.approx(sums['loss'] / 16, rel=1e-5)
    assert record[f'{key}_accuracy'] == pytest.approx(sums['accuracy'] / 16)

  # Its schedule spans the two epochs: a resume that asks for more is refused.
  longer = config.replace(epochs=3)
  with pytest.raises(InputError,
                     match=r'epochs: saved 2, now 3[\s\S]*spans the run, so epochs may not'):
    loop.train_and_evaluate(longer, mnist_task(marked_dataset), workdir, log=lambda _: None)


def test_cli_fast_recipe_smoke_run(tmp_path):
  directory = write_dataset(str(tmp_path / 'data'), num_train=320, num_test=64)
  workdir = tmp_path / 'run'
  proc = run_cli('--recipe=fast', '--epochs=2', '--validation_examples=64',
                 f'--data_dir={directory}', f'--workdir={workdir}',
                 *[flag for flag in SMALL_FLAGS if not flag.startswith('--batch_size')])
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(workdir / rundir.RUN_FILE) as f:
    saved = json.load(f)
  assert {name: saved[name] for name in RECIPES['fast'] if name != 'epochs'} == {
      name: value for name, value in RECIPES['fast'].items() if name != 'epochs'}
  assert (saved['epochs'], saved['train_examples'], saved['validation_examples']) == (2, 256, 64)
  records = strict_records(workdir / rundir.METRICS_FILE)
  assert [r['step'] for r in records] == [4, 8]  # 256 examples in batches of 64
  assert records[-1]['learning_rate'] == 0.0
  for record in records:
    assert 0 <= record['validation_raw_accuracy'] <= 1 and 0 <= record['test_accuracy'] <= 1
  assert 'trained weights' in proc.stdout and (workdir / rundir.CURVES_FILE).exists()
