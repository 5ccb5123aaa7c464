"""Load a Hugging Face checkpoint directory into llmjax params, and write one back.

    cfg, params, tokenizer = load_hf('/ckpt/Qwen2.5-0.5B', mesh=mesh, rules=sharding.FSDP)
    save_hf('/out/hf', cfg, params, tokenizer_dir='/ckpt/Qwen2.5-0.5B', max_shard_bytes=2**30)

Loading checks everything it can from the headers first (config fields, tensor names, shapes,
truncated files), then creates each parameter already placed: with shardings, every device's
block is cut from the memory-mapped safetensors by `jax.make_array_from_callback`, so a host
reads only what its devices hold and never the whole model; stacked (scanned) layers read only
the layers of the block.
"""

import dataclasses
import json
import os
import re
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llmjax.errors import CheckpointError, ConfigError, closest
from llmjax.interop import families
from llmjax.interop.families import ARCHITECTURES, Family
from llmjax.interop.layout import Layout
from llmjax.interop.safetensors_io import Reader, write_sharded
from llmjax.data.tokenizer import SentencePieceTokenizer
from llmjax.interop.tokenizer import (TOKENIZER_FILES, load_tokenizer, special_ids,
                                      write_sentencepiece_hf_files)
from llmjax.models.config import RUNTIME_FIELDS, ModelConfig, check_architecture
from llmjax.models.transformer import init_params, logical_axes

# config.json's dtype (transformers 5 spelling) or torch_dtype (transformers 4) -> ours.
_TORCH_DTYPES = {'float32': 'float32', 'bfloat16': 'bfloat16', 'float16': 'float16'}


def read_hf_config(hf_dir: str) -> dict:
  path = os.path.join(hf_dir, 'config.json')
  if not os.path.isdir(hf_dir):
    raise CheckpointError(f"{hf_dir} is not a directory; pass a Hugging Face checkpoint dir.")
  if not os.path.exists(path):
    raise CheckpointError(f"{path} not found: {hf_dir} is not a Hugging Face checkpoint dir.")
  try:
    with open(path) as f:
      hf = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path} is not valid JSON ({e}).") from None
  if not isinstance(hf, dict):
    raise CheckpointError(f"{path} holds a JSON {type(hf).__name__}, not an object of config"
                          " fields; is it a transformers config.json?")
  return hf


def config_from_hf(hf: dict, path: str = 'config.json', **overrides) -> ModelConfig:
  """A transformers config.json (as a dict) -> ModelConfig; `overrides` replace fields.

  param_dtype defaults to the checkpoint's dtype (so a bf16 checkpoint stays bf16 in memory)
  and dtype (compute) to param_dtype.
  """
  family = families.family_of(hf, path)
  fields = family.to_model(hf, path)
  saved = _TORCH_DTYPES.get(hf.get('dtype') or hf.get('torch_dtype'), 'float32')
  fields['param_dtype'] = overrides.pop('param_dtype', None) or saved
  fields['dtype'] = overrides.pop('dtype', None) or fields['param_dtype']
  fields.update(overrides)
  return ModelConfig.from_dict(fields)


def check_matches(hf_dir: str, cfg: ModelConfig, key: str = 'init.hf_dir') -> Family:
  """Raises ConfigError unless `cfg` is the architecture of `hf_dir`'s config.json.

  Only the runtime fields (`RUNTIME_FIELDS`) may differ, and max_seq_len for RoPE models (it
  sizes no parameter there). Cheap: reads config.json only, so it runs before anything compiles.
  """
  hf = read_hf_config(hf_dir)
  path = os.path.join(hf_dir, 'config.json')
  family = families.family_of(hf, path)
  theirs = config_from_hf(hf, path, **{f: getattr(cfg, f) for f in RUNTIME_FIELDS})
  if family.head == 'score' and cfg.head != 'score':
    raise ConfigError(f"{key}: {path} is a reward model ({family.architecture}, a score head)"
                      f" but model.head='{cfg.head}'; set model.head='score', or start from the"
                      " language model (a *ForCausalLM checkpoint).")
  if new_score_head(family, cfg):  # a reward model on an LM's trunk: the head is new
    theirs = dataclasses.replace(theirs, head='score')
  check_architecture(theirs, cfg, key=key, source_name=path,
                     fix="Use the preset of that checkpoint or set those keys.")
  return family


