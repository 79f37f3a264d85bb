import jax
import jax.numpy as jnp
import numpy as np
import pytest

import capsjax
from tests import reference


def random_u_hat(shape, seed=0, scale=0.5):
  return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


@pytest.mark.parametrize('num_iters', [1, 2, 3, 5])
@pytest.mark.parametrize('shape', [(1152, 10, 16), (7, 3, 4)])
def test_matches_float64_reference(shape, num_iters):
  u_hat = random_u_hat(shape, seed=num_iters)
  v, c = jax.jit(capsjax.dynamic_routing, static_argnums=1)(jnp.asarray(u_hat), num_iters)
  v_ref, c_ref = reference.routing(u_hat, num_iters)
  np.testing.assert_allclose(v, v_ref, rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(c, c_ref, rtol=2e-4, atol=1e-6)


def test_one_iteration_is_squash_of_uniformly_weighted_sum():
  # First iteration: c_ij = 1 / num_out, so s_j = (1 / num_out) * sum_i u_hat[j|i].
  u_hat = random_u_hat((6, 4, 5))
  v, c = capsjax.dynamic_routing(jnp.asarray(u_hat), 1)
  np.testing.assert_allclose(c, np.full((6, 4), 0.25), rtol=1e-6)
  np.testing.assert_allclose(v, reference.squash(u_hat.sum(0) / 4), rtol=1e-5, atol=1e-7)


def test_identical_inputs_get_identical_couplings():
  u_hat = random_u_hat((5, 3, 4))
  u_hat[1] = u_hat[0]
  _, c = capsjax.dynamic_routing(jnp.asarray(u_hat), 3)
  np.testing.assert_allclose(c[0], c[1], rtol=1e-6)
  assert not np.allclose(c[0], c[2])  # the others are routed differently


def test_single_parent_couples_everything_to_it():
  u_hat = random_u_hat((9, 1, 4))
  v, c = capsjax.dynamic_routing(jnp.asarray(u_hat), 3)
  np.testing.assert_allclose(c, 1.0)
  np.testing.assert_allclose(v, reference.squash(u_hat.sum(0)), rtol=1e-5)


def test_routing_moves_couplings_towards_agreeing_parent():
  # Every input predicts parent 0 consistently and parent 1 with random directions.
  rng = np.random.default_rng(3)
  u_hat = np.zeros((20, 2, 4), np.float32)
  u_hat[:, 0] = [1.0, 0.5, 0.0, 0.0]
  u_hat[:, 1] = rng.normal(size=(20, 4))
  _, c = capsjax.dynamic_routing(jnp.asarray(u_hat), 3)
  assert float(jnp.mean(c[:, 0])) > 0.6


def test_invariants_on_random_inputs():
  u_hat = random_u_hat((300, 10, 16), scale=3.0)
  v, c = capsjax.dynamic_routing(jnp.asarray(u_hat), 3)
  assert v.shape == (10, 16) and c.shape == (300, 10)
  np.testing.assert_allclose(jnp.sum(c, axis=1), 1.0, rtol=1e-5)
  lengths = jnp.linalg.norm(v, axis=-1)
  assert bool(jnp.all((lengths >= 0) & (lengths < 1)))
  assert bool(jnp.all(jnp.isfinite(v))) and bool(jnp.all(c > 0))


def test_zero_predictions_give_zero_output_and_finite_gradient():
  u_hat = jnp.zeros((8, 3, 4))
  v, c = capsjax.dynamic_routing(u_hat, 3)
  np.testing.assert_allclose(v, 0.0, atol=1e-6)
  np.testing.assert_allclose(c, 1 / 3, rtol=1e-6)
  grad = jax.grad(lambda u: jnp.sum(capsjax.dynamic_routing(u, 3)[0] ** 2) +
                  jnp.sum(capsjax.dynamic_routing(u, 3)[0]))(u_hat)
  assert bool(jnp.all(jnp.isfinite(grad)))


def test_gradient_through_all_iterations_matches_float64_finite_differences():
  u_hat = random_u_hat((4, 3, 2), seed=7, scale=1.0)
  weights = np.random.default_rng(8).normal(size=(3, 2))

  def objective_ref(u):
    return float(np.sum(reference.routing(u, 3)[0] * weights))

  grad = jax.grad(lambda u: jnp.sum(capsjax.dynamic_routing(u, 3)[0] * weights))(jnp.asarray(u_hat))
  numeric = np.zeros_like(u_hat, dtype=np.float64)
  eps = 1e-6
  for idx in np.ndindex(u_hat.shape):
    plus, minus = u_hat.astype(np.float64), u_hat.astype(np.float64)
    plus[idx] += eps
    minus[idx] -= eps
    numeric[idx] = (objective_ref(plus) - objective_ref(minus)) / (2 * eps)
  np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-5)


