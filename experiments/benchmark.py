"""Time training and inference steps of CapsNet (and the baseline CNN) against the matmul rate.

    python -m experiments.benchmark                       # the full table
    python -m experiments.benchmark --batch_sizes=64 --dtypes=float32 --routing_iters=3
    python -m experiments.benchmark --models=capsnet,baseline --routing_iters=3
    python -m experiments.benchmark --recipes=paper,fast --batch_sizes=64,128 --modes=train
    python -m experiments.benchmark --models=capsnet,baseline --image_size=40 \
        --baseline_conv3_features=96 --baseline_pool=2 --routing_iters=3   # experiments.affine

For each batch size, routing iterations, compute dtype and recipe (the fast
one adds the moving average of the weights to the step) it times the jitted
training step (forward, backward, Adam update) and inference (forward only):
compilation and two warm-up calls are outside the timing, every call is waited
for (`block_until_ready`), and the median of --repeats calls is reported. A
chain of 2048x2048 matrix products in the same dtype is timed in turn with
every call of the step, so each row's fraction of the matmul rate holds however much the
machine's speed drifts during the run (on shared machines it does, by 30%). Peak
memory is what XLA's buffer assignment reserves for the step. Model FLOPs are
counted from the layer shapes (the paper's model: 0.41 GFLOP forward per image).

A second table times the routing function alone, forward and backward, against
the same loop unrolled in Python. The table goes to stdout and, with the
device, date and command, to --json.
"""

import datetime
import itertools
import math
import os
import platform
import re
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from absl import app, flags, logging
import jax
from jax import lax
import jax.numpy as jnp
from jax.typing import DTypeLike
import numpy as np

from capsjax import files, models
from capsjax.nn import conv
from capsjax.nn.layers import ROUTINGS
from capsjax.nn.ops import squash
from capsjax.nn.routing import (
  batched_dynamic_routing,
  em_routing,
  inverted_dot_product_attention_routing,
  self_attention_routing,
)
from capsjax.tasks import classification_losses
from capsjax.training import RECIPES, TrainConfig, create_train_state, train_step
from experiments import runtime

FLAGS = flags.FLAGS
flags.DEFINE_list('models', ['capsnet'], "capsnet, baseline (the paper's CNN) and/or "
                  'efficient_capsnet.')
flags.DEFINE_list('batch_sizes', ['16', '64', '128'], 'Global batch sizes.')
flags.DEFINE_list('routing_iters', ['1', '3'], 'Routing iterations (CapsNet rows).')
flags.DEFINE_list('routings', ['dynamic'],
                  f'CapsNet routings ({", ".join(ROUTINGS)}); with more than one, a table times '
                  'each routing alone too.')
flags.DEFINE_list('dtypes', ['float32', 'bfloat16'], 'Compute dtypes.')
flags.DEFINE_list('conv_impls', ['auto'],
                  'Convolutions to compare: auto (by platform), matmul (im2col), xla (lax.conv).')
flags.DEFINE_list('modes', ['train', 'infer'], 'train: the optimizer step; infer: forward only.')
flags.DEFINE_list('recipes', ['paper'],
                  'Recipes (capsjax.training.RECIPES) whose training step to time, each at every '
                  '--batch_sizes (inference is the same for all).')
flags.DEFINE_integer('image_size', 28, 'Height and width of the (one-channel) images.',
                     lower_bound=1)
flags.DEFINE_integer('baseline_conv3_features', 128,
                     "Channels of the baseline CNN's third convolution.", lower_bound=1)
flags.DEFINE_integer('baseline_pool', 1,
                     "Max pooling after the baseline CNN's first convolution (1: none).",
                     lower_bound=1)
flags.DEFINE_integer('repeats', 7, 'Timed calls per row (the median is reported).', lower_bound=1)
flags.DEFINE_integer('routing_batch', 64, 'Batch of the routing-only table (0: skip it).',
                     lower_bound=0)
flags.DEFINE_string('json', 'bench/benchmark.json', 'Where to write the results.')

