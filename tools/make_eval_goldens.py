"""Builds tests/golden/eval_multiple_choice.json: multiple-choice log-likelihoods from
transformers, the lm-evaluation-harness way, for `llmjax.eval.multiple_choice` to match.

    /tmp/hf/bin/python tools/make_eval_goldens.py

Runs in a Python with torch + transformers (never the test suite's venv). On the test suite's
checkpoint tests/golden/llama_gqa_llama3 (byte-level BPE, so the tokens at the context /
continuation boundary matter), for each record and choice, independently of llmjax's code:
  1. lm-eval's `_encode_pair`: trailing spaces of the context move to the continuation;
     whole = encode(context + choice), context = encode(context), continuation =
     whole[len(context):]; an empty context is the prefix token alone and the choice is
     encoded by itself. BOS (the checkpoint's bos_token_id) starts every sequence
     (AutoTokenizer(add_special_tokens=False) plus an explicit BOS: this tokenizer adds none).
  2. lm-eval's `_loglikelihood_tokens`: the input is (context + continuation)[-(L + 1):][:-1]
     with L = max_position_embeddings (left truncation), one forward pass per row, and the
     log-likelihood is the sum of log_softmax (float32) at the continuation's targets.
The JSON holds the records, each choice's context / continuation ids and log-likelihood.
"""

import json
import os

import torch
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CKPT = os.path.join(ROOT, 'tests', 'golden', 'llama_gqa_llama3')
OUT = os.path.join(ROOT, 'tests', 'golden', 'eval_multiple_choice.json')

# The checkpoint's tokenizer knows lower-case letters and spaces only.
RECORDS = [
    {'context': 'the capital of france is', 'choices': [' paris', ' rome', ' a big city'],
     'answer': 0},
    # A trailing space in the context: it moves to the front of each continuation.
    {'context': 'the cat sat on the ', 'choices': ['mat', 'hat', 'warm windowsill'], 'answer': 0},
    # An empty context: the prefix token (BOS) alone conditions the choice.
    {'context': '', 'choices': ['hello world', 'zq'], 'answer': 0},
    # Longer than the 128-token context: lm-eval truncates the context from the left.
    {'context': ' '.join('the quick brown fox jumps over the lazy dog'.replace(' ', '') * 4),
     'choices': [' again', ' never'], 'answer': 1},
]


def encode_pair(tok, bos, context, continuation):
  n_spaces = len(context) - len(context.rstrip())
  if n_spaces > 0:
    continuation = context[-n_spaces:] + continuation
    context = context[:-n_spaces]
  encode = lambda s: tok(s, add_special_tokens=False)['input_ids']
  if context == '':
    return [bos], encode(continuation)
  whole = [bos] + encode(context + continuation)
  ctx = [bos] + encode(context)
  return ctx, whole[len(ctx):]


def main():
  tok = transformers.AutoTokenizer.from_pretrained(CKPT)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      CKPT, dtype=torch.float32, attn_implementation='eager').eval()
  bos = model.config.bos_token_id
  max_len = model.config.max_position_embeddings
  out = []
  for rec in RECORDS:
    choices = []
    for choice in rec['choices']:
      ctx, cont = encode_pair(tok, bos, rec['context'], choice)
      inp = (ctx + cont)[-(max_len + 1):][:-1]
      with torch.no_grad():
        logits = model(torch.tensor([inp])).logits[0].float()  # [len, vocab]
      logp = torch.log_softmax(logits, dim=-1)[-len(cont):]  # the continuation's positions
      ll = logp.gather(-1, torch.tensor(cont)[:, None])[:, 0].sum().item()
      choices.append({'context_ids': ctx, 'continuation_ids': cont, 'loglik': ll,
                      'truncated': len(ctx) + len(cont) - 1 > max_len})
    out.append(dict(rec, scored=choices))
  with open(OUT, 'w') as f:
    json.dump({'checkpoint': 'tests/golden/llama_gqa_llama3', 'torch': torch.__version__,
               'transformers': transformers.__version__, 'records': out}, f, indent=1)
  print(f'wrote {OUT}: {sum(len(r["choices"]) for r in out)} choices')


if __name__ == '__main__':
  main()
