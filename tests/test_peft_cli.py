"""`convert --from=hf --peft` and `generate --hf --peft`: a PEFT LoRA adapter over its HF base,
against the logits transformers + peft computed for the golden adapters
(tests/golden/peft/<name>/, tools/make_peft_goldens.py)."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from llmjax import convert, generate
from llmjax.models import Transformer
from llmjax.train import checkpoint

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'golden')
LLAMA, QWEN = 'llama_gqa_llama3', 'qwen2_bias_tied'


def _golden(name):
  return np.load(os.path.join(GOLDEN, 'peft', name, 'logits.npz'))


@pytest.mark.parametrize('name,adapter_name', [(QWEN, QWEN), (QWEN, QWEN + '_dora'),
                                               (LLAMA, LLAMA + '_prompt'),
                                               (LLAMA, LLAMA + '_prefix')])
def test_convert_from_hf_with_peft_imports_the_adapter_with_pefts_logits(
    name, adapter_name, tmp_path, capsys):
  base, adapter = os.path.join(GOLDEN, name), os.path.join(GOLDEN, 'peft', adapter_name)
  w = str(tmp_path / 'w')
  assert convert.main(['--from=hf', f'--src={base}', f'--peft={adapter}', f'--dst={w}']) == 0
  cfg = checkpoint.read_model_config(w)
  # From adapter_config.json:
  if adapter_name.endswith(('_prompt', '_prefix')):
    assert cfg.lora_rank == 0 and cfg.num_virtual_tokens > 0
    assert cfg.virtual_tokens == adapter_name.rsplit('_', 1)[1]
  else:
    assert 'adapter params (r=4)' in capsys.readouterr().out
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.use_dora) == (4, 8.0, adapter_name.endswith('dora'))
  params, _ = checkpoint.restore_params(w)
  g = _golden(adapter_name)
  logits, _ = Transformer(cfg).apply({'params': params}, jnp.asarray(g['tokens']))
  np.testing.assert_allclose(np.asarray(logits), g['logits'], atol=1e-4, rtol=0)
  # ...and the workdir's adapters are PEFT's, unmerged: --to=peft writes them back unchanged.
  out = str(tmp_path / 'adapter')
  assert convert.main(['--to=peft', f'--src={w}', f'--dst={out}']) == 0
  want = load_file(os.path.join(adapter, 'adapter_model.safetensors'))
  have = load_file(os.path.join(out, 'adapter_model.safetensors'))
  assert sorted(have) == sorted(want)
  for name in want:
    np.testing.assert_array_equal(have[name], want[name], err_msg=name)


@pytest.mark.parametrize('adapter_name', [LLAMA, LLAMA + '_prompt'])
def test_generate_with_peft_samples_from_the_adapted_model(adapter_name, capsys):
  g = _golden(adapter_name)
  prompt = g['tokens'][0]
  argv = [f"--hf={os.path.join(GOLDEN, LLAMA)}",
          f"--peft={os.path.join(GOLDEN, 'peft', adapter_name)}",
          f"--prompt_ids={','.join(map(str, prompt))}", '--temperature=0',
          '--max_new_tokens=1', '--json']
  assert generate.main(argv) == 0
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  # Greedy: the adapted model's most likely next token, as PEFT computed its logits.
  assert out['ids'] == [int(np.argmax(g['logits'][0, -1]))]
  assert np.argmax(g['logits'][0, -1]) != np.argmax(_base_logits(LLAMA, prompt)[-1])


def _base_logits(name, tokens):
  from llmjax.interop import load_hf
  cfg, params, _ = load_hf(os.path.join(GOLDEN, name))
  return np.asarray(Transformer(cfg).apply({'params': params}, jnp.asarray(tokens)[None])[0][0])


@pytest.mark.parametrize('module,argv,message', [
    (generate, ['--workdir=/tmp/x', '--peft=/tmp/a', '--prompt=hi'], 'needs its base as --hf'),
    (convert, ['--to=hf', '--src=/tmp/x', '--dst=/tmp/y', '--peft=/tmp/a'], 'with --from=hf'),
    (convert, ['--from=hf', f'--src={os.path.join(GOLDEN, LLAMA)}', '--dst=/tmp/never',
               '--peft=RANK8'], 'but the base model implies [8, '),
    (convert, ['--from=hf', f'--src={os.path.join(GOLDEN, LLAMA)}', '--dst=/tmp/never',
               '--peft=/no/such/adapter'], 'is not a directory'),
])
def test_bad_peft_flags_are_one_line_errors(module, argv, message, capsys, tmp_path):
  # RANK8: the golden adapter with r=8 in its config but rank-4 tensors.
  rank8 = tmp_path / 'rank8'
  rank8.mkdir()
  src = os.path.join(GOLDEN, 'peft', LLAMA)
  fields = json.load(open(os.path.join(src, 'adapter_config.json')))
  json.dump(dict(fields, r=8), open(rank8 / 'adapter_config.json', 'w'))
  os.symlink(os.path.join(src, 'adapter_model.safetensors'), rank8 / 'adapter_model.safetensors')
  argv = [a.replace('RANK8', str(rank8)) for a in argv]
  assert module.main(argv) != 0
  err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
  assert len(err) == 1 and err[0].startswith('error:') and message in err[0], err
  assert not os.path.exists('/tmp/never')
