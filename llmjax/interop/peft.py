"""PEFT-format LoRA adapters: llmjax's `lora_a` / `lora_b` leaves <-> a `peft` adapter dir.

    save_peft('/out/adapter', cfg, params, base_model='meta-llama/Llama-3.2-1B')
    adapters = read_adapters('/out/adapter', cfg, family)   # numpy, shaped like the params'

A PEFT LoRA dir holds `adapter_config.json` and `adapter_model.safetensors`; for every adapted
`torch.nn.Linear` at HF path P (weight [out, in]) it stores

    base_model.model.P.lora_A.weight  [r, in]     llmjax lora_a [in..., r]
    base_model.model.P.lora_B.weight  [out, r]    llmjax lora_b [r, out...]

and computes W x + s * B A x with s = lora_alpha / r (use_rslora: lora_alpha / sqrt(r)): the
same scaling as llmjax's (`llmjax.models.adapters`), so the tensors carry over unchanged up to
layout. With use_dora it also stores

    base_model.model.P.lora_magnitude_vector  [out]     llmjax lora_magnitude [out...]

The names and layouts are derived from the family's kernel `Layout`s (`families.py`), never
listed twice. A rank_pattern keyed by module names ({'q_proj': 8}) is model.lora_ranks.
Refused by `check_adapter`, naming the field: alpha patterns, rank patterns keyed otherwise,
LoRA biases, modules_to_save and the other fields that change the math.
"""

import dataclasses
import json
import math
import os

import numpy as np

from llmjax import files
from llmjax.errors import CheckpointError, ConfigError
from llmjax.interop import families
from llmjax.interop.families import Family
from llmjax.interop.layout import Layout, linear, vector
from llmjax.models import adapters
from llmjax.models.config import ModelConfig

CONFIG_FILE = 'adapter_config.json'
WEIGHTS_FILE = 'adapter_model.safetensors'
PREFIX = 'base_model.model.'  # PeftModel -> LoraModel -> the transformers model
# The families whose projections are all plain nn.Linear (GPT-2's Conv1D and fused c_attn
# would need fan_in_fan_out and a split adapter).
SUPPORTED = ('LlamaForCausalLM', 'Qwen2ForCausalLM', 'MistralForCausalLM')
# adapter_config.json fields that change the math away from plain LoRA, with the one value
# (or values) llmjax implements; absent fields are PEFT's defaults, which are these.
# (use_dora, use_rslora and rank_pattern are read: `lora_fields`.)
PLAIN_LORA = {
    'bias': ('none', None),
    'fan_in_fan_out': (False, None), 'lora_bias': (False, None), 'modules_to_save': (None, []),
    'alpha_pattern': ({}, None), 'layers_to_transform': (None,),
    'target_parameters': (None, []), 'trainable_token_indices': (None,),
    'layer_replication': (None,), 'use_qalora': (False, None), 'use_bdlora': (None, False),
}

Path = tuple[str, ...]


def peft_family(cfg: ModelConfig) -> Family:
  """The family a LoRA model's adapters export as; ConfigError unless PEFT-supported."""
  family = families.family_for(cfg)
  if family.architecture not in SUPPORTED:
    raise ConfigError(f"PEFT adapters are supported for {', '.join(SUPPORTED)}; this model"
                      f" exports as {family.architecture}.")
  return family


def _module(layout: Layout) -> str:
  """'model.layers.{i}.self_attn.q_proj.weight' -> 'q_proj' (PEFT's target_modules name)."""
  return layout.hf_name[:-len('.weight')].rsplit('.', 1)[-1]


def _kernels(family: Family, cfg: ModelConfig) -> dict[str, tuple[Path, bool, Layout]]:
  """{llmjax target: (its module's params path, per layer?, the kernel's HF Layout)} for every
  target llmjax can adapt in this family, whatever cfg.lora_targets says."""
  out = {p[-2]: (p[:-1], True, l) for p, l in family.block_tensors(cfg).items()
         if p[-1] == 'kernel'}
  out.update({p[-2]: (p[:-1], False, l) for p, l in family.top_tensors(cfg).items()
              if p == ('head', 'kernel')})
  return out


