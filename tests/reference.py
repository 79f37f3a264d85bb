"""Float64 NumPy re-implementations of the paper's equations, written from its text."""

import numpy as np


def squash(s, axis=-1):
  norm2 = np.sum(s.astype(np.float64) ** 2, axis=axis, keepdims=True)
  with np.errstate(invalid='ignore', divide='ignore'):
    out = norm2 / (1.0 + norm2) * s / np.sqrt(norm2)
  return np.nan_to_num(out)  # the limit at s = 0 is 0


def routing(u_hat, num_iters):
  """Procedure 1 of the paper for one example; returns (v, c of the last iteration)."""
  u_hat = u_hat.astype(np.float64)
  num_in, num_out, _ = u_hat.shape
  b = np.zeros((num_in, num_out))
  for _ in range(num_iters):
    e = np.exp(b - b.max(axis=1, keepdims=True))
    c = e / e.sum(axis=1, keepdims=True)
    s = np.einsum('ij,ijd->jd', c, u_hat)
    v = squash(s)
    b = b + np.einsum('ijd,jd->ij', u_hat, v)
  return v, c


def margin_loss(lengths, targets, m_plus=0.9, m_minus=0.1, lam=0.5):
  lengths = lengths.astype(np.float64)
  total = np.zeros(lengths.shape[0])
  for n in range(lengths.shape[0]):
    for k in range(lengths.shape[1]):
      t = targets[n, k]
      total[n] += t * max(0.0, m_plus - lengths[n, k]) ** 2
      total[n] += lam * (1 - t) * max(0.0, lengths[n, k] - m_minus) ** 2
  return total


def conv2d_valid(x, kernel, stride):
  """Direct loops over output positions.

  out[b, y, x, o] = sum x[b, sy+ky, sx+kx, c] k[ky, kx, c, o].
  """
  batch, height, width, _ = x.shape
  kh, kw, _, features = kernel.shape
  oh, ow = (height - kh) // stride + 1, (width - kw) // stride + 1
  out = np.zeros((batch, oh, ow, features))
  for y in range(oh):
    for xx in range(ow):
      patch = x[:, y * stride:y * stride + kh, xx * stride:xx * stride + kw, :]
      out[:, y, xx, :] = np.einsum('bhwc,hwco->bo', patch, kernel)
  return out


def conv2d_valid_vjp(x, kernel, stride, out_grad):
  """Gradients (dx, dkernel) of sum(conv2d_valid(x, kernel, stride) * out_grad), by direct loops."""
  kh, kw = kernel.shape[:2]
  dx, dkernel = np.zeros(x.shape), np.zeros(kernel.shape)
  for y in range(out_grad.shape[1]):
    for xx in range(out_grad.shape[2]):
      rows, cols = slice(y * stride, y * stride + kh), slice(xx * stride, xx * stride + kw)
      dx[:, rows, cols, :] += np.einsum('bo,hwco->bhwc', out_grad[:, y, xx], kernel)
      dkernel += np.einsum('bhwc,bo->hwco', x[:, rows, cols, :], out_grad[:, y, xx])
  return dx, dkernel
