"""llmjax.infer.engine and processors: transformers' processor definitions (numpy ports),
transformers' greedy tokens with penalties (goldens from tools/make_generate_goldens.py), no
recompiles across sampling parameters, batch-invariant per-row seeds, log-probs equal to the
trainer's, stop strings while decoding, and the CLI's one-line errors."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llmjax.models
from llmjax import generate as generate_cli
from llmjax.errors import UserError
from llmjax.infer import engine, processors
from llmjax.infer.engine import SamplingParams

GOLDEN = os.path.join(os.path.dirname(__file__), 'golden')
V = 64


@pytest.fixture(scope='module')
def model():
  cfg = llmjax.models.get_preset('tiny', vocab_size=V, num_layers=2, embed_dim=64, num_heads=4,
                                 num_kv_heads=2, head_dim=16, mlp_dim=128, max_seq_len=256,
                                 attention='xla', init_std=0.1)
  return cfg, llmjax.models.init_params(cfg, jax.random.PRNGKey(0))


# --- processors against numpy ports of transformers' definitions

def _ref_repetition(scores, seen_ids, p):
  s = scores.copy()
  for i in set(seen_ids):
    s[i] = s[i] * p if s[i] < 0 else s[i] / p
  return s


def _ref_banned_ngrams(tokens, n):
  """transformers' `_get_ngrams` + `_get_generated_ngrams` for one row."""
  if n == 0 or len(tokens) + 1 < n:
    return set()
  grams = {}
  for i in range(len(tokens) - n + 1):
    grams.setdefault(tuple(tokens[i:i + n - 1]), set()).add(tokens[i + n - 1])
  return grams.get(tuple(tokens[len(tokens) - n + 1:]), set())


def _ref_warp(scores, temperature, top_k, top_p, min_p):
  """TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper."""
  s = (scores / temperature).astype(np.float32)
  if top_k:
    kth = np.sort(s)[::-1][min(top_k, len(s)) - 1]
    s = np.where(s < kth, -np.inf, s)
  if top_p < 1:
    order = np.argsort(s, kind='stable')  # ascending
    probs = np.exp(s[order] - s.max())
    cum = np.cumsum(probs / probs.sum())
    remove = cum <= 1 - top_p
    remove[-1] = False
    s = s.copy()
    s[order[remove]] = -np.inf
  if min_p > 0:
    probs = np.exp(s - s.max())
    probs /= probs.sum()
    remove = probs < min_p * probs.max()
    s = np.where(remove, -np.inf, s)
  return s


def test_repetition_and_openai_penalties_by_hand():
  logits = jnp.array([[2.0, -1.0, 0.5, 3.0], [2.0, -1.0, 0.5, 3.0]])
  history = jnp.array([[1, 3, 0, 3, 0], [0, 0, 0, 0, 0]])  # row 0: prompt [1, 3], out [0, 3]
  length, prompt_len = jnp.array([4, 0]), jnp.array([2, 0])
  out = processors.penalties(logits, history, length, prompt_len, jnp.array([2.0, 2.0]),
                             jnp.array([0.5, 0.5]), jnp.array([0.25, 0.25]))
  # token 0: out once: 2/2 - 0.25 - 0.5; 1: prompt only: -1*2; 2: unseen; 3: prompt+out: 3/2 - .25 - .5
  np.testing.assert_allclose(out[0], [0.25, -2.0, 0.5, 0.75])
  np.testing.assert_allclose(out[1], logits[1])  # nothing seen: unchanged
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(V,)).astype(np.float32)
  seen = rng.integers(0, V, 20)
  got = processors.penalties(jnp.asarray(scores)[None], jnp.asarray(seen)[None], jnp.array([20]),
                             jnp.array([20]), jnp.array([1.3]), jnp.zeros(1), jnp.zeros(1))
  np.testing.assert_allclose(got[0], _ref_repetition(scores, seen.tolist(), 1.3), rtol=1e-6)


