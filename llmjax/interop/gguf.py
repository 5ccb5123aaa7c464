"""GGUF export for llama.cpp and Ollama: a Hugging Face checkpoint dir -> one .gguf file.

    python -m llmjax.convert --to=gguf --src=WORKDIR --dst=model.gguf --gguf_type=q8_0

`convert --to=gguf` first writes the workdir as a Hugging Face dir (`save_hf`, the export that
transformers is checked against), then `hf_to_gguf` turns that dir into GGUF the way llama.cpp's
own `convert_hf_to_gguf.py` does for `LlamaForCausalLM` / `MistralForCausalLM` (arch `llama`)
and `Qwen2ForCausalLM` (arch `qwen2`), with the `gguf` package that script uses:

- metadata: `{arch}.block_count, context_length, embedding_length, feed_forward_length,
  attention.head_count, attention.head_count_kv, attention.key_length/value_length,
  rope.freq_base, rope.dimension_count, attention.layer_norm_rms_epsilon`, linear RoPE scaling
  as `rope.scaling.type/factor`, Llama 3 RoPE scaling as the `rope_freqs.weight` tensor of
  per-frequency divisors (llama.cpp reads no llama3 keys); `general.file_type`.
- tensors: llama.cpp's names (`gguf.get_tensor_name_map`), shapes as stored by transformers
  ([out, in]); for arch `llama` the Q and K rows permuted from the rotate-half layout of
  transformers to the interleaved pairs llama.cpp's `llama` RoPE rotates (`permute`); Qwen2 is
  NEOX-style in llama.cpp, so its rows stay. A tied head is left out (llama.cpp reuses
  `token_embd`).
- types (`GGUF_TYPES`): norms, biases and `rope_freqs` always float32, as llama.cpp's converter;
  the matrices in the chosen type. `q4_0` keeps the head (`output.weight`, or the tied
  `token_embd`) at Q8_0: llama-quantize keeps it at Q6_K for Q4_0 files because the head is the
  most sensitive tensor, and the `gguf` package cannot write Q6_K.
- tokenizer: a sentencepiece `tokenizer.model` as `tokenizer.ggml.model='llama'` with its
  pieces, scores and token types (and `add_space_prefix` from the model's own normalizer, which
  llmjax trains without the dummy prefix); a byte-level BPE `tokenizer.json` as `'gpt2'` with
  its merges and the pre-tokenizer name written explicitly (`PRE_TOKENIZERS`: llama.cpp's
  converter guesses it from a hash of the tokenizer's output and refuses unknown hashes; here
  it is read from the pre-tokenizer's regex, and `--gguf_pre` names it when that is not one
  of the known ones). Special ids, `add_bos_token` and the chat template via `gguf.SpecialVocab`.
  `add_bos_token` defaults to what `llmjax.generate` does (a BOS before every prompt when the
  tokenizer has one), so llama.cpp tokenizes prompts as llmjax does.

Not representable in llama.cpp's `llama`/`qwen2` graphs (refused by `check_exportable` before
anything is read): GPT-2 (llama.cpp has its own `gpt2` arch, not wired here), score heads,
virtual tokens, RoPE scaling other than linear / llama3. A sliding window is written as
nothing (llama.cpp's `llama` arch attends to the whole context, as its converter does for
Mistral): a warning says so.

`read_tensors(path)` reads a file back as transformers' tensors (dequantized, Q/K rows
un-permuted): the tests run llmjax on exactly the weights llama.cpp runs.
"""

import hashlib
import json
import os
import re
from typing import Iterator

import numpy as np

from llmjax.errors import CheckpointError, UserError, closest
from llmjax.models.config import ModelConfig

# --gguf_type -> (matrix type name, llama.cpp's general.file_type name)
GGUF_TYPES = {
    'f32': ('F32', 'ALL_F32'),
    'f16': ('F16', 'MOSTLY_F16'),
    'q8_0': ('Q8_0', 'MOSTLY_Q8_0'),
    'q4_0': ('Q4_0', 'MOSTLY_Q4_0'),
}
BLOCK = 32  # Q8_0 / Q4_0 quantize rows in blocks of 32 values

# transformers architecture (`families.family_for`) -> llama.cpp arch
ARCHES = {'LlamaForCausalLM': 'llama', 'MistralForCausalLM': 'llama', 'Qwen2ForCausalLM': 'qwen2'}

