"""The reward model (model.head='score'): scores and step-1 metrics equal to transformers' and TRL
1.16 RewardTrainer's (tests/golden/reward, made by tools/make_reward_goldens.py), the
Bradley-Terry loss by hand, Hugging Face import/export, and `eval --task=reward`."""

import dataclasses
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llmjax import config as config_lib
from llmjax.errors import ConfigError
from llmjax.interop import families, hf, load_hf, save_hf
from llmjax.interop.safetensors_io import Reader
from llmjax.models.config import ModelConfig, architecture_diffs, get_preset
from llmjax.models.transformer import Transformer, init_params, logical_axes
from llmjax.train import losses, reward, state as state_lib
from llmjax.train.step import make_train_step

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'golden')
RM = os.path.join(GOLDEN, 'reward')
LM = os.path.join(GOLDEN, 'llama_gqa_llama3')
with open(os.path.join(RM, 'golden.json')) as _f:
  G = json.load(_f)
METRICS = ('loss', 'accuracy', 'margin', 'mean_reward', 'min_reward', 'max_reward')


@functools.lru_cache(maxsize=None)
def _rm():
  return load_hf(RM)


def _apply(cfg):
  return lambda p, x, **kw: Transformer(cfg).apply({'params': p}, x, **kw)


def _sequences(run):
  """TRL's batch as unpadded sequences: the chosen of pair k is row k, its rejected row n + k."""
  ids, am = np.asarray(run['input_ids']), np.asarray(run['attention_mask'])
  return [list(i[a > 0]) for i, a in zip(ids, am)]


