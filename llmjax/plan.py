r"""Will it fit? Compile the real train step for a TPU topology on any machine, and say.

    JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1 python -m llmjax.plan \
        --config=experiments/llama3_8b_v5p8.py --topology=v5p:2x2x1 [--slices=2] \
        [--config.train.batch_size=16 ...]

libtpu compiles for a named topology without the chips (`jax.experimental.topologies`), so
this AOT-compiles `make_trainer(...).train_step` exactly as `llmjax.main` would run it, over
the topology's compile-only devices, and prints XLA's own memory analysis per device, the
step's FLOPs, a compute-bound MFU ceiling (model FLOPs over the FLOPs the step executes,
remat's reruns included), the mesh and the shardings of the largest tensors.
It exits 1 with what to change when the step does not fit in HBM, 2 on a bad config.

Every objective plans as it trains: the batch has the keys `build_data` would yield
(`llmjax.data.pipeline.batch_shapes`: DPO and reward rows add pair_mask and margin/label,
precomputed reference log-probs ref_logps), and a DPO step with a frozen reference model gets
its params as the third argument (`Trainer.reference == 'arg'`), so the reference's shards are
counted in the arguments (`Report.reference_bytes`) and its forward pass in the FLOPs. A LoRA
policy's reference is its own base with adapters off (no memory of its own); with
dpo.precompute_ref no reference is loaded at all.

Topology names are '<generation>:<chips per axis>': v4 and v5p are 3-D tori ('v5p:2x2x1' is
a v5p-8: 4 chips; the "-8" counts TensorCores, 2 per chip), v5e and v6e 2-D ('v5e:2x4' is a
v5e-8 and has 8 chips).
"""

import dataclasses
import math
import re
import sys

from llmjax import cli
from llmjax.errors import ConfigError, UserError

GiB = 1024 ** 3


class DoesNotFit(UserError):
  """The train step needs more memory per device than the chip has."""

# Per chip: usable HBM in GiB (libtpu's compile-time OOM message quotes 31.24G for v6e) and
# peak dense bf16 FLOP/s, from Google Cloud's TPU system architecture pages.
CHIPS = {
    'v4': dict(hbm_gib=31.25, peak_flops=275e12),
    'v5e': dict(hbm_gib=15.75, peak_flops=197e12),
    'v5p': dict(hbm_gib=95.73, peak_flops=459e12),
    'v6e': dict(hbm_gib=31.24, peak_flops=918e12),
}


@dataclasses.dataclass
class Report:
  topology: str
  slices: int
  num_devices: int
  devices_per_chip: int
  mesh: dict
  per_device_batch: float
  hbm_bytes: float  # of one device (a chip, or a TensorCore where a chip shows two)
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  flops_per_device: float  # XLA's cost analysis of one device's program
  # = the above where the program has no loop, else `executed_flops_per_token`'s estimate
  flops_executed_per_device: float
  scanned: bool
  model_flops_per_device: float  # 6N + attention per token (PaLM; LoRA: 4N), the MFU numerator
  step_time_floor_s: float  # executed FLOPs at the chip's peak
  largest: list  # (path, shape, dtype, spec, bytes per device)
  # XLA's cost analysis counts a while loop's body once (scanned layers, grad_accum's scan,
  # the chunked loss), so flops_executed_per_device is then the formula's estimate.
  flops_estimated: bool = False
  # How the step gets its reference model (`Trainer.reference`): '' none (or precomputed
  # log-probs in the batch, dpo.precompute_ref), 'arg' a frozen copy of the params passed
  # to the step, 'lora' the LoRA base with adapters off (no second copy).
  reference: str = ''
  reference_bytes: int = 0  # of one device's shards of the frozen reference, in the arguments
  # Parameters the step updates, and all of the model's (a frozen base: adapters or virtual
  # tokens only, `ModelConfig.frozen_base`).
  trainable_params: int = 0
  total_params: int = 0
  # GRPO: the rollouts' KV cache per device (train.batch_size rows of data.seq_len slots, batch
  # over data x fsdp and kv heads over tensor, as `Cache.constrain` places it), held beside the
  # params while sampling, when the step's activations are not.
  rollout_cache_bytes: int = 0

  @property
  def total_bytes(self) -> int:
    """Peak device memory of the step: inputs, live temporaries, outputs that do not reuse a
    donated input (the new state aliases the donated one), and the program itself."""
    return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
            + self.code_bytes)

  @property
  def fits(self) -> bool:
    return self.total_bytes <= self.hbm_bytes

  @property
  def mfu_ceiling(self) -> float:
    """Model FLOPs / executed FLOPs: what rematerialisation leaves of the peak even if every
    op ran at full speed (communication and memory-bound ops only lower it further)."""
    return self.model_flops_per_device / max(self.flops_executed_per_device, 1.0)


