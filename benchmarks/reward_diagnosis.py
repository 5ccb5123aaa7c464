"""Why the tiny reward model (`experiments/reward.py:tiny`) stays near chance on the built-in
facts pairs while the SFT model it starts from knows the facts: four measurements on the
frozen SFT model and, with --reward, on a trained reward run.

    python benchmarks/sft_tasks.py --root=/tmp/sft_bench            # the SFT model first
    python -m llmjax.main --config=experiments/reward.py:tiny,params_dir=/tmp/sft_bench/full \\
        --workdir=/tmp/reward_tiny
    python benchmarks/reward_diagnosis.py --sft=/tmp/sft_bench/full --reward=/tmp/reward_tiny

1. The SFT model's own preference: log p(chosen | prompt) > log p(rejected | prompt), the
   completion's summed token log-probs (what DPO's implicit reward is built on).
2. Logit lens at the prompt's last token (`A:`): the LM head (after the final norm) on each
   layer's output; how often its top token is the chosen answer's first token. The layer where
   the fact is retrieved, and so whether later positions (the EOS) can attend to it at all.
3. A linear Bradley-Terry probe on the frozen SFT model's final-norm state at the EOS (the score
   head's input): a logistic regression on h(chosen) - h(rejected), fit on the train pairs of
   all three tasks, accuracy per task. Whether the knowledge is linearly readable where the
   reward is read, before any trunk training.
4. (--reward) The reward run's trunk under the SFT model's LM head: the preference of 1. again,
   whether reward training erased the knowledge; and the reward model's accuracy per task and
   split (`llmjax.eval.harness.reward_task`).

Measured on 2 CPU cores (the commands above; arithmetic's train split cut to its first 2,000
pairs, 73 s): 1. facts 1.000 held out (arithmetic 0.995, strings 0.745); 2. the facts answer
is the top token from the first layer's output on (0.95, 0.95, 0.97, 0.99 after layers 0-3);
3. the probe reads facts at chance (0.61 train, 0.47 held out; arithmetic 0.64, strings 0.67
held out); 4. after 300 steps the trunk still prefers every held-out fact (1.000) but the
score at the EOS does not (facts train 0.60, held out 0.56; arithmetic 0.995). The fact is
there and visible to the EOS; the reward model has to learn to check the answer against it
from the facts pairs alone, 379 of the 10,768 train pairs.
"""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

TASKS = ('arithmetic', 'facts', 'strings')  # experiments/reward.py:tiny's data.builtin_tasks
MAX_ARITHMETIC = 2000  # of its 10,000 train pairs: enough for the probe, a tenth of the time


def pair_sequences(tok, pairs):
  """(chosen ids, rejected ids, prompt lengths) as the reward model reads them (TRL's
  tokenization, `trl_sequence_ids`: BOS + prompt + completion + EOS)."""
  from llmjax.eval.harness import trl_sequence_ids
  chosen = [trl_sequence_ids(tok, p['prompt'], p['chosen']) for p in pairs]
  rejected = [trl_sequence_ids(tok, p['prompt'], p['rejected']) for p in pairs]
  prompt_len = [len(trl_sequence_ids(tok, p['prompt'], '')) - 1 for p in pairs]  # less the EOS
  return chosen, rejected, prompt_len


