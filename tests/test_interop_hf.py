"""Hugging Face import/export against goldens made by transformers (tools/make_hf_goldens.py).

Each tests/golden/<name>/ is a transformers save_pretrained of a tiny random-weight model plus
its logits for fixed tokens (golden.npz) and a 32-step greedy continuation (golden.json). No
torch here: equality with transformers is checked against those recorded outputs.
"""

import dataclasses
import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from llmjax import convert
from llmjax.errors import CheckpointError, ConfigError
from llmjax.interop import (ARCHITECTURES, HFSentencePieceTokenizer, HFTokenizer, config_from_hf,
                            config_to_hf, load_hf, save_hf)
from llmjax.models import Cache, Transformer
from llmjax.train import checkpoint

GOLDEN = os.path.join(os.path.dirname(__file__), 'golden')
# transformers-made checkpoints (export_sentencepiece, an llmjax export, is test_export_hf's).
NAMES = sorted(d for d in os.listdir(GOLDEN) if os.path.exists(os.path.join(GOLDEN, d, 'golden.npz')))
MAX_LOGIT_DIFF = 1e-4


def golden(name):
  d = os.path.join(GOLDEN, name)
  with open(os.path.join(d, 'golden.json')) as f:
    return d, np.load(os.path.join(d, 'golden.npz')), json.load(f)


@functools.cache
def loaded(name, **overrides):
  return load_hf(os.path.join(GOLDEN, name), **overrides)


def test_goldens_cover_every_architecture():
  archs = set()
  for name in NAMES:
    with open(os.path.join(GOLDEN, name, 'config.json')) as f:
      archs.add(json.load(f)['architectures'][0])
  # Reward models (*ForSequenceClassification) are their LM family's tensors with `score.weight`
  # for `lm_head.weight`: tests/golden/reward (test_reward.py) covers the score head on Llama.
  from llmjax.interop.families import SCORE_OF
  with open(os.path.join(GOLDEN, 'reward', 'config.json')) as f:
    assert json.load(f)['architectures'] == ['LlamaForSequenceClassification']
  assert archs == set(ARCHITECTURES) - set(SCORE_OF.values())


@pytest.mark.parametrize('name', NAMES)
def test_logits_match_transformers(name):
  _, g, _ = golden(name)
  cfg, params, _ = loaded(name)
  logits, _ = Transformer(cfg).apply({'params': params}, jnp.asarray(g['tokens']))
  diff = float(np.max(np.abs(np.asarray(logits) - g['logits'])))
  print(f'{name}: max |logit diff| vs transformers {diff:.2e}')
  assert diff <= MAX_LOGIT_DIFF


def greedy(cfg, params, prompt: np.ndarray, steps: int) -> np.ndarray:
  """Prefill, then one token per step through the KV cache (prompts of equal length)."""
  model = Transformer(cfg)
  step = jax.jit(lambda p, tok, cache: model.apply({'params': p}, tok, cache=cache))
  cache = Cache.zeros(cfg, prompt.shape[0], prompt.shape[1] + steps)
  logits, cache = step(params, jnp.asarray(prompt), cache)
  out = []
  for _ in range(steps):
    tok = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)  # [batch]
    out.append(tok)
    logits, cache = step(params, tok[:, None], cache)
  return np.stack([np.asarray(t) for t in out], axis=1)


@pytest.mark.parametrize('name', NAMES)
def test_greedy_kv_cache_decoding_matches_generate(name):
  _, _, g = golden(name)
  # One family unscanned, so both param layouts are checked end to end.
  overrides = {'scan_layers': False} if name == 'mistral_window' else {}
  cfg, params, _ = loaded(name, **overrides)
  ids = greedy(cfg, params, np.asarray(g['prompt'], np.int32), len(g['generated'][0]))
  assert ids.tolist() == g['generated']


@pytest.mark.parametrize('name', ['qwen2_all_sliding', 'gpt2'])
def test_project_sampler_greedy_matches_generate(name):
  """What `python -m llmjax.generate --hf=DIR --temperature=0` runs."""
  sampler = pytest.importorskip('llmjax.infer.sampler')
  _, _, g = golden(name)
  cfg, params, _ = loaded(name)
  p = sampler.SamplingParams(max_new_tokens=len(g['generated'][0]), temperature=0.0)
  assert sampler.generate(cfg, params, g['prompt'], p, eos_id=-1) == g['generated']


