"""VALID 2-D convolution as matrix products of healthy shape.

XLA's CPU convolution is slow for CapsNet's layers (the input gradient of the
9x9 stride-2 PrimaryCaps convolution runs at ~4% of the machine's matmul rate).
The same convolution written as patch extraction (strided slices) followed by
one large matrix product per group of kernel rows runs forward and backward at
~80% of it: see BENCHMARKS.md. Both forms compute the same function.
"""

import math

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


def conv2d_matmul(x, kernel, stride):
  """VALID convolution as grouped im2col matrix products.

  Args:
    x: [batch, height, width, in_channels] float array.
    kernel: [kernel_h, kernel_w, in_channels, out_channels], x's dtype.
    stride: int, the same in both spatial directions.

  Returns:
    [batch, out_h, out_w, out_channels], out = (size - kernel) // stride + 1.
  """
  batch, height, width, channels = x.shape
  kernel_h, kernel_w, _, features = kernel.shape
  out_h = _output_size(height, kernel_h, stride)
  out_w = _output_size(width, kernel_w, stride)
  row_values = kernel_w * channels
  rows_per_group = min(kernel_h, math.ceil(MIN_CONTRACTION / row_values))

  def patches(ky, kx):
    return x[:, ky:ky + stride * (out_h - 1) + 1:stride,
             kx:kx + stride * (out_w - 1) + 1:stride, :]

  out = None
  for first in range(0, kernel_h, rows_per_group):
    group = range(first, min(first + rows_per_group, kernel_h))
    columns = jnp.concatenate(
        [patches(ky, kx) for ky in group for kx in range(kernel_w)], axis=-1)
    weights = kernel[group.start:group.stop].reshape(-1, features)
    term = columns.reshape(-1, columns.shape[-1]) @ weights
    out = term if out is None else out + term
  return out.reshape(batch, out_h, out_w, features)


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
