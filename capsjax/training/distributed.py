"""Runs over several processes (hosts): joining them before JAX starts computing.

A run over several processes is the same program started once per process.
Each joins the others through `jax.distributed.initialize`; from then on
`jax.devices()` lists every process's devices, a `pmap` spans all of them and
each process feeds its own (`jax.local_devices()`); see `capsjax.training.loop`.

Where the processes come from:
  * named: coordinator_address ('host:port' of process 0), num_processes and
    process_id, the same address on every process;
  * a cluster's environment: SLURM (srun with more than one task) and
    multi-host Cloud TPU VMs, whose settings `jax.distributed.initialize()`
    reads itself;
  * neither: one process, and nothing to join.
"""

import os

import jax

from capsjax.errors import InputError


def cluster_in_environment(environ=os.environ):
  """Whether the environment describes a multi-process job JAX can join by itself.

  Args:
    environ: mapping of environment variables.

  Returns:
    'slurm' (SLURM_JOB_ID set, SLURM_NTASKS above 1), 'tpu' (TPU_WORKER_HOSTNAMES
    names more than one host), or None.
  """
  if environ.get('SLURM_JOB_ID') and int(environ.get('SLURM_NTASKS', '1') or 1) > 1:
    return 'slurm'
  if len([h for h in environ.get('TPU_WORKER_HOSTNAMES', '').split(',') if h.strip()]) > 1:
    return 'tpu'
  return None


def initialize(coordinator_address=None, num_processes=None, process_id=None,
               environ=os.environ):
  """Join the run's other processes, if there are any; call before any JAX computation.

  Args:
    coordinator_address: str 'host:port' of process 0, or None.
    num_processes: int, processes in the run (with coordinator_address).
    process_id: int in [0, num_processes), this process's number.
    environ: mapping of environment variables, read when no address is given.

  Returns:
    The number of processes joined: 1 when there is nothing to join.

  Raises:
    InputError: an address without a process count and id, or an id out of range.
  """
  if coordinator_address is None:
    if num_processes not in (None, 1) or process_id not in (None, 0):
      raise InputError('--num_processes and --process_id need --coordinator_address '
                       '(host:port of process 0, the same on every process).')
    if cluster_in_environment(environ) is None:
      return 1
    jax.distributed.initialize()
    return jax.process_count()
  if num_processes is None or process_id is None:
    raise InputError(f'--coordinator_address={coordinator_address} needs --num_processes '
                     f'and --process_id (0 for the process at that address).')
  if not 0 <= process_id < num_processes:
    raise InputError(f'--process_id={process_id} must lie in [0, {num_processes}) for '
                     f'--num_processes={num_processes}.')
  jax.distributed.initialize(coordinator_address, num_processes, process_id)
  return num_processes
