"""LoRA adapters (Hu et al. 2021, https://arxiv.org/abs/2106.09685) on the params pytree.

With `model.lora_rank > 0` every projection named in `model.lora_targets` holds, beside its
frozen `kernel`, two adapter leaves `lora_a` [in..., rank] and `lora_b` [rank, out...] and
computes x @ kernel + s * x @ lora_a @ lora_b, s = lora_alpha / rank (alpha / sqrt(rank) with
model.use_rslora); with model.use_dora also `lora_magnitude` [out...] (`models.adapters`).
Training differentiates and updates only the adapters (`split` / `combine` in the train step,
Adam moments only for them); `merge` folds them into the kernels for export and serving.

Params are nested dicts; scanned layers add a leading [layers] dim to every leaf, adapters
included. The helpers work on any pytree shaped like the params (shardings, specs, ...).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import traverse_util

from llmjax.models import adapters as adapters_lib
from llmjax.models import axes as axes_lib
from llmjax.models.config import ModelConfig

# lora_a, lora_b and DoRA's lora_magnitude; and the virtual tokens of prompt tuning
# (`prompt_embedding`, transformer.py) and prefix tuning (`prefix_k`, `prefix_v`, attention.py):
# the leaves that a frozen-base run trains.
VIRTUAL_TOKEN_LEAVES = ('prompt_embedding', 'prefix_k', 'prefix_v')
ADAPTER_LEAVES = adapters_lib.DORA_LEAVES + VIRTUAL_TOKEN_LEAVES


def is_adapter(path: tuple[str, ...]) -> bool:
  """True for a flattened params path ending in an adapter leaf."""
  return path[-1] in ADAPTER_LEAVES


def split(params) -> tuple[dict, dict]:
  """params -> (adapters, base): two nested dicts partitioning the leaves of `params`."""
  flat = traverse_util.flatten_dict(params)
  adapters = {p: v for p, v in flat.items() if is_adapter(p)}
  base = {p: v for p, v in flat.items() if not is_adapter(p)}
  return traverse_util.unflatten_dict(adapters), traverse_util.unflatten_dict(base)


def combine(adapters: dict, base: dict) -> dict:
  """The inverse of `split`."""
  flat = traverse_util.flatten_dict(base)
  flat.update(traverse_util.flatten_dict(adapters))
  return traverse_util.unflatten_dict(flat)


def without_lora(cfg: ModelConfig) -> ModelConfig:
  """The base model's config: the architecture a merged or pretrained checkpoint has (a
  float base: `merge` dequantizes a QLoRA base first)."""
  return dataclasses.replace(cfg, lora_rank=0, lora_ranks={}, lora_dropout=0.0,
                             use_rslora=False, use_dora=False, base_quant='',
                             virtual_tokens='', num_virtual_tokens=0, value_head=False)


# ------------------------------------------------------------- a quantized base (QLoRA)


def float_base(cfg: ModelConfig) -> ModelConfig:
  """`cfg` with a float base (model.base_quant=''): the same model, kernels as 'kernel'."""
  return dataclasses.replace(cfg, base_quant='')


def kernel_specs(cfg: ModelConfig) -> dict:
  """{flattened path of every 'kernel' of the float model: (shape, logical axes)}."""
  from llmjax.models import transformer  # lazy: transformer imports the layers that import us
  float_cfg = float_base(cfg)
  shapes = jax.eval_shape(lambda: transformer.init_params(float_cfg, jax.random.key(0)))
  names = traverse_util.flatten_dict(transformer.logical_axes(float_cfg))
  return {p: (a.shape, tuple(names[p])) for p, a in traverse_util.flatten_dict(shapes).items()
          if p[-1] == 'kernel'}


def _per_layer(fn, stacked: int):
  for _ in range(stacked):  # nn.scan's leading [layers] dim(s)
    fn = jax.vmap(fn)
  return fn


def quantizer(cfg: ModelConfig):
  """fn(path, kernel) -> {path of each quantized leaf: array} for a float 'kernel' leaf at
  `path` that `cfg` stores quantized, None for any other leaf; the model's shapes are traced
  once here. For `quantize_base` and for state building one leaf at a time."""
  from llmjax.models import layers
  abstract = traverse_util.flatten_dict(_abstract_quantized(cfg))
  quantized = {p[:-1] for p in abstract if p[-1] in layers.QUANT_LEAVES}
  specs = kernel_specs(cfg)

  def quantize(path, kernel):
    if path[-1] != 'kernel' or path[:-1] not in quantized:
      return None
    shape, names = specs[path]
    stacked = sum(1 for n in names if n == axes_lib.LAYERS)
    n_in = _n_in(abstract.get(path[:-1] + ('kernel_scale',)), shape, stacked,
                 abstract.get(path[:-1] + ('kernel_int4_scale',)))
    leaves = _per_layer(lambda k: layers.quantize_kernel(cfg, k, n_in), stacked)(kernel)
    return {path[:-1] + (name,): v for name, v in leaves.items()}

  return quantize


def quantize_base(params: dict, cfg: ModelConfig) -> dict:
  """A float base's params -> the params of `cfg` (model.base_quant set): every kernel that
  `cfg` stores quantized replaced by its quantized leaves (`layers.KERNEL_STORES`), the rest
  unchanged; `params` may be any subset of a model's leaves."""
  if not cfg.base_quant:
    return params
  quantize = quantizer(cfg)
  out = {}
  for path, value in traverse_util.flatten_dict(params).items():
    leaves = quantize(path, value)
    out.update({path: value} if leaves is None else leaves)
  return traverse_util.unflatten_dict(out)