def _projections(cfg) -> dict[str, tuple[int, int]]:
  """(in, out) features of each projection of one block, by its module name (LORA_TARGETS)."""
  d, h, kv, hd, f = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  out = {'q': (d, h * hd), 'k': (d, kv * hd), 'v': (d, kv * hd), 'o': (h * hd, d),
         'gate': (d, f), 'up': (d, f), 'down': (f, d)}
  if cfg.mlp != 'swiglu':
    del out['gate']
  return out


# The matmuls of a block whose forward the backward pass reruns, per remat policy
# (`llmjax.models.transformer.REMAT_POLICIES`); 'attention' = the two score matmuls QK^T and PV.
# jax.checkpoint reruns the forward only as far as some gradient reads it: every matmul but the
# block's last, 'down', whose output only enters the residual sum (its gradients need its input
# and weight, never its output). 'dots' keeps every matmul output, 'dots_no_batch' those
# without batch dims (the projections; QK^T and PV are batched over batch and heads),
# 'qkv_proj' only q, k and v. Checked against XLA's count of unscanned programs in
# tests/test_plan.py.
RECOMPUTED = {
    'none': (),
    'full': ('q', 'k', 'v', 'o', 'gate', 'up', 'attention'),
    'dots': (),
    'dots_no_batch': ('attention',),
    'qkv_proj': ('o', 'gate', 'up', 'attention'),
}


def executed_flops_per_token(cfg, seq_len: int, loss_chunk: bool = False) -> float:
  """Matmul FLOPs per token that the train step executes: `cfg.flops_per_token` (6N, or 4N +
  6 x adapters with LoRA, + attention) plus the forward FLOPs rematerialisation reruns.

  Without remat that is 6N: forward 2N, backward 4N (activation and weight gradients); 'full'
  adds a second forward of each block but its last projection (~8N). A frozen LoRA base costs
  2 per weight again for each rerun projection, its adapters 2 per adapter parameter.
  Attention kernels (pallas, cudnn) are custom calls, not dots: under 'dots' their forward
  reruns too. loss_chunk: the chunked loss (jax.checkpoint per chunk) reruns the head.
  Elementwise ops (norms, softmax, the optimizer) are not counted: a few percent.
  """
  rerun = set(RECOMPUTED[cfg.remat])
  if cfg.remat == 'dots' and cfg.attention not in ('xla', 'reference'):
    rerun.add('attention')
  per_layer = 0.0
  adapted = cfg.lora_projections() if cfg.lora_rank else {}
  for name, (n_in, n_out) in _projections(cfg).items():
    if name in rerun:
      rank = cfg.lora_ranks.get(name, cfg.lora_rank)
      adapter = rank * (n_in + n_out) if name in adapted else 0
      per_layer += 2 * (n_in * n_out + adapter)
  if 'attention' in rerun:
    per_layer += 4 * cfg.num_heads * cfg.head_dim * seq_len  # QK^T and PV, 2 FLOPs per MAC
  head = 0.0
  if loss_chunk:
    head_adapter = (cfg.lora_ranks.get('head', cfg.lora_rank) * (cfg.embed_dim + cfg.vocab_size)
                    if 'head' in adapted else 0)
    head = 2 * (cfg.embed_dim * cfg.vocab_size + head_adapter)
  return cfg.flops_per_token(seq_len) + cfg.num_layers * per_layer + head


