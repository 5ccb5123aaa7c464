"""Config loading, overrides and validation: one-line errors naming the key and the fix."""

import glob
import os

import pytest

from llmjax import config as config_lib
from llmjax.errors import ConfigError

# Paths from this file, so the tests find the experiments from any working directory.
EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           'experiments')
QUICKSTART = os.path.join(EXPERIMENTS, 'quickstart.py')


def test_overrides_are_typed_and_applied_in_order():
  c, workdir, rest = config_lib.parse_cli(
      [f'--config={QUICKSTART}:steps=7', '--workdir=/tmp/x', '--config.train.lr=1',
       '--config.model.attention=reference', '--config.model.scan_layers=false'])
  assert c.train.steps == 7 and workdir == '/tmp/x' and rest == {}
  assert c.train.lr == 1.0 and isinstance(c.train.lr, float)
  assert c.model.attention == 'reference' and c.model.scan_layers is False


def test_misspelt_key_suggests_the_closest():
  with pytest.raises(ConfigError, match=r"'step' is not a key of train. Did you mean 'steps'\?"):
    config_lib.parse_cli([f'--config={QUICKSTART}', '--workdir=/tmp/x', '--config.train.step=5'])
  with pytest.raises(ConfigError, match=r"Did you mean 'model'"):
    config_lib.parse_cli([f'--config={QUICKSTART}', '--workdir=/tmp/x', '--config.modle.dtype=x'])


def test_bad_value_type_names_key():
  with pytest.raises(ConfigError, match=r'--config.train.steps=ten: expected int'):
    config_lib.parse_cli([f'--config={QUICKSTART}', '--workdir=/tmp/x', '--config.train.steps=ten'])


def test_unknown_config_argument_and_missing_file():
  with pytest.raises(ConfigError, match="config argument 'stesp' is unknown. Did you mean 'steps'"):
    config_lib.load_config(f'{QUICKSTART}:stesp=3')
  with pytest.raises(ConfigError, match="file 'experiments/nope.py' does not exist"):
    config_lib.load_config('experiments/nope.py')


def _quickstart(**over):
  c = config_lib.load_config(QUICKSTART)
  for k, v in over.items():
    config_lib.apply_override(c, k, str(v))
  return c


@pytest.mark.parametrize('key,value,message', [
    ('model.num_heads', 6, 'model.num_heads=6 does not divide model.embed_dim=256'),
    ('model.num_heads', 8, None),
    ('model.num_kv_heads', 3, 'num_kv_heads=3 must divide model.num_heads=4'),
    ('train.grad_accum', 3, 'train.batch_size=16 is not divisible by train.grad_accum=3'),
    ('data.path', '/nonexistent/*.jsonl', "data.path='/nonexistent/\\*.jsonl' matches no file"),
    ('model.dtype', 'bf16', "model.dtype='bf16' is not one of"),
    ('model.attention', 'xla', None),
])
def test_validate(key, value, message):
  c = _quickstart(**{key: value})
  if message is None:
    config_lib.validate(c)
  else:
    with pytest.raises(ConfigError, match=message):
      config_lib.validate(c)


def test_every_experiment_loads_and_validates():
  paths = sorted(glob.glob(os.path.join(EXPERIMENTS, '*.py')))
  # Five exist today: a glob that finds none (or a few) must not pass by looping over nothing.
  assert len(paths) >= 5, paths
  for path in paths:
    c = config_lib.load_config(path)
    # Their data comes on the launch command, so they are checked as llmjax.plan checks them;
    # a fine-tuning one must refuse to run on the embedded (pretraining) corpus.
    config_lib.validate(c, data_files=False)
    if c.data.format in ('prompt_completion', 'preference'):
      with pytest.raises(ConfigError, match=f"data.format='{c.data.format}' needs data.path"):
        config_lib.validate(c)
    elif c.data.split == 'tail':  # shakespeare_char.py: the text file is the user's own copy
      with pytest.raises(ConfigError, match="data.split='tail' needs data.path"):
        config_lib.validate(c)
    else:
      config_lib.validate(c)


@pytest.mark.parametrize('over,message', [
    ({'data.format': 'prompt-completion'}, r"data.format='prompt-completion' is not one of"
     r" \['text', 'prompt_completion', 'alpaca', 'messages', 'preference',"
     r" 'unpaired_preference'\]. Did you mean 'prompt_completion'\?"),
    ({'data.format': 'chat'}, r"data.format='chat' is not one of \['text', 'prompt_completion',"
     r" 'alpaca', 'messages', 'preference', 'unpaired_preference'\]\.$"),
    ({'data.format': 'preference'}, r"data.format='preference' needs data.path: .* text only"),
    ({'data.format': 'prompt_completion'}, r"needs data.path: a .jsonl file or glob of .*"
     r" text only"),
    ({'data.format': 'messages'}, r"data.format='messages' needs data.path: .* text only"),
    ({'data.format': 'prompt_completion', 'data.tfds_name': 'lm1b'}, r"needs data.path"),
])
def test_validate_data_format(over, message):
  c = _quickstart(**over)
  with pytest.raises(ConfigError, match=message) as e:
    config_lib.validate(c)
  assert '\n' not in str(e.value)
  if over['data.format'] in ('prompt_completion', 'messages'):
    config_lib.validate(c, data_files=False)  # what llmjax.plan checks: no data needed there


@pytest.mark.parametrize('arg, lora, precompute, head', [
    ('dpo.py:llama3-8b', 0, False, 'lm'),
    ('dpo.py:llama3-8b,lora=16', 16, False, 'lm'),
    ('dpo.py:llama3-8b,precompute_ref=1', 0, True, 'lm'),
    ('reward.py:llama3-8b', 0, False, 'score'),
])
def test_preference_8b_variants_pin_their_preset_and_validate(arg, lora, precompute, head):
  """The :llama3-8b variants whose `llmjax.plan` numbers experiments/dpo.py and reward.py
  quote: Llama 3 8B pinned (so plan runs without the checkpoint), validated as plan checks
  them, and refusing to train without data.path."""
  from llmjax.models.config import get_preset
  from llmjax.train import objectives
  c = config_lib.load_config(os.path.join(EXPERIMENTS, arg))
  model = config_lib.validate(c, data_files=False, platform='tpu')
  assert c.model.preset == 'llama3-8b' and c.init.hf_dir == ''  # the checkpoint: the user's
  assert model.num_params == get_preset('llama3-8b').num_params + (head == 'score') * (
      4096 - 4096 * 128256)  # a [4096, 1] score head instead of the LM head
  assert (model.lora_rank, model.head) == (lora, head)
  assert model.param_dtype == ('bfloat16' if lora else 'float32')
  assert objectives.precomputes_reference(c) is precompute
  assert c.mesh.fsdp == -1 and model.attention == 'pallas' and model.remat == 'full'
  with pytest.raises(ConfigError, match="data.format='preference' needs data.path"):
    config_lib.validate(c)
