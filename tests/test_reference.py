"""dpo.precompute_ref: the reference's log-probs computed once before training equal the ones
computed on the fly (TRL's step-1 metrics; a multi-step packed run), a restart reuses them
without loading the reference, and the cache key follows data, tokenizer and reference."""

import glob
import json
import os

import numpy as np
import pytest

from llmjax import config as config_lib
from llmjax.data import pipeline, preference, sources
from llmjax.errors import ConfigError, DataError
from llmjax.train import reference, state as state_lib

from test_data_sft import CharTokenizer  # one id per character
from test_dpo_run import (DPO, ROOT, SHORT, _close, _dpo, _rows,  # noqa: F401
                          pairs)  # a fixture


@pytest.mark.slow
def test_precomputed_reference_gives_trls_step_1_metrics(tmp_path, pairs):
  path, golden = pairs
  # SHORT: the same pairs, untruncated, in rows a quarter as long (packing changes no metric).
  _dpo(tmp_path / 'w', path, SHORT, f'--config.dpo.ref_hf_dir={DPO}/ref',
       '--config.dpo.loss=robust', '--config.dpo.label_smoothing=0.1', '--config.dpo.beta=0.3',
       '--config.train.steps=1', '--config.train.lr=0', '--config.dpo.precompute_ref=True')
  want = golden['runs']['robust']['metrics']
  _close(_rows(tmp_path / 'w')[0], want, want)
  saved = glob.glob(str(tmp_path / 'w' / reference.DIR / '*.npz'))
  assert len(saved) == 1
  with np.load(saved[0]) as f:
    assert f['train'].shape == (8, 2) and np.isfinite(f['train']).all()


@pytest.mark.slow
def test_packed_precomputed_run_equals_on_the_fly_and_a_restart_never_loads_the_reference(
    tmp_path, pairs, monkeypatch):
  path, _ = pairs
  common = (SHORT, '--config.train.steps=2', '--config.train.lr=0.01',
            '--config.train.warmup_steps=0', '--config.train.log_every=1',
            '--config.data.pairs_per_row=2',
            '--config.train.batch_size=4')
  _dpo(tmp_path / 'fly', path, *common)
  _dpo(tmp_path / 'pre', path, *common, '--config.dpo.precompute_ref=True',
       '--config.train.stop_at_step=1')

  def no_reference(*a, **k):
    raise AssertionError('the reference model was loaded on a restart')

  monkeypatch.setattr(state_lib, 'reference_params', no_reference)
  _dpo(tmp_path / 'pre', path, *common, '--config.dpo.precompute_ref=True')
  fly = {r['step']: r for r in _rows(tmp_path / 'fly') if 'loss' in r}
  pre = {r['step']: r for r in _rows(tmp_path / 'pre') if 'loss' in r}
  assert sorted(pre) == [1, 2] and fly[2]['rewards/margins'] != 0.0
  for step in (1, 2):
    _close(pre[step], fly[step], ['loss', 'rewards/chosen', 'rewards/rejected',
                                  'rewards/margins', 'logps/chosen', 'grad_norm'], rel=1e-5)
  assert len(glob.glob(str(tmp_path / 'pre' / reference.DIR / '*.npz'))) == 1


def _config(tmp_path, pairs_path, **updates):
  c = config_lib.load_config(os.path.join(ROOT, 'experiments', 'dpo.py'))
  c.init.hf_dir = os.path.join(DPO, 'policy')
  c.data.path = pairs_path
  c.data.format = 'preference'
  c.dpo.precompute_ref = True
  for key, value in updates.items():
    config_lib.apply_override(c, key, str(value))
  return c


def _key(c, workdir):
  from llmjax.models.config import ModelConfig
  from llmjax.train.loop import data_config
  model_cfg = config_lib.validate(c)
  os.makedirs(workdir, exist_ok=True)
  return reference.cache_key(c, model_cfg, pipeline.prepare(data_config(c), str(workdir)),
                             str(workdir))[0]


def test_the_key_follows_data_reference_and_truncation(tmp_path, pairs):
  path, golden = pairs
  w = tmp_path / 'w'
  base = _key(_config(tmp_path, path), w)
  assert _key(_config(tmp_path, path), w) == base  # deterministic
  assert _key(_config(tmp_path, path, **{'dpo.ref_hf_dir': f'{DPO}/ref'}), w) != base
  assert _key(_config(tmp_path, path, **{'data.seq_len': 512}), w) != base
  other = tmp_path / 'other.jsonl'
  records = [json.loads(l) for l in open(path)]
  records[3]['rejected'] += ' no'
  other.write_text(''.join(json.dumps(r) + '\n' for r in records))
  assert _key(_config(tmp_path, str(other)), w) != base


@pytest.mark.parametrize('updates, match', [
    ({'dpo.loss': 'simpo'}, r"dpo.precompute_ref=True but dpo.loss='simpo' is reference-free"),
    ({'dpo.loss': 'kto', 'data.format': 'unpaired_preference'},
     r"does not apply to dpo.loss='kto'"),
])
def test_bad_precompute_settings_are_one_line_config_errors(tmp_path, pairs, updates, match):
  c = _config(tmp_path, pairs[0])
  for key, value in updates.items():
    c[key.split('.')[0]][key.split('.')[1]] = value
  with pytest.raises(ConfigError, match=match) as e:
    config_lib.validate(c)
  assert '\n' not in str(e.value)


