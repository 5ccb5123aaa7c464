"""llmjax.infer.sampler: cache sizing in whole decode-kernel blocks (same tokens as XLA), and
stop strings."""

import dataclasses

import jax
import pytest

import llmjax.models
from llmjax.infer import engine, sampler
from llmjax.kernels import decode_attention as da


def _model(attention):
  cfg = llmjax.models.get_preset('tiny', vocab_size=64, num_layers=2, embed_dim=64, num_heads=4,
                                 num_kv_heads=2, head_dim=16, mlp_dim=128, max_seq_len=2048,
                                 attention=attention)
  return cfg, llmjax.models.init_params(cfg, jax.random.PRNGKey(0))


@pytest.mark.parametrize('longest, new', [(5, 6), (300, 200), (500, 100), (1000, 900)])
def test_cache_is_whole_decode_blocks_where_the_decode_kernel_runs(longest, new):
  cfg, _ = _model('pallas')
  t, max_len = sampler._shapes(cfg, longest, new, platform='tpu')
  assert t >= longest and max_len >= t + new
  assert max_len == da.cache_length(max_len)  # the kernel reads it without padding
  if max_len > da.BlockSizes().block_k:
    assert max_len % da.BlockSizes().block_k == 0
  # XLA attention reads every slot: there the cache stays as short as the 64-rounding allows.
  t_xla, len_xla = sampler._shapes(dataclasses.replace(cfg, attention='xla'), longest, new,
                                   platform='tpu')
  assert t_xla == t and len_xla <= max_len and len_xla == min(-(-(t + new) // 64) * 64, 2048)


def test_pallas_decode_with_a_block_aligned_cache_gives_the_xla_tokens(monkeypatch):
  # A 48-slot key block makes the rounding visible at test sizes: the sampler's 64-slot cache
  # becomes 96 (two blocks), and the interpreted decode kernel must produce XLA's tokens.
  real = da.BlockSizes
  monkeypatch.setattr(da, 'BlockSizes', lambda block_k=48: real(block_k=block_k))
  allocated = []
  zeros = sampler.Cache.zeros
  monkeypatch.setattr(sampler.Cache, 'zeros',
                      lambda cfg, batch, max_len, dtype=None: allocated.append(max_len)
                      or zeros(cfg, batch, max_len, dtype))
  prompts = [[1, 5, 7, 2, 9], [4, 4]]
  p = sampler.SamplingParams(max_new_tokens=6, temperature=0)
  outs = {}
  for attention in ('xla', 'pallas'):
    cfg, params = _model(attention)
    outs[attention] = sampler.generate(cfg, params, prompts, p, eos_id=-1)
  assert allocated == [64, 96]
  assert outs['pallas'] == outs['xla'] and len(outs['xla'][0]) == 6


# --- Stop strings: `generate --stop=S` cuts the decoded text before S's first occurrence.

@pytest.mark.parametrize('text, stop, expected', [
    ('Hello world. Bye.', ['.'], 'Hello world'),
    ('a\n\nb\n\nc', ['\n\n'], 'a'),
    # The earliest occurrence of any stop string wins, whatever their order in the list.
    ('one, two; three', [';', ','], 'one'),
    ('one, two; three', [',', ';'], 'one'),
    ('User: hi\nAssistant:', ['Assistant:', 'User:'], ''),  # a stop string at the start
    ('no stop here', ['###'], 'no stop here'),
    ('keep all', [], 'keep all'),
    ('empty stop strings are ignored', ['', 'ignored'], 'empty stop strings are '),
    ('abcabc', ['bca', 'cab'], 'a'),  # overlapping candidates: the first position
])
def test_cut_at_stop(text, stop, expected):
  assert sampler.cut_at_stop(text, stop) == expected


def test_generated_text_stops_at_the_first_stop_string():
  # The CLI's path (llmjax/generate.py): ids -> text -> cut; here a character per id.
  cfg, params = _model('xla')
  ids = sampler.generate(cfg, params, [[1, 2, 3]], sampler.SamplingParams(12, temperature=0),
                         eos_id=-1)[0]
  text = ''.join(chr(ord('A') + i) for i in ids)  # ids < 64: printable, one char each
  stop = text[4:6]
  first = text.index(stop)
  cut = sampler.cut_at_stop(text, [stop])
  assert cut == text[:first] and stop not in cut and text.startswith(cut)


def test_dynamic_rope_prefill_sizes_the_base_by_each_unpadded_prompt():
  """Dynamic NTK RoPE sizes its base by a row's largest position: prompt padding (to the
  compile bucket) must not count, so the first greedy token of prompts past the 8-token
  threshold (one batch, three lengths) is the argmax of a full forward of that prompt alone.
  (Later tokens may differ from full forwards by design, in transformers too: cached keys
  keep the base they were rotated with.)"""
  import jax.numpy as jnp
  cfg = llmjax.models.get_preset('tiny', vocab_size=64, num_layers=2, embed_dim=64, num_heads=4,
                                 num_kv_heads=2, head_dim=16, mlp_dim=128, max_seq_len=64,
                                 rope_scaling='dynamic', rope_scaling_factor=4.0,
                                 rope_original_max_len=8, init_std=0.5)
  # A large init makes attention sharp, so a wrong RoPE base changes the greedy tokens.
  params = llmjax.models.init_params(cfg, jax.random.PRNGKey(1))
  prompts = [[(7 * i + 3 * n) % 64 for i in range(n)] for n in (9, 13, 21)]
  outs = sampler.generate(cfg, params, prompts, sampler.SamplingParams(1, temperature=0),
                          eos_id=-1)
  for prompt, out in zip(prompts, outs):
    logits, _ = llmjax.models.Transformer(cfg).apply({'params': params}, jnp.array([prompt]))
    assert out == [int(jnp.argmax(logits[0, -1]))], len(prompt)


# --- stream: one prompt token by token, the same engine as generate.

@pytest.mark.parametrize('p', [sampler.SamplingParams(10, temperature=0),
                               sampler.SamplingParams(10, temperature=1.0, top_k=20, top_p=0.9)],
                         ids=['greedy', 'sampled'])
def test_stream_yields_the_tokens_of_generate(p):
  cfg, params = _model('xla')
  for prompt, seed in [([1, 5, 7, 2, 9], 0), ([4] * 17, 3)]:  # 17: a second prefill bucket
    want = sampler.generate(cfg, params, [prompt], p, eos_id=-1, seed=seed)[0]
    assert len(want) == 10
    assert list(sampler.stream(cfg, params, prompt, p, eos_id=-1, seed=seed)) == want
    # Stopped before the first EOS, as generate's result is: the third token as the EOS id.
    eos = (want[2], min(set(range(64)) - set(want)))  # a second id that never comes
    cut = sampler.generate(cfg, params, [prompt], p, eos_id=eos, seed=seed)[0]
    assert cut == want[:want.index(eos[0])]
    assert list(sampler.stream(cfg, params, prompt, p, eos_id=eos, seed=seed)) == cut


def test_stream_compiles_its_step_once_and_yields_before_finishing():
  cfg, params = _model('xla')
  p = sampler.SamplingParams(12, temperature=0)
  list(sampler.stream(cfg, params, [1, 2, 3], p, eos_id=-1))  # compiled for this cache length
  before = engine.jit_decode_step._cache_size()
  tokens = sampler.stream(cfg, params, [3, 2, 1, 5], p, eos_id=-1)
  first = next(tokens)  # a token is out before the others are computed
  assert isinstance(first, int) and len([first, *tokens]) == 12
  assert engine.jit_decode_step._cache_size() == before  # 11 steps, no new compile
  with pytest.raises(Exception, match='exceeds the model context 2048'):
    next(sampler.stream(cfg, params, [1] * 2040, p, eos_id=-1))