def hf_modules(family: Family, cfg: ModelConfig) -> dict[str, str]:
  """{PEFT target_modules name ('q_proj', 'lm_head'): llmjax target ('q', 'head')}."""
  return {_module(l): t for t, (_, _, l) in _kernels(family, cfg).items()}


def _adapter_layouts(kernel: Layout, rank: int, dora: bool) -> dict[str, Layout]:
  """The kernel's adapters: lora_a [in..., r] <-> lora_A.weight [r, in]; lora_b [r, out...]
  <-> lora_B.weight [out, r] (`linear` kernels hold (out_dims, in_dims) in `split`); DoRA's
  lora_magnitude [out...] <-> lora_magnitude_vector [out] (PEFT saves it without '.weight')."""
  out_dims, in_dims = kernel.split
  base = PREFIX + kernel.hf_name[:-len('weight')]
  out = {'lora_a': linear(base + 'lora_A.weight', in_dims, (rank,)),
         'lora_b': linear(base + 'lora_B.weight', (rank,), out_dims)}
  if dora:
    out['lora_magnitude'] = vector(base + 'lora_magnitude_vector', out_dims)
  return out


def adapter_tensors(family: Family, cfg: ModelConfig) -> tuple[dict[Path, Layout], dict[Path, Layout]]:
  """(per-layer, top-level) {llmjax params path: PEFT Layout} of cfg's adapters; per-layer
  paths are inside a block ('attn', 'q', 'lora_a'), names carry '{i}'."""
  out = ({}, {})
  for target, (path, per_layer, kernel) in _kernels(family, cfg).items():
    if target in cfg.lora_targets:
      rank = adapters.rank_of(cfg, target)
      for leaf, layout in _adapter_layouts(kernel, rank, cfg.use_dora).items():
        out[0 if per_layer else 1][path + (leaf,)] = layout
  return out


