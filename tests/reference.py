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


def efficient_squash(s):
  """Efficient-CapsNet's squash (Mazzia et al. 2021, eq. 2) of one vector s [D].

  squash(s) = (1 - 1 / exp(|s|)) s / |s|, with its limit 0 at s = 0.
  """
  s = np.asarray(s, np.float64)
  norm = np.sqrt(np.sum(s * s))
  if norm == 0.0:
    return np.zeros_like(s)
  return (1.0 - 1.0 / np.exp(norm)) * s / norm


def _logistic(x):
  return 1.0 / (1.0 + np.exp(-x))


def _log_gaussian(x, mean, variance):
  """log N(x; mean, variance) of one scalar."""
  return -0.5 * np.log(2.0 * np.pi * variance) - (x - mean) ** 2 / (2.0 * variance)


def em_routing(votes, activations, beta_u, beta_a, num_iters, inverse_temperature=0.01,
               variance_epsilon=1e-6, normalize_mass=False):
  """EM routing, Hinton, Sabour, Frosst 2018, "Matrix capsules with EM routing", Procedure 1.

  For ONE example, by explicit loops over parents j, pose entries h and children i.
  votes V [I, J, D], activations a [I], beta_u and beta_a scalars or [J]. R_ij starts
  at 1 / J; iteration t = 1..T is an M-step with lambda_t = inverse_temperature * t / T:
    R'_ij = R_ij a_i,
    mu_jh = sum_i R'_ij V_ijh / sum_i R'_ij,
    sigma2_jh = sum_i R'_ij (V_ijh - mu_jh)^2 / sum_i R'_ij + variance_epsilon,
    cost_jh = (beta_u_j + log sigma_jh) sum_i R'_ij,
    a_j = logistic(lambda_t (beta_a_j - sum_h cost_jh)),
  and, when t < T, an E-step:
    p_ij = prod_h N(V_ijh; mu_jh, sigma2_jh),  R_ij = a_j p_ij / sum_k a_k p_ik,
  the ratio taken in logs (log a_j + sum_h log N) with the largest log subtracted.
  With normalize_mass, the cost's sum_i R'_ij is first multiplied by
  J / sum_j sum_i R'_ij (the masses average 1 over the parents).

  Returns:
    (mu [J, D], a_j [J], R [I, J] the assignment the last M-step used), float64.
  """
  votes = np.asarray(votes, np.float64)
  a_in = np.asarray(activations, np.float64)
  num_in, num_out, dim = votes.shape
  beta_u = np.broadcast_to(np.asarray(beta_u, np.float64), (num_out,))
  beta_a = np.broadcast_to(np.asarray(beta_a, np.float64), (num_out,))
  r = np.full((num_in, num_out), 1.0 / num_out)
  for t in range(1, num_iters + 1):
    lam = inverse_temperature * t / num_iters
    # M-step, one parent at a time.
    mu = np.zeros((num_out, dim))
    sigma2 = np.zeros((num_out, dim))
    a_out = np.zeros(num_out)
    all_mass = sum(r[i, k] * a_in[i] for i in range(num_in) for k in range(num_out))
    for j in range(num_out):
      weights = [r[i, j] * a_in[i] for i in range(num_in)]  # R'_ij
      mass = sum(weights)
      cost_mass = mass * num_out / all_mass if normalize_mass else mass
      total_cost = 0.0
      for h in range(dim):
        mu[j, h] = sum(weights[i] * votes[i, j, h] for i in range(num_in)) / mass
        sigma2[j, h] = sum(weights[i] * (votes[i, j, h] - mu[j, h]) ** 2
                           for i in range(num_in)) / mass + variance_epsilon
        log_sigma = 0.5 * np.log(sigma2[j, h])
        total_cost += (beta_u[j] + log_sigma) * cost_mass
      a_out[j] = _logistic(lam * (beta_a[j] - total_cost))
    if t == num_iters:
      return mu, a_out, r
    # E-step, one child at a time.
    r = np.zeros((num_in, num_out))
    for i in range(num_in):
      log_numerator = np.zeros(num_out)  # log(a_j p_ij)
      for j in range(num_out):
        log_p = sum(_log_gaussian(votes[i, j, h], mu[j, h], sigma2[j, h]) for h in range(dim))
        log_numerator[j] = np.log(a_out[j]) + log_p
      numerator = np.exp(log_numerator - np.max(log_numerator))
      r[i] = numerator / np.sum(numerator)


