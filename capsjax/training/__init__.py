"""Training: a config, a state, pure steps, and the one loop over them.

  config      TrainConfig (model / optimizer / data / run) and the named recipes
  state       TrainState with the weights' moving average; create_train_state
  steps       train_step, eval_step and their pmapped form
  task        Task: what a run trains on (data, loss, batches, pictures)
  loop        train_and_evaluate over train_epoch
  rundir      run.json, metrics.jsonl, resume checks
  checkpoint  checkpoints by step, with the epoch's progress and digests
  stopping    SIGTERM / Ctrl-C: save and stop; Stopped
  lock        one training process per run folder
  distributed joining the processes of a multi-host run
"""

from capsjax.training.config import RECIPES, DataConfig, OptimizerConfig, RunConfig, TrainConfig
from capsjax.training.loop import Diverged, train_and_evaluate
from capsjax.training.state import TrainState, create_train_state, evaluation_params
from capsjax.training.steps import check_batch, eval_step, pmap_steps, train_step
from capsjax.training.stopping import Stopped
from capsjax.training.task import Task

__all__ = ['DataConfig', 'Diverged', 'OptimizerConfig', 'RECIPES', 'RunConfig', 'Task',
           'TrainConfig', 'TrainState', 'check_batch', 'create_train_state', 'eval_step',
           'evaluation_params', 'pmap_steps', 'Stopped', 'train_and_evaluate', 'train_step']
