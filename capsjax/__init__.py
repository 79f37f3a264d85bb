"""capsjax: Capsule Networks with routing by agreement (Sabour, Frosst, Hinton 2017) in JAX.

The package reads like the architecture: `capsjax.nn` (squash, routing,
convolutions, capsule layers, losses), `capsjax.models` (CapsNet, the
baseline CNN and Efficient-CapsNet, by name), `capsjax.data`, `capsjax.tasks` (each task's loss),
`capsjax.training` (config, state, steps, loop) and `capsjax.analysis`. The
names below are the stable API.
"""

from capsjax.errors import InputError
from capsjax.models import (
    BaselineCNN,
    CapsNet,
    CapsNetOutput,
    EfficientCapsNet,
    init_params,
    init_variables,
    parameter_counts,
)
from capsjax.nn.layers import Conv2D, Decoder, PrimaryCapsules, RoutedCapsules, decoder_mask
from capsjax.nn.losses import (
                               capsnet_loss,
                               capsnet_loss_terms,
                               cross_entropy_loss,
                               margin_loss,
                               reconstruction_loss,
)
from capsjax.nn.ops import efficient_squash, safe_norm, squash
from capsjax.nn.routing import (
    batched_dynamic_routing,
    dynamic_routing,
    em_routing,
    inverted_dot_product_attention_routing,
    self_attention_routing,
)

__version__ = '0.1.0'

__all__ = [
    'BaselineCNN', 'CapsNet', 'CapsNetOutput', 'Conv2D', 'Decoder', 'EfficientCapsNet',
    'InputError',
    'PrimaryCapsules', 'RoutedCapsules', 'batched_dynamic_routing', 'capsnet_loss',
    'capsnet_loss_terms', 'cross_entropy_loss', 'decoder_mask',
    'dynamic_routing', 'efficient_squash', 'em_routing', 'init_params', 'init_variables',
    'inverted_dot_product_attention_routing', 'margin_loss', 'parameter_counts',
    'reconstruction_loss', 'safe_norm', 'self_attention_routing', 'squash',
]
