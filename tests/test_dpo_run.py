"""DPO and reward-model runs end to end through `llmjax.main`: the issue's commands give TRL's
step-1 metrics (goldens from tools/make_dpo_goldens.py and tools/make_reward_goldens.py), the
reference model is what it should be (another checkpoint, the initial weights after a resume,
a LoRA policy's base), and mismatched objectives are one-line errors."""

import json
import os

import pytest

from llmjax import config as config_lib
from llmjax import main as main_lib
from llmjax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DPO = os.path.join(ROOT, 'tests', 'golden', 'dpo')
REWARD = os.path.join(ROOT, 'tests', 'golden', 'reward')


def _rows(workdir):
  return [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]


@pytest.fixture(scope='module')
def pairs(tmp_path_factory):
  golden = json.load(open(os.path.join(DPO, 'golden.json')))
  path = tmp_path_factory.mktemp('pairs') / 'pairs.jsonl'
  path.write_text(''.join(json.dumps({'prompt': p, 'chosen': c, 'rejected': r}) + '\n'
                          for p, c, r in golden['pairs']))
  return str(path), golden


def _dpo(workdir, pairs_path, *extra):
  """The issue's DPO command, as a user types it."""
  argv = [f'--config={ROOT}/experiments/dpo.py', f'--workdir={workdir}',
          f'--config.init.hf_dir={DPO}/policy', f'--config.data.path={pairs_path}',
          '--config.data.format=preference', '--config.train.batch_size=8',
          '--config.model.dtype=float32', *extra]
  assert main_lib.main(argv) == 0


# Rows of 256 tokens instead of the experiment's 1024: the golden pairs have at most 84 tokens
# (42 a sequence), so nothing is truncated either way, and each step costs a quarter.
SHORT = '--config.data.seq_len=256'


def _close(got: dict, want: dict, keys, rel=1e-4):
  for k in keys:
    assert got[k] == pytest.approx(want[k], rel=rel, abs=1e-6), (k, got[k], want[k])


@pytest.mark.slow
def test_the_dpo_command_gives_trls_step_1_metrics(tmp_path, pairs):
  path, golden = pairs
  # SHORT: the same pairs, untruncated, in rows a quarter as long (packing changes no metric).
  _dpo(tmp_path / 'w', path, SHORT, f'--config.dpo.ref_hf_dir={DPO}/ref',
       '--config.dpo.loss=robust', '--config.dpo.label_smoothing=0.1', '--config.dpo.beta=0.3',
       '--config.train.steps=1', '--config.train.lr=0')
  want = golden['runs']['robust']['metrics']
  row = _rows(tmp_path / 'w')[0]
  assert row['step'] == 1
  _close(row, want, want)  # every metric TRL logged, under TRL's names


@pytest.mark.slow
@pytest.mark.parametrize('run, extra', [('plain', ()), ('center', ('--config.reward.center_coef=0.1',))])
def test_the_reward_command_gives_trls_step_1_metrics(tmp_path, run, extra):
  argv = [f'--config={ROOT}/experiments/reward.py', f'--workdir={tmp_path / "w"}',
          f'--config.init.hf_dir={REWARD}', f'--config.data.path={REWARD}/pairs.jsonl',
          '--config.data.format=preference', '--config.train.steps=1', '--config.train.lr=0',
          '--config.train.batch_size=8', '--config.model.dtype=float32',
          # The golden pairs have at most 9 tokens a sequence: rows of 64 truncate nothing and
          # cost a sixteenth of the experiment's 1024 (a score is per sequence: no metric moves).
          '--config.data.seq_len=64', *extra]
  assert main_lib.main(argv) == 0
  want = json.load(open(os.path.join(REWARD, 'golden.json')))['runs'][run]['metrics']
  _close(_rows(tmp_path / 'w')[0], want, want)


