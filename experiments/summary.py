"""Print a model's layers, output shapes and parameter counts.

    python -m experiments.summary                  # the paper's MNIST CapsNet
    python -m experiments.summary --image_size=36 --routing_iters=1 --nouse_decoder
    python -m experiments.summary --model=baseline # the paper's baseline CNN
"""

from absl import app, flags
import jax
import jax.numpy as jnp

import capsjax
from capsjax import models
from experiments import common  # the model's flags: --model, --routing_iters, sizes, ...

FLAGS = flags.FLAGS
flags.DEFINE_integer('image_size', 28, 'Height and width of the input images.')
flags.DEFINE_integer('channels', 1, 'Input channels.')
flags.DEFINE_integer('num_classes', 10, 'Class capsules (baseline: logits).')
flags.DEFINE_bool('use_decoder', True, 'Include the reconstruction decoder (same as '
                  '--recon_weight=0 when false).')


def print_layers(params):
  """Print each top-level layer's parameter count and leaf shapes, then the total.

  Args:
    params: the 'params' collection of an initialised model.
  """
  for name, count in capsjax.parameter_counts(params).items():
    shapes = '' if name == 'total' else ', '.join(
        f'{"/".join(str(k.key) for k in path)} {tuple(leaf.shape)}'
        for path, leaf in jax.tree_util.tree_leaves_with_path(params[name]))
    print(f'  {name:<13s}{count:>10,d}  {shapes}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  image_shape = (FLAGS.image_size, FLAGS.image_size, FLAGS.channels)
  overrides = {'num_classes': FLAGS.num_classes, 'image_shape': image_shape}
  if not FLAGS.use_decoder:
    overrides['recon_weight'] = 0.0
  config = common.config_from_flags(None, **overrides).model
  model = models.build(config)
  variables = capsjax.init_variables(model, jax.random.PRNGKey(0), image_shape)
  params = variables['params']
  description = models.describe(config)  # mid-sentence wording: capitalised to start a line
  description = description[:1].upper() + description[1:]
  if models.architecture(config).scores == 'logits':
    print(f'{description} for {image_shape} images')
  else:
    out = jax.eval_shape(model.apply, variables, jnp.zeros((1, *image_shape)))
    print(f'{description}, for {image_shape} images')
    print(f'  primary capsules: {params["digit_caps"]["weights"].shape[0]} of '
          f'{model.primary_dim}D; class capsules: {out.capsules.shape[1:]}')
  print_layers(params)

if __name__ == '__main__':
  app.run(main)
