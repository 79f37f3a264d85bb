"""Routing between capsules as pure, jit-compatible functions of one example.

  dynamic_routing                          Sabour, Frosst, Hinton 2017 (the paper's)
  em_routing                               Hinton, Sabour, Frosst 2018
  self_attention_routing                   Mazzia et al. 2021 (Efficient-CapsNet)
  inverted_dot_product_attention_routing   Tsai et al. 2020

Each takes the children's predictions for every parent, u_hat [num_in, num_out,
dim] (EM routing: votes, and the children's activations), and returns the
parents' outputs [num_out, dim] and the final assignment of children to parents
[num_in, num_out] (EM routing: the parents' activations between the two).
`jax.vmap` any of them over a batch, as `batched_dynamic_routing` does, to drop
it into a JAX model; each works under jit and grad, in float32 and bfloat16.
"""

import functools
import operator
from typing import Callable, Optional, Tuple

import jax
from jax import lax
import jax.numpy as jnp

from capsjax.nn.ops import accumulation_dtype, efficient_squash, squash


def _check_num_iters(num_iters):
  try:
    num_iters = operator.index(num_iters)
  except TypeError:
    raise ValueError(
        f'num_iters must be a Python int >= 1 (a static number of routing '
        f'iterations), got {num_iters!r} of type {type(num_iters).__name__}.') from None
  if num_iters < 1:
    raise ValueError(
        f'num_iters must be >= 1, got {num_iters}: routing needs at least one '
        f'iteration (the paper uses 3).')
  return num_iters


def _couplings(logits, dtype):
  """softmax over parents j of the routing logits b_ij, computed in float32."""
  return jax.nn.softmax(logits, axis=-1).astype(dtype)


def _parent_outputs(u_parent, couplings):
  """v_j = squash(sum_i c_ij u_hat[j|i]) for parent-major u_parent [J, I, D] and c [I, J]."""
  s = jnp.einsum('ij,jid->jd', couplings, u_parent,
                 preferred_element_type=accumulation_dtype(u_parent.dtype))
  return squash(s).astype(u_parent.dtype)


def _uniform_parent_outputs(u_parent):
  """v_j for uniform couplings 1 / J (routing logits b = 0), u_parent [J, I, D] -> [J, D]."""
  num_out = u_parent.shape[0]
  return squash((jnp.sum(u_parent, axis=1, dtype=jnp.float32) / num_out).astype(u_parent.dtype))


def _logit_update(u_parent, logits=None):
  """One iteration of Procedure 1 up to its logit update: b_ij gains u_hat[j|i] . v_j.

  Args:
    u_parent: parent-major predictions [J, I, D], any float dtype.
    logits: the routing logits b [I, J] (float32) the iteration starts from, or
      None for b = 0, the first iteration (every coupling 1 / J).

  Returns:
    The agreement u_hat[j|i] . v_j [I, J] in float32, where v_j are the
    parents' outputs for the couplings softmax(b): what the iteration adds to b.
  """
  if logits is None:
    # b = 0 makes every coupling 1 / num_out: s_j is a plain sum, about 2x faster
    # than the weighted one, and XLA has no softmax of a constant to fold (which
    # took seconds at compile time).
    v = _uniform_parent_outputs(u_parent)
  else:
    v = _parent_outputs(u_parent, _couplings(logits, u_parent.dtype))
  return jnp.einsum('jid,jd->ij', u_parent, v, preferred_element_type=jnp.float32)


