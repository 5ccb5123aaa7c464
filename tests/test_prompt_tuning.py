"""Prompt tuning and prefix tuning (model.virtual_tokens): properties against the base model.

Neither method equals the base model at initialisation (a prompt adds tokens; a prefix of
keys takes softmax mass even with zero values), so instead each is checked against the base
model run on real tokens that play the virtual ones: a prompt made of token embeddings is
the base on [those tokens; input], a prefix made of the base's cached keys/values of some
tokens is the base continuing after them. Plus: decode with the cache = full forward, packed
documents each see the prompt, only the virtual tokens train, FLOPs count the base as frozen.
PEFT parity: tests/golden/peft/llama_gqa_llama3_prompt and _prefix (tools/make_peft_goldens.py:
PromptTuningConfig / PrefixTuningConfig(prefix_projection=False), 4 virtual tokens, random
non-zero values) give PEFT's logits within 1e-4, and `convert --to=peft` writes them back.
"""

import dataclasses
import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from safetensors.numpy import load_file

from llmjax import config as config_lib
from llmjax import convert
from llmjax.errors import CheckpointError, ConfigError
from llmjax.interop import load_hf, peft
from llmjax.models import Cache, Transformer, get_preset, init_params, lora
from llmjax.models.transformer import init_prompt_from_tokens
from llmjax.train import checkpoint
from llmjax.train import state as state_lib

V = 3


def tiny(**kw):
  base = dict(vocab_size=97, num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2,
              head_dim=16, mlp_dim=96, max_seq_len=128, scan_layers=True)
  base.update(kw)
  return get_preset('tiny', **base)


def prompted(cfg, kind='prompt', n=V):
  return dataclasses.replace(cfg, virtual_tokens=kind, num_virtual_tokens=n)


# Jitted, one compile a config (several tests share one): op by op, an init compiles each of
# its primitives.
_init = jax.jit(init_params, static_argnums=0)


@functools.cache
def _jitted_apply(cfg):
  return jax.jit(lambda params, tokens, **kw: Transformer(cfg).apply({'params': params}, tokens,
                                                                     **kw))


def apply(cfg, params, tokens, **kw):
  # Jitted (one compile a config and shape, reused by the decode steps): op by op, each new
  # shape spends seconds compiling every primitive.
  return _jitted_apply(cfg)(params, tokens, **kw)


def tokens_of(seed, b, t, vocab=97):
  return jax.random.randint(jax.random.key(seed), (b, t), 1, vocab)


VARIANTS = {'scan': {}, 'unrolled': dict(scan_layers=False), 'learned_pos': dict(
    position='learned', norm='layernorm', mlp='gelu', qkv_bias=True, tie_embeddings=True),
    'window': dict(sliding_window=4, num_kv_heads=1)}


