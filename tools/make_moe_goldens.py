"""Builds the Hugging Face mixture-of-experts goldens under tests/golden/ and checks llmjax's exports.

    /tmp/hf/bin/python tools/make_moe_goldens.py            # build goldens, then check exports
    /tmp/hf/bin/python tools/make_moe_goldens.py --check    # only check exports of existing goldens
    /tmp/hf/bin/python tools/make_moe_goldens.py --no-check # only build the goldens
    /tmp/hf/bin/python tools/make_moe_goldens.py --only=mixtral_window

The MoE counterpart of tools/make_hf_goldens.py, with the same files per golden (a
save_pretrained checkpoint, golden.npz with tokens [2, 16] and logits [2, 16, vocab], golden.json
with a 32-step greedy continuation), so tests/test_interop_hf.py picks them up like the dense
ones. The checkpoints are tiny (hidden 32, 4-8 experts) and hold the per-expert tensors
(`experts.{e}.*`) that transformers' save_pretrained writes.

Router weights are drawn 4x wider than the rest: with N(0, 0.1^2) the router's logits are so
close that float32 rounding could flip a top-k choice between torch and XLA; wide routers give
every token clear margins (printed as the smallest k-th vs (k+1)-th router probability gap).

--check imports each golden with llmjax, exports it back (`python -m llmjax.convert --from=hf`,
then `--to=hf`), checks that the export has exactly the source's tensor names, shapes and bytes,
loads it with transformers and compares logits with the golden's (max |diff| <= 1e-4).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch
import transformers
from safetensors import safe_open
from transformers import (MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM,
                          Qwen3MoeConfig, Qwen3MoeForCausalLM)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_hf_goldens as base  # noqa: E402  (same tokens, randomisation, greedy and layout)

COMMON = dict(vocab_size=base.VOCAB, hidden_size=32, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)

# name -> (model class, config). Each covers one or more features the importer must get right.
MODELS = {
    # Mixtral: every layer sparse, 4 experts top-2 (softmax over the top-k logits), sliding
    # window 8 < prompt (16) + continuation (32); the aux loss on (output_router_logits).
    'mixtral_window': (MixtralForCausalLM, lambda: MixtralConfig(
        **COMMON, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=8, output_router_logits=True, router_aux_loss_coef=0.02)),
    # Qwen2-MoE: q/k/v biases, top-2 of 4 without renormalisation, a shared expert with its
    # sigmoid gate on every layer.
    'qwen2_moe_shared': (Qwen2MoeForCausalLM, lambda: Qwen2MoeConfig(
        **COMMON, intermediate_size=64, moe_intermediate_size=24,
        shared_expert_intermediate_size=40, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=False, use_sliding_window=False)),
    # Qwen2-MoE with dense layers between sparse ones (decoder_sparse_step=2: layers 1 and 3
    # sparse), 8 experts top-3 renormalised: the [dense, moe] period scanned twice.
    'qwen2_moe_sparse_step': (Qwen2MoeForCausalLM, lambda: Qwen2MoeConfig(
        **dict(COMMON, num_hidden_layers=4), intermediate_size=64, moe_intermediate_size=16,
        shared_expert_intermediate_size=24, num_experts=8, num_experts_per_tok=3,
        norm_topk_prob=True, decoder_sparse_step=2, use_sliding_window=False)),
    # Qwen3-MoE: q/k RMSNorms, head_dim 16 != hidden / heads, 8 experts top-2 renormalised,
    # layer 1 dense (mlp_only_layers): three scan groups [moe], [dense], [moe].
    'qwen3_moe_mlp_only': (Qwen3MoeForCausalLM, lambda: Qwen3MoeConfig(
        **dict(COMMON, num_hidden_layers=3), head_dim=16, intermediate_size=64,
        moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
        mlp_only_layers=[1])),
}
ROUTER_SCALE = 4.0


def randomize(model, seed: int) -> None:
  base.randomize(model, seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('mlp.gate.weight'):  # the router (in memory; block_sparse_moe on disk)
        p.mul_(ROUTER_SCALE)


def router_margin(model, ids: np.ndarray) -> float:
  """The smallest gap between the k-th and (k+1)-th router probability over all tokens and
  MoE layers: how far each top-k choice is from flipping."""
  gaps = []
  k = model.config.num_experts_per_tok

  def hook(module, inputs, output):
    x = inputs[0].reshape(-1, inputs[0].shape[-1])
    probs = torch.softmax(x.float() @ module.weight.float().T, dim=-1)
    top = torch.topk(probs, k + 1, dim=-1).values
    gaps.append(float(torch.min(top[:, k - 1] - top[:, k])))

  handles = [m.register_forward_hook(hook) for n, m in model.named_modules()
             if n.endswith('mlp.gate')]
  base.logits_of(model, ids)
  for h in handles:
    h.remove()
  return min(gaps)


def build(name: str, seed: int) -> None:
  cls, make_config = MODELS[name]
  config = make_config()
  config._attn_implementation = 'eager'
  torch.manual_seed(seed)
  model = cls(config).eval()
  randomize(model, seed)
  out = os.path.join(base.GOLDEN, name)
  shutil.rmtree(out, ignore_errors=True)
  model.save_pretrained(out)
  ids = base.tokens(seed)
  logits = base.logits_of(model, ids)
  gen = base.greedy(model, ids)
  np.savez(os.path.join(out, 'golden.npz'), tokens=ids, logits=logits)
  with open(os.path.join(out, 'golden.json'), 'w') as f:
    json.dump({'prompt': ids.tolist(), 'generated': gen}, f)
  top2 = np.sort(logits, axis=-1)[..., -2:]
  size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)) // 1024
  print(f'{name}: saved ({size} KB), min top-2 logit gap'
        f' {float(np.min(top2[..., 1] - top2[..., 0])):.2e}, min router k/k+1 gap'
        f' {router_margin(model, ids):.2e}')


def tensors(d: str) -> dict[str, np.ndarray]:
  out = {}
  for f in sorted(os.listdir(d)):
    if f.endswith('.safetensors'):
      with safe_open(os.path.join(d, f), 'np') as st:
        out.update({k: st.get_tensor(k) for k in st.keys()})
  return out


def check_export(name: str) -> float:
  """Import with llmjax, export back to HF: same tensors bit for bit, and transformers'
  logits of the export against the golden's (max |diff|)."""
  src = os.path.join(base.GOLDEN, name)
  with tempfile.TemporaryDirectory() as tmp:
    env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=base.ROOT)
    for args in (['--from=hf', f'--src={src}', f'--dst={tmp}/llmjax'],
                 ['--to=hf', f'--src={tmp}/llmjax', f'--dst={tmp}/hf']):
      subprocess.run([base.LLMJAX_PYTHON, '-m', 'llmjax.convert', *args], check=True, env=env,
                     cwd=base.ROOT)
    theirs, ours = tensors(src), tensors(f'{tmp}/hf')
    same = theirs.keys() == ours.keys() and all(
        theirs[k].shape == ours[k].shape and np.array_equal(theirs[k], ours[k]) for k in theirs)
    model = MODELS[name][0].from_pretrained(f'{tmp}/hf', attn_implementation='eager').eval()
    golden = np.load(os.path.join(src, 'golden.npz'))
    diff = float(np.max(np.abs(base.logits_of(model, golden['tokens']) - golden['logits'])))
  status = 'OK' if diff <= 1e-4 and same else 'FAIL'
  print(f'export check {name}: {len(ours)} tensors, names/shapes/values equal to the source:'
        f' {same}; transformers loads the export, max |logit diff| {diff:.2e} {status}')
  return diff if same else float('inf')


def main(argv: list[str]) -> int:
  torch.set_num_threads(2)
  print(f'transformers {transformers.__version__}, torch {torch.__version__}')
  only = [a.split('=', 1)[1] for a in argv if a.startswith('--only=')]
  names = only or list(MODELS)
  if '--check' not in argv:
    for name in names:
      build(name, 100 + list(MODELS).index(name))
  if '--no-check' in argv:
    return 0
  worst = max(check_export(name) for name in names)
  return 0 if worst <= 1e-4 else 1


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