def test_dynamic_ntk_rope_grows_the_base_past_the_pretraining_context():
  cfg, _, _ = loaded('llama_dynamic_ntk')
  from llmjax.models.rope import inv_frequencies
  assert (cfg.rope_scaling, cfg.rope_scaling_factor, cfg.rope_original_max_len) == ('dynamic', 4.0, 8)
  plain = inv_frequencies(dataclasses.replace(cfg, rope_scaling=''))
  got = np.asarray(inv_frequencies(cfg, seq_len=jnp.array([3, 8, 9, 48])))  # [4, head_dim / 2]
  np.testing.assert_array_equal(got[:2], np.stack([plain, plain]))  # up to 8: unscaled
  d = cfg.head_dim
  for row, n in zip(got[2:], (9, 48)):  # transformers' formula, by hand in float64
    base = 10_000.0 * (4.0 * n / 8 - 3.0) ** (d / (d - 2))
    np.testing.assert_allclose(row, base ** (-np.arange(0, d, 2) / d), rtol=1e-5)


def test_dynamic_ntk_sampler_and_export():
  """The project sampler past max_position_embeddings (context raised with max_seq_len), and
  the export keeps transformers' threshold, max_position_embeddings, at the original 8."""
  sampler = pytest.importorskip('llmjax.infer.sampler')
  _, _, g = golden('llama_dynamic_ntk')
  cfg, params, _ = load_hf(os.path.join(GOLDEN, 'llama_dynamic_ntk'), max_seq_len=64)
  p = sampler.SamplingParams(max_new_tokens=len(g['generated'][0]), temperature=0.0)
  assert sampler.generate(cfg, params, g['prompt'], p, eos_id=-1) == g['generated']
  hf = config_to_hf(cfg)
  assert hf['max_position_embeddings'] == 8
  assert hf['rope_scaling'] == {'rope_type': 'dynamic', 'factor': 4.0}


def stored_tensors(d):
  out = {}
  for f in sorted(os.listdir(d)):
    if f.endswith('.safetensors'):
      with safe_open(os.path.join(d, f), framework='numpy') as h:
        out.update({k: h.get_tensor(k) for k in h.keys()})
  return out


@pytest.mark.parametrize('name', ['gpt2', 'qwen2_bias_tied', 'llama_gqa_llama3'])
def test_export_writes_the_transformers_tensors_and_reimports_exactly(name, tmp_path):
  src, g, _ = golden(name)
  cfg, params, _ = loaded(name)
  files = save_hf(str(tmp_path), cfg, params, tokenizer_dir=src, max_shard_bytes=60_000)
  assert len(files) > 1 and os.path.exists(tmp_path / 'model.safetensors.index.json')
  with open(tmp_path / 'model.safetensors.index.json') as f:
    assert set(json.load(f)['weight_map'].values()) == set(files)
  # Byte-identical to what transformers saved: names, layouts (fused c_attn, Conv1D) and values.
  ours, theirs = stored_tensors(tmp_path), stored_tensors(src)
  assert sorted(ours) == sorted(theirs)
  for k in theirs:
    np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
  with open(tmp_path / 'config.json') as f:
    hf = json.load(f)
  assert hf['torch_dtype'] == 'float32' and hf['architectures'] == json.load(
      open(os.path.join(src, 'config.json')))['architectures']
  assert os.path.exists(tmp_path / 'generation_config.json')
  cfg2, params2, _ = load_hf(str(tmp_path))
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_export_picks_family_and_rejects_what_it_cannot_hold():
  cfg, _, _ = loaded('mistral_window')
  assert config_to_hf(cfg)['architectures'] == ['MistralForCausalLM']
  assert config_to_hf(cfg)['sliding_window'] == 8
  with pytest.raises(ConfigError, match='no sliding window; export this model as Mistral'):
    config_to_hf(cfg, 'LlamaForCausalLM')
  with pytest.raises(ConfigError, match="Supported: LlamaForCausalLM, Qwen2ForCausalLM"):
    config_to_hf(cfg, 'GemmaForCausalLM')
  qwen = config_to_hf(loaded('qwen2_all_sliding')[0])
  assert (qwen['use_sliding_window'], qwen['max_window_layers'], qwen['sliding_window']) == (True, 0, 8)
  llama3 = config_to_hf(loaded('llama_gqa_llama3')[0])
  assert llama3['rope_scaling'] == {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0,
                                    'high_freq_factor': 4.0, 'original_max_position_embeddings': 32}