def test_no_repeat_ngram_matches_transformers_definition_per_row_n():
  rng = np.random.default_rng(1)
  s, vocab = 24, 6  # a small vocabulary, so n-grams repeat
  history = rng.integers(0, vocab, (8, s)).astype(np.int32)
  length = np.array([1, 2, 5, 12, 20, 24, 9, 16], np.int32)
  n = np.array([3, 2, 3, 1, 4, 2, 0, 5], np.int32)
  out = np.asarray(processors.no_repeat_ngram(jnp.zeros((8, vocab)), jnp.asarray(history),
                                              jnp.asarray(length), jnp.asarray(n)))
  for r in range(8):
    banned = _ref_banned_ngrams(history[r, :length[r]].tolist(), int(n[r]))
    assert set(np.flatnonzero(out[r] == -np.inf)) == banned, r
  assert sum(len(_ref_banned_ngrams(history[r, :length[r]].tolist(), int(n[r])))
             for r in range(8)) > 5  # the case is not vacuous


def test_warpers_per_row_match_transformers_definitions():
  rng = np.random.default_rng(2)
  rows = [(1.0, 0, 1.0, 0.0), (0.7, 5, 1.0, 0.0), (1.3, 0, 0.8, 0.0), (1.0, 0, 1.0, 0.1),
          (0.5, 20, 0.9, 0.05), (2.0, 3, 0.3, 0.5)]
  scores = (rng.normal(size=(len(rows), V)) * 2).astype(np.float32)
  t, k, p, m = (np.array(c) for c in zip(*rows))
  got = np.asarray(processors.warp(jnp.asarray(scores), jnp.asarray(t, jnp.float32),
                                   jnp.asarray(k, jnp.int32), jnp.asarray(p, jnp.float32),
                                   jnp.asarray(m, jnp.float32)))
  for r, row in enumerate(rows):
    want = _ref_warp(scores[r], *row)
    np.testing.assert_array_equal(got[r] == -np.inf, want == -np.inf, err_msg=str(row))
    np.testing.assert_allclose(got[r][want > -np.inf], want[want > -np.inf], rtol=1e-6)


# --- transformers' greedy tokens with the penalties

def _goldens():
  with open(os.path.join(GOLDEN, 'generate', 'greedy_processors.json')) as f:
    g = json.load(f)
  return [(name, setting, v) for name, settings in g.items() if isinstance(settings, dict)
          for setting, v in settings.items()]


@pytest.mark.parametrize('name, setting, g', _goldens(), ids=lambda x: x if isinstance(x, str) else '')
def test_greedy_with_penalties_gives_transformers_tokens(name, setting, g):
  from llmjax.interop import load_hf
  cfg, params, _ = load_hf(os.path.join(GOLDEN, name))
  p = SamplingParams(max_new_tokens=len(g['generated'][0]), temperature=0.0, **g['kwargs'])
  out = engine.generate(cfg, params, g['prompt'], p, eos_id=-1)
  assert [c.ids for c in out] == g['generated']


# --- per-row parameters: no recompiles, batch invariance

MIXED = [SamplingParams(12, temperature=0.0),
         SamplingParams(12, temperature=0.8, top_k=8),
         SamplingParams(12, temperature=1.2, top_p=0.9, repetition_penalty=1.2,
                        presence_penalty=0.5, frequency_penalty=0.3),
         SamplingParams(12, temperature=1.0, min_p=0.05, no_repeat_ngram_size=2)]
PROMPTS = [[1, 5, 7, 2, 9], [4, 4], [3, 8, 8, 8, 1, 2, 6], [9]]


def test_changing_sampling_parameters_never_recompiles(model):
  cfg, params = model
  engine.generate(cfg, params, PROMPTS, MIXED, eos_id=-1, seeds=0)
  sizes = engine.jit_prefill._cache_size(), engine.jit_decode_loop._cache_size()
  other = [SamplingParams(12, temperature=0.5, top_k=3, top_p=0.5, min_p=0.2,
                          repetition_penalty=1.5, presence_penalty=-1.0, frequency_penalty=1.0,
                          no_repeat_ngram_size=3)] * 4
  a = engine.generate(cfg, params, PROMPTS, other, eos_id=[3, 5], seeds=[7, 8, 9, 10])
  assert (engine.jit_prefill._cache_size(), engine.jit_decode_loop._cache_size()) == sizes
  assert all(c.ids for c in a)