def _has_loops(compiled, default: bool) -> bool:
  """Whether the compiled program has a while loop (whose body XLA's cost analysis counts once)."""
  try:
    return re.search(r'\bwhile\(', compiled.as_text()) is not None
  except Exception:  # no HLO text from this backend: go by what the config makes loops of
    return default


def get_topology(name: str, slices: int = 1):
  """The compile-only TPU devices of e.g. 'v5e:2x4' ('v5p:2x2x1', 'v6e:4x4', ...)."""
  gen, _, shape = name.partition(':')
  dims = shape.split('x')
  ndim = 3 if gen in ('v4', 'v5p') else 2
  if gen not in CHIPS or len(dims) != ndim or not all(d.isdigit() and int(d) > 0 for d in dims):
    example = {'v4': 'v4:2x2x1', 'v5p': 'v5p:2x2x1', 'v5e': 'v5e:2x4', 'v6e': 'v6e:2x4'}
    raise ConfigError(f"--topology={name} is not a TPU topology name; use one of"
                      f" {', '.join(example.values())} (generation:chips per axis, {ndim} axes"
                      f" for {gen if gen in CHIPS else 'v4/v5p'}).")
  if slices < 1:
    raise ConfigError(f"--slices={slices} must be >= 1.")
  from jax.experimental import topologies
  try:
    topo = topologies.get_topology_desc(platform='tpu', topology_name=name, num_slices=slices)
  except Exception as e:  # libtpu rejects shapes that no slice has (e.g. 'v5e:3x3')
    raise ConfigError(f"--topology={name}: libtpu has no such slice ({str(e).splitlines()[0][:120]});"
                      " use a published shape, e.g. v5e:2x4, v5e:4x4, v5p:2x2x2.") from None
  return topo.devices