def test_a_table_of_the_wrong_length_is_a_data_error():
  src = [sources.PreferencePair('ab', 'c', 'd')] * 4
  with pytest.raises(DataError, match=r"reference log-probs table has shape \(3, 2\)"):
    preference.make_preference_dataset(src, CharTokenizer(), seq_len=32, batch_size=2, seed=0,
                                       ref_logps=np.zeros((3, 2), np.float32))


def test_packed_rows_carry_each_pairs_table_entry_and_the_pass_sees_the_training_rows():
  """A table of distinct values: each packed pair's ref_logps are its own record's (chosen,
  rejected), whatever the shuffle put where; the precompute pass's rows are the training
  pipeline's one-pair rows, record order, the skipped pair left out, padding rows index -1."""
  src = [sources.PreferencePair('p' * (i % 3 + 1), 'c' * (i % 2 + 1), 'r' * (i % 4 + 1))
         for i in range(11)] + [sources.PreferencePair('x', 'same', 'same')]
  table = np.arange(24, dtype=np.float32).reshape(12, 2) + 0.5
  ds = preference.make_preference_dataset(src, CharTokenizer(), seq_len=24, batch_size=2, seed=3,
                                          pairs_per_row=2, ref_logps=table)
  it = iter(ds)
  seen = 0
  for _ in range(6):
    b = next(it)
    assert b['ref_logps'].shape == (2, 4)
    for row in range(2):
      for k in range(2):
        if not b['pair_mask'][row, k]:
          assert b['ref_logps'][row, 2 * k:2 * k + 2].tolist() == [0.0, 0.0]
          continue
        seg = b['segment_ids'][row] == 2 * k + 1  # the chosen sequence: its prompt tells the record
        chosen = ''.join(chr(t) for t in b['inputs'][row][seg][1:-1])
        matches = [i for i, p in enumerate(src) if p.prompt + p.chosen == chosen and
                   table[i].tolist() == b['ref_logps'][row, 2 * k:2 * k + 2].tolist()]
        assert matches, (chosen, b['ref_logps'][row])
        seen += 1
  assert seen > 12  # more than one epoch of pairs checked

  plain = preference.make_preference_dataset(src, CharTokenizer(), seq_len=24, batch_size=4,
                                             seed=0, shuffle=False, repeat=False)
  train_rows = [r for b in plain for r in zip(*[b[k] for k in ('inputs', 'loss_mask')])]
  passes = list(preference.reference_batches(src, CharTokenizer(), seq_len=24, batch_size=4))
  assert len(passes) == 3  # ceil(12 / 4): the skipped pair leaves one padding row
  index = np.concatenate([b['index'] for b in passes])
  assert index.tolist() == list(range(11)) + [-1]
  pass_rows = [r for b in passes for r in zip(*[b[k] for k in ('inputs', 'loss_mask')])][:11]
  for (a, am), (p, pm) in zip(train_rows, pass_rows):
    np.testing.assert_array_equal(a, p)
    np.testing.assert_array_equal(am, pm)


def test_a_bf16_runs_reference_holds_its_kernels_in_bf16_and_computes_the_same():
  """model.dtype=bfloat16 with float32 master weights: the frozen reference stores kernels and
  embeddings in bf16 (half the memory) and gives bit-identical log-probs, since every use casts
  them to bf16 first; norm scales keep float32."""
  import jax
  import jax.numpy as jnp
  from llmjax import sharding
  from llmjax.train import losses
  from llmjax.train.loop import make_trainer
  c = config_lib.base_config('tiny', dtype='bfloat16', param_dtype='float32')
  c.train.objective, c.data.format, c.train.batch_size = 'dpo', 'preference', 2
  model_cfg = config_lib.validate(c, data_files=False)
  trainer = make_trainer(c, model_cfg, sharding.make_mesh(c.mesh), sharding.rules_from_config(c))
  rng = jax.random.key(0)
  policy = trainer.init(rng).params
  ref = trainer.init_reference({}, rng)
  dtypes = {jax.tree_util.keystr(p): x.dtype for p, x in jax.tree_util.tree_leaves_with_path(ref)}
  assert {d for k, d in dtypes.items() if k.endswith("['kernel']")} == {jnp.dtype('bfloat16')}
  assert {d for k, d in dtypes.items() if k.endswith("['scale']")} == {jnp.dtype('float32')}
  x = np.random.default_rng(0).integers(1, model_cfg.vocab_size, (2, 33)).astype(np.int32)
  batch = {'inputs': x[:, :-1], 'targets': x[:, 1:], 'positions': np.tile(np.arange(32), (2, 1)),
           'segment_ids': np.ones((2, 32), np.int32), 'loss_mask': np.ones((2, 32), np.float32)}
  apply_fn = lambda p, t, **kw: trainer.model.apply({'params': p}, t, **kw)
  # Jitted, as the train step computes them (op by op, each forward spends seconds).
  logprobs = jax.jit(lambda p: losses.sequence_logprobs(p, batch, apply_fn)[0])
  a, b = logprobs(policy), logprobs(ref)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_preference_data_with_context_parallelism_is_a_one_line_error(pairs):
  c = _config(None, pairs[0], **{'mesh.sequence': 2})
  with pytest.raises(ConfigError, match=r"does not run with context parallelism yet "
                                        r"\(mesh.sequence=2\); set mesh.sequence=1") as e:
    config_lib.validate(c, num_devices=2)
  assert '\n' not in str(e.value)
