"""Train-step throughput on the benchmark shapes (the same as the Hugging Face peer's).

    python benchmarks/train.py tiny [bf16]     # or small
Prints one JSON line: step time, tokens/s, model TFLOP/s (PaLM formula, as the peer script).
The peer: python ../shared/bench/peer_hf.py train tiny (PyTorch transformers, CPU).
"""

import json
import sys
import time

import jax
import numpy as np

from llmjax import config as config_lib
from llmjax import sharding
from llmjax.models.config import ModelConfig
from llmjax.train.loop import make_trainer

# seq and batch of each size, as in the peer (shared/bench/peer_hf.py SIZES).
SHAPES = {'tiny': (256, 8), 'small': (512, 4)}


def main(size: str, bf16: bool, steps: int = 6):
  seq, batch = SHAPES[size]
  c = config_lib.base_config(size, dtype='bfloat16' if bf16 else 'float32')
  c.train.batch_size = batch
  c.train.steps = 1000
  cfg = ModelConfig.from_dict(c.model)
  tr = make_trainer(c, cfg, sharding.make_mesh(c.mesh), sharding.rules_from_config(c))
  state = tr.init(jax.random.key(0))
  rng = np.random.default_rng(0)
  x = rng.integers(0, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
  b = {'inputs': x[:, :-1], 'targets': x[:, 1:], 'segment_ids': np.ones((batch, seq), np.int32),
       'positions': np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)),
       'loss_mask': np.ones((batch, seq), np.float32)}
  b = jax.device_put(b, tr.batch_sharding)
  for _ in range(2):  # compile + warm up
    state, m = tr.train_step(state, b)
  jax.block_until_ready(m)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, m = tr.train_step(state, b)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  t = sorted(times)[len(times) // 2]
  tok = batch * seq
  print(json.dumps({'impl': 'llmjax', 'job': 'train', 'size': size,
                    'precision': 'bf16' if bf16 else 'fp32', 'params': cfg.num_params,
                    'step_s': round(t, 4), 'tokens_per_s': round(tok / t, 1),
                    'model_tflops_per_s': round(cfg.flops_per_token(seq) * tok / t / 1e12, 4),
                    'device': jax.devices()[0].device_kind}))


if __name__ == '__main__':
  main(sys.argv[1] if len(sys.argv) > 1 else 'tiny', 'bf16' in sys.argv[2:])