@pytest.mark.slow
def test_a_lora_policys_own_base_is_the_frozen_copy_reference(tmp_path, pairs):
  """Adapters off (no second copy) == the same checkpoint loaded as a separate reference, at a
  step where the adapters have moved the policy away from it."""
  path, _ = pairs
  common = (SHORT, '--config.model.lora_rank=4', '--config.train.steps=2', '--config.train.lr=0.05',
            '--config.train.warmup_steps=0', '--config.dpo.beta=0.3', '--config.train.log_every=1')
  _dpo(tmp_path / 'own', path, *common)
  _dpo(tmp_path / 'copy', path, *common, f'--config.dpo.ref_hf_dir={DPO}/policy')
  own, copy = _rows(tmp_path / 'own'), _rows(tmp_path / 'copy')
  assert own[1]['rewards/margins'] != 0.0  # step 2: the policy is no longer its reference
  for a, b in zip(own, copy):
    _close(a, b, [k for k in a if k not in ('tokens_per_s', 'eval_loss')])


@pytest.mark.slow
def test_a_resumed_run_keeps_the_initial_weights_as_its_reference(tmp_path, pairs):
  path, _ = pairs
  common = (SHORT, '--config.train.steps=2', '--config.train.lr=0.01',
            '--config.train.warmup_steps=0', '--config.train.log_every=1')
  _dpo(tmp_path / 'full', path, *common)
  _dpo(tmp_path / 'split', path, *common, '--config.train.stop_at_step=1')
  _dpo(tmp_path / 'split', path, *common)  # resumes at 1: the reference is read again
  full = {r['step']: r for r in _rows(tmp_path / 'full') if 'loss' in r}
  split = {r['step']: r for r in _rows(tmp_path / 'split') if 'loss' in r}
  assert sorted(split) == [1, 2]
  assert full[2]['rewards/margins'] != 0.0  # the policy has moved: a wrong reference shows
  for step in (1, 2):
    _close(split[step], full[step], ['loss', 'rewards/chosen', 'rewards/rejected'])


def _config(experiment, **updates):
  c = config_lib.load_config(os.path.join(ROOT, 'experiments', experiment))
  c.init.hf_dir = os.path.join(DPO, 'policy')
  c.data.path = os.path.join(DPO, 'golden.json')  # exists; never read by validate
  for key, value in updates.items():
    config_lib.apply_override(c, key, str(value))
  return c


@pytest.mark.parametrize('experiment, updates, match', [
    ('dpo.py', {'dpo.loss': 'kto'}, r"dpo.loss='kto' needs data.format='unpaired_preference'"),
    ('dpo.py', {'data.format': 'unpaired_preference'},
     r"dpo.loss='sigmoid' needs data.format='preference'"),
    ('dpo.py', {'dpo.loss': 'simpo', 'dpo.ref_hf_dir': DPO + '/ref'},
     r"dpo.ref_hf_dir is set but dpo.loss='simpo' is reference-free"),
    ('dpo.py', {'dpo.ref_hf_dir': DPO + '/ref', 'dpo.ref_params_dir': DPO},
     r"are both set; name one reference"),
    ('dpo.py', {'dpo.ref_hf_dir': REWARD}, r"dpo.ref_hf_dir"),
    ('dpo.py', {'dpo.los': 'x'}, r"'los' is not a key of dpo\. Did you mean 'loss'"),
    ('reward.py', {'data.format': 'prompt_completion'},
     r"train.objective='reward' trains on \{prompt, chosen, rejected\} pairs"),
    ('reward.py', {'model.head': 'lm'}, r"train.objective='reward' needs a scalar head"),
    ('sft.py', {'data.format': 'preference'}, r"train.objective='lm' cannot learn from"),
])
def test_mismatched_objectives_are_one_line_config_errors(experiment, updates, match):
  with pytest.raises(ConfigError, match=match) as e:
    c = _config(experiment, **updates)
    config_lib.validate(c)
  assert '\n' not in str(e.value)
