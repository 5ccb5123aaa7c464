"""The GRPO job end to end (llmjax/rl/loop.py) on a tiny Hugging Face test checkpoint: the
sampler's log-probs are the trainer's, a run logs TRL's metric names, a resumed run equals the
uninterrupted one, and bad reward functions or prompts are one-line errors or counted skips."""

import json
import os
import sys

import numpy as np
import pytest

from llmjax import main as main_lib
from llmjax.errors import DataError, UserError
from llmjax.rl import rewards as rewards_lib

HF = os.path.join(os.path.dirname(__file__), 'golden', 'llama_gqa_llama3')  # BPE, vocab 256
PROMPTS = ['the quick', 'hello world', 'the lazy dog', 'brown fox', 'hello', 'the', 'over the',
           'jumps']
REWARDS = '''
def count_o(prompts, completions, **columns):
    return [c.count('o') / max(len(c), 1) for c in completions]

def uses_columns(prompts, completions, tag, **_):
    return [float(t == 'x') for t in tag]

def raises(prompts, completions, **_):
    raise RuntimeError('boom')

def short(prompts, completions, **_):
    return [0.0]

def nan(prompts, completions, **_):
    return [float('nan')] * len(completions)
'''


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  d = tmp_path_factory.mktemp('rl')
  (d / 'rl_test_rewards.py').write_text(REWARDS)
  with open(d / 'prompts.jsonl', 'w') as f:
    for i, p in enumerate(PROMPTS):
      f.write(json.dumps({'prompt': p, 'tag': 'x' if i % 2 else 'y'}) + '\n')
  sys.path.insert(0, str(d))
  yield d
  sys.path.remove(str(d))


def _args(workdir, data, *extra):
  return ['--config=experiments/grpo.py', f'--workdir={workdir}', f'--config.init.hf_dir={HF}',
          f"--config.data.path={data / 'prompts.jsonl'}",
          '--config.rl.reward_fns=rl_test_rewards:count_o,rl_test_rewards:uses_columns',
          '--config.rl.reward_weights=1.0,0.5', '--config.rl.num_generations=4',
          '--config.train.batch_size=16', '--config.rl.max_completion_length=8',
          '--config.data.seq_len=32', '--config.model.dtype=float32', '--config.train.lr=1e-3',
          '--config.train.log_every=1', '--config.train.eval_every=100', *extra]


def _rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_sampler_logprobs_are_the_trainers(data):
  """The engine's log-prob of each sampled token = the loss's forward pass at temperature 1
  on the same row (float32), EOS aside (the engine does not return its log-prob)."""
  import jax
  from llmjax.infer import engine
  from llmjax.interop import load_hf
  from llmjax.models.transformer import Transformer
  from llmjax.rl import grpo, rollout
  cfg, params, tok = load_hf(HF)
  ids = [[tok.bos_id] + tok.encode(p) for p in PROMPTS[:4]]
  roll = rollout.sample(cfg, params, ids, num_generations=2, eos_ids=(tok.eos_id,), seed=3,
                        sampling=engine.SamplingParams(max_new_tokens=8, temperature=1.0),
                        decode=tok.decode)
  batch = rollout.to_batch(roll, np.zeros(8), 32)
  apply = lambda p, x, **kw: Transformer(cfg).apply({'params': p}, x, **kw)
  trainer = np.asarray(jax.jit(grpo.make_logps_fn(grpo.RLConfig(), apply))(params, batch))
  known = (batch['completion_mask'] > 0) & ~np.isnan(batch['sampler_logps'])
  assert known.sum() > 30
  np.testing.assert_allclose(trainer[known], batch['sampler_logps'][known], atol=1e-5)