MATMUL_SIZE = 2048
MATMUL_CHAIN = 8
WARMUP_CALLS = 2
TARGET_ROW = dict(routing='dynamic', recipe='paper', image_size=28, mode='train',
                  dtype='float32', conv='matmul', routing_iters=3, batch=64)
CPU_TARGET_FRACTION = 0.45


def conv_macs(size: int, kernel: int, stride: int, in_channels: int,
              out_channels: int) -> Tuple[int, int]:
  """(multiply-adds, output size) of a square VALID convolution on one image."""
  out = conv.output_size(size, kernel, stride)
  return out * out * kernel * kernel * in_channels * out_channels, out


def model_flops(config: TrainConfig) -> Dict[str, int]:
  """FLOPs per image of `config`'s CapsNet, by layer, counted from the shapes.

  A multiply-add counts 2 FLOPs. The training step does the forward pass and
  twice its FLOPs backward, less Conv1's input gradient (the images need none).

  Args:
    config: a `capsjax.training.TrainConfig` (square images).

  Returns:
    dict: the forward FLOPs of 'conv1', 'primary_caps', 'predictions',
    'routing' and 'decoder', their sum 'forward', and 'train'.
  """
  size, _, channels = config.model.image_shape
  model = models.build(config.model)
  conv1, size = conv_macs(size, model.conv_kernel, 1, channels, model.conv_features)
  primary, size = conv_macs(size, model.primary_kernel, model.primary_strides,
                            model.conv_features, model.primary_types * model.primary_dim)
  pairs = size * size * model.primary_types * model.num_classes
  predictions = pairs * model.digit_dim * model.primary_dim
  # Every iteration forms s_j; all but the last also measure the agreement.
  routing = pairs * model.digit_dim * (2 * model.routing_iters - 1)
  decoder = 0
  if model.use_decoder:
    widths = (model.num_classes * model.digit_dim, *model.decoder_hidden,
              int(np.prod(config.model.image_shape)))
    decoder = sum(a * b for a, b in zip(widths, widths[1:]))
  flops = {name: 2 * macs for name, macs in dict(
      conv1=conv1, primary_caps=primary, predictions=predictions, routing=routing,
      decoder=decoder).items()}
  flops['forward'] = sum(flops.values())
  flops['train'] = 3 * flops['forward'] - flops['conv1']
  return flops


def baseline_flops(config: TrainConfig) -> Dict[str, int]:
  """FLOPs per image of the baseline CNN, by layer, counted as `model_flops` counts.

  Args:
    config: a `capsjax.training.TrainConfig` of a baseline CNN.

  Returns:
    dict: the forward FLOPs of each layer by its name, 'forward' and 'train'.
  """
  model = models.build(config.model)
  height, width, channels = config.model.image_shape
  kernel, pad = model.kernel_size, model.kernel_size // 2
  macs = {}
  for i, features in enumerate(model.conv_features):
    # SAME, stride 1: along an axis of n outputs, n * kernel taps less the p(p+1) that
    # fall on the zero padding (which XLA does not count either).
    taps = (kernel * height - pad * (pad + 1)) * (kernel * width - pad * (pad + 1))
    macs[f'conv{i + 1}'] = taps * channels * features
    channels = features
    if i == 0:  # the optional pooling (its comparisons are not counted)
      height, width = height // model.pool, width // model.pool
  widths = (height * width * channels, *model.hidden, model.num_classes)
  for i, (a, b) in enumerate(zip(widths, widths[1:])):
    macs[f'fc{i + 1}'] = a * b
  flops = {name: 2 * value for name, value in macs.items()}
  flops['forward'] = sum(flops.values())
  flops['train'] = 3 * flops['forward'] - flops['conv1']
  return flops


# Each architecture's FLOP count, by the name capsjax.models registers it under.
FLOPS = {'capsnet': model_flops, 'baseline': baseline_flops}


def flops_per_image(config: TrainConfig) -> Dict[str, int]:
  """`model_flops` or `baseline_flops`, as config.model.name says."""
  return FLOPS[config.model.name](config)


