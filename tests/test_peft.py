"""PEFT LoRA adapters: import (`init.peft_dir`, `interop.peft.read_adapters`) and export
(`convert --to=peft`) against adapters that PEFT 0.21.2 itself saved.

tests/golden/peft/<name>/ (tools/make_peft_goldens.py) is `PeftModel.save_pretrained` of a
LoraConfig(r=4, lora_alpha=8, all seven projections) over tests/golden/<name>/ with random
non-zero A and B, and logits.npz the adapted model's logits from transformers + peft. The
variants <name>_dora (use_dora, magnitudes moved off their init) and llama_gqa_llama3_rslora
(use_rslora, rank_pattern {'q_proj': 8, 'down_proj': 2}) are built the same way.
"""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from llmjax import config as config_lib
from llmjax import convert
from llmjax.errors import CheckpointError, ConfigError
from llmjax.interop import load_hf, peft
from llmjax.models import Transformer, lora
from llmjax.train import checkpoint
from llmjax.train.loop import train_and_evaluate

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'golden')
NAMES = ('llama_gqa_llama3', 'qwen2_bias_tied')
# {golden adapter: its base golden} for the DoRA and rsLoRA adapters.
VARIANTS = {'llama_gqa_llama3_dora': NAMES[0], 'qwen2_bias_tied_dora': NAMES[1],
            'llama_gqa_llama3_rslora': NAMES[0]}


def base_dir(name):
  return os.path.join(GOLDEN, name)


def adapter_dir(name):
  return os.path.join(GOLDEN, 'peft', name)


def imported(name, **overrides):
  """(LoRA ModelConfig, params with the golden adapter) of golden `name`."""
  cfg, params, _ = load_hf(base_dir(name), **overrides)
  cfg = dataclasses.replace(cfg, lora_rank=4, lora_alpha=8.0)
  family = peft.check_adapter(adapter_dir(name), cfg)
  return cfg, lora.combine(peft.read_adapters(adapter_dir(name), cfg, family), params)


def _forward(cfg):
  """The jitted logits of `cfg` (one compile, reused for the disabled adapters; op by op, each
  forward spends seconds compiling primitives)."""
  return jax.jit(lambda params, tokens: Transformer(cfg).apply({'params': params}, tokens)[0])


@pytest.mark.parametrize('name,scan_layers', [(NAMES[0], True), (NAMES[1], False)])
def test_imported_adapter_gives_peft_logits(name, scan_layers):
  cfg, params = imported(name, scan_layers=scan_layers)
  g = np.load(os.path.join(adapter_dir(name), 'logits.npz'))
  forward = _forward(cfg)
  logits = forward(params, jnp.asarray(g['tokens']))
  np.testing.assert_allclose(np.asarray(logits), g['logits'], atol=1e-4, rtol=0)
  # The adapter matters: without it the logits are far from PEFT's.
  base = forward(lora.disable(params), jnp.asarray(g['tokens']))
  assert np.abs(np.asarray(base) - g['logits']).max() > 1e-2


@pytest.mark.parametrize('name', NAMES)
def test_convert_to_peft_writes_the_golden_adapter(name, tmp_path, capsys):
  cfg, params = imported(name)
  work, out = str(tmp_path / 'run'), str(tmp_path / 'adapter')
  checkpoint.write_params_workdir(work, cfg, params)
  base_model = f'tests/golden/{name}'
  assert convert.main(['--to=peft', f'--src={work}', f'--dst={out}',
                       f'--base_model={base_model}']) == 0
  assert 'adapter params' in capsys.readouterr().out
  ours = load_file(os.path.join(out, peft.WEIGHTS_FILE))
  theirs = load_file(os.path.join(adapter_dir(name), peft.WEIGHTS_FILE))
  assert sorted(ours) == sorted(theirs)
  for n in theirs:
    assert ours[n].shape == theirs[n].shape and ours[n].dtype == theirs[n].dtype, n
    np.testing.assert_allclose(ours[n], theirs[n], atol=1e-6, rtol=0, err_msg=n)
  with open(os.path.join(out, peft.CONFIG_FILE)) as f, \
       open(os.path.join(adapter_dir(name), peft.CONFIG_FILE)) as g:
    ours, theirs = json.load(f), json.load(g)
  # Every field PEFT writes, with PEFT's values; target_modules is a set (PEFT's order varies).
  ours['target_modules'], theirs['target_modules'] = (sorted(ours['target_modules']),
                                                      sorted(theirs['target_modules']))
  assert ours == theirs


