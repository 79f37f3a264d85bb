"""The models, registered by the name `ModelConfig.name` (and --model) gives them.

Every architecture is used through one interface, `Architecture`: `build` makes
its Flax module from a `ModelConfig`, and `forward` runs it to class scores and,
where it has a decoder, reconstructions. Code above this package (the tasks'
losses, the training loop, the experiments) asks the registry, never an
architecture's name.
"""

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax

from capsjax.errors import InputError
from capsjax.models.baseline import BaselineCNN
from capsjax.models.capsnet import (
  CapsNet,
  CapsNetOutput,
  init_params,
  init_variables,
  parameter_counts,
)
from capsjax.models.config import ARCHITECTURES, DTYPES, ModelConfig
from capsjax.models.efficient_capsnet import EfficientCapsNet


class ModelOutput(NamedTuple):
  """What `Architecture.forward` returns.

  scores: float32 [B, K], capsule lengths ('lengths') or logits ('logits').
  reconstructions: float32 [B, H, W, C] ([B, M, H, W, C] for M masks), or None.
  model_state: in training, the model's updated state (its collections besides
    'params', e.g. batch normalisation's running statistics), or None if it has none.
  """
  scores: jax.Array
  reconstructions: Optional[jax.Array]
  model_state: Optional[Any] = None


@dataclasses.dataclass(frozen=True)
class Architecture:
  """How to build and run one kind of model.

  build: ModelConfig -> Flax module.
  forward: (apply_fn, params, images, decode, train, rng, model_state) ->
    ModelOutput. decode is what a decoder reconstructs from (class indices [B],
    or masks [B, M, K]; None: the longest capsule); train turns on dropout,
    drawn from rng, and batch statistics; model_state holds the collections
    besides 'params' (None for models without).
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


def _forward_capsnet(apply_fn, params, images, decode=None, train=False, rng=None,
                     model_state=None):
  del train, rng, model_state  # no dropout, no state
  out = apply_fn({'params': params}, images, decode)
  return ModelOutput(out.lengths, out.reconstructions)


def _build_baseline(config):
  return BaselineCNN(num_classes=config.num_classes, dropout_rate=config.dropout_rate,
                     conv_features=(256, 256, config.baseline_conv3_features),
                     pool=config.baseline_pool, conv_impl=config.conv_impl,
                     dtype=config.compute_dtype)


def _forward_baseline(apply_fn, params, images, decode=None, train=False, rng=None,
                      model_state=None):
  del decode, model_state  # no decoder, no state
  logits = apply_fn({'params': params}, images, train=train,
                    rngs={'dropout': rng} if train else {})
  return ModelOutput(logits, None)


def _build_efficient_capsnet(config):
  return EfficientCapsNet(num_classes=config.num_classes, use_decoder=config.recon_weight > 0,
                          conv_impl=config.conv_impl, dtype=config.compute_dtype)


def _forward_efficient_capsnet(apply_fn, params, images, decode=None, train=False, rng=None,
                               model_state=None):
  del rng  # no dropout
  if not model_state or 'batch_stats' not in model_state:
    raise InputError('Efficient-CapsNet needs its batch statistics (model_state with '
                     "'batch_stats', from capsjax.models.init_variables) beside its params.")
  variables = {'params': params, **model_state}
  if train:
    out, updated = apply_fn(variables, images, decode, train=True, mutable=list(model_state))
    return ModelOutput(out.lengths, out.reconstructions, updated)
  out = apply_fn(variables, images, decode)
  return ModelOutput(out.lengths, out.reconstructions)


REGISTRY = {
    'capsnet': Architecture(_build_capsnet, _forward_capsnet, scores='lengths', decodes=True,
                            describe=_describe_capsnet),
    'baseline': Architecture(_build_baseline, _forward_baseline, scores='logits', decodes=False,
                             describe=lambda c: 'baseline CNN'),
    'efficient_capsnet': Architecture(_build_efficient_capsnet, _forward_efficient_capsnet,
                                      scores='lengths', decodes=True,
                                      describe=lambda c: 'Efficient-CapsNet'),
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
           'EfficientCapsNet', 'ModelConfig', 'ModelOutput', 'REGISTRY', 'architecture', 'build',
           'describe', 'has_decoder', 'init_params', 'init_variables', 'parameter_counts']