def interleaved_median_seconds(calls: Sequence[Tuple[Callable[..., Any], Tuple[Any, ...]]],
                               repeats: int) -> List[float]:
  """Median wall time of each (fn, args) in `calls`, timed in turn so drift hits all alike.

  Each call is warmed up first (compilation and first-touch stay outside the
  timing) and waited for with `block_until_ready` every time.
  """
  for fn, args in calls:
    for _ in range(WARMUP_CALLS):
      jax.block_until_ready(fn(*args))
  times = [[] for _ in calls]
  for _ in range(repeats):
    for (fn, args), samples in zip(calls, times):
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      samples.append(time.perf_counter() - start)
  return [statistics.median(samples) for samples in times]


# The reference products each row is timed beside: name -> (operand dtype, result dtype).
# Mixed precision is held to the bf16 operands' product accumulated in float32, the form
# the CPU's bf16 dot instructions run at full rate.
REFERENCE_PRODUCTS = {
    'float32': (jnp.float32, jnp.float32),
    'bf16->bf16': (jnp.bfloat16, jnp.bfloat16),
    'bf16->float32': (jnp.bfloat16, jnp.float32),
}
# The reference that a row of each compute dtype is held to.
ROW_REFERENCE = {'float32': 'float32', 'bfloat16': 'bf16->float32'}


def cpu_model(cpuinfo: str = '/proc/cpuinfo') -> str:
  """The CPU's name, family and model, e.g. 'AMD EPYC 9R14 96-Core Processor (family 25, model 17)'.

  Hosts of one cloud instance type differ (Zen 4 and Zen 5 differ 2x in float32
  matmul rate), so each benchmark records which one it ran on.

  Args:
    cpuinfo: the kernel's CPU description (Linux); elsewhere `platform.processor()`.

  Returns:
    str, 'unknown' when neither says.
  """
  fields = {}
  try:
    with open(cpuinfo) as f:
      for line in f:
        if not line.strip():
          break  # the first processor's block describes them all
        key, _, value = line.partition(':')
        fields[key.strip()] = value.strip()
  except OSError:
    return platform.processor() or 'unknown'
  name = fields.get('model name') or platform.processor() or 'unknown'
  if 'cpu family' in fields and 'model' in fields:
    name += f' (family {fields["cpu family"]}, model {fields["model"]})'
  return name


def matmul_call(operand_dtype: DTypeLike, result_dtype: Optional[DTypeLike] = None
                ) -> Tuple[Callable[..., jax.Array], Tuple[jax.Array], int]:
  """(fn, args, flops): MATMUL_CHAIN chained MATMUL_SIZE^2 matrix products, one call.

  Chained inside one call so that the rate is the arithmetic's, not that of
  allocating a fresh output buffer per product (which, on 4 KiB pages, would
  slow the reference as much as the model and flatter the ratio). Entries of
  variance 1 / MATMUL_SIZE keep the chain's values bounded.

  Args:
    operand_dtype: dtype of both factors of every product.
    result_dtype: dtype the products accumulate in and return (XLA's
      `preferred_element_type`); None for operand_dtype. Each result is rounded
      back to operand_dtype for the next product.

  Returns:
    (fn, args, flops): fn(*args) runs the chain; flops is its multiply-adds times 2.
  """
  result_dtype = operand_dtype if result_dtype is None else result_dtype
  a = jax.random.normal(jax.random.PRNGKey(0), (MATMUL_SIZE, MATMUL_SIZE), operand_dtype)
  a = a / jnp.sqrt(jnp.asarray(MATMUL_SIZE, operand_dtype))

  def product(_, x):
    return lax.dot(x, a, preferred_element_type=result_dtype).astype(operand_dtype)

  chain = jax.jit(lambda a: lax.fori_loop(0, MATMUL_CHAIN, product, a))
  return chain, (a,), 2 * MATMUL_SIZE ** 3 * MATMUL_CHAIN


