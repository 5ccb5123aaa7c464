"""GGUF export (`convert --to=gguf`) against llama.cpp.

tests/golden/gguf/golden.json (tools/make_gguf_goldens.py, llama-cpp-python 0.3.36) holds what
llama.cpp did with files exported from the test checkpoints: its greedy tokens and first logits,
its tokenization of a few texts, and the files' tensors and metadata. Here: a fresh export is
that file tensor by tensor, llmjax run on the file's own weights (read back, dequantized) gives
llama.cpp's tokens, and llmjax's tokenizer gives llama.cpp's ids.
"""

import json
import os

import numpy as np
import pytest

from llmjax import convert
from llmjax.errors import UserError
from llmjax.interop import gguf as gguf_io

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), 'golden')
GOLDEN = json.load(open(os.path.join(GOLDEN_DIR, 'gguf', 'golden.json')))
CASES = {c['file']: c for c in GOLDEN['cases']}


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  """{file name: path} of every case, exported as the golden script does (workdirs named after
  the checkpoints, so general.name matches)."""
  out = tmp_path_factory.mktemp('gguf')
  paths = {}
  for case in GOLDEN['cases']:
    work = out / case['model']
    if not work.exists():
      assert convert.main(['--from=hf', f"--src={os.path.join(GOLDEN_DIR, case['model'])}",
                           f'--dst={work}']) == 0
    paths[case['file']] = str(out / case['file'])
    assert convert.main(['--to=gguf', f'--src={work}', f"--dst={paths[case['file']]}",
                         f"--gguf_type={case['gguf_type']}"]) == 0
  return paths


@pytest.mark.parametrize('name', list(CASES))
def test_fresh_export_equals_the_file_llama_cpp_ran(exported, name):
  got = gguf_io.describe(exported[name])
  want = CASES[name]
  assert got['metadata'] == want['metadata']
  assert sorted(got['tensors']) == sorted(want['tensors'])
  for t, spec in want['tensors'].items():
    assert got['tensors'][t] == spec, t


def _llmjax_on_file(path: str, model: str, tmp_path):
  """(cfg, params) of llmjax with the file's own weights: dequantized, Q/K rows un-permuted,
  under transformers' names, loaded by the ordinary importer."""
  import gguf
  from safetensors.numpy import save_file

  from llmjax.interop import load_hf
  from llmjax.interop.safetensors_io import Reader
  meta, tensors = gguf_io.read_tensors(path)
  arch = meta['general.architecture']
  src = os.path.join(GOLDEN_DIR, model)
  reader = Reader(src)
  names = list(reader.shapes)
  reader.close()
  tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], meta[f'{arch}.block_count'])
  hf = {}
  for name in names:
    g = tmap.get_name(name, try_suffixes=('.weight', '.bias'))
    if g in tensors:
      hf[name] = np.ascontiguousarray(tensors[g])
  out = tmp_path / 'hf'
  out.mkdir()
  save_file(hf, str(out / 'model.safetensors'))
  for f in ('config.json', 'tokenizer.json', 'tokenizer.model', 'tokenizer_config.json',
            'special_tokens_map.json'):
    if os.path.exists(os.path.join(src, f)):
      (out / f).write_bytes(open(os.path.join(src, f), 'rb').read())
  cfg, params, tokenizer = load_hf(str(out))
  return cfg, params, tokenizer


# --gguf_type -> (first-position logits atol, largest logit gap allowed between llmjax's top token
# and llama.cpp's choice). Float files: llama.cpp's tokens are llmjax's free-running greedy ones;
# float16 matmuls round the activations to float16 in llama.cpp. Block-quantized files: llama.cpp
# also quantizes the activations to 8 bits in its dot products (llmjax multiplies float32
# activations by the dequantized weights), so near-ties may go either way: llama.cpp's token must
# be within the gap of llmjax's best at every step of llama.cpp's own continuation. A wrong scale
# or row order misses these by whole logits (the logits span 4 to 16).
TOLERANCE = {'f32': (1e-4, 0.0), 'f16': (5e-3, 0.0), 'q8_0': (0.3, 0.15), 'q4_0': (0.3, 0.15)}


@pytest.mark.parametrize('name', list(CASES))
def test_llmjax_on_the_file_gives_llama_cpp_tokens(exported, name, tmp_path):
  import jax.numpy as jnp

  from llmjax.infer import engine
  from llmjax.models.transformer import Transformer
  case = CASES[name]
  atol, max_gap = TOLERANCE[case['gguf_type']]
  cfg, params, _ = _llmjax_on_file(exported[name], case['model'], tmp_path)
  for g in case['greedy']:
    seq = g['prompt'] + g['output']
    logits, _ = Transformer(cfg).apply({'params': params}, jnp.asarray([seq]))
    steps = np.asarray(logits[0, len(g['prompt']) - 1:len(seq) - 1])  # [new, vocab]
    np.testing.assert_allclose(steps[0], g['first_logits'], atol=atol)
    gap = steps.max(-1) - steps[np.arange(len(g['output'])), g['output']]
    assert gap.max() <= max_gap, (gap.round(3).tolist(), g['output'])
  if max_gap == 0.0:
    sp = engine.SamplingParams(max_new_tokens=GOLDEN['new_tokens'], temperature=0.0)
    out = engine.generate(cfg, params, [g['prompt'] for g in case['greedy']], sp, eos_id=-1)
    assert [list(c.ids) for c in out] == [g['output'] for g in case['greedy']]


