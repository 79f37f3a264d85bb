"""The paper's CapsNet: Conv1 -> PrimaryCaps -> DigitCaps (routing) -> decoder."""

from typing import Any, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from capsjax.errors import InputError
from capsjax.nn.conv import output_size
from capsjax.nn.layers import (
  Conv2D,
  Decoder,
  PrimaryCapsules,
  RoutedCapsules,
  check_images,
  decoder_mask,
)
from capsjax.nn.ops import safe_norm


class CapsNetOutput(NamedTuple):
  """What `CapsNet` returns for a batch.

  capsules: [batch, num_classes, digit_dim] class capsule vectors.
  lengths: [batch, num_classes] float32 capsule lengths in [0, 1), the class scores.
  reconstructions: [batch, height, width, channels] float32 in (0, 1), or None
    without a decoder.
  """
  capsules: jax.Array
  lengths: jax.Array
  reconstructions: Optional[jax.Array]


class CapsNet(nn.Module):
  """CapsNet; the defaults are the paper's MNIST model (dynamic routing).

  The input size and channels are taken from the images at `init`.

  Attributes:
    num_classes: class capsules.
    conv_features, conv_kernel: Conv1 (256 kernels of 9x9, stride 1, ReLU).
    primary_types, primary_dim, primary_kernel, primary_strides: PrimaryCaps
      (32 maps of 8-D capsules, 9x9 convolution, stride 2).
    digit_dim: dimension of the class capsules (16).
    routing_iters: routing iterations between PrimaryCaps and DigitCaps (3).
    routing: how PrimaryCaps are routed to DigitCaps, one of
      `capsjax.nn.layers.ROUTINGS` ('dynamic': the paper's); see `RoutedCapsules`.
    stop_inner_gradient: see `capsjax.dynamic_routing` (False: the paper's).
    use_decoder: build the reconstruction decoder.
    decoder_hidden: its hidden layer widths (512, 1024).
    conv_impl: 'auto' (by platform), 'matmul' (fast on CPU) or 'xla', see
      `capsjax.nn.conv.conv2d`.
    dtype: compute dtype (float32, or bfloat16 for mixed precision); parameters
      stay float32 and lengths and reconstructions are returned in float32.
  """
  num_classes: int = 10
  conv_features: int = 256
  conv_kernel: int = 9
  primary_types: int = 32
  primary_dim: int = 8
  primary_kernel: int = 9
  primary_strides: int = 2
  digit_dim: int = 16
  routing_iters: int = 3
  stop_inner_gradient: bool = False
  routing: str = 'dynamic'
  use_decoder: bool = True
  decoder_hidden: Sequence[int] = (512, 1024)
  conv_impl: str = 'auto'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, labels: Optional[jax.Array] = None) -> CapsNetOutput:
    """Classify (and reconstruct) a batch.

    Args:
      images: [batch, height, width, channels] float in [0, 1].
      labels: optional int [batch] or multi-hot [batch, num_classes]: the
        capsules the decoder reconstructs from; without them, the longest. Masks
        [batch, M, num_classes] reconstruct M times (reconstructions [batch, M, ...]).

    Returns:
      A `CapsNetOutput`.
    """
    check_images(images)
    # Smaller images leave no PrimaryCaps positions (no capsules to route) or
    # fail inside the convolution with an error that does not name the cause.
    minimum = 1
    for kernel, stride in ((self.primary_kernel, self.primary_strides), (self.conv_kernel, 1)):
      minimum = (minimum - 1) * stride + kernel
    height, width = images.shape[1:3]
    if height < minimum or width < minimum:
      raise InputError(
          f'CapsNet needs images of at least {minimum}x{minimum} for its '
          f'{self.conv_kernel}x{self.conv_kernel} Conv1 and '
          f'{self.primary_kernel}x{self.primary_kernel} stride-{self.primary_strides} '
          f'PrimaryCaps; got {height}x{width} (images of shape {images.shape}). Pad or '
          f'resize the images, or build the model with a smaller conv_kernel or primary_kernel.')
    x = nn.relu(Conv2D(self.conv_features, self.conv_kernel, 1, self.conv_impl,
                       self.dtype, name='conv1')(images))
    u = PrimaryCapsules(self.primary_types, self.primary_dim, self.primary_kernel,
                        self.primary_strides, self.conv_impl, self.dtype,
                        name='primary_caps')(x)
    v = RoutedCapsules(self.num_classes, self.digit_dim, self.routing_iters,
                       self.stop_inner_gradient, dtype=self.dtype, routing=self.routing,
                       name='digit_caps')(u)
    return class_capsule_outputs(v, images, labels, self.use_decoder, self.decoder_hidden,
                                 self.dtype)

  def primary_grid(self, image_shape: Sequence[int]) -> Tuple[int, int, int]:
    """(height, width, types) of the PrimaryCaps map for images of `image_shape`.

    PrimaryCapsules flattens this map position by position, so primary capsule
    i sits at ((i // types) // width, (i // types) % width) and is of type i % types.
    """
    height, width = [output_size(output_size(size, self.conv_kernel, 1), self.primary_kernel,
                                 self.primary_strides) for size in image_shape[:2]]
    return height, width, self.primary_types


def class_capsule_outputs(v: jax.Array, images: jax.Array, labels: Optional[jax.Array],
                          use_decoder: bool, decoder_hidden: Sequence[int],
                          dtype: Any) -> CapsNetOutput:
  """A capsule network's output from its class capsules: lengths, and reconstructions.

  Call it from a module's compact `__call__`: its decoder becomes that module's
  submodule 'decoder'.

  Args:
    v: the class capsules [batch, num_classes, dim].
    images: the input [batch, height, width, channels] (the decoder's output shape).
    labels: what the decoder reconstructs from, see `CapsNet.__call__`.
    use_decoder: build and run the decoder.
    decoder_hidden: its hidden layer widths.
    dtype: its compute dtype.

  Returns:
    A `CapsNetOutput` with float32 lengths and reconstructions (None without a decoder).
  """
  lengths = safe_norm(v.astype(jnp.float32))
  reconstructions = None
  if use_decoder:
    decoder = Decoder(images.shape[1:], decoder_hidden, dtype, name='decoder')
    reconstructions = decoder(v, decoder_mask(lengths, labels)).astype(jnp.float32)
  return CapsNetOutput(v, lengths, reconstructions)


def parameter_counts(params: Mapping[str, Any]) -> Dict[str, int]:
  """Number of parameters under each top-level module of a params tree, and 'total'.

  Args:
    params: the 'params' collection of an initialised model.

  Returns:
    dict of name -> int, in the tree's order, ending with 'total'.
  """
  counts = {name: sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(sub))
            for name, sub in params.items()}
  counts['total'] = sum(counts.values())
  return counts


def init_variables(model: nn.Module, rng: jax.Array, image_shape: Sequence[int]
                   ) -> Dict[str, Any]:
  """Initialise a model's variables: 'params', and any state such as 'batch_stats'.

  Args:
    model: a `CapsNet`, `EfficientCapsNet` or `BaselineCNN`.
    rng: PRNG key.
    image_shape: (height, width, channels) of one image.

  Returns:
    dict of collection name -> its tree.
  """
  images = jnp.zeros((1, *image_shape), jnp.float32)
  return dict(jax.jit(model.init)(rng, images))


def init_params(model: nn.Module, rng: jax.Array, image_shape: Sequence[int]) -> Dict[str, Any]:
  """Initialise a model's parameters (see `init_variables`).

  Returns:
    The 'params' collection.
  """
  return init_variables(model, rng, image_shape)['params']
