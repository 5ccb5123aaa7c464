"""Rewards for RL: rule-based verifiers of the built-in tasks and user functions, weighted.

A reward function is TRL's: `fn(prompts, completions, **columns) -> list[float]`, one reward
per completion, where `columns` are the prompt records' other fields as lists (a built-in
task's `answer`, a JSONL file's own keys), each repeated for the completions of its prompt.
`rl.reward_fns` names them: a built-in (`BUILTIN`), `module:function` / `module.function`
imported from the Python path (an experiment file's directory is on it), or the directory of
a trained reward model (`RewardModel`: an llmjax reward run or an HF sequence classifier). `rl.reward_weights`
(default all 1) weighs their sum, TRL's `sum_then_normalize`.

`score` runs them and checks each result: a function that raises, returns the wrong number of
rewards, or a NaN / non-number, is a one-line UserError naming the function and the example.
"""

import importlib
import json
import math
import os
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
    if os.path.isdir(name):  # a reward model's dir, as TRL takes a model id
      model = RewardModel(name)
      fns.append((model.__name__, model))
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


class RewardModel:
  """A trained score model as a reward function (TRL's `reward_funcs` entry that names a
  model): an llmjax reward run's workdir (train.objective='reward', model.head='score') or a
  Hugging Face *ForSequenceClassification dir, named in rl.reward_fns by its path.

  Each prompt + completion is tokenized by the reward model's own tokenizer as its training
  pairs were (`PreferenceTokenizer.plain_with_eos`: BOS, the text, EOS), and the reward is its
  score at the last token (`llmjax.train.reward.sequence_rewards`). The config is checked when
  the run starts; the weights load at the first rollout, onto the first local device, in
  batches of `batch_size` rows padded to a multiple of 64 tokens (few shapes, few compiles).
  """

  def __init__(self, path: str, batch_size: int = 64):
    self.path, self.batch_size, self._loaded = path, batch_size, None
    self.__name__ = os.path.basename(os.path.normpath(path))  # TRL's name: the model's
    from llmjax.train import checkpoint
    if os.path.exists(os.path.join(path, 'model_config.json')):
      head = checkpoint.read_model_config(path).head
    else:
      from llmjax.interop import families, hf
      config = os.path.join(path, 'config.json')
      head = families.family_of(hf.read_hf_config(path), config).head
    if head != 'score':
      raise ConfigError(f"rl.reward_fns entry '{path}' is a language model (model.head="
                        f"'{head}'), not a reward model; name a reward run's workdir"
                        " (train.objective='reward') or a *ForSequenceClassification dir.")

  def _load(self):
    import flax.linen as nn
    import jax
    from llmjax import generate
    from llmjax.data.preference import PreferenceTokenizer
    from llmjax.models.transformer import Transformer
    from llmjax.train import reward
    hf = not os.path.exists(os.path.join(self.path, 'model_config.json'))
    device = jax.local_devices()[0]
    # Its own one-device mesh, whatever the trainer's: no logical rule places it.
    mesh = jax.make_mesh((1,), ('data',), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=[device])
    with jax.set_mesh(mesh), nn.logical_axis_rules(()):
      cfg, params, tokenizer = generate.load({'hf': self.path if hf else '',
                                              'workdir': '' if hf else self.path, 'peft': ''})
      params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    model = Transformer(cfg)
    apply = lambda p, x, **kw: model.apply({'params': p}, x, **kw)
    fn = jax.jit(lambda p, b: reward.sequence_rewards(p, b, apply, 1)[0][:, 0])
    self._loaded = (mesh, params, fn, PreferenceTokenizer(tokenizer), cfg.max_seq_len)

  def __call__(self, prompts, completions, **_) -> list[float]:
    import flax.linen as nn
    import jax
    if self._loaded is None:
      self._load()
    mesh, params, fn, tok, max_len = self._loaded
    rows = [tok.plain_with_eos(p, c)[-max_len:] for p, c in zip(prompts, completions)]
    out = []
    for i in range(0, len(rows), self.batch_size):
      chunk = rows[i:i + self.batch_size]
      t = min(-(-max(map(len, chunk)) // 64) * 64, max_len)
      n = self.batch_size
      inputs = np.zeros((n, t), np.int32)
      segments = np.zeros((n, t), np.int32)
      for j, r in enumerate(chunk):
        inputs[j, :len(r)], segments[j, :len(r)] = r, 1
      batch = {'inputs': inputs, 'segment_ids': segments,
               'positions': np.tile(np.arange(t, dtype=np.int32), (n, 1))}
      with jax.set_mesh(mesh), nn.logical_axis_rules(()):
        scores = np.asarray(jax.device_get(fn(params, batch)))
      out += [float(s) for s in scores[:len(chunk)]]
    return out