@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_prompt_of_token_embeddings_is_the_base_on_those_tokens(variant):
  base_cfg = tiny(**VARIANTS[variant])
  cfg = prompted(base_cfg)
  base = _init(base_cfg, jax.random.key(0))
  virtual, toks = tokens_of(1, 1, V), tokens_of(2, 2, 7)
  params = init_prompt_from_tokens({**base, 'prompt_embedding': jnp.zeros((V, 64))}, virtual[0])
  got, _ = apply(cfg, params, toks)
  want, _ = apply(base_cfg, base, jnp.concatenate([jnp.repeat(virtual, 2, 0), toks], 1))
  assert got.shape == (2, 7, 97)
  np.testing.assert_allclose(got, want[:, V:], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize('variant', ['scan', 'unrolled'])
def test_prefix_of_cached_keys_is_the_base_continuing_after_them(variant):
  base_cfg = tiny(**VARIANTS[variant])
  cfg = prompted(base_cfg, 'prefix')
  base = _init(base_cfg, jax.random.key(0))
  virtual, toks = tokens_of(1, 1, V), tokens_of(2, 2, 7)
  _, cache = apply(base_cfg, base, virtual, cache=Cache.zeros(base_cfg, 1, V))
  params = _init(cfg, jax.random.key(5))
  flat = traverse_util.flatten_dict(params)
  for path in flat:
    if path[-1] in ('prefix_k', 'prefix_v'):
      kv = cache.k if path[-1] == 'prefix_k' else cache.v  # [layers, 1, V, kv_heads, head_dim]
      layer = int(path[0].split('_')[1]) if path[0].startswith('layer_') else slice(None)
      flat[path] = kv[layer, 0]
  params = lora.combine(lora.split(traverse_util.unflatten_dict(flat))[0], base)
  got, _ = apply(cfg, params, toks)
  want, _ = apply(base_cfg, base, jnp.concatenate([jnp.repeat(virtual, 2, 0), toks], 1))
  np.testing.assert_allclose(got, want[:, V:], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize('kind', ['prompt', 'prefix'])
def test_decode_with_cache_is_the_full_forward(kind):
  cfg = prompted(tiny(), kind)
  params = _init(cfg, jax.random.key(0))
  toks = tokens_of(3, 2, 9)
  full, _ = apply(cfg, params, toks)
  cache = Cache.zeros(cfg, 2, 16)
  first, cache = apply(cfg, params, toks[:, :5], cache=cache)
  steps = [first]
  for i in range(5, 9):
    out, cache = apply(cfg, params, toks[:, i:i + 1], cache=cache)
    steps.append(out)
  np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=2e-5, rtol=1e-5)
  assert cache.lengths.tolist() == [9, 9]  # the cache counts real tokens only


@pytest.mark.parametrize('kind', ['prompt', 'prefix'])
def test_each_packed_document_sees_the_virtual_tokens(kind):
  cfg = prompted(tiny(), kind)
  params = _init(cfg, jax.random.key(0))
  a, b = tokens_of(4, 1, 5), tokens_of(5, 1, 4)
  row = jnp.concatenate([a, b], 1)
  seg = jnp.array([[1] * 5 + [2] * 4])
  pos = jnp.array([list(range(5)) + list(range(4))])
  packed, _ = apply(cfg, params, row, positions=pos, segment_ids=seg)
  alone_a, _ = apply(cfg, params, a)
  alone_b, _ = apply(cfg, params, b)
  np.testing.assert_allclose(packed, jnp.concatenate([alone_a, alone_b], 1), atol=2e-5,
                             rtol=1e-5)


def test_virtual_tokens_change_the_logits():
  # The tests above could pass with the virtual tokens ignored if the base were also given
  # nothing: here a random prompt must move the output.
  base_cfg = tiny()
  base = _init(base_cfg, jax.random.key(0))
  toks = tokens_of(2, 2, 7)
  want, _ = apply(base_cfg, base, toks)
  for kind in ('prompt', 'prefix'):
    cfg = prompted(base_cfg, kind)
    params = lora.with_base(_init(cfg, jax.random.key(1)), base)
    got, _ = apply(cfg, params, toks)
    assert float(jnp.max(jnp.abs(got - want))) > 1e-3


def test_text_init_repeats_and_cuts_ids_like_peft():
  cfg = prompted(tiny(), n=5)
  params = _init(cfg, jax.random.key(0))
  table = params['embed']['embedding']
  got = init_prompt_from_tokens(params, [7, 8])['prompt_embedding']
  np.testing.assert_array_equal(got, table[jnp.array([7, 8, 7, 8, 7])])
  got = init_prompt_from_tokens(params, list(range(10, 20)))['prompt_embedding']
  np.testing.assert_array_equal(got, table[10:15])


@pytest.mark.parametrize('kind', ['prompt', 'prefix'])
def test_only_the_virtual_tokens_train_and_the_loss_falls(kind):
  cfg = prompted(tiny(), kind, n=4)
  params = _init(cfg, jax.random.key(0))
  mask = state_lib.trainable_mask(cfg, params)
  flat = traverse_util.flatten_dict(mask)
  assert {p[-1] for p, m in flat.items() if m} == (
      {'prompt_embedding'} if kind == 'prompt' else {'prefix_k', 'prefix_v'})
  train, frozen = state_lib.split(params, mask)
  assert sum(x.size for x in jax.tree.leaves(train)) == cfg.num_virtual_params
  toks = jnp.tile(jnp.arange(1, 17)[None], (2, 1))

  def loss_fn(train):
    logits, _ = apply(cfg, state_lib.combine(train, frozen), toks[:, :-1])
    logp = jax.nn.log_softmax(logits, -1)
    return -jnp.mean(jnp.take_along_axis(logp, toks[:, 1:, None], -1))

  opt = optax.adam(0.1)

  @jax.jit
  def step(train, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(train)
    updates, opt_state = opt.update(grads, opt_state)
    return optax.apply_updates(train, updates), opt_state, loss

  opt_state = opt.init(train)
  losses = []
  for _ in range(10):
    train, opt_state, loss = step(train, opt_state)
    losses.append(float(loss))
  # A random tiny base (init_std 0.02) passes little of the prompt through: a small but
  # steady fall is what virtual tokens alone can do here.
  assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.02, losses


def test_flops_count_a_frozen_base_and_the_virtual_parameters():
  base = tiny()
  attention = 12 * base.num_layers * base.num_heads * base.head_dim * 32
  n = (base.flops_per_token(32) - attention) / 6
  prompt, prefix = prompted(base, 'prompt', 4), prompted(base, 'prefix', 4)
  assert prompt.num_virtual_params == 4 * 64
  assert prefix.num_virtual_params == 2 * 2 * 4 * 2 * 16
  assert prompt.flops_per_token(32) == 4 * n + 6 * 4 * 64 + attention
  assert prefix.flops_per_token(32) == 4 * n + 6 * 512 + attention
  assert lora.without_lora(prefix) == base


def test_bad_virtual_token_settings_are_one_line_errors():
  with pytest.raises(ConfigError, match='num_virtual_tokens=0 must be > 0'):
    prompted(tiny(), n=0).validate()
  with pytest.raises(ConfigError, match='lora_rank are both set'):
    dataclasses.replace(prompted(tiny()), lora_rank=4).validate()


# ----------------------------------------------------------------------- PEFT prompt tuning
GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'golden')
PROMPT_ADAPTER = os.path.join(GOLDEN, 'peft', 'llama_gqa_llama3_prompt')  # make_peft_goldens.py
PROMPT_BASE = os.path.join(GOLDEN, 'llama_gqa_llama3')


def prompt_imported(**overrides):
  cfg, params, _ = load_hf(PROMPT_BASE, **overrides)
  cfg = dataclasses.replace(cfg, **peft.prompt_tuning_fields(PROMPT_ADAPTER, cfg))
  return cfg, lora.combine(peft.read_prompt_tuning(PROMPT_ADAPTER, cfg), params)


@pytest.mark.parametrize('scan_layers', [True, False])
def test_peft_prompt_tuning_adapter_gives_peft_logits(scan_layers):
  cfg, params = prompt_imported(scan_layers=scan_layers)
  assert (cfg.virtual_tokens, cfg.num_virtual_tokens) == ('prompt', 4)
  g = np.load(os.path.join(PROMPT_ADAPTER, 'logits.npz'))
  logits, _ = apply(cfg, params, jnp.asarray(g['tokens']))
  np.testing.assert_allclose(np.asarray(logits), g['logits'], atol=1e-4, rtol=0)
  # The prompt matters: the base alone is far from PEFT's logits.
  base_cfg, base, _ = load_hf(PROMPT_BASE)
  plain, _ = apply(base_cfg, base, jnp.asarray(g['tokens']))
  assert np.abs(np.asarray(plain) - g['logits']).max() > 1e-2


def test_convert_to_peft_writes_the_golden_prompt_tuning_adapter(tmp_path, capsys):
  cfg, params = prompt_imported()
  work, out = str(tmp_path / 'run'), str(tmp_path / 'adapter')
  checkpoint.write_params_workdir(work, cfg, params)
  assert convert.main(['--to=peft', f'--src={work}', f'--dst={out}',
                       '--base_model=tests/golden/llama_gqa_llama3']) == 0
  assert 'prompt-tuning params' in capsys.readouterr().out
  ours = load_file(os.path.join(out, peft.WEIGHTS_FILE))
  theirs = load_file(os.path.join(PROMPT_ADAPTER, peft.WEIGHTS_FILE))
  assert sorted(ours) == sorted(theirs) == ['prompt_embeddings']
  np.testing.assert_array_equal(ours['prompt_embeddings'], theirs['prompt_embeddings'])
  with open(os.path.join(out, peft.CONFIG_FILE)) as f, \
       open(os.path.join(PROMPT_ADAPTER, peft.CONFIG_FILE)) as g:
    assert json.load(f) == json.load(g)  # every field PEFT writes, with PEFT's values


def test_prompt_tuning_adapter_for_another_width_is_refused(tmp_path):
  bad = tmp_path / 'adapter'
  shutil.copytree(PROMPT_ADAPTER, bad)
  fields = json.loads((bad / peft.CONFIG_FILE).read_text())
  (bad / peft.CONFIG_FILE).write_text(json.dumps({**fields, 'token_dim': 32}))
  cfg, _, _ = load_hf(PROMPT_BASE)
  with pytest.raises(ConfigError, match='token_dim=32 but this base needs 64'):
    peft.prompt_tuning_fields(str(bad), cfg)
  (bad / peft.CONFIG_FILE).write_text(json.dumps({**fields, 'num_virtual_tokens': 5}))
  with pytest.raises(CheckpointError, match=r"has shape \(4, 64\) but \[5, 64\]"):
    peft.prompt_tuning_fields(str(bad), cfg)


# ------------------------------------------------------------------------------ config.peft


def test_config_peft_keys_reach_the_model_config():
  c = config_lib.base_config('tiny')
  c.peft.method, c.peft.num_virtual_tokens = 'prefix_tuning', 6
  cfg = config_lib.validate(c, data_files=False)
  assert (cfg.virtual_tokens, cfg.num_virtual_tokens, cfg.frozen_base) == ('prefix', 6, True)
  assert config_lib.validate(config_lib.base_config('tiny'), data_files=False).virtual_tokens == ''


def test_learned_positions_must_hold_the_virtual_tokens_too():
  c = config_lib.base_config('gpt2')
  c.data.seq_len = 1020
  c.peft.update(method='prompt_tuning', num_virtual_tokens=8)
  with pytest.raises(ConfigError, match='peft.num_virtual_tokens=8 exceeds model.max_seq_len'):
    config_lib.validate(c, data_files=False)


@pytest.mark.parametrize('change,message', [
    (dict(method='prompt_tunning'), "Did you mean 'prompt_tuning'"),
    (dict(method='prompt_tuning'), 'num_virtual_tokens=0 must be > 0'),
    (dict(num_virtual_tokens=4), "but peft.method=''"),
    (dict(method='prefix_tuning', num_virtual_tokens=4, prompt_init_text='hi'),
     'initialises prompt tuning only'),
    (dict(method='prefix_tuning', num_virtual_tokens=4, objective='dpo'),
     "with train.objective='dpo' is not supported"),
])
def test_bad_peft_keys_are_one_line_errors(change, message):
  c = config_lib.base_config('tiny')
  c.train.objective = change.pop('objective', 'lm')
  c.peft.update(change)
  with pytest.raises(ConfigError, match=message) as e:
    config_lib.validate(c, data_files=False)
  assert '\n' not in str(e.value)


# ------------------------------------------------------------------------------ training runs


def run_config(method, text='', **train):
  cfg, _, _ = load_hf(PROMPT_BASE)
  c = config_lib.base_config('tiny')
  c.model.update(dataclasses.asdict(cfg))
  c.init.hf_dir = PROMPT_BASE
  c.peft.update(method=method, num_virtual_tokens=4, prompt_init_text=text)
  c.data.seq_len = 32
  c.data.eval_batches = 1
  c.train.update(dict(steps=1, batch_size=4, log_every=1, eval_every=1, checkpoint_every=100,
                      unigram_baseline_batches=0, warmup_steps=1, lr=0.0))
  c.train.update(train)
  return c


def test_prompt_tuning_run_starts_from_the_text_and_keeps_the_base(tmp_path, capsys):
  from llmjax.data.pipeline import load_run_tokenizer
  from llmjax.train.loop import train_and_evaluate
  work = str(tmp_path / 'run')
  train_and_evaluate(run_config('prompt_tuning', 'the cat'), work)  # lr 0: step 1 = step 0
  assert 'prompt_tuning: 4 virtual tokens, training 256 parameters, base frozen' in (
      capsys.readouterr().out)
  got, _ = checkpoint.restore_params(work)
  _, base, _ = load_hf(PROMPT_BASE)
  tok = load_run_tokenizer(work)  # the run's own
  ids = ([tok.bos_id] if tok.bos_id >= 0 else []) + list(tok.encode('the cat'))
  ids = (ids * 4)[:4]
  np.testing.assert_array_equal(got['prompt_embedding'], np.asarray(base['embed']['embedding'])[ids])
  assert checkpoint.read_model_config(work).num_virtual_tokens == 4


def test_prefix_tuning_run_trains_the_prefix_only(tmp_path):
  from llmjax.train.loop import train_and_evaluate
  work = str(tmp_path / 'run')
  train_and_evaluate(run_config('prefix_tuning', steps=2, lr=1e-2), work)
  got, _ = checkpoint.restore_params(work)
  fresh = _init(checkpoint.read_model_config(work), jax.random.key(0))
  trained, kept = lora.split(got)
  _, base, _ = load_hf(PROMPT_BASE)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), kept, base)
  assert float(jnp.max(jnp.abs(trained['layers']['attn']['prefix_k']
                               - lora.split(fresh)[0]['layers']['attn']['prefix_k']))) > 1e-3


