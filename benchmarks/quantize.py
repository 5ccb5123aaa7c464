"""Weight-only quantization (`python -m llmjax.quantize`): perplexity, weight bytes, decode speed.

    python benchmarks/quantize.py --workdir=/tmp/quickstart          # the quickstart model
    python benchmarks/quantize.py --hf=HF_DIR --data=wiki.txt         # a Hugging Face checkpoint

For the float model and each method (int8; int4 at --int4_groups; nf4 at group 64) the source is
quantized into a temporary workdir with `llmjax.quantize.quantize_workdir`, loaded back as
`generate` / `eval` load it (`generate.load`), and measured:
  perplexity   `llmjax.eval`'s (harness.perplexity) on --data (a text or {"text"} .jsonl file),
               default the first --docs documents of the embedded corpus' validation split
               (the quickstart model's held-out data); delta = perplexity / float's - 1.
  weight_bytes every array of the params (embedding, norms and head included, as stored);
               proj_bytes: the quantized projections' leaves alone.
  decode tok/s greedy, 64-token random prompts, --new_tokens new tokens, batch 1 and 8 (as
               benchmarks/generate.py: second call timed, compile excluded), KV cache.
Prints one JSON line per row and a Markdown table. Targets (issue 15): int8 perplexity within
1% of float, int4 within 5%.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import jax
import numpy as np
from flax import traverse_util

from llmjax import generate, quantize
from llmjax.eval import harness, records
from llmjax.infer import sampler
from llmjax.models import layers


def _texts(data: str, docs: int) -> list[str]:
  if data:
    return records.perplexity_texts(data)
  from llmjax.data.corpus import default_corpus
  return default_corpus('validation')[:docs]


def _proj_bytes(params) -> int:
  flat = traverse_util.flatten_dict(params)
  return sum(int(v.size) * v.dtype.itemsize for p, v in flat.items()
             if p[-1] in layers.QUANT_LEAVES or (p[-1] == 'kernel' and p[0] != 'head'
                                                 and 'score' not in p))


def _decode_tps(cfg, params, new_tokens: int) -> dict:
  rng = np.random.default_rng(0)
  out = {}
  for b in (1, 8):
    prompts = rng.integers(0, cfg.vocab_size, (b, 64)).tolist()
    sp = sampler.SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    sampler.generate(cfg, params, prompts, sp, eos_id=-1)  # compile
    t = time.perf_counter()
    sampler.generate(cfg, params, prompts, sp, eos_id=-1)
    out[f'decode_tok_s_b{b}'] = round(b * new_tokens / (time.perf_counter() - t), 1)
  return out


def measure(workdir: str, texts, new_tokens: int, batch_size: int) -> dict:
  cfg, params, tokenizer = generate.load({'workdir': workdir, 'hf': '', 'peft': ''})
  metrics, _ = harness.perplexity(cfg, params, tokenizer, texts, batch_size=batch_size)
  return {'perplexity': metrics['perplexity'], 'bits_per_byte': metrics['bits_per_byte'],
          'weight_bytes': quantize.weight_bytes(params), 'proj_bytes': _proj_bytes(params),
          **_decode_tps(cfg, params, new_tokens)}


def run(workdir: str, label: str, args) -> list[dict]:
  texts = _texts(args.data, args.docs)
  rows = [{'model': label, 'method': 'float', **measure(workdir, texts, args.new_tokens,
                                                        args.batch_size)}]
  methods = [('int8', None)] + [('int4', int(g)) for g in args.int4_groups.split(',') if g]
  methods += [('nf4', 64)]
  with tempfile.TemporaryDirectory() as tmp:
    for method, group in methods:
      dst = os.path.join(tmp, f'{method}_{group}')
      try:
        quantize.quantize_workdir(workdir, dst, method, group)
      except Exception as e:  # e.g. a group size that does not divide a projection
        rows.append({'model': label, 'method': method, 'group': group,
                     'error': str(e).splitlines()[0]})
        print(json.dumps(rows[-1]), flush=True)
        continue
      rows.append({'model': label, 'method': method, 'group': group,
                   **measure(dst, texts, args.new_tokens, args.batch_size)})
      print(json.dumps(rows[-1]), flush=True)
  base = rows[0]['perplexity']
  for r in rows:
    if 'perplexity' in r:
      r['delta'] = r['perplexity'] / base - 1
  return rows


def table(rows: list[dict]) -> str:
  lines = ['| model | method | group | perplexity | delta vs float | weight bytes | projection'
           ' bytes | decode tok/s b=1 | b=8 |',
           '|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    if 'error' in r:
      lines.append(f"| {r['model']} | {r['method']} | {r.get('group') or ''} | {r['error']} |"
                   " | | | | |")
      continue
    lines.append(f"| {r['model']} | {r['method']} | {r.get('group') or ''} |"
                 f" {r['perplexity']:.4f} | {100 * r['delta']:+.2f}% | {r['weight_bytes']:,} |"
                 f" {r['proj_bytes']:,} | {r['decode_tok_s_b1']:.0f} |"
                 f" {r['decode_tok_s_b8']:.0f} |")
  return '\n'.join(lines)


def main(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--workdir', default='', help='an llmjax workdir (e.g. the quickstart run)')
  p.add_argument('--hf', default='', help='a Hugging Face checkpoint dir (converted first)')
  p.add_argument('--data', default='', help="perplexity data; '': the embedded validation split")
  p.add_argument('--docs', type=int, default=200, help='documents of the embedded split')
  p.add_argument('--int4_groups', default='128,64,32', help='int4 group sizes to measure')
  p.add_argument('--new_tokens', type=int, default=64)
  p.add_argument('--batch_size', type=int, default=16)
  args = p.parse_args(argv)
  if not args.workdir and not args.hf:
    p.error('pass --workdir=DIR and/or --hf=HF_DIR')
  rows = []
  if args.workdir:
    rows += run(args.workdir, os.path.basename(os.path.normpath(args.workdir)), args)
  if args.hf:
    from llmjax import convert
    with tempfile.TemporaryDirectory() as tmp:
      src = os.path.join(tmp, 'float')
      convert.from_hf(args.hf, src)
      rows += run(src, os.path.basename(os.path.normpath(args.hf)), args)
  print(table(rows))
  print(json.dumps({'device': jax.devices()[0].device_kind, 'rows': rows}))


if __name__ == '__main__':
  main(sys.argv[1:])