def test_convert_to_peft_refuses_a_run_without_lora(tmp_path, capsys):
  cfg, params, _ = load_hf(base_dir(NAMES[0]))
  work = str(tmp_path / 'run')
  checkpoint.write_params_workdir(work, cfg, params)
  assert convert.main(['--to=peft', f'--src={work}', f'--dst={tmp_path / "a"}']) == 1
  err = capsys.readouterr().err
  assert err.startswith('error: ') and 'not a LoRA run' in err and err.count('\n') == 1
  assert not os.path.exists(tmp_path / 'a')


def imported_variant(adapter, **overrides):
  """(ModelConfig with the adapter's LoRA keys, params with the golden adapter)."""
  cfg, params, _ = load_hf(base_dir(VARIANTS[adapter]), **overrides)
  cfg = dataclasses.replace(cfg, **peft.lora_fields(adapter_dir(adapter), cfg))
  cfg.validate()
  family = peft.check_adapter(adapter_dir(adapter), cfg)
  return cfg, lora.combine(peft.read_adapters(adapter_dir(adapter), cfg, family), params)


def test_lora_fields_read_dora_rslora_and_rank_pattern():
  cfg, _, _ = load_hf(base_dir(NAMES[0]))
  assert peft.lora_fields(adapter_dir('llama_gqa_llama3_dora'), cfg)['use_dora'] is True
  fields = peft.lora_fields(adapter_dir('llama_gqa_llama3_rslora'), cfg)
  assert fields['use_rslora'] is True and fields['use_dora'] is False
  assert fields['lora_ranks'] == {'q': 8, 'down': 2} and fields['lora_rank'] == 4


@pytest.mark.parametrize('adapter,scan_layers', [('llama_gqa_llama3_dora', True),
                                                 ('qwen2_bias_tied_dora', False),
                                                 ('llama_gqa_llama3_rslora', True)])
def test_dora_and_rslora_adapters_give_peft_logits_and_merge(adapter, scan_layers):
  cfg, params = imported_variant(adapter, scan_layers=scan_layers)
  g = np.load(os.path.join(adapter_dir(adapter), 'logits.npz'))
  tokens = jnp.asarray(g['tokens'])
  forward = _forward(cfg)
  logits = forward(params, tokens)
  np.testing.assert_allclose(np.asarray(logits), g['logits'], atol=1e-4, rtol=0)
  base = forward(lora.disable(params), tokens)
  assert np.abs(np.asarray(base) - g['logits']).max() > 1e-2
  # The merged weights are the adapted model: PEFT's logits without any adapter.
  merged, merged_cfg = lora.merge(params, cfg)
  got = _forward(merged_cfg)(merged, tokens)
  np.testing.assert_allclose(np.asarray(got), g['logits'], atol=1e-4, rtol=0)