def test_a_row_samples_the_same_tokens_whatever_it_is_batched_with(model):
  cfg, params = model
  seeds, rids = [11, 12, 13, 14], [100, 101, 102, 103]
  batched = engine.generate(cfg, params, PROMPTS, MIXED, eos_id=-1, seeds=seeds,
                            request_ids=rids, logprobs=0)
  for r in range(4):
    alone = engine.generate(cfg, params, [PROMPTS[r]], MIXED[r], eos_id=-1, seeds=seeds[r],
                            request_ids=[rids[r]], logprobs=0)[0]
    assert alone.ids == batched[r].ids, r
    np.testing.assert_allclose(alone.logprobs, batched[r].logprobs, atol=1e-5)
  # The greedy row is plain greedy decoding; the seed matters to sampled rows.
  greedy = engine.generate(cfg, params, [PROMPTS[0]], SamplingParams(12, temperature=0.0),
                           eos_id=-1, seeds=99)[0]
  assert greedy.ids == batched[0].ids
  other_seed = engine.generate(cfg, params, PROMPTS, MIXED, eos_id=-1, seeds=[s + 1 for s in seeds],
                               request_ids=rids)
  assert [c.ids for c in other_seed[1:]] != [c.ids for c in batched[1:]]


def test_logprobs_equal_the_trainers_log_softmax_on_the_generated_sequence(model):
  from llmjax.train import losses
  cfg, params = model
  sp = [SamplingParams(10, temperature=0.7, top_k=10, repetition_penalty=1.3),
        SamplingParams(10, temperature=0.0, no_repeat_ngram_size=2)]
  prompts = [[1, 5, 7, 2, 9], [4, 4, 6]]
  out = engine.generate(cfg, params, prompts, sp, eos_id=-1, seeds=3, logprobs=4)
  apply_fn = llmjax.models.Transformer(cfg).apply
  # Jitted (op by op, each forward spends seconds compiling primitives).
  token_logprobs = jax.jit(lambda b: losses.token_logprobs({'params': params}, b, apply_fn))
  forward = jax.jit(lambda x: apply_fn({'params': params}, x)[0])
  for prompt, c in zip(prompts, out):
    seq = prompt + c.ids
    batch = {'inputs': jnp.array([seq[:-1]]), 'targets': jnp.array([seq[1:]]),
             'positions': jnp.arange(len(seq) - 1)[None], 'segment_ids': jnp.ones((1, len(seq) - 1), jnp.int32)}
    want = np.asarray(token_logprobs(batch))[0, len(prompt) - 1:]
    np.testing.assert_allclose(c.logprobs, want, atol=2e-5)
    logits = forward(jnp.array([seq[:-1]]))
    logp = np.asarray(jax.nn.log_softmax(logits[0, len(prompt) - 1:]))
    for i, top in enumerate(c.top_logprobs):
      ids = [t for t, _ in top]
      assert ids == np.argsort(-logp[i], kind='stable')[:4].tolist()
      np.testing.assert_allclose([l for _, l in top], logp[i][ids], atol=2e-5)


# --- stop strings while decoding

def test_decoding_stops_at_the_stop_string(model, monkeypatch):
  cfg, params = model
  decode = lambda ids: ''.join(chr(ord('A') + i) for i in ids)
  sp = SamplingParams(60, temperature=0.0)
  full = engine.generate(cfg, params, [[1, 2, 3]], sp, eos_id=-1)[0].ids
  assert len(full) == 60
  stop = decode(full[5:7])
  first = decode(full).index(stop)
  steps = []
  real = engine.jit_decode_loop
  monkeypatch.setattr(engine, 'jit_decode_loop',
                      lambda *a, **k: steps.append(int(a[3])) or real(*a, **k))
  c = engine.generate(cfg, params, [[1, 2, 3], [1, 2, 3]], sp, eos_id=-1, stop=[stop, '@@'],
                      decode=decode, chunk=4)[0]
  assert c.finish_reason == 'stop' and c.ids == full[:first + len(stop)]
  assert sum(steps) <= first + len(stop) + 4  # stopped within a chunk, not at max_new_tokens
  with pytest.raises(UserError, match='stop string is empty'):
    engine.generate(cfg, params, [[1]], sp, eos_id=-1, stop=[''], decode=decode)


