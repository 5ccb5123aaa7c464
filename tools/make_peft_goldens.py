"""Builds the PEFT adapter goldens under tests/golden/peft/ (tests/test_peft.py and
tests/test_prompt_tuning.py read them).

    /tmp/hf/bin/python tools/make_peft_goldens.py            # build goldens, then check exports
    /tmp/hf/bin/python tools/make_peft_goldens.py --check    # only check exports of existing goldens
    /tmp/hf/bin/python tools/make_peft_goldens.py llama_gqa_llama3_dora --no-check  # one, unchecked

Runs in a Python with torch + transformers + peft (never the test suite's venv). For each base
golden (tests/golden/<name>/, built by tools/make_hf_goldens.py) and variant (`VARIANTS`:
plain LoRA, DoRA, rsLoRA with a rank_pattern) it wraps the model with
`peft.get_peft_model(LoraConfig(r=4, lora_alpha=8, all seven projections, ...))`, sets every
lora_A / lora_B to seeded random non-zero values (PEFT starts B at zero, which would test
nothing) and moves DoRA's magnitudes off their init, saves the adapter with `save_pretrained`
to tests/golden/peft/<adapter>/ and records
    logits.npz    tokens [2, 16] int32 (the base golden's), logits [2, 16, vocab] float32
from one forward pass of the adapted model (eager attention, float32).

Prompt tuning (`PROMPT_VARIANTS`): `PromptTuningConfig(num_virtual_tokens=4, RANDOM init)`,
the prompt embeddings set to seeded N(0, 1) values; logits.npz holds the logits of the real
tokens only ([2, 16, vocab]; PEFT's output also has the 4 virtual positions first). Prefix
tuning (`PREFIX_VARIANTS`): `PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=False)`,
built the same way. Their export check goes through `peft.prompt_tuning_fields` /
`prefix_tuning_fields` and `convert --to=peft` like the LoRA ones.

The export check runs llmjax (in LLMJAX_PYTHON, default /work/main/.venv/bin/python, no torch):
it imports each golden adapter over its base into an llmjax workdir and exports it with
`python -m llmjax.convert --to=peft`; then `peft.PeftModel.from_pretrained(base, export)` must
give the golden's logits (max |diff| <= 1e-4).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import peft
import torch
import transformers

LLMJAX_PYTHON = os.environ.get('LLMJAX_PYTHON', '/work/main/.venv/bin/python')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, 'tests', 'golden')
TARGETS = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']
# The LoRA variants: {golden adapter name: (base golden, extra LoraConfig fields)}. Plain LoRA
# on both bases; DoRA on both (qwen2's qkv biases must not be rescaled); rsLoRA with
# per-module ranks (PEFT's rank_pattern) on llama.
VARIANTS = {
    'llama_gqa_llama3': ('llama_gqa_llama3', {}),
    'qwen2_bias_tied': ('qwen2_bias_tied', {}),
    'llama_gqa_llama3_dora': ('llama_gqa_llama3', dict(use_dora=True)),
    'qwen2_bias_tied_dora': ('qwen2_bias_tied', dict(use_dora=True)),
    'llama_gqa_llama3_rslora': ('llama_gqa_llama3', dict(
        use_rslora=True, rank_pattern={'q_proj': 8, 'down_proj': 2})),
}

# Prompt tuning: {golden adapter name: (base golden, PromptTuningConfig fields)}.
PROMPT_VARIANTS = {
    'llama_gqa_llama3_prompt': ('llama_gqa_llama3', dict(num_virtual_tokens=4)),
}
# Prefix tuning without the projection MLP: PrefixTuningConfig(num_virtual_tokens=4); its one
# tensor holds every layer's keys and values (N(0, 1) values, seeded). logits.npz: PEFT's
# logits as they are (prefix tuning adds no output positions).
PREFIX_VARIANTS = {
    'llama_gqa_llama3_prefix': ('llama_gqa_llama3', dict(num_virtual_tokens=4)),
}


def _finish(out: str, base_dir: str) -> None:
  """Portable base path in adapter_config.json; PEFT's README.md stub removed."""
  path = os.path.join(out, 'adapter_config.json')
  with open(path) as f:
    fields = json.load(f)
  fields['base_model_name_or_path'] = os.path.relpath(base_dir, ROOT)
  with open(path, 'w') as f:
    json.dump(fields, f, indent=2, sort_keys=True)
  os.remove(os.path.join(out, 'README.md'))


def build_prompt(adapter: str, seed: int) -> None:
  prefix = adapter in PREFIX_VARIANTS
  name, extra = (PREFIX_VARIANTS if prefix else PROMPT_VARIANTS)[adapter]
  base_dir = os.path.join(GOLDEN, name)
  out = os.path.join(GOLDEN, 'peft', adapter)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      base_dir, dtype=torch.float32, attn_implementation='eager')
  config = (peft.PrefixTuningConfig(task_type='CAUSAL_LM', prefix_projection=False, **extra)
            if prefix else
            peft.PromptTuningConfig(task_type='CAUSAL_LM', prompt_tuning_init='RANDOM', **extra))
  model = peft.get_peft_model(model, config)
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    emb = model.prompt_encoder['default'].embedding.weight
    emb.copy_(torch.randn(emb.shape, generator=gen))
  model.eval()
  tokens = np.load(os.path.join(base_dir, 'golden.npz'))['tokens']
  with torch.no_grad():
    logits = model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()
  n = 0 if prefix else extra['num_virtual_tokens']  # prefix: no virtual output positions
  assert logits.shape[1] == tokens.shape[1] + n, logits.shape
  logits = logits[:, n:]  # the real tokens' positions
  if os.path.isdir(out):
    shutil.rmtree(out)
  model.save_pretrained(out)
  np.savez(os.path.join(out, 'logits.npz'), tokens=tokens.astype(np.int32),
           logits=logits.astype(np.float32))
  _finish(out, base_dir)
  print(f'wrote {out}: {sorted(os.listdir(out))}, logits {logits.shape}')


