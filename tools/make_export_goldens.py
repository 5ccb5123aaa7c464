"""Builds tests/golden/export_sentencepiece/: an llmjax run exported with `convert --to=hf`, and
what transformers does with it (tests/test_export_hf.py checks llmjax against that).

    /tmp/hf/bin/python tools/make_export_goldens.py

Runs in a Python with torch + transformers; the llmjax half runs in LLMJAX_PYTHON (default
/work/main/.venv/bin/python, no torch) as `make_export_goldens.py --llmjax DIR`:
  1. trains a sentencepiece tokenizer as a quickstart run does (`SentencePieceTokenizer.train`,
     BPE, byte fallback) on a small fixed corpus with accents (CJK and emoji are not in it: they
     come out as byte pieces);
  2. makes a tiny Llama-shaped model (random init, weights scaled up for clear greedy margins)
     whose head is biased towards EOS (its column is scaled), so that greedy decoding ends with
     EOS after a few tokens for some prompts and not for others; picks such prompts;
  3. writes a quickstart-like workdir (model_config.json, checkpoints/0, tokenizer.model) and runs
     `python -m llmjax.convert --to=hf` on it into the golden dir.
Then transformers loads the export with AutoTokenizer and AutoModelForCausalLM (no extra
arguments: everything comes from the exported files) and records in golden.json:
    texts      [{text, ids (add_special_tokens=False), ids_with_bos (default call), decoded}]
    generate   [{prompt, input_ids, output (new ids, EOS included when hit), max_new_tokens}]
               from model.generate(**tokenizer(prompt), do_sample=False, max_new_tokens=N):
               its EOS is generation_config.json's.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, 'tests', 'golden', 'export_sentencepiece')
LLMJAX_PYTHON = os.environ.get('LLMJAX_PYTHON', '/work/main/.venv/bin/python')
MAX_NEW_TOKENS = 24

CORPUS = [
    'The quick brown fox jumps over the lazy dog.',
    'Once upon a time there was a small model that learned to stop.',
    'Déjà vu: a naïve café owner in Zürich ordered crème brûlée.',
    'Il était une fois un garçon qui aimait les châteaux et les forêts.',
    'El niño comió piñas en la mañana; ¿por qué no?',
    'Numbers like 2024 and 3.14 are split into digits.',
] * 10
TEXTS = [
    'Déjà vu at the café',
    'naïve Zoë and Ångström',
    '東京は日本の首都です。',
    'emoji 😀👍🏽 and 👨\u200d👩\u200d👧 family',
    '中文 mixed with English, ¿sí?',
    'tabs\tand\nnew lines  and  double spaces',
    ' leading space',
]
CANDIDATE_PROMPTS = ['Once upon a time', 'Déjà vu', 'The café in Zürich', '東京', 'emoji 😀',
                     'El niño', 'Il était une fois', 'The quick brown fox', 'Numbers 42',
                     'naïve', 'crème brûlée', 'forêts et châteaux', 'hello world', 'a', 'Zoë']


# ------------------------------------------------------------------------------ llmjax half


def llmjax_build(out: str) -> None:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from llmjax import convert
  from llmjax.data.tokenizer import SentencePieceTokenizer
  from llmjax.infer import sampler
  from llmjax.models.config import ModelConfig
  from llmjax.models.transformer import Transformer, init_params
  from llmjax.train import checkpoint

  with tempfile.TemporaryDirectory() as tmp:
    work = os.path.join(tmp, 'run')
    os.makedirs(work)
    tok = SentencePieceTokenizer.train(CORPUS, os.path.join(work, 'tokenizer.model'), 320)
    cfg = ModelConfig(vocab_size=tok.vocab_size, num_layers=2, embed_dim=32, num_heads=2,
                      num_kv_heads=1, head_dim=16, mlp_dim=64, max_seq_len=64)
    params = init_params(cfg, jax.random.key(0))
    # Wider than init (0.02) so that every layer matters and the top two logits stay apart.
    params = jax.tree.map(lambda x: x * 10.0 if x.ndim > 1 else x, params)
    head = params['head']['kernel']  # [embed, vocab]
    params['head']['kernel'] = head.at[:, tok.eos_id].multiply(2.5)

    def continuation(prompt):
      ids = [tok.bos_id] + tok.encode(prompt)
      p = sampler.SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0)
      new = sampler.generate(cfg, params, [ids], p, eos_id=-1)[0]
      logits, _ = Transformer(cfg).apply({'params': params}, jnp.asarray([ids + new]))
      top2 = np.sort(np.asarray(logits[0, len(ids) - 1:]), axis=-1)[:, -2:]
      gaps = top2[:, 1] - top2[:, 0]
      stop = new.index(tok.eos_id) if tok.eos_id in new else len(new)
      return stop, float(gaps[:stop + 1].min())

    chosen = {'eos': [], 'no_eos': []}
    for prompt in CANDIDATE_PROMPTS:
      stop, gap = continuation(prompt)
      print(f'  {prompt!r}: EOS after {stop} tokens, min top-2 gap {gap:.3f}')
      if gap < 0.005:  # torch and XLA float32 logits differ by ~1e-5
        continue
      if 3 <= stop < MAX_NEW_TOKENS - 2:
        chosen['eos'].append(prompt)
      elif stop == MAX_NEW_TOKENS:
        chosen['no_eos'].append(prompt)
    prompts = chosen['eos'][:3] + chosen['no_eos'][:1]
    if len(chosen['eos']) < 2 or not chosen['no_eos']:
      raise SystemExit(f'not enough prompts that stop / do not stop: {chosen}; tune the EOS scale')

    checkpoint.write_model_config(work, cfg)
    manager = checkpoint.make_manager(work, max_to_keep=1, async_save=False)
    checkpoint.save(manager, 0, {'params': params}, force=True)
    manager.wait_until_finished()
    manager.close()
    shutil.rmtree(out, ignore_errors=True)
    if convert.main(['--to=hf', f'--src={work}', f'--dst={out}']) != 0:
      raise SystemExit('convert --to=hf failed')
  with open(os.path.join(out, 'prompts.json'), 'w') as f:
    json.dump(prompts, f, ensure_ascii=False)


# ------------------------------------------------------------------------------ transformers half


def transformers_golden(out: str) -> None:
  import torch
  import transformers
  from transformers import AutoModelForCausalLM, AutoTokenizer

  torch.set_num_threads(2)
  print(f'transformers {transformers.__version__}, torch {torch.__version__}')
  tokenizer = AutoTokenizer.from_pretrained(out)
  model = AutoModelForCausalLM.from_pretrained(out, attn_implementation='eager').eval()
  print(f'  {type(tokenizer).__name__}, {type(model).__name__}, eos'
        f' {model.generation_config.eos_token_id}')
  texts = []
  for text in TEXTS:
    ids = tokenizer(text, add_special_tokens=False)['input_ids']
    texts.append({'text': text, 'ids': ids, 'ids_with_bos': tokenizer(text)['input_ids'],
                  'decoded': tokenizer.decode(ids, skip_special_tokens=True)})
  with open(os.path.join(out, 'prompts.json')) as f:
    prompts = json.load(f)
  os.remove(os.path.join(out, 'prompts.json'))
  generations = []
  for prompt in prompts:
    inputs = tokenizer(prompt, return_tensors='pt')
    with torch.no_grad():
      full = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    n = inputs['input_ids'].shape[1]
    generations.append({'prompt': prompt, 'input_ids': inputs['input_ids'][0].tolist(),
                        'output': full[0, n:].tolist(), 'max_new_tokens': MAX_NEW_TOKENS})
    print(f'  generate {prompt!r}: {len(full[0]) - n} new tokens, last {full[0, -1].item()}')
  golden = {'transformers': transformers.__version__, 'texts': texts, 'generate': generations}
  with open(os.path.join(out, 'golden.json'), 'w') as f:
    json.dump(golden, f, indent=1, ensure_ascii=False)
  size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
  print(f'wrote {out} ({size // 1024} KB)')


def main(argv: list[str]) -> int:
  if argv[:1] == ['--llmjax']:
    llmjax_build(argv[1])
    return 0
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  subprocess.run([LLMJAX_PYTHON, os.path.abspath(__file__), '--llmjax', OUT], check=True,
                 env=env, cwd=ROOT)
  transformers_golden(OUT)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