def test_bfloat16_checkpoint_loads_as_bfloat16(tmp_path):
  src, g, _ = golden('qwen2_bias_tied')
  tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in stored_tensors(src).items()}
  save_file(tensors, str(tmp_path / 'model.safetensors'), metadata={'format': 'pt'})
  with open(os.path.join(src, 'config.json')) as f:
    hf = json.load(f)
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump(dict(hf, dtype='bfloat16'), f)
  cfg, params, _ = load_hf(str(tmp_path))
  assert cfg.param_dtype == cfg.dtype == 'bfloat16'
  q = params['layers']['attn']['q']['kernel']
  assert q.dtype == jnp.bfloat16
  want = tensors['model.layers.1.self_attn.q_proj.weight'].T.reshape(q.shape[1:])
  np.testing.assert_array_equal(np.asarray(q[1]), want)
  # float32 compute from bf16 storage: close to the float32 model's logits.
  cfg32, params32, _ = load_hf(str(tmp_path), dtype='float32', param_dtype='float32')
  logits, _ = Transformer(cfg32).apply({'params': params32}, jnp.asarray(g['tokens']))
  assert float(np.max(np.abs(np.asarray(logits) - g['logits']))) < 0.5


def test_cli_round_trip(tmp_path, capsys):
  src, g, _ = golden('llama_mqa_tied_linear')
  work, out = str(tmp_path / 'llmjax'), str(tmp_path / 'hf')
  assert convert.main(['--from=hf', f'--src={src}', f'--dst={work}']) == 0
  cfg = checkpoint.read_model_config(work)
  params, step = checkpoint.restore_params(work)  # the training code's own reader
  assert step == 0 and cfg == loaded('llama_mqa_tied_linear')[0]
  assert os.path.exists(os.path.join(work, 'tokenizer.model'))
  logits, _ = Transformer(cfg).apply({'params': params}, jnp.asarray(g['tokens']))
  assert float(np.max(np.abs(np.asarray(logits) - g['logits']))) <= MAX_LOGIT_DIFF
  assert convert.main(['--to=hf', f'--src={work}', f'--dst={out}', '--max_shard_bytes=100000']) == 0
  ours, theirs = stored_tensors(out), stored_tensors(src)
  assert sorted(ours) == sorted(theirs)
  for k in theirs:
    np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
  assert isinstance(load_hf(out)[2], HFSentencePieceTokenizer)
  assert convert.main(['--from=hf', f'--src={src}', f'--dst={work}']) == 1
  assert convert.main(['--form=hf']) == 1
  err = capsys.readouterr().err
  assert 'already exists; pass a new --dst' in err and "Did you mean '--from'" not in err
  assert "unknown flag '--form=hf'. Did you mean 'from'?" in err


# ------------------------------------------------------------------------------ tokenizers


def test_tokenizer_json_with_special_tokens_and_chat_template():
  _, _, tok = loaded('qwen2_bias_tied')
  assert isinstance(tok, HFTokenizer)
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  assert tok.vocab_size <= 256 and tok.eos_ids == [2]
  ids = tok.encode('hello world, the lazy fox')
  assert ids and tok.bos_id not in ids and tok.eos_id not in ids
  assert tok.decode(ids) == 'hello world, the lazy fox'
  assert tok.decode([tok.bos_id] + ids + [tok.eos_id]) == 'hello world, the lazy fox'
  assert "<|assistant|>" in tok.chat_template
  assert loaded('llama_gqa_llama3')[2].chat_template is None


def test_sentencepiece_tokenizer_model():
  import pickle
  _, _, tok = loaded('llama_mqa_tied_linear')
  assert isinstance(tok, HFSentencePieceTokenizer)
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
  ids = tok.encode('hello world')
  assert ids and 1 not in ids and tok.decode(ids) == 'hello world'
  again = pickle.loads(pickle.dumps(tok))  # grain workers receive tokenizers by pickling
  assert (again.bos_id, again.eos_id, again.pad_id, again.encode('hello world')) == (1, 2, 3, ids)


def test_special_tokens_from_generation_config_when_tokenizer_config_names_none(tmp_path):
  src, _, _ = golden('llama_gqa_llama3')
  for f in ('tokenizer.json', 'config.json'):
    shutil.copy(os.path.join(src, f), tmp_path / f)
  with open(tmp_path / 'generation_config.json', 'w') as f:
    json.dump({'bos_token_id': 1, 'eos_token_id': [2, 0]}, f)
  from llmjax.interop.tokenizer import load_tokenizer
  tok = load_tokenizer(str(tmp_path))
  assert (tok.bos_id, tok.eos_id, tok.eos_ids, tok.pad_id) == (1, 2, [0, 2], 2)


