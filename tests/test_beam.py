"""llmjax.infer.beam: transformers' beam-search sequences and scores on the HF test checkpoints
(goldens from tools/make_generate_goldens.py, with an EOS the models produce so hypotheses
finish early), properties on a random tiny model, and one-line errors for bad beam settings."""

import json
import os

import jax
import pytest

import llmjax.models
from llmjax import generate as generate_cli
from llmjax.errors import UserError
from llmjax.infer import beam, engine
from llmjax.infer.engine import SamplingParams

GOLDEN = os.path.join(os.path.dirname(__file__), 'golden')
with open(os.path.join(GOLDEN, 'generate', 'beam_search.json')) as f:
  BEAMS = json.load(f)
CHECKPOINTS = [k for k, v in BEAMS.items() if isinstance(v, dict)]


@pytest.fixture(scope='module', params=CHECKPOINTS)
def hf(request):
  from llmjax.interop import load_hf
  cfg, params, _ = load_hf(os.path.join(GOLDEN, request.param))
  return request.param, cfg, params


def _with_eos(c, eos):
  return c.ids + ([eos] if c.finish_reason == 'eos' else [])


def test_beam_search_gives_transformers_sequences_and_scores(hf):
  name, cfg, params = hf
  g = BEAMS[name]
  eos = g['eos']
  ended_early = 0
  for setting, s in g['settings'].items():
    p = SamplingParams(max_new_tokens=12, temperature=0.0, num_beams=4, **s['kwargs'])
    out = engine.generate(cfg, params, s['prompt'], p, eos_id=eos)  # flat, transformers' order
    assert len(out) == len(s['prompt']) * p.num_return_sequences
    assert [_with_eos(c, eos) for c in out] == s['generated'], setting
    assert [c.score for c in out] == pytest.approx(s['scores'], abs=1e-4), setting
    ended_early += sum(len(x) < 12 for x in s['generated'])
  assert ended_early > 0  # EOS ended some hypotheses: the finished bookkeeping is exercised


def test_early_stopping_and_length_penalty_change_the_llama_goldens():
  # The goldens distinguish the settings, so a wrong early_stopping or length rule would fail.
  s = BEAMS['llama_gqa_llama3']['settings']
  assert s['lp1.0_esTrue']['generated'] != s['lp1.0_esFalse']['generated']
  assert s['lp1.0_esTrue']['generated'] != s['lp0.6_esTrue']['generated']


@pytest.fixture(scope='module')
def model():
  cfg = llmjax.models.get_preset('tiny', vocab_size=64, num_layers=2, embed_dim=64, num_heads=4,
                                 num_kv_heads=2, head_dim=16, mlp_dim=128, max_seq_len=128,
                                 attention='xla', init_std=0.1)
  return cfg, llmjax.models.init_params(cfg, jax.random.PRNGKey(0))


PROMPTS = [[1, 5, 7, 2, 9], [4, 4], [3, 8, 8, 8, 1, 2, 6]]


def test_one_beam_is_greedy_decoding(model):
  cfg, params = model
  greedy = engine.generate(cfg, params, PROMPTS, SamplingParams(8, temperature=0.0), eos_id=-1)
  one = beam.generate(cfg, params, PROMPTS, SamplingParams(8, temperature=0.0), eos_id=-1)
  assert [row[0].ids for row in one] == [c.ids for c in greedy]


def test_a_prompts_beams_do_not_depend_on_its_batch(model):
  cfg, params = model
  p = SamplingParams(8, temperature=0.0, num_beams=3, num_return_sequences=3,
                     length_penalty=0.6, repetition_penalty=1.2)
  batched = beam.generate(cfg, params, PROMPTS, p, eos_id=[5, 9])
  for i, prompt in enumerate(PROMPTS):
    alone = beam.generate(cfg, params, [prompt], p, eos_id=[5, 9])[0]
    assert [c.ids for c in alone] == [c.ids for c in batched[i]]
    assert [c.score for c in alone] == pytest.approx([c.score for c in batched[i]], abs=1e-5)
  for row in batched:  # best first, distinct hypotheses
    assert [c.score for c in row] == sorted((c.score for c in row), reverse=True)
    assert len({tuple(c.ids) for c in row}) == 3


def test_scores_are_the_length_penalised_sum_of_log_probs(model):
  cfg, params = model
  import jax.numpy as jnp
  import numpy as np
  p = SamplingParams(6, temperature=0.0, num_beams=4, num_return_sequences=4, length_penalty=0.6)
  row = beam.generate(cfg, params, [PROMPTS[0]], p, eos_id=-1)[0]
  # Jitted: op by op, each forward spends seconds compiling its primitives.
  forward = jax.jit(lambda p, x: llmjax.models.Transformer(cfg).apply({'params': p}, x)[0])
  for c in row:
    seq = PROMPTS[0] + c.ids
    logits = forward(params, jnp.array([seq[:-1]]))
    logp = np.asarray(jax.nn.log_softmax(logits[0].astype(jnp.float32)))
    n = len(PROMPTS[0])
    total = sum(logp[n - 1 + i, t] for i, t in enumerate(c.ids))
    assert c.score == pytest.approx(total / len(c.ids) ** 0.6, abs=1e-4)  # prompt not counted


# --- bad input: one-line errors before anything compiles

