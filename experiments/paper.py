"""The paper's Table 1 rows: each row's settings and its reported MNIST test error.

Kept apart from `experiments.table1`, which trains them, so that
`experiments.reproduce` can plan them without that command's flags.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Row:
  """One row of Table 1: the settings it overrides and the paper's figure (MNIST test error %)."""
  name: str
  settings: dict
  paper_error: float
  paper_std: float = None


ROWS = (
    Row('baseline', {'model': 'baseline'}, 0.39),
    Row('capsnet_r1', {'model': 'capsnet', 'routing_iters': 1, 'recon_weight': 0.0}, 0.34, 0.032),
    Row('capsnet_r1_recon', {'model': 'capsnet', 'routing_iters': 1, 'recon_weight': 0.0005},
        0.29, 0.011),
    Row('capsnet_r3', {'model': 'capsnet', 'routing_iters': 3, 'recon_weight': 0.0}, 0.35, 0.036),
    Row('capsnet_r3_recon', {'model': 'capsnet', 'routing_iters': 3, 'recon_weight': 0.0005},
        0.25, 0.005),
)
