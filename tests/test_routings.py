"""EM, self-attention and inverted dot-product attention routing against float64 references.

The references (tests/reference.py) are loop-by-loop NumPy transcriptions of the papers'
equations: Hinton, Sabour, Frosst 2018, Procedure 1 (EM); Mazzia et al. 2021, eqs. (5)-(7)
(self-attention, with the full [J, I, I] attention tensor); Tsai et al. 2020, Procedure 1
(inverted dot-product attention). Each routing is jitted once per shape at module level, so
the tests that share a shape share a compilation.

Tolerances. Values: the JAX functions compute in float32 (round-off about 6e-8 per
operation); sums over up to 72 children and three iterations, each through an exp (softmax,
Gaussian densities), give errors of about 1e-6 on outputs of order 1, so rtol 1e-4 with an
atol of 1e-5 (1e-6 for activations and assignments in [0, 1]) leaves a margin of about 10x.
Gradients: central differences of the float64 reference with step 1e-6 are exact to about
1e-9; the float32 gradients carry relative errors of about 1e-5 after the iterations, so
rtol 1e-3 with atol 1e-4 times the largest entry.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capsjax.nn.ops import efficient_squash, squash
from capsjax.nn.routing import (
                                em_routing,
                                inverted_dot_product_attention_routing,
                                self_attention_routing,
)
from tests import reference

EM = jax.jit(em_routing, static_argnames=('num_iters', 'inverse_temperature', 'variance_epsilon',
                                          'normalize_mass'))
SELF_ATTENTION = jax.jit(self_attention_routing, static_argnames=('squash_fn',))
INVERTED = jax.jit(inverted_dot_product_attention_routing, static_argnames=('num_iters', 'epsilon'))


def normal(shape, seed, scale=1.0):
  return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


def em_inputs(shape, seed, per_parent=True, scale=1.0):
  """votes [I, J, D], activations [I] in [0.05, 1), beta_u and beta_a ([J] or scalars)."""
  num_in, num_out, _ = shape
  rng = np.random.default_rng(seed)
  votes = (rng.normal(size=shape) * scale).astype(np.float32)
  activations = rng.uniform(0.05, 1.0, size=num_in).astype(np.float32)
  beta_shape = (num_out,) if per_parent else ()
  beta_u = rng.normal(size=beta_shape).astype(np.float32) * 0.5
  beta_a = rng.normal(size=beta_shape).astype(np.float32)
  return votes, activations, beta_u, beta_a


def assert_assignment(r, num_in, num_out):
  """Rows of an assignment [I, J] are distributions over parents."""
  r = np.asarray(r, np.float64)
  assert r.shape == (num_in, num_out)
  assert np.all(np.isfinite(r)) and np.all(r >= 0) and np.all(r <= 1)
  np.testing.assert_allclose(r.sum(axis=1), 1.0, rtol=1e-5)


def assert_all_finite(tree):
  for leaf in jax.tree_util.tree_leaves(tree):
    assert bool(jnp.all(jnp.isfinite(jnp.asarray(leaf, jnp.float32)))), leaf


def finite_differences(f, args, eps=1e-6):
  """Central differences of the float64 scalar function f(*args), one entry at a time."""
  args = [np.array(a, np.float64) for a in args]
  grads = []
  for k, arg in enumerate(args):
    grad = np.zeros_like(arg)
    for idx in np.ndindex(arg.shape):
      plus, minus = list(args), list(args)
      plus[k], minus[k] = arg.copy(), arg.copy()
      plus[k][idx] += eps
      minus[k][idx] -= eps
      grad[idx] = (f(*plus) - f(*minus)) / (2 * eps)
    grads.append(grad)
  return grads


def assert_gradients_close(grads, numeric):
  for grad, num in zip(grads, numeric):
    assert grad.shape == num.shape
    assert bool(jnp.all(jnp.isfinite(grad)))
    np.testing.assert_allclose(grad, num, rtol=1e-3, atol=1e-4 * np.max(np.abs(num)))


# ------------------------------------------------------------------------------ EM routing


@pytest.mark.parametrize('shape, num_iters, per_parent, inverse_temperature, normalize', [
    ((2, 2, 1), 3, True, 0.01, False),      # tiny
    ((5, 8, 4), 1, False, 0.01, False),     # fewer children than parents, one M-step only
    ((12, 5, 16), 2, True, 1.0, False),     # 4x4 poses; a sharp temperature: a_j far from 1/2
    ((72, 10, 16), 3, False, 0.01, False),  # 3x3 kernel x 8 capsule types -> 10 classes
    ((12, 5, 16), 2, True, 1.0, True),      # the masses normalised (CapsNet's EM layer)
    ((72, 10, 16), 3, False, 0.01, True),
])
def test_em_matches_float64_reference(shape, num_iters, per_parent, inverse_temperature,
                                      normalize):
  votes, activations, beta_u, beta_a = em_inputs(shape, seed=sum(shape) + num_iters,
                                                 per_parent=per_parent)
  mu, a, r = EM(votes, activations, beta_u, beta_a, num_iters=num_iters,
                inverse_temperature=inverse_temperature, normalize_mass=normalize)
  mu_ref, a_ref, r_ref = reference.em_routing(votes, activations, beta_u, beta_a, num_iters,
                                              inverse_temperature, normalize_mass=normalize)
  assert mu.dtype == jnp.float32 and a.dtype == jnp.float32 and r.dtype == jnp.float32
  np.testing.assert_allclose(mu, mu_ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(a, a_ref, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(r, r_ref, rtol=1e-4, atol=1e-6)
  assert_assignment(r, *shape[:2])
  # Strictly inside (0, 1) at the default temperature; at lambda = 1 logits of 20 or more
  # occur, whose logistic rounds to 1 in float32.
  if inverse_temperature < 0.1:
    assert bool(jnp.all((a > 0) & (a < 1)))
  else:
    assert bool(jnp.all((a >= 0) & (a <= 1)))
  if num_iters == 1:  # the only M-step used the uniform start
    np.testing.assert_array_equal(r, np.full(shape[:2], 1.0 / shape[1], np.float32))


def em_objective(votes, activations, beta_u, beta_a, weights, num_iters, inverse_temperature):
  """A random linear functional of all of EM routing's outputs, and the outputs."""
  outputs = em_routing(votes, activations, beta_u, beta_a, num_iters,
                       inverse_temperature=inverse_temperature)
  return sum(jnp.sum(out * w) for out, w in zip(outputs, weights)), outputs