def plan(config, topology: str, slices: int | None = None) -> tuple[Report, object]:
  """Compiles the train step of `config` for `topology`; returns (report, compiled)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from llmjax import config as config_lib
  from llmjax import sharding
  from llmjax.data import pipeline
  from llmjax.train.loop import make_trainer

  # plan reads no data: check everything but the data files, which live where the job runs.
  model_cfg = config_lib.validate(config, data_files=False, platform='tpu')
  slices = sharding.num_slices(config.mesh) if slices is None else slices
  devices = get_topology(topology, slices)
  sizes = sharding.validate(config, model_cfg, len(devices), slices)
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.rules_from_config(config)
  trainer = make_trainer(config, model_cfg, mesh, rules)

  b, t = config.train.batch_size, config.data.seq_len
  # The keys the objective's batches carry (a DPO row: + pair_mask, margin [B, P]; with
  # dpo.precompute_ref, + ref_logps [B, 2P]), as build_data yields them.
  batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=trainer.batch_sharding)
           for k, (shape, dtype) in pipeline.batch_shapes(config, b).items()}
  # A frozen reference model (DPO) is the step's third argument, sharded like the policy's
  # params and without optimizer state (its kernels in model.dtype: `Trainer.abstract_reference`).
  ref_args = (trainer.abstract_reference,) if trainer.reference == 'arg' else ()
  reference_bytes = _bytes_per_device(ref_args)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    lowered = trainer.train_step.lower(trainer.abstract_state, batch, *ref_args)
    try:
      compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
      # The TPU compiler itself refuses programs whose temporaries exceed HBM (no analysis
      # comes back then): report its numbers with the same advice as for a step that
      # compiles but does not fit.
      found = re.search(r'HLO temporaries \(([\d.]+\w)\) exceeds available HBM \(([\d.]+\w)\)',
                        str(e))
      if not found:
        raise
      state = _bytes_per_device(trainer.abstract_state)
      raise DoesNotFit(
          f"the TPU compiler needs {found.group(1)} of temporaries per device on top of"
          f" {state / GiB:.2f} GiB of train state"
          + (f" and {reference_bytes / GiB:.2f} GiB of frozen reference" if reference_bytes
             else "") + f", but a {topology.split(':')[0]} device has"
          f" {found.group(2)}; " + advice(config, sizes, b / math.prod(sizes[a] for a in sharding.DATA_AXES),
                                           len(devices)) + ".") from None

  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  gen = topology.split(':')[0]
  chip = CHIPS[gen]
  per_chip = len(devices) // len({(getattr(d, 'slice_index', 0), tuple(d.coords)) for d in devices})
  n = len(devices)
  # The MFU numerator counts what the model needs (LoRA's frozen base: 4N, no weight
  # gradients); the denominator what the program runs, remat's reruns included.
  # A reference model run inside the step ('arg', or 'lora': the base with adapters off)
  # adds its forward pass, 2N + attention's forward per token, never rerun by remat (no
  # gradient flows through it); precomputed log-probs (or none) add nothing.
  ref_flops = (_forward_flops_per_token(model_cfg, t) * b * t / n
               if trainer.reference in ('arg', 'lora') else 0.0)
  model_flops = model_cfg.flops_per_token(t) * b * t / n + ref_flops
  flops = float(cost.get('flops', 0.0))
  loss_chunk = bool(config.train.get('loss_chunk', 0))
  # XLA's count is exact for a loop-free program; a loop's body it counts once, so the scanned
  # layers (or grad_accum's micro-batches, the chunked loss) need the formula instead.
  estimated = not flops or _has_loops(compiled, default=model_cfg.scan_layers or loss_chunk
                                      or config.train.grad_accum > 1)
  if estimated:
    flops_executed = executed_flops_per_token(model_cfg, t, loss_chunk) * b * t / n + ref_flops
  else:
    flops_executed = flops
  floor = flops_executed / (chip['peak_flops'] / per_chip)

  leaves = jax.tree_util.tree_flatten_with_path(trainer.abstract_state)[0]
  largest = []
  for path, leaf in leaves:
    shard = leaf.sharding.shard_shape(leaf.shape)
    largest.append((jax.tree_util.keystr(path, simple=True, separator='/'), tuple(leaf.shape),
                     str(leaf.dtype), str(tuple(leaf.sharding.spec)),
                     math.prod(shard) * jnp.dtype(leaf.dtype).itemsize))
  largest.sort(key=lambda r: -r[-1])

  adapters = model_cfg.num_lora_params + model_cfg.num_virtual_params
  report = Report(
      topology=topology, slices=slices, num_devices=n, devices_per_chip=per_chip, mesh=sizes,
      per_device_batch=b / math.prod(sizes[a] for a in sharding.DATA_AXES),
      hbm_bytes=chip['hbm_gib'] * GiB / per_chip,
      argument_bytes=mem.argument_size_in_bytes, output_bytes=mem.output_size_in_bytes,
      alias_bytes=mem.alias_size_in_bytes, temp_bytes=mem.temp_size_in_bytes,
      code_bytes=mem.generated_code_size_in_bytes, flops_per_device=flops,
      flops_executed_per_device=flops_executed, scanned=model_cfg.scan_layers,
      model_flops_per_device=model_flops, step_time_floor_s=floor, largest=largest[:8],
      flops_estimated=estimated, reference=trainer.reference,
      reference_bytes=reference_bytes, trainable_params=adapters if model_cfg.frozen_base
      else model_cfg.num_params, total_params=model_cfg.num_params + adapters,
      rollout_cache_bytes=_rollout_cache_bytes(config, model_cfg, n))
  return report, compiled


def _rollout_cache_bytes(config, model_cfg, num_devices: int) -> int:
  """Per-device bytes of a GRPO run's rollout KV cache (0 for other objectives)."""
  import jax.numpy as jnp
  from llmjax.infer import engine
  from llmjax.train import objectives
  if objectives.objective(config) not in objectives.RL_OBJECTIVES:
    return 0
  head_dim = model_cfg.head_dim or model_cfg.embed_dim // model_cfg.num_heads
  _, slots = engine.shapes(model_cfg, config.data.seq_len - config.rl.max_completion_length,
                           config.rl.max_completion_length, platform='tpu')
  total = (2 * model_cfg.num_layers * config.train.batch_size * slots * model_cfg.num_kv_heads
           * head_dim * jnp.dtype(model_cfg.dtype).itemsize)
  return total // num_devices