def peak_megabytes(compiled: jax.stages.Compiled) -> Optional[float]:
  """What XLA reserves for one call: arguments, outputs and temporaries, less donated buffers."""
  memory = compiled.memory_analysis()
  if memory is None:
    return None
  total = (memory.argument_size_in_bytes + memory.output_size_in_bytes +
           memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  return total / 2 ** 20


HLO_SHAPE = re.compile(r'\b(?:f32|bf16|f16)\[([\d,]*)\]')
NOT_BUFFERS = ('bitcast(', 'get-tuple-element(', 'parameter(', 'tuple(')


def prediction_buffers(compiled: jax.stages.Compiled, batch_size: int,
                       config: TrainConfig) -> int:
  """How many buffers of the prediction vectors' size [B, I, J, D] the compiled step writes.

  Counted in the optimised HLO's entry computation (what runs; fused
  intermediates stay in registers): each instruction whose result holds an
  array of B * num_primary * num_classes * digit_dim elements, in any layout.
  """
  elements = batch_size * model_flops(config)['predictions'] // (2 * config.model.primary_dim)
  text = compiled.as_text()
  entry = text[text.index('\nENTRY '):]
  count = 0
  for line in entry.splitlines()[1:]:
    if line.startswith('}'):
      break
    result = line.split('=', 1)[-1]
    if any(op in result for op in NOT_BUFFERS):
      continue
    shapes = HLO_SHAPE.findall(result.split('(', 1)[0] if not result.lstrip().startswith('(')
                               else result.split(')', 1)[0])
    count += any(math.prod(int(d) for d in dims.split(',') if d) == elements for dims in shapes)
  return count


def random_batch(batch_size: int, config: TrainConfig, seed: int = 0) -> Dict[str, jax.Array]:
  rng = np.random.default_rng(seed)
  shape, classes = config.model.image_shape, config.model.num_classes
  return {'image': jnp.asarray(rng.uniform(size=(batch_size, *shape)), jnp.float32),
          'label': jnp.asarray(rng.integers(0, classes, batch_size), jnp.int32)}


def time_model(model: str, mode: str, dtype: str, routing_iters: Optional[int], batch_size: int,
               repeats: int, conv_impl: str = 'auto', recipe: str = 'paper',
               routing: str = 'dynamic') -> dict:
  """One row of the model table: times, rates and memory of a step."""
  config = TrainConfig.create(**{**RECIPES[recipe], 'model': model, 'routing': routing,
                                'routing_iters': routing_iters, 'batch_size': batch_size,
                                'dtype': dtype, 'conv_impl': conv_impl,
                                'image_shape': (FLAGS.image_size, FLAGS.image_size, 1),
                                'baseline_conv3_features': FLAGS.baseline_conv3_features,
                                'baseline_pool': FLAGS.baseline_pool})
  # The schedule's length changes its values, not the step's work.
  state = create_train_state(jax.random.PRNGKey(0), config, classification_losses,
                             steps_per_epoch=1000)
  batch = random_batch(batch_size, config)
  if mode == 'train':
    compiled = jax.jit(train_step, donate_argnums=0).lower(state, batch).compile()

    def step(batch: Dict[str, jax.Array]) -> dict:  # the state threads through, as in training
      nonlocal state
      state, metrics = compiled(state, batch)
      return metrics
  else:
    compiled = jax.jit(lambda state, images: state.forward(state.params, images)).lower(
        state, batch['image']).compile()
    step = lambda batch: compiled(state, batch['image'])
  references = {name: matmul_call(*dtypes) for name, dtypes in REFERENCE_PRODUCTS.items()}
  seconds, *reference_seconds = interleaved_median_seconds(
      [(step, (batch,))] + [(fn, args) for fn, args, _ in references.values()], repeats)
  reference_gflops = {name: flops / s / 1e9
                      for (name, (_, _, flops)), s in zip(references.items(), reference_seconds)}
  capsnet = model == 'capsnet'
  matmul_gflops = reference_gflops[ROW_REFERENCE[dtype]]
  # The FLOP count follows dynamic routing; the other routings' rows, and models without a
  # count, give times only.
  gflops = None
  if model in FLOPS and (not capsnet or routing == 'dynamic'):
    flops = flops_per_image(config)['train' if mode == 'train' else 'forward'] * batch_size
    gflops = flops / seconds / 1e9
  return dict(model=model, recipe=recipe, image_size=FLAGS.image_size, mode=mode, dtype=dtype,
              conv=conv.resolve_impl(conv_impl), routing=routing if capsnet else None,
              routing_iters=routing_iters if capsnet else None, batch=batch_size,
              ms=1e3 * seconds, images_per_sec=batch_size / seconds, gflops=gflops,
              matmul_gflops=matmul_gflops, reference=ROW_REFERENCE[dtype],
              reference_gflops=reference_gflops, cpu=cpu_model(),
              matmul_fraction=None if gflops is None else gflops / matmul_gflops,
              peak_mb=peak_megabytes(compiled),
              prediction_buffers=(prediction_buffers(compiled, batch_size, config) if capsnet
                                  else None))


def unrolled_routing(u_hat: jax.Array, num_iters: int) -> jax.Array:
  """Procedure 1 as a plain Python loop over one example's u_hat [I, J, D] (the baseline)."""
  logits = jnp.zeros(u_hat.shape[:2], jnp.float32)
  for iteration in range(num_iters):
    couplings = jax.nn.softmax(logits, axis=-1)
    v = squash(jnp.einsum('ij,ijd->jd', couplings, u_hat))
    if iteration < num_iters - 1:
      logits = logits + jnp.einsum('ijd,jd->ij', u_hat, v)
  return v


def time_routing(num_iters: int, batch_size: int, repeats: int) -> Dict[str, float]:
  """Routing alone, forward and backward: capsjax's fori_loop against the Python loop."""
  u_hat = 0.1 * jax.random.normal(jax.random.PRNGKey(0), (batch_size, 1152, 10, 16))
  candidates = {
      'capsjax': lambda u: batched_dynamic_routing(u, num_iters)[0],
      'python_unrolled': jax.vmap(lambda u: unrolled_routing(u, num_iters)),
  }
  outputs = [jax.jit(route)(u_hat) for route in candidates.values()]
  np.testing.assert_allclose(*outputs, rtol=1e-4, atol=1e-6)  # the same function, or no contest
  grads = [(jax.jit(jax.grad(lambda u, route=route: jnp.sum(jnp.square(route(u))))), (u_hat,))
           for route in candidates.values()]
  seconds = interleaved_median_seconds(grads, repeats)
  row = dict(routing_iters=num_iters, batch=batch_size)
  row.update({f'{name}_ms': 1e3 * s for name, s in zip(candidates, seconds)})
  row['speedup'] = row['python_unrolled_ms'] / row['capsjax_ms']
  return row


def time_each_routing(routings: Sequence[str], num_iters: int, batch_size: int,
                      repeats: int, dtype: str = 'float32') -> List[dict]:
  """Each routing alone, forward and backward, on the paper's u_hat [batch, 1152, 10, 16].

  In bfloat16 the predictions and the routing's outputs are bfloat16; logits, EM's
  statistics and the sums stay float32, as in a bfloat16 model.
  """
  u_hat = 0.1 * jax.random.normal(jax.random.PRNGKey(0), (batch_size, 1152, 10, 16))
  u_hat = u_hat.astype(models.DTYPES[dtype])
  activations = jax.random.uniform(jax.random.PRNGKey(1), (batch_size, 1152))
  candidates = {
      'dynamic': lambda u: batched_dynamic_routing(u, num_iters)[0],
      'em': jax.vmap(lambda u, a: em_routing(u, a, 0.0, 0.0, num_iters)[0]),
      'self_attention': jax.vmap(lambda u: self_attention_routing(u)[0]),
      'inverted_attention': jax.vmap(
          lambda u: inverted_dot_product_attention_routing(u, num_iters)[0]),
  }
  calls = []
  for name in routings:
    route = candidates[name]
    arguments = (u_hat, activations) if name == 'em' else (u_hat,)
    loss = lambda *args, route=route: jnp.sum(jnp.square(route(*args).astype(jnp.float32)))
    calls.append((jax.jit(jax.grad(loss)), arguments))
  seconds = interleaved_median_seconds(calls, repeats)
  return [dict(routing=name, routing_iters=None if name == 'self_attention' else num_iters,
               dtype=dtype, batch=batch_size, ms=1e3 * s) for name, s in zip(routings, seconds)]


def print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Tuple[str, str, str]]) -> None:
  """Rows of dicts as an aligned text table; columns are (key, header, format)."""
  cells = [[header for _, header, _ in columns]]
  cells += [['-' if row[key] is None else fmt.format(row[key]) for key, _, fmt in columns]
            for row in rows]
  widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
  for line in cells:
    print('  '.join(cell.rjust(width) for cell, width in zip(line, widths)), flush=True)