def build(adapter: str, seed: int) -> None:
  if adapter in PROMPT_VARIANTS:
    return build_prompt(adapter, 100 + list(PROMPT_VARIANTS).index(adapter))
  if adapter in PREFIX_VARIANTS:
    return build_prompt(adapter, 200 + list(PREFIX_VARIANTS).index(adapter))
  name, extra = VARIANTS[adapter]
  base_dir = os.path.join(GOLDEN, name)
  out = os.path.join(GOLDEN, 'peft', adapter)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      base_dir, dtype=torch.float32, attn_implementation='eager')
  config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0,
                           task_type='CAUSAL_LM', **extra)
  model = peft.get_peft_model(model, config)
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for pname, p in model.named_parameters():
      if 'lora_A' in pname or 'lora_B' in pname:
        # 0.3 keeps the adapted logits clearly different from the base's, yet finite.
        p.copy_(0.3 * torch.randn(p.shape, generator=gen))
      elif 'lora_magnitude_vector' in pname:
        # DoRA's magnitude starts at ||W||_c; moved by +-20% so it changes the output too.
        p.mul_(1 + 0.2 * torch.randn(p.shape, generator=gen))
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
  _finish(out, base_dir)
  print(f'wrote {out}: {sorted(os.listdir(out))}, logits {logits.shape}')


# Runs in LLMJAX_PYTHON: golden adapter + base -> an llmjax LoRA workdir (argv: adapter, base,
# workdir). The model's LoRA keys are the ones `peft.lora_fields` derives from the adapter.
_IMPORT = """
import dataclasses, sys
from llmjax.interop import load_hf, peft
from llmjax.models import lora
from llmjax.train import checkpoint
adapter, name, work = sys.argv[1:]
cfg, params, _ = load_hf('tests/golden/' + name)
cfg = dataclasses.replace(cfg, **peft.lora_fields('tests/golden/peft/' + adapter, cfg))
family = peft.check_adapter('tests/golden/peft/' + adapter, cfg)
adapters = peft.read_adapters('tests/golden/peft/' + adapter, cfg, family)
checkpoint.write_params_workdir(work, cfg, lora.combine(adapters, params))
"""

# The same for a prompt- or prefix-tuning golden: an llmjax workdir with model.virtual_tokens
# from `peft.prompt_tuning_fields` / `prefix_tuning_fields`.
_IMPORT_PROMPT = """
import dataclasses, sys
from llmjax.interop import load_hf, peft
from llmjax.models import lora
from llmjax.train import checkpoint
adapter, name, work = sys.argv[1:]
path = 'tests/golden/peft/' + adapter
cfg, params, _ = load_hf('tests/golden/' + name)
prefix = peft.read_config(path).get('peft_type') == 'PREFIX_TUNING'
fields = (peft.prefix_tuning_fields if prefix else peft.prompt_tuning_fields)(path, cfg)
cfg = dataclasses.replace(cfg, **fields)
tokens = (peft.read_prefix_tuning if prefix else peft.read_prompt_tuning)(path, cfg)
checkpoint.write_params_workdir(work, cfg, lora.combine(tokens, params))
"""


def check(adapter: str) -> None:
  name = (VARIANTS.get(adapter) or PROMPT_VARIANTS.get(adapter) or PREFIX_VARIANTS[adapter])[0]
  script = _IMPORT if adapter in VARIANTS else _IMPORT_PROMPT
  # PEFT's prompt-tuning output starts with the virtual positions; the golden has the rest.
  skip = PROMPT_VARIANTS[adapter][1]['num_virtual_tokens'] if adapter in PROMPT_VARIANTS else 0
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  with tempfile.TemporaryDirectory() as tmp:
    work, out = os.path.join(tmp, 'run'), os.path.join(tmp, 'adapter')
    subprocess.run([LLMJAX_PYTHON, '-c', script, adapter, name, work], cwd=ROOT, env=env,
                   check=True)
    subprocess.run([LLMJAX_PYTHON, '-m', 'llmjax.convert', '--to=peft', f'--src={work}',
                    f'--dst={out}'], cwd=ROOT, env=env, check=True)
    base = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.join(GOLDEN, name), dtype=torch.float32, attn_implementation='eager')
    model = peft.PeftModel.from_pretrained(base, out).eval()
    golden = np.load(os.path.join(GOLDEN, 'peft', adapter, 'logits.npz'))
    with torch.no_grad():
      logits = model(torch.tensor(golden['tokens'], dtype=torch.long)).logits.numpy()[:, skip:]
    diff = float(np.abs(logits - golden['logits']).max())
    print(f'{adapter}: PeftModel.from_pretrained(llmjax export) max |logits diff| = {diff:.2e}')
    if diff > 1e-4:
      sys.exit(f'{adapter}: the export does not reproduce the golden logits')


if __name__ == '__main__':
  # Positional arguments pick adapters (default: all). Each keeps its seed (its index in
  # VARIANTS), so the plain LoRA goldens keep theirs (0, 1).
  chosen = ([a for a in sys.argv[1:] if not a.startswith('--')]
            or list(VARIANTS) + list(PROMPT_VARIANTS) + list(PREFIX_VARIANTS))
  if '--check' not in sys.argv:
    for adapter in chosen:
      build(adapter, list(VARIANTS).index(adapter) if adapter in VARIANTS else 0)
  if '--no-check' not in sys.argv:
    for adapter in chosen:
      check(adapter)