def test_a_run_logs_trls_metrics_and_resumes_exactly(tmp_path, data):
  """num_iterations=2 (old log-probs from a forward pass, reused for two updates); a run
  stopped at step 2 and resumed ends where the uninterrupted one does, metric for metric."""
  common = ['--config.train.steps=4', '--config.train.checkpoint_every=2',
            '--config.rl.num_iterations=2', '--config.rl.epsilon_high=0.28']
  assert main_lib.main(_args(tmp_path / 'a', data, *common)) == 0
  assert main_lib.main(_args(tmp_path / 'b', data, *common, '--config.train.stop_at_step=2')) == 0
  assert max(r['step'] for r in _rows(tmp_path / 'b')) == 2
  assert main_lib.main(_args(tmp_path / 'b', data, *common)) == 0
  a = {r['step']: r for r in _rows(tmp_path / 'a') if 'loss' in r}
  b = {r['step']: r for r in _rows(tmp_path / 'b') if 'loss' in r}
  names = {'loss', 'reward', 'reward_std', 'frac_reward_zero_std', 'entropy',
           'completions/mean_length', 'completions/clipped_ratio', 'clip_ratio/low_mean',
           'clip_ratio/high_mean', 'clip_ratio/region_mean', 'time/rollout_s', 'time/update_s',
           'rewards/rl_test_rewards.count_o/mean', 'rewards/rl_test_rewards.uses_columns/mean'}
  assert names <= set(a[4])
  # The run keeps its tokenizer, as every run does: generate / eval / convert read it.
  assert os.path.isdir(tmp_path / 'a' / 'hf_tokenizer')
  # The column reward sees each prompt's own field: half the prompts are tagged 'x'.
  assert 0 < a[1]['rewards/rl_test_rewards.uses_columns/mean'] < 1
  for step in (3, 4):
    for k in ('loss', 'reward', 'entropy', 'grad_norm', 'clip_ratio/region_mean'):
      assert b[step][k] == pytest.approx(a[step][k], rel=1e-5, abs=1e-7), (step, k)
  # The second update of a rollout batch sees a moved policy: its ratio is no longer 1.
  assert a[2]['loss'] != a[1]['loss']


@pytest.mark.parametrize('fn, match', [
    ('raises', r'reward function rl_test_rewards.raises raised RuntimeError: boom'),
    ('short', r'returned 1 rewards for 4 completions'),
    ('nan', r'returned nan for completion 0'),
])
def test_bad_reward_functions_are_named(data, fn, match):
  fns, _ = rewards_lib.load([f'rl_test_rewards:{fn}'])
  with pytest.raises(UserError, match=match) as e:
    rewards_lib.score(fns, ['p'] * 4, ['a', 'b', 'c', 'd'], {})
  assert len(str(e.value).splitlines()) == 1


def test_builtin_exact_match_reads_the_answer_line():
  got = rewards_lib.exact_match(['q'] * 3, [' 19', ' 19\nQ: more', ' 18'], answer=['19'] * 3)
  assert got == [1.0, 1.0, 0.0]
  assert rewards_lib.json_format([''] * 3, ['{"answer": 3}', 'x', '[1]']) == [1.0, 0.0, 0.0]


def test_long_prompts_are_skipped_and_counted(capsys):
  from llmjax.rl import loop

  class Tok:
    bos_id = 1
    encode = staticmethod(lambda s: list(range(len(s.split()))))
  recs = [{'prompt': 'a b'}, {'prompt': 'a b c d e f'}, {'prompt': 'a'}]
  kept, ids = loop.tokenize_prompts(recs, Tok(), 4, print)
  assert [r['prompt'] for r in kept] == ['a b', 'a'] and ids == [[1, 0, 1], [1, 0]]
  assert 'skipped 1 of 3 prompts longer than 4 tokens' in capsys.readouterr().out
  with pytest.raises(DataError, match='no prompt fits'):
    loop.tokenize_prompts(recs[1:2], Tok(), 4, print)


def test_prompt_order_is_a_function_of_the_batch_index():
  from llmjax.rl import loop
  first = [loop.prompt_indices(k, 3, 8, seed=0) for k in range(6)]
  assert first == [loop.prompt_indices(k, 3, 8, seed=0) for k in range(6)]
  flat = sum(first, [])
  assert sorted(flat[:8]) == list(range(8))  # the first epoch visits every prompt once


@pytest.mark.parametrize('extra, match', [
    (['--config.train.batch_size=10'], 'not a multiple of rl.num_generations=4'),
    (['--config.rl.num_iterations=3'], 'train.checkpoint_every=100 must be a multiple'),
    (['--config.rl.reward_fns=no_such_module:fn'], "could not be imported"),
    (['--config.rl.reward_fns=exact_matc'], 'neither a built-in reward'),
    (['--config.rl.max_completion_length=40'], 'leaves no room for a prompt'),
    (['--config.train.objective=rloo', '--config.rl.num_generations=1',
      '--config.rl.scale_rewards=none'], "train.objective='rloo' needs rl.num_generations >= 2"),
])
def test_config_errors_before_anything_compiles(tmp_path, data, capsys, extra, match):
  assert main_lib.main(_args(tmp_path / 'w', data, *extra)) == 2
  err = capsys.readouterr().err.strip()
  assert match in err and len(err.splitlines()) == 1, err
  assert not os.path.exists(tmp_path / 'w' / 'checkpoints')