def _abstract_quantized(cfg: ModelConfig):
  from llmjax.models import transformer
  return jax.eval_shape(lambda: transformer.init_params(cfg, jax.random.key(0)))


def _n_in(scale, shape: tuple, stacked: int, int4_scale=None) -> int:
  """The input axes of a kernel of `shape`, read off its int8 scale [s..., 1..., out...] or its
  int4 scale [s..., in / bs, out...] (the stores' layouts); NF4 does not need them (1)."""
  if int4_scale is not None:
    return len(shape) - (int4_scale.ndim - 1)
  if scale is None:
    return 1
  scale_shape, shape = tuple(scale.shape[stacked:]), tuple(shape[stacked:])
  return next(i for i in range(1, len(shape))
              if scale_shape[i:] == shape[i:] and all(d == 1 for d in scale_shape[:i]))


def dequantize_base(params: dict, cfg: ModelConfig, dtype=None) -> dict:
  """The inverse of `quantize_base`: every quantized kernel back as a 'kernel' leaf in `dtype`
  (default model.param_dtype), i.e. the float model that the quantized one computes."""
  from llmjax.models import layers
  if not cfg.base_quant:
    return params
  dtype = jnp.dtype(dtype or cfg.param_dtype)
  specs = kernel_specs(cfg)
  flat = traverse_util.flatten_dict(params)
  out = {p: v for p, v in flat.items() if p[-1] not in layers.QUANT_LEAVES}
  modules = {p[:-1] for p in flat if p[-1] in layers.QUANT_LEAVES}
  for module in modules:
    shape, names = specs[module + ('kernel',)]
    stacked = sum(1 for n in names if n == axes_lib.LAYERS)
    leaves = {p[-1]: v for p, v in flat.items() if p[:-1] == module and p[-1] in layers.QUANT_LEAVES}
    fn = _per_layer(lambda l: layers.dequantize_kernel(cfg, l, shape[stacked:], dtype), stacked)
    out[module + ('kernel',)] = fn(leaves)
  return traverse_util.unflatten_dict(out)


def _adapted(flat: dict):
  """(module path, kernel, a, b, magnitude or None, stacked dims) of every adapted projection
  in flattened params; stacked is 1 under nn.scan (a leading [layers] dim), else 0."""
  for path, a in flat.items():
    if path[-1] != 'lora_a':
      continue
    module = path[:-1]
    if module + ('kernel',) not in flat:  # a quantized kernel (QLoRA: no DoRA; merge
      continue                            # dequantizes first)
    b, kernel = flat[module + ('lora_b',)], flat[module + ('kernel',)]
    stacked = a.ndim + b.ndim - 2 - kernel.ndim
    yield module, kernel, a, b, flat.get(module + ('lora_magnitude',)), stacked


def _kernel2d(kernel, a, b, stacked):
  """The kernel as [s..., in, out] float32 (its in/out split read off lora_a/lora_b)."""
  n_in = a.ndim - 1 - stacked
  return jnp.reshape(kernel, a.shape[:stacked] + (-1, math.prod(kernel.shape[stacked + n_in:]))
                     ).astype(jnp.float32)


