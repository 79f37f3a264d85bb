"""The Colab notebook runs end to end, on 8 forced CPU devices, and shows what it says it does.

The notebook is executed with nbclient in a fresh kernel whose cwd is the
repository root; its parameters are overridden as papermill does, by a cell
inserted after the one tagged `parameters`.
"""

import base64
import json
import math
import os
import pathlib

from nbclient import NotebookClient
import nbformat

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / 'notebooks' / 'capsjax_colab.ipynb'
NUM_DEVICES = 8
# 14 steps of a global batch of 32, 4 examples a device: a step costs the 8 devices over a
# second however small their shares, so the steps are few.
BATCH_SIZE = 32
TRAIN_EXAMPLES = 448
TEST_EXAMPLES = 160
PICTURES = ('curves.png', 'reconstructions.png', 'dimensions.png', 'couplings.png')


def inject_parameters(nb, values):
  """Insert a cell assigning `values` after the cell tagged `parameters`, as papermill does."""
  tagged = [n for n, cell in enumerate(nb.cells) if 'parameters' in cell.metadata.get('tags', [])]
  assert len(tagged) == 1, 'the notebook needs exactly one cell tagged "parameters"'
  source = '\n'.join(f'{name} = {value!r}' for name, value in values.items())
  cell = nbformat.v4.new_code_cell(source, metadata={'tags': ['injected-parameters']})
  nb.cells.insert(tagged[0] + 1, cell)


def kernel_env():
  """This process's environment with JAX on the CPU, split into NUM_DEVICES host devices."""
  xla_flags = ' '.join(filter(None, [os.environ.get('XLA_FLAGS'),
                                     f'--xla_force_host_platform_device_count={NUM_DEVICES}']))
  return {**os.environ, 'XLA_FLAGS': xla_flags, 'JAX_PLATFORMS': 'cpu'}


def cell_with(nb, text):
  """The one code cell whose source contains `text`."""
  cells = [cell for cell in nb.cells if cell.cell_type == 'code' and text in cell.source]
  assert len(cells) == 1, f'{len(cells)} code cells contain {text!r}'
  return cells[0]


def stream_text(cell):
  return ''.join(output.get('text', '') for output in cell.outputs
                 if output.output_type == 'stream')


def png_outputs(cell):
  return [base64.b64decode(output.data['image/png']) for output in cell.outputs
          if output.output_type == 'display_data' and 'image/png' in output.get('data', {})]


def test_notebook_trains_and_draws_on_8_devices(mnist_dir, tmp_path):
  workdir = tmp_path / 'run'
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  assert all(not cell.get('outputs') for cell in nb.cells if cell.cell_type == 'code'), \
      'the committed notebook should hold no outputs'
  assert nb.metadata.kernelspec.name == 'python3'
  inject_parameters(nb, dict(INSTALL=False, DATA_DIR=mnist_dir, WORKDIR=str(workdir), EPOCHS=1,
                             BATCH_SIZE=BATCH_SIZE, TRAIN_EXAMPLES=TRAIN_EXAMPLES,
                             TEST_EXAMPLES=TEST_EXAMPLES, RUN_BENCHMARK=False))
  # The test's own last cell: the two records, exactly, for the comparison below.
  nb.cells.append(nbformat.v4.new_code_cell(
      "import json\nprint('RECORDS', json.dumps({'record': record, 'final': final}))"))

  client = NotebookClient(nb, timeout=600, kernel_name='python3',
                          resources={'metadata': {'path': str(REPO)}})
  try:
    client.execute(env=kernel_env())
  finally:
    nbformat.write(nb, str(tmp_path / 'executed.ipynb'))  # to read when it fails

  # The training ran pmapped over the 8 devices, and learned something.
  devices = stream_text(cell_with(nb, 'jax.devices()'))
  assert f'{NUM_DEVICES} local device(s)' in devices, devices
  assert devices.count('CpuDevice') == NUM_DEVICES, devices
  with open(workdir / 'metrics.jsonl') as f:
    epochs = [json.loads(line) for line in f if line.strip()]
  assert len(epochs) == 1, epochs
  trained = epochs[0]
  assert trained['epoch'] == 1 and trained['num_devices'] == NUM_DEVICES
  assert trained['step'] == TRAIN_EXAMPLES // BATCH_SIZE
  losses = {name: value for name, value in trained.items() if name.endswith('loss')}
  assert losses and all(math.isfinite(value) for value in losses.values()), losses
  assert 0.0 <= trained['test_accuracy'] <= 1.0
  # Chance is 0.1 (the commonest digit is 14% of these 160); the 14 steps reach about 0.47.
  assert trained['test_accuracy'] > 0.25, trained

  # The pictures were drawn into WORKDIR and shown inline, byte for byte.
  for name in PICTURES:
    assert (workdir / name).is_file(), f'{name} is not in {workdir}'
  shown = {
      'curves.png': png_outputs(cell_with(nb, "'curves.png'")),
      # The cell that shows it (the training cell names the file too, to draw it).
      'reconstructions.png': png_outputs(
          cell_with(nb, "display(Image(filename=os.path.join(WORKDIR, 'reconstructions.png')))")),
  }
  dimension_cell = png_outputs(cell_with(nb, 'from experiments.dimensions import draw'))
  assert len(dimension_cell) == 2, 'the dimensions cell should show two pictures'
  shown['dimensions.png'], shown['couplings.png'] = [dimension_cell[0]], [dimension_cell[1]]
  for name, images in shown.items():
    assert images == [(workdir / name).read_bytes()], f'{name} is not what its cell shows'
  assert sum(len(png_outputs(cell)) for cell in nb.cells if cell.cell_type == 'code') >= 4
  table = stream_text(cell_with(nb, "'curves.png'"))
  assert 'test accuracy' in table and f'{100 * trained["test_accuracy"]:.2f}%' in table, table

  # Evaluating the checkpoint gives the accuracy its epoch recorded: same state, same data.
  records = json.loads(stream_text(nb.cells[-1]).split('RECORDS', 1)[1])
  assert records['record'] == trained
  assert records['final']['epoch'] == 1
  assert records['final']['test_accuracy'] == trained['test_accuracy']
  evaluation = stream_text(cell_with(nb, 'eval_only=True'))
  assert f'{100 * trained["test_accuracy"]:.2f}%' in evaluation, evaluation
