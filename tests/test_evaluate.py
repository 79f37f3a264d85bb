"""--eval_file: any trained run, evaluated on a file of examples, exactly and with clear errors."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from capsjax import data, files, tasks
from capsjax.analysis import evaluate
from capsjax.errors import InputError
from capsjax.training import evaluation_params, loop
from tests.conftest import write_dataset
from tests.test_loop import CONFIG, mnist_task, run_cli


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """(workdir, dataset) of a one-epoch run of the small CapsNet, with an EMA."""
  directory = write_dataset(str(tmp_path_factory.mktemp('data')), num_train=64, num_test=40)
  dataset = data.load_idx_dir(directory)
  workdir = str(tmp_path_factory.mktemp('run') / 'run')
  config = CONFIG.replace(ema_decay=0.5)
  loop.train_and_evaluate(config, mnist_task(dataset), workdir, log=lambda _: None)
  return workdir, dataset


def hand_accuracy(workdir, images, labels):
  """The share of images whose longest class capsule is their label, from the model itself."""
  _, state, _ = tasks.load_run(workdir)
  out = state.apply_fn({'params': evaluation_params(state)},
                       jnp.asarray(images, jnp.float32) / 255.0)
  return float(np.mean(np.argmax(np.asarray(out.lengths), -1) == labels))


def test_eval_file_gives_the_accuracy_of_the_models_predictions(trained, tmp_path):
  workdir, dataset = trained
  images, labels = dataset.test_images[:21], dataset.test_labels[:21]
  path = str(tmp_path / 'digits.npz')
  np.savez(path, image=images[..., 0], label=labels.astype(np.int64))  # [N, H, W], int64
  lines = []
  result = evaluate.evaluate_file(workdir, path, log=lines.append)
  expected = hand_accuracy(workdir, images, labels)
  assert result['accuracy'] == pytest.approx(expected)
  assert result['examples'] == 21 and result['epoch'] == 1 and result['step'] == 4
  assert result['error'] == pytest.approx(1 - expected)
  with open(evaluate.result_path(workdir, path)) as f:
    assert json.load(f)['accuracy'] == pytest.approx(expected)
  assert lines == [f'{path}: accuracy {100 * expected:.2f}% (error {100 - 100 * expected:.2f}%) '
                   f'on 21 examples, checkpoint of epoch 1 of {workdir}; wrote '
                   f'{evaluate.result_path(workdir, path)}.']


def test_cli_eval_file_prints_and_writes_the_same(trained, tmp_path):
  workdir, dataset = trained
  path = str(tmp_path / 'mine.npz')
  np.savez(path, image=dataset.test_images[:13], label=dataset.test_labels[:13])
  proc = run_cli(f'--eval_file={path}', f'--workdir={workdir}', timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, 'eval_mine.json')) as f:
    result = json.load(f)
  expected = hand_accuracy(workdir, dataset.test_images[:13], dataset.test_labels[:13])
  assert result['accuracy'] == pytest.approx(expected) and result['examples'] == 13
  assert f'accuracy {100 * expected:.2f}%' in proc.stdout

  bad = str(tmp_path / 'bad.npz')
  np.savez(bad, image=dataset.test_images[:13])
  proc = run_cli(f'--eval_file={bad}', f'--workdir={workdir}', timeout=120)
  assert proc.returncode == 1 and proc.stderr.startswith(f"error: {bad} lacks 'label'")
  assert len(proc.stderr.strip().splitlines()) == 1
  assert not os.path.exists(os.path.join(workdir, 'eval_bad.json'))


@pytest.mark.parametrize('arrays, message', [
    (dict(image=np.zeros((4, 28, 28, 1), np.uint8)), "lacks 'label'"),
    (dict(label=np.zeros(4, np.int32)), "lacks 'image'"),
    (dict(image=np.zeros((4, 32, 32, 1), np.uint8), label=np.zeros(4, np.int32)),
     r'holds 4 of \(32, 32, 1\) but the run was trained on \(28, 28, 1\)'),
    (dict(image=np.zeros((4, 28, 28, 3), np.uint8), label=np.zeros(4, np.int32)),
     r'holds 4 of \(28, 28, 3\)'),
    (dict(image=np.zeros((4, 28, 28), np.float32), label=np.zeros(4, np.int32)),
     "'image' is float32; give uint8"),
    (dict(image=np.zeros((4, 28, 28), np.uint8), label=np.array([0, 3, 10, 1])),
     r'labels span 0\.\.10, outside 0\.\.9; give class indices of the 10 classes'),
    (dict(image=np.zeros((4, 28, 28), np.uint8), label=np.array([0, -1, 2, 1])),
     r'labels span -1\.\.2, outside 0\.\.9'),
    (dict(image=np.zeros((4, 28, 28), np.uint8), label=np.zeros(4, np.float32)),
     'give 4 integer class indices'),
    (dict(image=np.zeros((4, 28, 28), np.uint8), label=np.zeros(3, np.int32)),
     'give 4 integer class indices'),
    (dict(image=np.zeros((0, 28, 28), np.uint8), label=np.zeros(0, np.int32)),
     'no examples'),
])
def test_bad_files_fail_with_one_clear_error_and_write_nothing(trained, tmp_path, arrays,
                                                               message):
  workdir, _ = trained
  path = str(tmp_path / 'file.npz')
  np.savez(path, **arrays)
  with pytest.raises(InputError, match=message):
    evaluate.evaluate_file(workdir, path)
  assert not os.path.exists(evaluate.result_path(workdir, path))


def test_files_that_are_no_npz_and_runs_that_are_none_are_named(trained, tmp_path):
  workdir, _ = trained
  text = tmp_path / 'notes.npz'
  text.write_text('not an archive')
  with pytest.raises(InputError, match=r'is not an \.npz of arrays'):
    evaluate.evaluate_file(workdir, str(text))
  with pytest.raises(InputError, match='no such file'):
    evaluate.evaluate_file(workdir, str(tmp_path / 'missing.npz'))
  with pytest.raises(InputError, match='no trained run there'):
    evaluate.evaluate_file(str(tmp_path / 'nothing'), str(text))


@pytest.mark.parametrize('write, message', [
    (lambda p, x, y: open(p, 'wb').close(), 'is not an .npz of arrays (EOFError'),
    (lambda p, x, y: np.save(open(p, 'wb'), x), 'holds one array, not an .npz of named arrays'),
    (lambda p, x, y: np.savez(p, image=np.uint8(3), label=np.int64(1)),
     "'image', 'label' hold a single value, not one per example"),
    (lambda p, x, y: np.savez(p, image=x, label=y[:, None]),
     'labels are shaped [21, 1]; this run needs [N] integer class indices'),
    (lambda p, x, y: np.savez(p, image=x, label=np.stack([y, y], 1)),
     'labels are shaped [21, 2]; this run needs [N] integer class indices'),
])
def test_bad_eval_files_are_one_line_naming_the_problem(trained, tmp_path, write, message):
  workdir, dataset = trained
  path = str(tmp_path / 'bad.npz')
  write(path, dataset.test_images[:21], dataset.test_labels[:21])
  config, _, _ = tasks.load_run(workdir)
  with pytest.raises(InputError) as error:
    evaluate.read_eval_file(path, config, label_shape=())
  assert message in str(error.value) and '\n' not in str(error.value)


def test_eval_file_on_a_run_it_cannot_write_prints_the_result(trained, tmp_path, monkeypatch):
  workdir, dataset = trained
  path = str(tmp_path / 'unwritten.npz')
  np.savez(path, image=dataset.test_images[:21], label=dataset.test_labels[:21])

  def refuse(target, value):  # what a read-only workdir does (root ignores chmod, so simulated)
    raise PermissionError(13, 'Permission denied', target)

  monkeypatch.setattr(files, 'write_json', refuse)
  lines = []
  result = evaluate.evaluate_file(workdir, path, log=lines.append)
  (line,) = lines
  assert line.startswith(f'{path}: accuracy {100 * result["accuracy"]:.2f}%')
  assert line.endswith(f'could not write {evaluate.result_path(workdir, path)} '
                       f'(Permission denied).')
  assert not os.path.exists(evaluate.result_path(workdir, path))


def test_export_into_a_missing_folder_is_one_line(tmp_path):
  with pytest.raises(InputError) as error:
    files.save_npz(str(tmp_path / 'nowhere' / 'pairs.npz'), {'a': np.zeros(2)})
  assert str(error.value) == (f'{tmp_path / "nowhere" / "pairs.npz"}: the folder '
                              f'{tmp_path / "nowhere"} does not exist; create it or write '
                              f'elsewhere.')