MODEL_COLUMNS = [
    ('model', 'model', '{}'), ('routing', 'routing', '{}'), ('recipe', 'recipe', '{}'),
    ('mode', 'mode', '{}'),
    ('dtype', 'dtype', '{}'), ('conv', 'conv', '{}'),
    ('routing_iters', 'iters', '{}'),
    ('batch', 'batch', '{}'), ('ms', 'ms/step', '{:.1f}'), ('images_per_sec', 'images/s', '{:.1f}'),
    ('gflops', 'GFLOP/s', '{:.1f}'),
    *[(f'{name} GFLOP/s', f'{name} GFLOP/s', '{:.0f}') for name in REFERENCE_PRODUCTS],
    ('reference', 'held to', '{}'), ('matmul_fraction', 'of it', '{:.0%}'),
    ('peak_mb', 'peak MiB', '{:.0f}'),
    ('prediction_buffers', 'u_hat buffers', '{}')]
ROUTING_COLUMNS = [
    ('routing_iters', 'iters', '{}'), ('batch', 'batch', '{}'),
    ('capsjax_ms', 'fori_loop ms', '{:.1f}'),
    ('python_unrolled_ms', 'Python-unrolled ms', '{:.1f}'),
    ('speedup', 'speed-up', '{:.2f}x')]
