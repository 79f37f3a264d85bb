"""VALID 2-D convolution as matrix products of healthy shape.

XLA's CPU convolution is slow for CapsNet's layers: forward and backward of the
9x9 stride-2 PrimaryCaps convolution through `lax.conv_general_dilated` run at a
few percent of the CPU's matmul rate. Written as patch extraction (strided
slices) and one matrix product per kernel row, with a col2im for the input
gradient, the same layer runs its backward pass at a large fraction of that
rate; `BENCHMARKS.md` has the measurements and the whole training step. Both
forms compute the same function, in every mode of autodiff (jvp, jacfwd and
Hessian-vector products too).

In bfloat16 both forms take bfloat16 operands and accumulate in float32
(`preferred_element_type`), rounding the result to bfloat16 once. XLA's CPU
backend runs a product of that form through its fast bf16 dot kernels (on a
Zen 4 CPU at 1.8x the float32 rate), but only with bfloat16 on both sides and
a left operand that contracts its last axis; a bfloat16-to-bfloat16 product is
not one of them and ran at the float32 rate or below. The matmul form is
therefore a primitive with its own gradient rules, whose backward products
take that form too (autodiff's would not: see `_kernel_grad`): its bfloat16
training step runs at 1.9x the float32 one there. BENCHMARKS.md has the
measurements.
"""

import math

import jax
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir
import jax.numpy as jnp

from capsjax.nn.ops import accumulation_dtype

# Kernel rows are grouped until a matmul contracts over at least this many
# values: Conv1 (1 input channel) then uses one im2col matmul with K = 81,
# PrimaryCaps (256 channels) one matmul per kernel row with K = 9 * 256, which
# keeps the patch tensor 9x smaller than full im2col at the same speed.
MIN_CONTRACTION = 512

CONV_IMPLS = ('auto', 'matmul', 'xla')


def resolve_impl(impl: str) -> str:
  """The convolution implementation `impl` stands for on JAX's default platform.

  'auto' is the im2col form on the CPU, where it measured faster than XLA's
  convolution (BENCHMARKS.md), and `lax.conv` elsewhere, where the vendor
  library (cuDNN, the TPU's convolution units) is expected to win.

  Args:
    impl: one of CONV_IMPLS.

  Returns:
    'matmul' or 'xla'.
  """
  if impl not in CONV_IMPLS:
    raise ValueError(f'conv impl must be one of {CONV_IMPLS}, got {impl!r}.')
  if impl == 'auto':
    return 'matmul' if jax.default_backend() == 'cpu' else 'xla'
  return impl


def output_size(size: int, kernel: int, stride: int) -> int:
  """Output length of a VALID convolution along one axis."""
  return (size - kernel) // stride + 1


def _row_groups(kernel_h, row_values):
  """Consecutive kernel rows whose columns one matrix product contracts over."""
  rows = min(kernel_h, math.ceil(MIN_CONTRACTION / row_values))
  return [range(first, min(first + rows, kernel_h)) for first in range(0, kernel_h, rows)]


def _extract_columns(x, *, kernel_h, kernel_w, stride):
  """im2col per kernel-row group: [B, out_h, out_w, rows * kernel_w * C] each, taps (ky, kx, c).

  Each tap's strided window is written into its place in the group's buffer
  (`dynamic_update_slice`, in place) rather than concatenated, and the values
  are moved as unsigned integers of their width: XLA's CPU backend copies
  bfloat16 through float32 and builds a concatenation element by element,
  where this form is a run of plain copies, several times faster for
  PrimaryCaps (BENCHMARKS.md).
  """
  _, height, width, channels = x.shape
  out_h = output_size(height, kernel_h, stride)
  out_w = output_size(width, kernel_w, stride)
  bits = lax.bitcast_convert_type(x, jnp.dtype(f'uint{8 * x.dtype.itemsize}'))

  def patches(ky: int, kx: int) -> jax.Array:
    return bits[:, ky:ky + stride * (out_h - 1) + 1:stride,
                kx:kx + stride * (out_w - 1) + 1:stride, :]

  columns = []
  for group in _row_groups(kernel_h, kernel_w * channels):
    out = jnp.zeros((x.shape[0], out_h, out_w, len(group) * kernel_w * channels), bits.dtype)
    for i, ky in enumerate(group):
      for kx in range(kernel_w):
        offset = (i * kernel_w + kx) * channels
        out = lax.dynamic_update_slice(out, patches(ky, kx), (0, 0, 0, offset))
    columns.append(lax.bitcast_convert_type(out, x.dtype))
  return columns


