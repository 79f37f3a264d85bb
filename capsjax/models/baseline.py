"""The paper's baseline CNN, the convolutional network CapsNet is compared against."""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from capsjax.nn.layers import Conv2D, check_images


class BaselineCNN(nn.Module):
  """Three SAME convolutions, two hidden fully connected layers, dropout, logits.

  Section 5 of the paper: 5x5 convolutions with 256, 256 and 128 channels, stride
  1, then fully connected layers of 328 and 192 units, the last "connected with
  dropout" to the softmax layer. It states 35.4M parameters, which on 28x28x1
  images means SAME padding and no pooling. It gives no dropout rate: ours is
  `dropout_rate`, 0.5 by default, on the 192-unit layer's output.

  For larger images (the 40x40 canvas of the affine experiment) `pool` max-pools
  the first convolution's output, so the later convolutions cost less and the
  first fully connected layer (most of the parameters) stays near the paper's size.

  Attributes:
    num_classes: output logits.
    conv_features: channels of the convolutions.
    kernel_size: their square kernel side.
    hidden: widths of the hidden fully connected layers.
    dropout_rate: dropped fraction of the last hidden layer's units in training.
    pool: window and stride of a max pooling after the first convolution (1: none,
      the paper's).
    conv_impl: 'auto' (by platform), 'matmul' (fast on CPU) or 'xla', see
      `capsjax.nn.conv.conv2d`.
    dtype: compute dtype; parameters stay float32 and logits are returned in
      float32.
  """
  num_classes: int = 10
  conv_features: Sequence[int] = (256, 256, 128)
  kernel_size: int = 5
  hidden: Sequence[int] = (328, 192)
  dropout_rate: float = 0.5
  pool: int = 1
  conv_impl: str = 'auto'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    """Classify a batch.

    Args:
      images: [batch, height, width, channels] float in [0, 1].
      train: apply dropout, drawing from the 'dropout' rng collection.

    Returns:
      float32 [batch, num_classes] logits.
    """
    check_images(images)
    x = images
    for i, features in enumerate(self.conv_features):
      x = nn.relu(Conv2D(features, self.kernel_size, 1, self.conv_impl, self.dtype,
                         padding='SAME', name=f'conv{i + 1}')(x))
      if i == 0 and self.pool > 1:
        x = nn.max_pool(x, (self.pool, self.pool), strides=(self.pool, self.pool))
    x = x.reshape(x.shape[0], -1)
    for i, width in enumerate(self.hidden):
      x = nn.relu(nn.Dense(width, dtype=self.dtype, name=f'fc{i + 1}')(x))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype, name='logits')(x).astype(jnp.float32)
