"""Records transformers' greedy `generate()` tokens with logits processors on the HF test
checkpoints, for tests/test_engine.py.

    /tmp/hf/bin/python tools/make_generate_goldens.py

Runs in a Python with torch + transformers (never the test suite's venv). For each checkpoint
under tests/golden/ named in CHECKPOINTS (built by tools/make_hf_goldens.py) and its golden.json
prompts, writes tests/golden/generate/greedy_processors.json:
    {checkpoint: {setting: {"kwargs": {...}, "prompt": [[...]], "generated": [[ids]]}}}
from model.generate(do_sample=False, max_new_tokens=NEW_TOKENS, **kwargs) with EOS disabled, so
every step is recorded. Settings: repetition_penalty=1.3, no_repeat_ngram_size=3 (and both).

Beam search (`beams`): tests/golden/generate/beam_search.json
    {checkpoint: {"eos": id, settings: {setting: {"kwargs": {...}, "prompt": [[...]],
     "generated": [[ids]] * (prompts * num_return_sequences), "scores": [...]}}}}
from generate(num_beams=4, do_sample=False, max_new_tokens=BEAM_NEW_TOKENS, **kwargs) on two
prompts of different lengths (left-padded, as transformers pads decoder-only models; only the
generated tokens are stored, each cut at its own length, EOS included). The EOS id is a token
that greedy decoding of the first prompt produces early, so hypotheses finish within the
horizon and `early_stopping` matters. "scores" are transformers' `sequences_scores`:
sum of log-probs / generated length ** length_penalty.
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


BEAM_NEW_TOKENS = 12
BEAM_SETTINGS = {
    f'lp{lp}_es{es}': {'length_penalty': lp, 'early_stopping': es, 'num_return_sequences': 2}
    for lp in (1.0, 0.6) for es in (True, False)}
BEAM_SETTINGS['lp0.6_esnever_r1'] = {'length_penalty': 0.6, 'early_stopping': 'never',
                                     'num_return_sequences': 1}
BEAM_SETTINGS['lp1.0_esFalse_rep1.3_ngram3'] = {
    'length_penalty': 1.0, 'early_stopping': False, 'num_return_sequences': 2,
    'repetition_penalty': 1.3, 'no_repeat_ngram_size': 3}


def beams(model, prompt):
  """Beam-search goldens for one model: the EOS id and each setting's sequences and scores."""
  first = torch.tensor(prompt[:1], dtype=torch.long)
  with torch.no_grad():
    greedy = model.generate(first, do_sample=False, max_new_tokens=BEAM_NEW_TOKENS,
                            eos_token_id=None, pad_token_id=0,
                            attention_mask=torch.ones_like(first))[0, first.shape[1]:].tolist()
  eos = greedy[2]  # produced at the third step: some beams end early
  out = {'eos': eos, 'settings': {}}
  for setting, kwargs in BEAM_SETTINGS.items():
    # Different lengths, except with the penalties: transformers would count the left padding
    # as tokens seen (pad id 0 penalised), which a right-padded engine rightly does not.
    penalised = 'repetition_penalty' in kwargs or 'no_repeat_ngram_size' in kwargs
    prompts = [prompt[0], prompt[1] if penalised else prompt[1][:9]]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
      gen = model.generate(ids, attention_mask=mask, do_sample=False, num_beams=4,
                           max_new_tokens=BEAM_NEW_TOKENS, eos_token_id=eos, pad_token_id=0,
                           return_dict_in_generate=True, output_scores=True, **kwargs)
    lengths = (gen.beam_indices >= 0).sum(-1).tolist()  # generated tokens per sequence
    generated = [row[width:width + n] for row, n in zip(gen.sequences.tolist(), lengths)]
    out['settings'][setting] = {'kwargs': kwargs, 'prompt': prompts, 'generated': generated,
                                'scores': gen.sequences_scores.tolist()}
    ended = sum(g[-1] == eos for g in generated)
    print(setting, 'ended with eos:', ended, 'of', len(generated), [len(g) for g in generated])
  return out


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
  out = {}
  for name in CHECKPOINTS:
    d = os.path.join(GOLDEN, name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        d, dtype=torch.float32, attn_implementation='eager').eval()
    with open(os.path.join(d, 'golden.json')) as f:
      out[name] = beams(model, json.load(f)['prompt'])
  path = os.path.join(GOLDEN, 'generate', 'beam_search.json')
  with open(path, 'w') as f:
    json.dump({'transformers': transformers.__version__, 'torch': torch.__version__, **out}, f)
  print('wrote', path)


if __name__ == '__main__':
  main()
