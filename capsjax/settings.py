"""Config fields that are command-line flags, validated in one place.

A config is a frozen dataclass whose fields are made by `setting`: the field's
default, its help text, and its bounds or choices. `experiments.common` defines
one flag per such field from this metadata, and `validate` checks a config
against the same metadata, so a flag, its documentation and its check cannot
drift apart. Nested configs (a dataclass field holding another config) are
walked by `leaves`.
"""

import dataclasses
import math
from typing import Any, Iterator, Optional, Sequence, Tuple

from capsjax.errors import InputError


def setting(default: Any, help: str, *, lower: Optional[float] = None,
            upper: Optional[float] = None, below: Optional[float] = None,
            choices: Optional[Sequence[str]] = None, flag: Optional[str] = None) -> Any:
  """A config field that is a flag.

  Args:
    default: the field's default (the paper's value where the paper gives one).
    help: the flag's help text.
    lower, upper: inclusive bounds of a number.
    below: exclusive upper bound of a number.
    choices: the allowed strings.
    flag: the flag's name, when it is not the field's (e.g. --model for
      ModelConfig.name).

  Returns:
    A `dataclasses.field`.
  """
  metadata = {'help': help, 'lower': lower, 'upper': upper, 'below': below,
              'choices': tuple(choices) if choices else None, 'flag': flag}
  return dataclasses.field(default=default, metadata=metadata)


def is_setting(field: dataclasses.Field) -> bool:
  """Whether a dataclass field was made by `setting` (and so is a flag)."""
  return 'help' in field.metadata


def flag_name(field: dataclasses.Field) -> str:
  """The flag a field is set by: its own name unless `setting(flag=...)` renamed it."""
  return field.metadata.get('flag') or field.name


def leaves(config: Any, path: Tuple[str, ...] = ()) -> Iterator[Tuple[Tuple[str, ...],
                                                                      dataclasses.Field, Any]]:
  """Every non-config field of a (nested) config, depth first, in declaration order.

  Args:
    config: a dataclass instance or class.

  Yields:
    (path of field names from the top, the field, its value; the default when
    `config` is a class).
  """
  for field in dataclasses.fields(config):
    value = (getattr(config, field.name) if not isinstance(config, type)
             else field.default if field.default is not dataclasses.MISSING
             else field.default_factory())
    if dataclasses.is_dataclass(value):
      yield from leaves(value, path + (field.name,))
    else:
      yield path + (field.name,), field, value


def check(field: dataclasses.Field, value: Any) -> None:
  """Raise InputError if `value` breaks its field's bounds or choices.

  The message names the flag, the value and what it must be, in one line.
  """
  meta = field.metadata
  name = f'--{flag_name(field)}={value}'
  if meta.get('choices') is not None:
    if value not in meta['choices']:
      raise InputError(f'{name}: choose one of {", ".join(meta["choices"])}.')
    return
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return
  if isinstance(value, float) and not math.isfinite(value):
    raise InputError(f'{name}: give a finite number.')
  lower, upper, below = meta.get('lower'), meta.get('upper'), meta.get('below')
  if lower is not None and value < lower:
    raise InputError(f'{name}: must be at least {lower}.')
  if upper is not None and value > upper:
    raise InputError(f'{name}: must be at most {upper}.')
  if below is not None and value >= below:
    raise InputError(f'{name}: must be below {below}.')


def validate(config: Any) -> None:
  """Check every setting of a (nested) config; raise InputError at the first bad one."""
  for _, field, value in leaves(config):
    if is_setting(field):
      check(field, value)


def flatten(config: Any) -> dict:
  """A nested config as one flat dict keyed by flag name (what run.json records).

  Raises:
    ValueError: two leaves share a flag name (a config design error).
  """
  flat = {}
  for _, field, value in leaves(config):
    name = flag_name(field)
    if name in flat:
      raise ValueError(f'two config fields are both --{name}')
    flat[name] = value
  return flat


def unflatten(cls: type, flat: dict) -> Any:
  """The config of class `cls` whose leaves take their values from `flat` by flag name.

  Leaves `flat` does not name keep their defaults; keys that name no leaf are
  ignored (a run.json also records the data's identity). Tuples stored as JSON
  lists come back as tuples.
  """
  values = {}
  for field in dataclasses.fields(cls):
    default = (field.default if field.default is not dataclasses.MISSING
               else field.default_factory())
    if dataclasses.is_dataclass(default):
      values[field.name] = unflatten(type(default), flat)
    elif flag_name(field) in flat:
      value = flat[flag_name(field)]
      values[field.name] = tuple(value) if isinstance(value, list) else value
  return cls(**values)