# ------------------------------------------------------------------------------ config.json


LLAMA = dict(architectures=['LlamaForCausalLM'], vocab_size=256, hidden_size=64,
             intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)


def test_transformers4_config_spelling():
  cfg = config_from_hf(dict(LLAMA, rope_theta=500000.0, torch_dtype='bfloat16', rope_scaling={
      'type': 'linear', 'factor': 4.0}))
  assert (cfg.rope_theta, cfg.rope_scaling, cfg.rope_scaling_factor) == (500000.0, 'linear', 4.0)
  assert cfg.param_dtype == cfg.dtype == 'bfloat16' and cfg.head_dim == 16
  cfg = config_from_hf(dict(LLAMA, rope_scaling={
      'rope_type': 'llama3', 'factor': 32.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
      'original_max_position_embeddings': 8192}), dtype='float32', remat='full')
  assert (cfg.rope_scaling, cfg.rope_original_max_len, cfg.remat) == ('llama3', 8192, 'full')
  assert config_from_hf(dict(LLAMA, attention_bias=True)).out_bias


QWEN = dict(LLAMA, architectures=['Qwen2ForCausalLM'], sliding_window=16, max_window_layers=1)


def test_qwen2_sliding_window_fields():
  assert config_from_hf(dict(QWEN, use_sliding_window=False)).sliding_window == 0
  assert config_from_hf(dict(QWEN, use_sliding_window=True, max_window_layers=0)).sliding_window == 16
  assert config_from_hf(dict(QWEN, use_sliding_window=True, max_window_layers=2)).sliding_window == 0
  with pytest.raises(ConfigError, match='use_sliding_window=true with max_window_layers=1 .* slides'
                     ' 1 of 2 layers'):
    config_from_hf(dict(QWEN, use_sliding_window=True))


@pytest.mark.parametrize('fields, message', [
    (dict(rope_scaling={'rope_type': 'yarn', 'factor': 4.0}),
     r"rope_scaling.rope_type='yarn' is not supported; llmjax implements \['default', 'linear'"),
    (dict(rope_scaling={'rope_type': 'linear', 'factor': 2.0, 'attention_factor': 0.5}),
     r"rope_scaling fields \['attention_factor'\] are not supported for rope_type='linear'"),
    (dict(hidden_act='gelu'), r"hidden_act='gelu' is not supported for LlamaForCausalLM"),
    (dict(architectures=['GemmaForCausalLM']),
     r"architectures=\['GemmaForCausalLM'\] is not supported; llmjax imports LlamaForCausalLM,"
     " Qwen2ForCausalLM, MistralForCausalLM, GPT2LMHeadModel"),
    (dict(quantization_config={'quant_method': 'gptq'}), 'dequantize the checkpoint first'),
    (dict(hidden_size=None), "required field 'hidden_size' is missing"),
    (dict(num_attention_heads=0), 'num_attention_heads=0 must be positive'),
    (dict(hidden_size='sixty-four'), "hidden_size='sixty-four' is not a number"),
    (dict(rope_scaling={'rope_type': 'linear', 'factor': 'two'}),
     r"rope_scaling.factor='two' is not a number"),
    (dict(rope_scaling={'rope_type': 'dynamic', 'factor': 2.0}, max_position_embeddings=None),
     "required field 'max_position_embeddings' is missing"),
])
def test_unsupported_config_fields_are_named(fields, message):
  with pytest.raises(ConfigError, match=message):
    config_from_hf(dict(LLAMA, **fields))


def test_gpt2_rejects_exact_gelu():
  with pytest.raises(ConfigError, match="activation_function='gelu' is not supported for GPT2"):
    config_from_hf(dict(architectures=['GPT2LMHeadModel'], vocab_size=10, n_embd=8, n_layer=1,
                        n_head=2, n_positions=16, activation_function='gelu'))


# ------------------------------------------------------------------------------ bad checkpoints


def copy_golden(name, tmp_path, edit=None):
  src = os.path.join(GOLDEN, name)
  for f in os.listdir(src):
    shutil.copy(os.path.join(src, f), tmp_path / f)
  if edit:
    tensors = stored_tensors(src)
    edit(tensors)
    for f in os.listdir(tmp_path):
      if 'safetensors' in f:
        os.remove(tmp_path / f)
    save_file(tensors, str(tmp_path / 'model.safetensors'))
  return str(tmp_path)