def new_score_head(family: Family, cfg: ModelConfig) -> bool:
  """True when `cfg` is a score model read from an LM checkpoint of `family`: every param but
  the score head comes from the checkpoint (its lm_head is not read), and the head is
  initialised by the caller (`llmjax.train.state.build_state`)."""
  return cfg.head == 'score' and family.head == 'lm'


def _top_tensors(family: Family, cfg: ModelConfig) -> dict:
  """The family's top-level tensors for `cfg`, less a score head the checkpoint cannot hold."""
  top = dict(family.top_tensors(cfg))
  if new_score_head(family, cfg):
    top.pop(('score', 'kernel'), None)
  return top


def layer_slots(cfg: ModelConfig) -> list[tuple[tuple[str, ...], int | tuple[int, ...]]]:
  """Where each layer's params live: (params path prefix, layer) for unscanned layers, or
  (prefix, layers) for a scanned stack whose leaves are [len(layers), ...], entry r being layer
  layers[r]. Follows `Transformer.setup`: one scan per `cfg.layer_groups()` group ('layers',
  or 'layers_{g}' when there are several), a mixed period's blocks under 'block_{j}'."""
  if not cfg.scan_layers:
    return [((f'layer_{i}',), i) for i in range(cfg.num_layers)]
  groups = cfg.layer_groups()
  slots = []
  for g, (first, repeats, kinds) in enumerate(groups):
    name = 'layers' if len(groups) == 1 else f'layers_{g}'
    p = len(kinds)
    for j in range(p):
      prefix = (name,) if p == 1 else (name, f'block_{j}')
      slots.append((prefix, tuple(first + r * p + j for r in range(repeats))))
  return slots


def _first(layers: int | tuple[int, ...]) -> int:
  return layers if isinstance(layers, int) else layers[0]