def _bytes_per_device(tree) -> int:
  """Bytes of one device's shards of a pytree of sharded ShapeDtypeStructs."""
  import jax
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


def _forward_flops_per_token(cfg, seq_len: int) -> float:
  """One forward pass of the model without adapters: a third of 6N + attention (PaLM)."""
  return dataclasses.replace(cfg, lora_rank=0).flops_per_token(seq_len) / 3


def advice(config, sizes: dict, per_device_batch: float, num_devices: int) -> str:
  """What to change, most effective first, for a step that does not fit."""
  m, t = config.model, config.train
  tips = []
  if sizes['fsdp'] * sizes['tensor'] < num_devices:
    tips.append(f"shard weights over more chips (--config.mesh.data=1 --config.mesh.fsdp=-1;"
                f" now fsdp={sizes['fsdp']})")
  from llmjax.train import objectives
  if (objectives.uses_reference(config) and not objectives.precomputes_reference(config)
      and not m.get('lora_rank', 0)):
    tips.append("take the frozen reference out of the step: compute its log-probs once before"
                " training (--config.dpo.precompute_ref=True)")
  if m.remat != 'full':
    tips.append(f"recompute activations (--config.model.remat=full; now '{m.remat}')")
  if per_device_batch > 1:
    tips.append(f"lower the per-chip batch ({per_device_batch:g}): halve"
                f" --config.train.batch_size or double --config.train.grad_accum (now {t.grad_accum})")
  if m.dtype != 'bfloat16':
    tips.append("compute in bf16 (--config.model.dtype=bfloat16)")
  if m.attention in ('xla', 'reference') and config.data.seq_len >= 4096:
    tips.append(f"split attention's [heads, {config.data.seq_len}, {config.data.seq_len}] scores"
                " over --config.mesh.tensor=2 --config.sharding.rules=fsdp_tensor (or use a"
                " flash-attention kernel via model.attention)")
  if m.param_dtype == 'float32':
    tips.append("store params in bf16 (--config.model.param_dtype=bfloat16; Adam state follows)")
  tips.append("or use more chips (a larger --topology)")
  return '; '.join(tips)