def test_stop_inner_gradient_keeps_forward_changes_gradient():
  u_hat = jnp.asarray(random_u_hat((6, 3, 4), scale=1.0))
  full = capsjax.dynamic_routing(u_hat, 3)
  stopped = capsjax.dynamic_routing(u_hat, 3, stop_inner_gradient=True)
  np.testing.assert_allclose(full[0], stopped[0], rtol=1e-6)

  def loss(u, stop):
    return jnp.sum(capsjax.dynamic_routing(u, 3, stop_inner_gradient=stop)[0][0])

  g_full, g_stop = jax.grad(loss)(u_hat, False), jax.grad(loss)(u_hat, True)
  assert not np.allclose(g_full, g_stop, atol=1e-6)
  # With one iteration there are no inner iterations: the two agree.
  one = lambda u, stop: jnp.sum(capsjax.dynamic_routing(u, 1, stop_inner_gradient=stop)[0][0])
  np.testing.assert_allclose(jax.grad(one)(u_hat, False), jax.grad(one)(u_hat, True), rtol=1e-6)


def test_batched_equals_loop_over_examples():
  u_hat = jnp.asarray(random_u_hat((5, 30, 4, 6), scale=1.0))
  v, c = jax.jit(capsjax.batched_dynamic_routing)(u_hat)
  assert v.shape == (5, 4, 6) and c.shape == (5, 30, 4)
  for n in range(5):
    v_n, c_n = capsjax.dynamic_routing(u_hat[n], 3)
    np.testing.assert_allclose(v[n], v_n, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(c[n], c_n, rtol=1e-5, atol=1e-7)


def test_jaxpr_holds_one_loop_not_an_unrolled_chain():
  u_hat = jnp.zeros((12, 4, 8))
  loops = ('while', 'scan')
  jaxprs = {n: jax.make_jaxpr(lambda u: capsjax.dynamic_routing(u, n))(u_hat).jaxpr
            for n in (2, 3, 10)}
  for n, jaxpr in jaxprs.items():
    assert sum(eqn.primitive.name in loops for eqn in jaxpr.eqns) == 1, n
  # The traced program does not grow with the number of iterations.
  assert len(jaxprs[3].eqns) == len(jaxprs[10].eqns) == len(jaxprs[2].eqns)


@pytest.mark.parametrize('bad', [0, -2, 2.5, '3', None])
def test_bad_num_iters_raise_value_error(bad):
  with pytest.raises(ValueError, match='num_iters'):
    capsjax.dynamic_routing(jnp.zeros((4, 2, 3)), bad)
  with pytest.raises(ValueError, match='num_iters'):
    capsjax.batched_dynamic_routing(jnp.zeros((1, 4, 2, 3)), bad)


def test_wrong_rank_raises_value_error():
  with pytest.raises(ValueError, match='batched_dynamic_routing'):
    capsjax.dynamic_routing(jnp.zeros((2, 4, 2, 3)))
  with pytest.raises(ValueError, match=r'\[batch, num_in'):
    capsjax.batched_dynamic_routing(jnp.zeros((4, 2, 3)))


def test_bfloat16_close_to_float32_and_differentiable():
  u_hat = random_u_hat((2, 64, 10, 16))
  v32, c32 = capsjax.batched_dynamic_routing(jnp.asarray(u_hat))
  v16, c16 = jax.jit(capsjax.batched_dynamic_routing)(jnp.asarray(u_hat, jnp.bfloat16))
  assert v16.dtype == jnp.bfloat16 and c16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(v16, np.float32), v32, atol=2e-2)
  np.testing.assert_allclose(np.asarray(c16, np.float32), c32, atol=1e-2)
  grad = jax.grad(lambda u: jnp.sum(capsjax.batched_dynamic_routing(u)[0]).astype(jnp.float32))(
      jnp.asarray(u_hat, jnp.bfloat16))
  assert grad.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(grad.astype(jnp.float32))))


def test_vmap_of_jit_and_jit_of_grad_compose():
  u_hat = jnp.asarray(random_u_hat((3, 8, 2, 4)))
  v = jax.vmap(jax.jit(lambda u: capsjax.dynamic_routing(u, 2)[0]))(u_hat)
  np.testing.assert_allclose(v, capsjax.batched_dynamic_routing(u_hat, 2)[0], rtol=1e-5, atol=1e-7)
  g = jax.jit(jax.grad(lambda u: jnp.sum(capsjax.batched_dynamic_routing(u, 2)[0])))(u_hat)
  assert g.shape == u_hat.shape and bool(jnp.all(jnp.isfinite(g)))