def _expected(family: Family, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  block, top = adapter_tensors(family, cfg)
  out = {l.hf_name: l.hf_shape for l in top.values()}
  for layout in block.values():
    out.update({layout.name(i): layout.hf_shape for i in range(cfg.num_layers)})
  return out


def check_rank(family: Family, cfg: ModelConfig, where: str) -> None:
  """A rank above a projection's smaller side adds parameters and no expressiveness; PEFT
  itself would build it, but it is a mistake (usually a rank meant for a bigger model)."""
  for target, (_, _, kernel) in _kernels(family, cfg).items():
    rank = adapters.rank_of(cfg, target)
    if target in cfg.lora_targets and rank > min(kernel.hf_shape):
      raise ConfigError(f"{where}: rank {rank} is larger than the {_module(kernel)}"
                        f" projection {list(kernel.hf_shape)}; use a rank <= {min(kernel.hf_shape)}.")


# ------------------------------------------------------------------------------ reading


def read_config(peft_dir: str, key: str = 'init.peft_dir') -> dict:
  if not files.isdir(peft_dir):
    raise ConfigError(f"{key}='{peft_dir}' is not a directory; pass a PEFT adapter dir (the"
                      " one PeftModel.save_pretrained writes).")
  path = files.join(peft_dir, CONFIG_FILE)
  if not files.exists(path):
    raise ConfigError(f"{key}='{peft_dir}' has no {CONFIG_FILE}; it is not a PEFT adapter dir.")
  try:
    fields = json.loads(files.read_text(path))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ConfigError(f"{path} is not valid JSON ({e}).") from None
  if not isinstance(fields, dict):
    raise ConfigError(f"{path} holds a JSON {type(fields).__name__}, not PEFT config fields.")
  return fields


def lora_fields(peft_dir: str, cfg: ModelConfig, key: str = 'init.peft_dir') -> dict:
  """The model.lora_* / use_* keys that reproduce the adapter in `peft_dir` on `cfg`'s base:
  {lora_rank, lora_alpha, lora_targets, lora_ranks, use_dora, use_rslora}, from its
  adapter_config.json (r, lora_alpha, target_modules, rank_pattern, use_dora, use_rslora);
  one-line ConfigError for fields llmjax cannot reproduce."""
  fields = read_config(peft_dir, key)
  path = files.join(peft_dir, CONFIG_FILE)
  if fields.get('peft_type') != 'LORA':
    raise ConfigError(f"{path}: peft_type={fields.get('peft_type')!r}; llmjax reads LoRA"
                      " adapters only (peft_type 'LORA').")
  for field, allowed in PLAIN_LORA.items():
    if fields.get(field, allowed[0]) not in allowed:
      raise ConfigError(f"{path}: {field}={fields[field]!r} is not supported; llmjax reads"
                        f" {field}={allowed[0]!r}.")
  for field in ('use_dora', 'use_rslora'):
    if fields.get(field) not in (True, False, None):
      raise ConfigError(f"{path}: {field}={fields[field]!r} is not a boolean.")
  family = peft_family(cfg)
  modules = hf_modules(family, cfg)
  targets = fields.get('target_modules')
  if isinstance(targets, str) or not targets:
    raise ConfigError(f"{path}: target_modules={targets!r}; llmjax reads a list of module names"
                      f" among {sorted(modules)}.")
  unknown = sorted(set(targets) - set(modules))
  if unknown:
    raise ConfigError(f"{path}: target_modules {unknown} are not {family.architecture}"
                      f" projections llmjax adapts; it adapts {sorted(modules)}.")
  pattern = fields.get('rank_pattern') or {}
  # PEFT matches a rank_pattern key as a regex suffix of each module's full name; a bare
  # target name ('q_proj') is that module in every layer, which model.lora_ranks expresses.
  odd = sorted(k for k in pattern if k not in targets)
  if odd:
    raise ConfigError(f"{path}: rank_pattern keys {odd} are not names in target_modules;"
                      " llmjax reads per-module ranks keyed by module name ({'q_proj': 8}).")
  return dict(lora_rank=fields.get('r'), lora_alpha=fields.get('lora_alpha'),
              lora_targets=tuple(sorted(modules[m] for m in targets)),
              lora_ranks={modules[m]: r for m, r in pattern.items()},
              use_dora=bool(fields.get('use_dora')), use_rslora=bool(fields.get('use_rslora')))


def check_adapter(peft_dir: str, cfg: ModelConfig, key: str = 'init.peft_dir') -> Family:
  """One-line ConfigError / CheckpointError unless `peft_dir` is a LoRA adapter for `cfg`
  (the base's architecture with the model's LoRA keys equal to the adapter's, `lora_fields`).
  Reads adapter_config.json and the safetensors header only: no tensor data."""
  want = lora_fields(peft_dir, cfg, key)
  path = files.join(peft_dir, CONFIG_FILE)
  family = peft_family(cfg)
  # Compared as the model holds them (a rank equal to lora_rank in lora_ranks is the same).
  norm_ranks = lambda ranks, rank: {t: r for t, r in ranks.items() if r != rank}
  have = dict(lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
              lora_targets=tuple(sorted(cfg.lora_targets)),
              lora_ranks=norm_ranks(cfg.lora_ranks, cfg.lora_rank),
              use_dora=cfg.use_dora, use_rslora=cfg.use_rslora)
  want['lora_ranks'] = norm_ranks(want['lora_ranks'], want['lora_rank'])
  wrong = {k: v for k, v in want.items() if have[k] != v}
  # Defaults need not be named in the fix.
  want = {k: v for k, v in want.items()
          if k in ('lora_rank', 'lora_alpha', 'lora_targets') or v or k in wrong}
  if wrong:
    fix = ', '.join(f'model.{k}={list(v) if k == "lora_targets" else v}' for k, v in want.items())
    raise ConfigError(f"{key}: the adapter has {fix} but the model has"
                      f" {', '.join(f'model.{k}={have[k]}' for k in wrong)}; set {fix}.")
  check_rank(family, cfg, path)
  shapes = _stored_shapes(peft_dir, key)
  expected = _expected(family, cfg)
  missing, extra = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
  if missing or extra:
    raise CheckpointError(f"{peft_dir}/{WEIGHTS_FILE}: missing {missing[:4] or 'none'},"
                          f" unexpected {extra[:4] or 'none'} ({len(missing)}/{len(extra)}"
                          f" tensors) for a {cfg.num_layers}-layer {family.architecture}; is"
                          " this adapter for this base model?")
  for name in sorted(expected):
    if tuple(shapes[name]) != tuple(expected[name]):
      raise CheckpointError(f"{peft_dir}/{WEIGHTS_FILE}: {name} has shape {list(shapes[name])}"
                            f" but the base model implies {list(expected[name])}; the adapter"
                            " was trained on another base model.")
  return family


def _stored_shapes(peft_dir: str, key: str) -> dict[str, tuple[int, ...]]:
  from safetensors import safe_open
  path = os.path.join(peft_dir, WEIGHTS_FILE)
  if not os.path.exists(path):
    other = ' (adapter_model.bin, a pickle: re-save it with safe_serialization=True)' if (
        os.path.exists(os.path.join(peft_dir, 'adapter_model.bin'))) else ''
    raise CheckpointError(f"{key}='{peft_dir}' has no {WEIGHTS_FILE}{other}.")
  try:
    with safe_open(path, framework='numpy') as f:
      return {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}
  except Exception as e:  # a truncated or foreign file: safetensors' own exception types vary
    raise CheckpointError(f"{path} could not be read ({str(e).splitlines()[0][:200]}).") from None


def read_adapters(peft_dir: str, cfg: ModelConfig, family: Family) -> dict:
  """The adapter leaves of `cfg`'s params (nested dicts of float32 numpy arrays, scanned
  layers stacked under 'layers') read from `peft_dir`; call `check_adapter` first."""
  from safetensors.numpy import load_file
  tensors = load_file(os.path.join(peft_dir, WEIGHTS_FILE))  # a few MB at most: read whole

  def leaf(layout: Layout, layer):
    full = tuple(slice(None) for _ in layout.shape)
    return layout.read_block(lambda name, index: tensors[name][index], layer, full).astype(
        np.float32)

  block, top = adapter_tensors(family, cfg)
  out = {}
  for path, layout in top.items():
    _set(out, path, leaf(layout, None))
  for path, layout in block.items():
    if cfg.scan_layers:
      _set(out, ('layers',) + path, np.stack([leaf(layout, i) for i in range(cfg.num_layers)]))
    else:
      for i in range(cfg.num_layers):
        _set(out, (f'layer_{i}',) + path, leaf(layout, i))
  return out


def _set(tree: dict, path, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


# ------------------------------------------------------------------------------ writing


def adapter_config(cfg: ModelConfig, family: Family, base_model: str | None) -> dict:
  """adapter_config.json as PEFT 0.21 writes it (the field set of
  tests/golden/peft/*/adapter_config.json, saved by PeftModel.save_pretrained)."""
  modules = {t: m for m, t in hf_modules(family, cfg).items()}
  alpha = cfg.lora_alpha
  return {
      'alora_invocation_tokens': None, 'alpha_pattern': {}, 'arrow_config': None,
      'auto_mapping': None, 'base_model_name_or_path': base_model or None, 'bias': 'none',
      'corda_config': None, 'ensure_weight_tying': False, 'eva_config': None,
      'exclude_modules': None, 'fan_in_fan_out': False, 'inference_mode': True,
      'init_lora_weights': True, 'kasa_config': None, 'layer_replication': None,
      'layers_pattern': None, 'layers_to_transform': None, 'loftq_config': {},
      'lora_alpha': int(alpha) if float(alpha).is_integer() else alpha, 'lora_bias': False,
      'lora_dropout': float(cfg.lora_dropout), 'lora_ga_config': None, 'megatron_config': None,
      'megatron_core': 'megatron.core', 'modules_to_save': None, 'monteclora_config': None,
      'peft_type': 'LORA',
      'peft_version': '0.21.2',  # the PEFT release whose format this is
      'qalora_group_size': 16, 'r': cfg.lora_rank,
      'rank_pattern': {modules[t]: r for t, r in sorted(cfg.lora_ranks.items())},
      'revision': None,
      'target_modules': sorted(modules[t] for t in cfg.lora_targets),
      'target_parameters': None, 'task_type': 'CAUSAL_LM', 'trainable_token_indices': None,
      'use_bdlora': None, 'use_dora': bool(cfg.use_dora), 'use_qalora': False,
      'use_rslora': bool(cfg.use_rslora),
      'velora_config': None}


def peft_tensors(cfg: ModelConfig, params, family: Family) -> dict[str, np.ndarray]:
  """{PEFT name: float32 array} of every adapter in `params` (a LoRA model's)."""
  import jax
  to_numpy = lambda x: np.asarray(jax.device_get(x), np.float32)
  block, top = adapter_tensors(family, cfg)
  out = {l.hf_name: l.to_hf(to_numpy(_get(params, p)), None) for p, l in top.items()}
  for path, layout in block.items():
    for i in range(cfg.num_layers):
      leaf = (_get(params, ('layers',) + path)[i] if cfg.scan_layers
              else _get(params, (f'layer_{i}',) + path))
      out[layout.name(i)] = layout.to_hf(to_numpy(leaf), None)
  return out


def _write(peft_dir: str, tensors: dict[str, np.ndarray], fields: dict) -> int:
  """`peft_dir`/adapter_model.safetensors (tensors, as PEFT saves them) + adapter_config.json
  (fields); returns the number of values written."""
  from safetensors.numpy import save_file
  tensors = {n: np.ascontiguousarray(t) for n, t in tensors.items()}
  os.makedirs(peft_dir, exist_ok=True)
  save_file(tensors, os.path.join(peft_dir, WEIGHTS_FILE), metadata={'format': 'pt'})
  with open(os.path.join(peft_dir, CONFIG_FILE), 'w') as f:
    json.dump(fields, f, indent=2, sort_keys=True)
  return sum(math.prod(t.shape) for t in tensors.values())


def save_peft(peft_dir: str, cfg: ModelConfig, params, *, base_model: str | None = None) -> int:
  """Writes `peft_dir`/adapter_config.json + adapter_model.safetensors for a LoRA model's
  params (`cfg.lora_rank > 0`); returns the number of adapter parameters written."""
  if not cfg.lora_rank:
    raise ConfigError("this model has no LoRA adapters (model.lora_rank=0); export it with"
                      " --to=hf instead.")
  family = peft_family(cfg)
  check_rank(family, cfg, 'model.lora_rank')
  return _write(peft_dir, peft_tensors(cfg, params, family),
                adapter_config(cfg, family, base_model))


# ------------------------------------------------------------------------------ base + adapter


def with_adapter_settings(peft_dir: str, cfg: ModelConfig, key: str = '--peft') -> ModelConfig:
  """`cfg` (the base's) with the LoRA settings of `peft_dir`'s adapter_config.json
  (`lora_fields`: rank, alpha, targets, per-module ranks, DoRA, rsLoRA), checked against the base
  like `check_adapter`: what `generate --peft` and `convert --from=hf --peft` adapt the base
  with, where `init.peft_dir` asks the experiment to set them."""
  fields = lora_fields(peft_dir, cfg, key)
  rank, alpha = fields['lora_rank'], fields['lora_alpha']
  if not isinstance(rank, int) or rank <= 0 or not isinstance(alpha, (int, float)):
    raise ConfigError(f"{files.join(peft_dir, CONFIG_FILE)}: r={rank!r}, lora_alpha={alpha!r};"
                      " a LoRA adapter has a positive integer r and a numeric lora_alpha.")
  adapted = ModelConfig.from_dict({**dataclasses.asdict(cfg), **fields,
                                   'lora_alpha': float(alpha)})
  check_adapter(peft_dir, adapted, key)
  return adapted


def load_hf_with_adapter(hf_dir: str, peft_dir: str, key: str = '--peft', *,
                         dtype: str | None = None):
  """(cfg with the adapter's settings, base params + the adapter's leaves, tokenizer) of an HF
  base dir and a PEFT adapter dir over it (LoRA / DoRA, prompt tuning or prefix tuning, by its
  peft_type), on the default device; `dtype` stores and computes the base in that dtype
  (default: the checkpoint's), the adapter staying float32. The adapter is checked against the
  base's config.json before any weight is read."""
  from llmjax.interop import hf
  from llmjax.models import lora
  kw = {'dtype': dtype, 'param_dtype': dtype} if dtype else {}
  base_cfg = hf.config_from_hf(hf.read_hf_config(hf_dir), os.path.join(hf_dir, 'config.json'),
                               **kw)
  peft_type = read_config(peft_dir, key).get('peft_type')
  if peft_type in PROMPT_LEARNING:
    fields_of, read = PROMPT_LEARNING[peft_type]
    cfg = dataclasses.replace(base_cfg, **fields_of(peft_dir, base_cfg, key))
  else:  # LoRA, or a one-line error naming the peft_type
    cfg = with_adapter_settings(peft_dir, base_cfg, key)
    read = lambda d, c: read_adapters(d, c, peft_family(c))
  _, params, tokenizer = hf.load_hf(hf_dir, **kw)
  return cfg, lora.combine(read(peft_dir, cfg), params), tokenizer


# ------------------------------------------------------------------------------ prompt tuning
# PEFT's PROMPT_TUNING adapter: adapter_config.json (peft_type 'PROMPT_TUNING',
# num_virtual_tokens, token_dim, ...) and one tensor `prompt_embeddings` [V, embed], which is
# llmjax's `prompt_embedding` leaf (model.virtual_tokens='prompt') unchanged. PEFT places it
# before the input embeddings, so the tokens sit at positions V.. (as llmjax's do).

PROMPT_TENSOR = 'prompt_embeddings'


def prompt_tuning_config(cfg: ModelConfig, base_model: str | None) -> dict:
  """adapter_config.json as PEFT 0.21 writes it for PromptTuningConfig (the field set of
  tests/golden/peft/llama_gqa_llama3_prompt/adapter_config.json)."""
  return {
      'auto_mapping': None, 'base_model_name_or_path': base_model or None,
      'inference_mode': True, 'modules_to_save': None, 'num_attention_heads': cfg.num_heads,
      'num_layers': cfg.num_layers, 'num_transformer_submodules': 1,
      'num_virtual_tokens': cfg.num_virtual_tokens, 'peft_type': 'PROMPT_TUNING',
      'peft_version': '0.21.2',  # the PEFT release whose format this is
      # The trained values are what the file holds; how they began is not needed to load them.
      'prompt_tuning_init': 'RANDOM', 'prompt_tuning_init_text': None, 'revision': None,
      'task_type': 'CAUSAL_LM', 'token_dim': cfg.embed_dim, 'tokenizer_kwargs': None,
      'tokenizer_name_or_path': None}


def save_prompt_tuning(peft_dir: str, cfg: ModelConfig, params, *,
                       base_model: str | None = None) -> int:
  """Writes `peft_dir`/adapter_config.json + adapter_model.safetensors for a prompt-tuning
  model's params (`cfg.virtual_tokens == 'prompt'`); returns the number of parameters written."""
  import jax
  if cfg.virtual_tokens != 'prompt':
    raise ConfigError(f"this model is not prompt-tuned (model.virtual_tokens="
                      f"'{cfg.virtual_tokens}'); PEFT export covers LoRA and prompt tuning.")
  prompt = np.asarray(jax.device_get(params['prompt_embedding']), np.float32)
  return _write(peft_dir, {PROMPT_TENSOR: prompt}, prompt_tuning_config(cfg, base_model))


def is_prompt_tuning(peft_dir: str, key: str = '--peft') -> bool:
  """True when `peft_dir`'s adapter_config.json says peft_type 'PROMPT_TUNING'."""
  return read_config(peft_dir, key).get('peft_type') == 'PROMPT_TUNING'


def prompt_tuning_fields(peft_dir: str, cfg: ModelConfig, key: str = '--peft') -> dict:
  """{virtual_tokens: 'prompt', num_virtual_tokens} of a PEFT prompt-tuning dir, checked
  against the base `cfg` (token_dim, the tensor's shape) before any weight is read; one-line
  errors naming the field otherwise."""
  fields = read_config(peft_dir, key)
  path = files.join(peft_dir, CONFIG_FILE)
  want = {'peft_type': 'PROMPT_TUNING', 'task_type': 'CAUSAL_LM',
          'num_transformer_submodules': 1, 'token_dim': cfg.embed_dim}
  for name, value in want.items():
    if fields.get(name, value) != value:
      raise ConfigError(f"{path}: {name}={fields.get(name)!r} but this base needs {value!r}"
                        " (a causal-LM prompt-tuning adapter for a model of this width).")
  n = fields.get('num_virtual_tokens')
  if not isinstance(n, int) or n <= 0:
    raise ConfigError(f"{path}: num_virtual_tokens={n!r} must be a positive integer.")
  shapes = _stored_shapes(peft_dir, key)
  if shapes.get(PROMPT_TENSOR) != (n, cfg.embed_dim):
    raise CheckpointError(f"{files.join(peft_dir, WEIGHTS_FILE)}: '{PROMPT_TENSOR}' has shape"
                          f" {shapes.get(PROMPT_TENSOR)} but [{n}, {cfg.embed_dim}]"
                          " (num_virtual_tokens, token_dim) is expected.")
  return dict(virtual_tokens='prompt', num_virtual_tokens=n)


def read_prompt_tuning(peft_dir: str, cfg: ModelConfig) -> dict:
  """{'prompt_embedding': float32 [V, embed]} of a PEFT prompt-tuning dir, for a `cfg` with
  `prompt_tuning_fields(peft_dir, ...)` set (params: `lora.combine(this, base params)`)."""
  from safetensors.numpy import load_file
  tensor = load_file(os.path.join(peft_dir, WEIGHTS_FILE))[PROMPT_TENSOR]
  if tensor.shape != (cfg.num_virtual_tokens, cfg.embed_dim):
    raise CheckpointError(f"{peft_dir}: '{PROMPT_TENSOR}' has shape {tensor.shape}, not"
                          f" [{cfg.num_virtual_tokens}, {cfg.embed_dim}].")
  return {'prompt_embedding': tensor.astype(np.float32)}


# ------------------------------------------------------------------------------ prefix tuning
# PEFT's PREFIX_TUNING adapter without the projection MLP (prefix_projection false): one
# tensor `prompt_embeddings` [V, layers x 2 x kv_heads x head_dim] which PEFT's get_prompt
# views as [V, 2 x layers, kv_heads, head_dim] and splits into layer i's keys (entry 2i) and
# values (2i + 1), handed to the model as past_key_values (already rotated: stored keys). That
# is llmjax's `prefix_k` / `prefix_v` [V, kv_heads, head_dim] per layer (model.virtual_tokens
# 'prefix'); GQA models store kv_heads heads (PEFT sets num_attention_heads to them).


def prefix_tuning_fields(peft_dir: str, cfg: ModelConfig, key: str = '--peft') -> dict:
  """{virtual_tokens: 'prefix', num_virtual_tokens} of a PEFT prefix-tuning dir, checked
  against the base `cfg` before any weight is read."""
  fields = read_config(peft_dir, key)
  path = files.join(peft_dir, CONFIG_FILE)
  want = {'peft_type': 'PREFIX_TUNING', 'task_type': 'CAUSAL_LM', 'prefix_projection': False,
          'num_transformer_submodules': 1, 'num_layers': cfg.num_layers,
          'num_attention_heads': cfg.num_kv_heads,
          'token_dim': cfg.num_kv_heads * cfg.head_dim}
  for name, value in want.items():
    if fields.get(name, value) != value:
      raise ConfigError(f"{path}: {name}={fields.get(name)!r} but this base needs {value!r}"
                        " (a causal-LM prefix-tuning adapter without projection, for a model"
                        " of this shape).")
  n = fields.get('num_virtual_tokens')
  if not isinstance(n, int) or n <= 0:
    raise ConfigError(f"{path}: num_virtual_tokens={n!r} must be a positive integer.")
  width = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim
  shapes = _stored_shapes(peft_dir, key)
  if shapes.get(PROMPT_TENSOR) != (n, width):
    raise CheckpointError(f"{files.join(peft_dir, WEIGHTS_FILE)}: '{PROMPT_TENSOR}' has shape"
                          f" {shapes.get(PROMPT_TENSOR)} but [{n}, {width}] is expected.")
  return dict(virtual_tokens='prefix', num_virtual_tokens=n)


def read_prefix_tuning(peft_dir: str, cfg: ModelConfig) -> dict:
  """The `prefix_k` / `prefix_v` leaves (float32, nested like the params: stacked [layers, V,
  kv_heads, head_dim] under `layers` with scan_layers, else per `layer_i`) of a PEFT
  prefix-tuning dir, for a `cfg` with `prefix_tuning_fields` set."""
  from safetensors.numpy import load_file
  tensor = load_file(os.path.join(peft_dir, WEIGHTS_FILE))[PROMPT_TENSOR].astype(np.float32)
  n, layers = cfg.num_virtual_tokens, cfg.num_layers
  kv = tensor.reshape(n, 2 * layers, cfg.num_kv_heads, cfg.head_dim).transpose(1, 0, 2, 3)
  k, v = kv[0::2], kv[1::2]  # [layers, V, kv_heads, head_dim]
  if cfg.scan_layers:
    return {'layers': {'attn': {'prefix_k': k, 'prefix_v': v}}}
  return {f'layer_{i}': {'attn': {'prefix_k': k[i], 'prefix_v': v[i]}} for i in range(layers)}


def prefix_tuning_config(cfg: ModelConfig, base_model: str | None) -> dict:
  """adapter_config.json as PEFT 0.21 writes it for PrefixTuningConfig(prefix_projection=
  False) (the field set of tests/golden/peft/llama_gqa_llama3_prefix/adapter_config.json)."""
  width = cfg.num_kv_heads * cfg.head_dim
  return {
      'auto_mapping': None, 'base_model_name_or_path': base_model or None,
      'encoder_hidden_size': width, 'inference_mode': True, 'init_weights': None,
      'modules_to_save': None, 'num_attention_heads': cfg.num_kv_heads,
      'num_layers': cfg.num_layers, 'num_transformer_submodules': 1,
      'num_virtual_tokens': cfg.num_virtual_tokens, 'peft_type': 'PREFIX_TUNING',
      'peft_version': '0.21.2', 'prefix_projection': False, 'revision': None,
      'task_type': 'CAUSAL_LM', 'token_dim': width}


def save_prefix_tuning(peft_dir: str, cfg: ModelConfig, params, *,
                       base_model: str | None = None) -> int:
  """Writes a PEFT prefix-tuning dir for a prefix-tuning model's params (the inverse of
  `read_prefix_tuning`); returns the number of parameters written."""
  import jax
  if cfg.virtual_tokens != 'prefix':
    raise ConfigError(f"this model is not prefix-tuned (model.virtual_tokens="
                      f"'{cfg.virtual_tokens}').")
  to_numpy = lambda x: np.asarray(jax.device_get(x), np.float32)
  if cfg.scan_layers:
    attn = params['layers']['attn']
    k, v = to_numpy(attn['prefix_k']), to_numpy(attn['prefix_v'])  # [layers, V, kv, hd]
  else:
    layer = lambda i, name: to_numpy(params[f'layer_{i}']['attn'][name])
    k = np.stack([layer(i, 'prefix_k') for i in range(cfg.num_layers)])
    v = np.stack([layer(i, 'prefix_v') for i in range(cfg.num_layers)])
  kv = np.stack([k, v], axis=1).reshape((2 * cfg.num_layers,) + k.shape[1:])  # k0 v0 k1 v1 ..
  tensor = kv.transpose(1, 0, 2, 3).reshape(cfg.num_virtual_tokens, -1)
  return _write(peft_dir, {PROMPT_TENSOR: tensor}, prefix_tuning_config(cfg, base_model))


# The prompt-learning peft_types llmjax reads: (settings over the base's cfg, the leaves).
PROMPT_LEARNING = {
    'PROMPT_TUNING': (prompt_tuning_fields, read_prompt_tuning),
    'PREFIX_TUNING': (prefix_tuning_fields, read_prefix_tuning),
}
