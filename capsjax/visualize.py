"""Pictures of what the model does: test digits beside their reconstructions."""

import os

import numpy as np
from PIL import Image, ImageDraw


def reconstruction_grid(images, reconstructions, labels, predictions, path, scale=3, columns=8):
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
  count, height, width = images.shape[:3]
  cell_w, cell_h = 2 * width * scale + 6, height * scale + 16
  rows = -(-count // columns)
  canvas = Image.new('RGB', (columns * cell_w, rows * cell_h), 'white')
  draw = ImageDraw.Draw(canvas)
  to_tile = lambda a: Image.fromarray(
      (np.clip(a[..., 0], 0, 1) * 255).astype(np.uint8)).resize((width * scale, height * scale),
                                                                 Image.NEAREST)
  for n in range(count):
    x, y = (n % columns) * cell_w, (n // columns) * cell_h
    canvas.paste(to_tile(images[n]), (x, y))
    canvas.paste(to_tile(reconstructions[n]), (x + width * scale + 2, y))
    colour = 'black' if labels[n] == predictions[n] else 'red'
    draw.text((x + 2, y + height * scale + 1), f'label {labels[n]}  pred {predictions[n]}',
              fill=colour)
  partial = path + '.partial.png'
  canvas.save(partial)
  os.replace(partial, path)
