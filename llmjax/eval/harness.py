"""The evaluation tasks over a model: generate (exact match), multiple choice (log-likelihood,
acc, acc_norm), perplexity (per token, bits per byte) and, for a reward model (model.head=
'score'), reward (preference accuracy, mean margin).

Each task is `task(cfg, params, tokenizer, records, ...) -> (metrics, per_record)`, the same
call from `python -m llmjax.eval` and from the train loop; `per_record` holds everything needed
to check a metric by hand. Log-likelihoods come from one jitted forward pass over a batch of
right-padded rows (`score_rows`), summed in float32 over each row's scored targets.
"""

import functools
import logging
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.errors import DataError
from llmjax.eval import scoring
from llmjax.models.config import ModelConfig
from llmjax.models.transformer import Transformer
from llmjax.train import losses

log = logging.getLogger(__name__)

# A row is (inputs, targets, n_scored): targets = inputs shifted by one; the last n_scored
# targets are summed.
Row = tuple[Sequence[int], Sequence[int], int]


def _bucket(n: int, cap: int) -> int:
  """Padded row length: the next power of two >= 16, so a few programs serve every length."""
  return min(max(16, 1 << (max(n, 1) - 1).bit_length()), cap)


@functools.partial(jax.jit, static_argnames=('cfg',))
def _row_logliks(params, inputs, targets, segment_ids, positions, weights, *, cfg: ModelConfig):
  """[batch, length] int32 rows -> [batch] float32: the sum of each row's weighted target
  log-probs."""
  apply_fn = lambda p, x, **kw: Transformer(cfg).apply({'params': p}, x, **kw)
  batch = {'inputs': inputs, 'targets': targets, 'segment_ids': segment_ids,
           'positions': positions}
  lp = losses.token_logprobs(params, batch, apply_fn)  # [batch, length] float32
  return jnp.sum(lp * weights, axis=-1)


