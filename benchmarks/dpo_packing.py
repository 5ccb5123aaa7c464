"""What packing whole pairs into rows buys DPO: pairs and real tokens per second of the DPO
train step (policy + reference forward, policy backward) with one pair per row against
data.pairs_per_row > 1, on the built-in preference pairs, side by side in one run.

    python benchmarks/dpo_packing.py [--rows=16] [--steps=5] [--workdir=/tmp/dpo_packing]

One pair per row is what TRL, Tunix and MaxText batch for DPO: each row is as long as the
longest pair allowed (2 x max_length), so short pairs leave most of it padding. With
pairs_per_row=P the pipeline packs up to P whole pairs first-fit into the same row (segment ids
keep them apart), so the same compiled step carries more pairs. The model is the tiny
`experiments/dpo.py:tiny` one (random weights: speed does not depend on them); the tokenizer
is trained on the pairs into --workdir. Prints a Markdown table and one JSON line.
"""

import argparse
import json
import os
import time

import jax
import numpy as np

from llmjax import config as config_lib
from llmjax import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(workdir: str, seq_len: int, pairs_per_row: int, rows: int, steps: int) -> dict:
  from llmjax.train.loop import build_input, make_trainer
  c = config_lib.load_config(os.path.join(ROOT, 'experiments', 'dpo.py') + ':tiny')
  c.init.params_dir = ''  # random weights; the policy's initialisation is the reference
  c.data.vocab_size = c.model.vocab_size  # the tokenizer trained here, as the quickstart's
  c.data.seq_len, c.data.pairs_per_row = seq_len, pairs_per_row
  c.train.batch_size = rows
  model_cfg = config_lib.validate(c)
  mesh, rules = sharding.make_mesh(c.mesh), sharding.rules_from_config(c)
  data = build_input(c, model_cfg, workdir)
  trainer = make_trainer(c, model_cfg, mesh, rules)
  with jax.set_mesh(mesh):
    state = trainer.init(jax.random.key(0))
    ref = jax.tree.map(lambda x: x.copy(), state.params)
    it = data.train_iter
    batches = [jax.device_put(next(it), trainer.batch_sharding) for _ in range(steps + 2)]
    for b in batches[:2]:  # compile and warm up
      state, m = trainer.train_step(state, b, ref)
    jax.block_until_ready(m)
    began = time.perf_counter()
    for b in batches[2:]:
      state, m = trainer.train_step(state, b, ref)
    jax.block_until_ready(m)
    elapsed = time.perf_counter() - began
  timed = batches[2:]
  pairs = sum(float(np.sum(b['pair_mask'])) for b in timed)
  real = sum(int(np.sum(np.asarray(b['segment_ids']) > 0)) for b in timed)
  return {'seq_len': seq_len, 'pairs_per_row': pairs_per_row, 'rows': rows,
          'pairs_per_step': pairs / steps, 'real_fraction': real / (steps * rows * seq_len),
          'step_s': elapsed / steps, 'pairs_per_s': pairs / elapsed,
          'real_tokens_per_s': real / elapsed}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--rows', type=int, default=16)
  p.add_argument('--steps', type=int, default=5)
  p.add_argument('--workdir', default='/tmp/dpo_packing')
  a = p.parse_args()
  os.makedirs(a.workdir, exist_ok=True)
  # 128 = max_length 64 per sequence; the built-in pairs' sequences have ~10-30 tokens.
  layouts = [(128, 1), (128, 2), (128, 4), (256, 8)]
  results = [measure(a.workdir, s, k, a.rows, a.steps) for s, k in layouts]
  base = results[0]
  print('| seq_len | pairs/row | pairs/step | real tokens | step (s) | pairs/s | real tokens/s'
        ' | x one pair/row |')
  print('|---|---|---|---|---|---|---|---|')
  for r in results:
    print(f"| {r['seq_len']} | {r['pairs_per_row']} | {r['pairs_per_step']:.1f} |"
          f" {100 * r['real_fraction']:.0f}% | {r['step_s']:.3f} | {r['pairs_per_s']:.0f} |"
          f" {r['real_tokens_per_s']:.0f} | {r['pairs_per_s'] / base['pairs_per_s']:.2f} |")
  print(json.dumps({'rows': a.rows, 'results': results}))


if __name__ == '__main__':
  main()
