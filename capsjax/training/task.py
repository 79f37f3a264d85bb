"""What a run trains and is evaluated on, apart from its config: the loop's argument about data."""

import dataclasses
from typing import Any, Callable, Mapping, Optional, Tuple

import numpy as np

from capsjax.data import Dataset
from capsjax.training import steps
from capsjax.training.state import LossFn, TrainState


@dataclasses.dataclass(frozen=True)
class Task:
  """A dataset, the loss a model is trained and scored by, and what a run draws.

  Attributes:
    name: the data's name, recorded as run.json's 'dataset' ('mnist', 'expanded mnist').
    dataset: a `capsjax.data.Dataset` (uint8 images, int32 labels).
    loss_fn: the per-example loss, (state, params, batch, train, rng) -> dict of
      float32 [B] holding 'loss' and 'accuracy' (see `capsjax.tasks`), plus the
      model's updated state where it keeps one (`capsjax.training.state.MODEL_STATE`);
      run.json records it by its __name__.
    make_batch: builds a batch on the device from the dataset's arrays (see
      `capsjax.training.steps.pmap_steps`); its images are what the model sees.
    more_tests: name -> (uint8 images [N, H, W, C] of the model's input shape,
      int class indices [N]): further test sets, evaluated every epoch as they are (no
      make_batch) and recorded as '{name}_*' (the affine test digits, say);
      their identity is part of the run's.
    settings: further JSON values that define the run (a generated test set's
      seed, say): recorded in run.json and checked on resume.
    pictures: optional callable(state) drawing the run's pictures, called after
      every epoch (and once by an evaluation).
  """
  name: str
  dataset: Dataset
  loss_fn: LossFn
  make_batch: Callable[..., dict] = steps.take_batch
  more_tests: Mapping[str, Tuple[np.ndarray, np.ndarray]] = dataclasses.field(
      default_factory=dict)
  settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  pictures: Optional[Callable[[TrainState], None]] = None