def test_plan_compiles_the_grpo_step_with_its_reference_and_counts_the_rollout_cache():
  """llmjax.plan on a TPU topology: the GRPO batch (completion_mask, advantages, old and sampler
  log-probs) and loss compile; with rl.beta > 0 the frozen reference is in the arguments; the
  rollouts' KV cache is 2 (K, V) x layers x batch x slots x kv heads x head_dim x 2 bytes."""
  import importlib.util
  from llmjax import plan as plan_lib
  spec = importlib.util.spec_from_file_location('grpo_exp', 'experiments/grpo.py')
  exp = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(exp)
  c = exp.get_config('tiny,beta=0.04')
  c.init.params_dir = ''  # plan reads no checkpoint
  c.model.dtype = 'bfloat16'
  # A small model: what is checked is the GRPO program and the accounting, not the size.
  c.model.update(num_layers=1, embed_dim=64, mlp_dim=128, num_heads=2, num_kv_heads=1,
                 head_dim=32, vocab_size=256)
  c.train.batch_size = 16
  report, _ = plan_lib.plan(c, 'v5e:1x1')
  assert report.reference == 'arg' and report.reference_bytes > 0
  m = c.model
  head_dim = m.head_dim or m.embed_dim // m.num_heads
  slots = 64  # 32 rounded up to the engine's cache granularity
  assert report.rollout_cache_bytes == (2 * m.num_layers * c.train.batch_size * slots
                                        * m.num_kv_heads * head_dim * 2)
  text = plan_lib.format_report(c, report)
  assert 'rollouts: KV cache' in text and 'frozen reference' in text


def test_rloo_folds_the_kl_into_the_reward(tmp_path, data):
  """train.objective='rloo' with rl.beta > 0: at step 1 the policy is its reference (the
  initial weights), so the KL is 0 and the logged reward is the functions' weighted sum; after
  an update the policy has moved and the KL penalty lowers the reward."""
  assert main_lib.main(_args(tmp_path / 'r', data, '--config.train.objective=rloo',
                             '--config.rl.beta=0.5', '--config.train.steps=2',
                             '--config.train.lr=3e-3')) == 0
  rows = {r['step']: r for r in _rows(tmp_path / 'r') if 'loss' in r}
  assert rows[1]['kl'] == pytest.approx(0.0, abs=1e-6)
  want = (rows[1]['rewards/rl_test_rewards.count_o/mean']
          + 0.5 * rows[1]['rewards/rl_test_rewards.uses_columns/mean'])
  assert rows[1]['reward'] == pytest.approx(want, rel=1e-6)
  assert rows[2]['kl'] != 0.0


def test_best_of_n_writes_each_prompts_best_completion_as_sft_data(tmp_path, data, capsys):
  """Rejection sampling: for each prompt the kept completion's reward (recomputed here from its
  text) is the best of the n, at least --min_reward; the records are prompt_completion SFT
  records with the prompt's own fields; the same seed writes the same file."""
  from llmjax.rl import best_of_n
  out = tmp_path / 'best.jsonl'
  args = [f'--hf={HF}', f"--data={data / 'prompts.jsonl'}",
          '--reward_fns=rl_test_rewards:count_o', '--n=4', '--max_new_tokens=6',
          '--min_reward=0.1', '--keep_truncated=true', f'--out={out}']
  # The random test model seldom ends with EOS: without --keep_truncated fewer are kept.
  assert best_of_n.main([a for a in args if 'keep_truncated' not in a]) == 0
  ended = [json.loads(line) for line in open(out)]
  assert best_of_n.main(args) == 0
  recs = [json.loads(line) for line in open(out)]
  assert len(ended) <= len(recs)
  assert 0 < len(recs) <= len(PROMPTS)
  for r in recs:
    assert r['prompt'] in PROMPTS and r['tag'] in ('x', 'y')
    c = r['completion']
    assert r['reward'] == pytest.approx(c.count('o') / max(len(c), 1)) and r['reward'] >= 0.1
  first = open(out).read()
  assert best_of_n.main(args) == 0 and open(out).read() == first
  # The SFT data format reads them as they are.
  from llmjax.data import sources
  assert sources.check_data_format({'format': 'prompt_completion', 'path': str(out)}) == \
      'prompt_completion'
  assert best_of_n.main(args[:-1]) == 2 and 'missing --out' in capsys.readouterr().err
