"""Flax linen capsule layers: convolution, primary capsules, routed capsules, decoder."""

import functools
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from capsjax.errors import InputError
from capsjax.nn.conv import conv2d
from capsjax.nn.ops import accumulation_dtype, safe_norm, squash
from capsjax.nn.routing import (
    batched_dynamic_routing,
    em_routing,
    inverted_dot_product_attention_routing,
    self_attention_routing,
)

Dtype = Any

PADDINGS = ('VALID', 'SAME')


def _same_padding(size, kernel, stride):
  """(low, high) zero padding of one spatial axis for SAME output size ceil(size / stride).

  Args:
    size: int, input length along the axis.
    kernel: int, kernel length along it.
    stride: int.

  Returns:
    (low, high) ints; the low side gets the smaller half, as in TensorFlow.
  """
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def check_images(images: jax.Array) -> None:
  """Raise InputError unless `images` is a 4-D [batch, height, width, channels] array."""
  if images.ndim != 4:
    raise InputError(
        f'images must be [batch, height, width, channels], got shape {images.shape}; '
        f'add a trailing channel axis to grayscale images (images[..., None]).')


class Conv2D(nn.Module):
  """Convolution with bias; parameters named and laid out as `nn.Conv`'s.

  Attributes:
    features: output channels.
    kernel_size: square kernel side.
    strides: stride in both directions.
    impl: 'auto', 'matmul' or 'xla', see `capsjax.nn.conv.conv2d`.
    dtype: compute dtype; parameters are kept in param_dtype.
    padding: 'VALID' (no padding) or 'SAME' (TensorFlow's and `nn.Conv`'s: out
      = ceil(in / strides), the low side gets the smaller half of the padding).
    kernel_init: the kernel's initializer (LeCun normal, `nn.Conv`'s).
  """
  features: int
  kernel_size: int
  strides: int = 1
  impl: str = 'auto'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  padding: str = 'VALID'
  kernel_init: Any = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [batch, height, width, channels] -> [batch, out_h, out_w, features]."""
    if self.padding not in PADDINGS:
      raise ValueError(f'padding must be one of {PADDINGS}, got {self.padding!r}.')
    kernel = self.param(
        'kernel', self.kernel_init,
        (self.kernel_size, self.kernel_size, x.shape[-1], self.features),
        self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), self.param_dtype)
    x = x.astype(self.dtype)
    if self.padding == 'SAME':
      # Padding the input lets both conv impls serve SAME through their VALID form.
      x = jnp.pad(x, ((0, 0), _same_padding(x.shape[1], self.kernel_size, self.strides),
                      _same_padding(x.shape[2], self.kernel_size, self.strides), (0, 0)))
    y = conv2d(x, kernel.astype(self.dtype), self.strides, self.impl)
    return y + bias.astype(self.dtype)


class PrimaryCapsules(nn.Module):
  """Convolution whose channels are grouped into capsules, then squashed.

  Attributes:
    num_types: capsule channel-maps (32 in the paper).
    capsule_dim: dimension of each capsule (8).
    kernel_size, strides: of the convolution (9, 2).
  """
  num_types: int = 32
  capsule_dim: int = 8
  kernel_size: int = 9
  strides: int = 2
  conv_impl: str = 'auto'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [batch, height, width, channels] -> [batch, out_h * out_w * num_types, capsule_dim]."""
    y = Conv2D(self.num_types * self.capsule_dim, self.kernel_size, self.strides,
               self.conv_impl, self.dtype, name='conv')(x)
    return squash(y.reshape(y.shape[0], -1, self.capsule_dim))


ROUTINGS = ('dynamic', 'em', 'self_attention', 'inverted_attention')
# The routings that iterate (`routing_iters` counts their iterations); self-attention is one pass.
ITERATED_ROUTINGS = ('dynamic', 'em', 'inverted_attention')