def test_missing_tensor_is_named(tmp_path):
  d = copy_golden('llama_dynamic', tmp_path,
                  lambda t: t.pop('model.layers.1.mlp.up_proj.weight'))
  with pytest.raises(CheckpointError, match=r'missing tensors model.layers.1.mlp.up_proj.weight for'
                     ' a LlamaForCausalLM'):
    load_hf(d)


def test_unexpected_tensor_is_named(tmp_path):
  def add(t):
    t['model.layers.0.self_attn.q_proj.bias'] = np.zeros(64, np.float32)
  with pytest.raises(CheckpointError, match=r'unexpected tensors model.layers.0.self_attn.q_proj.bias;'):
    load_hf(copy_golden('llama_dynamic', tmp_path, add))


def test_buffers_and_tied_head_copies_are_ignored(tmp_path):
  def add(t):
    t['transformer.h.0.attn.bias'] = np.tril(np.ones((1, 1, 64, 64), np.float32))
    t['transformer.h.1.attn.masked_bias'] = np.array(-1e4, np.float32)
    t['lm_head.weight'] = t['transformer.wte.weight']
    for k in [k for k in t if k.startswith('transformer.')]:  # OpenAI's names have no prefix
      t[k[len('transformer.'):]] = t.pop(k)
  cfg, params, _ = load_hf(copy_golden('gpt2', tmp_path, add))
  jax.tree.map(np.testing.assert_array_equal, params, loaded('gpt2')[1])


def test_shape_mismatch_names_tensor_and_both_shapes(tmp_path):
  def edit(t):
    t['model.layers.0.self_attn.k_proj.weight'] = np.zeros((48, 64), np.float32)
  with pytest.raises(CheckpointError, match=r'tensor model.layers.0.self_attn.k_proj.weight has shape'
                     r' \[48, 64\] but config.json implies \[64, 64\]'):
    load_hf(copy_golden('llama_dynamic', tmp_path, edit))


def test_truncated_and_missing_shards_name_the_file(tmp_path):
  d = copy_golden('llama_gqa_llama3', tmp_path)
  shard = os.path.join(d, 'model-00002-of-00003.safetensors')
  data = open(shard, 'rb').read()
  with open(shard, 'wb') as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(CheckpointError, match=r'model-00002-of-00003.safetensors is truncated'):
    load_hf(d)
  os.remove(shard)
  with pytest.raises(CheckpointError, match=r"lists shards \['model-00002-of-00003.safetensors'\]"
                     " that are not in"):
    load_hf(d)


def test_no_weights_or_config(tmp_path):
  with pytest.raises(CheckpointError, match='config.json not found'):
    load_hf(str(tmp_path))
  shutil.copy(os.path.join(GOLDEN, 'gpt2', 'config.json'), tmp_path / 'config.json')
  (tmp_path / 'pytorch_model.bin').write_bytes(b'')
  with pytest.raises(CheckpointError, match=r"neither model.safetensors nor .*found \['pytorch_model.bin'\]"):
    load_hf(str(tmp_path))


def test_config_json_that_is_not_an_object(tmp_path):
  (tmp_path / 'config.json').write_text('[1, 2]')
  with pytest.raises(CheckpointError, match='holds a JSON list, not an object of config fields'):
    load_hf(str(tmp_path))


def test_reading_into_a_config_with_adapters_names_the_fix():
  # Used to be an AssertionError ('interop tensor map out of date').
  with pytest.raises(CheckpointError, match=r'holds no LoRA adapters \(layers/attn/q/lora_a,'
                     r' layers/attn/q/lora_b\); load it without lora_rank'):
    load_hf(os.path.join(GOLDEN, 'llama_dynamic'), lora_rank=4, lora_targets=('q',))


def test_export_rejects_params_of_another_model(tmp_path):
  cfg, params, _ = loaded('llama_dynamic')
  other = dataclasses.replace(cfg, mlp_dim=96)
  with pytest.raises(CheckpointError, match=r"param \['layers'\]\['mlp'\]\['down'\]\['kernel'\] has"
                     r" shape \[2, 128, 64\] but the model config implies \[2, 96, 64\]"):
    save_hf(str(tmp_path), other, params)
