"""A run's folder: resume only what can be checked, and damaged records named in one line."""

import json
import os

import jax
import pytest

from capsjax import tasks
from capsjax.errors import InputError
from capsjax.training import TrainConfig, create_train_state, rundir
from capsjax.training.checkpoint import Checkpointer, Progress

TINY = TrainConfig.create(conv_features=8, primary_types=2, primary_dim=4, digit_dim=4,
                          recon_weight=0.0, conv_impl='xla', epochs=1, batch_size=8)


@pytest.fixture(scope='module')
def checkpointed(tmp_path_factory):
  """A workdir with a checkpoint of epoch 1 and the run.json it was trained with."""
  workdir = str(tmp_path_factory.mktemp('run'))
  state = create_train_state(jax.random.PRNGKey(0), TINY, tasks.classification_losses, 4)
  with Checkpointer(os.path.join(workdir, rundir.CHECKPOINT_DIR)) as checkpointer:
    checkpointer.save(state, Progress.end_of(1))
  identity = {'dataset': 'mnist', 'loss': 'classification_losses', 'train_examples': 32,
              'test_examples': 8, **json.loads(json.dumps(TINY.flat()))}
  with open(os.path.join(workdir, rundir.RUN_FILE), 'w') as f:
    json.dump(identity, f)
  return workdir, identity


def _open(workdir, identity):
  with Checkpointer(os.path.join(workdir, rundir.CHECKPOINT_DIR)) as checkpointer:
    return rundir.open_run(workdir, identity, ('epochs',), checkpointer, write=True)


def test_a_matching_run_json_resumes_from_its_checkpoints(checkpointed):
  workdir, identity = checkpointed
  assert _open(workdir, identity) is True


def test_checkpoints_without_run_json_are_not_resumed_nor_run_json_written(checkpointed,
                                                                          tmp_path):
  workdir, identity = checkpointed
  copy = tmp_path / 'copy'
  os.makedirs(copy)
  os.symlink(os.path.join(workdir, rundir.CHECKPOINT_DIR), copy / rundir.CHECKPOINT_DIR)
  with pytest.raises(InputError) as error:
    _open(str(copy), identity)
  assert str(error.value) == (
      f'{copy} holds checkpoints (the newest step_0) but no run.json, so whether they were '
      f'trained with these settings cannot be checked; restore its run.json, or pass another '
      f'--workdir to start a new run.')
  assert not (copy / rundir.RUN_FILE).exists()


@pytest.mark.parametrize('content, problem', [
    ('{"dataset": "mni', 'is damaged (JSONDecodeError'),
    ('', 'is damaged (JSONDecodeError'),
    ('[]', 'holds a list, not the JSON object of a run'),
    ('\xff\xfe', 'is damaged (UnicodeDecodeError'),
])
def test_a_damaged_run_json_is_one_line_naming_it(tmp_path, content, problem):
  os.makedirs(tmp_path / rundir.CHECKPOINT_DIR)
  with open(tmp_path / rundir.RUN_FILE, 'wb') as f:
    f.write(content.encode('latin-1'))
  with pytest.raises(InputError) as error:
    tasks.load_run(str(tmp_path))
  message = str(error.value)
  assert message.startswith(f'{tmp_path / rundir.RUN_FILE} {problem}')
  assert '\n' not in message and message.endswith('start a new run.')


@pytest.mark.parametrize('line', ['{"step": 3}', '42', '"epoch"', '{"epoch": "1"}',
                                  '\x00\xff\xfe garbage'])
def test_metrics_lines_that_are_not_epochs_are_named_with_their_line(tmp_path, line):
  path = tmp_path / rundir.METRICS_FILE
  with open(path, 'wb') as f:
    f.write(('{"epoch": 1}\n' + line + '\n{"epoch": 2}\n').encode('latin-1'))
  with pytest.raises(InputError) as error:
    rundir.read_metrics(str(path))
  assert str(error.value).startswith(f'{path}, line 2: not ')
  assert str(error.value).endswith('repair or remove the line.')


def test_a_cut_last_metrics_line_is_skipped_and_said(tmp_path):
  path = tmp_path / rundir.METRICS_FILE
  path.write_text('{"epoch": 1}\n{"epoch": 2, "te')
  lines = []
  assert rundir.read_metrics(str(path), log=lines.append) == [{'epoch': 1}]
  assert len(lines) == 1 and 'partial last line' in lines[0]
