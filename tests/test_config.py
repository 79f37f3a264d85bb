"""The nested config: one flag per setting, validation in one place, run.json's flat form."""

import json
import math
import subprocess
import sys

import pytest

from capsjax import settings
from capsjax.errors import InputError
from capsjax.models import ModelConfig
from capsjax.training import RECIPES, TrainConfig, rundir
from capsjax.training.config import OptimizerConfig
from tests.conftest import REPO

# A run.json's settings as the flat TrainConfig of earlier versions recorded them
# (dataclasses.asdict of 25 fields), which an old run's workdir still holds.
OLD_RUN_SETTINGS = {
    'model': 'baseline', 'routing_iters': 1, 'epochs': 12, 'batch_size': 64,
    'learning_rate': 0.002, 'lr_decay': 0.96, 'lr_decay_steps': 2000, 'lr_schedule': 'cosine',
    'warmup_epochs': 1.0, 'ema_decay': 0.999, 'weight_decay': 0.0, 'recon_weight': 0.0,
    'shift_pixels': 2, 'seed': 3, 'dtype': 'float32', 'conv_impl': 'auto',
    'image_shape': [40, 40, 1], 'num_classes': 10, 'conv_features': 256, 'primary_types': 32,
    'primary_dim': 8, 'digit_dim': 16, 'dropout_rate': 0.5, 'baseline_conv3_features': 96,
    'baseline_pool': 2,
}


def test_defaults_are_the_papers_recipe():
  config = TrainConfig()
  assert (config.model.name, config.model.routing_iters, config.model.recon_weight) == (
      'capsnet', 3, 0.0005)
  assert (config.epochs, config.batch_size, config.optimizer.learning_rate,
          config.optimizer.lr_decay, config.data.shift_pixels) == (50, 128, 1e-3, 0.96, 2)


def test_an_old_flat_run_json_builds_the_nested_config_and_records_the_same():
  config = TrainConfig.from_flat({**OLD_RUN_SETTINGS, 'dataset': 'mnist', 'loss': 'x'})
  assert config.model.name == 'baseline' and config.model.image_shape == (40, 40, 1)
  assert config.model.baseline_pool == 2 and config.optimizer.ema_decay == 0.999
  assert config.seed == 3 and config.epochs == 12
  flat = config.flat()
  recorded = {k: v for k, v in flat.items()
              if k not in ('train_examples', 'validation_examples', 'test_examples')}
  assert recorded.pop('routing') == 'dynamic'  # settings added since: their defaults
  assert recorded.pop('stop_at_validation_accuracy') == 0.0
  assert {**recorded, 'image_shape': list(flat['image_shape'])} == OLD_RUN_SETTINGS


def test_a_run_saved_before_a_setting_existed_resumes_with_its_default():
  current = json.loads(json.dumps(TrainConfig().flat()))
  saved = {name: value for name, value in current.items() if name != 'routing'}
  rundir.check_resumable(saved, current, 'runs/old')
  with pytest.raises(InputError, match="\n  routing: saved 'dynamic', now 'em'\n"):
    rundir.check_resumable(saved, {**current, 'routing': 'em'}, 'runs/old')


def test_create_and_replace_set_leaves_by_flag_name():
  config = TrainConfig.create(model='baseline', learning_rate=3e-3, epochs=2)
  assert config.model.name == 'baseline' and config.optimizer.learning_rate == 3e-3
  changed = config.replace(epochs=5, progress_seconds=1.0)
  assert changed.epochs == 5 and changed.run.progress_seconds == 1.0
  assert changed.model == config.model and config.epochs == 2  # frozen: a new config
  with pytest.raises(InputError, match='no such settings: routing_iterations'):
    config.replace(routing_iterations=2)


@pytest.mark.parametrize('settings_, message', [
    ({'learning_rate': math.nan}, '--learning_rate=nan: give a finite number.'),
    ({'learning_rate': math.inf}, '--learning_rate=inf: give a finite number.'),
    ({'seed': -1}, '--seed=-1: must be at least 0.'),
    ({'model': 'resnet'}, '--model=resnet: choose one of capsnet, baseline, efficient_capsnet.'),
    ({'dropout_rate': 1.0}, '--dropout_rate=1.0: must be below 1.'),
    ({'ema_decay': 1.0}, '--ema_decay=1.0: must be below 1.'),
    ({'lr_decay': 1.5}, '--lr_decay=1.5: must be at most 1.'),
    ({'routing_iters': 0}, '--routing_iters=0: must be at least 1.'),
    ({'lr_schedule': 'step'}, '--lr_schedule=step: choose one of exponential, cosine.'),
])
def test_invalid_settings_are_refused_naming_the_flag(settings_, message):
  with pytest.raises(InputError) as error:
    TrainConfig.create(**settings_)
  assert str(error.value) == message


def test_sub_configs_validate_on_their_own():
  with pytest.raises(InputError, match='--digit_dim=0'):
    ModelConfig(digit_dim=0)
  with pytest.raises(InputError, match='--weight_decay=-0.1'):
    OptimizerConfig(weight_decay=-0.1)


def test_every_recipe_sets_settings_that_exist():
  names = set(settings.flatten(TrainConfig()))
  for recipe, values in RECIPES.items():
    assert set(values) <= names, recipe
    TrainConfig.create(**values)  # and valid ones


def test_flag_names_are_unique_and_each_is_defined_once_with_the_configs_default():
  leaves = [(settings.flag_name(f), default) for _, f, default in settings.leaves(TrainConfig)
            if settings.is_setting(f)]
  names = [name for name, _ in leaves]
  assert len(names) == len(set(names))
  # In a process of its own: absl's flags are global to a process.
  code = ('from experiments import common\n'
          'from absl import flags\n'
          'print(repr({n: flags.FLAGS[n].default for n in common.SETTING_FLAGS}))\n')
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                       check=True).stdout
  assert eval(out) == dict(leaves)  # noqa: S307 (our own repr of ints, floats and strings)
