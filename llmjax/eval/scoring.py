"""Pure scoring functions of the evaluation harness: no model, no JAX.

Conventions (shared by the CLI and the train loop):
  * exact match compares texts after stripping surrounding whitespace.
  * a multiple-choice continuation is tokenized the lm-evaluation-harness way
    (`lm_eval.api.model.TemplateLM._encode_pair`): trailing spaces of the context move to the
    front of the continuation, whole = encode(context + continuation), and the continuation's
    tokens are whole[len(encode(context)):]. The context starts with BOS where the tokenizer
    has one (else EOS, lm-eval's `prefix_token_id`), so an empty context is just that token.
  * perplexity scores each document as [BOS] + encode(text): every text token is predicted
    (the first one from BOS alone). A tokenizer without BOS scores the text from its second
    token on. Long documents are cut into lm-eval's rolling windows (`rolling_windows`).
"""

import math
from typing import Sequence


def exact_match(generated: str, target: str) -> bool:
  """True when the texts agree after stripping surrounding whitespace."""
  return generated.strip() == target.strip()


def prefix_ids(tokenizer) -> list[int]:
  """The token every scored sequence starts with: [BOS], else [EOS] (lm-eval's
  prefix_token_id), else [] (a tokenizer with neither)."""
  for i in (getattr(tokenizer, 'bos_id', -1), getattr(tokenizer, 'eos_id', -1)):
    if i is not None and i >= 0:
      return [int(i)]
  return []


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
  """(context ids with the prefix token, continuation ids), as lm-evaluation-harness encodes.

  Encoding context + continuation together keeps the tokens a tokenizer merges across the
  boundary (e.g. byte-level BPE's ' Paris' after 'is') identical to what the model saw in
  training; moving the context's trailing spaces to the continuation stops a dangling ' '
  token from ending the context.
  """
  n_spaces = len(context) - len(context.rstrip())
  if n_spaces:
    context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
  prefix = prefix_ids(tokenizer)
  context_ids = prefix + tokenizer.encode(context) if context else prefix
  whole = prefix + tokenizer.encode(context + continuation)
  if not context:  # lm-eval: the prefix token, then the continuation encoded alone
    return context_ids, tokenizer.encode(continuation)
  return context_ids, whole[len(context_ids):]


def choice_metrics(logliks: Sequence[float], choices: Sequence[str], answer: int) -> dict:
  """Per-record scores: `acc` (argmax of the log-likelihood) and `acc_norm` (argmax of the
  log-likelihood per UTF-8 byte of the choice, lm-eval's acc_norm); ties go to the first."""
  pred = max(range(len(logliks)), key=lambda i: logliks[i])
  per_byte = [ll / max(len(c.encode('utf-8')), 1) for ll, c in zip(logliks, choices)]
  pred_norm = max(range(len(per_byte)), key=lambda i: per_byte[i])
  return {'pred': pred, 'pred_norm': pred_norm, 'acc': float(pred == answer),
          'acc_norm': float(pred_norm == answer)}


def rolling_windows(ids: Sequence[int], n_prefix: int, window: int
                    ) -> list[tuple[list[int], list[int], int]]:
  """lm-eval's rolling windows (`get_rolling_token_windows` with context_len=1) over one
  document, as (inputs, targets, n_scored) rows of at most `window` tokens.

  ids: the document with its prefix (BOS) tokens; the first `n_prefix` are never scored.
  Each window's targets are the inputs shifted by one; only its last n_scored targets count,
  so every token is scored exactly once, each with as much left context as fits the window.
  """
  ids = list(ids)
  out = []
  start = max(n_prefix, 1)  # the first scored position (position 0 has no context)
  while start < len(ids):
    end = min(start + window, len(ids))  # score targets ids[start:end]
    lo = max(end - 1 - window, 0)  # inputs ids[lo:end-1], at most `window` of them
    out.append((ids[lo:end - 1], ids[lo + 1:end], end - start))
    start = end
  return out


def perplexity_metrics(nll: float, tokens: int, nbytes: int) -> dict:
  """Corpus perplexity (per token) and bits per UTF-8 byte from the summed negative
  log-likelihood (nats): bits_per_byte = nll / (ln 2 * bytes), comparable across tokenizers."""
  return {'perplexity': math.exp(nll / tokens) if tokens else float('nan'),
          'bits_per_byte': nll / (math.log(2) * nbytes) if nbytes else float('nan'),
          'tokens': tokens, 'bytes': nbytes}
