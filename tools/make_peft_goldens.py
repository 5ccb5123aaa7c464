"""Builds the PEFT LoRA adapter goldens under tests/golden/peft/ (tests/test_peft.py reads them).

    /tmp/hf/bin/python tools/make_peft_goldens.py

Runs in a Python with torch + transformers + peft (never the test suite's venv). For each base
golden (tests/golden/<name>/, built by tools/make_hf_goldens.py) it wraps the model with
`peft.get_peft_model(LoraConfig(r=4, lora_alpha=8, all seven projections))`, sets every
lora_A / lora_B to seeded random non-zero values (PEFT starts B at zero, which would test
nothing), saves the adapter with `save_pretrained` to tests/golden/peft/<name>/ and records
    logits.npz    tokens [2, 16] int32 (the base golden's), logits [2, 16, vocab] float32
from one forward pass of the adapted model (eager attention, float32).
"""

import json
import os
import shutil

import numpy as np
import peft
import torch
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, 'tests', 'golden')
NAMES = ('llama_gqa_llama3', 'qwen2_bias_tied')
TARGETS = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']


def build(name: str, seed: int) -> None:
  base_dir = os.path.join(GOLDEN, name)
  out = os.path.join(GOLDEN, 'peft', name)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      base_dir, dtype=torch.float32, attn_implementation='eager')
  config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0,
                           task_type='CAUSAL_LM')
  model = peft.get_peft_model(model, config)
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for pname, p in model.named_parameters():
      if 'lora_A' in pname or 'lora_B' in pname:
        # 0.3 keeps the adapted logits clearly different from the base's, yet finite.
        p.copy_(0.3 * torch.randn(p.shape, generator=gen))
  model.eval()
  tokens = np.load(os.path.join(base_dir, 'golden.npz'))['tokens']
  with torch.no_grad():
    logits = model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()
  if os.path.isdir(out):
    shutil.rmtree(out)
  model.save_pretrained(out)
  np.savez(os.path.join(out, 'logits.npz'), tokens=tokens.astype(np.int32),
           logits=logits.astype(np.float32))
  # The base path as saved is this machine's absolute one; the repo-relative one is portable
  # (tests pass the base explicitly). README.md is PEFT's model-card stub: nothing to test.
  path = os.path.join(out, 'adapter_config.json')
  with open(path) as f:
    fields = json.load(f)
  fields['base_model_name_or_path'] = os.path.relpath(base_dir, ROOT)
  with open(path, 'w') as f:
    json.dump(fields, f, indent=2, sort_keys=True)
  os.remove(os.path.join(out, 'README.md'))
  print(f'wrote {out}: {sorted(os.listdir(out))}, logits {logits.shape}')


if __name__ == '__main__':
  for seed, name in enumerate(NAMES):
    build(name, seed)
