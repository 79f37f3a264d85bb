"""The project's own error type for bad input, which entry points report in one line."""


class InputError(ValueError):
  """Input from the user (flags, files, arrays, a workdir) is wrong.

  The message names the problem and the way to fix it; `experiments.*` print it
  as one line and exit non-zero, while any other exception keeps its traceback.
  A ValueError, so library callers may catch it as one.
  """
