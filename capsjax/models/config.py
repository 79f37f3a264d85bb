"""The settings of a model: which architecture, its sizes, its compute dtype."""

import dataclasses
from typing import Tuple

import jax.numpy as jnp

from capsjax import settings
from capsjax.nn.conv import CONV_IMPLS
from capsjax.nn.layers import ROUTINGS
from capsjax.settings import setting

ARCHITECTURES = ('capsnet', 'baseline', 'efficient_capsnet')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A model, by architecture name and sizes; the defaults are the paper's MNIST CapsNet.

  'capsnet' reads routing, routing_iters, recon_weight and the capsule sizes; 'baseline'
  (the paper's CNN, `capsjax.BaselineCNN`) reads dropout_rate,
  baseline_conv3_features and baseline_pool; 'efficient_capsnet' (Mazzia et al. 2021,
  `capsjax.EfficientCapsNet`) recon_weight only. All read dtype and conv_impl.
  image_shape and num_classes come from the data, not from flags.
  """
  name: str = setting('capsnet', "capsnet (the paper's CapsNet), baseline (the paper's CNN) or "
                      'efficient_capsnet (Mazzia et al. 2021).',
                      choices=ARCHITECTURES, flag='model')
  routing_iters: int = setting(3, 'Routing iterations.', lower=1)
  routing: str = setting('dynamic', "CapsNet's routing: dynamic (the paper's), em (Hinton et al. "
                         '2018), self_attention (Mazzia et al. 2021) or inverted_attention (Tsai '
                         'et al. 2020).', choices=ROUTINGS)
  recon_weight: float = setting(0.0005, 'Weight of the reconstruction loss; 0 drops the decoder.',
                                lower=0)
  conv_features: int = setting(256, 'Conv1 channels.', lower=1)
  primary_types: int = setting(32, 'Primary capsule maps.', lower=1)
  primary_dim: int = setting(8, 'Primary capsule dimension.', lower=1)
  digit_dim: int = setting(16, 'Class capsule dimension.', lower=1)
  dropout_rate: float = setting(0.5, "Baseline CNN's dropout rate.", lower=0, below=1)
  baseline_conv3_features: int = setting(128, "Channels of the baseline CNN's third convolution.",
                                         lower=1)
  baseline_pool: int = setting(1, "Max pooling window and stride after the baseline CNN's first "
                               "convolution (1: none, the paper's).", lower=1)
  dtype: str = setting('float32', 'Compute dtype (bfloat16: mixed precision, float32 parameters '
                       'and loss).', choices=sorted(DTYPES))
  conv_impl: str = setting('auto', 'Convolution: auto (matmul on the CPU, xla on GPU and TPU), '
                           'matmul (im2col matrix products) or xla (lax.conv).', choices=CONV_IMPLS)
  image_shape: Tuple[int, int, int] = (28, 28, 1)
  num_classes: int = 10

  def __post_init__(self):
    settings.validate(self)

  @property
  def compute_dtype(self):
    """The jnp dtype of `dtype`."""
    return DTYPES[self.dtype]
