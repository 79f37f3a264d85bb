"""The models, registered by the name `ModelConfig.name` (and --model) gives them.

Every architecture is used through one interface, `Architecture`: `build` makes
its Flax module from a `ModelConfig`, and `forward` runs it to class scores and,
where it has a decoder, reconstructions. Code above this package (the tasks'
losses, the training loop, the experiments) asks the registry, never an
architecture's name.
"""

import dataclasses
from typing import Callable, NamedTuple, Optional

import flax.linen as nn
import jax

from capsjax.models.baseline import BaselineCNN
from capsjax.models.capsnet import CapsNet, CapsNetOutput, init_params, parameter_counts
from capsjax.models.config import ARCHITECTURES, DTYPES, ModelConfig


class ModelOutput(NamedTuple):
  """What `Architecture.forward` returns.

  scores: float32 [B, K], capsule lengths ('lengths') or logits ('logits').
  reconstructions: float32 [B, H, W, C] ([B, M, H, W, C] for M masks), or None.
  """
  scores: jax.Array
  reconstructions: Optional[jax.Array]


@dataclasses.dataclass(frozen=True)
class Architecture:
  """How to build and run one kind of model.

  build: ModelConfig -> Flax module.
  forward: (apply_fn, params, images, decode, train, rng) -> ModelOutput. decode
    is what a decoder reconstructs from (class indices [B], or masks [B, M, K];
    None: the longest capsule); train turns on dropout, drawn from rng.
  scores: 'lengths' (capsule lengths in [0, 1), trained with the margin loss)
    or 'logits' (trained with cross-entropy).
  decodes: whether it has a decoder when config.recon_weight > 0.
  describe: ModelConfig -> a few words for progress lines.
  """
  build: Callable[[ModelConfig], nn.Module]
  forward: Callable[..., ModelOutput]
  scores: str
  decodes: bool
  describe: Callable[[ModelConfig], str]


def _build_capsnet(config):
  return CapsNet(num_classes=config.num_classes, conv_features=config.conv_features,
                 primary_types=config.primary_types, primary_dim=config.primary_dim,
                 digit_dim=config.digit_dim, routing_iters=config.routing_iters,
                 routing=config.routing,
                 use_decoder=config.recon_weight > 0, conv_impl=config.conv_impl,
                 dtype=config.compute_dtype)


def _describe_capsnet(config):
  if config.routing == 'self_attention':
    return 'CapsNet, self-attention routing'
  routing = '' if config.routing == 'dynamic' else f'{config.routing.replace("_", "-")} '
  return f'CapsNet, {config.routing_iters} {routing}routing iterations'


def _forward_capsnet(apply_fn, params, images, decode=None, train=False, rng=None):
  del train, rng  # no dropout
  out = apply_fn({'params': params}, images, decode)
  return ModelOutput(out.lengths, out.reconstructions)


def _build_baseline(config):
  return BaselineCNN(num_classes=config.num_classes, dropout_rate=config.dropout_rate,
                     conv_features=(256, 256, config.baseline_conv3_features),
                     pool=config.baseline_pool, conv_impl=config.conv_impl,
                     dtype=config.compute_dtype)


def _forward_baseline(apply_fn, params, images, decode=None, train=False, rng=None):
  del decode  # no decoder
  logits = apply_fn({'params': params}, images, train=train,
                    rngs={'dropout': rng} if train else {})
  return ModelOutput(logits, None)


REGISTRY = {
    'capsnet': Architecture(_build_capsnet, _forward_capsnet, scores='lengths', decodes=True,
                            describe=_describe_capsnet),
    'baseline': Architecture(_build_baseline, _forward_baseline, scores='logits', decodes=False,
                             describe=lambda c: 'baseline CNN'),
}
assert tuple(REGISTRY) == ARCHITECTURES


def architecture(config: ModelConfig) -> Architecture:
  """The registered `Architecture` of config.name."""
  return REGISTRY[config.name]


def build(config: ModelConfig) -> nn.Module:
  """The Flax module `config` describes."""
  return architecture(config).build(config)


def has_decoder(config: ModelConfig) -> bool:
  """Whether the model `config` describes reconstructs its input."""
  return architecture(config).decodes and config.recon_weight > 0


def describe(config: ModelConfig) -> str:
  """A few words naming the model, e.g. 'CapsNet, 3 routing iterations'."""
  return architecture(config).describe(config)


__all__ = ['ARCHITECTURES', 'Architecture', 'BaselineCNN', 'CapsNet', 'CapsNetOutput', 'DTYPES',
           'ModelConfig', 'ModelOutput', 'REGISTRY', 'architecture', 'build', 'describe',
           'has_decoder', 'init_params', 'parameter_counts']
