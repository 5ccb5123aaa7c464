"""Training from a Hugging Face checkpoint (`init.hf_dir`) and sampling from one (`generate --hf`)."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from llmjax import config as config_lib
from llmjax import generate
from llmjax.errors import ConfigError
from llmjax.interop import load_hf
from llmjax.train import checkpoint
from llmjax.train.loop import train_and_evaluate

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'golden')
WITH_TOKENIZER = os.path.join(GOLDEN, 'llama_gqa_llama3')  # ships tokenizer.json
WITHOUT_TOKENIZER = os.path.join(GOLDEN, 'llama_dynamic')


def hf_config(hf_dir, **train):
  """A short run whose model is exactly the checkpoint's architecture."""
  cfg, _, _ = load_hf(hf_dir)
  c = config_lib.base_config('tiny')
  c.model.update(dataclasses.asdict(cfg))
  c.init.hf_dir = hf_dir
  c.data.seq_len = 32
  c.data.eval_batches = 2
  c.train.update(dict(steps=2, batch_size=4, log_every=1, eval_every=2, checkpoint_every=100,
                      unigram_baseline_batches=0, warmup_steps=1))
  c.train.update(train)
  return c


def test_training_starts_from_the_checkpoint_weights_and_tokenizer(tmp_path):
  # lr = 0 leaves the weights where they started, so the saved params must be the checkpoint's.
  out = train_and_evaluate(hf_config(WITH_TOKENIZER, lr=0.0), str(tmp_path))
  assert out['step'] == 2
  _, want, tokenizer = load_hf(WITH_TOKENIZER)
  got, _ = checkpoint.restore_params(str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, got, want)
  # The run trained on the checkpoint's token ids: its tokenizer is the workdir's.
  assert os.path.exists(tmp_path / 'hf_tokenizer' / 'tokenizer.json')
  assert not os.path.exists(tmp_path / 'tokenizer.model')
  rows = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  assert np.isfinite(rows[-1]['eval_loss'])
  text = 'Once upon a time'
  from llmjax.data.pipeline import load_run_tokenizer
  assert load_run_tokenizer(str(tmp_path)).encode(text) == tokenizer.encode(text)


def test_training_from_the_checkpoint_lowers_the_loss(tmp_path):
  out = train_and_evaluate(hf_config(WITH_TOKENIZER, steps=6, lr=1e-2, eval_every=6),
                           str(tmp_path))
  rows = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  first, last = rows[0]['loss'], out['loss']
  assert last < first


def test_generate_from_the_workdir_uses_the_checkpoint_tokenizer(tmp_path, capsys):
  train_and_evaluate(hf_config(WITH_TOKENIZER, lr=0.0), str(tmp_path))
  capsys.readouterr()
  rc = generate.main([f'--workdir={tmp_path}', '--prompt=hello', '--max_new_tokens=4',
                      '--temperature=0', '--json'])
  assert rc == 0
  row = json.loads(capsys.readouterr().out.splitlines()[-1])
  _, params, tokenizer = load_hf(WITH_TOKENIZER)
  assert row['prompt_ids'] == [tokenizer.bos_id] + tokenizer.encode('hello')


def test_architecture_mismatch_is_one_line_naming_the_keys():
  c = hf_config(WITH_TOKENIZER)
  c.model.num_layers = 3
  c.model.mlp_dim = 64
  with pytest.raises(ConfigError, match=r'init.hf_dir: .*model.num_layers=3 but .*config.json has'
                                        r' 2; model.mlp_dim=64 but .* has 128'):
    config_lib.validate(c)
  c = hf_config(WITH_TOKENIZER)
  c.model.update(dtype='bfloat16', remat='full', attention='reference', max_seq_len=64)
  config_lib.validate(c)  # runtime fields and a RoPE model's context may differ


def test_hf_dir_and_params_dir_together_are_rejected(tmp_path):
  c = hf_config(WITH_TOKENIZER)
  c.init.params_dir = str(tmp_path)
  with pytest.raises(ConfigError, match='init.hf_dir=.* and init.params_dir=.* are both set'):
    config_lib.validate(c)


def test_generate_hf_without_tokenizer(capsys):
  rc = generate.main([f'--hf={WITHOUT_TOKENIZER}', '--prompt=hi'])
  assert rc == 2
  assert '--prompt_ids' in capsys.readouterr().err
  # The golden's prompt: greedy `generate --hf` continues it as transformers' generate did
  # (tools/make_hf_goldens.py records 32 greedy steps with EOS off; the checkpoint has no
  # tokenizer, so generate has no EOS either).
  with open(os.path.join(WITHOUT_TOKENIZER, 'golden.json')) as f:
    want = json.load(f)
  prompt, continuation = want['prompt'][0], want['generated'][0]
  rc = generate.main([f'--hf={WITHOUT_TOKENIZER}', '--prompt_ids=' + ','.join(map(str, prompt)),
                      f'--max_new_tokens={len(continuation)}', '--temperature=0', '--json'])
  assert rc == 0
  row = json.loads(capsys.readouterr().out.splitlines()[-1])
  assert row['prompt_ids'] == prompt and row['text'] is None
  assert row['ids'] == continuation