EACH_ROUTING_COLUMNS = [
    ('routing', 'routing', '{}'), ('routing_iters', 'iters', '{}'), ('dtype', 'dtype', '{}'),
    ('batch', 'batch', '{}'), ('ms', 'forward + backward ms', '{:.1f}')]


def integers(values: Sequence[str], flag: str) -> List[int]:
  try:
    numbers = [int(v) for v in values]
  except ValueError:
    raise app.UsageError(f'--{flag} takes whole numbers, got {",".join(values)}') from None
  if min(numbers) < 1:
    raise app.UsageError(f'--{flag} must be positive, got {",".join(values)}')
  return numbers


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  batch_sizes = integers(FLAGS.batch_sizes, 'batch_sizes')
  routing_iters = integers(FLAGS.routing_iters, 'routing_iters')
  for dtype in FLAGS.dtypes:
    if dtype not in models.DTYPES:
      raise app.UsageError(f'--dtypes: {dtype!r} is not one of {sorted(models.DTYPES)}')
  for mode in FLAGS.modes:
    if mode not in ('train', 'infer'):
      raise app.UsageError(f'--modes: {mode!r} is not train or infer')
  for impl in FLAGS.conv_impls:
    if impl not in conv.CONV_IMPLS:
      raise app.UsageError(f'--conv_impls: {impl!r} is not one of {conv.CONV_IMPLS}')
  for model in FLAGS.models:
    if model not in models.ARCHITECTURES:
      raise app.UsageError(f'--models: {model!r} is not one of {models.ARCHITECTURES}')
  for routing in FLAGS.routings:
    if routing not in ROUTINGS:
      raise app.UsageError(f'--routings: {routing!r} is not one of {ROUTINGS}')
  for recipe in FLAGS.recipes:
    if recipe not in RECIPES:
      raise app.UsageError(f'--recipes: {recipe!r} is not one of {sorted(RECIPES)}')
  logging.set_verbosity(logging.WARNING)
  runtime.restart_with_huge_pages()

  device = jax.devices()[0]
  size = FLAGS.image_size
  flops = model_flops(TrainConfig.create(image_shape=(size, size, 1)))
  print(f'{device.device_kind} ({device.platform}, {jax.local_device_count()} device(s)), '
        f'jax {jax.__version__}, {os.environ.get(runtime.TUNABLES_ENV) or "default malloc"}')
  print(f'CPU: {cpu_model()}')
  print(f'CapsNet FLOPs per {size}x{size} image (3 iterations): forward '
        f'{flops["forward"] / 1e9:.3f} G, training step {flops["train"] / 1e9:.3f} G\n')
  rows = []
  for model in FLAGS.models:
    for mode in FLAGS.modes:
      # A recipe changes the training step only.
      recipes = FLAGS.recipes if mode == 'train' else ['paper']
      capsnet = model == 'capsnet'
      for dtype, impl, recipe, routing in itertools.product(
          FLAGS.dtypes, FLAGS.conv_impls, recipes, FLAGS.routings if capsnet else ['dynamic']):
        for iters in routing_iters if capsnet else [None]:
          for batch_size in batch_sizes:
            row = time_model(model, mode, dtype, iters, batch_size, FLAGS.repeats, impl, recipe,
                             routing)
            print(f'  {model} ({recipe} recipe) {mode} {dtype} {row["conv"]} conv' +
                  (f' {routing} routing, {iters} iterations' if iters else '') +
                  f', batch {batch_size}: {row["images_per_sec"]:.1f} images/s', flush=True)
            rows.append(row)
  print()
  print_table([{**row, **{f'{name} GFLOP/s': rate
                          for name, rate in row['reference_gflops'].items()}} for row in rows],
              MODEL_COLUMNS)

  routing_rows = []
  if FLAGS.routing_batch:
    print('\nRouting alone, forward + backward, u_hat [batch, 1152, 10, 16] float32:')
    routing_rows = [time_routing(iters, FLAGS.routing_batch, FLAGS.repeats)
                    for iters in routing_iters]
    print_table(routing_rows, ROUTING_COLUMNS)
    slowest = min(row['speedup'] for row in routing_rows)
    print(f'Routing target, fori_loop at least as fast as the Python loop: {slowest:.2f}x at '
          f'worst: {"met" if slowest >= 1 else "NOT met"}')
  each_routing_rows = []
  if FLAGS.routing_batch and (len(FLAGS.routings) > 1 or len(FLAGS.dtypes) > 1):
    print(f'\nEach routing alone, forward + backward, u_hat [{FLAGS.routing_batch}, 1152, 10, 16] '
          f'in each dtype:')
    each_routing_rows = [row for iters in routing_iters for dtype in FLAGS.dtypes
                         for row in time_each_routing(FLAGS.routings, iters, FLAGS.routing_batch,
                                                      FLAGS.repeats, dtype)]
    print_table(each_routing_rows, EACH_ROUTING_COLUMNS)

  target = [r for r in rows if r['model'] == 'capsnet' and
            all(r[k] == v for k, v in TARGET_ROW.items())]
  if target and device.platform == 'cpu':
    fraction = target[0]['matmul_fraction']
    print(f'\nCPU target, training step at batch 64, float32, 3 iterations: {fraction:.0%} of '
          f'the matmul rate (target {CPU_TARGET_FRACTION:.0%}): '
          f'{"met" if fraction >= CPU_TARGET_FRACTION else "NOT met"}')

  result = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
                device=device.device_kind, platform=device.platform,
                num_devices=jax.local_device_count(), cpu=cpu_model(), jax=jax.__version__,
                malloc=os.environ.get(runtime.TUNABLES_ENV, ''),
                command=' '.join(sys.orig_argv), flops_per_image=flops,
                model=rows, routing=routing_rows, each_routing=each_routing_rows)
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json)), exist_ok=True)
  files.write_json(FLAGS.json, result)
  print(f'\nWrote {FLAGS.json}')


if __name__ == '__main__':
  app.run(main)