class RoutedCapsules(nn.Module):
  """Capsule layer with a learned W_ij per (input, output) pair and a routing.

  Whatever the routing, each returned capsule's length is its score in [0, 1)
  (what the margin loss reads) and its direction its pose:
    dynamic: v_j, the paper's squashed outputs (Sabour et al. 2017);
    em: a_j mu_j / |mu_j|, the parent's activation along its pose (Hinton et
      al. 2018); the children's activations are their lengths |u_i|, beta_u,
      beta_a are learned per parent, and the masses in the cost are normalised
      (`em_routing`'s normalize_mass: with the paper's, all ten activations are
      1 from initialisation on and the network does not learn);
    self_attention: the Efficient-CapsNet-squashed outputs, with learned log
      priors [num_in, num_capsules] (Mazzia et al. 2021; one pass, routing_iters
      is not used);
    inverted_attention: sigmoid(w_j . p_j + b_j) p_j / |p_j| for the layer-normalised
      poses p_j, with the learned per-class linear read-out w_j, b_j of Tsai et al.
      2020's classifier and a learned layer-norm gain and offset.
  The assignment of the last iteration is sown into the 'intermediates'
  collection as 'couplings' [batch, num_in, num_capsules].

  Attributes:
    num_capsules: parent capsules (one per class, 10).
    capsule_dim: their dimension (16).
    routing_iters: routing iterations r (3).
    stop_inner_gradient: see `capsjax.dynamic_routing` (dynamic routing only).
    weight_stddev: standard deviation of the normal init of W.
    routing: one of `ROUTINGS`.
  """
  num_capsules: int = 10
  capsule_dim: int = 16
  routing_iters: int = 3
  stop_inner_gradient: bool = False
  weight_stddev: float = 0.01
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  routing: str = 'dynamic'

  @nn.compact
  def __call__(self, u: jax.Array) -> jax.Array:
    """u: [batch, num_in, dim_in] -> v [batch, num_capsules, capsule_dim]."""
    num_in, dim_in = u.shape[-2:]
    weights = self.param(
        'weights', nn.initializers.normal(self.weight_stddev),
        (num_in, self.num_capsules, self.capsule_dim, dim_in), self.param_dtype)
    # Summed in float32 whatever the compute dtype, as the convolutions are (capsjax.nn.conv).
    u_hat = jnp.einsum('bik,ijdk->bijd', u.astype(self.dtype), weights.astype(self.dtype),
                       preferred_element_type=accumulation_dtype(self.dtype)
                       ).astype(self.dtype)
    v, couplings = self._route(u, u_hat)
    self.sow('intermediates', 'couplings', couplings)
    return v

  def _route(self, u, u_hat):
    num_in, num_out, dim = u_hat.shape[1:]
    zeros, ones = nn.initializers.zeros, nn.initializers.ones
    if self.routing == 'dynamic':
      return batched_dynamic_routing(u_hat, self.routing_iters,
                                     stop_inner_gradient=self.stop_inner_gradient)
    if self.routing == 'em':
      beta_u = self.param('beta_u', zeros, (num_out,), self.param_dtype)
      beta_a = self.param('beta_a', zeros, (num_out,), self.param_dtype)
      lengths = safe_norm(u.astype(jnp.float32))
      poses, activations, assignment = jax.vmap(
          lambda votes, a: em_routing(votes, a, beta_u, beta_a, self.routing_iters,
                                      normalize_mass=True))(u_hat, lengths)
      return _with_length(poses, activations), assignment
    if self.routing == 'self_attention':
      log_priors = self.param('log_priors', zeros, (num_in, num_out), self.param_dtype)
      return jax.vmap(lambda p: self_attention_routing(p, log_priors))(u_hat)
    if self.routing == 'inverted_attention':
      scale = self.param('norm_scale', ones, (dim,), self.param_dtype)
      bias = self.param('norm_bias', zeros, (dim,), self.param_dtype)
      poses, assignment = jax.vmap(lambda p: inverted_dot_product_attention_routing(
          p, self.routing_iters, scale=scale, bias=bias))(u_hat)
      readout = self.param('readout', nn.initializers.normal(0.1), (num_out, dim),
                           self.param_dtype)
      readout_bias = self.param('readout_bias', zeros, (num_out,), self.param_dtype)
      scores = jax.nn.sigmoid(jnp.einsum('bjd,jd->bj', poses.astype(jnp.float32), readout)
                              + readout_bias)
      return _with_length(poses, scores), assignment
    raise InputError(f'routing={self.routing!r}: choose one of {", ".join(ROUTINGS)}.')


def _with_length(poses: jax.Array, lengths: jax.Array) -> jax.Array:
  """The poses [..., J, D] rescaled to the given lengths [..., J], in the poses' dtype."""
  poses32 = poses.astype(jnp.float32)
  # Not safe_norm: its epsilon would shorten the small poses of an untrained layer by
  # percents. This one only keeps an all-zero pose finite.
  inverse_norm = lax.rsqrt(jnp.sum(jnp.square(poses32), axis=-1) + 1e-30)
  return (poses32 * (lengths * inverse_norm)[..., None]).astype(poses.dtype)


def decoder_mask(lengths: jax.Array, labels: Optional[jax.Array] = None) -> jax.Array:
  """Which capsules the decoder sees: the labelled ones, else the longest.

  Args:
    lengths: [batch, num_classes] capsule lengths.
    labels: None, int [batch] class indices, [batch, num_classes] multi-hot, or
      [batch, M, num_classes] masks, one per reconstruction.

  Returns:
    float32 mask of 0s and 1s, [batch, num_classes] or [batch, M, num_classes].
  """
  num_classes = lengths.shape[-1]
  if labels is None:
    return jax.nn.one_hot(jnp.argmax(lengths, axis=-1), num_classes)
  if labels.ndim >= lengths.ndim:
    return labels.astype(jnp.float32)
  return jax.nn.one_hot(labels, num_classes)


class Decoder(nn.Module):
  """Reconstructs the input from the masked class capsules (FC ReLU ... FC sigmoid).

  Attributes:
    output_shape: (height, width, channels) of the reconstructed image.
    hidden: widths of the hidden ReLU layers (512, 1024).
  """
  output_shape: Sequence[int]
  hidden: Sequence[int] = (512, 1024)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, capsules: jax.Array, mask: jax.Array) -> jax.Array:
    """Reconstruct from the capsules the mask keeps, once per mask.

    Args:
      capsules: [batch, K, D].
      mask: [batch, K], or [batch, M, K] for M reconstructions of each example
        (MultiMNIST: one per digit).

    Returns:
      [batch, *output_shape] or [batch, M, *output_shape], in (0, 1).
    """
    if mask.ndim == 3:
      capsules = jnp.broadcast_to(capsules[:, None], (*mask.shape, capsules.shape[-1]))
    lead = mask.shape[:-1]
    x = (capsules * mask[..., None].astype(capsules.dtype)).reshape(math.prod(lead), -1)
    # Products summed in float32 whatever the compute dtype (capsjax.nn.conv says why).
    product = functools.partial(lax.dot_general,
                                preferred_element_type=accumulation_dtype(self.dtype))
    for width in self.hidden:
      x = nn.relu(nn.Dense(width, dtype=self.dtype, dot_general=product)(x).astype(self.dtype))
    x = nn.Dense(math.prod(self.output_shape), dtype=self.dtype, dot_general=product)(x)
    return nn.sigmoid(x).reshape(*lead, *self.output_shape)
