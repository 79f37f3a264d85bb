"""curves.png: one colour per split in every panel, and the learning rate drawn to its end."""

import matplotlib.colors
import numpy as np
import optax
from PIL import Image

from capsjax import visualize


def _records(epochs=4):
  schedule = optax.warmup_cosine_decay_schedule(0.0, 2e-3, 10, 10 * epochs)
  return [{'epoch': e, 'train_loss': 1 / e, 'train_accuracy': 1 - 0.1 / e,
           'validation_loss': 1.2 / e, 'validation_accuracy': 1 - 0.12 / e,
           'validation_error': 0.12 / e, 'validation_raw_loss': 1.3 / e,
           'validation_raw_accuracy': 1 - 0.13 / e, 'validation_raw_error': 0.13 / e,
           'test_loss': 1.1 / e, 'test_accuracy': 1 - 0.11 / e, 'test_error': 0.11 / e,
           'test_digit_accuracy': 1 - 0.05 / e,
           'affine_loss': 2 / e, 'affine_accuracy': 1 - 0.2 / e, 'affine_error': 0.2 / e,
           'learning_rate': float(schedule(10 * e))} for e in range(1, epochs + 1)]


def _lines_by_label(axes):
  return {line.get_label(): line for line in axes.lines}


def test_each_split_has_one_colour_in_every_panel():
  loss, error, _ = visualize.curves_figure(_records()).axes
  losses, errors = _lines_by_label(loss), _lines_by_label(error)
  expected = ['train', 'validation', 'validation, trained weights (not their EMA)', 'test',
              'affine test']
  assert list(losses) == expected and list(errors) == expected
  colours = {}
  for label in expected:
    a, b = (matplotlib.colors.to_hex(lines[label].get_color()) for lines in (losses, errors))
    assert a == b, label
    colours[label] = a
  assert len(set(colours.values())) == len(expected)  # no two splits share a colour


def test_a_sub_metric_is_not_taken_for_a_split():
  # 'test_digit_accuracy' (MultiMNIST) is a metric of the test split, not a split of its own.
  _, error, _ = visualize.curves_figure(_records()).axes
  assert not any('digit' in label for label in _lines_by_label(error))


def test_learning_rate_curve_reaches_the_schedules_final_zero():
  records = _records()
  assert records[-1]['learning_rate'] == 0.0  # the cosine schedule ends at 0
  _, _, rate = visualize.curves_figure(records).axes
  (line,) = rate.lines
  assert list(line.get_xdata()) == [1, 2, 3, 4]
  assert line.get_ydata()[-1] == 0.0
  assert rate.get_yscale() == 'linear' and rate.get_ylim()[0] <= 0.0


def test_training_curves_writes_a_png(tmp_path):
  path = str(tmp_path / 'curves.png')
  visualize.training_curves(_records(), path, title='t')
  with Image.open(path) as image:
    assert image.size[0] > image.size[1] > 100
    assert len(np.unique(np.asarray(image).reshape(-1, 3), axis=0)) > 10
  assert [p.name for p in tmp_path.iterdir()] == ['curves.png']
