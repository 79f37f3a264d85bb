"""Pictures of what the model does: reconstructions, capsule dimensions, routing maps, curves."""

import itertools
from typing import TYPE_CHECKING, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from capsjax.files import atomic_path

if TYPE_CHECKING:  # matplotlib is imported only where a figure is drawn (*_figure)
  from matplotlib.figure import Figure

# White pixels between tiles, so neighbouring black digit backgrounds stay apart.
_GAP = 2
# Marks the predicted class; no heat-map colour is blue, so it cannot be mistaken.
_HIGHLIGHT = (0, 90, 220)


def _tile(pixels, size):
  """Magnify a picture with nearest-neighbour resampling, keeping its pixels visible.

  Args:
    pixels: float [h, w] (grey) or [h, w, 3] (RGB) in [0, 1]; values outside are clipped.
    size: (width, height) of the result in pixels.

  Returns:
    A PIL image ('L' or 'RGB').
  """
  return Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8)).resize(
      size, Image.NEAREST)


def _heat_colours(values):
  """Colour map black -> red -> yellow -> white, bright where values are large.

  Args:
    values: float [...] in [0, 1].

  Returns:
    float [..., 3] RGB in [0, 1]; red, green and blue rise in turn over thirds of the range.
  """
  return np.clip(np.clip(values, 0, 1)[..., None] * 3 - np.arange(3), 0, 1)


def _line_height(font):
  """Pixels one line of text takes, with a little air below.

  Args:
    font: a PIL font.

  Returns:
    int.
  """
  return font.getbbox('Ag0')[3] + 4


def _save(canvas, path):
  """Write canvas to path under a temporary name and rename, so no reader sees half a picture.

  Args:
    canvas: a PIL image.
    path: the .png to write.
  """
  with atomic_path(path, '.png') as partial:
    canvas.save(partial)