@pytest.mark.parametrize('kwargs, match', [
    ({'num_beams': 0}, 'num_beams'), ({'num_beams': -2}, 'num_beams'),
    ({'num_beams': 4, 'temperature': 0.7}, 'temperature=0'),
    ({'num_beams': 2, 'num_return_sequences': 3}, 'num_return_sequences'),
    ({'num_return_sequences': 0}, 'num_return_sequences'),
    ({'num_beams': 2, 'early_stopping': 'sometimes'}, 'early_stopping'),
])
def test_bad_beam_parameters_are_user_errors(kwargs, match):
  with pytest.raises(UserError, match=match):
    SamplingParams(**{'temperature': 0.0, **kwargs}).validate()


def test_more_beams_than_the_vocabulary_is_a_user_error(model, monkeypatch):
  cfg, params = model
  monkeypatch.setattr(beam, 'jit_search', None)  # nothing may compile
  with pytest.raises(UserError, match='num_beams=65.*vocabulary'):
    beam.generate(cfg, params, [[1]], SamplingParams(4, temperature=0.0, num_beams=65), eos_id=-1)


@pytest.mark.parametrize('flags, match', [
    (['--num_beams=0'], '--num_beams'), (['--num_beams=4'], '--temperature=0'),
    (['--num_beams=2', '--num_return_sequences=3', '--temperature=0'], '--num_return_sequences'),
    (['--num_beams=2', '--early_stopping=maybe', '--temperature=0'], '--early_stopping'),
])
def test_generate_cli_rejects_bad_beam_flags_in_one_line(capsys, monkeypatch, flags, match):
  def no_load(*a, **k):
    raise AssertionError('loaded the model before validating the flags')
  monkeypatch.setattr(generate_cli, 'load', no_load)
  assert generate_cli.main(['--hf=/nonexistent', '--prompt_ids=1,2'] + flags) != 0
  err = capsys.readouterr().err
  assert err.startswith('error: ') and err.count('\n') == 1 and match in err, err


def test_generate_cli_num_beams_larger_than_the_vocabulary(capsys, monkeypatch):
  monkeypatch.setattr(beam, 'jit_search', None)  # nothing may compile
  hf = os.path.join(GOLDEN, 'qwen2_bias_tied')
  assert generate_cli.main([f'--hf={hf}', '--prompt_ids=5,9', '--temperature=0',
                            '--num_beams=300']) != 0
  err = capsys.readouterr().err
  assert err.startswith('error: ') and err.count('\n') == 1 and '--num_beams=300' in err, err


def test_generate_cli_json_prints_every_returned_sequence_and_its_score(capsys):
  name = 'qwen2_bias_tied'
  g = BEAMS[name]
  s = g['settings']['lp0.6_esTrue']
  hf = os.path.join(GOLDEN, name)
  prompt = s['prompt'][1]
  argv = [f'--hf={hf}', '--prompt_ids=' + ','.join(map(str, prompt)), '--max_new_tokens=12',
          '--temperature=0', '--json', '--num_beams=4', '--length_penalty=0.6',
          '--early_stopping=true', '--num_return_sequences=2']
  from llmjax.interop import load_hf
  _, params, tok = load_hf(hf)
  cfg = load_hf(hf)[0]
  want = engine.generate(cfg, params, [prompt], SamplingParams(
      12, temperature=0.0, num_beams=4, length_penalty=0.6, early_stopping=True,
      num_return_sequences=2), eos_id=generate_cli.stop_ids(tok))
  assert generate_cli.main(argv) == 0
  lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
  assert [l['ids'] for l in lines] == [c.ids for c in want]
  assert [l['score'] for l in lines] == pytest.approx([c.score for c in want], abs=1e-6)
  assert [l['beam'] for l in lines] == [0, 1] and all(l['prompt_ids'] == prompt for l in lines)


def test_config_sample_takes_the_beam_keys_and_names_the_key():
  from llmjax import config as config_lib
  from llmjax.errors import ConfigError
  from llmjax.infer import sampler
  c = config_lib.base_config('tiny')
  c.sample.num_beams, c.sample.length_penalty, c.sample.early_stopping = 3, 0.6, 'never'
  p = sampler.sample_params(c.sample)
  assert (p.num_beams, p.length_penalty, p.early_stopping) == (3, 0.6, 'never')
  c.sample.early_stopping = 'soon'
  with pytest.raises(ConfigError, match=r'^sample\.early_stopping=soon'):
    sampler.sample_params(c.sample)
  c.sample.early_stopping, c.sample.temperature = 'true', 0.5
  with pytest.raises(ConfigError, match=r'^sample\.num_beams=3 with sample\.temperature'):
    sampler.sample_params(c.sample)


def test_sampler_generate_keeps_the_best_beam(model):
  from llmjax.infer import sampler
  cfg, params = model
  p = SamplingParams(6, temperature=0.0, num_beams=3, num_return_sequences=2)
  best = [row[0].ids for row in beam.generate(cfg, params, PROMPTS[:2], p, eos_id=-1)]
  assert sampler.generate(cfg, params, PROMPTS[:2], p, eos_id=-1) == best


def test_changing_beam_settings_never_recompiles(model):
  cfg, params = model
  p = SamplingParams(8, temperature=0.0, num_beams=2, length_penalty=1.0)
  beam.generate(cfg, params, PROMPTS, p, eos_id=[5])
  size = beam.jit_search._cache_size()
  for lp, es, r in [(0.6, True, 2), (-0.5, 'never', 1), (2.0, 'never', 2)]:
    q = SamplingParams(7, temperature=0.0, num_beams=2, length_penalty=lp, early_stopping=es,
                       num_return_sequences=r, repetition_penalty=1.1, no_repeat_ngram_size=2)
    assert len(beam.generate(cfg, params, PROMPTS, q, eos_id=[9])[0]) == r
  assert beam.jit_search._cache_size() == size