def _col2im(column_grads, x_shape, *, kernel_h, kernel_w, stride):
  """The transpose of `_extract_columns`: every tap's value added onto the pixel it was read from.

  Autodiff would transpose each strided slice into a padded full-size array and
  sum 81 of them, a select per tap per input pixel. Split by stride phase
  (pixels y = stride * m + py, x = stride * n + px), tap (ky, kx) lands on
  phase (ky % stride, kx % stride) at offset (ky // stride, kx // stride) with
  stride 1, so each phase is a few in-place block additions: 2x faster for the
  PrimaryCaps input gradient.
  """
  batch, height, width, channels = x_shape
  out_h = output_size(height, kernel_h, stride)
  out_w = output_size(width, kernel_w, stride)
  phase_h, phase_w = -(-height // stride), -(-width // stride)
  taps = {}
  for group, grad in zip(_row_groups(kernel_h, kernel_w * channels), column_grads):
    grad = grad.reshape(batch, out_h, out_w, len(group), kernel_w, channels)
    for i, ky in enumerate(group):
      for kx in range(kernel_w):
        taps[ky, kx] = grad[:, :, :, i, kx, :]
  dtype = column_grads[0].dtype
  phase_rows = []
  for py in range(stride):
    phases = []
    for px in range(stride):
      phase = jnp.zeros((batch, phase_h, phase_w, channels), dtype)
      for (ky, kx), grad in taps.items():
        if ky % stride == py and kx % stride == px:
          corner = (0, ky // stride, kx // stride, 0)
          block = lax.dynamic_slice(phase, corner, grad.shape)
          phase = lax.dynamic_update_slice(phase, block + grad, corner)
      phases.append(phase)
    phase_rows.append(jnp.stack(phases, axis=3))            # [B, phase_h, phase_w, px, C]
  interleaved = jnp.stack(phase_rows, axis=2).reshape(      # [B, phase_h, py, phase_w, px, C]
      batch, phase_h * stride, phase_w * stride, channels)
  return interleaved[:, :height, :width]


# The patch extraction is a linear primitive of its own, so that differentiating
# it anywhere (the kernel gradient below, which extracts the columns again, when it
# is differentiated for second derivatives; a kernel-batched vmap) gives the
# col2im as its transpose and the extraction again as its JVP, rather than
# autodiff's transposes of 81 strided slices. Its integer copies have no
# derivative of their own.
_columns_p = Primitive('capsjax_conv_columns')
_columns_p.multiple_results = True
_columns_p.def_impl(_extract_columns)
mlir.register_lowering(_columns_p, mlir.lower_fun(_extract_columns, multiple_results=True))


@_columns_p.def_abstract_eval
def _columns_abstract_eval(x, *, kernel_h, kernel_w, stride):
  batch, height, width, channels = x.shape
  out_h = output_size(height, kernel_h, stride)
  out_w = output_size(width, kernel_w, stride)
  return [jax.core.ShapedArray((batch, out_h, out_w, len(group) * kernel_w * channels), x.dtype)
          for group in _row_groups(kernel_h, kernel_w * channels)]


def _columns_transpose(column_cts, x, **params):
  # Summed in float32 for half precision: more exact, and 3x faster for bfloat16
  # on XLA's CPU backend, which adds bfloat16 through float32 one element at a time.
  acc = accumulation_dtype(x.aval.dtype)
  column_cts = [ad.instantiate_zeros(ct).astype(acc) for ct in column_cts]
  return [_col2im(column_cts, x.aval.shape, **params).astype(x.aval.dtype)]


def _columns_batch(args, dims, **params):
  # Extra vmapped axes fold into the batch axis: every image is extracted alike.
  x = jnp.moveaxis(args[0], dims[0], 0)
  columns = _columns_p.bind(x.reshape(-1, *x.shape[2:]), **params)
  return [c.reshape(*x.shape[:2], *c.shape[1:]) for c in columns], [0] * len(columns)


ad.deflinear2(_columns_p, _columns_transpose)
batching.primitive_batchers[_columns_p] = _columns_batch


def _columns(x, kernel_h, kernel_w, stride):
  """`_extract_columns` as the primitive, whose reverse mode is the col2im."""
  return _columns_p.bind(x, kernel_h=kernel_h, kernel_w=kernel_w, stride=stride)


def _matmul_forward(x, kernel, *, stride):
  """The convolution's value: one product per kernel-row group of the columns, summed."""
  kernel_h, kernel_w, channels, features = kernel.shape
  groups = _row_groups(kernel_h, kernel_w * channels)
  columns = _columns(x, kernel_h, kernel_w, stride)
  out = None
  for group, cols in zip(groups, columns):
    weights = kernel[group.start:group.stop].reshape(-1, features)
    term = lax.dot(cols.reshape(-1, cols.shape[-1]), weights,
                   preferred_element_type=accumulation_dtype(x.dtype))
    out = term if out is None else out + term
  return out.astype(x.dtype).reshape(*columns[0].shape[:3], features)


def _product(a, b, contract_a, contract_b, dtype):
  return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                         preferred_element_type=dtype)


def _input_grad(out_ct, x, kernel, *, stride):
  """d/dx: each group's columns' gradient G @ W_g.T, summed back onto the pixels (col2im).

  G arrives in x's dtype, so in bfloat16 the products take bfloat16 on both sides
  (the fast kernel), where autodiff's form would multiply a float32 G; the col2im
  sums in float32 and rounds once.
  """
  kernel_h, kernel_w, channels, features = kernel.shape
  acc = accumulation_dtype(x.aval.dtype)
  grads = out_ct.reshape(-1, features)
  column_grads = [
      _product(grads, kernel[group.start:group.stop].reshape(-1, features), 1, 1, acc)
      .reshape(*out_ct.shape[:3], -1)
      for group in _row_groups(kernel_h, kernel_w * channels)]
  return _columns_transpose(column_grads, x, kernel_h=kernel_h, kernel_w=kernel_w,
                            stride=stride)[0]


def _kernel_grad(out_ct, x, kernel, *, stride):
  """d/dkernel: per group, the columns (extracted again) contracted with G over the positions.

  Autodiff would write this as `columns.T @ G`, a product that contracts the
  first axis of its left operand. In bfloat16, XLA's CPU backend runs that form
  only after converting both operands to float32, at the float32 rate, and folds
  any transpose written before or after it back into that form. A product with an
  identity matrix is a transpose it keeps: `G.T = I @ G` and `dW = (G.T @ columns).T`
  then take the fast bfloat16 kernel. The identities cost F/K (G.T, once per
  layer) and F/N (per group) of the product's work for F features, K = the
  group's values and N positions, so a group with K or N no more than F (Conv1:
  81 values against 256 features) keeps autodiff's form. An identity product
  copies every finite normal number exactly, but 0 * inf is NaN, so one
  non-finite value in G makes every feature's gradient NaN, not one feature's.
  Wider dtypes keep autodiff's form, which runs at their full rate.
  """
  kernel_h, kernel_w, channels, features = kernel.aval.shape
  dtype = x.dtype
  acc = accumulation_dtype(dtype)
  grads = out_ct.reshape(-1, features)
  half_precision = acc != dtype
  grads_t = None
  pieces = []
  for group, cols in zip(_row_groups(kernel_h, kernel_w * channels),
                         _columns(x, kernel_h, kernel_w, stride)):
    cols = cols.reshape(grads.shape[0], -1)
    if half_precision and min(cols.shape) > features:
      if grads_t is None:
        grads_t = _product(jnp.eye(features, dtype=dtype), grads, 1, 1, acc).astype(dtype)
      piece = _product(_product(grads_t, cols, 1, 0, acc), jnp.eye(features, dtype=acc), 0, 0, acc)
    else:
      piece = _product(cols, grads, 0, 0, acc)
    pieces.append(piece.reshape(len(group), kernel_w, channels, features))
  return jnp.concatenate(pieces, axis=0).astype(kernel.aval.dtype)


# The matmul convolution is a primitive of its own, bilinear in (x, kernel), so
# that reverse mode gets the two products above, in the forms XLA's CPU backend
# runs fast, and the col2im (a `jax.custom_vjp` would rule out jvp, jacfwd and
# Hessian-vector products; a `jax.custom_jvp`'s tangent map is transposed by
# autodiff). Forward mode binds it again on the tangents, as for any bilinear
# map; the gradient rules are ordinary JAX code, so they differentiate again.
_conv_p = Primitive('capsjax_conv_matmul')
_conv_p.def_impl(_matmul_forward)
mlir.register_lowering(_conv_p, mlir.lower_fun(_matmul_forward, multiple_results=False))


@_conv_p.def_abstract_eval
def _conv_abstract_eval(x, kernel, *, stride):
  batch, height, width, _ = x.shape
  kernel_h, kernel_w, _, features = kernel.shape
  return jax.core.ShapedArray((batch, output_size(height, kernel_h, stride),
                               output_size(width, kernel_w, stride), features), x.dtype)


def _conv_batch(args, dims, *, stride):
  x, kernel = args
  x_dim, kernel_dim = dims
  if kernel_dim is None:
    # Extra vmapped axes of x fold into its batch axis: every image is convolved alike.
    x = jnp.moveaxis(x, x_dim, 0)
    out = _conv_p.bind(x.reshape(-1, *x.shape[2:]), kernel, stride=stride)
    return out.reshape(*x.shape[:2], *out.shape[1:]), 0
  # A kernel per vmapped index takes the plain form, which vmap batches by itself.
  return jax.vmap(lambda x, kernel: _matmul_forward(x, kernel, stride=stride),
                  in_axes=(x_dim, kernel_dim))(x, kernel), 0


ad.defbilinear(_conv_p, _input_grad, _kernel_grad)
batching.primitive_batchers[_conv_p] = _conv_batch


def conv2d_matmul(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """VALID convolution as grouped im2col matrix products (col2im in the backward pass).

  Args:
    x: [batch, height, width, in_channels] float array.
    kernel: [kernel_h, kernel_w, in_channels, out_channels], x's dtype.
    stride: int, the same in both spatial directions.

  Returns:
    [batch, out_h, out_w, out_channels] in x's dtype, summed in float32 or wider,
    out = (size - kernel) // stride + 1.

  Raises:
    TypeError: when the kernel's dtype is not x's.
  """
  if kernel.dtype != x.dtype:
    raise TypeError(f'conv2d_matmul takes a kernel of x\'s dtype {x.dtype}, got {kernel.dtype}.')
  return _conv_p.bind(x, kernel, stride=stride)


def conv2d_xla(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """The same VALID convolution through `lax.conv_general_dilated` (the reference)."""
  return lax.conv_general_dilated(
      x, kernel, (stride, stride), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      preferred_element_type=accumulation_dtype(x.dtype)).astype(x.dtype)


def conv2d(x: jax.Array, kernel: jax.Array, stride: int, impl: str = 'auto') -> jax.Array:
  """VALID 2-D convolution, NHWC input and HWIO kernel.

  Args:
    x: [batch, height, width, in_channels] float array.
    kernel: [kernel_h, kernel_w, in_channels, out_channels], x's dtype.
    stride: int.
    impl: 'matmul' (grouped im2col matrix products, fastest on CPU), 'xla'
      (`lax.conv_general_dilated`) or 'auto' (by platform, see `resolve_impl`).

  Returns:
    [batch, out_h, out_w, out_channels].
  """
  if resolve_impl(impl) == 'matmul':
    return conv2d_matmul(x, kernel, stride)
  return conv2d_xla(x, kernel, stride)


def depthwise_conv2d(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """VALID depthwise 2-D convolution, stride 1: each channel convolved with its own kernel.

  Computed as a sum of the kernel_h * kernel_w shifted input windows, each times
  its tap's per-channel weights: elementwise work that XLA fuses, where the CPU's
  grouped `lax.conv` is slow. Efficient-CapsNet's primary capsules are one such
  convolution whose kernel covers the whole map (9x9 over 9x9).

  Args:
    x: [batch, height, width, channels] float array.
    kernel: [kernel_h, kernel_w, channels], x's dtype.

  Returns:
    [batch, height - kernel_h + 1, width - kernel_w + 1, channels] in x's dtype,
    summed in float32 or wider.
  """
  kernel_h, kernel_w, _ = kernel.shape
  out_h, out_w = output_size(x.shape[1], kernel_h, 1), output_size(x.shape[2], kernel_w, 1)
  acc = accumulation_dtype(x.dtype)
  out = jnp.zeros((x.shape[0], out_h, out_w, x.shape[3]), acc)
  for ky in range(kernel_h):
    for kx in range(kernel_w):
      out = out + (x[:, ky:ky + out_h, kx:kx + out_w, :].astype(acc) * kernel[ky, kx].astype(acc))
  return out.astype(x.dtype)