def _expected(family: Family, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """HF tensor name -> shape for every tensor the model needs."""
  out = {l.hf_name: l.hf_shape for l in _top_tensors(family, cfg).values()}
  for i in range(cfg.num_layers):
    for layout in family.layer_tensors(cfg, i).values():
      out.update({name: layout.hf_shape for name in layout.names(i)})
  return out


def _listing(names: list[str], limit: int = 8) -> str:
  more = f" and {len(names) - limit} more" if len(names) > limit else ""
  return ', '.join(names[:limit]) + more


def check_tensors(reader: Reader, family: Family, cfg: ModelConfig) -> None:
  """Missing, unexpected and mis-shaped tensors, all reported before anything is read."""
  fused = sorted(n for n in reader.shapes if re.search(r'\.experts\.(gate_up_proj|down_proj)$', n))
  if fused:
    raise CheckpointError(f"{reader.hf_dir}: {fused[0]} holds all experts fused in one tensor"
                          " (the in-memory layout of transformers 5, as some exporters write it);"
                          " llmjax reads the per-expert tensors (experts.{e}.gate_proj.weight ...)"
                          " that save_pretrained writes: re-save the model with transformers.")
  expected = _expected(family, cfg)
  stored = {n: s for n, s in reader.shapes.items() if not families.is_ignored(family, n, cfg)}
  missing = sorted(set(expected) - set(stored))
  if missing:
    raise CheckpointError(f"{reader.hf_dir}: missing tensors {_listing(missing)} for a"
                          f" {family.architecture} with this config.json; is the download complete?")
  unexpected = sorted(set(stored) - set(expected))
  if unexpected:
    raise CheckpointError(f"{reader.hf_dir}: unexpected tensors {_listing(unexpected)}; the"
                          f" config.json does not describe these weights ({family.architecture}).")
  for name in sorted(expected):
    if tuple(stored[name]) != tuple(expected[name]):
      raise CheckpointError(f"{reader.hf_dir}: tensor {name} has shape {list(stored[name])} but"
                            f" config.json implies {list(expected[name])}; config and weights"
                            " disagree.")


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict, path, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _placed(reader: Reader, layout: Layout, shape, dtype, sharding,
            layers: int | tuple[int, ...] | None) -> jax.Array:
  """One parameter, read block by block straight into `sharding` (or one device). layers:
  None (a top-level tensor), a layer index, or the layers of a stacked leaf [len(layers), ...]."""
  cache = {}  # replicated blocks: read once per host, not once per device

  def block(index: tuple[slice, ...]) -> np.ndarray:
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    key = tuple(sl.indices(n) for sl, n in zip(index, shape))
    if key not in cache:
      if isinstance(layers, tuple):  # [layers, ...]: only the layers of this block
        rows = range(*index[0].indices(shape[0]))
        data = np.stack([layout.read_block(reader.read, layers[r], index[1:]) for r in rows])
      else:
        data = layout.read_block(reader.read, layers, index)
      cache[key] = np.asarray(data, dtype=dtype)
    return cache[key]

  if sharding is None:
    return jnp.asarray(block(()))
  return jax.make_array_from_callback(tuple(shape), sharding, block)


def _abstract_params(cfg: ModelConfig):
  return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def read_params(hf_dir: str, cfg: ModelConfig, family: Family, *, shardings=None):
  """The params pytree of `cfg` read from `hf_dir`'s safetensors.

  shardings: None (default device) or a pytree of `jax.sharding.Sharding`s like the params.
  A score model (cfg.head='score') from an LM checkpoint gets every param but
  params['score'] (`new_score_head`), which the caller initialises.
  """
  abstract = _abstract_params(cfg)
  if new_score_head(family, cfg):
    abstract = {k: v for k, v in abstract.items() if k != 'score'}
  entries = [(path, layout, None) for path, layout in _top_tensors(family, cfg).items()]
  for prefix, layers in layer_slots(cfg):
    entries += [(prefix + path, layout, layers)
                for path, layout in family.layer_tensors(cfg, _first(layers)).items()]
  _check_mapped(abstract, [path for path, _, _ in entries], family, hf_dir)
  reader = Reader(hf_dir, rename=family.rename)
  check_tensors(reader, family, cfg)
  params = {}
  for path, layout, layers in entries:
    spec = _get(abstract, path)
    sharding = _get(shardings, path) if shardings is not None else None
    _set(params, path, _placed(reader, layout, spec.shape, spec.dtype, sharding, layers))
  reader.close()
  return params


def _check_mapped(abstract, paths, family: Family, hf_dir: str) -> None:
  """CheckpointError unless the checkpoint's tensors give exactly the model's params."""
  model = {tuple(k.key for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  mapped = set(paths)
  unread = sorted('/'.join(p) for p in model - mapped)
  if any('lora' in p for p in unread):
    raise CheckpointError(f"{hf_dir}: a {family.architecture} checkpoint holds no LoRA adapters"
                          f" ({_listing(unread)}); load it without lora_rank/lora_targets and"
                          " add fresh adapters with llmjax.models.lora.with_base.")
  if unread or mapped - model:
    extra = sorted('/'.join(p) for p in mapped - model)
    raise CheckpointError(f"{hf_dir}: the model config does not match the {family.architecture}"
                          f" tensor map (params not in the checkpoint: {_listing(unread) or 'none'};"
                          f" tensors with no param: {_listing(extra) or 'none'}); pass the config"
                          " that config_from_hf gives for this checkpoint.")


def load_hf(hf_dir: str, *, mesh: jax.sharding.Mesh | None = None, rules=None, shardings=None,
            dtype: str | None = None, param_dtype: str | None = None, **overrides):
  """A Hugging Face checkpoint dir -> (ModelConfig, params, tokenizer or None).

  Args:
    hf_dir: holds config.json, model.safetensors (or shards + model.safetensors.index.json)
      and optionally the tokenizer files.
    mesh, rules: place each parameter by its logical axes (`logical_axes(cfg)`) mapped through
      the logical->mesh `rules` (e.g. `llmjax.sharding.FSDP`; None: replicated) onto `mesh`.
    shardings: instead of mesh/rules, a pytree of Shardings shaped like the params.
    dtype, param_dtype: compute and storage dtypes (default: the checkpoint's dtype).
    overrides: other ModelConfig fields (attention, remat, scan_layers, ...).
  """
  hf = read_hf_config(hf_dir)
  path = os.path.join(hf_dir, 'config.json')
  cfg = config_from_hf(hf, path, dtype=dtype, param_dtype=param_dtype, **overrides)
  family = families.family_of(hf, path)
  if shardings is None and mesh is not None:
    shardings = nn.logical_to_mesh_sharding(logical_axes(cfg), mesh, rules or ())
  tokenizer = load_tokenizer(hf_dir)
  params = read_params(hf_dir, cfg, family, shardings=shardings)
  return cfg, params, tokenizer


def config_to_hf(cfg: ModelConfig, architecture: str | None = None,
                 special: dict | None = None) -> dict:
  """ModelConfig -> config.json fields for `architecture` (default: from the model's features)."""
  family = _family(cfg, architecture)
  hf = family.to_hf(cfg)
  hf['torch_dtype'] = cfg.param_dtype
  for kind in ('bos', 'eos', 'pad'):
    hf[f'{kind}_token_id'] = (special or {}).get(kind)
  if family.head == 'score' and hf['pad_token_id'] is None:
    # *ForSequenceClassification reads the score at the last token that is not pad_token_id
    # and refuses batches without one; TRL's RewardTrainer pads with EOS when the tokenizer
    # has no pad token, and so does llmjax (`llmjax.train.reward.reward_positions`).
    eos = hf['eos_token_id']
    hf['pad_token_id'] = eos[0] if isinstance(eos, list) else eos
  return hf


def _family(cfg: ModelConfig, architecture: str | None) -> Family:
  if architecture is None:
    return families.family_for(cfg)
  if architecture not in ARCHITECTURES:
    raise ConfigError(f"architecture '{architecture}' is not supported.{closest(architecture, ARCHITECTURES)}"
                      f" Supported: {', '.join(ARCHITECTURES)}.")
  family = ARCHITECTURES[architecture]
  if family.head != cfg.head:
    want = families.family_for(cfg).architecture
    raise ConfigError(f"--architecture={architecture} has a {family.head!r} head but the model"
                      f" has model.head='{cfg.head}'; export it as {want}.")
  return family


def _hf_tensors(family: Family, cfg: ModelConfig, params):
  """(HF name, numpy array) pairs, one layer at a time (fused tensors assembled from parts,
  stacked experts split into one tensor each)."""
  def to_numpy(x):
    return np.asarray(jax.device_get(x))

  def group(layouts_and_leaves, layer):
    out = {}
    for layout, leaf in layouts_and_leaves:
      layout.write(to_numpy(leaf), layer, out)
    return out.items()

  yield from group([(l, _get(params, p)) for p, l in family.top_tensors(cfg).items()], None)
  where = {}  # layer -> (params prefix, its row in a stacked leaf or None)
  for prefix, layers in layer_slots(cfg):
    if isinstance(layers, int):
      where[layers] = (prefix, None)
    else:
      where.update({i: (prefix, r) for r, i in enumerate(layers)})
  for i in range(cfg.num_layers):
    prefix, row = where[i]
    leaves = [(l, _get(params, prefix + p)) for p, l in family.layer_tensors(cfg, i).items()]
    yield from group([(l, x if row is None else x[row]) for l, x in leaves], i)


def _special_of(tokenizer) -> dict:
  """{'bos', 'eos', 'pad': id or None, 'eos_ids': [ids]}: what the tokenizer's files declare,
  else, for a sentencepiece model (llmjax's own), its <s>/</s>/<pad> pieces, the ids the
  pipeline and sampler use."""
  special = dict(tokenizer._special)
  if isinstance(tokenizer, SentencePieceTokenizer):
    piece_ids = {'bos': tokenizer.sp.bos_id(), 'eos': tokenizer.sp.eos_id(),
                 'pad': tokenizer.sp.pad_id()}
    for kind, i in piece_ids.items():
      if special[kind] is None and i >= 0:
        special[kind] = i
    special['eos_ids'] = special['eos_ids'] or ([special['eos']] if special['eos'] is not None
                                                else [])
  return special


def save_hf(hf_dir: str, cfg: ModelConfig, params, *, tokenizer_dir: str | None = None,
            architecture: str | None = None, max_shard_bytes: int = 5 * 2**30) -> list[str]:
  """Writes a transformers checkpoint: config.json, generation_config.json, safetensors
  shards of at most `max_shard_bytes` (+ model.safetensors.index.json when more than one) and
  the tokenizer files found in `tokenizer_dir`. Returns the safetensors file names.

  Tensors keep the params' dtype (cfg.param_dtype); config.json's torch_dtype says which.
  """
  family = _family(cfg, architecture)
  abstract = _abstract_params(cfg)
  for path, spec in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    try:
      leaf = _get(params, [k.key for k in path])
    except (KeyError, TypeError):
      raise CheckpointError(f"params have no {jax.tree_util.keystr(path)}; they do not belong"
                            " to this model config.") from None
    if tuple(leaf.shape) != tuple(spec.shape):
      raise CheckpointError(f"param {jax.tree_util.keystr(path)} has shape {list(leaf.shape)}"
                            f" but the model config implies {list(spec.shape)}.")
  tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir else None
  if tokenizer is not None:
    special = _special_of(tokenizer)
  elif tokenizer_dir:  # ids from generation_config.json / config.json only
    special = special_ids(tokenizer_dir, lambda token: None)
  else:
    special = {}
  os.makedirs(hf_dir, exist_ok=True)
  hf = config_to_hf(cfg, family.architecture, special)
  with open(os.path.join(hf_dir, 'config.json'), 'w') as f:
    json.dump(hf, f, indent=2)
  files = write_sharded(hf_dir, _hf_tensors(family, cfg, params), max_shard_bytes)
  copied = set()
  if tokenizer_dir and os.path.abspath(tokenizer_dir) != os.path.abspath(hf_dir):
    for name in TOKENIZER_FILES:
      if os.path.exists(os.path.join(tokenizer_dir, name)):
        shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(hf_dir, name))
        copied.add(name)
  if 'tokenizer.model' in copied and not copied & {'tokenizer.json', 'tokenizer_config.json'}:
    # A bare sentencepiece model (an llmjax run's own): transformers would not know its class
    # or special tokens, so the files AutoTokenizer reads are written beside it.
    write_sentencepiece_hf_files(tokenizer, hf_dir, model_max_length=cfg.max_seq_len)
  if 'generation_config.json' not in copied:
    eos = special.get('eos_ids') or special.get('eos')
    eos = eos[0] if isinstance(eos, list) and len(eos) == 1 else eos
    gen = {'bos_token_id': special.get('bos'), 'eos_token_id': eos,
           'pad_token_id': special.get('pad'), '_from_model_config': True}
    with open(os.path.join(hf_dir, 'generation_config.json'), 'w') as f:
      json.dump(gen, f, indent=2)
  return files