@pytest.mark.parametrize('name', [n for n in CASES if CASES[n]['gguf_type'] == 'f32'])
def test_llmjax_tokenizer_gives_llama_cpp_ids(name):
  """A text prompt: llmjax.generate's BOS + encode, and llama.cpp's tokenizer on the file."""
  from llmjax.interop import load_tokenizer
  tok = load_tokenizer(os.path.join(GOLDEN_DIR, CASES[name]['model']))
  for t in CASES[name]['tokenize']:
    assert [tok.bos_id] + tok.encode(t['text']) == t['ids'], t['text']


def test_read_back_f32_is_the_checkpoint(exported):
  """The float32 file's tensors are transformers' own (the permutation undone exactly)."""
  from llmjax.interop.safetensors_io import Reader
  import gguf
  _, tensors = gguf_io.read_tensors(exported['llama_gqa_llama3.f32.gguf'])
  reader = Reader(os.path.join(GOLDEN_DIR, 'llama_gqa_llama3'))
  tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
  for name in reader.shapes:
    np.testing.assert_array_equal(tensors[tmap.get_name(name, try_suffixes=('.weight', '.bias'))],
                                  reader.read(name), err_msg=name)
  reader.close()
  # llama3 RoPE scaling travels as per-frequency divisors: 1 for short wavelengths, the factor
  # for long ones (transformers' llama3 rule), with one value per rotated pair.
  freqs = tensors['rope_freqs.weight']
  assert freqs.shape == (8,) and freqs[0] == 1.0 and freqs[-1] == 8.0


def test_permute_matches_interleaved_rope():
  """`permute` turns rotate-half rows into llama.cpp's interleaved pairs: rotating the permuted
  q by pairs (x0, x1), (x2, x3), ... equals permuting the rotate-half rotated q."""
  rng = np.random.default_rng(0)
  head_dim, pos = 8, 3
  q = rng.normal(size=(head_dim,))
  inv = 1.0 / 10000 ** (np.arange(0, head_dim, 2) / head_dim)
  cos, sin = np.cos(pos * inv), np.sin(pos * inv)
  half = head_dim // 2
  x1, x2 = q[:half], q[half:]
  rotated_half = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin])
  p = gguf_io.permute(q.reshape(head_dim, 1), 1)[:, 0]
  pairs = p.reshape(half, 2)
  rotated_pairs = np.stack([pairs[:, 0] * cos - pairs[:, 1] * sin,
                            pairs[:, 1] * cos + pairs[:, 0] * sin], -1).reshape(-1)
  np.testing.assert_allclose(rotated_pairs, gguf_io.permute(rotated_half.reshape(-1, 1), 1)[:, 0])
  np.testing.assert_array_equal(gguf_io.unpermute(gguf_io.permute(q.reshape(-1, 1), 1), 1)[:, 0], q)


def _config_only_workdir(tmp_path, **fields):
  """A workdir with only model_config.json: the refusals happen before any weight is read."""
  import dataclasses

  from llmjax.models.config import ModelConfig
  cfg = ModelConfig(**{**dict(vocab_size=64, num_layers=1, embed_dim=64, num_heads=2,
                              num_kv_heads=2, head_dim=0, mlp_dim=128, max_seq_len=32), **fields})
  work = tmp_path / 'work'
  work.mkdir()
  (work / 'model_config.json').write_text(json.dumps(dataclasses.asdict(cfg)))
  return str(work)


@pytest.mark.parametrize('fields, flags, message', [
    ({}, ['--gguf_type=q5_k'], "--gguf_type='q5_k' is not one of f32, f16, q8_0, q4_0"),
    ({'embed_dim': 48, 'mlp_dim': 96}, ['--gguf_type=q8_0'],
     'model.embed_dim=48 is not a multiple of 32; use --gguf_type=f16'),
    ({'position': 'learned', 'norm': 'layernorm', 'mlp': 'gelu', 'qkv_bias': True,
      'out_bias': True, 'mlp_bias': True}, ['--gguf_type=f16'], 'exports as GPT2LMHeadModel'),
    ({'head': 'score'}, ['--gguf_type=f16'], "model.head='score'"),
    ({}, ['--gguf_type=f16', '--dst_is_dir'], 'pass a local file name ending in .gguf'),
])
def test_refused_before_any_weight_is_read(tmp_path, capsys, fields, flags, message):
  work = _config_only_workdir(tmp_path, **fields)
  dst = str(tmp_path / 'out') if '--dst_is_dir' in flags else str(tmp_path / 'out.gguf')
  flags = [f for f in flags if f != '--dst_is_dir']
  assert convert.main(['--to=gguf', f'--src={work}', f'--dst={dst}', *flags]) == 1
  err = capsys.readouterr().err.strip()
  assert message in err and len(err.splitlines()) == 1, err
  assert not os.path.exists(dst)


def test_unknown_bpe_pre_tokenizer_names_the_flag():
  tokenizer_json = {'pre_tokenizer': {'type': 'Split', 'pattern': {'Regex': '\\w+'}}}
  with pytest.raises(UserError, match='--gguf_pre=NAME'):
    gguf_io.bpe_pre_name(tokenizer_json, 'tokenizer.json')
