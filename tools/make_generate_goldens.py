"""Records transformers' greedy `generate()` tokens with logits processors on the HF test
checkpoints, for tests/test_engine.py.

    /tmp/hf/bin/python tools/make_generate_goldens.py

Runs in a Python with torch + transformers (never the test suite's venv). For each checkpoint
under tests/golden/ named in CHECKPOINTS (built by tools/make_hf_goldens.py) and its golden.json
prompts, writes tests/golden/generate/greedy_processors.json:
    {checkpoint: {setting: {"kwargs": {...}, "prompt": [[...]], "generated": [[ids]]}}}
from model.generate(do_sample=False, max_new_tokens=NEW_TOKENS, **kwargs) with EOS disabled, so
every step is recorded. Settings: repetition_penalty=1.3, no_repeat_ngram_size=3 (and both).
"""

import json
import os

import torch
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, 'tests', 'golden')
CHECKPOINTS = ['llama_gqa_llama3', 'qwen2_bias_tied']
NEW_TOKENS = 24
SETTINGS = {
    'repetition_penalty_1.3': {'repetition_penalty': 1.3},
    'no_repeat_ngram_size_3': {'no_repeat_ngram_size': 3},
    'both': {'repetition_penalty': 1.3, 'no_repeat_ngram_size': 3},
}


def main():
  out = {}
  for name in CHECKPOINTS:
    d = os.path.join(GOLDEN, name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        d, dtype=torch.float32, attn_implementation='eager').eval()
    with open(os.path.join(d, 'golden.json')) as f:
      prompt = json.load(f)['prompt']
    ids = torch.tensor(prompt, dtype=torch.long)
    out[name] = {}
    for setting, kwargs in SETTINGS.items():
      with torch.no_grad():
        gen = model.generate(ids, do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=None,
                             pad_token_id=0, attention_mask=torch.ones_like(ids), **kwargs)
      out[name][setting] = {'kwargs': kwargs, 'prompt': prompt,
                            'generated': gen[:, ids.shape[1]:].tolist()}
  path = os.path.join(GOLDEN, 'generate', 'greedy_processors.json')
  with open(path, 'w') as f:
    json.dump({'transformers': transformers.__version__, 'torch': torch.__version__, **out}, f)
  print('wrote', path)


if __name__ == '__main__':
  main()