# Pre-tokenizer regexes (the `Split` pattern of tokenizer.json, or byte-level BPE's built-in
# GPT-2 one) -> llama.cpp's `tokenizer.ggml.pre` name, which selects the same regex in llama.cpp.
GPT2_REGEX = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"
PRE_TOKENIZERS = {
    GPT2_REGEX: 'gpt-2',
    # Llama 3
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"
    "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": 'llama-bpe',
    # Qwen2 / Qwen2.5 (single digits)
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+"
    "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": 'qwen2',
}


def arch_of(cfg: ModelConfig, src: str) -> str:
  """llama.cpp's arch for this model, or a one-line UserError naming what llama.cpp lacks."""
  from llmjax.interop import families
  if cfg.head != 'lm':
    raise UserError(f"{src}: model.head='{cfg.head}': GGUF holds language models only; a reward"
                    " model exports with --to=hf.")
  if cfg.virtual_tokens:
    raise UserError(f"{src}: a {cfg.virtual_tokens}-tuning run has virtual tokens that llama.cpp"
                    " cannot load; export its adapter with --to=peft.")
  name = families.family_for(cfg).architecture
  if name not in ARCHES:
    raise UserError(f"{src}: the model exports as {name}; --to=gguf writes the Llama family"
                    f" ({', '.join(ARCHES)}); use --to=hf and llama.cpp's own converter.")
  if cfg.rope_scaling not in ('', 'linear', 'llama3', 'dynamic'):
    raise UserError(f"{src}: RoPE scaling '{cfg.rope_scaling}' has no GGUF form here.")
  if cfg.rope_scaling == 'llama3' and ARCHES[name] != 'llama':
    raise UserError(f"{src}: llama3 RoPE scaling on {name}: llama.cpp reads rope_freqs for arch"
                    " llama only.")
  return ARCHES[name]