def dynamic_routing(u_hat: jax.Array, num_iters: int = 3, *,
                    stop_inner_gradient: bool = False) -> Tuple[jax.Array, jax.Array]:
  """Routing by agreement for ONE example.

  The logits b_ij start at 0 (so every coupling is 1/num_out at first) and are
  updated num_iters - 1 times by the agreement u_hat[j|i] . v_j; the last
  iteration's couplings give the returned outputs. The loop is one
  `lax.fori_loop`, so the jaxpr does not grow with num_iters (XLA unrolls it
  when compiling, which lets it fuse across iterations); it works
  under `jit`, `grad` (through every iteration), `vmap`, in float32 and bfloat16.
  The logits are kept in float32 whatever the dtype of u_hat.

  Args:
    u_hat: [num_in, num_out, dim_out] prediction vectors u_hat[j|i] = W_ij u_i,
      any float dtype.
    num_iters: static Python int >= 1, the number of routing iterations r.
    stop_inner_gradient: if True, gradients reach u_hat only through the last
      iteration (faster, as some implementations do); the default False lets
      them flow through all iterations, as in the paper.

  Returns:
    (v, c): v [num_out, dim_out], the parents' squashed outputs, u_hat's dtype;
    c [num_in, num_out], the coupling coefficients of the last iteration
    (each row sums to 1), u_hat's dtype.

  Raises:
    ValueError: if num_iters is not an int >= 1 or u_hat is not 3-D.
  """
  num_iters = _check_num_iters(num_iters)
  if u_hat.ndim != 3:
    raise ValueError(
        f'u_hat must be [num_in, num_out, dim_out] for one example, got shape '
        f'{u_hat.shape}; use batched_dynamic_routing for a leading batch axis.')
  num_in, num_out, _ = u_hat.shape
  # Parent-major [J, I, D]: both contractions are then batched matrix products
  # over j with their operands in place, so XLA keeps one layout of the
  # predictions instead of a copy per contraction.
  u_parent = jnp.swapaxes(u_hat, 0, 1)
  u_routing = lax.stop_gradient(u_parent) if stop_inner_gradient else u_parent

  def update_logits(_: jax.Array, logits: jax.Array) -> jax.Array:
    return logits + _logit_update(u_routing, logits)

  if num_iters == 1:
    return (_uniform_parent_outputs(u_parent),
            jnp.full((num_in, num_out), 1.0 / num_out, u_hat.dtype))
  # One loop in the jaxpr; XLA sees it unrolled (num_iters is small and static),
  # so it fuses across iterations. Against the rolled loop, at batch 64 on a
  # 2-core CPU: forward+backward 89 -> 35 ms, temporaries 211 -> 63 MB.
  logits = lax.fori_loop(0, num_iters - 2, update_logits, _logit_update(u_routing), unroll=True)
  couplings = _couplings(logits, u_hat.dtype)
  return _parent_outputs(u_parent, couplings), couplings


def batched_dynamic_routing(u_hat: jax.Array, num_iters: int = 3, *,
                            stop_inner_gradient: bool = False) -> Tuple[jax.Array, jax.Array]:
  """`dynamic_routing` vmapped over a leading batch axis.

  Args:
    u_hat: [batch, num_in, num_out, dim_out] prediction vectors.
    num_iters: static Python int >= 1.
    stop_inner_gradient: as in `dynamic_routing`.

  Returns:
    (v, c): v [batch, num_out, dim_out] and c [batch, num_in, num_out].
  """
  num_iters = _check_num_iters(num_iters)
  if u_hat.ndim != 4:
    raise ValueError(
        f'u_hat must be [batch, num_in, num_out, dim_out], got shape {u_hat.shape}; '
        f'use dynamic_routing for a single example.')
  route = functools.partial(dynamic_routing, num_iters=num_iters,
                            stop_inner_gradient=stop_inner_gradient)
  return jax.vmap(route)(u_hat)


def _check_predictions(u_hat: jax.Array, name: str) -> None:
  if u_hat.ndim != 3:
    raise ValueError(
        f'{name} must be [num_in, num_out, dim_out] for one example, got shape {u_hat.shape}; '
        f'vmap the routing over a leading batch axis (see batched_dynamic_routing).')


