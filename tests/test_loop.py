"""End-to-end: the CLI runs the quickstart; a stopped and resumed run equals an uninterrupted one."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from llmjax import config as config_lib
from llmjax import main as main_lib
from llmjax.train.loop import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**train):
  """The quickstart shrunk to seconds: 2 layers, d=64, 32-token rows, a 512-piece tokenizer."""
  c = config_lib.load_config(os.path.join(ROOT, 'experiments/quickstart.py'))
  c.model.update(dict(num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2, head_dim=16,
                      mlp_dim=128, vocab_size=512))
  c.data.vocab_size = 512
  c.data.seq_len = 32
  c.data.eval_batches = 2
  c.train.update(dict(steps=12, batch_size=4, log_every=1, eval_every=6, checkpoint_every=100,
                      unigram_baseline_batches=2, warmup_steps=2))
  c.train.update(train)
  c.sample.prompts = ('Once upon a time',)
  c.sample.max_new_tokens = 8
  return c


def losses(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  return {r['step']: r['loss'] for r in rows if 'loss' in r}


def test_stopped_and_resumed_run_equals_uninterrupted_run(tmp_path):
  full = tmp_path / 'full'
  train_and_evaluate(tiny_config(), str(full))
  split = tmp_path / 'split'
  out = train_and_evaluate(tiny_config(stop_at_step=5), str(split))
  assert out['step'] == 5
  assert sorted(os.listdir(split / 'checkpoints')) == ['5']
  out = train_and_evaluate(tiny_config(), str(split))  # resumes at 5: same model, data order, LR
  assert out['step'] == 12
  want, got = losses(full), losses(split)
  assert sorted(got) == list(range(1, 13))
  assert got == want  # bitwise: same data order, same RNG, same compiled step
  for name in ('loss_curve.png', 'tokenizer.model', 'config.json', 'model_config.json'):
    assert (split / name).exists(), name
  assert any(f.startswith('events') for f in os.listdir(split / 'tensorboard'))
  rows = [json.loads(l) for l in open(full / 'metrics.jsonl')]
  evals = [r for r in rows if 'eval_loss' in r]
  assert [r['step'] for r in evals] == [6, 12]
  assert all('eval_perplexity' in r and 'tokens_per_s' in r for r in evals)


def test_workdir_of_another_model_is_refused_before_training(tmp_path):
  train_and_evaluate(tiny_config(steps=2), str(tmp_path))
  c = tiny_config(steps=4)
  c.model.num_layers = 3
  from llmjax.errors import CheckpointError
  with pytest.raises(CheckpointError, match=r'--workdir=.*: the experiment.s model differs from .*'
                                      r'model.num_layers=3 but .* has 2\.'):
    train_and_evaluate(c, str(tmp_path))
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2']  # nothing saved was lost


def _cli(args, **kw):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
  return subprocess.run([sys.executable, '-m', *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, **kw)


SHRINK = ['--config.model.num_layers=2', '--config.model.embed_dim=64', '--config.model.mlp_dim=128',
          '--config.model.vocab_size=512', '--config.data.vocab_size=512', '--config.data.seq_len=32',
          '--config.train.batch_size=4', '--config.data.eval_batches=2',
          '--config.train.unigram_baseline_batches=2']


@pytest.mark.slow
def test_quickstart_cli_end_to_end_then_generate(tmp_path):
  r = _cli(['llmjax.main', '--config=experiments/quickstart.py:steps=6', f'--workdir={tmp_path}',
            '--config.train.eval_every=3', *SHRINK], timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  log = r.stdout + r.stderr
  assert 'parameters' in log and 'MFLOPs/token' in log and 'unigram baseline' in log
  assert 'sample: Once upon a time' in log
  r = _cli(['llmjax.generate', f'--workdir={tmp_path}', '--prompt=Once upon a time',
            '--max_new_tokens=5', '--temperature=0', '--json'], timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  # Greedy decoding is a prefix of itself: 12 tokens (the same compiled shapes: prompt and
  # cache rounded to 16 and 64) show where EOS falls, so the 5-token run must be exactly
  # their first 5, or stop exactly where they do.
  r = _cli(['llmjax.generate', f'--workdir={tmp_path}', '--prompt=Once upon a time',
            '--max_new_tokens=12', '--temperature=0', '--json'], timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  longer = json.loads(r.stdout.strip().splitlines()[-1])['ids']
  assert out['ids'] == longer[:5]
  assert len(out['ids']) == min(5, len(longer))


def test_cli_bad_input_is_one_line(tmp_path):
  r = _cli(['llmjax.main', '--config=experiments/quickstart.py', f'--workdir={tmp_path}',
            '--config.train.setps=3'], timeout=120)
  assert r.returncode == 2
  assert r.stderr.strip().splitlines() == [
      "error: --config.train.setps: 'setps' is not a key of train. Did you mean 'steps'?"
      " Keys there: " + ', '.join(sorted(tiny_config().train.keys())) + '.']
  r = _cli(['llmjax.main', '--config=experiments/pretrain.py:model=llama4', f'--workdir={tmp_path}'],
           timeout=120)
  assert r.returncode == 2 and 'unknown' in r.stderr and 'llama3-8b' in r.stderr
  assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
  p = subprocess.Popen([sys.executable, '-m', 'llmjax.main', '--config=experiments/quickstart.py:steps=100000',
                        f'--workdir={tmp_path}', '--config.train.eval_every=100000',
                        '--config.train.checkpoint_every=100000', *SHRINK],
                       cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  metrics = tmp_path / 'metrics.jsonl'
  deadline = time.time() + 300
  while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
    time.sleep(0.5)
  p.send_signal(signal.SIGTERM)
  out, _ = p.communicate(timeout=300)
  assert p.returncode == 0, out[-3000:]
  saved = int(out.split('SIGTERM: saved step ')[1].split(';')[0])
  assert os.listdir(tmp_path / 'checkpoints') == [str(saved)]


def test_cli_corrupt_jsonl_names_file_and_line(tmp_path):
  corpus = tmp_path / 'c.jsonl'
  corpus.write_text('{"text": "ok"}\n' * 25 + '{"text": "broken\n')
  r = _cli(['llmjax.main', '--config=experiments/quickstart.py', f'--workdir={tmp_path}/w',
            f'--config.data.path={corpus}'], timeout=120)
  assert r.returncode == 2
  assert r.stderr.strip().splitlines() == [
      f'error: {corpus}:26: invalid JSON (Invalid control character at at column 17); fix or'
      ' delete that line.']


def test_logged_rows_hold_what_was_measured_at_their_step(tmp_path, monkeypatch):
  """tokens/s covers the train steps since the last log, eval time excluded; an eval-only row
  re-logs no train metrics; lr is the rate the step's update used. A fake clock makes each
  train step take exactly 1 s and each eval 10 s."""
  import dataclasses
  import types

  import jax

  from llmjax.train import loop
  from llmjax.train.optimizer import learning_rate_schedule
  now = [0.0]
  monkeypatch.setattr(loop, 'time', types.SimpleNamespace(time=lambda: now[0]))
  make_trainer, evaluate = loop.make_trainer, loop.evaluate

  def slow_trainer(*a, **kw):
    tr = make_trainer(*a, **kw)

    def step(state, batch):
      out = tr.train_step(state, batch)
      jax.block_until_ready(out)
      now[0] += 1.0
      return out
    return dataclasses.replace(tr, train_step=step)

  def slow_evaluate(*a, **kw):
    now[0] += 10.0
    return evaluate(*a, **kw)

  monkeypatch.setattr(loop, 'make_trainer', slow_trainer)
  monkeypatch.setattr(loop, 'evaluate', slow_evaluate)
  c = tiny_config(steps=6, log_every=2, eval_every=3, unigram_baseline_batches=0)
  c.sample.prompts = ()
  train_and_evaluate(c, str(tmp_path))
  rows = {r['step']: r for r in map(json.loads, open(tmp_path / 'metrics.jsonl'))}
  assert sorted(rows) == [2, 3, 4, 6]
  per_step = c.train.batch_size * c.data.seq_len
  for s in (2, 4, 6):
    assert rows[s]['tokens_per_s'] == pytest.approx(per_step), s  # 2 steps in 2 s
  assert set(rows[3]) == {'step', 'eval_loss', 'eval_perplexity'}  # eval only: no stale loss
  assert 'eval_loss' in rows[6] and 'loss' in rows[6]
  schedule = learning_rate_schedule(c.train)
  assert rows[4]['lr'] == pytest.approx(float(schedule(3)))  # step 4's update used count 3