@pytest.mark.parametrize('adapter', sorted(VARIANTS))
def test_save_peft_round_trips_dora_and_rslora(adapter, tmp_path):
  cfg, params = imported_variant(adapter)
  out = str(tmp_path / 'adapter')
  peft.save_peft(out, cfg, params, base_model=f'tests/golden/{VARIANTS[adapter]}')
  ours = load_file(os.path.join(out, peft.WEIGHTS_FILE))
  theirs = load_file(os.path.join(adapter_dir(adapter), peft.WEIGHTS_FILE))
  assert sorted(ours) == sorted(theirs)
  for n in theirs:
    assert ours[n].shape == theirs[n].shape and ours[n].dtype == theirs[n].dtype, n
    np.testing.assert_allclose(ours[n], theirs[n], atol=1e-6, rtol=0, err_msg=n)
  with open(os.path.join(out, peft.CONFIG_FILE)) as f, \
       open(os.path.join(adapter_dir(adapter), peft.CONFIG_FILE)) as g:
    ours_cfg, theirs_cfg = json.load(f), json.load(g)
  for c in (ours_cfg, theirs_cfg):
    c['target_modules'] = sorted(c['target_modules'])
  assert ours_cfg == theirs_cfg
  # ... and reads back as the same model keys and leaves.
  assert peft.lora_fields(out, cfg) == peft.lora_fields(adapter_dir(adapter), cfg)
  back = peft.read_adapters(out, cfg, peft.check_adapter(out, cfg))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), back,
               lora.split(params)[0])


def test_dora_adapter_on_a_plain_lora_model_is_refused(tmp_path):
  c = run_config(NAMES[0])
  c.init.peft_dir = adapter_dir('llama_gqa_llama3_dora')
  assert 'set model.lora_rank=4' in _validate(c) and 'model.use_dora=True' in _validate(c)
  c.model.use_dora = True
  config_lib.validate(c)  # with the key set it is accepted


def test_rank_larger_than_a_projection_is_refused():
  cfg, params = imported(NAMES[0])
  big = dataclasses.replace(cfg, lora_rank=64)  # k_proj is [32, 64]
  with pytest.raises(ConfigError, match='rank 64 is larger than the k_proj projection'):
    peft.save_peft('/nonexistent', big, params)


def test_gpt2_adapters_are_refused():
  cfg, params, _ = load_hf(base_dir('gpt2'))
  cfg = dataclasses.replace(cfg, lora_rank=2)
  with pytest.raises(ConfigError, match='exports as GPT2LMHeadModel'):
    peft.save_peft('/nonexistent', cfg, params)


# ------------------------------------------------------------------- init.peft_dir


def run_config(name, **train):
  cfg, _, _ = load_hf(base_dir(name))
  c = config_lib.base_config('tiny')
  c.model.update(dataclasses.asdict(cfg))
  c.model.lora_rank = 4
  c.model.lora_alpha = 8.0
  c.init.hf_dir = base_dir(name)
  c.init.peft_dir = adapter_dir(name)
  c.data.seq_len = 32
  c.data.eval_batches = 2
  c.train.update(dict(steps=1, batch_size=4, log_every=1, eval_every=1, checkpoint_every=100,
                      unigram_baseline_batches=0, warmup_steps=1, lr=0.0))
  c.train.update(train)
  return c


def test_init_peft_dir_starts_training_from_the_adapter(tmp_path):
  name = NAMES[0]
  # lr = 0: step 1's params are the initial ones, so its eval loss is the start's.
  out = train_and_evaluate(run_config(name), str(tmp_path / 'peft'))
  assert out['step'] == 1
  got, _ = checkpoint.restore_params(str(tmp_path / 'peft'))
  _, want = imported(name)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=0, rtol=0), got, want)
  # The same model from an llmjax workdir holding the import (its adapters merged in): the
  # same eval loss; from the base alone (fresh adapters, B = 0): another one.
  cfg, params = imported(name)
  checkpoint.write_params_workdir(str(tmp_path / 'src'), cfg, params)
  c = run_config(name)
  c.init.hf_dir, c.init.peft_dir, c.init.params_dir = '', '', str(tmp_path / 'src')
  c.data.tokenizer_path = base_dir(name)  # the same token ids as the init.hf_dir run's
  merged = train_and_evaluate(c, str(tmp_path / 'merged'))
  rows = lambda d: [json.loads(l) for l in open(tmp_path / d / 'metrics.jsonl')]
  loss = [r['eval_loss'] for r in rows('peft') if 'eval_loss' in r][-1]
  loss_merged = [r['eval_loss'] for r in rows('merged') if 'eval_loss' in r][-1]
  assert loss == pytest.approx(loss_merged, abs=1e-4)
  c = run_config(name)
  c.init.peft_dir = ''
  train_and_evaluate(c, str(tmp_path / 'base'))
  loss_base = [r['eval_loss'] for r in rows('base') if 'eval_loss' in r][-1]
  assert abs(loss - loss_base) > 1e-2