# One compilation for the gradient test and the degenerate cases (same shapes).
EM_GRAD = jax.jit(jax.grad(em_objective, argnums=(0, 1, 2, 3), has_aux=True),
                  static_argnames=('num_iters', 'inverse_temperature'))
EM_GRAD_SHAPE = (4, 3, 4)
EM_GRAD_LAMBDA = 0.5  # large enough that the activations' gradients are not tiny


def em_weights(seed):
  num_in, num_out, dim = EM_GRAD_SHAPE
  return normal((num_out, dim), seed), normal((num_out,), seed + 1), normal((num_in, num_out),
                                                                            seed + 2)


def test_em_gradients_match_float64_finite_differences():
  args = em_inputs(EM_GRAD_SHAPE, seed=11)
  weights = em_weights(12)

  def objective_ref(*args):
    outputs = reference.em_routing(*args, 3, EM_GRAD_LAMBDA)
    return sum(np.sum(out * w) for out, w in zip(outputs, weights))

  grads, _ = EM_GRAD(*args, weights, num_iters=3, inverse_temperature=EM_GRAD_LAMBDA)
  assert_gradients_close(grads, finite_differences(objective_ref, args))


def test_em_invariants_on_spread_out_votes():
  votes, activations, beta_u, beta_a = em_inputs((72, 10, 16), seed=21, per_parent=False,
                                                 scale=3.0)
  mu, a, r = EM(votes, activations, beta_u, beta_a, num_iters=3)
  assert mu.shape == (10, 16) and bool(jnp.all(jnp.isfinite(mu)))
  assert a.shape == (10,) and bool(jnp.all((a > 0) & (a < 1)))
  assert_assignment(r, 72, 10)


