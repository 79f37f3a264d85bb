"""Efficient-CapsNet (Mazzia, Salvetti, Chiaberge 2021) for MNIST-sized images.

Four convolutions, each ReLU then batch normalisation (32 5x5, 64 3x3, 64 3x3, 128 3x3
stride 2); primary capsules from one depthwise 9x9 convolution over the 128 maps, cut
into 16 capsules of 8 dimensions and squashed with the paper's squash (its eq. 1);
class capsules from them by self-attention routing (its eqs. 5-7; 10 capsules of 16
dimensions); the paper's decoder (512, 1024 ReLU, sigmoid). 161,824 trainable
parameters without the decoder, the paper's "161K", some 42x fewer than CapsNet's 6.8M
(1,573,168 with the decoder).

Where this differs from the authors' code (EscVM/Efficient-CapsNet): the primary
capsules' depthwise kernel is drawn He-normal (theirs: Keras's Glorot uniform), the
decoder LeCun-normal (theirs: He normal, Glorot normal for its last layer), and the
training data is this project's (`--recipe=efficient_capsnet` says how).

Batch normalisation keeps running statistics, a 'batch_stats' collection beside
'params': a training forward pass (`train=True`, with 'batch_stats' mutable)
normalises by the batch's statistics and updates them; evaluation uses them.
`capsjax.training` keeps them in `TrainState.model_state`, checkpoints them, and
under `pmap` lets each device normalise by its share of the batch and averages the
updated statistics over the devices every step, so that they stay equal. (Each
device's batch statistics are then of its share alone: results depend somewhat on
the number of devices, and the averaged variances leave out the spread between the
devices' means.)

Reference:
  V. Mazzia, F. Salvetti, M. Chiaberge. Efficient-CapsNet: capsule network with
  self-attention routing. Scientific Reports 11, 14634 (2021). arXiv:2101.12491.
"""

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from capsjax.errors import InputError
from capsjax.models.capsnet import CapsNetOutput, class_capsule_outputs
from capsjax.nn.conv import depthwise_conv2d
from capsjax.nn.layers import Conv2D, RoutedCapsules, check_images
from capsjax.nn.ops import efficient_squash

# (features, kernel, stride) of the four convolutions.
CONVOLUTIONS = ((32, 5, 1), (64, 3, 1), (64, 3, 1), (128, 3, 2))
# Keras's BatchNormalization defaults, which the paper's code uses.
NORM_MOMENTUM, NORM_EPSILON = 0.99, 1e-3


class EfficientCapsNet(nn.Module):
  """Efficient-CapsNet; the defaults are the paper's MNIST model.

  Attributes:
    num_classes: class capsules (10).
    primary_kernel: side of the depthwise primary-capsule kernel (9: the whole map
      of 28x28 inputs).
    primary_dim: dimension of the primary capsules (8).
    digit_dim: dimension of the class capsules (16).
    use_decoder: build the reconstruction decoder.
    decoder_hidden: its hidden layer widths (512, 1024).
    conv_impl: see `capsjax.nn.conv.conv2d`.
    dtype: compute dtype; parameters, statistics, lengths and reconstructions
      stay float32.
  """
  num_classes: int = 10
  primary_kernel: int = 9
  primary_dim: int = 8
  digit_dim: int = 16
  use_decoder: bool = True
  decoder_hidden: Sequence[int] = (512, 1024)
  conv_impl: str = 'auto'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, labels: Optional[jax.Array] = None,
               train: bool = False) -> CapsNetOutput:
    """Classify (and reconstruct) a batch.

    Args:
      images: [batch, height, width, channels] float in [0, 1], at least 27x27.
      labels: what the decoder reconstructs from, as for `CapsNet`.
      train: normalise by the batch's statistics and update the running ones
        (call with mutable=['batch_stats']); else use the running ones.

    Returns:
      A `CapsNetOutput`: capsules [batch, num_classes, digit_dim], lengths
      float32 [batch, num_classes], reconstructions float32 or None.
    """
    check_images(images)
    size = self.primary_kernel
    for _, kernel, stride in reversed(CONVOLUTIONS):
      size = (size - 1) * stride + kernel
    if min(images.shape[1:3]) < size:
      raise InputError(f'Efficient-CapsNet needs images of at least {size}x{size} for its four '
                       f'convolutions and {self.primary_kernel}x{self.primary_kernel} primary '
                       f'capsules; got images of shape {images.shape}. Pad or resize them.')
    x = images
    for i, (features, kernel, stride) in enumerate(CONVOLUTIONS, 1):
      x = nn.relu(Conv2D(features, kernel, stride, self.conv_impl, self.dtype,
                         kernel_init=nn.initializers.he_normal(), name=f'conv{i}')(x))
      x = nn.BatchNorm(use_running_average=not train, momentum=NORM_MOMENTUM,
                       epsilon=NORM_EPSILON, dtype=self.dtype, name=f'norm{i}')(x)
    channels = x.shape[-1]
    kernel = self.param('primary_kernel', nn.initializers.he_normal(in_axis=(0, 1), out_axis=2),
                        (self.primary_kernel, self.primary_kernel, channels))
    bias = self.param('primary_bias', nn.initializers.zeros, (channels,))
    y = depthwise_conv2d(x.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)
    u = efficient_squash(y.reshape(y.shape[0], -1, self.primary_dim))
    # The paper's code draws W from Keras's He normal over W [10, 16, 8, 16], whose fan-in
    # Keras counts as 10 * 16 * 8.
    v = RoutedCapsules(self.num_classes, self.digit_dim, routing='self_attention',
                       weight_stddev=math.sqrt(2 / (self.num_classes * self.digit_dim
                                                    * self.primary_dim)),
                       dtype=self.dtype, name='digit_caps')(u)
    return class_capsule_outputs(v, images, labels, self.use_decoder, self.decoder_hidden,
                                 self.dtype)

