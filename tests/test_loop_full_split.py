"""eval.full_split: the whole validation split in windows of seq_len, and eval_bits_per_char."""

import json
import math
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from llmjax import config as config_lib
from llmjax import main as main_lib
from llmjax import sharding
from llmjax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = ''.join(f"{w}: line {i} of the play, said {w.lower()}.\n"
               for i, w in enumerate(['ROMEO', 'JULIET', 'NURSE'] * 40))


def tiny_config(path, **train):
  c = config_lib.load_config(os.path.join(ROOT, 'experiments/shakespeare_char.py'))
  c.model.update(dict(num_layers=1, embed_dim=32, num_heads=2, num_kv_heads=2, head_dim=16,
                      mlp_dim=64))
  c.data.path = str(path)
  c.data.seq_len = 16
  c.train.update(dict(steps=4, batch_size=4, log_every=2, eval_every=4, checkpoint_every=4,
                      warmup_steps=1))
  c.train.update(train)
  return c


def test_full_split_eval_equals_numpy_over_nanogpt_windows(tmp_path):
  f = tmp_path / 'play.txt'
  f.write_text(TEXT)
  c = tiny_config(f)
  model_cfg, workdir = loop.setup_workdir(c, str(tmp_path / 'w'))
  mesh = sharding.make_mesh(c.mesh)
  rules = sharding.rules_from_config(c)
  data = loop.build_input(c, model_cfg, workdir)
  trainer = loop.make_trainer(c, model_cfg, mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    params = trainer.init(jax.random.key(1)).params
    out = loop.evaluate_full_split(trainer.eval_step, params, loop.full_split_batches(data),
                                   trainer.batch_sharding, data.tokenizer)
    # Independently: nanoGPT's fullval.py loop over the raw validation text, one window per
    # forward pass, log-softmax in float64.
    val = np.array(data.tokenizer.encode(TEXT[int(len(TEXT) * 0.9):]))
    T, nll, n = c.data.seq_len, 0.0, 0
    forward = jax.jit(lambda x: trainer.model.apply({'params': params}, x))
    for s in range(0, len(val) - 1, T):
      x, y = val[s:s + T], val[s + 1:s + T + 1]
      x = x[:len(y)]
      out_ = forward(x[None])
      logits = np.asarray(out_[0] if isinstance(out_, tuple) else out_, np.float64)[0]
      m = logits.max(-1, keepdims=True)
      logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
      nll -= logp[np.arange(len(y)), y].sum()
      n += len(y)
  assert n == len(val) - 1
  np.testing.assert_allclose(out['eval_loss'], nll / n, rtol=1e-5)
  np.testing.assert_allclose(out['eval_bits_per_char'], nll / n / math.log(2), rtol=1e-5)


@pytest.mark.slow  # ~10 s: the CLI end to end (compile, train, full eval, checkpoint)
def test_cli_run_logs_eval_bits_per_char(tmp_path):
  f = tmp_path / 'play.txt'
  f.write_text(TEXT)
  w = tmp_path / 'w'
  rc = main_lib.main([f'--config={ROOT}/experiments/shakespeare_char.py:steps=4,batch=4,seq_len=16',
                      f'--workdir={w}', f'--config.data.path={f}', '--config.model.num_layers=1',
                      '--config.model.embed_dim=32', '--config.model.mlp_dim=64',
                      '--config.model.num_heads=2', '--config.model.num_kv_heads=2',
                      '--config.model.head_dim=16'])
  assert rc == 0
  rows = [json.loads(l) for l in open(w / 'metrics.jsonl')]
  last = rows[-1]
  assert last['step'] == 4 and 'eval_loss' in last
  # A char tokenizer: one token per character, so bits per char is nats per token / ln 2.
  np.testing.assert_allclose(last['eval_bits_per_char'], last['eval_loss'] / math.log(2),
                             rtol=1e-6)
  assert sum('eval_loss' in r for r in rows) == 1  # only the final, whole-split eval
  assert (w / 'char_tokenizer.json').exists() and os.listdir(w / 'checkpoints') == ['4']