def self_attention_routing(u_hat, log_priors=None, squash_fn=None):
  """Self-attention routing, Mazzia et al. 2021 ("Efficient-CapsNet"), eqs. (5)-(7).

  For ONE example; u_hat [I, J, D], u_hat[n|i] = u_hat[i, n]. For each parent n the
  full self-attention matrix A_n = U_n U_n^T / sqrt(D) [I, I] (eq. 5), U_n = u_hat[:, n];
  for each child i, c_{n,i} = exp(sum_k A_n[k, i]) / sum_m exp(sum_k A_m[k, i]) (eq. 6,
  softmax over parents); s_n = sum_i u_hat[n|i] (c_{n,i} + b_{i,n}) (eq. 7) with log
  priors b [I, J] (zeros if None); v_n = squash_fn(s_n), Efficient-CapsNet's squash
  by default.

  Returns:
    (v [J, D], c [I, J]), float64.
  """
  u_hat = np.asarray(u_hat, np.float64)
  num_in, num_out, dim = u_hat.shape
  b = np.zeros((num_in, num_out)) if log_priors is None else np.asarray(log_priors, np.float64)
  squash_fn = efficient_squash if squash_fn is None else squash_fn
  attention = np.zeros((num_out, num_in, num_in))  # A_n[k, i]
  for n in range(num_out):
    u_n = u_hat[:, n, :]
    attention[n] = u_n @ u_n.T / np.sqrt(dim)
  logits = np.zeros((num_out, num_in))  # sum_k A_n[k, i]
  for n in range(num_out):
    for i in range(num_in):
      logits[n, i] = sum(attention[n, k, i] for k in range(num_in))
  c = np.zeros((num_out, num_in))
  for i in range(num_in):
    e = np.exp(logits[:, i] - np.max(logits[:, i]))
    c[:, i] = e / np.sum(e)
  v = np.zeros((num_out, dim))
  for n in range(num_out):
    s_n = sum(u_hat[i, n] * (c[n, i] + b[i, n]) for i in range(num_in))
    v[n] = squash_fn(s_n)
  return v, c.T


def inverted_dot_product_attention_routing(u_hat, num_iters, scale=None, bias=None,
                                           epsilon=1e-5):
  """Inverted dot-product attention routing, Tsai et al. 2020, Procedure 1.

  "Capsules with inverted dot-product attention routing", for ONE example; votes
  v [I, J, D]. The poses p_j start at 0, so the first assignment is uniform, 1 / J.
  Each of num_iters iterations computes p_j = sum_i r_ij v_ij, then the layer norm
  p_j = (p_j - mean(p_j)) / sqrt(var(p_j) + epsilon) * scale + bias over p_j's D
  entries (biased variance; scale, bias [D], None = 1 and 0); if another iteration
  follows, the agreements a_ij = p_j . v_ij and r_ij = softmax over j of a_ij.

  Returns:
    (p [J, D] the last normalised poses, r [I, J] the assignment they came from), float64.
  """
  votes = np.asarray(u_hat, np.float64)
  num_in, num_out, dim = votes.shape
  scale = np.ones(dim) if scale is None else np.asarray(scale, np.float64)
  bias = np.zeros(dim) if bias is None else np.asarray(bias, np.float64)
  r = np.full((num_in, num_out), 1.0 / num_out)
  for iteration in range(num_iters):
    p = np.zeros((num_out, dim))
    for j in range(num_out):
      pose = sum(r[i, j] * votes[i, j] for i in range(num_in))
      mean = np.sum(pose) / dim
      var = np.sum((pose - mean) ** 2) / dim
      p[j] = (pose - mean) / np.sqrt(var + epsilon) * scale + bias
    if iteration == num_iters - 1:
      return p, r
    r = np.zeros((num_in, num_out))
    for i in range(num_in):
      agreement = np.array([np.dot(p[j], votes[i, j]) for j in range(num_out)])
      e = np.exp(agreement - np.max(agreement))
      r[i] = e / np.sum(e)


def routing_logits(u_hat, num_iters):
  """The routing logits of Procedure 1 of the paper for ONE example, after every iteration.

  b_ij(0) = 0; iteration t = 1..num_iters takes c_i = softmax(b_i(t-1)) over parents
  j, s_j = sum_i c_ij u_hat[j|i], v_j = squash(s_j), and b_ij(t) = b_ij(t-1) + u_hat[j|i] . v_j.

  Returns:
    float64 [num_iters + 1, I, J]: b(0), b(1), ..., b(num_iters).
  """
  u_hat = np.asarray(u_hat, np.float64)
  num_in, num_out, _ = u_hat.shape
  logits = [np.zeros((num_in, num_out))]
  for _ in range(num_iters):
    b = logits[-1]
    e = np.exp(b - b.max(axis=1, keepdims=True))
    c = e / e.sum(axis=1, keepdims=True)
    v = squash(np.einsum('ij,ijd->jd', c, u_hat))
    logits.append(b + np.einsum('ijd,jd->ij', u_hat, v))
  return np.stack(logits)
