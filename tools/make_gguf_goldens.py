"""Builds tests/golden/gguf/golden.json: what llama.cpp does with GGUF files that llmjax exports
from the test checkpoints (tests/test_gguf.py checks llmjax against it).

    python3.11 -m venv /tmp/llamacpp
    CMAKE_ARGS="-DGGML_NATIVE=OFF" /tmp/llamacpp/bin/pip install llama-cpp-python numpy  # ~10 min
    /tmp/llamacpp/bin/python tools/make_gguf_goldens.py

Runs in a Python with `llama_cpp` (llama-cpp-python from PyPI builds llama.cpp from source);
the llmjax half runs in LLMJAX_PYTHON (default /work/main/.venv/bin/python) as
`make_gguf_goldens.py --llmjax OUT_DIR`: each case's Hugging Face test checkpoint is imported
(`convert --from=hf`) and exported (`convert --to=gguf`), and the file's tensors (name, type,
shape, sha256 of the bytes) and metadata are recorded, so that the test can check that a fresh
export equals the file llama.cpp ran, tensor by tensor.

llama.cpp then loads every file (one thread, so the float sums are in one order; float32 KV
cache) and records:
    tokenize   llama.cpp's ids for a few texts (BOS added as the file says, special tokens off)
    greedy     for each prompt (the checkpoint's golden.json prompts, 16 ids each): the argmax
               continuation of NEW_TOKENS tokens (no sampler: argmax of the logits llama.cpp
               returns, fed back one token at a time), and the logits of the prompt's last
               position
"""

import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, 'tests', 'golden')
OUT = os.path.join(GOLDEN, 'gguf', 'golden.json')
LLMJAX_PYTHON = os.environ.get('LLMJAX_PYTHON', '/work/main/.venv/bin/python')
NEW_TOKENS = 16

# (test checkpoint in tests/golden, --gguf_type). Together: arch llama with GQA and llama3 RoPE
# (rope_freqs) and a BPE tokenizer ('gpt-2' pre-tokenizer); MQA, a tied head, linear RoPE,
# head_dim != hidden / heads and a sentencepiece tokenizer; arch qwen2 with q/k/v biases and a
# chat template; an llmjax run's own byte-fallback sentencepiece tokenizer; every type.
CASES = [
    ('llama_gqa_llama3', 'f32'), ('llama_gqa_llama3', 'f16'), ('llama_gqa_llama3', 'q8_0'),
    ('llama_gqa_llama3', 'q4_0'),
    ('llama_mqa_tied_linear', 'f32'), ('llama_mqa_tied_linear', 'q8_0'),
    ('qwen2_bias_tied', 'f32'), ('qwen2_bias_tied', 'q4_0'),
    ('export_sentencepiece', 'f32'),
]
TEXTS = {
    'llama_gqa_llama3': ['the quick brown fox', 'hello world, hello llmjax'],
    'qwen2_bias_tied': ['the quick brown fox', 'hello world, hello llmjax'],
    'llama_mqa_tied_linear': ['the quick brown fox', 'hello world, hello llmjax'],
    'export_sentencepiece': ['Once upon a time', 'Déjà vu at the café', 'The quick brown fox'],
}


def file_name(model: str, gguf_type: str) -> str:
  return f'{model}.{gguf_type}.gguf'


def llmjax_export(out: str) -> None:
  """Runs in llmjax's Python: imports each checkpoint and exports every case into `out`."""
  done = set()
  for model, gguf_type in CASES:
    work = os.path.join(out, model)
    if model not in done:
      subprocess.run([sys.executable, '-m', 'llmjax.convert', '--from=hf',
                      f'--src={os.path.join(GOLDEN, model)}', f'--dst={work}'], check=True)
      done.add(model)
    subprocess.run([sys.executable, '-m', 'llmjax.convert', '--to=gguf', f'--src={work}',
                    f'--dst={os.path.join(out, file_name(model, gguf_type))}',
                    f'--gguf_type={gguf_type}'], check=True)
  from llmjax.interop.gguf import describe
  described = {file_name(m, t): describe(os.path.join(out, file_name(m, t))) for m, t in CASES}
  with open(os.path.join(out, 'described.json'), 'w') as f:
    json.dump(described, f)


def prompts_of(model: str) -> list[list[int]]:
  with open(os.path.join(GOLDEN, model, 'golden.json')) as f:
    golden = json.load(f)
  if 'prompt' in golden:
    return golden['prompt']
  return [g['input_ids'] for g in golden['generate'][:2]]  # export_sentencepiece


def llama_cpp_run(path: str, prompts, texts) -> dict:
  import llama_cpp
  import numpy as np
  # float32 KV cache and no flash attention: llama.cpp's defaults (F16 cache) would add their
  # own rounding to what is compared with llmjax's float32 forward pass.
  llm = llama_cpp.Llama(model_path=path, n_ctx=64, n_batch=64, n_threads=1, logits_all=True,
                        type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
                        flash_attn=False, verbose=False)
  greedy = []
  for prompt in prompts:
    llm.reset()
    llm.eval(prompt)
    first = np.array(llm.scores[llm.n_tokens - 1], np.float32)
    out = []
    for _ in range(NEW_TOKENS):
      token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
      out.append(token)
      llm.eval([token])
    greedy.append({'prompt': prompt, 'output': out,
                   'first_logits': [round(float(x), 5) for x in first]})
  tokenize = [{'text': t, 'ids': llm.tokenize(t.encode('utf-8'), add_bos=True, special=False)}
              for t in texts]
  return {'greedy': greedy, 'tokenize': tokenize}


def main() -> None:
  import llama_cpp
  with tempfile.TemporaryDirectory() as tmp:
    subprocess.run([LLMJAX_PYTHON, os.path.abspath(__file__), '--llmjax', tmp], check=True,
                   cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS='cpu'))
    with open(os.path.join(tmp, 'described.json')) as f:
      described = json.load(f)
    cases = []
    for model, gguf_type in CASES:
      name = file_name(model, gguf_type)
      run = llama_cpp_run(os.path.join(tmp, name), prompts_of(model), TEXTS[model])
      cases.append({'model': model, 'gguf_type': gguf_type, 'file': name, **described[name],
                    **run})
      print(name, [g['output'][:6] for g in run['greedy']])
  os.makedirs(os.path.dirname(OUT), exist_ok=True)
  with open(OUT, 'w') as f:
    json.dump({'llama_cpp_python': llama_cpp.__version__, 'new_tokens': NEW_TOKENS,
               'cases': cases}, f, indent=1)
  print('wrote', OUT)


if __name__ == '__main__':
  if len(sys.argv) == 3 and sys.argv[1] == '--llmjax':
    llmjax_export(sys.argv[2])
  else:
    main()