def padded(seqs, length: int) -> np.ndarray:
  """Right-padded [N, length] int32 (a causal model's earlier positions ignore the padding)."""
  x = np.zeros((len(seqs), length), np.int32)
  for i, s in enumerate(seqs):
    x[i, :len(s)] = s
  return x


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--sft', default='/tmp/sft_bench/full', help='the SFT run (workdir)')
  p.add_argument('--reward', default='', help='a reward run from it (workdir), for 4.')
  args = p.parse_args()
  from llmjax.data import tasks
  from llmjax.data.pipeline import load_run_tokenizer
  from llmjax.eval.harness import reward_task
  from llmjax.models.transformer import Transformer
  from llmjax.train import checkpoint

  cfg = checkpoint.read_model_config(args.sft)
  sft, _ = checkpoint.restore_params(args.sft)
  tok = load_run_tokenizer(args.sft)
  model = Transformer(cfg)
  data = {}
  for name in TASKS:
    for split in tasks.SPLITS:
      pairs = tasks.preference_pairs(name, split)
      data[name, split] = pairs[:MAX_ARITHMETIC] if name == 'arithmetic' else pairs
  length = max(len(s) for v in data.values() for seqs in pair_sequences(tok, v)[:2] for s in seqs)

  @jax.jit
  def forward(params, x):
    """x [N, T] -> (log-probs [N, T, vocab], final-norm states [N, T, embed], per-layer block
    outputs at every position {layer_i: [N, T, embed]})."""
    (h, _), state = model.apply({'params': params}, x, return_hidden=True,
                                capture_intermediates=True)
    logits = jnp.einsum('NTD,DV->NTV', h, params['head']['kernel'])
    layers = {k: v['__call__'][0][0][0] for k, v in state['intermediates'].items()
              if k.startswith('layer_')}
    return jax.nn.log_softmax(logits.astype(jnp.float32), -1), h, layers

  def completion_logp(logp, seqs, prompt_len):
    """Summed log p of each sequence's completion tokens (EOS included)."""
    return np.array([sum(logp[i, t - 1, s[t]] for t in range(prompt_len[i], len(s)))
                     for i, s in enumerate(seqs)])

  def lm_preference(params):
    """{task/split: accuracy of log p(chosen) > log p(rejected)} under params' LM head."""
    out = {}
    for (name, split), pairs in data.items():
      c, r, pl = pair_sequences(tok, pairs)
      lc = completion_logp(np.asarray(forward(params, padded(c, length))[0]), c, pl)
      lr = completion_logp(np.asarray(forward(params, padded(r, length))[0]), r, pl)
      out[f'{name}/{split}'] = float(np.mean(lc > lr))
    return out

  results = {'sft_lm_preference': lm_preference(sft)}

  # 2. Logit lens on the held-out facts at the prompt's last token.
  c, _, pl = pair_sequences(tok, data['facts', 'heldout'])
  _, _, layers = forward(sft, padded(c, length))
  rows = np.arange(len(c))
  at = np.array(pl) - 1  # the prompt's last token, whose target is the answer's first token
  first = np.array([s[q] for s, q in zip(c, pl)])
  lens = {}
  for i in range(cfg.num_layers):
    h = model.apply({'params': sft}, np.asarray(layers[f'layer_{i}'])[rows, at],
                    method=lambda m, x: m.final_norm(x))
    top = np.asarray(jnp.einsum('ND,DV->NV', h, sft['head']['kernel'])).argmax(-1)
    lens[f'layer_{i}'] = float(np.mean(top == first))
  results['facts_heldout_logit_lens_top1'] = lens

  # 3. A linear Bradley-Terry probe on the frozen final-norm state at the EOS.
  feats = {}
  for key, pairs in data.items():
    c, r, _ = pair_sequences(tok, pairs)
    hc = np.asarray(forward(sft, padded(c, length))[1])[np.arange(len(c)), [len(s) - 1 for s in c]]
    hr = np.asarray(forward(sft, padded(r, length))[1])[np.arange(len(r)), [len(s) - 1 for s in r]]
    feats[key] = hc - hr  # [N, embed]: a linear score's margin is w . (h_c - h_r)
  x = np.concatenate([feats[n, 'train'] for n in TASKS])
  scale = x.std(0) + 1e-6
  xs = jnp.asarray(x / scale)
  loss = lambda w: -jnp.mean(jax.nn.log_sigmoid(xs @ w)) + 1e-3 * jnp.sum(w * w)
  grad = jax.jit(jax.grad(loss))
  w = jnp.zeros(x.shape[1])
  for _ in range(2000):  # plain gradient descent on a convex loss: no tuning to speak of
    w = w - 0.1 * grad(w)
  results['eos_linear_probe'] = {
      f'{n}/{s}': float(np.mean((feats[n, s] / scale) @ np.asarray(w) > 0)) for n, s in feats}

  if args.reward:
    rcfg = checkpoint.read_model_config(args.reward)
    rparams, step = checkpoint.restore_params(args.reward)
    grafted = {k: v for k, v in rparams.items() if k != 'score'} | {'head': sft['head']}
    results['reward_step'] = step
    results['reward_trunk_lm_preference'] = lm_preference(grafted)
    results['reward_accuracy'] = {f'{n}/{s}': reward_task(rcfg, rparams, tok, pairs)[0]['accuracy']
                                  for (n, s), pairs in data.items()}

  tables = [k for k in results if isinstance(results[k], dict) and 'facts/train' in results[k]]
  print('| task/split | ' + ' | '.join(tables) + ' |')
  print('|---' * (1 + len(tables)) + '|')
  for key in results['sft_lm_preference']:
    print(f'| {key} | ' + ' | '.join(f'{results[t][key]:.3f}' for t in tables) + ' |')
  print('facts held-out, logit lens at the prompt\'s last token (top-1 = the answer): ' + ', '.join(
      f'{k} {v:.2f}' for k, v in lens.items()))
  print(json.dumps(results))


if __name__ == '__main__':
  main()
