"""Rewards for RL: rule-based verifiers of the built-in tasks and user functions, weighted.

A reward function is TRL's: `fn(prompts, completions, **columns) -> list[float]`, one reward
per completion, where `columns` are the prompt records' other fields as lists (a built-in
task's `answer`, a JSONL file's own keys), each repeated for the completions of its prompt.
`rl.reward_fns` names them: a built-in (`BUILTIN`) or `module:function` / `module.function`
imported from the Python path (an experiment file's directory is on it). `rl.reward_weights`
(default all 1) weighs their sum, TRL's `sum_then_normalize`.

`score` runs them and checks each result: a function that raises, returns the wrong number of
rewards, or a NaN / non-number, is a one-line UserError naming the function and the example.
"""

import importlib
import json
import math
from typing import Callable, Sequence

import numpy as np

from llmjax.errors import ConfigError, UserError

BUILTIN_STOP = '\n'  # the built-in tasks' answers are one line (the eval harness cuts there)


def _answer_line(completion: str) -> str:
  """What the eval harness compares for a built-in task: the text before the first newline."""
  return completion.split(BUILTIN_STOP, 1)[0]


def exact_match(prompts, completions, answer, **_) -> list[float]:
  """1.0 where the completion's first line is the record's `answer` (whitespace stripped:
  `llmjax.eval.scoring.exact_match`, what held-out exact match counts), else 0.0."""
  from llmjax.eval.scoring import exact_match as same
  return [float(same(_answer_line(c), str(a))) for c, a in zip(completions, answer)]


def json_format(prompts, completions, **_) -> list[float]:
  """1.0 where the completion's first line is a JSON object with an "answer" key (the `format`
  task's shape, right or wrong), else 0.0: a format reward, weighed beside exact_match."""
  out = []
  for c in completions:
    try:
      value = json.loads(_answer_line(c).strip())
    except json.JSONDecodeError:
      out.append(0.0)
      continue
    out.append(float(isinstance(value, dict) and 'answer' in value))
  return out


def length_penalty(prompts, completions, **_) -> list[float]:
  """-1.0 for a completion with more than one line (text after the answer), else 0.0: keeps
  a policy from padding its answers."""
  return [-float(BUILTIN_STOP in c.strip()) for c in completions]


BUILTIN: dict[str, Callable] = {
    'exact_match': exact_match,
    'json_format': json_format,
    'length_penalty': length_penalty,
}


def load(names: Sequence[str], weights: Sequence[float] = ()) -> tuple[list, np.ndarray]:
  """rl.reward_fns and rl.reward_weights -> ([(name, fn)], weights [F] float64)."""
  if isinstance(names, str):
    names = [n for n in names.split(',') if n]
  if not names:
    raise ConfigError("rl.reward_fns is empty; name at least one reward function (e.g."
                      " exact_match, or my_module:my_reward).")
  fns = []
  for name in names:
    if name in BUILTIN:
      fns.append((name, BUILTIN[name]))
      continue
    module, sep, attr = name.partition(':') if ':' in name else name.rpartition('.')
    if not module or not attr:
      raise ConfigError(f"rl.reward_fns entry '{name}' is neither a built-in reward"
                        f" ({', '.join(BUILTIN)}) nor module:function.")
    try:
      fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
      raise ConfigError(f"rl.reward_fns entry '{name}' could not be imported ({e}); put"
                        f" {module}.py on the Python path.") from None
    if not callable(fn):
      raise ConfigError(f"rl.reward_fns entry '{name}' is not a function.")
    fns.append((name.replace(':', '.'), fn))
  weights = tuple(weights) if weights else (1.0,) * len(fns)
  if len(weights) != len(fns):
    raise ConfigError(f"rl.reward_weights has {len(weights)} values for {len(fns)}"
                      " rl.reward_fns; give one weight per function.")
  return fns, np.asarray(weights, np.float64)


def score(fns, prompts: list[str], completions: list[str], columns: dict) -> np.ndarray:
  """[N, F] float64 rewards of N completions from F functions (checked, see the docstring)."""
  n = len(completions)
  out = np.zeros((n, len(fns)), np.float64)
  for j, (name, fn) in enumerate(fns):
    try:
      values = fn(prompts=prompts, completions=completions, **columns)
    except Exception as e:  # a user function: report which one and where, not a traceback
      raise UserError(f"reward function {name} raised {type(e).__name__}: {e} (first example:"
                      f" prompt {prompts[0]!r}, completion {completions[0]!r}).") from None
    values = list(values) if values is not None else []
    if len(values) != n:
      raise UserError(f"reward function {name} returned {len(values)} rewards for {n}"
                      f" completions; return one float per completion (first: prompt"
                      f" {prompts[0]!r}).")
    for i, v in enumerate(values):
      if not isinstance(v, (int, float, np.floating, np.integer)) or not math.isfinite(float(v)):
        raise UserError(f"reward function {name} returned {v!r} for completion {i} (prompt"
                        f" {prompts[i]!r}, completion {completions[i]!r}); rewards must be"
                        " finite numbers.")
      out[i, j] = float(v)
  return out