def pair_batch(run, pairs_per_row: int, width: int = 48):
  """The paired batch contract rebuilt from TRL's ids: pair k = segments 2k+1 (chosen) and
  2k+2 (rejected) of its row, P pairs per row, each sequence whole in `inputs`."""
  seqs = _sequences(run)
  n = len(seqs) // 2
  rows = -(-n // pairs_per_row)
  b = {k: np.zeros((rows, width), np.int32) for k in ('inputs', 'targets', 'segment_ids',
                                                      'positions')}
  b['loss_mask'] = np.zeros((rows, width), np.float32)
  b['pair_mask'] = np.zeros((rows, pairs_per_row), np.float32)
  b['margin'] = np.zeros((rows, pairs_per_row), np.float32)
  for k in range(n):
    r, slot = divmod(k, pairs_per_row)
    o = int(np.count_nonzero(b['segment_ids'][r]))
    for s, seq in ((2 * slot + 1, seqs[k]), (2 * slot + 2, seqs[n + k])):
      b['inputs'][r, o:o + len(seq)] = seq
      b['targets'][r, o:o + len(seq) - 1] = seq[1:]
      b['segment_ids'][r, o:o + len(seq)] = s
      b['positions'][r, o:o + len(seq)] = np.arange(len(seq))
      o += len(seq)
    b['pair_mask'][r, slot] = 1.0
    b['margin'][r, slot] = run['margin'][k]
  return b


# ------------------------------------------------------------------------------ the model


def test_score_head_shape_axes_and_param_count():
  cfg = get_preset('tiny', vocab_size=64, num_layers=2, embed_dim=32, num_heads=4,
                   num_kv_heads=2, head_dim=8, mlp_dim=64, head='score')
  params = init_params(cfg, jax.random.key(0))
  assert params['score']['kernel'].shape == (32, 1) and 'head' not in params
  assert tuple(logical_axes(cfg)['score']['kernel']) == ('embed', 'score')
  assert cfg.num_params == sum(x.size for x in jax.tree.leaves(params))
  out, _ = Transformer(cfg).apply({'params': params}, jnp.ones((2, 5), jnp.int32))
  assert out.shape == (2, 5) and out.dtype == jnp.float32
  # An architecture field: every comparator sees it.
  assert architecture_diffs(dataclasses.replace(cfg, head='lm'), cfg) == ['head']
  with pytest.raises(ConfigError, match="model.head='reward' is not one of"):
    ModelConfig.from_dict(dict(dataclasses.asdict(cfg), head='reward'))


def test_lora_trains_the_score_head():
  cfg = get_preset('tiny', vocab_size=64, num_layers=1, embed_dim=32, num_heads=4,
                   num_kv_heads=2, head_dim=8, mlp_dim=64, head='score', lora_rank=2)
  mask = state_lib.trainable_mask(cfg, init_params(cfg, jax.random.key(0)))
  assert mask['score']['kernel'] and not mask['embed']['embedding']
  assert mask['layer_0']['attn']['q']['lora_a'] and not mask['layer_0']['attn']['q']['kernel']


def test_scores_equal_transformers():
  cfg, params, _ = _rm()
  assert cfg.head == 'score'
  run = G['runs']['plain']
  for p in (1, 2):
    b = pair_batch(run, p)
    rewards, present = reward.sequence_rewards(params, b, _apply(cfg), 2 * p)
    n = len(run['rewards']) // 2
    got = np.asarray(rewards).reshape(-1, 2)[:n]  # [pairs, (chosen, rejected)]
    assert np.asarray(present).all()
    np.testing.assert_allclose(got[:, 0], run['rewards'][:n], atol=1e-4)
    np.testing.assert_allclose(got[:, 1], run['rewards'][n:], atol=1e-4)


def test_pad_equal_to_eos_reads_before_the_eos_as_transformers():
  # TRL pads with EOS when the tokenizer has none; transformers then skips the EOS.
  cfg, params, _ = _rm()
  b = pair_batch(G['runs']['plain'], 1)
  eos = G['runs']['plain']['eos_token_id']
  rewards, _ = reward.sequence_rewards(params, b, _apply(cfg), 2, pad_id=eos)
  n = len(G['rewards_pad_eos']) // 2
  np.testing.assert_allclose(np.asarray(rewards)[:, 0], G['rewards_pad_eos'][:n], atol=1e-4)
  np.testing.assert_allclose(np.asarray(rewards)[:, 1], G['rewards_pad_eos'][n:], atol=1e-4)
  # ... which differs from the reward at the EOS.
  at_eos, _ = reward.sequence_rewards(params, b, _apply(cfg), 2)
  assert np.abs(np.asarray(at_eos) - np.asarray(rewards)).max() > 1e-2


@pytest.mark.parametrize('run_name', ['plain', 'center'])
@pytest.mark.parametrize('pairs_per_row', [1, 2])
def test_step1_metrics_equal_trl(run_name, pairs_per_row):
  cfg, params, _ = _rm()
  run = G['runs'][run_name]
  coef = run['center_rewards_coefficient'] or 0.0
  loss_fn = functools.partial(reward.reward_loss, num_pairs=pairs_per_row, center_coef=coef)
  step = make_train_step(_apply(cfg), loss_fn, optax.sgd(0.0))
  state = state_lib.TrainState.create(params, optax.sgd(0.0), jax.random.key(0))
  _, got = jax.jit(step)(state, pair_batch(run, pairs_per_row))
  assert float(got['weight']) == 8
  for name in METRICS:
    want = run['metrics'][name]
    assert abs(float(got[name]) - want) <= 1e-4 * max(abs(want), 1e-3), (name, got[name], want)


def test_trl_tokenization_is_the_eval_tokenization():
  from llmjax.eval.harness import trl_sequence_ids
  _, _, tokenizer = _rm()
  records = [json.loads(l) for l in open(os.path.join(RM, 'pairs.jsonl'))]
  for rec, trl in zip(records, G['runs']['plain']['tokenized']):
    assert trl_sequence_ids(tokenizer, rec['prompt'], rec['chosen']) == trl['chosen_ids']
    assert trl_sequence_ids(tokenizer, rec['prompt'], rec['rejected']) == trl['rejected_ids']


# ------------------------------------------------------------------------------ by hand


def _toy_batch():
  """Scores = the input ids as floats, so a segment's reward is its last input id."""
  # row 0: chosen [1 5 9] -> 9, rejected [2 7 3] -> 3; its second pair slot is empty.
  # row 1: chosen [4 8] -> 8, rejected [6 1] -> 1; chosen [1] -> 1, rejected [0] -> 0.
  inputs = np.array([[1, 5, 9, 2, 7, 3, 0, 0],
                     [4, 8, 6, 1, 1, 0, 0, 0]], np.int32)
  seg = np.array([[1, 1, 1, 2, 2, 2, 0, 0],
                  [1, 1, 2, 2, 3, 4, 0, 0]], np.int32)
  positions = np.zeros_like(inputs)
  return {'inputs': inputs, 'segment_ids': seg, 'positions': positions,
          'pair_mask': np.array([[1, 0], [1, 1]], np.float32),
          'margin': np.array([[0.5, 0.0], [0.0, 1.0]], np.float32)}


def _toy_apply(params, tokens, **kw):
  return tokens.astype(jnp.float32) * params['scale'], None


def test_bradley_terry_by_hand():
  b = _toy_batch()
  out = reward.reward_loss({'scale': jnp.float32(0.25)}, b, _toy_apply, num_pairs=2,
                           center_coef=0.1)
  pairs = [(9 * .25, 3 * .25, 0.5), (8 * .25, 1 * .25, 0.0), (1 * .25, 0.0, 1.0)]
  sig = lambda x: 1 / (1 + math.exp(-x))
  want = sum(-math.log(sig(c - r - m)) + 0.1 * (c + r) ** 2 for c, r, m in pairs)
  m = losses.reduce_output(out)
  assert float(out.weight) == 3
  np.testing.assert_allclose(float(out.total), want, rtol=1e-6)
  np.testing.assert_allclose(float(m['accuracy']), 1.0)
  np.testing.assert_allclose(float(m['margin']), sum(c - r for c, r, _ in pairs) / 3, rtol=1e-6)
  np.testing.assert_allclose(float(m['mean_reward']), sum(c + r for c, r, _ in pairs) / 6,
                             rtol=1e-6)
  # The empty slot (row 0, pair 2, reward 0 by absence) is not a reward: min is 0 from pair 3's
  # rejected [0], max 9/4.
  np.testing.assert_allclose(float(m['min_reward']), 0.0)
  np.testing.assert_allclose(float(m['max_reward']), 2.25)
  # Gradient direction: raising the scale separates chosen from rejected, lowering the loss.
  g = jax.grad(lambda s: reward.reward_loss({'scale': s}, b, _toy_apply, num_pairs=2).total)(
      jnp.float32(0.25))
  assert float(g) < 0


def test_min_max_average_over_micro_batches_as_trl():
  # TRL logs the mean over forward passes of each pass's min/max; two micro-batches here.
  b = _toy_batch()
  b1 = {k: v[:1] for k, v in b.items()}
  b2 = {k: v[1:] for k, v in b.items()}
  params = {'scale': jnp.float32(1.0)}
  f = functools.partial(reward.reward_loss, num_pairs=2)
  total = jax.tree.map(jnp.add, f(params, b1, _toy_apply), f(params, b2, _toy_apply))
  m = losses.reduce_output(total)
  np.testing.assert_allclose(float(m['min_reward']), (3 + 0) / 2)
  np.testing.assert_allclose(float(m['max_reward']), (9 + 8) / 2)
  # A micro-batch without pairs counts for nothing (no inf, no NaN).
  empty = dict(b1, pair_mask=np.zeros_like(b1['pair_mask']))
  total = jax.tree.map(jnp.add, f(params, empty, _toy_apply), f(params, b2, _toy_apply))
  m = losses.reduce_output(total)
  assert float(m['min_reward']) == 0 and float(m['max_reward']) == 8


# ------------------------------------------------------------------------------ HF interop


def test_import_of_the_golden_reward_model():
  cfg, params, tokenizer = _rm()
  assert families.family_for(cfg).architecture == 'LlamaForSequenceClassification'
  assert params['score']['kernel'].shape == (cfg.embed_dim, 1)
  assert tokenizer.pad_id == G['runs']['plain']['pad_token_id']


def test_export_writes_what_transformers_saves(tmp_path):
  cfg, params, _ = _rm()
  save_hf(str(tmp_path), cfg, params, tokenizer_dir=RM)
  ours = json.load(open(tmp_path / 'config.json'))
  theirs = json.load(open(os.path.join(RM, 'config.json')))
  for key in ('architectures', 'id2label', 'label2id', 'pad_token_id', 'eos_token_id',
              'hidden_size', 'num_hidden_layers', 'vocab_size', 'tie_word_embeddings'):
    assert ours[key] == theirs[key], key
  got, want = Reader(str(tmp_path)), Reader(RM)
  assert got.shapes == want.shapes  # same tensor names (score.weight [1, hidden]) and shapes
  got.close(), want.close()
  cfg2, params2, _ = load_hf(str(tmp_path))
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_export_as_an_lm_class_is_refused(tmp_path):
  cfg, params, _ = _rm()
  with pytest.raises(ConfigError, match="--architecture=LlamaForCausalLM has a 'lm' head"):
    save_hf(str(tmp_path), cfg, params, architecture='LlamaForCausalLM')


def test_num_labels_other_than_one_is_one_line(tmp_path):
  conf = json.load(open(os.path.join(RM, 'config.json')))
  conf['id2label'] = {'0': 'NEG', '1': 'POS'}
  with pytest.raises(ConfigError, match='num_labels=2 is a classifier') as e:
    hf.config_from_hf(conf, 'x/config.json')
  assert '\n' not in str(e.value)


def test_lm_checkpoint_initialises_a_score_model():
  lm_cfg, lm_params, _ = load_hf(LM)
  cfg = dataclasses.replace(lm_cfg, head='score')
  family = hf.check_matches(LM, cfg)  # allowed: the head is new
  given = hf.read_params(LM, cfg, family)
  assert 'score' not in given and 'head' not in given
  jax.tree.map(np.testing.assert_array_equal, given, {k: v for k, v in lm_params.items()
                                                      if k != 'head'})
  # The reverse is refused: an LM cannot start from a reward model.
  rm_cfg, _, _ = _rm()
  with pytest.raises(ConfigError, match="is a reward model .* set model.head='score'"):
    hf.check_matches(RM, dataclasses.replace(rm_cfg, head='lm'))


def test_build_state_initialises_only_the_score_head():
  from llmjax.train.loop import make_trainer
  from llmjax import sharding
  lm_cfg, lm_params, _ = load_hf(LM)
  c = config_lib.base_config()
  c.model.update(dict(dataclasses.asdict(lm_cfg), head='score'))
  c.init.hf_dir = LM
  c.data.seq_len = 32
  c.train.batch_size = 2
  model_cfg = config_lib.validate(c, data_files=False)
  assert model_cfg.head == 'score'
  mesh = sharding.make_mesh(c.mesh)
  loss_fn = functools.partial(reward.reward_loss, num_pairs=1)
  trainer = make_trainer(c, model_cfg, mesh, sharding.rules_from_config(c), loss_fn=loss_fn)
  with jax.set_mesh(mesh):
    st = state_lib.build_state(trainer, c, model_cfg)
  params = jax.device_get(st.params)
  assert params['score']['kernel'].shape == (lm_cfg.embed_dim, 1)
  assert np.abs(params['score']['kernel']).max() > 0  # initialised, not zeros
  np.testing.assert_array_equal(params['embed']['embedding'], lm_params['embed']['embedding'])


# ------------------------------------------------------------------------------ eval


def test_eval_task_reward(tmp_path, capsys):
  from llmjax.eval.__main__ import main
  data = tmp_path / 'pairs.jsonl'
  data.write_text(open(os.path.join(RM, 'pairs.jsonl')).read())
  assert main([f'--hf={RM}', '--task=reward', f'--data={data}', '--json']) == 0
  out = json.loads(capsys.readouterr().out)
  run = G['runs']['plain']
  np.testing.assert_allclose(out['accuracy'], run['metrics']['accuracy'])
  np.testing.assert_allclose(out['margin'], run['metrics']['margin'], rtol=1e-4)
  np.testing.assert_allclose(out['mean_reward'], run['metrics']['mean_reward'], rtol=1e-4)
  # Per-record rewards: the golden's reward of the sequence with the same ids.
  by_ids = {tuple(s): r for s, r in zip(_sequences(run), run['rewards'])}
  for rec, trl in zip(out['records'], run['tokenized']):
    np.testing.assert_allclose(rec['reward_chosen'], by_ids[tuple(trl['chosen_ids'])], atol=1e-4)
    np.testing.assert_allclose(rec['reward_rejected'], by_ids[tuple(trl['rejected_ids'])],
                               atol=1e-4)
    assert rec['correct'] == (rec['reward_chosen'] > rec['reward_rejected'])


def test_eval_reward_of_an_lm_is_one_line(tmp_path, capsys):
  from llmjax.eval.__main__ import main
  data = tmp_path / 'pairs.jsonl'
  data.write_text(json.dumps({'prompt': 'a', 'chosen': 'b', 'rejected': 'c'}) + '\n')
  assert main([f'--hf={LM}', '--task=reward', f'--data={data}']) != 0
  err = capsys.readouterr().err.strip()
  assert err.startswith('error: --task=reward needs a reward model') and '\n' not in err
  text = tmp_path / 'doc.txt'
  text.write_text('the quick brown fox')
  assert main([f'--hf={RM}', '--task=perplexity', f'--data={text}']) != 0
  assert 'is a reward model' in capsys.readouterr().err