def em_routing(votes: jax.Array, activations: jax.Array, beta_u: jax.Array, beta_a: jax.Array,
               num_iters: int = 3, *, inverse_temperature: float = 0.01,
               variance_epsilon: float = 1e-6, normalize_mass: bool = False
               ) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """EM routing between capsules for ONE example (Hinton, Sabour, Frosst 2018).

  "Matrix capsules with EM routing", Procedure 1: each parent j is a Gaussian
  over the children's votes V_ij, fitted by an M-step weighted by the
  assignments R_ij times the children's activations a_i, with an activation
  a_j = logistic(lambda (beta_a - sum_h cost_h)), cost_h = (beta_u + log sigma_jh)
  sum_i R_ij a_i; the E-step reassigns each child in proportion to a_j p_j(V_ij).
  Assignments start uniform; each of `num_iters` iterations is an M-step, and
  all but the last are followed by an E-step. The paper does not give its
  schedule of the inverse temperature lambda; here it rises linearly,
  lambda_t = inverse_temperature * t / num_iters for t = 1..num_iters.

  Computed in float32 whatever the votes' dtype, with the Gaussians'
  log-densities and the E-step's normalisation in the log domain (log-sum-exp),
  and sigma^2 floored by `variance_epsilon`: no exp of a large log-density,
  no log of 0, for votes that agree exactly or activations of 0.

  The cost grows with the mass sum_i R_ij a_i a parent receives, so with many
  children (the 1,152 primary capsules of CapsNet's class layer) and small
  initial votes, lambda (beta_a - sum_h cost_h) is large and every a_j is 1 to
  float precision, where its gradient vanishes: the network cannot start to
  learn. `normalize_mass=True` scales each parent's mass in the cost by num_out /
  sum_j' mass_j', so the masses average 1 over the parents, whatever the number
  of children (the pitfall "normalising the amount of data assigned to parent
  capsules" of Gritzman 2019, arXiv:1907.00652); the Gaussians' means and
  variances are unchanged.

  Args:
    votes: [num_in, num_out, dim] V_ij (a 4x4 pose matrix is dim 16), any float dtype.
    activations: [num_in] a_i in [0, 1].
    beta_u: scalar or [num_out], the cost per unit of spread (learned).
    beta_a: scalar or [num_out], the activation threshold (learned).
    num_iters: static Python int >= 1 (the paper uses 3).
    inverse_temperature: lambda of the last iteration.
    variance_epsilon: added to each sigma^2.
    normalize_mass: scale the masses in the cost to a mean of 1 over the parents.

  Returns:
    (poses, parent_activations, assignment): mu [num_out, dim] in the votes'
    dtype, a_j [num_out] float32, and R [num_in, num_out] float32, the
    assignment the last M-step used (each row sums to 1).
  """
  num_iters = _check_num_iters(num_iters)
  _check_predictions(votes, 'votes')
  num_in, num_out, dim = votes.shape
  v = votes.astype(jnp.float32)
  a_in = jnp.asarray(activations, jnp.float32)[:, None]                        # [I, 1]
  beta_u = jnp.broadcast_to(jnp.asarray(beta_u, jnp.float32), (num_out,))
  beta_a = jnp.broadcast_to(jnp.asarray(beta_a, jnp.float32), (num_out,))

  def m_step(assignment, iteration):
    weights = assignment * a_in                                                # R_ij a_i
    mass = jnp.sum(weights, axis=0)                                            # [J]
    # A weighted mean however small the weights (a parent that lost its children keeps
    # its Gaussian, as the paper's M-step says); 0 only where no child has any weight.
    share = weights / jnp.where(mass > 0, mass, 1.0)                           # sums to 1 over i
    mean = jnp.einsum('ij,ijd->jd', share, v)
    variance = jnp.einsum('ij,ijd->jd', share, jnp.square(v - mean)) + variance_epsilon
    if normalize_mass:
      mass = mass * (num_out / jnp.maximum(jnp.sum(mass), jnp.finfo(jnp.float32).tiny))
    cost = (beta_u[:, None] + 0.5 * jnp.log(variance)) * mass[:, None]        # [J, D]
    temperature = inverse_temperature * (iteration + 1) / num_iters
    logits = temperature * (beta_a - jnp.sum(cost, axis=-1))                   # [J]
    return mean, variance, logits

  def e_step(mean, variance, logits):
    log_density = -0.5 * jnp.sum(jnp.square(v - mean) / variance
                                 + jnp.log(2 * jnp.pi * variance), axis=-1)   # [I, J]
    return jax.nn.softmax(jax.nn.log_sigmoid(logits) + log_density, axis=-1)

  def iterate(iteration, assignment):
    return e_step(*m_step(assignment, iteration))

  assignment = lax.fori_loop(0, num_iters - 1, iterate,
                             jnp.full((num_in, num_out), 1.0 / num_out, jnp.float32),
                             unroll=True)
  mean, _, logits = m_step(assignment, num_iters - 1)
  return mean.astype(votes.dtype), jax.nn.sigmoid(logits), assignment


