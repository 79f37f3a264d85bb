"""`python -m experiments.benchmark`: its FLOP count and what a run writes."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from capsjax import models
from capsjax.training import TrainConfig
from experiments.benchmark import cpu_model, flops_per_image, model_flops, time_each_routing
from tests.conftest import REPO


def test_flops_of_the_paper_model_by_hand():
  flops = model_flops(TrainConfig())
  assert flops['conv1'] == 2 * 20 * 20 * 9 * 9 * 1 * 256
  assert flops['primary_caps'] == 2 * 6 * 6 * 9 * 9 * 256 * 256
  assert flops['predictions'] == 2 * 1152 * 10 * 16 * 8
  assert flops['routing'] == 2 * 1152 * 10 * 16 * (3 + 2)  # 3 weighted sums, 2 agreements
  assert flops['decoder'] == 2 * (160 * 512 + 512 * 1024 + 1024 * 784)
  assert flops['forward'] == 406_405_120  # the "about 0.41 GFLOP"
  assert flops['train'] == 3 * flops['forward'] - flops['conv1']
  no_decoder = model_flops(TrainConfig.create(recon_weight=0.0, routing_iters=1))
  assert no_decoder['decoder'] == 0 and no_decoder['routing'] == 2 * 1152 * 10 * 16


def test_flops_of_the_baseline_by_hand():
  flops = flops_per_image(TrainConfig.create(model='baseline'))
  # Taps inside the image along one axis: 5 per output, less 2 + 1 at each border.
  taps = (28 * 5 - 6) ** 2
  assert flops['conv1'] == 2 * taps * 1 * 256
  assert flops['conv2'] == 2 * taps * 256 * 256
  assert flops['conv3'] == 2 * taps * 256 * 128
  assert (flops['fc1'], flops['fc2'], flops['fc3']) == (
      2 * 28 * 28 * 128 * 328, 2 * 328 * 192, 2 * 192 * 10)
  assert flops['train'] == 3 * flops['forward'] - flops['conv1']
  pooled = flops_per_image(TrainConfig.create(model='baseline', image_shape=(40, 40, 1),
                                              baseline_conv3_features=96, baseline_pool=2))
  assert pooled['conv1'] == 2 * (40 * 5 - 6) ** 2 * 1 * 256
  assert pooled['conv3'] == 2 * (20 * 5 - 6) ** 2 * 256 * 96  # after the 2x2 pooling
  assert pooled['fc1'] == 2 * 20 * 20 * 96 * 328


@pytest.mark.parametrize('config', [
    TrainConfig(),
    TrainConfig.create(routing_iters=1, recon_weight=0.0, image_shape=(36, 36, 1), num_classes=5,
                       conv_features=64, primary_types=8),
    TrainConfig.create(model='baseline', image_shape=(12, 12, 1)),
    TrainConfig.create(model='baseline', image_shape=(12, 12, 1), baseline_conv3_features=24,
                       baseline_pool=2)])
def test_flops_agree_with_xla_cost_analysis(config):
  # XLA counts from the compiled program (and adds the elementwise work the count leaves out).
  model = models.build(config.model).clone(conv_impl='xla')
  images = jnp.zeros((4, *config.model.image_shape))
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
  cost = jax.jit(model.apply).lower(params, images).compile().cost_analysis()
  xla_per_image = cost['flops'] / 4
  assert 1.0 <= xla_per_image / flops_per_image(config)['forward'] < 1.03


# What `python -m experiments.benchmark` runs, but timing a reference chain of 256x256 matrix
# products: the test checks each row's fraction of the matmul rate, not the rate, and the
# 2048x2048 chain is 137 GFLOP a call, seconds each on a small CPU.
SMALL_MATMUL = '''
from absl import app
from experiments import benchmark
benchmark.MATMUL_SIZE = 256
app.run(benchmark.main)
'''


def test_benchmark_run_writes_its_table(tmp_path):
  out = tmp_path / 'bench.json'
  # lax.conv compiles the paper's CapsNet in a fraction of the matmul convolution's time; no
  # huge-page restart (a second Python and JAX start).
  proc = subprocess.run(
      [sys.executable, '-c', SMALL_MATMUL, '--batch_sizes=2', '--routing_iters=1',
       '--dtypes=float32', '--conv_impls=xla', '--repeats=1', '--routing_batch=2',
       '--recipes=paper,fast', f'--json={out}'],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, GLIBC_TUNABLES='glibc.malloc.hugetlb=0'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result['flops_per_image'] == model_flops(TrainConfig())  # the 28x28 CapsNet
  assert [(r['mode'], r['recipe'], r['batch'], r['routing_iters'])
          for r in result['model']] == [
      ('train', 'paper', 2, 1), ('train', 'fast', 2, 1), ('infer', 'paper', 2, 1)]
  for row in result['model']:
    assert row['images_per_sec'] == pytest.approx(2 / (row['ms'] / 1e3))
    assert row['matmul_fraction'] == pytest.approx(row['gflops'] / row['matmul_gflops'])
    # Each row is timed beside all three reference products, and held to float32's.
    assert set(row['reference_gflops']) == {'float32', 'bf16->bf16', 'bf16->float32'}
    assert row['reference'] == 'float32'
    assert row['matmul_gflops'] == row['reference_gflops']['float32']
    assert row['cpu'] == result['cpu'] == cpu_model()
    assert 0 < row['matmul_fraction'] < 1.5 and row['peak_mb'] > 0
  train_row, _, infer_row = result['model']
  assert train_row['peak_mb'] > infer_row['peak_mb']  # gradients and Adam moments
  (routing,) = result['routing']
  assert routing['speedup'] == pytest.approx(routing['python_unrolled_ms'] / routing['capsjax_ms'])
  assert 'images/s' in proc.stdout and 'Routing alone' in proc.stdout


def test_cpu_model_names_the_first_processor(tmp_path):
  cpuinfo = tmp_path / 'cpuinfo'
  cpuinfo.write_text('processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\n'
                     'model\t\t: 2\nmodel name\t: AMD EPYC 9R45\n\n'
                     'processor\t: 1\ncpu family\t: 99\nmodel\t\t: 9\nmodel name\t: other\n')
  assert cpu_model(str(cpuinfo)) == 'AMD EPYC 9R45 (family 26, model 2)'


def test_each_routing_is_timed_in_the_dtype_asked_for():
  rows = time_each_routing(['dynamic', 'self_attention'], 2, 2, 1, 'bfloat16')
  assert [(r['routing'], r['routing_iters'], r['dtype']) for r in rows] == [
      ('dynamic', 2, 'bfloat16'), ('self_attention', None, 'bfloat16')]
  assert all(r['ms'] > 0 for r in rows)


def test_benchmark_rejects_a_bad_flag_and_writes_nothing(tmp_path):
  out = tmp_path / 'bench.json'
  proc = subprocess.run([sys.executable, '-m', 'experiments.benchmark', '--dtypes=float16',
                         f'--json={out}'], cwd=REPO, capture_output=True, text=True, timeout=60)
  assert proc.returncode != 0 and "--dtypes: 'float16' is not one of" in proc.stderr
  assert 'Traceback' not in proc.stderr and not out.exists()