def _delta(cfg: ModelConfig, a, b, stacked):
  """s * A B [s..., in, out] float32 for one projection's lora_a, lora_b."""
  lead, r = a.shape[:stacked], a.shape[-1]
  a2 = jnp.reshape(a, lead + (-1, r)).astype(jnp.float32)  # [s..., in, r]
  b2 = jnp.reshape(b, lead + (r, -1)).astype(jnp.float32)  # [s..., r, out]
  # The rank (so the scaling) is the leaf's own: model.lora_ranks may differ per target.
  return adapters_lib.scale(cfg.lora_alpha, r, cfg.use_rslora) * jnp.matmul(a2, b2)


def merge(params, cfg: ModelConfig) -> tuple[dict, ModelConfig]:
  """Folds every adapter into its kernel: (params without adapters, `without_lora(cfg)`).

  LoRA: kernel [s..., in..., out...] += s * (lora_a [s..., in..., r] @ lora_b [s..., r,
  out...]); DoRA: kernel = m / ||W + s A B||_c * (W + s A B) (PEFT's merge). In float32, cast
  back to the kernel's dtype; s... is the optional stacked [layers] dim of scanned params. The
  merged model computes what the adapted one did. PPO's value head (training only) is dropped.
  """
  if cfg.value_head:
    params = {k: v for k, v in params.items() if k != 'value_head'}
    cfg = dataclasses.replace(cfg, value_head=False)
  if not cfg.lora_rank:
    return params, cfg
  # QLoRA: the adapters fold into the dequantized kernels (what the quantized model computes).
  params = dequantize_base(params, cfg)
  flat = traverse_util.flatten_dict(params)
  out = {p: v for p, v in flat.items() if not is_adapter(p)}
  for module, kernel, a, b, magnitude, stacked in _adapted(flat):
    merged = _kernel2d(kernel, a, b, stacked) + _delta(cfg, a, b, stacked)  # [s..., in, out]
    if magnitude is not None:
      m = jnp.reshape(magnitude, merged.shape[:-2] + merged.shape[-1:]).astype(jnp.float32)
      merged = merged * (m / adapters_lib.column_norms(merged))[..., None, :]
    out[module + ('kernel',)] = merged.reshape(kernel.shape).astype(kernel.dtype)
  return traverse_util.unflatten_dict(out), without_lora(cfg)


def init_magnitudes(params: dict, cfg: ModelConfig | None, keep: dict | None = None) -> dict:
  """`params` with every DoRA `lora_magnitude` (but those `keep` holds) set to its kernel's
  column norms ||W + s A B||_c under the current adapters (cfg None: ||W||_c, their value when
  B = 0): DoRA's initialisation, for params whose kernels were replaced after init (a
  pretrained base over fresh adapters, where B = 0), so the adapted model starts as the base."""
  flat = traverse_util.flatten_dict(params)
  kept = traverse_util.flatten_dict(keep or {})
  out = dict(flat)
  for module, kernel, a, b, magnitude, stacked in _adapted(flat):
    if magnitude is None or module + ('lora_magnitude',) in kept:
      continue
    w = _kernel2d(kernel, a, b, stacked)
    if cfg is not None:
      w = w + _delta(cfg, a, b, stacked)
    norms = adapters_lib.column_norms(w)  # [s..., out]
    out[module + ('lora_magnitude',)] = norms.reshape(magnitude.shape).astype(magnitude.dtype)
  return traverse_util.unflatten_dict(out)


def disable(params: dict) -> dict:
  """`params` with every adapter's output off (lora_b zeroed, DoRA magnitudes = ||W||_c): the
  base model, computed by the same program on the same base buffers, so a LoRA policy's
  reference model (DPO) costs no second copy of the weights. Exact for LoRA: the adapter adds
  (x @ a) @ 0 = 0 to each projection; DoRA's factor m / ||W||_c is 1 up to rounding."""
  flat = traverse_util.flatten_dict(params)
  off = traverse_util.unflatten_dict(
      {p: jnp.zeros_like(v) if p[-1] == 'lora_b' else v for p, v in flat.items()})
  return init_magnitudes(off, None)


def with_base(params: dict, base: dict) -> dict:
  """`params` (adapters freshly initialised) with every base leaf taken from `base`.

  For fine-tuning from a pretrained checkpoint: base must hold exactly the non-adapter leaves
  of params, with the same shapes (checked by the caller's config comparison).
  """
  adapters, _ = split(params)
  return init_magnitudes(combine(adapters, base), None)  # DoRA: ||W||_c of the new base


def count(tree) -> tuple[int, int]:
  """(adapter parameters, base parameters) of a params-like pytree of arrays or structs."""
  adapters, base = split(tree)
  size = lambda t: sum(int(x.size) for x in jax.tree.leaves(t))
  return size(adapters), size(base)
