"""Weight-only post-training quantization of a workdir's projections.

    python -m llmjax.quantize --src=/tmp/quickstart --dst=/tmp/quickstart_int8 --method=int8
    python -m llmjax.quantize --src=DIR --dst=DIR_INT4 --method=int4 [--group_size=128]
    python -m llmjax.quantize --src=DIR --dst=DIR_NF4 --method=nf4 [--group_size=64] [--step=N]

Methods (`llmjax.quant`; every attention and MLP projection, never the embedding, the norms or
the LM/score head, which stay as they were, as in QLoRA):
  int8  per output channel absmax (LLM.int8's vector-wise quantization without outliers);
        --group_size is an error (one scale per channel).
  int4  symmetric absmax per group of --group_size consecutive input features (default 128,
        GPTQ's and AWQ's group size, round to nearest); it must divide every projection's
        input size (refused, not padded: padded groups would not shard evenly, and model
        widths are multiples of 128 anyway).
  nf4   QLoRA's 4-bit NormalFloat in blocks of --group_size (default 64), bitsandbytes' values
        (any even size: a partial last block is kept, as bitsandbytes does).

The source is a trained workdir (its latest checkpoint, or --step) or one written by
`llmjax.convert --from=hf`; a LoRA/DoRA run's adapters are merged into the kernels first
(`lora.merge`, what generate does), so the quantized model computes the merged one. The
destination is a new workdir: the source's model_config.json with model.base_quant (and
model.quant_block_size) set, checkpoints/0 holding the quantized params (`layers.KERNEL_STORES`
leaves), and the source's tokenizer files. It is the same mechanism as QLoRA's base, without
adapters, so `python -m llmjax.generate --workdir=DST` and `python -m llmjax.eval
--workdir=DST` run it as they are, dequantizing each kernel inside its matmul
(`layers._quantized_store`). (`llmjax.serve`, issue 16, will load workdirs through the same
`generate.load`.)
"""

import dataclasses
import sys

from llmjax import cli, files
from llmjax.errors import CheckpointError, ConfigError, UserError, closest

# --method -> its default --group_size (None: no groups).
METHODS = {'int8': None, 'int4': 128, 'nf4': 64}

FLAGS = (
    cli.Flag('src', '', 'the workdir to quantize (a training run or `convert --from=hf` output;'
             ' local or gs://)', metavar='DIR'),
    cli.Flag('dst', '', 'the new workdir to write (must not exist or be empty)', metavar='DIR'),
    cli.Flag('method', '', 'int8 (per output channel), int4 (group-wise absmax) or nf4 (QLoRA)',
             metavar='int8|int4|nf4'),
    cli.Flag('group_size', 0, 'int4 / nf4: values per scale (defaults 128 / 64); not with int8'),
    cli.Flag('step', -1, 'the checkpoint step of --src; -1: the latest'),
)


def parse_flags(argv: list[str]) -> dict:
  """argv -> {flag: value}; every bad flag a one-line UserError (nothing read yet)."""
  flags = cli.parse(argv, FLAGS, prog='llmjax.quantize', doc=__doc__)
  if not flags['src'] or not flags['dst']:
    raise UserError("pass --src=DIR (the workdir to quantize) and --dst=DIR (a new workdir).")
  method = flags['method']
  if method not in METHODS:
    raise UserError(f"--method={method!r} is not a method.{closest(method, METHODS)}"
                    f" Methods: {', '.join(METHODS)}.")
  gs = flags['group_size']
  if method == 'int8':
    if gs:
      raise UserError(f"--group_size={gs}: int8 has one scale per output channel, no groups;"
                      " drop --group_size (or use --method=int4 / nf4).")
  elif not gs:
    flags['group_size'] = METHODS[method]
  elif gs < 2 or gs % 2:
    raise UserError(f"--group_size={gs} must be an even integer >= 2 (two 4-bit values share a"
                    f" byte); default {METHODS[method]}.")
  if files.resolve(flags['src']) == files.resolve(flags['dst']):
    raise UserError("--dst must be a new workdir, not --src.")
  return flags


def _nonempty(path: str) -> bool:
  if not files.isdir(path):
    return files.exists(path)
  if files.is_remote(path):  # a listing is not cheap on gs://: what a workdir would hold
    return (files.exists(files.join(path, 'model_config.json'))
            or files.isdir(files.join(path, 'checkpoints')))
  import os
  return bool(os.listdir(path))


def quantized_config(cfg, method: str, group_size: int | None, src: str):
  """The ModelConfig of the quantized workdir: `cfg` (adapters merged away) with
  model.base_quant = method; a one-line error for a source it cannot quantize."""
  from llmjax.models import lora
  if cfg.base_quant:
    raise UserError(f"{src} is already quantized (model.base_quant={cfg.base_quant!r} in its"
                    " model_config.json); quantize its float source instead.")
  if cfg.virtual_tokens:
    raise UserError(f"{src} is a {cfg.virtual_tokens}-tuning run: its virtual tokens cannot be"
                    " merged into the weights; quantize its base model instead.")
  base = lora.without_lora(cfg)
  fields = dict(base_quant=method)
  if group_size is not None:
    fields['quant_block_size'] = group_size
  qcfg = dataclasses.replace(base, **fields)
  qcfg.validate()
  return qcfg


