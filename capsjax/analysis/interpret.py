"""What capsules encode: perturbed class capsules (the paper's Figure 4), routing maps, and
how much each routing iteration changes the routing logits (the paper's appendix)."""

import functools
from typing import Any, Callable, Dict, Mapping, Tuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import numpy as np

from capsjax.models.capsnet import CapsNet
from capsjax.nn.layers import Decoder, PrimaryCapsules
from capsjax.nn.ops import safe_norm
from capsjax.nn.routing import _check_num_iters, _logit_update

# Built from integers so each value is the float32 nearest to k * 0.05, and the set
# is exactly symmetric about the unperturbed 0.
PERTURBATIONS = (np.arange(-5, 6) / 20).astype(np.float32)


def perturbed_capsules(capsules: jax.Array, class_index: ArrayLike,
                       values: ArrayLike = PERTURBATIONS) -> jax.Array:
  """The decoder's input when one dimension of one class capsule is tweaked.

  The result already carries the decoder's masking: every class capsule other than
  `class_index` is zero. It can therefore be decoded with the one-hot mask of
  `class_index` (what `decode_perturbations` passes, so the decoder sees exactly
  what it saw in training, where the mask is one-hot) or with an all-ones mask;
  the decoder multiplies capsules by the mask, so both give the same images.

  Args:
    capsules: float [num_classes, dim], one example's class capsules.
    class_index: int (may be traced), the capsule to perturb, usually the
      predicted class.
    values: float [num_values], offsets added to one dimension at a time.

  Returns:
    [dim, num_values, num_classes, dim] in capsules.dtype: entry [d, v] is the
    masked capsule matrix with values[v] added to dimension d of capsule
    `class_index`.
  """
  num_classes, dim = capsules.shape
  keep = jax.nn.one_hot(class_index, num_classes, dtype=capsules.dtype)
  masked = capsules * keep[:, None]
  values = jnp.asarray(values, capsules.dtype)
  # offsets[d, v, k, e] = values[v] where k == class_index and e == d, else 0.
  offsets = (values[None, :, None, None] * keep[None, None, :, None]
             * jnp.eye(dim, dtype=capsules.dtype)[:, None, None, :])
  return masked[None, None] + offsets


def decode_perturbations(decoder_apply: Callable[[jax.Array, jax.Array], jax.Array],
                         capsules: jax.Array, class_index: ArrayLike,
                         values: ArrayLike = PERTURBATIONS) -> jax.Array:
  """Decode every single-dimension perturbation of one class capsule (Figure 4).

  Jit- and vmap-compatible when `decoder_apply` is, e.g. over a batch of
  examples with `jax.vmap(functools.partial(decode_perturbations, apply))`.

  Args:
    decoder_apply: callable(capsules float [N, num_classes, dim], mask float32
      [N, num_classes]) -> images [N, H, W, C], e.g. a bound `Decoder.apply`.
    capsules: float [num_classes, dim], one example's class capsules.
    class_index: int (may be traced), the capsule to perturb.
    values: float [num_values], the offsets.

  Returns:
    images [dim, num_values, H, W, C]: row d shows dimension d swept over values.
  """
  perturbed = perturbed_capsules(capsules, class_index, values)
  dim, num_values, num_classes, _ = perturbed.shape
  count = dim * num_values
  mask = jnp.broadcast_to(jax.nn.one_hot(class_index, num_classes), (count, num_classes))
  images = decoder_apply(perturbed.reshape(count, num_classes, dim), mask)
  return images.reshape(dim, num_values, *images.shape[1:])


def coupling_maps(couplings: jax.Array, primary_lengths: jax.Array,
                  grid_shape: Tuple[int, int, int]) -> jax.Array:
  """Where each class draws its evidence from: routed primary-capsule length per position.

  At each position of the PrimaryCaps grid, sums c_ij * |u_i| over the capsule
  types there: how much of the position's active evidence is routed to class j.
  Weighting by |u_i| matters because inactive primary capsules (short vectors,
  e.g. over the blank background) still get couplings that sum to 1 and would
  otherwise paint the background as much as the strokes.

  The maps are in units of capsule length, so they are comparable across classes
  and their sum over classes is the total primary length at each position. A
  picture should use one colour scale shared by all classes of an example (as
  `capsjax.visualize.coupling_figure` does): normalising each class separately
  would brighten the losing classes' maps to match the winner's. `analyse`
  divides by the per-position total instead, giving each position's share per
  class: after training nearly every primary capsule is long, so the raw maps
  differ little between classes, and positions with almost no evidence, which a
  share would overstate, are rare.

  Args:
    couplings: float [num_primary, num_classes], c_ij of the last routing
      iteration for one example.
    primary_lengths: float [num_primary], |u_i| of the primary capsules.
    grid_shape: static (height, width, types) with height * width * types ==
      num_primary, in PrimaryCapsules' order: index (y * width + x) * types + type.

  Returns:
    float [num_classes, height, width].
  """
  height, width, types = grid_shape
  routed = couplings * primary_lengths[:, None]
  return routed.reshape(height, width, types, -1).sum(axis=2).transpose(2, 0, 1)


