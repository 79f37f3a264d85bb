"""capsjax: Capsule Networks with routing by agreement (Sabour, Frosst, Hinton 2017) in JAX."""

from capsjax.baseline import BaselineCNN
from capsjax.layers import Conv2D, Decoder, PrimaryCapsules, RoutedCapsules, decoder_mask
from capsjax.errors import InputError
from capsjax.losses import (capsnet_loss, capsnet_loss_terms, cross_entropy_loss, margin_loss,
                            reconstruction_loss)
from capsjax.model import CapsNet, CapsNetOutput, init_params, parameter_counts
from capsjax.ops import safe_norm, squash
from capsjax.routing import batched_dynamic_routing, dynamic_routing

__version__ = '0.1.0'

__all__ = [
    'BaselineCNN', 'CapsNet', 'CapsNetOutput', 'Conv2D', 'Decoder', 'InputError',
    'PrimaryCapsules', 'RoutedCapsules', 'batched_dynamic_routing', 'capsnet_loss',
    'capsnet_loss_terms', 'cross_entropy_loss', 'decoder_mask',
    'dynamic_routing', 'init_params', 'margin_loss', 'parameter_counts',
    'reconstruction_loss', 'safe_norm', 'squash',
]
