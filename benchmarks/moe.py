"""A tiny MoE against a dense model with the same active parameters, trained alike on CPU.

    python benchmarks/moe.py [steps=200]

Both run experiments/quickstart.py (the embedded generated corpus, its 1024-piece tokenizer,
batch 16 x 128 tokens, the same seed, data order and schedule) through the train loop, one
with model=tiny (a SwiGLU of width 704 per layer), one with model=tiny-moe (top-2 of 8 SwiGLU
experts of width 352: the same active feed-forward parameters plus an 8-way router, and 8x the
feed-forward parameters in all). Prints one JSON line per model: eval loss and perplexity at
the last step, train tokens/s (the last logged window, compiles excluded), parameters (total,
active) and, for the MoE, its router losses and the eval expert load (the fraction of routed
token copies per expert: 0.125 each when balanced) with its max/min ratio. A third run is
tiny-moe with model.moe_capacity_factor=1.25.

On CPU JAX lowers `jax.lax.ragged_dot` (the dropless experts) by masking the sorted tokens
once per expert (an [experts, tokens x k, embed] operand, experts-times the matmul FLOPs); on
TPU and GPU it is XLA's ragged-dot instruction. CPU tokens/s of the dropless run therefore
understate it; the capacity run's einsums cost what they compute.
"""

import json
import sys
import tempfile

from llmjax import config as config_lib
from llmjax.models.config import ModelConfig
from llmjax.train.loop import train_and_evaluate


def run(model: str, steps: int, **overrides) -> dict:
  config = config_lib.load_config(f'experiments/quickstart.py:model={model},steps={steps}')
  config.model.update(overrides)
  config.train.eval_every = steps
  config.train.checkpoint_every = steps
  config.sample.prompts = ()
  with tempfile.TemporaryDirectory() as workdir:
    m = train_and_evaluate(config, workdir)
  cfg = ModelConfig.from_dict(config.model)  # the run's: the quickstart's 1024-piece vocab
  out = {'model': model, **overrides, 'steps': steps, 'eval_loss': round(m['eval_loss'], 4),
         'eval_perplexity': round(m['eval_perplexity'], 3),
         'train_loss': round(m['loss'], 4), 'tokens_per_s': round(m['tokens_per_s'], 1),
         'params': cfg.num_params, 'active_params': cfg.num_active_params}
  if cfg.num_experts:
    load = [m[f'eval_expert_load/{e}'] for e in range(cfg.num_experts)]
    out.update(eval_moe_dropped=round(m['eval_moe_dropped'], 4), aux_loss=round(m['aux_loss'], 4), eval_aux_loss=round(m['eval_aux_loss'], 4),
               router_z_loss=round(m['router_z_loss'], 4),
               expert_load=[round(x, 4) for x in load],
               load_max_over_min=round(max(load) / max(min(load), 1e-9), 3))
  return out


if __name__ == '__main__':
  steps = 200
  for arg in sys.argv[1:]:
    if arg.startswith('steps='):
      steps = int(arg.split('=', 1)[1])
  # The capacity run: fixed [experts, capacity, embed] shapes, the copies past 1.25x an even
  # share dropped.
  for model, overrides in (('tiny', {}), ('tiny-moe', {}),
                           ('tiny-moe', {'moe_capacity_factor': 1.25})):
    print(json.dumps(run(model, steps, **overrides)), flush=True)
