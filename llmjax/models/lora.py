"""LoRA adapters (Hu et al. 2021, https://arxiv.org/abs/2106.09685) on the params pytree.

With `model.lora_rank > 0` every projection named in `model.lora_targets` holds, beside its
frozen `kernel`, two adapter leaves `lora_a` [in..., rank] and `lora_b` [rank, out...] and
computes x @ kernel + (lora_alpha / lora_rank) * x @ lora_a @ lora_b (`layers.DenseGeneral`).
Training differentiates and updates only the adapters (`split` / `combine` in the train step,
Adam moments only for them); `merge` folds them into the kernels for export and serving.

Params are nested dicts; scanned layers add a leading [layers] dim to every leaf, adapters
included. The helpers work on any pytree shaped like the params (shardings, specs, ...).
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import traverse_util

from llmjax.models.config import ModelConfig

ADAPTER_LEAVES = ('lora_a', 'lora_b')


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
  """The base model's config: the architecture a merged or pretrained checkpoint has."""
  return dataclasses.replace(cfg, lora_rank=0)


def merge(params, cfg: ModelConfig) -> tuple[dict, ModelConfig]:
  """Folds every adapter into its kernel: (params without adapters, `without_lora(cfg)`).

  kernel [s..., in..., out...] += (alpha / rank) * (lora_a [s..., in..., r] @ lora_b
  [s..., r, out...]), in float32, cast back to the kernel's dtype; s is the optional stacked
  [layers] dim of scanned params. The merged model computes what the adapted one did.
  """
  if not cfg.lora_rank:
    return params, cfg
  scale = cfg.lora_alpha / cfg.lora_rank
  flat = traverse_util.flatten_dict(params)
  out = {p: v for p, v in flat.items() if not is_adapter(p)}
  for path, a in flat.items():
    if path[-1] != 'lora_a':
      continue
    b = flat[path[:-1] + ('lora_b',)]
    kernel = flat[path[:-1] + ('kernel',)]
    stacked = a.ndim + b.ndim - 2 - kernel.ndim  # 1 under nn.scan, else 0
    lead, r = a.shape[:stacked], a.shape[-1]
    a2 = jnp.reshape(a, lead + (-1, r)).astype(jnp.float32)  # [s..., in, r]
    b2 = jnp.reshape(b, lead + (r, -1)).astype(jnp.float32)  # [s..., r, out]
    delta = jnp.matmul(a2, b2).reshape(kernel.shape)  # [s..., in..., out...]
    out[path[:-1] + ('kernel',)] = (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)
  return traverse_util.unflatten_dict(out), without_lora(cfg)


def disable(params: dict) -> dict:
  """`params` with every adapter's output off (lora_b zeroed): the base model, computed by the
  same program on the same base buffers, so a LoRA policy's reference model (DPO) costs no
  second copy of the weights. Exact: the adapter adds (x @ a) @ 0 = 0 to each projection."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict(
      {p: jnp.zeros_like(v) if p[-1] == 'lora_b' else v for p, v in flat.items()})


def with_base(params: dict, base: dict) -> dict:
  """`params` (adapters freshly initialised) with every base leaf taken from `base`.

  For fine-tuning from a pretrained checkpoint: base must hold exactly the non-adapter leaves
  of params, with the same shapes (checked by the caller's config comparison).
  """
  adapters, _ = split(params)
  return combine(adapters, base)


def count(tree) -> tuple[int, int]:
  """(adapter parameters, base parameters) of a params-like pytree of arrays or structs."""
  adapters, base = split(tree)
  size = lambda t: sum(int(x.size) for x in jax.tree.leaves(t))
  return size(adapters), size(base)
