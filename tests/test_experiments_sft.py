"""experiments/sft.py: the generic form and the pinned variants (no compiles: their memory on
TPU slices is `llmjax.plan`'s, recorded in the docstring), and `config.split_variant`."""

import json
import os

import pytest

from llmjax import config as config_lib
from llmjax.errors import ConfigError
from llmjax.interop import hf
from llmjax.models.config import get_preset

SFT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   'experiments', 'sft.py')
VARIANTS = ('qwen2.5-0.5b', 'llama3-1b', 'llama3-8b')  # the names are contracts (issue 11)


def _load(arg):
  return config_lib.load_config(f'{SFT}:{arg}' if arg else SFT)


def test_generic_form_is_unchanged():
  c = _load('')
  assert c.model.preset == '' and c.model.lora_rank == 0  # unpinned, full fine-tuning
  assert (c.data.format, c.data.seq_len, c.train.batch_size, c.train.lr) == (
      'prompt_completion', 1024, 16, 1e-5)
  c = _load('lora=16,format=messages')  # README's form
  assert c.model.preset == '' and c.model.lora_rank == 16 and c.train.lr == 2e-4
  assert c.data.format == 'messages' and c.data.seq_len == 1024
  config_lib.validate(c, data_files=False)


@pytest.mark.parametrize('variant', VARIANTS)
def test_variant_pins_its_preset_and_validates(variant):
  c = _load(variant)
  model = config_lib.validate(c, data_files=False, platform='tpu')  # as llmjax.plan checks it
  assert c.model.preset == variant and model.num_params == get_preset(variant).num_params
  assert model.lora_rank == 0 and model.param_dtype == 'float32'  # full: fp32 master weights
  assert c.data.vocab_size == model.vocab_size
  assert c.train.loss_chunk and c.data.seq_len % c.train.loss_chunk == 0
  assert c.mesh.fsdp == -1 and model.attention == 'pallas' and model.dtype == 'bfloat16'
  # A fine-tuning run must not train on the embedded pretraining corpus.
  with pytest.raises(ConfigError, match="needs data.path"):
    config_lib.validate(c)


def test_lora_turns_on_adapters_on_every_linear_layer():
  full, lora = _load('llama3-8b'), _load('llama3-8b,lora=16,seq_len=2048,batch=8')
  model = config_lib.validate(lora, data_files=False)
  assert model.lora_rank == 16 and model.lora_alpha == 32.0 and model.param_dtype == 'bfloat16'
  # Rank x (in + out) per projection, by hand for Llama 3 8B (d 4096, 8 KV heads of 128, MLP
  # 14336): q and o 4096+4096, k and v 4096+1024, gate and up 4096+14336, down 14336+4096.
  per_layer = 16 * (2 * 8192 + 2 * 5120 + 3 * 18432)
  assert model.num_lora_params == 32 * per_layer == 41_943_040
  assert lora.train.lr == 2e-4 and full.train.lr == 1e-5  # adapters start at zero
  assert (lora.data.seq_len, lora.train.batch_size) == (2048, 8)
  assert config_lib.validate(full, data_files=False).num_lora_params == 0


def test_variant_with_another_models_checkpoint_is_a_one_line_error(tmp_path):
  # A Llama 3.2 1B config.json: the llama3-1b variant takes it, the others name the keys.
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump(hf.config_to_hf(get_preset('llama3-1b')), f)
  ok = _load('llama3-1b')
  ok.init.hf_dir = str(tmp_path)
  config_lib.validate(ok, data_files=False)
  for variant in ('qwen2.5-0.5b', 'llama3-8b'):
    c = _load(variant)
    c.init.hf_dir = str(tmp_path)
    with pytest.raises(ConfigError, match='init.hf_dir') as e:
      config_lib.validate(c, data_files=False)
    assert '\n' not in str(e.value)


@pytest.mark.parametrize('arg,message', [
    ('llama3_8b', r"config variant 'llama3_8b' is unknown. Did you mean 'llama3-8b'\? Variants:"
     r" .*qwen2.5-0.5b"),
    ('gpt5', r"config variant 'gpt5' is unknown. Variants:"),
    ('lora=16,llama3-8b', r"'llama3-8b' is not key=value; put it first: ':llama3-8b,lora=16'"),
    ('llama3-8b,lora=16,fast', r"'fast' is not key=value; only the first item may name"),
    ('llama3-8b,rank=16', r"config argument 'rank' is unknown.* Known: lora, format,"),
    ('qwen2.5-0.5b,seq_len=long', r'config argument seq_len=long: expected int; the default is'
     r' 4096'),
])
def test_bad_arguments_are_one_line_errors(arg, message):
  with pytest.raises(ConfigError, match=message) as e:
    _load(arg)
  assert '\n' not in str(e.value)


def test_split_variant():
  variants = {'a-1': None, 'b': None}
  assert config_lib.split_variant(None, variants) == ('', '')
  assert config_lib.split_variant('x=1,y=2', variants) == ('', 'x=1,y=2')
  assert config_lib.split_variant('a-1', variants) == ('a-1', '')
  assert config_lib.split_variant(' b , x=1 ,', variants) == ('b', 'x=1')
  with pytest.raises(ConfigError, match="config variant 'a1' is unknown. Did you mean 'a-1'"):
    config_lib.split_variant('a1,x=1', variants)
  with pytest.raises(ConfigError, match="config variant 'a' is unknown"):
    config_lib.split_variant('a', {})  # no variants: nothing may be named


def test_tiny_continues_the_quickstart_on_the_builtin_tasks(tmp_path):
  from llmjax.models.config import ModelConfig
  from llmjax.models.transformer import init_params
  from llmjax.train import checkpoint
  import jax
  qs = config_lib.load_config(os.path.join(os.path.dirname(SFT), 'quickstart.py'))
  src = ModelConfig.from_dict(qs.model)
  checkpoint.write_params_workdir(str(tmp_path / 'qs'), src, init_params(src, jax.random.key(0)))
  c = _load(f'tiny,params_dir={tmp_path / "qs"}')
  model = config_lib.validate(c)  # the quickstart's architecture: init.params_dir accepts it
  assert c.init.params_dir == str(tmp_path / 'qs') and c.data.builtin_tasks == (
      'arithmetic', 'facts', 'strings') and c.data.format == 'prompt_completion'
  assert model.lora_rank == 0
  lora = config_lib.validate(_load(f'tiny,lora=8,params_dir={tmp_path / "qs"}'))
  # "LoRA with under 5% trainable parameters" (issue 11): rank 8 on all seven projections.
  assert 0 < lora.num_lora_params / lora.num_params < 0.05
  with pytest.raises(ConfigError, match=r"init.params_dir='/nonexistent' is not an llmjax"):
    config_lib.validate(_load('tiny,params_dir=/nonexistent'))
