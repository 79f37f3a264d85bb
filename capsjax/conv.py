"""VALID 2-D convolution as matrix products of healthy shape.

XLA's CPU convolution is slow for CapsNet's layers: forward and backward of the
9x9 stride-2 PrimaryCaps convolution through `lax.conv_general_dilated` ran at
1.7% of the machine's matmul rate (batch 64, 2-core EPYC, 2026-11-23). Written as
patch extraction (strided slices) and one matrix product per kernel row, with a
col2im for the input gradient, the same layer ran its backward pass at about 60%
of that rate. Both forms compute the same function; `BENCHMARKS.md` has the
whole training step.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

# Kernel rows are grouped until a matmul contracts over at least this many
# values: Conv1 (1 input channel) then uses one im2col matmul with K = 81,
# PrimaryCaps (256 channels) one matmul per kernel row with K = 9 * 256, which
# keeps the patch tensor 9x smaller than full im2col at the same speed.
MIN_CONTRACTION = 512

CONV_IMPLS = ('matmul', 'xla')


def _output_size(size, kernel, stride):
  return (size - kernel) // stride + 1


def _row_groups(kernel_h, row_values):
  """Consecutive kernel rows whose columns one matrix product contracts over."""
  rows = min(kernel_h, math.ceil(MIN_CONTRACTION / row_values))
  return [range(first, min(first + rows, kernel_h)) for first in range(0, kernel_h, rows)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _columns(x, kernel_h, kernel_w, stride):
  """im2col per kernel-row group: [B, out_h, out_w, rows * kernel_w * C] each, taps (ky, kx, c)."""
  _, height, width, channels = x.shape
  out_h = _output_size(height, kernel_h, stride)
  out_w = _output_size(width, kernel_w, stride)

  def patches(ky, kx):
    return x[:, ky:ky + stride * (out_h - 1) + 1:stride,
             kx:kx + stride * (out_w - 1) + 1:stride, :]

  return [jnp.concatenate([patches(ky, kx) for ky in group for kx in range(kernel_w)], axis=-1)
          for group in _row_groups(kernel_h, kernel_w * channels)]


def _columns_fwd(x, kernel_h, kernel_w, stride):
  return _columns(x, kernel_h, kernel_w, stride), x.shape


def _columns_bwd(kernel_h, kernel_w, stride, x_shape, column_grads):
  """col2im: add every tap's gradient back onto the input pixels it was read from.

  Autodiff would transpose each strided slice into a padded full-size array and
  sum 81 of them, a select per tap per input pixel. Split by stride phase
  (pixels y = stride * m + py, x = stride * n + px), tap (ky, kx) lands on
  phase (ky % stride, kx % stride) at offset (ky // stride, kx // stride) with
  stride 1, so each phase is a few in-place block additions: 2x faster for the
  PrimaryCaps input gradient.
  """
  batch, height, width, channels = x_shape
  out_h = _output_size(height, kernel_h, stride)
  out_w = _output_size(width, kernel_w, stride)
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
  return (interleaved[:, :height, :width],)


_columns.defvjp(_columns_fwd, _columns_bwd)


def conv2d_matmul(x, kernel, stride):
  """VALID convolution as grouped im2col matrix products (col2im in the backward pass).

  Args:
    x: [batch, height, width, in_channels] float array.
    kernel: [kernel_h, kernel_w, in_channels, out_channels], x's dtype.
    stride: int, the same in both spatial directions.

  Returns:
    [batch, out_h, out_w, out_channels], out = (size - kernel) // stride + 1.
  """
  kernel_h, kernel_w, channels, features = kernel.shape
  groups = _row_groups(kernel_h, kernel_w * channels)
  out = None
  for group, columns in zip(groups, _columns(x, kernel_h, kernel_w, stride)):
    weights = kernel[group.start:group.stop].reshape(-1, features)
    term = columns.reshape(-1, columns.shape[-1]) @ weights
    out = term if out is None else out + term
  return out.reshape(*columns.shape[:3], features)


def conv2d_xla(x, kernel, stride):
  """The same VALID convolution through `lax.conv_general_dilated` (the reference)."""
  return lax.conv_general_dilated(
      x, kernel, (stride, stride), 'VALID',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def conv2d(x, kernel, stride, impl='matmul'):
  """VALID 2-D convolution, NHWC input and HWIO kernel.

  Args:
    x: [batch, height, width, in_channels] float array.
    kernel: [kernel_h, kernel_w, in_channels, out_channels], x's dtype.
    stride: int.
    impl: 'matmul' (grouped im2col matrix products, fastest on CPU) or 'xla'
      (`lax.conv_general_dilated`).

  Returns:
    [batch, out_h, out_w, out_channels].
  """
  if impl == 'matmul':
    return conv2d_matmul(x, kernel, stride)
  if impl == 'xla':
    return conv2d_xla(x, kernel, stride)
  raise ValueError(f'conv impl must be one of {CONV_IMPLS}, got {impl!r}.')
