"""User-facing errors: one line that names what is wrong and how to fix it.

The CLIs catch `UserError` and print its message without a traceback, so every check that
guards user input (configs, files, prompts, checkpoints) raises a subclass of it before
anything expensive starts.
"""

import difflib


class UserError(ValueError):
  """Bad input from the user; the message is one line naming the key/file and the fix."""


class ConfigError(UserError):
  """A config key has a bad value or does not exist."""


class DataError(UserError):
  """A data file or corpus is missing, empty or corrupt."""


class CheckpointError(UserError):
  """A checkpoint is missing, corrupt or belongs to a different model."""


def closest(name: str, candidates) -> str:
  """' Did you mean X?' for the closest candidate, or '' when nothing is close."""
  match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
  return f" Did you mean '{match[0]}'?" if match else ""