def check_exportable(cfg: ModelConfig, gguf_type: str, src: str) -> str:
  """Everything that can be said from the model config alone, before any weight is read:
  the arch (returned), the type, and block-quantized types' row lengths."""
  if gguf_type not in GGUF_TYPES:
    raise UserError(f"--gguf_type={gguf_type!r} is not one of {', '.join(GGUF_TYPES)}."
                    f"{closest(gguf_type, GGUF_TYPES)}")
  arch = arch_of(cfg, src)
  if gguf_type in ('q8_0', 'q4_0'):
    head_dim = cfg.head_dim or cfg.embed_dim // cfg.num_heads
    rows = {'model.embed_dim': cfg.embed_dim, 'model.mlp_dim': cfg.mlp_dim,
            'num_heads * head_dim': cfg.num_heads * head_dim}
    bad = {k: v for k, v in rows.items() if v % BLOCK}
    if bad:
      k, v = next(iter(bad.items()))
      raise UserError(f"--gguf_type={gguf_type} quantizes rows in blocks of {BLOCK}, but"
                      f" {k}={v} is not a multiple of {BLOCK}; use --gguf_type=f16 or f32.")
  return arch


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """[n_head * head_dim, ...] rows, each head's two rotate-half halves -> interleaved pairs
  (llama.cpp's `LlamaModel.permute`): row (h, half, i) -> (h, i, half)."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
  """The inverse of `permute`."""
  return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(cfg: ModelConfig) -> np.ndarray:
  """[head_dim // 2] divisors of the RoPE frequencies (llama.cpp's `rope_freqs`), computed as
  transformers' `_compute_llama3_parameters` scales them: inv_freq / factor = llama3 inv_freq.

  From the model's own `original_max_position_embeddings` (llama.cpp's converter reads it from
  the top level of config.json and so falls back to 8192, Llama 3.1's value, for any other)."""
  head_dim = cfg.head_dim or cfg.embed_dim // cfg.num_heads
  freqs = 1.0 / (cfg.rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
  old = cfg.rope_original_max_len
  low_wavelen = old / cfg.rope_low_freq_factor
  high_wavelen = old / cfg.rope_high_freq_factor
  out = []
  for freq in freqs:
    wavelen = 2 * np.pi / freq
    if wavelen < high_wavelen:
      out.append(1.0)
    elif wavelen > low_wavelen:
      out.append(cfg.rope_scaling_factor)
    else:
      smooth = (old / wavelen - cfg.rope_low_freq_factor) / (
          cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
      out.append(1 / ((1 - smooth) / cfg.rope_scaling_factor + smooth))
  return np.asarray(out, np.float32)


# ------------------------------------------------------------------------------ tokenizer


def _json(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def bpe_pre_name(tokenizer_json: dict, path: str) -> str:
  """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.json, from its regex."""
  pre = tokenizer_json.get('pre_tokenizer') or {}
  parts = pre.get('pretokenizers', [pre]) if pre.get('type') == 'Sequence' else [pre]
  regexes = []
  for p in parts:
    if p.get('type') == 'Split':
      regexes.append((p.get('pattern') or {}).get('Regex'))
    elif p.get('type') == 'ByteLevel' and p.get('use_regex', True):
      regexes.append(GPT2_REGEX)
  if len(regexes) == 1 and regexes[0] in PRE_TOKENIZERS:
    return PRE_TOKENIZERS[regexes[0]]
  raise UserError(f"{path}: pre-tokenizer {json.dumps(pre)[:120]} is not one llmjax knows the"
                  " llama.cpp name of; pass --gguf_pre=NAME (llama.cpp's tokenizer.ggml.pre,"
                  " e.g. llama-bpe, qwen2, gpt-2).")


def _sentencepiece_vocab(path: str, vocab_size: int):
  """(pieces, scores, types, add_dummy_prefix) as llama.cpp's `_create_vocab_sentencepiece`:
  ids past the tokenizer's own up to the embedding's size are `[PAD{i}]`, UNUSED."""
  import gguf
  import sentencepiece as spm
  from sentencepiece import sentencepiece_model_pb2 as model_pb2
  sp = spm.SentencePieceProcessor(model_file=path)
  T = gguf.TokenType
  tokens = [f'[PAD{i}]'.encode() for i in range(vocab_size)]
  scores = [-10000.0] * vocab_size
  types = [T.UNUSED] * vocab_size
  for i in range(min(sp.vocab_size(), vocab_size)):
    tokens[i] = sp.id_to_piece(i).encode('utf-8')
    scores[i] = sp.get_score(i)
    types[i] = (T.UNKNOWN if sp.is_unknown(i) else T.CONTROL if sp.is_control(i)
                else T.UNUSED if sp.is_unused(i) else T.BYTE if sp.is_byte(i) else T.NORMAL)
  proto = model_pb2.ModelProto()
  with open(path, 'rb') as f:
    proto.ParseFromString(f.read())
  return tokens, scores, types, proto.normalizer_spec.add_dummy_prefix


def _bpe_vocab(tokenizer_json: dict, vocab_size: int):
  """(tokens, types) as llama.cpp's `get_vocab_base`: byte-level strings by id, added special
  tokens CONTROL, other added tokens USER_DEFINED, gaps `[PAD{i}]` UNUSED."""
  import gguf
  T = gguf.TokenType
  by_id = {i: t for t, i in tokenizer_json['model']['vocab'].items()}
  special = {}
  for added in tokenizer_json.get('added_tokens', []):
    by_id[added['id']] = added['content']
    special[added['id']] = added.get('special', False)
  tokens, types = [], []
  for i in range(vocab_size):
    if i not in by_id:
      tokens.append(f'[PAD{i}]')
      types.append(T.UNUSED)
    else:
      tokens.append(by_id[i])
      types.append(T.NORMAL if i not in special else T.CONTROL if special[i] else T.USER_DEFINED)
  return tokens, types


def add_tokenizer(writer, hf_dir: str, vocab_size: int, pre: str = '') -> None:
  """Writes the tokenizer of `hf_dir` (tokenizer.model first, as llama.cpp's Llama converter
  prefers sentencepiece, else a byte-level BPE tokenizer.json)."""
  import gguf
  model_path = os.path.join(hf_dir, 'tokenizer.model')
  json_path = os.path.join(hf_dir, 'tokenizer.json')
  if os.path.exists(model_path):
    tokens, scores, types, dummy_prefix = _sentencepiece_vocab(model_path, vocab_size)
    writer.add_tokenizer_model('llama')
    writer.add_tokenizer_pre(pre or 'default')
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(dummy_prefix)
    special = gguf.SpecialVocab(hf_dir, load_merges=False, n_vocab=len(tokens))
  elif os.path.exists(json_path):
    tokenizer_json = _json(json_path)
    model = tokenizer_json.get('model', {})
    if model.get('type') != 'BPE' or model.get('byte_fallback') or (
        (tokenizer_json.get('decoder') or {}).get('type') != 'ByteLevel'):
      raise UserError(f"{json_path}: only byte-level BPE tokenizer.json files have a GGUF form"
                      " here (type 'gpt2'); this one is"
                      f" {model.get('type')} with a {(tokenizer_json.get('decoder') or {}).get('type')}"
                      " decoder.")
    tokens, types = _bpe_vocab(tokenizer_json, vocab_size)
    writer.add_tokenizer_model('gpt2')
    writer.add_tokenizer_pre(pre or bpe_pre_name(tokenizer_json, json_path))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(hf_dir, load_merges=True, n_vocab=len(tokens))
  else:
    raise CheckpointError(f"{hf_dir} has no tokenizer.model or tokenizer.json; llama.cpp needs"
                          " the tokenizer in the file.")
  if 'bos' in special.special_token_ids and 'bos' not in special.add_special_token:
    special.add_special_token['bos'] = True  # as llmjax.generate: BOS before every prompt
  special.add_to_gguf(writer, quiet=True)


# ------------------------------------------------------------------------------ tensors


def _quantize(name: str, x: np.ndarray, gguf_type: str, head: str):
  """(data, type) of one tensor: norms, biases and 1-D tensors float32 (as llama.cpp's
  converter), the head of a q4_0 file Q8_0 (module docstring), the rest in `gguf_type`."""
  import gguf
  Q = gguf.GGMLQuantizationType
  x = x.astype(np.float32)
  if x.ndim <= 1 or name.endswith('_norm.weight'):
    kind = 'F32'
  elif gguf_type == 'q4_0' and name == head:
    kind = 'Q8_0'
  else:
    kind = GGUF_TYPES[gguf_type][0]
  qtype = Q[kind]
  if kind == 'F32':
    return x, qtype
  if kind == 'F16':
    return x.astype(np.float16), qtype
  return gguf.quants.quantize(x, qtype), qtype


def _gguf_tensors(cfg: ModelConfig, arch: str, hf_dir: str) -> Iterator[tuple[str, np.ndarray]]:
  """(llama.cpp name, float array) in transformers' layout, Q/K permuted for arch llama."""
  import gguf

  from llmjax.interop.safetensors_io import Reader
  tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_layers)
  reader = Reader(hf_dir)
  try:
    for name in sorted(reader.shapes, key=_hf_order):
      if name == 'lm_head.weight' and cfg.tie_embeddings:
        continue
      if name.endswith('rotary_emb.inv_freq'):
        continue
      new = tmap.get_name(name, try_suffixes=('.weight', '.bias'))
      if new is None:
        raise CheckpointError(f"{hf_dir}: tensor {name} has no llama.cpp name for arch {arch}.")
      x = np.asarray(reader.read(name), np.float32)
      if arch == 'llama' and re.search(r'\.(q|k)_proj\.(weight|bias)$', name):
        x = permute(x, cfg.num_heads if '.q_proj.' in name else cfg.num_kv_heads)
      yield new, x
  finally:
    reader.close()
  if cfg.rope_scaling == 'llama3':
    yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + '.weight', llama3_rope_factors(cfg)


def _hf_order(name: str):
  """Embedding first, then the blocks in order, then the final norm and head (llama.cpp's)."""
  m = re.search(r'layers\.(\d+)\.', name)
  return (1, int(m.group(1)), name) if m else (0 if 'embed' in name else 2, 0, name)


def hf_to_gguf(hf_dir: str, dst: str, gguf_type: str, *, pre: str = '', name: str = '') -> dict:
  """Writes `dst` (.gguf) from a transformers Llama/Mistral/Qwen2 dir. Returns
  {'arch', 'tensors', 'bytes'}."""
  import gguf

  from llmjax.interop.hf import config_from_hf, read_hf_config
  hf = read_hf_config(hf_dir)
  cfg = config_from_hf(hf, os.path.join(hf_dir, 'config.json'))
  arch = check_exportable(cfg, gguf_type, hf_dir)
  if cfg.sliding_window and cfg.sliding_window < cfg.max_seq_len:
    print(f"warning: llama.cpp's {arch} graph has no sliding window: the exported model attends"
          f" to the whole context, not the last {cfg.sliding_window} tokens (as llama.cpp's own"
          " converter exports Mistral).")
  if cfg.rope_scaling == 'dynamic':
    print("warning: llama.cpp has no dynamic NTK RoPE; the export uses plain RoPE, which equals"
          f" it up to {cfg.rope_original_max_len} tokens.")
  head_dim = cfg.head_dim or cfg.embed_dim // cfg.num_heads
  tmp = dst + '.tmp'
  writer = gguf.GGUFWriter(tmp, arch)
  writer.add_type(gguf.GGUFType.MODEL)
  writer.add_name(name or os.path.basename(os.path.normpath(hf_dir)))
  writer.add_block_count(cfg.num_layers)
  writer.add_context_length(cfg.max_seq_len)
  writer.add_embedding_length(cfg.embed_dim)
  writer.add_feed_forward_length(cfg.mlp_dim)
  writer.add_head_count(cfg.num_heads)
  writer.add_head_count_kv(cfg.num_kv_heads)
  writer.add_key_length(head_dim)
  writer.add_value_length(head_dim)
  writer.add_rope_freq_base(cfg.rope_theta)
  writer.add_rope_dimension_count(head_dim)
  writer.add_layer_norm_rms_eps(cfg.norm_eps)
  writer.add_vocab_size(cfg.vocab_size)
  if cfg.rope_scaling == 'linear':
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(cfg.rope_scaling_factor)
  writer.add_file_type(gguf.LlamaFileType[GGUF_TYPES[gguf_type][1]])
  writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
  add_tokenizer(writer, hf_dir, cfg.vocab_size, pre)
  head = 'token_embd.weight' if cfg.tie_embeddings else 'output.weight'
  count = 0
  for new, x in _gguf_tensors(cfg, arch, hf_dir):
    data, qtype = _quantize(new, x, gguf_type, head)
    writer.add_tensor(new, data, raw_dtype=None if qtype.name in ('F32', 'F16') else qtype)
    count += 1
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  os.replace(tmp, dst)  # a failed export never leaves a truncated .gguf behind
  return {'arch': arch, 'tensors': count, 'bytes': os.path.getsize(dst)}


# ------------------------------------------------------------------------------ reading back


def read_tensors(path: str) -> tuple[dict, dict[str, np.ndarray]]:
  """(metadata {key: value}, {llama.cpp name: float32 array}) of a .gguf file, dequantized,
  Q/K rows un-permuted for arch llama: transformers' layout, [out, in]."""
  import gguf
  reader = gguf.GGUFReader(path)
  meta = {}
  for key, field in reader.fields.items():
    if key.startswith('GGUF.'):
      continue
    meta[key] = field.contents()
  arch = meta['general.architecture']
  tensors = {}
  for t in reader.tensors:
    shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost first
    x = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
    if arch == 'llama' and re.match(r'blk\.\d+\.attn_(q|k)\.(weight|bias)$', t.name):
      n = meta[f'{arch}.attention.head_count' if '.attn_q.' in t.name
               else f'{arch}.attention.head_count_kv']
      x = unpermute(x, n)
    tensors[t.name] = x
  return meta, tensors


def describe(path: str) -> dict:
  """{'metadata': {key: value, arrays as {'len', 'sha256'}}, 'tensors': {name: {'type',
  'shape' (GGUF order, innermost first), 'sha256' of the stored bytes}}}: what two files must
  share to be the same export."""
  import gguf
  reader = gguf.GGUFReader(path)
  meta = {}
  for key, field in reader.fields.items():
    if key.startswith('GGUF.'):
      continue
    value = field.contents()
    if isinstance(value, list):
      value = {'len': len(value),
               'sha256': hashlib.sha256(json.dumps(value, ensure_ascii=False).encode()).hexdigest()}
    meta[key] = value
  tensors = {t.name: {'type': t.tensor_type.name, 'shape': [int(d) for d in t.shape],
                      'sha256': hashlib.sha256(t.data.tobytes()).hexdigest()}
             for t in reader.tensors}
  return {'metadata': meta, 'tensors': tensors}
