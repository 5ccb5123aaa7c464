"""Rollouts: sample `rl.num_generations` completions per prompt with the generation engine, on
the trainer's mesh and params (no weight copy, no second engine), and lay them out as a train
batch.

The engine (`llmjax.infer.engine.generate`) takes per-row sampling parameters and seeds: row r
of rollout batch k draws with seed fold(train.seed, k) and request id r, so a rollout batch is
the same whatever else runs, and a resumed run samples what the uninterrupted one did. It
returns each sampled token's log-prob under the model (temperature 1, before truncation), the
`sampler_logps` of `rl.sampler_is`.
"""

import dataclasses
from typing import Sequence

import numpy as np

from llmjax.infer import engine


@dataclasses.dataclass
class Rollout:
  """One rollout batch: N = prompts x num_generations completions, groups contiguous."""
  prompt_ids: list[list[int]]  # [N] each prompt's ids (repeated per generation)
  completion_ids: list[list[int]]  # [N] sampled ids, the stop token included when one ended it
  logprobs: list[list[float]]  # [N] the engine's log-prob of each completion id
  truncated: np.ndarray  # [N] bool: stopped by max_completion_length, not EOS
  texts: list[str]  # [N] decoded completions (without EOS)


def sample(model_cfg, params, prompts: Sequence[Sequence[int]], *, num_generations: int,
           sampling: engine.SamplingParams, eos_ids: tuple[int, ...], seed: int,
           decode) -> Rollout:
  """Samples num_generations completions of each prompt (ids, BOS included)."""
  rows = [list(p) for p in prompts for _ in range(num_generations)]
  out = engine.generate(model_cfg, params, rows, sampling, eos_id=eos_ids, seeds=seed,
                        request_ids=list(range(len(rows))), logprobs=0)
  ids, lps, truncated, texts = [], [], [], []
  for c in out:
    seq, lp = list(c.ids), list(c.logprobs or [])
    texts.append(decode(seq))
    if c.finish_reason == 'eos':
      # The EOS the model chose is part of the completion it is trained on (as TRL's
      # completion_mask), so it learns where to stop; its log-prob is not in `c.logprobs`.
      seq.append(eos_ids[0])
      lp.append(float('nan'))
    ids.append(seq)
    lps.append(lp)
    truncated.append(c.finish_reason == 'length')
  return Rollout(rows, ids, lps, np.asarray(truncated), texts)


def to_batch(rollout: Rollout, advantages: np.ndarray, seq_len: int) -> dict:
  """The train batch of a rollout: one prompt + completion per row, right-padded to seq_len.

    inputs/targets/positions/segment_ids [N, seq_len] int32, completion_mask [N, seq_len]
    float32 (1 where the target is a completion token), advantages [N, 1] float32,
    sampler_logps [N, seq_len] float32 (the engine's; NaN at an EOS, whose log-prob the
    engine does not return, so the correction leaves that token alone; 0 elsewhere).
  """
  n = len(rollout.prompt_ids)
  inputs = np.zeros((n, seq_len), np.int32)
  targets = np.zeros((n, seq_len), np.int32)
  segment = np.zeros((n, seq_len), np.int32)
  mask = np.zeros((n, seq_len), np.float32)
  sampler = np.zeros((n, seq_len), np.float32)
  for i, (p, c, lp) in enumerate(zip(rollout.prompt_ids, rollout.completion_ids, rollout.logprobs)):
    seq = p + c
    if len(seq) > seq_len + 1:  # checked when the prompts were loaded; a guard, not a path
      raise ValueError(f"row {i}: {len(seq)} tokens exceed data.seq_len + 1 = {seq_len + 1}.")
    t = len(seq) - 1
    inputs[i, :t] = seq[:-1]
    targets[i, :t] = seq[1:]
    segment[i, :t] = 1
    mask[i, len(p) - 1:t] = 1.0  # target j is seq[j + 1]: the completion starts at len(p) - 1
    sampler[i, len(p) - 1:len(p) - 1 + len(lp)] = np.asarray(lp, np.float32)
  positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (n, seq_len)).copy()
  return {'inputs': inputs, 'targets': targets, 'positions': positions, 'segment_ids': segment,
          'completion_mask': mask,
          # [N, 1]: batch arrays are at least [rows, positions] (the batch sharding's rank)
          'advantages': advantages.astype(np.float32)[:, None],
          'sampler_logps': sampler}