def _panel_grid(panels, captions, wrong, path, scale, columns):
  """Write a PNG of cells, each the same example's panels side by side over its caption.

  Args:
    panels: list of float arrays [N, H, W] (grey) or [N, H, W, 3] (RGB) in [0, 1].
    captions: N strs; wrong: N bools, captioned in red when True.
    path: the .png to write; scale: pixel magnification; columns: cells per row.
  """
  count, height, width = panels[0].shape[:3]
  tile = (width * scale, height * scale)
  cell_w, cell_h = len(panels) * (tile[0] + 2) + 4, tile[1] + 16
  rows = -(-count // columns)
  canvas = Image.new('RGB', (columns * cell_w, rows * cell_h), 'white')
  draw = ImageDraw.Draw(canvas)
  for n in range(count):
    x, y = (n % columns) * cell_w, (n // columns) * cell_h
    for p, panel in enumerate(panels):
      canvas.paste(_tile(panel[n], tile), (x + p * (tile[0] + 2), y))
    draw.text((x + 2, y + tile[1] + 1), captions[n], fill='red' if wrong[n] else 'black')
  _save(canvas, path)


def reconstruction_grid(images: np.ndarray, reconstructions: np.ndarray, labels: np.ndarray,
                        predictions: np.ndarray, path: str, scale: int = 3,
                        columns: int = 8) -> None:
  """Write a PNG: each cell shows a digit, its reconstruction, and 'label/prediction'.

  Wrong predictions are captioned in red. The file is written under a temporary
  name and renamed, so a reader never sees half a picture.

  Args:
    images, reconstructions: float [N, H, W, 1] in [0, 1].
    labels, predictions: int [N].
    path: the .png to write.
    scale: pixel magnification.
    columns: cells per row.
  """
  _panel_grid([images[..., 0], reconstructions[..., 0]],
              [f'label {l}  pred {p}' for l, p in zip(labels, predictions)],
              np.asarray(labels) != np.asarray(predictions), path, scale, columns)


def pair_sheet(images: np.ndarray, true_reconstructions: np.ndarray,
               predicted_reconstructions: np.ndarray, labels: np.ndarray,
               predictions: np.ndarray, path: str, scale: int = 3, columns: int = 4) -> None:
  """Write a PNG of the paper's Figure 5: a MultiMNIST input beside its two reconstructions.

  Each cell: the input; the two digits reconstructed from the true classes'
  capsules, the first in red and the second in green, on top of each other
  (yellow where they overlap); the same from the two predicted capsules. The
  caption gives 'L a,b  P c,d', in red when the prediction is wrong.

  Args:
    images: float [N, H, W, 1] in [0, 1], the merged inputs.
    true_reconstructions, predicted_reconstructions: float [N, 2, H, W, 1].
    labels, predictions: int [N, 2].
    path: the .png to write.
    scale: pixel magnification; columns: cells per row.
  """
  overlay = lambda r: np.concatenate([r[:, 0], r[:, 1], np.zeros_like(r[:, 0])], axis=-1)
  labels, predictions = np.asarray(labels), np.asarray(predictions)
  wrong = [set(l) != set(p) for l, p in zip(labels.tolist(), predictions.tolist())]
  _panel_grid([images[..., 0], overlay(true_reconstructions), overlay(predicted_reconstructions)],
              [f'L {l[0]},{l[1]}  P {p[0]},{p[1]}' for l, p in zip(labels, predictions)],
              wrong, path, scale, columns)


def dimension_sheet(images: np.ndarray, path: str, values: np.ndarray,
                    title: Optional[str] = None, captions: Optional[Sequence[str]] = None,
                    scale: int = 2) -> None:
  """Write a PNG of the paper's Figure 4: one row per capsule dimension, one column per offset.

  Rows are labelled 'd0', 'd1', ... at the left and columns with their offsets
  ('-0.25' ... '+0.25') along the top; the '0.00' column is the plain
  reconstruction. Several examples are drawn as blocks stacked vertically, each
  with its own caption and column labels.

  Args:
    images: float [dim, num_values, H, W, 1] in [0, 1] for one example (what
      `capsjax.analysis.interpret.decode_perturbations` returns), or
      [N, dim, num_values, H, W, 1] for N examples.
    path: the .png to write.
    title: optional str, a line at the top.
    captions: optional N strs, one above each block (e.g. 'digit 3, label 7,
      predicted 7').
    values: float [num_values], the offsets, for the column labels.
    scale: int pixel magnification of each decoded image.
  """
  blocks = images[None] if images.ndim == 5 else images
  count, dim, num_values, height, width = blocks.shape[:5]
  font = ImageFont.load_default()
  line = _line_height(font)
  tile_w, tile_h = width * scale, height * scale
  left = font.getbbox(f'd{dim - 1}')[2] + 6
  block_h = (line if captions is not None else 0) + line + dim * (tile_h + _GAP) + line // 2
  top = line if title else 0
  canvas = Image.new('RGB', (left + num_values * (tile_w + _GAP), top + count * block_h), 'white')
  draw = ImageDraw.Draw(canvas)
  if title:
    draw.text((2, 1), title, fill='black', font=font)
  labels = [f'{v:+.2f}' if v else '0.00' for v in np.asarray(values, np.float64)]
  for n in range(count):
    y = top + n * block_h
    if captions is not None:
      draw.text((2, y + 1), captions[n], fill='black', font=font)
      y += line
    for v, text in enumerate(labels):
      draw.text((left + v * (tile_w + _GAP) + tile_w // 2, y + line // 2), text, fill='black',
                font=font, anchor='mm')
    y += line
    for d in range(dim):
      row_y = y + d * (tile_h + _GAP)
      draw.text((left - 4, row_y + tile_h // 2), f'd{d}', fill='black', font=font, anchor='rm')
      for v in range(num_values):
        canvas.paste(_tile(blocks[n, d, v, ..., 0], (tile_w, tile_h)),
                     (left + v * (tile_w + _GAP), row_y))
  _save(canvas, path)


def coupling_figure(image: np.ndarray, maps: np.ndarray, label: Union[int, np.ndarray],
                    prediction: Union[int, np.ndarray], path: str,
                    title: Optional[str] = None, scale: int = 3) -> None:
  """Write a PNG: each input digit, then one heat map of its routing per class.

  Each row shows the digit (captioned 'label L pred P', red when wrong), then
  the class maps from `capsjax.analysis.interpret.coupling_maps` magnified to the digit's
  size, captioned with the class index; the predicted class is framed and
  captioned in blue. Colours run black -> red -> yellow -> white on one scale
  per row, shared by all its classes so they compare, from the row's smallest
  to its largest value, both shown on the colour bar at the right (routing's
  couplings stay near uniform, and a scale from 0 would hide their differences). A map
  cell is a PrimaryCaps position, whose receptive field is much larger than the cell it is drawn as,
  so the maps are a coarse guide to where evidence comes from, not pixel-aligned.

  Args:
    image: float [H, W, 1] in [0, 1], or [N, H, W, 1] for N rows.
    maps: float [num_classes, h, w] >= 0, or [N, num_classes, h, w].
    label, prediction: int, or int [N].
    path: the .png to write.
    title: optional str, a line at the top.
    scale: int pixel magnification of the digit; maps are drawn the same size.
  """
  images = image if image.ndim == 4 else image[None]
  maps = maps if maps.ndim == 4 else maps[None]
  labels, predictions = np.atleast_1d(label), np.atleast_1d(prediction)
  count, height, width = images.shape[:3]
  num_classes = maps.shape[1]
  font = ImageFont.load_default()
  line = _line_height(font)
  size = tile_w, tile_h = width * scale, height * scale
  # Room for the 2-pixel frame around the predicted map.
  cell_w, row_h = tile_w + 6, tile_h + 6 + line
  maps_x = tile_w + 12
  bar_x = maps_x + num_classes * cell_w + 4
  top = line if title else 0
  canvas = Image.new('RGB', (bar_x + 60, top + count * row_h), 'white')
  draw = ImageDraw.Draw(canvas)
  if title:
    draw.text((2, 1), title, fill='black', font=font)
  bar = _tile(_heat_colours(np.linspace(1, 0, tile_h))[:, None], (10, tile_h))
  for n in range(count):
    y = top + n * row_h + 3
    canvas.paste(_tile(images[n, ..., 0], size), (0, y))
    right = labels[n] == predictions[n]
    draw.text((0, y + tile_h + 3), f'label {labels[n]}  pred {predictions[n]}',
              fill='black' if right else 'red', font=font)
    low, peak = float(maps[n].min()), float(maps[n].max())
    heat = _heat_colours((maps[n] - low) / max(peak - low, np.finfo(np.float32).tiny))
    for j in range(num_classes):
      x = maps_x + j * cell_w + 3
      canvas.paste(_tile(heat[j], size), (x, y))
      chosen = j == predictions[n]
      if chosen:
        draw.rectangle((x - 3, y - 3, x + tile_w + 2, y + tile_h + 2), outline=_HIGHLIGHT,
                       width=2)
      # A grey outline keeps a white (hottest) map distinct from the page.
      draw.rectangle((x - 1, y - 1, x + tile_w, y + tile_h), outline=(160, 160, 160))
      draw.text((x + tile_w // 2, y + tile_h + 3 + line // 2), str(j),
                fill=_HIGHLIGHT if chosen else 'black', font=font, anchor='mm')
    canvas.paste(bar, (bar_x, y))
    draw.text((bar_x + 14, y), f'{peak:.3g}', fill='black', font=font, anchor='lt')
    draw.text((bar_x + 14, y + tile_h), f'{low:.3g}', fill='black', font=font, anchor='lb')
  _save(canvas, path)


def _error_percent(accuracy):
  return 100.0 * (1.0 - accuracy)


# One colour per split, the same in every panel; further test sets take the rest in turn.
_SPLIT_COLOURS = {'train': 'tab:blue', 'validation': 'tab:orange',
                  'validation_raw': 'tab:green', 'test': 'tab:red'}
_MORE_COLOURS = ('tab:purple', 'tab:brown', 'tab:pink', 'tab:olive', 'tab:cyan', 'tab:gray')
_SPLIT_NAMES = {'validation_raw': 'validation, trained weights (not their EMA)'}


def curve_splits(records: Sequence[dict]) -> List[Tuple[str, str, str]]:
  """The splits a run's records measure, in drawing order, with their legend and colour.

  A held-out split is one with a '{split}_error' (`capsjax.training.loop`
  records one for every split it evaluates); 'train' comes first.

  Args:
    records: list of metrics dicts.

  Returns:
    list of (split, legend, colour).
  """
  found = {key[:-len('_error')] for r in records for key in r if key.endswith('_error')}
  held_out = [s for s in _SPLIT_COLOURS if s in found] + sorted(found - set(_SPLIT_COLOURS))
  more = itertools.cycle(_MORE_COLOURS)
  return [(split, _SPLIT_NAMES.get(split, split if split in _SPLIT_COLOURS else f'{split} test'),
           _SPLIT_COLOURS.get(split) or next(more)) for split in ['train', *held_out]]


def curves_figure(records: Sequence[dict], title: Optional[str] = None) -> 'Figure':
  """A run's curves per epoch: loss, error (log scales) and learning rate, as a Figure.

  Every split the records measure is drawn (see `curve_splits`), in the same
  colour in each panel. The learning rate is on a linear scale, so a schedule
  that ends at 0 is drawn to its end.

  Args:
    records: list of metrics dicts, one per epoch, each with 'epoch' and any of
      '{split}_loss', '{split}_accuracy' (in [0, 1]) and 'learning_rate' (see
      `capsjax.training.loop`).
    title: optional line above the panels.

  Returns:
    A `matplotlib.figure.Figure` with an Agg canvas.
  """
  # Figure and the Agg canvas directly, not pyplot: no global backend is chosen, so
  # a notebook's own matplotlib setup is left alone.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  from matplotlib.ticker import MaxNLocator

  splits = curve_splits(records)
  panels = (  # (title, y label, y scale, ((record key, legend, colour, transform), ...))
      ('Loss', 'mean loss', 'log',
       [(f'{split}_loss', legend, colour, None) for split, legend, colour in splits]),
      ('Error', 'error (%)', 'log',
       [(f'{split}_accuracy', legend, colour, _error_percent) for split, legend, colour in splits]),
      ('Learning rate', 'learning rate', 'linear',
       [('learning_rate', 'at epoch end', 'black', None)]),
  )
  figure = Figure(figsize=(13, 3.8), dpi=90, layout='constrained')
  FigureCanvasAgg(figure)
  for axes, (name, ylabel, scale, curves) in zip(figure.subplots(1, len(panels)), panels):
    for key, legend, colour, transform in curves:
      points = [(r['epoch'], transform(r[key]) if transform else r[key])
                for r in records if key in r]
      if points:
        epochs, values = zip(*points)
        axes.plot(epochs, values, marker='o', markersize=3, label=legend, color=colour)
    if axes.lines:
      axes.set_yscale(scale)
      axes.legend(fontsize=8)
    if scale == 'linear':
      axes.set_ylim(bottom=0)
    axes.set(title=name, xlabel='epoch', ylabel=ylabel)
    axes.grid(True, which='both', alpha=0.3)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    if records:  # half an epoch of margin, so one epoch still gets an integer tick
      axes.set_xlim(records[0]['epoch'] - 0.5, records[-1]['epoch'] + 0.5)
  if title:
    figure.suptitle(title, fontsize=10)
  return figure


def _save_figure(figure: 'Figure', path: str) -> None:
  """Draw a Figure with an Agg canvas and write it to the PNG `path`, whole or not at all."""
  figure.canvas.draw()
  _save(Image.fromarray(np.asarray(figure.canvas.buffer_rgba())).convert('RGB'), path)


def training_curves(records: Sequence[dict], path: str, title: Optional[str] = None) -> None:
  """Write `curves_figure(records, title)` to the PNG `path`, whole or not at all."""
  _save_figure(curves_figure(records, title), path)


def routing_iterations_figure(records: Mapping[int, Sequence[dict]],
                              logit_changes: Mapping[int, Optional[Sequence[float]]],
                              title: Optional[str] = None) -> 'Figure':
  """The routing-iterations study (the paper's appendix) as a Figure of two panels.

  (a) Training (dashed) and test (solid) error per epoch of each run, one
  colour per number of routing iterations r, on a log scale. (b) In the same
  colours, the mean absolute change of the routing logits |b_ij(t) - b_ij(t-1)|
  at each routing iteration t = 1 .. r - 1 of each run, on a log scale (see
  `capsjax.analysis.interpret.routing_logit_changes`). A run with r = 1 updates
  no logit, and a run whose changes were not measured (None: routings other than
  dynamic) has none to draw; panel (b)'s legend says so in its colour.

  Args:
    records: r -> that run's metrics dicts, one per epoch, each with 'epoch',
      'train_accuracy' and 'test_accuracy' (in [0, 1]), as metrics.jsonl holds them.
    logit_changes: r -> floats [r - 1], the mean |b_ij(t) - b_ij(t-1)| for
      t = 1 .. r - 1, or None where not measured.
    title: optional line above the panels.

  Returns:
    A `matplotlib.figure.Figure` with an Agg canvas.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  from matplotlib.lines import Line2D
  from matplotlib.ticker import MaxNLocator

  figure = Figure(figsize=(11, 4.2), dpi=90, layout='constrained')
  FigureCanvasAgg(figure)
  errors, changes = figure.subplots(1, 2)
  colours = {r: f'C{n % 10}' for n, r in enumerate(sorted(records))}
  for r, colour in colours.items():
    for split, style in (('train', '--'), ('test', '-')):
      points = [(rec['epoch'], _error_percent(rec[f'{split}_accuracy']))
                for rec in records[r] if f'{split}_accuracy' in rec]
      if points:
        errors.plot(*zip(*points), style, marker='o', markersize=3, color=colour,
                    label=f'r = {r}' if split == 'test' else None)
  if errors.lines:
    errors.set_yscale('log')
    handles, labels = errors.get_legend_handles_labels()
    handles += [Line2D([], [], color='black', linestyle='-'),
                Line2D([], [], color='black', linestyle='--')]
    errors.legend(handles, [*labels, 'test', 'train'], fontsize=8)
  errors.set(title='(a) Error per epoch', xlabel='epoch', ylabel='error (%)')
  errors.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
  epochs = [rec['epoch'] for run in records.values() for rec in run]
  if epochs:  # half an epoch of margin, so one epoch still gets an integer tick
    errors.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
  drawn = 0
  for r, colour in colours.items():
    values = logit_changes.get(r)
    if values is None or len(values) == 0:  # a legend entry in the run's colour, saying why
      why = 'not measured (dynamic routing only)' if values is None else 'no logit update'
      changes.plot([], [], marker='o', markersize=4, color=colour, linestyle='none',
                   label=f'r = {r}: {why}')
    else:
      changes.plot(range(1, len(values) + 1), values, marker='o', markersize=4, color=colour,
                   label=f'r = {r}')
      drawn = max(drawn, len(values))
  if drawn:
    changes.set_yscale('log')
    changes.set_xlim(0.5, drawn + 0.5)
    changes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
  else:  # no axis to read
    changes.set(xticks=[], yticks=[])
  if changes.lines:
    changes.legend(fontsize=8)
  changes.set(title='(b) Mean change of the routing logits per iteration',
              xlabel='routing iteration t', ylabel='mean |b_ij(t) - b_ij(t-1)|')
  for axes in (errors, changes):
    axes.grid(True, which='both', alpha=0.3)
  if title:
    figure.suptitle(title, fontsize=10)
  return figure


def routing_iterations_plot(records: Mapping[int, Sequence[dict]],
                            logit_changes: Mapping[int, Optional[Sequence[float]]], path: str,
                            title: Optional[str] = None) -> None:
  """Write `routing_iterations_figure(records, logit_changes, title)` to the PNG `path`."""
  _save_figure(routing_iterations_figure(records, logit_changes, title), path)