def analyse(model: CapsNet, params: Mapping[str, Any], images: jax.Array) -> Dict[str, jax.Array]:
  """Figure 4 and the coupling maps for a batch: what a trained CapsNet's capsules encode.

  Args:
    model: a `CapsNet` with a decoder.
    params: its parameters.
    images: float32 [N, H, W, C] in [0, 1].

  Returns:
    dict: 'predictions' int32 [N], the longest class capsule; 'perturbed' float32
    [N, digit_dim, len(PERTURBATIONS), H, W, C], `decode_perturbations` of the
    predicted capsule; 'couplings' [N, num_classes, h, w], each PrimaryCaps
    position's share of its `coupling_maps` evidence that the last routing
    iteration sends to each class (summing to 1 over classes; 1 / num_classes
    where routing has not chosen).
  """
  out, intermediates = _apply_capturing_primary(model, params, images)
  couplings = intermediates['digit_caps']['couplings'][0]
  primary = intermediates['primary_caps']['__call__'][0]  # [N, h * w * types, dim]
  predictions = jnp.argmax(out.lengths, axis=-1)
  decoder = Decoder(images.shape[1:], model.decoder_hidden, model.dtype)
  decode = lambda capsules, mask: decoder.apply({'params': params['decoder']}, capsules, mask)
  perturbed = jax.vmap(functools.partial(decode_perturbations, decode))(out.capsules, predictions)
  grid = model.primary_grid(images.shape[1:])
  maps = jax.vmap(lambda c, u: coupling_maps(c, u, grid))(couplings, safe_norm(primary))
  # Every primary capsule is long after training, so the raw maps differ little
  # between classes; the share per position shows where routing made its choice.
  maps = maps / jnp.sum(maps, axis=1, keepdims=True)
  return {'predictions': predictions, 'perturbed': perturbed.astype(jnp.float32),
          'couplings': maps}


def _apply_capturing_primary(model: CapsNet, params: Mapping[str, Any], images: jax.Array):
  """model's output and its 'intermediates': the sown couplings and PrimaryCaps' output u_i."""
  out, variables = model.apply(
      {'params': params}, images, mutable=['intermediates'],
      capture_intermediates=lambda module, _: isinstance(module, PrimaryCapsules))
  return out, variables['intermediates']


def prediction_vectors(model: CapsNet, params: Mapping[str, Any], images: jax.Array) -> jax.Array:
  """The predictions u_hat[j|i] = W_ij u_i that a CapsNet routes, for a batch of images.

  The primary capsules u_i are captured from the model's own forward pass, and
  multiplied by DigitCaps' weights W_ij as `capsjax.RoutedCapsules` does (in the
  model's compute dtype), so routing them gives the model's class capsules.

  Args:
    model: a `CapsNet` (any routing: they all route the same predictions).
    params: its parameters.
    images: float32 [N, H, W, C] in [0, 1].

  Returns:
    u_hat [N, num_primary, num_classes, digit_dim] in the model's compute dtype.
  """
  _, intermediates = _apply_capturing_primary(model, params, images)
  primary = intermediates['primary_caps']['__call__'][0]  # [N, num_primary, primary_dim]
  weights = params['digit_caps']['weights']  # [num_primary, num_classes, digit_dim, primary_dim]
  return jnp.einsum('bik,ijdk->bijd', primary.astype(model.dtype), weights.astype(model.dtype))


def routing_logit_changes(u_hat: jax.Array, num_iters: int) -> jax.Array:
  """How much each iteration of dynamic routing changes the routing logits, for ONE example.

  The paper's appendix figure: in Procedure 1 the logits b_ij start at 0 and
  iteration t adds the agreement u_hat[j|i] . v_j(t) of the parents' outputs
  v_j(t) under the couplings softmax(b(t - 1)). Returned is the mean over
  children i and parents j of |b_ij(t) - b_ij(t - 1)| = |u_hat[j|i] . v_j(t)|
  for t = 1 .. num_iters - 1: the updates whose couplings the routing goes on to
  use (the last iteration's outputs are the result; `capsjax.dynamic_routing`
  makes no update after them). Each iteration is computed by the code
  `dynamic_routing` runs (`capsjax.nn.routing._logit_update`), in float32 logits.
  Jit- and vmap-compatible; num_iters is static.

  Args:
    u_hat: [num_in, num_out, dim] predictions u_hat[j|i], any float dtype.
    num_iters: Python int >= 1, the routing iterations r.

  Returns:
    float32 [num_iters - 1]: entry t - 1 is the mean |b_ij(t) - b_ij(t - 1)|
    (empty for num_iters = 1, which updates no logit).

  Raises:
    ValueError: num_iters is not an int >= 1, or u_hat is not 3-D.
  """
  num_iters = _check_num_iters(num_iters)
  if u_hat.ndim != 3:
    raise ValueError(f'u_hat must be [num_in, num_out, dim] for one example, got shape '
                     f'{u_hat.shape}; vmap over a leading batch axis.')
  u_parent = jnp.swapaxes(u_hat, 0, 1)  # parent-major, as dynamic_routing routes it
  logits, changes = None, []
  for _ in range(num_iters - 1):  # static and small, as dynamic_routing unrolls it
    update = _logit_update(u_parent, logits)
    changes.append(jnp.mean(jnp.abs(update)))
    logits = update if logits is None else logits + update
  return jnp.stack(changes) if changes else jnp.zeros((0,), jnp.float32)


def model_logit_changes(model: CapsNet, params: Mapping[str, Any],
                        images: jax.Array) -> jax.Array:
  """`routing_logit_changes` of a dynamic-routing CapsNet's own routing, per image.

  Args:
    model: a `CapsNet` with routing='dynamic'; its routing_iters is r.
    params: its parameters.
    images: float32 [N, H, W, C] in [0, 1].

  Returns:
    float32 [N, r - 1]: per image, the mean |b_ij(t) - b_ij(t - 1)| of each
    logit update t = 1 .. r - 1.

  Raises:
    ValueError: the model routes otherwise than dynamically (its iterations
      update no logits b_ij).
  """
  if model.routing != 'dynamic':
    raise ValueError(f'the routing logits b_ij are dynamic routing\'s; this model uses '
                     f'routing={model.routing!r}.')
  u_hat = prediction_vectors(model, params, images)
  return jax.vmap(functools.partial(routing_logit_changes, num_iters=model.routing_iters))(u_hat)