@pytest.mark.parametrize('kind', ['prompt', 'prefix'])
def test_greedy_sampling_continues_as_the_full_forward_argmax(kind):
  # The sampler's prefill (padded prompts, explicit positions) and cached decode steps must
  # see the virtual tokens as the training forward does.
  from llmjax.infer import sampler
  cfg = prompted(tiny(), kind)
  params = _init(cfg, jax.random.key(0))
  prompts = [[5, 9, 11], [7, 3, 2, 8, 4]]
  outs = sampler.generate(cfg, params, prompts, sampler.SamplingParams(max_new_tokens=4, temperature=0.0),
                          eos_id=-1)
  # One forward over prompt + generated tokens (causal: position i's logits are those of the
  # first i + 1 tokens alone, as in test_train's greedy test): the argmax at the prompt's end
  # and at each generated position must be the next generated token.
  for p, o in zip(prompts, outs):
    assert len(o) == 4
    logits, _ = apply(cfg, params, jnp.asarray([p + o]))
    assert o == [int(t) for t in jnp.argmax(logits[0, len(p) - 1:-1], axis=-1)]


PREFIX_ADAPTER = os.path.join(GOLDEN, 'peft', 'llama_gqa_llama3_prefix')  # make_peft_goldens.py


@pytest.mark.parametrize('scan_layers', [True, False])
def test_peft_prefix_tuning_adapter_gives_peft_logits(scan_layers):
  cfg, params, _ = load_hf(PROMPT_BASE, scan_layers=scan_layers)
  cfg = dataclasses.replace(cfg, **peft.prefix_tuning_fields(PREFIX_ADAPTER, cfg))
  assert (cfg.virtual_tokens, cfg.num_virtual_tokens) == ('prefix', 4)
  params = lora.combine(peft.read_prefix_tuning(PREFIX_ADAPTER, cfg), params)
  # The leaves read are exactly the ones the model declares.
  assert jax.tree.structure(params) == jax.tree.structure(
      jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))))
  g = np.load(os.path.join(PREFIX_ADAPTER, 'logits.npz'))
  logits, _ = apply(cfg, params, jnp.asarray(g['tokens']))
  np.testing.assert_allclose(np.asarray(logits), g['logits'], atol=1e-4, rtol=0)
  base_cfg, base, _ = load_hf(PROMPT_BASE)
  plain, _ = apply(base_cfg, base, jnp.asarray(g['tokens']))
  assert np.abs(np.asarray(plain) - g['logits']).max() > 1e-2