# --- bad input: one-line errors before anything compiles

@pytest.mark.parametrize('kwargs, match', [
    ({'repetition_penalty': -1.0}, 'repetition_penalty'),
    ({'repetition_penalty': 0.0}, 'repetition_penalty'),
    ({'top_p': 0.0}, 'top_p'), ({'top_p': 1.5}, 'top_p'),
    ({'min_p': -0.1}, 'min_p'), ({'min_p': 1.1}, 'min_p'),
    ({'presence_penalty': 3.0}, 'presence_penalty'),
    ({'no_repeat_ngram_size': -1}, 'no_repeat_ngram_size'),
    ({'temperature': -1.0}, 'temperature'), ({'top_k': -2}, 'top_k'),
])
def test_bad_sampling_parameters_are_user_errors(kwargs, match):
  with pytest.raises(UserError, match=match):
    SamplingParams(**kwargs).validate()


@pytest.mark.parametrize('flag, match', [
    ('--repetition_penalty=-1', '--repetition_penalty'), ('--top_p=0', '--top_p'),
    ('--top_p=1.5', '--top_p'), ('--min_p=2', '--min_p'), ('--stop=', '--stop'),
    ('--logprobs=-2', '--logprobs'), ('--logprobs=3', '--json'),
])
def test_generate_cli_rejects_bad_sampling_flags_in_one_line(capsys, monkeypatch, flag, match):
  def no_load(*a, **k):
    raise AssertionError('loaded the model before validating the flags')
  monkeypatch.setattr(generate_cli, 'load', no_load)
  assert generate_cli.main(['--hf=/nonexistent', '--prompt_ids=1,2', flag]) != 0
  err = capsys.readouterr().err
  assert err.startswith('error: ') and err.count('\n') == 1 and match in err, err


def test_config_sample_takes_the_same_options_and_names_the_key():
  from llmjax import config as config_lib
  from llmjax.errors import ConfigError
  from llmjax.infer import sampler
  c = config_lib.base_config('tiny')
  c.sample.repetition_penalty, c.sample.no_repeat_ngram_size, c.sample.min_p = 1.3, 3, 0.1
  p = sampler.sample_params(c.sample)
  assert (p.repetition_penalty, p.no_repeat_ngram_size, p.min_p, p.temperature) == (1.3, 3, 0.1, 0.0)
  c.sample.top_p = 0.0
  with pytest.raises(ConfigError, match=r'^sample\.top_p=0\.0'):
    sampler.sample_params(c.sample)


def test_generate_cli_json_prints_logprobs_and_top_k(capsys):
  hf = os.path.join(GOLDEN, 'qwen2_bias_tied')
  argv = [f'--hf={hf}', '--prompt_ids=5,9,17,3', '--max_new_tokens=4', '--temperature=0',
          '--json', '--repetition_penalty=1.3', '--no_repeat_ngram_size=3']
  assert generate_cli.main(argv + ['--logprobs=3']) == 0
  line = json.loads(capsys.readouterr().out)
  assert len(line['ids']) == len(line['logprobs']) == len(line['top_logprobs']) == 4
  for tok, lp, top in zip(line['ids'], line['logprobs'], line['top_logprobs']):
    assert len(top) == 3 and 0 >= top[0][1] >= top[1][1] >= top[2][1]
    assert lp <= top[0][1] + 1e-6  # the model's most likely token bounds the sampled one's
    assert tok not in [t for t, _ in top] or dict(top)[tok] == pytest.approx(lp, abs=1e-6)
  assert generate_cli.main(argv) == 0  # without --logprobs: the same ids, no log-probs
  plain = json.loads(capsys.readouterr().out)
  assert plain['ids'] == line['ids'] and 'logprobs' not in plain