def test_em_child_with_zero_activation_does_not_move_the_parents():
  # R'_ij = R_ij a_i: a child with a_i = 0 has no weight in any M-step, whatever its votes.
  votes, activations, beta_u, beta_a = em_inputs((12, 5, 16), seed=31)
  activations[4] = 0.0
  moved = votes.copy()
  moved[4] = normal((5, 16), 32, scale=10.0)
  mu, a, r = EM(votes, activations, beta_u, beta_a, num_iters=2, inverse_temperature=1.0)
  mu_moved, a_moved, r_moved = EM(moved, activations, beta_u, beta_a, num_iters=2,
                                  inverse_temperature=1.0)
  np.testing.assert_allclose(mu_moved, mu, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(a_moved, a, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.delete(r_moved, 4, 0), np.delete(r, 4, 0), rtol=1e-6, atol=1e-7)
  mu_ref, a_ref, _ = reference.em_routing(moved, activations, beta_u, beta_a, 2, 1.0)
  np.testing.assert_allclose(mu_moved, mu_ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(a_moved, a_ref, rtol=1e-4, atol=1e-6)


def em_weak_parent_case(case):
  """Inputs after which a parent's weight sum_i R_ij a_i is tiny, but far from 0 in float32."""
  args = em_inputs(EM_GRAD_SHAPE, seed=71)
  if case == 'inactive_parent':
    # beta_a_1 = -200 makes a_1 = logistic(lambda_1 (-200 - cost)) ~ e^-33 after the first
    # M-step (lambda_1 = 0.5 / 3), so the E-step gives parent 1 weights R_i1 ~ 1e-15.
    args[3][1] = -200.0
  else:
    # Every child casts the same vote for parent 0: sigma2_0 = eps, each of its D = 4 Gaussian
    # factors has density 1 / sqrt(2 pi eps) ~ 400, and the E-step gives it almost all the
    # weight: parents 1 and 2 keep sum_i R_ij a_i ~ 1e-11 (see em_degenerate_case).
    args = em_degenerate_case('identical_votes')
  return args


@pytest.mark.parametrize('case', ['inactive_parent', 'identical_votes'])
def test_em_parent_with_tiny_weight_keeps_the_weighted_mean(case):
  # The paper's mu_jh = sum_i R'_ij V_ijh / sum_i R'_ij is the R'-weighted mean of the votes
  # for parent j whatever the scale of the weights R'_ij (here 1e-15 .. 1e-11, all normal
  # float32 numbers), and sigma2_jh their weighted spread; the E-step that follows uses both.
  args = em_weak_parent_case(case)
  _, (mu, a, r) = EM_GRAD(*args, em_weights(62), num_iters=3, inverse_temperature=EM_GRAD_LAMBDA)
  mu_ref, a_ref, r_ref = reference.em_routing(*args, 3, EM_GRAD_LAMBDA)
  _, _, r_before = reference.em_routing(*args, 2, EM_GRAD_LAMBDA)  # what the 2nd M-step used
  masses = np.sum(r_before * args[1][:, None], axis=0)
  assert np.min(masses) < 1e-10 and np.min(masses) > 1e-30  # the regime this test is about
  np.testing.assert_allclose(a, a_ref, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(mu, mu_ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(r, r_ref, rtol=1e-4, atol=1e-6)


def test_em_jit_and_vmap_equal_the_per_example_results():
  batch = [em_inputs((12, 5, 16), seed=40 + n) for n in range(3)]
  votes = np.stack([b[0] for b in batch])
  activations = np.stack([b[1] for b in batch])
  beta_u, beta_a = batch[0][2], batch[0][3]  # parameters, shared by the batch
  route = jax.jit(jax.vmap(
      lambda v, a: em_routing(v, a, beta_u, beta_a, 2, inverse_temperature=1.0)))
  mu, a, r = route(votes, activations)
  assert mu.shape == (3, 5, 16) and a.shape == (3, 5) and r.shape == (3, 12, 5)
  for n in range(3):
    mu_n, a_n, r_n = EM(votes[n], activations[n], beta_u, beta_a, num_iters=2,
                        inverse_temperature=1.0)
    # Batching changes the order of float32 sums: round-off, amplified by the E-step's exp.
    np.testing.assert_allclose(mu[n], mu_n, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a[n], a_n, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(r[n], r_n, rtol=1e-4, atol=1e-6)


def test_em_bfloat16():
  # Everything is computed in float32 from the bfloat16 inputs; only mu is rounded back to
  # bfloat16. So against the float32 run on the same (bf16-rounded) inputs: a_j and R agree
  # to float32 round-off, mu to bf16's rounding (relative 2^-9, tolerance 2^-8).
  votes, activations, beta_u, beta_a = em_inputs((12, 5, 16), seed=51)
  votes16, activations16 = jnp.asarray(votes, jnp.bfloat16), jnp.asarray(activations, jnp.bfloat16)
  mu, a, r = EM(votes16, activations16, beta_u, beta_a, num_iters=2, inverse_temperature=1.0)
  assert mu.dtype == jnp.bfloat16 and a.dtype == jnp.float32 and r.dtype == jnp.float32
  assert_all_finite((mu, a, r))
  mu32, a32, r32 = EM(np.asarray(votes16, np.float32), np.asarray(activations16, np.float32),
                      beta_u, beta_a, num_iters=2, inverse_temperature=1.0)
  np.testing.assert_allclose(np.asarray(mu, np.float32), mu32, rtol=2 ** -8, atol=1e-6)
  np.testing.assert_allclose(a, a32, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(r, r32, rtol=1e-6, atol=1e-7)


def em_degenerate_case(case):
  votes, activations, beta_u, beta_a = em_inputs(EM_GRAD_SHAPE, seed=61)
  if case == 'identical_votes':
    votes[:, 0] = votes[0, 0]  # every child casts the same vote for parent 0: sigma2 = eps
  elif case == 'zero_activations':
    activations[:] = 0.0
  else:
    votes *= 1e3
  return votes, activations, beta_u, beta_a


@pytest.mark.parametrize('case', ['identical_votes', 'zero_activations', 'large_votes'])
def test_em_degenerate_inputs_give_finite_outputs_and_gradients(case):
  args = em_degenerate_case(case)
  votes, activations, beta_u, beta_a = args
  lam = EM_GRAD_LAMBDA
  grads, (mu, a, r) = EM_GRAD(*args, em_weights(62), num_iters=3, inverse_temperature=lam)
  assert_all_finite((mu, a, r, grads))
  assert_assignment(r, *EM_GRAD_SHAPE[:2])
  # In [0, 1], not (0, 1): a parent whose votes agree exactly has a cost of about
  # (beta_u + log sqrt(eps)) * mass * D, and logistic of its large logit rounds to 1 in float32.
  assert bool(jnp.all((a >= 0) & (a <= 1)))
  if case == 'zero_activations':
    # sum_i R'_ij = 0 makes every cost_jh 0, so a_j = logistic(lambda_T beta_a_j).
    np.testing.assert_allclose(a, 1 / (1 + np.exp(-lam * beta_a.astype(np.float64))), rtol=1e-6)
    return
  mu_ref, a_ref, r_ref = reference.em_routing(*args, 3, lam)
  if case == 'identical_votes':
    # Only parent 0's pose: the other two keep a tiny weight, the case of
    # test_em_parent_with_tiny_weight_keeps_the_weighted_mean.
    np.testing.assert_allclose(mu[0], votes[0, 0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(mu_ref[0], votes[0, 0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(a, a_ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(r, r_ref, rtol=1e-4, atol=1e-6)
  else:
    # The value tolerances scaled by the votes' 1e3 (mu within 1e-5 of the scale); the
    # Gaussians' log-densities are about 10x larger than at scale 1, and log sigma ~ 7
    # multiplies each change of the mass sum_i R'_ij in the activation's logit, so float32
    # round-off moves R and a_j several times more (measured 3e-6 and 3e-5 relative).
    np.testing.assert_allclose(mu, mu_ref, rtol=1e-4, atol=1e-2)
    np.testing.assert_allclose(a, a_ref, rtol=5e-4, atol=1e-6)
    np.testing.assert_allclose(r, r_ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------- self-attention routing


def test_efficient_squash_matches_its_equation():
  s = normal((7, 5), 70) * np.array([[1e-3], [0.1], [0.5], [1.0], [3.0], [10.0], [50.0]],
                                    np.float32)
  expected = np.stack([reference.efficient_squash(row) for row in s])
  np.testing.assert_allclose(efficient_squash(jnp.asarray(s)), expected, rtol=1e-5, atol=1e-7)
  # At s = 0: output 0; the gradient there is finite (the limit of d squash / ds is I).
  np.testing.assert_array_equal(efficient_squash(jnp.zeros((1, 4))), 0.0)
  grad = jax.jit(jax.grad(lambda x: jnp.sum(efficient_squash(x) * jnp.arange(1.0, 5.0))))
  np.testing.assert_allclose(grad(jnp.zeros(4)), np.arange(1.0, 5.0), rtol=1e-3)


@pytest.mark.parametrize('shape, with_priors', [
    ((2, 2, 1), False),   # tiny
    ((5, 8, 4), True),    # fewer children than parents
    ((12, 5, 16), False),
    ((12, 5, 16), True),
    ((72, 10, 16), True),
])
def test_self_attention_matches_float64_reference(shape, with_priors):
  u_hat = normal(shape, sum(shape), scale=0.5)
  priors = normal(shape[:2], sum(shape) + 1, scale=0.3) if with_priors else None
  v, c = SELF_ATTENTION(u_hat, priors)
  v_ref, c_ref = reference.self_attention_routing(u_hat, priors)
  assert v.dtype == jnp.float32 and c.dtype == jnp.float32
  np.testing.assert_allclose(v, v_ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(c, c_ref, rtol=1e-4, atol=1e-6)


def test_self_attention_with_the_papers_squash_function():
  u_hat = normal((12, 5, 16), 75, scale=0.5)
  v, c = SELF_ATTENTION(u_hat, None, squash_fn=squash)
  v_ref, c_ref = reference.self_attention_routing(u_hat, squash_fn=reference.squash)
  np.testing.assert_allclose(v, v_ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(c, c_ref, rtol=1e-4, atol=1e-6)


def test_self_attention_hand_computed_tiny_case():
  # I = 2 children, J = 2 parents, D = 1: u_hat[:, 0] = [1, 1], u_hat[:, 1] = [1, -1].
  # A_0 = [[1, 1], [1, 1]] and A_1 = [[1, -1], [-1, 1]] (sqrt(D) = 1); their column sums
  # are [2, 2] and [0, 0]. So for either child c_{0,i} = e^2 / (e^2 + e^0) = logistic(2)
  # = 0.8807970779778823 and c_{1,i} = 0.11920292202211769.
  # Without priors: s_0 = 1 c + 1 c = 1.7615941559557646 and s_1 = c' - c' = 0, so
  # v_0 = 1 - exp(-1.76159...) = 0.8282291840257293 (D = 1: s / |s| = 1) and v_1 = 0.
  # With b = [[0.5, 0], [0, 0.25]]: s_0 = (c + 0.5) + c = 2.2615941559557644, v_0 =
  # 1 - exp(-2.26159...) = 0.8958157336677482; s_1 = (c' + 0) - (c' + 0.25) = -0.25, v_1 =
  # -(1 - exp(-0.25)) = -0.22119921692859512.
  u_hat = jnp.array([[[1.0], [1.0]], [[1.0], [-1.0]]])
  c_expected = [[0.8807970779778823, 0.11920292202211769]] * 2
  v, c = SELF_ATTENTION(u_hat)
  np.testing.assert_allclose(c, c_expected, rtol=1e-6)
  np.testing.assert_allclose(v, [[0.8282291840257293], [0.0]], rtol=1e-6, atol=1e-7)
  v, c = SELF_ATTENTION(u_hat, jnp.array([[0.5, 0.0], [0.0, 0.25]]))
  np.testing.assert_allclose(c, c_expected, rtol=1e-6)
  np.testing.assert_allclose(v, [[0.8958157336677482], [-0.22119921692859512]], rtol=1e-6)


def test_self_attention_gradients_match_float64_finite_differences():
  u_hat, priors = normal((4, 3, 4), 80, scale=0.7), normal((4, 3), 81, scale=0.3)
  w_v, w_c = normal((3, 4), 82), normal((4, 3), 83)

  def objective(u, b):
    v, c = self_attention_routing(u, b)
    return jnp.sum(v * w_v) + jnp.sum(c * w_c)

  def objective_ref(u, b):
    v, c = reference.self_attention_routing(u, b)
    return np.sum(v * w_v) + np.sum(c * w_c)

  grads = jax.jit(jax.grad(objective, argnums=(0, 1)))(u_hat, priors)
  assert_gradients_close(grads, finite_differences(objective_ref, (u_hat, priors)))


def test_self_attention_invariants():
  u_hat, priors = normal((72, 10, 16), 90, scale=2.0), normal((72, 10), 91)
  v, c = SELF_ATTENTION(u_hat, priors)
  assert v.shape == (10, 16)
  assert_assignment(c, 72, 10)
  # |v| = 1 - exp(-|s|) < 1; in float32 it rounds to 1 once exp(-|s|) < 2^-25 (|s| > 17).
  lengths = jnp.linalg.norm(v, axis=-1)
  assert bool(jnp.all((lengths >= 0) & (lengths <= 1 + 1e-6)))


def test_self_attention_jit_and_vmap_equal_the_per_example_results():
  u_hat, priors = normal((3, 12, 5, 16), 100, scale=0.5), normal((12, 5), 101, scale=0.3)
  v, c = jax.jit(jax.vmap(self_attention_routing, in_axes=(0, None)))(u_hat, priors)
  assert v.shape == (3, 5, 16) and c.shape == (3, 12, 5)
  for n in range(3):
    v_n, c_n = SELF_ATTENTION(u_hat[n], priors)
    # Batching may change the order of float32 sums: round-off only.
    np.testing.assert_allclose(v[n], v_n, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(c[n], c_n, rtol=1e-5, atol=1e-6)


def test_self_attention_bfloat16():
  # Against float32 on the same bf16-rounded inputs. bfloat16 keeps 8 significant bits
  # (relative 2^-9 per rounding): the sum over children is rounded back to bfloat16 before
  # the agreements, and the couplings before s, so errors of a few 2^-9 on outputs of order
  # 1 (measured 1.1e-3 on v, 1.7e-3 on c); tolerance 1e-2.
  u_hat16 = jnp.asarray(normal((12, 5, 16), 110, scale=0.5), jnp.bfloat16)
  priors16 = jnp.asarray(normal((12, 5), 111, scale=0.3), jnp.bfloat16)
  v, c = SELF_ATTENTION(u_hat16, priors16)
  assert v.dtype == jnp.bfloat16 and c.dtype == jnp.bfloat16
  assert_all_finite((v, c))
  v32, c32 = SELF_ATTENTION(np.asarray(u_hat16, np.float32), np.asarray(priors16, np.float32))
  np.testing.assert_allclose(np.asarray(v, np.float32), v32, atol=1e-2)
  np.testing.assert_allclose(np.asarray(c, np.float32), c32, atol=1e-2)
  grad = jax.jit(jax.grad(lambda u: jnp.sum(self_attention_routing(u, priors16)[0])
                          .astype(jnp.float32)))(u_hat16)
  assert grad.dtype == jnp.bfloat16
  assert_all_finite(grad)


# ------------------------------------------------------- inverted dot-product attention routing


@pytest.mark.parametrize('shape, num_iters, with_affine', [
    ((2, 2, 2), 2, False),    # tiny
    ((5, 8, 4), 1, True),     # fewer children than parents; poses once, no reassignment
    ((12, 5, 16), 2, True),
    ((72, 10, 16), 3, False),
])
def test_inverted_matches_float64_reference(shape, num_iters, with_affine):
  u_hat = normal(shape, sum(shape) + num_iters)
  scale = normal(shape[2:], 120, scale=0.5) + 1.0 if with_affine else None
  bias = normal(shape[2:], 121, scale=0.3) if with_affine else None
  p, r = INVERTED(u_hat, scale=scale, bias=bias, num_iters=num_iters)
  p_ref, r_ref = reference.inverted_dot_product_attention_routing(u_hat, num_iters, scale, bias)
  assert p.dtype == jnp.float32 and r.dtype == jnp.float32
  np.testing.assert_allclose(p, p_ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(r, r_ref, rtol=1e-4, atol=1e-6)


def test_inverted_gradients_match_float64_finite_differences():
  u_hat = normal((4, 3, 4), 130)
  scale, bias = normal((4,), 131, scale=0.5) + 1.0, normal((4,), 132, scale=0.3)
  w_p, w_r = normal((3, 4), 133), normal((4, 3), 134)

  def objective(u, g, b):
    p, r = inverted_dot_product_attention_routing(u, 3, scale=g, bias=b)
    return jnp.sum(p * w_p) + jnp.sum(r * w_r)

  def objective_ref(u, g, b):
    p, r = reference.inverted_dot_product_attention_routing(u, 3, g, b)
    return np.sum(p * w_p) + np.sum(r * w_r)

  grads = jax.jit(jax.grad(objective, argnums=(0, 1, 2)))(u_hat, scale, bias)
  assert_gradients_close(grads, finite_differences(objective_ref, (u_hat, scale, bias)))


def test_inverted_invariants():
  u_hat = normal((72, 10, 16), 140, scale=3.0)
  p, r = INVERTED(u_hat, num_iters=3)
  assert_assignment(r, 72, 10)
  # Without scale and bias every pose has mean 0 and variance var / (var + eps) ~ 1.
  np.testing.assert_allclose(jnp.mean(p, axis=-1), 0.0, atol=1e-5)
  np.testing.assert_allclose(jnp.var(p, axis=-1), 1.0, rtol=1e-3)


def test_inverted_jit_and_vmap_equal_the_per_example_results():
  u_hat = normal((3, 12, 5, 16), 150)
  scale, bias = normal((16,), 151, scale=0.5) + 1.0, normal((16,), 152, scale=0.3)
  route = jax.jit(jax.vmap(lambda u: inverted_dot_product_attention_routing(
      u, 2, scale=scale, bias=bias)))
  p, r = route(u_hat)
  assert p.shape == (3, 5, 16) and r.shape == (3, 12, 5)
  for n in range(3):
    p_n, r_n = INVERTED(u_hat[n], scale=scale, bias=bias, num_iters=2)
    # Batching may change the order of float32 sums: round-off, through two iterations.
    np.testing.assert_allclose(p[n], p_n, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(r[n], r_n, rtol=1e-4, atol=1e-6)


def test_inverted_bfloat16():
  # Against float32 on the same bf16-rounded inputs: the votes enter the products in
  # bfloat16 (the poses are rounded to bfloat16 before the agreements, the assignment
  # before the poses), relative 2^-9 per rounding; the layer norm divides by the poses'
  # spread, which can amplify that a few times. Poses up to about 5 (measured error
  # 1.5e-2, tolerance 4e-2); the assignment measured 6e-3, tolerance 2e-2.
  u_hat16 = jnp.asarray(normal((12, 5, 16), 160), jnp.bfloat16)
  scale, bias = normal((16,), 161, scale=0.5) + 1.0, normal((16,), 162, scale=0.3)
  p, r = INVERTED(u_hat16, scale=scale, bias=bias, num_iters=2)
  assert p.dtype == jnp.bfloat16 and r.dtype == jnp.bfloat16
  assert_all_finite((p, r))
  p32, r32 = INVERTED(np.asarray(u_hat16, np.float32), scale=scale, bias=bias, num_iters=2)
  np.testing.assert_allclose(np.asarray(p, np.float32), p32, atol=4e-2)
  np.testing.assert_allclose(np.asarray(r, np.float32), r32, atol=2e-2)
  grad = jax.jit(jax.grad(lambda u: jnp.sum(inverted_dot_product_attention_routing(u, 2)[0]
                                            * jnp.arange(16.0)).astype(jnp.float32)))(u_hat16)
  assert grad.dtype == jnp.bfloat16
  assert_all_finite(grad)


def test_capsnet_em_layer_starts_inside_the_logistic_where_the_papers_masses_saturate():
  # CapsNet's class layer at initialisation: 1,152 children with small votes. With the
  # paper's masses every activation is 1 in float32, with no gradient to learn from; with
  # the masses normalised (what CapsNet's EM layer uses) they start inside (0, 1).
  from capsjax import CapsNet, init_params
  from capsjax.analysis.interpret import prediction_vectors
  model = CapsNet(routing='em', conv_features=16, use_decoder=False, conv_impl='xla')
  images = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 28, 28, 1)), jnp.float32)
  params = init_params(model, jax.random.PRNGKey(0), (28, 28, 1))
  out, state = model.apply({'params': params}, images, capture_intermediates=True)
  assert bool(jnp.all((out.lengths > 0.05) & (out.lengths < 0.95))), out.lengths
  (primary,) = state['intermediates']['primary_caps']['__call__']
  u_hat = prediction_vectors(model, params, images)
  assert u_hat.shape == (2, 1152, 10, 16)
  routing = params['digit_caps']
  for normalize, expected in ((True, out.lengths), (False, None)):
    def lengths_from(beta_a):
      return jax.vmap(lambda v, a: em_routing(v, a, routing['beta_u'], beta_a,
                                              normalize_mass=normalize)[1])(
                                                  u_hat, jnp.linalg.norm(primary, axis=-1))
    activations = lengths_from(routing['beta_a'])
    gradient = jax.grad(lambda b: jnp.sum(lengths_from(b)))(routing['beta_a'])
    if normalize:  # the layer's own activations, and a gradient to learn from
      np.testing.assert_allclose(activations, expected, rtol=1e-5)
      assert bool(jnp.all(jnp.abs(gradient) > 1e-4))
    else:
      np.testing.assert_array_equal(activations, 1.0)
      np.testing.assert_array_equal(gradient, 0.0)