def format_report(config, report: Report) -> str:
  gib = lambda x: f"{x / GiB:.2f} GiB" if x >= GiB / 10 else f"{x / 2**20:.1f} MiB"
  r = report
  mesh = ' x '.join(f"{a}={s}" for a, s in r.mesh.items())
  unit = 'chip' if r.devices_per_chip == 1 else f'TensorCore ({r.devices_per_chip} per chip)'
  frozen = config.model.get('lora_rank') or config.model.get('virtual_tokens')  # 4N, not 6N
  lines = [
      f"topology {r.topology}" + (f" x {r.slices} slices" if r.slices > 1 else "")
      + f": {r.num_devices} devices, mesh {mesh}, rules '{config.sharding.rules}'",
      f"model {config.model.get('preset', 'custom')}: batch {config.train.batch_size} x"
      f" {config.data.seq_len} tokens ({r.per_device_batch:g} per data x fsdp x expert rank),"
      f" remat '{config.model.remat}', dtype {config.model.dtype}, params {config.model.param_dtype}",
      f"trainable parameters: {r.trainable_params:,} of {r.total_params:,}"
      f" ({100 * r.trainable_params / max(r.total_params, 1):.2f}%)"
      + (" (base frozen)" if frozen else ""),
      f"memory per {unit} (XLA memory_analysis):",
      f"  arguments {gib(r.argument_bytes)}  (train state + batch)",
      *_reference_lines(config, r, gib),
      f"  outputs   {gib(r.output_bytes)}  (of which {gib(r.alias_bytes)} reuse the donated state)",
      f"  temp      {gib(r.temp_bytes)}  (activations, gradients, collectives' buffers)",
      f"  code      {gib(r.code_bytes)}",
      f"  total     {gib(r.total_bytes)} of {gib(r.hbm_bytes)} HBM"
      f" ({100 * r.total_bytes / r.hbm_bytes:.0f}%) -> {'fits' if r.fits else 'DOES NOT FIT'}",
      *([f"  rollouts: KV cache {gib(r.rollout_cache_bytes)} per {unit} for"
         f" {config.train.batch_size} x {config.data.seq_len} slots, beside the train state"
         f" ({gib(r.argument_bytes + r.rollout_cache_bytes)} with it) while sampling"]
        if r.rollout_cache_bytes else []),
      f"FLOPs per step per device: {r.model_flops_per_device:.4g} model"
      f" ({'4N + 6 x adapters' if frozen else '6N'} + attention"
      + (", + the reference's forward 2N + attention" if r.reference else "") + "),"
      + (f" ~{r.flops_executed_per_device:.4g} executed (estimated for remat"
         f" '{config.model.remat}': XLA's cost analysis, {r.flops_per_device:.4g}, counts a"
         " loop's body once)" if r.flops_estimated else
         f" {r.flops_per_device:.4g} compiled (XLA cost analysis)")
      + f"; step >= {r.step_time_floor_s * 1e3:.0f} ms at peak, MFU ceiling"
      f" {100 * r.mfu_ceiling:.0f}%",
      "largest tensors (per-device bytes):",
  ]
  for path, shape, dtype, spec, nbytes in r.largest:
    lines.append(f"  {gib(nbytes):>10}  {path} {dtype}{list(shape)} -> {spec}")
  return '\n'.join(lines)


def _reference_lines(config, r: Report, gib) -> list[str]:
  """What the DPO reference model costs, for a report under the arguments line."""
  from llmjax.train import objectives
  if r.reference == 'arg':
    return [f"            of which {gib(r.reference_bytes)} the frozen reference's params"
            " (a third argument of the step, sharded like the policy's; no optimizer state)"]
  if r.reference == 'lora':
    return ["            the reference is the LoRA base with adapters off: no memory of its own"]
  if objectives.precomputes_reference(config):
    return ["            no reference model loaded: its log-probs come in the batch"
            " (dpo.precompute_ref, ref_logps)"]
  return []


FLAGS = (
    cli.CONFIG_FLAGS[0],
    cli.Flag('topology', '', "the TPU slice to compile for, '<generation>:<chips per axis>'"
             " (e.g. v5e:2x4 is a v5e-8, v5p:2x2x1 a v5p-8)", metavar='GEN:AxB[xC]'),
    cli.Flag('slices', 0, "slices of that topology over DCN (multi-slice); 0: the config's"
             ' mesh.dcn_* product'),
    dataclasses.replace(cli.CONFIG_FLAGS[1], help='ignored: llmjax.main\'s --workdir, accepted'
                        ' so that its command line works here unchanged'),
)


def main(argv: list[str]) -> int:
  return cli.run(_main, argv, error_codes={DoesNotFit: 1})


def _main(argv: list[str]) -> int:
  args = cli.parse(argv, FLAGS, prog='llmjax.plan', doc=__doc__, overrides=True)
  config = cli.load_config(args, need_workdir=False)
  if not args['topology']:
    raise UserError("missing --topology, e.g. --topology=v5e:2x4 (v5e-8) or v5p:2x2x1 (v5p-8).")
  if args['slices'] < 0:
    raise UserError(f"--slices={args['slices']} is not a positive integer.")
  report, _ = plan(config, args['topology'], args['slices'] or None)
  print(format_report(config, report))
  if not report.fits:
    print(f"error: the step needs {report.total_bytes / GiB:.2f} GiB per device but a"
          f" {report.topology.split(':')[0]} device has {report.hbm_bytes / GiB:.2f} GiB; "
          + advice(config, report.mesh, report.per_device_batch, report.num_devices) + ".",
          file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