@pytest.mark.parametrize('scan_layers', [True, False])
def test_convert_to_peft_writes_the_golden_prefix_tuning_adapter(scan_layers, tmp_path, capsys):
  cfg, params, _ = load_hf(PROMPT_BASE, scan_layers=scan_layers)
  cfg = dataclasses.replace(cfg, **peft.prefix_tuning_fields(PREFIX_ADAPTER, cfg))
  params = lora.combine(peft.read_prefix_tuning(PREFIX_ADAPTER, cfg), params)
  work, out = str(tmp_path / 'run'), str(tmp_path / 'adapter')
  checkpoint.write_params_workdir(work, cfg, params)
  assert convert.main(['--to=peft', f'--src={work}', f'--dst={out}',
                       '--base_model=tests/golden/llama_gqa_llama3']) == 0
  assert 'prefix-tuning params' in capsys.readouterr().out
  ours = load_file(os.path.join(out, peft.WEIGHTS_FILE))
  theirs = load_file(os.path.join(PREFIX_ADAPTER, peft.WEIGHTS_FILE))
  assert sorted(ours) == sorted(theirs) == ['prompt_embeddings']
  np.testing.assert_array_equal(ours['prompt_embeddings'], theirs['prompt_embeddings'])
  with open(os.path.join(out, peft.CONFIG_FILE)) as f, \
       open(os.path.join(PREFIX_ADAPTER, peft.CONFIG_FILE)) as g:
    assert json.load(f) == json.load(g)
