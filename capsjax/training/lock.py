"""One training process per run folder: a lock file naming its holder.

    WORKDIR/lock.json   {"pid", "host", "started", "process_start"}

A second trainer in the same folder stops with one line naming the first. A
lock whose holder is gone is taken over: on the same host when its process no
longer runs (or its number now belongs to another process), on another host
when it has not been refreshed for `STALE_SECONDS` (its holder refreshes it as
it trains). Evaluations only read it, to say that a trainer is writing.
"""

import datetime
import json
import os
import socket
import time
from typing import Callable, Optional

from capsjax.errors import InputError

LOCK_FILE = 'lock.json'
STALE_SECONDS = 15 * 60
_REFRESH_SECONDS = 60


def _process_start(pid: int) -> Optional[str]:
  """The start time of process `pid` (Linux), which tells a reused pid from its first owner."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # someone else's process
  return True


def read_holder(workdir: str) -> Optional[dict]:
  """The lock's holder if a live process holds `workdir`, else None.

  Returns:
    dict with 'pid', 'host', 'started' (ISO time), or None when the folder is
    not locked or its lock is stale.
  """
  path = os.path.join(workdir, LOCK_FILE)
  try:
    with open(path, encoding='utf-8') as f:
      holder = json.load(f)
    age = time.time() - os.path.getmtime(path)
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    # Being written this instant, or left unreadable by a crash long ago.
    age = _age(path)
    return {'pid': '?', 'host': '?', 'started': '?'} if age is not None and age < 60 else None
  if not isinstance(holder, dict):
    return None
  if holder.get('host') == socket.gethostname():
    pid = holder.get('pid')
    if not isinstance(pid, int) or not _alive(pid):
      return None
    start = _process_start(pid)
    if start is not None and holder.get('process_start') not in (None, start):
      return None  # the pid now names another process
    return holder
  return holder if age < STALE_SECONDS else None


def _age(path: str) -> Optional[float]:
  try:
    return time.time() - os.path.getmtime(path)
  except OSError:
    return None


def describe(holder: dict) -> str:
  return f'pid {holder.get("pid")} on {holder.get("host")}, since {holder.get("started")}'


class WorkdirLock:
  """Holds WORKDIR/lock.json while a run trains; a context manager.

  Raises (on entry) InputError when a live process holds the folder.
  """

  def __init__(self, workdir: str, log: Callable[[str], None] = print):
    self.path = os.path.join(workdir, LOCK_FILE)
    self._workdir, self._log = workdir, log
    self._refreshed = 0.0
    self._held = False

  def __enter__(self) -> 'WorkdirLock':
    me = {'pid': os.getpid(), 'host': socket.gethostname(),
          'started': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
          'process_start': _process_start(os.getpid())}
    for _ in range(3):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = read_holder(self._workdir)
        if holder is not None:
          raise InputError(
              f'{self._workdir} is being trained by another process ({describe(holder)}); '
              f'wait for it to end or stop it, or pass another --workdir. (If that process is '
              f'gone, delete {self.path}.)') from None
        self._log(f'Took over the stale lock {self.path}.')
        try:
          os.remove(self.path)
        except FileNotFoundError:
          pass
        continue
      except OSError as e:
        raise InputError(f'cannot write in {self._workdir} ({e.strerror}); give a --workdir '
                         f'that can be written.') from None
      with os.fdopen(fd, 'w', encoding='utf-8') as f:
        json.dump(me, f)
      self._me, self._held, self._refreshed = me, True, time.monotonic()
      return self
    raise InputError(f'{self.path}: could not take the lock; another process keeps taking it.')

  def refresh(self):
    """Mark the lock as alive (for processes on other hosts), at most once a minute."""
    if self._held and time.monotonic() - self._refreshed > _REFRESH_SECONDS:
      try:
        os.utime(self.path)
      except OSError:
        pass
      self._refreshed = time.monotonic()

  def __exit__(self, *exc_info):
    if not self._held:
      return
    try:
      with open(self.path, encoding='utf-8') as f:
        still_mine = json.load(f) == self._me
    except (OSError, ValueError):
      still_mine = False
    if still_mine:
      os.remove(self.path)
    self._held = False