def score_rows(cfg: ModelConfig, params, rows: Sequence[Row], *, batch_size: int = 32,
               progress: Callable[[int, int], None] | None = None) -> list[float]:
  """The summed log-prob of each row's last n_scored targets (float32 sums), batch_size rows
  per forward pass, rows sorted by length so each batch pads to a short bucket."""
  if any(len(i) > cfg.max_seq_len for i, _, _ in rows):
    raise ValueError(f"score_rows: a row is longer than the model context {cfg.max_seq_len}.")
  order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
  out = [0.0] * len(rows)
  n_batches = -(-len(rows) // batch_size)
  for b in range(n_batches):
    idx = order[b * batch_size:(b + 1) * batch_size]
    t = _bucket(max(len(rows[i][0]) for i in idx), cfg.max_seq_len)
    # Every batch has batch_size rows (empty ones are padding), so one program per bucket.
    inputs = np.zeros((batch_size, t), np.int32)
    targets = np.zeros((batch_size, t), np.int32)
    segment_ids = np.zeros((batch_size, t), np.int32)  # 0: padding, attends only to padding
    weights = np.zeros((batch_size, t), np.float32)
    lengths = np.ones((batch_size,), np.int32)
    for r, i in enumerate(idx):
      x, y, n = rows[i]
      inputs[r, :len(x)], targets[r, :len(y)] = x, y
      segment_ids[r, :len(x)] = 1
      weights[r, len(x) - n:len(x)] = 1.0
      lengths[r] = len(x)
    # Padding repeats a row's last position, so its largest position is its own length - 1
    # (dynamic RoPE sizes its base by it, as transformers does on the unpadded row).
    positions = np.minimum(np.arange(t)[None, :], (lengths - 1)[:, None]).astype(np.int32)
    sums = np.asarray(_row_logliks(params, inputs, targets, segment_ids, positions, weights,
                                   cfg=cfg))
    for r, i in enumerate(idx):
      out[i] = float(sums[r])
    if progress:
      progress(b + 1, n_batches)
  return out


# ------------------------------------------------------------------------------ tasks

def multiple_choice(cfg: ModelConfig, params, tokenizer, records: Sequence[dict], *,
                    batch_size: int = 32, progress=None) -> tuple[dict, list[dict]]:
  """records {'context', 'choices', 'answer'} -> ({'acc', 'acc_norm'}, per record).

  Each choice's log-likelihood is the float32 sum of log p(continuation token | everything
  before it), tokenized as `scoring.encode_pair`. A row longer than the model's context keeps
  its last max_seq_len + 1 tokens (lm-eval's left truncation of the context), with a warning.
  """
  rows, owners, truncated = [], [], 0
  for k, rec in enumerate(records):
    for c, choice in enumerate(rec['choices']):
      ctx, cont = scoring.encode_pair(tokenizer, rec['context'], choice)
      if not ctx:
        raise DataError(f"record {k}: the context is empty and the tokenizer has no BOS or EOS"
                        " token to condition the choices on; give a non-empty context.")
      if not cont:
        raise DataError(f"record {k}: choice {c} ({choice!r}) encodes to no tokens after the"
                        " context; every choice needs at least one token.")
      if len(cont) > cfg.max_seq_len:
        raise DataError(f"record {k}: choice {c} is {len(cont)} tokens, more than the model"
                        f" context {cfg.max_seq_len}; it cannot be scored.")
      whole = ctx + cont
      if len(whole) - 1 > cfg.max_seq_len:
        whole = whole[-(cfg.max_seq_len + 1):]
        truncated += 1
      rows.append((whole[:-1], whole[1:], len(cont)))
      owners.append((k, c))
  if truncated:
    log.warning("multiple_choice: %d of %d (context, choice) pairs are longer than the model"
                " context %d: their contexts were truncated from the left.", truncated,
                len(rows), cfg.max_seq_len)
  logliks = score_rows(cfg, params, rows, batch_size=batch_size, progress=progress)
  per = [[] for _ in records]
  for (k, _), ll in zip(owners, logliks):
    per[k].append(ll)
  out = []
  for rec, ll in zip(records, per):
    m = scoring.choice_metrics(ll, rec['choices'], rec['answer'])
    out.append({'context': rec['context'], 'choices': rec['choices'], 'target': rec['answer'],
                'logliks': ll, 'pred': m['pred'], 'pred_norm': m['pred_norm'],
                'correct': bool(m['acc']), 'correct_norm': bool(m['acc_norm'])})
  n = max(len(out), 1)
  metrics = {'acc': sum(r['correct'] for r in out) / n,
             'acc_norm': sum(r['correct_norm'] for r in out) / n}
  return metrics, out


def perplexity(cfg: ModelConfig, params, tokenizer, texts: Sequence[str], *,
               batch_size: int = 32, progress=None) -> tuple[dict, list[dict]]:
  """Documents -> ({'perplexity', 'bits_per_byte', 'tokens', 'bytes'}, per document).

  Each document is [BOS] + encode(text) (the convention in `scoring`'s docstring), cut into rolling
  windows of the model's context; perplexity = exp(nll / scored tokens) and bits_per_byte =
  nll / (ln 2 * UTF-8 bytes of the texts), both over the whole corpus.
  """
  bos = [tokenizer.bos_id] if getattr(tokenizer, 'bos_id', -1) >= 0 else []
  rows, owners = [], []
  for k, text in enumerate(texts):
    ids = bos + tokenizer.encode(text)
    for row in scoring.rolling_windows(ids, len(bos), cfg.max_seq_len):
      rows.append(row)
      owners.append(k)
  sums = score_rows(cfg, params, rows, batch_size=batch_size, progress=progress)
  out = [{'text': t, 'loglik': 0.0, 'tokens': 0, 'bytes': len(t.encode('utf-8'))}
         for t in texts]
  for k, row, ll in zip(owners, rows, sums):
    out[k]['loglik'] += ll
    out[k]['tokens'] += row[2]
  for r in out:
    r['perplexity'] = scoring.perplexity_metrics(-r['loglik'], r['tokens'], r['bytes'])['perplexity']
  metrics = scoring.perplexity_metrics(-sum(r['loglik'] for r in out),
                                       sum(r['tokens'] for r in out),
                                       sum(r['bytes'] for r in out))
  return metrics, out


def eos_ids(tokenizer) -> tuple[int, ...]:
  """Every stop id of the checkpoint (generation_config for HF tokenizers), else EOS."""
  return tuple(getattr(tokenizer, 'eos_ids', None) or [getattr(tokenizer, 'eos_id', -1)])


def prompt_ids(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
  """Plain-text prompts as ids, BOS first where the tokenizer has one (as llmjax.generate)."""
  bos = [tokenizer.bos_id] if getattr(tokenizer, 'bos_id', -1) >= 0 else []
  return [bos + tokenizer.encode(p) for p in prompts]


def generate_task(cfg: ModelConfig, params, tokenizer, records: Sequence[dict], *,
                  max_new_tokens: int = 32, stop: Sequence[str] = (),
                  prompts: Sequence[Sequence[int]] | None = None, batch_size: int = 32,
                  progress=None) -> tuple[dict, list[dict]]:
  """records {'prompt', 'target'} -> ({'exact_match'}, per record): greedy answers (KV cache,
  stopped at EOS, cut before the first `stop` string) compared with `scoring.exact_match`.

  prompts: the prompts' ids (e.g. rendered with a chat template); default `prompt_ids`.
  """
  from llmjax.infer import sampler
  ids = list(prompts) if prompts is not None else prompt_ids(tokenizer,
                                                             [r['prompt'] for r in records])
  sp = sampler.SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
  order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths share a batch
  generated = [''] * len(ids)
  n_batches = -(-len(ids) // batch_size)
  for b in range(n_batches):
    idx = order[b * batch_size:(b + 1) * batch_size]
    outs = sampler.generate(cfg, params, [list(ids[i]) for i in idx], sp, eos_id=eos_ids(tokenizer))
    for i, out in zip(idx, outs):
      generated[i] = sampler.cut_at_stop(tokenizer.decode(out), list(stop))
    if progress:
      progress(b + 1, n_batches)
  out = [{'prompt': r['prompt'], 'target': r['target'], 'generated': g,
          'correct': scoring.exact_match(g, r['target'])} for r, g in zip(records, generated)]
  return {'exact_match': sum(r['correct'] for r in out) / max(len(out), 1)}, out


# ------------------------------------------------------------------------------ reward


def trl_sequence_ids(tokenizer, prompt: str, completion: str) -> list[int]:
  """prompt + completion as TRL's RewardTrainer tokenizes plain text: the EOS token's text
  appended unless the completion ends with it, then the whole string encoded with the
  tokenizer's special tokens (a BOS where its post-processor adds one). A sentencepiece
  tokenizer (no post-processor): [BOS] + encode(text) + [EOS]."""
  eos = tokenizer.eos_id
  if hasattr(tokenizer, 'tok'):  # an HF tokenizer.json: exactly TRL's call
    eos_text = tokenizer.special_text(eos) if eos >= 0 else ''
    if eos_text and not completion.endswith(eos_text):
      completion = completion + eos_text
    return tokenizer.tok.encode(prompt + completion, add_special_tokens=True).ids
  bos = [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []
  return bos + tokenizer.encode(prompt + completion) + ([eos] if eos >= 0 else [])


@functools.partial(jax.jit, static_argnames=('cfg', 'pad_id'))
def _rewards(params, inputs, segment_ids, positions, *, cfg: ModelConfig, pad_id: int):
  from llmjax.train import reward
  apply_fn = lambda p, x, **kw: Transformer(cfg).apply({'params': p}, x, **kw)
  batch = {'inputs': inputs, 'segment_ids': segment_ids, 'positions': positions}
  return reward.sequence_rewards(params, batch, apply_fn, 1, pad_id)[0][:, 0]  # [batch]


def sequence_rewards(cfg: ModelConfig, params, sequences: Sequence[Sequence[int]], *,
                     pad_id: int = -1, batch_size: int = 32, progress=None) -> list[float]:
  """The reward of each token sequence (one right-padded row each), read as in
  `llmjax.train.reward.reward_positions`."""
  order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
  out = [0.0] * len(sequences)
  n_batches = -(-len(sequences) // batch_size)
  for b in range(n_batches):
    idx = order[b * batch_size:(b + 1) * batch_size]
    t = _bucket(max(len(sequences[i]) for i in idx), cfg.max_seq_len)
    inputs = np.zeros((batch_size, t), np.int32)
    segment_ids = np.zeros((batch_size, t), np.int32)
    positions = np.zeros((batch_size, t), np.int32)
    for r, i in enumerate(idx):
      x = sequences[i]
      inputs[r, :len(x)], segment_ids[r, :len(x)], positions[r, :len(x)] = x, 1, np.arange(len(x))
    got = np.asarray(_rewards(params, inputs, segment_ids, positions, cfg=cfg, pad_id=pad_id))
    for r, i in enumerate(idx):
      out[i] = float(got[r])
    if progress:
      progress(b + 1, n_batches)
  return out


def reward_task(cfg: ModelConfig, params, tokenizer, records: Sequence[dict], *,
                pad_id: int = -1, batch_size: int = 32, progress=None) -> tuple[dict, list[dict]]:
  """records {'prompt', 'chosen', 'rejected'} -> ({'accuracy', 'margin', 'mean_reward'}, per
  record {..., 'reward_chosen', 'reward_rejected', 'correct'}): the reward model's preference
  accuracy (r_chosen > r_rejected) and mean margin r_chosen - r_rejected, as TRL's
  RewardTrainer names them. Sequences are tokenized by `trl_sequence_ids`."""
  if cfg.head != 'score':
    raise DataError("--task=reward needs a reward model (model.head='score', e.g. a"
                    " *ForSequenceClassification checkpoint); this model has an LM head.")
  seqs = []
  for k, rec in enumerate(records):
    for side in ('chosen', 'rejected'):
      ids = trl_sequence_ids(tokenizer, rec['prompt'], rec[side])
      if len(ids) > cfg.max_seq_len:
        raise DataError(f"record {k}: prompt + {side} is {len(ids)} tokens, more than the model"
                        f" context {cfg.max_seq_len}; it cannot be scored.")
      seqs.append(ids)
  rewards = sequence_rewards(cfg, params, seqs, pad_id=pad_id, batch_size=batch_size,
                             progress=progress)
  out = []
  for k, rec in enumerate(records):
    c, r = rewards[2 * k], rewards[2 * k + 1]
    out.append({**rec, 'reward_chosen': c, 'reward_rejected': r, 'correct': c > r})
  n = max(len(out), 1)
  metrics = {'accuracy': sum(r['correct'] for r in out) / n,
             'margin': sum(r['reward_chosen'] - r['reward_rejected'] for r in out) / n,
             'mean_reward': sum(rewards) / max(len(rewards), 1)}
  return metrics, out