def self_attention_routing(u_hat: jax.Array, log_priors: Optional[jax.Array] = None, *,
                           squash_fn: Callable[[jax.Array], jax.Array] = efficient_squash
                           ) -> Tuple[jax.Array, jax.Array]:
  """Self-attention routing for ONE example (Mazzia et al. 2021, Efficient-CapsNet).

  "Efficient-CapsNet: capsule network with self-attention routing", eqs. (5)-(7):
  for each parent n, the agreements A_n = U_n U_n^T / sqrt(dim) of the
  children's predictions U_n [num_in, dim] are summed over one child index,
  c_{n,i} = softmax over parents of sum_k A_{n,k,i}, and
  s_n = sum_i u_hat[n|i] (c_{n,i} + b_{n,i}), with b the learned log priors;
  the output is squash_fn(s_n). No iterations: one pass.

  Args:
    u_hat: [num_in, num_out, dim] predictions u_hat[n|i], any float dtype.
    log_priors: [num_in, num_out] b, or None for zeros.
    squash_fn: the non-linearity (Efficient-CapsNet's own squash by default).

  Returns:
    (v, c): v [num_out, dim] in u_hat's dtype; c [num_in, num_out] the
    couplings (softmax over parents: each row sums to 1), u_hat's dtype.
  """
  _check_predictions(u_hat, 'u_hat')
  dim = u_hat.shape[-1]
  # sum_k A_{n,k,i} = (sum_k u_hat[n|k]) . u_hat[n|i] / sqrt(dim): one product, not [J, I, I].
  total = jnp.sum(u_hat, axis=0, dtype=jnp.float32).astype(u_hat.dtype)       # [J, D]
  agreement = jnp.einsum('ijd,jd->ij', u_hat, total,
                         preferred_element_type=jnp.float32) / jnp.sqrt(float(dim))
  couplings = jax.nn.softmax(agreement, axis=-1)
  weights = couplings if log_priors is None else couplings + log_priors.astype(jnp.float32)
  s = jnp.einsum('ij,ijd->jd', weights.astype(u_hat.dtype), u_hat,
                 preferred_element_type=jnp.float32)
  return squash_fn(s).astype(u_hat.dtype), couplings.astype(u_hat.dtype)


def inverted_dot_product_attention_routing(
    u_hat: jax.Array, num_iters: int = 2, *, scale: Optional[jax.Array] = None,
    bias: Optional[jax.Array] = None, epsilon: float = 1e-5) -> Tuple[jax.Array, jax.Array]:
  """Inverted dot-product attention routing for ONE example (Tsai et al. 2020).

  "Capsules with inverted dot-product attention routing", Procedure 1: the
  parents' poses p_j start at 0, so the first assignment is uniform; each
  iteration takes the agreements a_ij = p_j . v_ij, the assignment
  r_ij = softmax over parents j of a_ij, the poses p_j = sum_i r_ij v_ij, and
  normalises each pose with a layer normalisation over its dim entries.

  Args:
    u_hat: [num_in, num_out, dim] votes v_ij, any float dtype.
    num_iters: static Python int >= 1, the pose updates (the paper uses 2 or 3).
    scale, bias: [dim] the layer normalisation's learned gain and offset (None:
      1 and 0).
    epsilon: added to the variance in the layer normalisation.

  Returns:
    (p, r): p [num_out, dim] the normalised poses in u_hat's dtype; r
    [num_in, num_out] the assignment of the last iteration (rows sum to 1).
  """
  num_iters = _check_num_iters(num_iters)
  _check_predictions(u_hat, 'u_hat')
  num_in, num_out, _ = u_hat.shape

  def poses(assignment):
    p = jnp.einsum('ij,ijd->jd', assignment.astype(u_hat.dtype), u_hat,
                   preferred_element_type=jnp.float32)
    p = (p - jnp.mean(p, axis=-1, keepdims=True)) * lax.rsqrt(
        jnp.var(p, axis=-1, keepdims=True) + epsilon)
    if scale is not None:
      p = p * scale
    if bias is not None:
      p = p + bias
    return p

  def assign(p):
    agreement = jnp.einsum('ijd,jd->ij', u_hat, p.astype(u_hat.dtype),
                           preferred_element_type=jnp.float32)
    return jax.nn.softmax(agreement, axis=-1)

  def iterate(_, assignment):
    return assign(poses(assignment))

  assignment = lax.fori_loop(0, num_iters - 1, iterate,
                             jnp.full((num_in, num_out), 1.0 / num_out, jnp.float32),
                             unroll=True)
  return poses(assignment).astype(u_hat.dtype), assignment.astype(u_hat.dtype)