def check_shapes(qcfg, flags) -> None:
  """Traces the quantized model's param shapes (no compute): --group_size must divide every
  projection's input size for int4 (`layers.quant_layout`)."""
  import jax

  from llmjax.models import transformer
  try:
    jax.eval_shape(lambda: transformer.init_params(qcfg, jax.random.key(0)))
  except ConfigError as e:  # 'a projection kernel of shape S: model.quant_block_size=G ...'
    raise UserError(f"{flags['src']}: {str(e).replace('model.quant_block_size', '--group_size')}"
                    ) from None


def _check_step(src: str, step: int) -> int:
  from llmjax.train import checkpoint
  latest = checkpoint.latest_step(src)  # CheckpointError when there is none
  if step < 0:
    return latest
  import orbax.checkpoint as ocp
  manager = ocp.CheckpointManager(checkpoint.checkpoint_dir(src),
                                  options=ocp.CheckpointManagerOptions(read_only=True,
                                                                       create=False))
  steps = sorted(manager.all_steps())
  manager.close()
  if step not in steps:
    raise CheckpointError(f"--step={step}: no such checkpoint in"
                          f" {checkpoint.checkpoint_dir(src)}; it has steps {steps}.")
  return step


def quantize_params(params: dict, qcfg) -> dict:
  """A float model's params -> `qcfg`'s (model.base_quant set): `lora.quantize_base`, one
  jitted call per kernel (a stacked [layers, ...] kernel at once), so no more than one float
  kernel's temporaries exist at a time."""
  import jax
  from flax import traverse_util

  from llmjax.models import lora
  quantize = lora.quantizer(qcfg)
  out = {}
  for path, value in traverse_util.flatten_dict(params).items():
    if jax.eval_shape(lambda k: quantize(path, k), value) is None:
      out[path] = value
      continue
    out.update(jax.jit(lambda k: quantize(path, k))(value))
  return traverse_util.unflatten_dict(out)


def weight_bytes(params) -> int:
  """Bytes of every array in `params` (what the weights cost in memory)."""
  import jax
  return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(params))


def _copy_tokenizer(src: str, dst: str) -> None:
  """The source's tokenizer (a run's hf_tokenizer/ or tokenizer.model, a converted dir's HF
  files) and chat template, so generate/eval of dst read the same text."""
  from llmjax.data.chat import RUN_TEMPLATE
  from llmjax.data.pipeline import HF_TOKENIZER_DIR
  from llmjax.interop.tokenizer import TOKENIZER_READ_FILES
  for sub in ('', HF_TOKENIZER_DIR):
    src_dir = files.join(src, sub) if sub else src
    if sub and not files.isdir(src_dir):
      continue
    dst_dir = files.join(dst, sub) if sub else dst
    for name in TOKENIZER_READ_FILES + (RUN_TEMPLATE,):
      if files.exists(files.join(src_dir, name)):
        files.makedirs(dst_dir)
        files.copy_file(files.join(src_dir, name), files.join(dst_dir, name))


def quantize_workdir(src: str, dst: str, method: str, group_size: int | None = None,
                     step: int = -1) -> dict:
  """Writes the quantized workdir `dst` from `src` (module docstring; group_size None: the
  method's default, METHODS); returns
  {'step', 'float_bytes', 'quant_bytes', 'config'}. Every check precedes the params read."""
  from llmjax.models import lora
  from llmjax.train import checkpoint
  if method not in METHODS:
    raise UserError(f"--method={method!r} is not a method.{closest(method, METHODS)}")
  if method == 'int8' and group_size:
    raise UserError(f"--group_size={group_size}: int8 has one scale per output channel, no"
                    " groups; drop --group_size.")
  group_size = group_size or METHODS[method]  # None for int8
  if _nonempty(dst):
    raise UserError(f"--dst={dst} exists and is not empty; pass a new directory.")
  cfg = checkpoint.read_model_config(src)
  qcfg = quantized_config(cfg, method, group_size, src)
  check_shapes(qcfg, {'group_size': group_size, 'src': src})
  step = _check_step(src, step)
  params, _ = checkpoint.restore_params(src, step=step)
  params, _ = lora.merge(params, cfg)  # adapters folded in (no-op without LoRA)
  qparams = quantize_params(params, qcfg)
  out = {'step': step, 'float_bytes': weight_bytes(params), 'quant_bytes': weight_bytes(qparams),
         'config': qcfg}
  del params
  checkpoint.write_params_workdir(dst, qcfg, qparams)
  _copy_tokenizer(src, dst)
  return out


def main(argv: list[str]) -> int:
  return cli.run(_main, argv, error_code=1)


def _main(argv: list[str]) -> int:
  flags = parse_flags(argv)
  group_size = flags['group_size'] or None
  r = quantize_workdir(flags['src'], flags['dst'], flags['method'], group_size, flags['step'])
  groups = f", group size {group_size}" if group_size else ''
  print(f"wrote {flags['dst']}: {flags['method']}{groups} from step {r['step']} of"
        f" {flags['src']}; weights {r['float_bytes']:,} -> {r['quant_bytes']:,} bytes"
        f" ({r['quant_bytes'] / r['float_bytes']:.3f}x)")
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
