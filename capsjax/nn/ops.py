"""Elementwise capsule operations: safe vector norms and the squash non-linearity."""

import jax
import jax.numpy as jnp

# Inside the square root, so that |s| and its gradient stay finite at s = 0.
NORM_EPSILON = 1e-7


def accumulation_dtype(dtype: jnp.dtype) -> jnp.dtype:
  """The dtype sums of `dtype` values run in: float32 for half precision.

  Half-precision sums of squares overflow or lose digits, and the CPU's and
  accelerators' fast bfloat16 products accumulate in float32.
  """
  return jnp.promote_types(dtype, jnp.float32)


def safe_norm(x: jax.Array, axis: int = -1, keepdims: bool = False,
              epsilon: float = NORM_EPSILON) -> jax.Array:
  """Euclidean norm sqrt(sum(x**2) + epsilon), finite with a finite gradient at x = 0.

  Args:
    x: array of any shape, any float dtype.
    axis: the vector axis.
    keepdims: keep `axis` with length 1.
    epsilon: added under the square root.

  Returns:
    The norms, x's shape without `axis` (or with length 1 there), x's dtype.
  """
  acc = accumulation_dtype(x.dtype)
  squared = jnp.sum(jnp.square(x.astype(acc)), axis=axis, keepdims=keepdims)
  return jnp.sqrt(squared + epsilon).astype(x.dtype)


def squash(s: jax.Array, axis: int = -1) -> jax.Array:
  """The paper's squash: (|s|^2 / (1 + |s|^2)) * s / |s|, along `axis`.

  Short vectors shrink towards length 0 and long ones to just below 1; the
  direction is kept. At s = 0 it returns 0 with a finite (zero) gradient.

  Args:
    s: array of any shape, any float dtype (float32, bfloat16, float64, ...).
    axis: the capsule (vector) axis.

  Returns:
    An array of s's shape and dtype whose vectors along `axis` have length in [0, 1).
  """
  acc = accumulation_dtype(s.dtype)
  s_acc = s.astype(acc)
  squared_norm = jnp.sum(jnp.square(s_acc), axis=axis, keepdims=True)
  scale = squared_norm / (1.0 + squared_norm) / jnp.sqrt(squared_norm + NORM_EPSILON)
  return (scale * s_acc).astype(s.dtype)


def efficient_squash(s: jax.Array, axis: int = -1) -> jax.Array:
  """Efficient-CapsNet's squash: (1 - 1 / exp(|s|)) * s / |s|, along `axis`.

  Mazzia, Salvetti, Chiaberge 2021, "Efficient-CapsNet: capsule network with
  self-attention routing", eq. (2): unlike `squash`, short vectors keep a
  gradient of length about 1 near 0.

  Args:
    s: array of any shape, any float dtype.
    axis: the capsule (vector) axis.

  Returns:
    An array of s's shape and dtype whose vectors along `axis` have length in [0, 1)
    (exactly 1 in float32 once |s| > 17).
  """
  acc = accumulation_dtype(s.dtype)
  s_acc = s.astype(acc)
  norm = jnp.sqrt(jnp.sum(jnp.square(s_acc), axis=axis, keepdims=True) + NORM_EPSILON)
  return ((1.0 - jnp.exp(-norm)) / norm * s_acc).astype(s.dtype)
