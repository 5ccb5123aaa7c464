"""`python -m llmjax.quantize` and int4: weight-only post-training quantization.

References: a hand-written numpy int4 (absmax groups, round half to even, nibble packing) and
hand-computed values; the float model run on the dequantized weights (`lora.dequantize_base`),
which a quantized model must compute exactly; `generate` of a float workdir holding those
dequantized weights, whose greedy tokens the quantized workdir must reproduce.
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import llmjax.models
from llmjax import generate, quant, quantize
from llmjax.errors import ConfigError, UserError
from llmjax.eval import __main__ as eval_cli
from llmjax.models import Transformer, layers, lora
from llmjax.models.config import ModelConfig
from llmjax.train import checkpoint

from test_chat_cli import _tokenizer_dir

TINY = dict(vocab_size=32, embed_dim=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128,
            num_layers=2, max_seq_len=32)


# ------------------------------------------------------------------------------ int4 itself


def _int4_reference(w: np.ndarray, n_in: int, g: int):
  """numpy int4: flatten the input axes, absmax per group of g inputs and output column,
  q = round-half-even(w / (absmax * float32(1/7))) in [-7, 7], stored q + 8; in each group the first
  g/2 rows in the high nibbles, the last g/2 in the low ones."""
  shape = w.shape
  d_in = int(np.prod(shape[:n_in]))
  w2 = w.astype(np.float32).reshape(d_in // g, g, -1)
  scale = np.abs(w2).max(axis=1, keepdims=True) * np.float32(1 / 7)
  with np.errstate(invalid='ignore', divide='ignore'):
    q = np.where(scale > 0, w2 / np.where(scale > 0, scale, 1), 0)
  q = np.clip(np.round(q), -7, 7).astype(np.int64) + 8
  packed = (q[:, :g // 2] << 4) | q[:, g // 2:]
  deq = ((q - 8) * scale).reshape(shape)
  return (packed.astype(np.uint8).reshape((d_in // 2,) + shape[n_in:]),
          scale.reshape((d_in // g,) + shape[n_in:]), deq)


def test_int4_hand_computed_values():
  # One group of 4 inputs for one output: absmax 7 -> scale 1; -3.5 and 0.5 are ties (to even).
  w = np.array([[7.0], [-3.5], [0.5], [1.5]], np.float32)  # [in=4, out=1]
  leaves = quant.quantize_int4(w, n_in=1, group_size=4)
  assert float(leaves['scale'][0, 0]) == 1.0
  # q = [7, -4, 0, 2] -> stored [15, 4, 8, 10]; bytes (15 << 4 | 8), (4 << 4 | 10)
  np.testing.assert_array_equal(np.asarray(leaves['values'])[:, 0], [15 * 16 + 8, 4 * 16 + 10])
  np.testing.assert_array_equal(np.asarray(quant.dequantize_int4(leaves, (4, 1)))[:, 0],
                                [7.0, -4.0, 0.0, 2.0])


@pytest.mark.parametrize('shape, n_in, g', [((64, 24), 1, 16), ((4, 16, 24), 2, 32),
                                            ((128, 2, 8), 1, 128)])
def test_int4_matches_the_numpy_reference(shape, n_in, g):
  rng = np.random.default_rng(0)
  w = rng.standard_normal(shape).astype(np.float32)
  flat = w.reshape(int(np.prod(shape[:n_in])), -1)
  flat[:g, 0] = 0.0  # an all-zero group: scale 0, values 0
  # absmax 7, so scale 1 and every k + 1/2 is a tie (rounded to even)
  flat[-g:, -1] = np.resize([7.0, 0.5, 1.5, -2.5, -3.5, 2.5, -0.5, 6.5], g)
  w = flat.reshape(shape)
  packed, scale, deq = _int4_reference(w, n_in, g)
  leaves = quant.quantize_int4(jnp.asarray(w), n_in=n_in, group_size=g)
  np.testing.assert_array_equal(np.asarray(leaves['values']), packed)
  np.testing.assert_array_equal(np.asarray(leaves['scale']), scale)
  np.testing.assert_allclose(np.asarray(quant.dequantize_int4(leaves, shape)), deq, rtol=0,
                             atol=1e-6)
  # error at most half a step of each group
  assert np.all(np.abs(deq - w) <= np.broadcast_to(
      np.repeat(scale.reshape(-1, 1, *shape[n_in:]), g, axis=1).reshape(shape), shape) / 2 + 1e-6)
  assert quant.int4_nbytes(shape, n_in, g) == packed.nbytes + scale.nbytes


def test_int4_group_size_must_divide_the_input():
  with pytest.raises(ConfigError, match='does not divide the input size 48'):
    quant.quantize_int4(jnp.ones((48, 8)), 1, 32)


# ------------------------------------------------- the quantized model is the dequantized one


# (int4 scanned runs in the CLI test below; unscanned here: no vmap over layers)
@pytest.mark.parametrize('method, bs, scan', [('int8', 64, True), ('int4', 16, False),
                                              ('nf4', 64, True)])
def test_quantized_logits_equal_the_float_model_on_dequantized_weights(method, bs, scan):
  float_cfg = ModelConfig(**TINY, scan_layers=scan)
  qcfg = dataclasses.replace(float_cfg, base_quant=method, quant_block_size=bs)
  params = llmjax.models.init_params(float_cfg, jax.random.key(1))
  qparams = lora.quantize_base(params, qcfg)
  flat = traverse_util.flatten_dict(qparams)
  assert not any(p[-1] == 'kernel' and p[0] != 'head' for p in flat)  # only the head is float
  tokens = jnp.arange(16).reshape(2, 8) % 32
  got = Transformer(qcfg).apply({'params': qparams}, tokens)[0]
  want = Transformer(float_cfg).apply({'params': lora.dequantize_base(qparams, qcfg)}, tokens)[0]
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # and the quantized model is close to the float one it came from
  ref = Transformer(float_cfg).apply({'params': params}, tokens)[0]
  assert float(jnp.max(jnp.abs(got - ref))) < 0.5 * float(jnp.max(jnp.abs(ref)))
  # the store's init (fresh weights) has the same leaves as quantize_base
  init = jax.eval_shape(lambda: llmjax.models.init_params(qcfg, jax.random.key(0)))
  assert jax.tree.map(lambda a: (a.shape, a.dtype), init) == jax.tree.map(
      lambda a: (a.shape, a.dtype), qparams)


# ------------------------------------------------------------------------- the CLI end to end


@pytest.fixture(scope='module')
def src(tmp_path_factory):
  """A converted-like workdir: the golden Qwen2 shapes and tokenizer, a large init (so greedy
  tokens depend on the weights)."""
  from llmjax.interop import load_hf
  from test_chat_cli import QWEN
  d = str(tmp_path_factory.mktemp('src'))
  cfg, _, _ = load_hf(QWEN)
  params = llmjax.models.init_params(dataclasses.replace(cfg, init_std=0.3), jax.random.key(0))
  checkpoint.write_params_workdir(d, cfg, params)
  _tokenizer_dir(d)
  return d


def _run(module, capsys, *argv):
  rc = module.main(list(argv))
  out, err = capsys.readouterr()
  return rc, out, err


GEN = ('--prompt_ids=3,14,15,92,65', '--json', '--temperature=0', '--max_new_tokens=8')


# int8 (one scale a channel, default flags) and int4 (--group_size, scanned int4 leaves, eval):
# quantize, the workdir and generate do not branch on the method past quantize_kernel; nf4's
# model is the dequantized one in test_quantized_logits_equal_..., and its quantize_workdir
# (default block 64) in test_quantize_workdir_defaults_to_the_methods_group_size.
@pytest.mark.parametrize('method, group', [('int8', ''), ('int4', '--group_size=32')])
def test_cli_quantizes_and_generate_eval_run_the_quantized_workdir(src, tmp_path, capsys, method,
                                                                   group):
  dst = str(tmp_path / 'q')
  rc, out, err = _run(quantize, capsys, f'--src={src}', f'--dst={dst}', f'--method={method}',
                      *([group] if group else []))
  assert rc == 0, err
  assert out.startswith(f'wrote {dst}: {method}')
  qcfg = checkpoint.read_model_config(dst)
  assert qcfg.base_quant == method and not qcfg.lora_rank
  qparams, step = checkpoint.restore_params(dst)
  assert step == 0
  if method == 'int4':
    assert qcfg.quant_block_size == 32
    flat = traverse_util.flatten_dict(qparams)
    q = flat[('layers', 'mlp', 'down', 'kernel_int4')]
    assert q.dtype == jnp.uint8 and q.shape == (2, 64, 64)  # [layers, in / 2, out]
  # The float model on the dequantized weights, written as an ordinary workdir: its greedy
  # tokens are what the quantized workdir must generate.
  float_dir = str(tmp_path / 'float')
  float_cfg = dataclasses.replace(qcfg, base_quant='')
  checkpoint.write_params_workdir(float_dir, float_cfg, lora.dequantize_base(qparams, qcfg))
  _tokenizer_dir(float_dir)
  rc, got, err = _run(generate, capsys, f'--workdir={dst}', *GEN)
  assert rc == 0, err
  rc, want, err = _run(generate, capsys, f'--workdir={float_dir}', *GEN)
  assert rc == 0, err
  assert json.loads(got)['ids'] == json.loads(want)['ids'] and len(json.loads(got)['ids']) == 8
  if method != 'int4':  # eval loads through the same generate.load: once is enough
    return
  data = tmp_path / 'text.jsonl'
  data.write_text(json.dumps({'text': 'hello world, the quick brown fox'}) + '\n')
  rc, out, err = _run(eval_cli, capsys, f'--workdir={dst}', '--task=perplexity', f'--data={data}',
                      '--json')
  assert rc == 0, err
  assert np.isfinite(json.loads(out)['perplexity'])


@pytest.fixture(scope='module')
def quantized_src(src, tmp_path_factory):
  d = str(tmp_path_factory.mktemp('already') / 'q')
  quantize.quantize_workdir(src, d, 'int8')
  return d


@pytest.mark.parametrize('args, match', [
    (('--method=int3',), "--method='int3' is not a method"),
    (('--method=int8', '--group_size=64'), 'int8 has one scale per output channel'),
    (('--method=int4', '--group_size=33'), '--group_size=33 must be an even integer'),
    # the default; the inputs are 64 and 128 wide
    (('--method=int4',), ': --group_size=128 does not divide the input size 64;'),
    (('--method=nf4', '--step=7'), '--step=7: no such checkpoint'),
    (('--method=nf4', '--dst=EXISTING'), 'exists and is not empty'),
    (('--method=nf4', '--src=QUANTIZED'), 'is already quantized'),
    (('--method=nf4', '--src=NOWHERE'), 'not an llmjax workdir'),
    (('--method=nf4', '--dst='), 'pass --src=DIR'),
])
def test_bad_inputs_are_one_line_errors_before_any_read(src, quantized_src, tmp_path, capsys,
                                                         monkeypatch, args, match):
  def no_read(*a, **k):
    raise AssertionError('params read before the inputs were checked')
  monkeypatch.setattr(checkpoint, 'restore_params', no_read)
  existing = tmp_path / 'existing'
  existing.mkdir()
  (existing / 'x').write_text('')
  subs = {'EXISTING': str(existing), 'QUANTIZED': quantized_src, 'NOWHERE': str(tmp_path / 'no')}
  argv = [f'--src={src}', f'--dst={tmp_path / "new"}']
  for a in args:
    key = a.split('=', 1)[0]
    argv = [x for x in argv if not x.startswith(key + '=')]
    argv.append(key + '=' + subs.get(a.split('=', 1)[1], a.split('=', 1)[1]))
  rc, out, err = _run(quantize, capsys, *argv)
  assert rc != 0 and err.startswith('error: ') and match in err, err
  assert err.count('\n') == 1
  assert not os.path.exists(tmp_path / 'new')


def test_quantize_workdir_defaults_to_the_methods_group_size(src, tmp_path):
  # The API as the CLI: int4 groups of 128 by default (refused here: inputs are 64 wide), nf4 64.
  with pytest.raises(UserError, match='--group_size=128 does not divide'):
    quantize.quantize_workdir(src, str(tmp_path / 'a'), 'int4')
  quantize.quantize_workdir(src, str(tmp_path / 'b'), 'nf4')
  assert checkpoint.read_model_config(str(tmp_path / 'b')).quant_block_size == 64


def test_a_lora_source_is_merged_then_quantized(tmp_path):
  # The quantized workdir of a LoRA run is the quantization of its merged model.
  cfg = ModelConfig(**TINY, lora_rank=4, lora_alpha=8.0)
  params = llmjax.models.init_params(cfg, jax.random.key(2))
  params = jax.tree_util.tree_map_with_path(  # trained adapters: lora_b no longer zero
      lambda p, x: x + 0.1 if p[-1].key == 'lora_b' else x, params)
  src, dst = str(tmp_path / 'lora'), str(tmp_path / 'q')
  checkpoint.write_params_workdir(src, cfg, params)
  quantize.quantize_workdir(src, dst, 'int4', 16)
  merged, merged_cfg = lora.merge(params, cfg)
  want = lora.quantize_base(merged, dataclasses.replace(merged_cfg, base_quant='int4',
                                                        quant_block_size=16))
  got, _ = checkpoint.restore_params(dst)
  qcfg = checkpoint.read_model_config(dst)
  assert qcfg.base_quant == 'int4' and qcfg.lora_rank == 0 and qcfg.quant_block_size == 16
  assert jax.tree.structure(got) == jax.tree.structure(want)
  jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.mark.slow
def test_qlora_with_an_int4_base_builds_from_a_float_workdir_and_trains(tmp_path):
  # The int4 store is QLoRA's too: the state quantizes a float source leaf by leaf
  # (`state._float_base_abstract` places its int4 kernels) and only the adapters move.
  from llmjax.train import state as state_lib
  from test_qlora import _qlora_config
  from test_train import batch_of, trainer_for
  c = _qlora_config('int4', lr=1e-2)
  c.model.quant_block_size = 32
  cfg, tr = trainer_for(c)
  float_cfg = lora.without_lora(cfg)
  float_params = llmjax.models.init_params(float_cfg, jax.random.key(5))
  src = str(tmp_path / 'src')
  checkpoint.write_params_workdir(src, float_cfg, float_params)
  state = tr.init_from(state_lib.source_params(tr.abstract_state.params, cfg, params_dir=src),
                       jax.random.key(0))
  _, base = lora.split(jax.tree.map(np.asarray, state.params))
  jax.tree.map(np.testing.assert_array_equal, base,
               jax.tree.map(np.asarray, lora.split(lora.quantize_base(float_params, cfg))[1]))
  seq = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3] * 2)
  state, m = tr.train_step(state, batch_of(np.stack([seq] * 4)))
  assert np.isfinite(float(m['loss']))
  jax.tree.map(np.testing.assert_array_equal, lora.split(jax.tree.map(np.asarray,
                                                                      state.params))[1], base)


@pytest.mark.slow
def test_int4_qlora_on_an_fsdp_tensor_mesh_gives_the_single_device_losses():
  """8 emulated CPU devices (a subprocess, as tests/test_sharding_multidevice.py): the int4
  leaves shard by the kernel's rules (the scales' group axis replicated: in / bs = 2 rows
  cannot split 4 ways) and fsdp=4 x tensor=2 trains as one device does."""
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS='cpu', ALLOW_MULTIPLE_LIBTPU_LOAD='1', PYTHONPATH=root,
             XLA_FLAGS=os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8')
  proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True,
                        text=True, timeout=600, cwd=root)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out['specs']['layer_0/mlp/gate/kernel_int4'] == ['fsdp', 'tensor']
  assert out['specs']['layer_0/mlp/gate/kernel_int4_scale'] == [None, 'tensor']
  np.testing.assert_allclose(out['fsdp4_tensor2'], out['single'], rtol=1e-5)


def _mesh_scenario():
  import sys
  import tempfile
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import test_sharding_multidevice as multi
  from llmjax.models.config import ModelConfig
  from llmjax.train import state as state_lib
  out, specs, src = {}, {}, tempfile.mkdtemp()
  for name, kw in {'single': dict(rules='fsdp'),
                   'fsdp4_tensor2': dict(rules='fsdp_tensor', fsdp=4, tensor=2)}.items():
    c = multi._config(**kw)
    c.model.update(dict(lora_rank=4, lora_alpha=8.0, base_quant='int4', quant_block_size=32))
    mesh, tr = multi._trainer(c, jax.devices()[:1] if name == 'single' else None)
    cfg = ModelConfig.from_dict(c.model)
    if name == 'single':
      float_cfg = lora.without_lora(cfg)
      checkpoint.write_params_workdir(src, float_cfg,
                                      llmjax.models.init_params(float_cfg, jax.random.key(5)))
    with jax.set_mesh(mesh):
      state = tr.init_from(state_lib.source_params(tr.abstract_state.params, cfg,
                                                   params_dir=src), jax.random.key(0))
    if name != 'single':
      specs = {'/'.join(p): list(a.sharding.spec) for p, a in
               traverse_util.flatten_dict(state.params).items() if p[-1].startswith('kernel_int4')}
    out[name] = multi._train(mesh, tr, multi._batches(4), state=state)[1]
  print(json.dumps(dict(out, specs=specs)))


if __name__ == '__main__':
  _mesh_scenario()