def _copy_adapter(tmp_path, name=NAMES[0], **fields):
  """A copy of golden adapter `name` with adapter_config.json fields replaced."""
  dst = tmp_path / 'adapter'
  shutil.copytree(adapter_dir(name), dst)
  with open(dst / peft.CONFIG_FILE) as f:
    config = json.load(f)
  config.update(fields)
  with open(dst / peft.CONFIG_FILE, 'w') as f:
    json.dump(config, f)
  return str(dst)


def _validate(c):
  with pytest.raises((ConfigError, CheckpointError)) as e:
    config_lib.validate(c)
  assert '\n' not in str(e.value)
  return str(e.value)


def test_adapter_over_another_base_is_refused():
  c = run_config(NAMES[0])
  c.model.update(dataclasses.asdict(load_hf(base_dir('llama_mqa_tied_linear'))[0]))
  c.model.lora_rank, c.model.lora_alpha = 4, 8.0
  c.init.hf_dir = base_dir('llama_mqa_tied_linear')  # 1 kv head of 24, not 2 of 16
  assert 'was trained on another base model' in _validate(c)


def test_unknown_target_module_is_refused(tmp_path):
  c = run_config(NAMES[0])
  c.init.peft_dir = _copy_adapter(tmp_path, target_modules=['q_proj', 'embed_tokens'])
  msg = _validate(c)
  assert "['embed_tokens']" in msg and 'q_proj' in msg


def test_missing_adapter_config_is_refused(tmp_path):
  c = run_config(NAMES[0])
  c.init.peft_dir = _copy_adapter(tmp_path)
  os.remove(os.path.join(c.init.peft_dir, peft.CONFIG_FILE))
  assert 'has no adapter_config.json' in _validate(c)


@pytest.mark.parametrize('fields,model,match', [
    (dict(alpha_pattern={'q_proj': 4}), {}, "alpha_pattern={'q_proj': 4} is not supported"),
    (dict(rank_pattern={'layers.0.self_attn.q_proj': 8}), {},
     "rank_pattern keys ['layers.0.self_attn.q_proj'] are not names in target_modules"),
    (dict(use_rslora=True), {}, 'model.use_rslora=True'),
    (dict(peft_type='IA3'), {}, "peft_type='IA3'"),
    ({}, dict(lora_rank=8), 'set model.lora_rank=4'),
    ({}, dict(lora_targets=['q', 'v']), 'lora_targets'),
    (dict(r=40), dict(lora_rank=40), "model.lora_rank=40 is larger than the 'k' projection"),
])
def test_adapter_config_mismatches_are_refused(tmp_path, fields, model, match):
  c = run_config(NAMES[0])
  c.init.peft_dir = _copy_adapter(tmp_path, **fields)
  c.model.update(model)
  assert match in _validate(c)


def test_peft_dir_needs_hf_dir():
  c = run_config(NAMES[0])
  c.init.hf_dir = ''
  assert 'needs init.hf_dir' in _validate(c)


def test_mis_shaped_tensor_is_refused(tmp_path):
  c = run_config(NAMES[0])
  c.init.peft_dir = _copy_adapter(tmp_path)
  path = os.path.join(c.init.peft_dir, peft.WEIGHTS_FILE)
  tensors = load_file(path)
  name = 'base_model.model.model.layers.1.mlp.up_proj.lora_B.weight'
  tensors[name] = tensors[name][:64]
  save_file(tensors, path)
  assert f'{name} has shape [64, 4]' in _validate(c)
