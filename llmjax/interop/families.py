"""The Hugging Face model families llmjax maps onto: config.json fields and tensor names.

Each `Family` says how its `config.json` becomes a `ModelConfig` (rejecting what llmjax cannot
represent, naming the field), how a `ModelConfig` becomes its `config.json`, and where every
llmjax parameter lives among its safetensors tensors (`Layout`s). `ARCHITECTURES` is the
registry by the `architectures[0]` name of config.json.
"""

import dataclasses
import re
from typing import Callable

from llmjax.errors import ConfigError
from llmjax.interop.layout import Layout, conv1d, experts, linear, table, vector
from llmjax.models.config import ModelConfig

Path = tuple[str, ...]  # keys into the params pytree


@dataclasses.dataclass(frozen=True)
class Family:
  architecture: str
  model_type: str
  to_model: Callable[[dict, str], dict]  # (config.json, its path) -> ModelConfig fields
  to_hf: Callable[[ModelConfig], dict]  # -> config.json fields (without token ids)
  top_tensors: Callable[[ModelConfig], dict[Path, Layout]]
  block_tensors: Callable[[ModelConfig], dict[Path, Layout]]  # per layer, '{i}' in names
  ignored: str = r'$^'  # stored tensors that are not parameters (buffers), a regex
  rename: Callable[[str], str] = lambda name: name  # stored name -> canonical name
  head: str = 'lm'  # ModelConfig.head of the class: 'score' for *ForSequenceClassification
  # MoE families: an MoE layer's tensors ('{i}' the layer, '{e}' the expert), beside the dense
  # layers' `block_tensors`; None: the family has no MoE layers.
  sparse_tensors: Callable[[ModelConfig], dict[Path, Layout]] | None = None

  def layer_tensors(self, cfg: ModelConfig, layer: int) -> dict[Path, Layout]:
    """Layer `layer`'s tensors: the MoE layout where cfg.moe_layers says it is sparse
    (decoder_sparse_step, mlp_only_layers), else the dense one."""
    if cfg.moe_layers[layer]:
      if self.sparse_tensors is None:
        raise ConfigError(f"{self.architecture} has no MoE layers but model.num_experts="
                          f"{cfg.num_experts}; export it as one of {', '.join(MOE_ARCHITECTURES)}.")
      return self.sparse_tensors(cfg)
    return self.block_tensors(cfg)


# ----------------------------------------------------------------------------- config.json


def _require(hf: dict, key: str, path: str):
  if hf.get(key) is None:
    raise ConfigError(f"{path}: required field '{key}' is missing; is this a complete"
                      " transformers config.json?")
  return hf[key]


def _number(value, key: str, path: str, kind=float):
  """`kind(value)`, or a ConfigError naming the field (configs edited by hand carry strings)."""
  try:
    if isinstance(value, bool) or (kind is int and float(value) != int(value)):
      raise ValueError
    return kind(value)
  except (TypeError, ValueError):
    raise ConfigError(f"{path}: {key}={value!r} is not a number; fix the config.json.") from None


def _size(hf: dict, key: str, path: str, default=None) -> int:
  """A required (or defaulted) positive integer field."""
  value = _require(hf, key, path) if default is None else (hf.get(key) or default)
  value = _number(value, key, path, int)
  if value <= 0:
    raise ConfigError(f"{path}: {key}={value} must be positive; fix the config.json.")
  return value


def _only(hf: dict, path: str, arch: str, allowed: dict[str, tuple]) -> None:
  """Fields whose other values change the math in ways llmjax does not implement."""
  for key, values in allowed.items():
    if key in hf and hf[key] is not None and hf[key] not in values:
      raise ConfigError(f"{path}: {key}={hf[key]!r} is not supported for {arch}; llmjax"
                        f" implements {key} in {list(values)}.")
  if hf.get('quantization_config'):
    raise ConfigError(f"{path}: quantization_config is set; llmjax loads float checkpoints"
                      " only: dequantize the checkpoint first.")


# rope_type (or the older key 'type') -> ModelConfig.rope_scaling, and the keys each type may
# carry. Others (yarn, longrope, ...) scale attention too; they are rejected, not approximated.
ROPE_TYPES = {'default': '', 'linear': 'linear', 'dynamic': 'dynamic', 'llama3': 'llama3'}
ROPE_KEYS = {
    'default': set(),
    'linear': {'factor'},
    'dynamic': {'factor', 'original_max_position_embeddings'},
    'llama3': {'factor', 'low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings'},
}


def _rope(hf: dict, path: str) -> dict:
  """rope_theta + rope_scaling (transformers 4) or rope_parameters (transformers 5) -> fields."""
  key = 'rope_parameters' if hf.get('rope_parameters') else 'rope_scaling'
  params = dict(hf.get(key) or {})
  theta = params.pop('rope_theta', hf.get('rope_theta', 10_000.0))
  # 'type' is the pre-4.45 spelling of 'rope_type'; some configs carry both.
  kinds = [params.pop('rope_type', None), params.pop('type', None)]
  kind = next((k for k in kinds if k), 'default')
  if kind not in ROPE_TYPES:
    raise ConfigError(f"{path}: {key}.rope_type='{kind}' is not supported; llmjax implements"
                      f" {list(ROPE_TYPES)}.")
  extra = sorted(k for k, v in params.items() if k not in ROPE_KEYS[kind]
                 and not (k == 'partial_rotary_factor' and v == 1.0))
  if extra:
    raise ConfigError(f"{path}: {key} fields {extra} are not supported for rope_type='{kind}';"
                      f" llmjax reads only {sorted(ROPE_KEYS[kind]) or 'rope_theta'}.")
  where = f'{path}: {key}'
  fields = dict(rope_theta=_number(theta, 'rope_theta', path), rope_scaling=ROPE_TYPES[kind])
  if kind != 'default':
    fields['rope_scaling_factor'] = _number(_require(params, 'factor', where), f'{key}.factor', path)
  if kind == 'llama3':
    fields.update(
        rope_low_freq_factor=_number(params.get('low_freq_factor', 1.0), f'{key}.low_freq_factor', path),
        rope_high_freq_factor=_number(params.get('high_freq_factor', 4.0), f'{key}.high_freq_factor', path),
        rope_original_max_len=_number(_require(params, 'original_max_position_embeddings', where),
                                      f'{key}.original_max_position_embeddings', path, int))
  if kind == 'dynamic':
    # transformers (5.x `_compute_dynamic_ntk_parameters`) grows the base past
    # max_position_embeddings, not past rope_scaling's original_max_position_embeddings.
    fields['rope_original_max_len'] = _number(_require(hf, 'max_position_embeddings', path),
                                              'max_position_embeddings', path, int)
  return fields


def _rope_to_hf(cfg: ModelConfig) -> dict:
  """transformers-4 spelling, which transformers 5 still reads."""
  scaling = None
  if cfg.rope_scaling:
    scaling = {'rope_type': cfg.rope_scaling, 'factor': cfg.rope_scaling_factor}
  if cfg.rope_scaling == 'llama3':
    scaling.update(low_freq_factor=cfg.rope_low_freq_factor,
                   high_freq_factor=cfg.rope_high_freq_factor,
                   original_max_position_embeddings=cfg.rope_original_max_len)
  return {'rope_theta': cfg.rope_theta, 'rope_scaling': scaling}


def _llama_like(hf: dict, path: str, arch: str) -> dict:
  _only(hf, path, arch, {'hidden_act': ('silu',), 'partial_rotary_factor': (1.0,)})
  embed = _size(hf, 'hidden_size', path)
  heads = _size(hf, 'num_attention_heads', path)
  return dict(
      vocab_size=_size(hf, 'vocab_size', path),
      num_layers=_size(hf, 'num_hidden_layers', path), embed_dim=embed, num_heads=heads,
      num_kv_heads=_size(hf, 'num_key_value_heads', path, heads),
      head_dim=_size(hf, 'head_dim', path, max(embed // heads, 1)),
      mlp_dim=_size(hf, 'intermediate_size', path),
      max_seq_len=_size(hf, 'max_position_embeddings', path),
      norm='rmsnorm', norm_eps=_number(hf.get('rms_norm_eps', 1e-6), 'rms_norm_eps', path),
      mlp='swiglu',
      position='rope', tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
      **_rope(hf, path))


def _dense_only(cfg: ModelConfig, arch: str) -> None:
  """The dense families hold neither experts nor Qwen3's q/k norms."""
  if cfg.num_experts:
    raise ConfigError(f"{arch} has no experts but model.num_experts={cfg.num_experts}; export"
                      f" it as one of {', '.join(MOE_ARCHITECTURES)}.")
  if cfg.qk_norm:
    raise ConfigError(f"{arch} has no q/k norms but model.qk_norm=True; a dense Qwen3"
                      " (Qwen3ForCausalLM) export is not supported, Qwen3MoeForCausalLM is.")


def _llama_like_to_hf(cfg: ModelConfig, arch: str, model_type: str) -> dict:
  if (cfg.norm, cfg.mlp, cfg.position) != ('rmsnorm', 'swiglu', 'rope'):
    raise ConfigError(f"{arch} needs norm='rmsnorm', mlp='swiglu', position='rope'; this model"
                      f" has {cfg.norm!r}, {cfg.mlp!r}, {cfg.position!r}: export it as GPT-2.")
  return {
      'architectures': [arch], 'model_type': model_type, 'vocab_size': cfg.vocab_size,
      'hidden_size': cfg.embed_dim, 'intermediate_size': cfg.mlp_dim,
      'num_hidden_layers': cfg.num_layers, 'num_attention_heads': cfg.num_heads,
      'num_key_value_heads': cfg.num_kv_heads, 'head_dim': cfg.head_dim, 'hidden_act': 'silu',
      # transformers' dynamic scaling starts growing the base past max_position_embeddings.
      'max_position_embeddings': (cfg.rope_original_max_len if cfg.rope_scaling == 'dynamic'
                                  else cfg.max_seq_len),
      'rms_norm_eps': cfg.norm_eps,
      'tie_word_embeddings': cfg.tie_embeddings, 'attention_dropout': 0.0, 'use_cache': True,
      **_rope_to_hf(cfg)}


def _llama_from_hf(hf, path):
  fields = _llama_like(hf, path, 'LlamaForCausalLM')
  # attention_bias puts a bias on q, k, v and o alike.
  bias = bool(hf.get('attention_bias', False))
  return dict(fields, qkv_bias=bias, out_bias=bias, mlp_bias=bool(hf.get('mlp_bias', False)))


def _llama_to_hf(cfg):
  _dense_only(cfg, 'LlamaForCausalLM')
  if cfg.sliding_window:
    raise ConfigError("LlamaForCausalLM has no sliding window; export this model as Mistral.")
  if cfg.qkv_bias != cfg.out_bias:
    raise ConfigError(f"LlamaForCausalLM's attention_bias covers q/k/v and o together; this model"
                      f" has qkv_bias={cfg.qkv_bias}, out_bias={cfg.out_bias} (Qwen2 has qkv only).")
  return dict(_llama_like_to_hf(cfg, 'LlamaForCausalLM', 'llama'), attention_bias=cfg.qkv_bias,
              mlp_bias=cfg.mlp_bias, pretraining_tp=1)


def _qwen2_window(hf: dict, path: str, moe: bool = False) -> int:
  """Qwen2 slides the window only in layers >= max_window_layers, and only with
  use_sliding_window (transformers' Qwen2Config.layer_types; Qwen2MoeConfig's default is every
  other layer below max_window_layers); llmjax has one window for all."""
  if not hf.get('use_sliding_window') or not hf.get('sliding_window'):
    return 0
  layers = _size(hf, 'num_hidden_layers', path)
  window_layers = hf.get('max_window_layers', 28 if moe else layers)
  slides = ((lambda i: (i + 1) % 2 == 1 and i < window_layers) if moe
            else (lambda i: i >= window_layers))
  types = hf.get('layer_types') or [
      'sliding_attention' if slides(i) else 'full_attention' for i in range(layers)]
  if all(t == 'full_attention' for t in types):
    return 0
  if all(t == 'sliding_attention' for t in types):
    return _size(hf, 'sliding_window', path)
  n = sum(t == 'sliding_attention' for t in types)
  fix = "layer_types to all 'sliding_attention'" if moe else 'max_window_layers=0'
  raise ConfigError(
      f"{path}: use_sliding_window=true with max_window_layers={hf.get('max_window_layers')}"
      f" (layer_types) slides {n} of {layers} layers; llmjax applies one sliding_window to all"
      f" layers: set {fix} (all slide) or use_sliding_window=false (none).")


def _qwen2_from_hf(hf, path):
  fields = _llama_like(hf, path, 'Qwen2ForCausalLM')
  return dict(fields, qkv_bias=True, sliding_window=_qwen2_window(hf, path))


def _qwen2_to_hf(cfg):
  _dense_only(cfg, 'Qwen2ForCausalLM')
  if not cfg.qkv_bias or cfg.out_bias or cfg.mlp_bias:
    raise ConfigError("Qwen2ForCausalLM has biases on q/k/v only; this model has"
                      f" qkv_bias={cfg.qkv_bias}, out_bias={cfg.out_bias}, mlp_bias={cfg.mlp_bias}.")
  if cfg.head_dim * cfg.num_heads != cfg.embed_dim:
    raise ConfigError(f"Qwen2ForCausalLM needs head_dim * num_heads == embed_dim"
                      f" ({cfg.head_dim} * {cfg.num_heads} != {cfg.embed_dim}).")
  window = {'use_sliding_window': bool(cfg.sliding_window), 'max_window_layers': 0,
            'sliding_window': cfg.sliding_window or None}
  return dict(_llama_like_to_hf(cfg, 'Qwen2ForCausalLM', 'qwen2'), **window)


def _mistral_from_hf(hf, path, arch='MistralForCausalLM'):
  fields = _llama_like(hf, path, arch)
  window = hf.get('sliding_window') or 0
  return dict(fields, sliding_window=_number(window, 'sliding_window', path, int) if window else 0)


def _mistral_to_hf(cfg):
  _dense_only(cfg, 'MistralForCausalLM')
  if cfg.qkv_bias or cfg.out_bias or cfg.mlp_bias:
    raise ConfigError("MistralForCausalLM has no biases; export a model with qkv_bias as Qwen2.")
  return dict(_llama_like_to_hf(cfg, 'MistralForCausalLM', 'mistral'),
              sliding_window=cfg.sliding_window or None)


def _gpt2_from_hf(hf, path):
  _only(hf, path, 'GPT2LMHeadModel', {
      # 'gelu_new' and 'gelu_pytorch_tanh' are both the tanh approximation llmjax uses.
      'activation_function': ('gelu_new', 'gelu_pytorch_tanh'),
      'scale_attn_weights': (True,), 'scale_attn_by_inverse_layer_idx': (False,),
      'add_cross_attention': (False,)})
  embed = _size(hf, 'n_embd', path)
  heads = _size(hf, 'n_head', path)
  return dict(
      vocab_size=_size(hf, 'vocab_size', path), num_layers=_size(hf, 'n_layer', path),
      embed_dim=embed, num_heads=heads, num_kv_heads=heads, head_dim=max(embed // heads, 1),
      mlp_dim=_size(hf, 'n_inner', path, 4 * embed), max_seq_len=_size(hf, 'n_positions', path),
      norm='layernorm', mlp='gelu',
      norm_eps=_number(hf.get('layer_norm_epsilon', 1e-5), 'layer_norm_epsilon', path),
      position='learned', qkv_bias=True, out_bias=True, mlp_bias=True,
      tie_embeddings=bool(hf.get('tie_word_embeddings', True)))


def _gpt2_to_hf(cfg):
  _dense_only(cfg, 'GPT2LMHeadModel')
  want = dict(norm='layernorm', mlp='gelu', position='learned', qkv_bias=True, out_bias=True,
              mlp_bias=True, sliding_window=0, num_kv_heads=cfg.num_heads,
              head_dim=cfg.embed_dim // cfg.num_heads)
  wrong = {k: getattr(cfg, k) for k, v in want.items() if getattr(cfg, k) != v}
  if wrong:
    raise ConfigError(f"GPT2LMHeadModel cannot hold a model with {wrong}; it needs {want}.")
  return {
      'architectures': ['GPT2LMHeadModel'], 'model_type': 'gpt2', 'vocab_size': cfg.vocab_size,
      'n_embd': cfg.embed_dim, 'n_layer': cfg.num_layers, 'n_head': cfg.num_heads,
      'n_inner': cfg.mlp_dim, 'n_positions': cfg.max_seq_len, 'n_ctx': cfg.max_seq_len,
      'activation_function': 'gelu_new', 'layer_norm_epsilon': cfg.norm_eps,
      'tie_word_embeddings': cfg.tie_embeddings, 'scale_attn_weights': True,
      'resid_pdrop': 0.0, 'embd_pdrop': 0.0, 'attn_pdrop': 0.0, 'use_cache': True}


# ----------------------------------------------------------------------------- MoE config.json


def _experts_from_hf(hf: dict, path: str, arch: str, experts_key: str, expert_width: str) -> dict:
  """The MoE fields every family shares. transformers adds the load-balancing loss to the
  training loss only with output_router_logits=true, so without it the coefficient is 0."""
  if hf.get(experts_key) is None and hf.get('num_local_experts') is not None:
    experts_key = 'num_local_experts'  # transformers 5 writes Qwen3-MoE's under this name
  e = _size(hf, experts_key, path)
  k = _size(hf, 'num_experts_per_tok', path)
  if k > e:
    raise ConfigError(f"{path}: num_experts_per_tok={k} is larger than {experts_key}={e};"
                      " fix the config.json.")
  # Noise on the router logits in training only (Mixtral's router_jitter_noise): not
  # implemented, so a checkpoint that trains with it is refused rather than trained without.
  _only(hf, path, arch, {'router_jitter_noise': (0, 0.0)})
  coef = _number(hf.get('router_aux_loss_coef', 0.001), 'router_aux_loss_coef', path)
  return dict(num_experts=e, num_experts_per_tok=k, moe_mlp_dim=_size(hf, expert_width, path),
              router_aux_loss_coef=coef if hf.get('output_router_logits') else 0.0)


def _experts_to_hf(cfg: ModelConfig, experts_key: str) -> dict:
  return {experts_key: cfg.num_experts, 'num_experts_per_tok': cfg.num_experts_per_tok,
          'output_router_logits': cfg.router_aux_loss_coef > 0,
          'router_aux_loss_coef': cfg.router_aux_loss_coef or 0.001}


def _sparse_layers_from_hf(hf: dict, path: str) -> dict:
  """Qwen2-MoE / Qwen3-MoE: which layers are sparse, and the top-k renormalisation."""
  only = hf.get('mlp_only_layers') or []
  if not isinstance(only, list):
    raise ConfigError(f"{path}: mlp_only_layers={only!r} must be a list of layer indices.")
  return dict(decoder_sparse_step=_size(hf, 'decoder_sparse_step', path, 1),
              mlp_only_layers=tuple(_number(i, 'mlp_only_layers', path, int) for i in only),
              norm_topk_prob=bool(hf.get('norm_topk_prob', False)))


def _sparse_layers_to_hf(cfg: ModelConfig) -> dict:
  return {'decoder_sparse_step': cfg.decoder_sparse_step,
          'mlp_only_layers': list(cfg.mlp_only_layers), 'norm_topk_prob': cfg.norm_topk_prob,
          'moe_intermediate_size': cfg.moe_mlp_dim}


def _moe_export_checks(cfg: ModelConfig, arch: str, want: dict) -> None:
  if not cfg.num_experts:
    raise ConfigError(f"{arch} is a mixture of experts but model.num_experts=0; export this"
                      " dense model as Llama, Mistral or Qwen2.")
  wrong = {k: getattr(cfg, k) for k, v in want.items() if getattr(cfg, k) != v}
  if wrong:
    raise ConfigError(f"{arch} cannot hold a model with {wrong}; it needs {want}.")


def _mixtral_from_hf(hf, path):
  fields = _mistral_from_hf(hf, path, 'MixtralForCausalLM')
  # Every layer is sparse and each expert is as wide as intermediate_size; the gates are a
  # softmax over the top-k logits, which is the renormalised top-k of the full softmax.
  return dict(fields, norm_topk_prob=True,
              **_experts_from_hf(hf, path, 'MixtralForCausalLM', 'num_local_experts',
                                 'intermediate_size'))


def _mixtral_to_hf(cfg):
  arch = 'MixtralForCausalLM'
  _moe_export_checks(cfg, arch, dict(
      qkv_bias=False, out_bias=False, mlp_bias=False, qk_norm=False, shared_expert_mlp_dim=0,
      norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=()))
  out = _llama_like_to_hf(cfg, arch, 'mixtral')
  return dict(out, intermediate_size=cfg.moe_mlp_dim, sliding_window=cfg.sliding_window or None,
              router_jitter_noise=0.0, **_experts_to_hf(cfg, 'num_local_experts'))


def _qwen2_moe_from_hf(hf, path):
  arch = 'Qwen2MoeForCausalLM'
  fields = _llama_like(hf, path, arch)
  shared = _size(hf, 'shared_expert_intermediate_size', path)
  # transformers 5 spells the q/k/v bias `qkv_bias` (default true); 4.x always has it.
  return dict(fields, qkv_bias=bool(hf.get('qkv_bias', True)),
              sliding_window=_qwen2_window(hf, path, moe=True), shared_expert_mlp_dim=shared,
              **_experts_from_hf(hf, path, arch, 'num_experts', 'moe_intermediate_size'),
              **_sparse_layers_from_hf(hf, path))


def _qwen2_moe_to_hf(cfg):
  arch = 'Qwen2MoeForCausalLM'
  _moe_export_checks(cfg, arch, dict(out_bias=False, mlp_bias=False, qk_norm=False))
  if not cfg.shared_expert_mlp_dim:
    raise ConfigError(f"{arch} always has a shared expert but model.shared_expert_mlp_dim=0;"
                      " set model.qk_norm=True for Qwen3MoeForCausalLM or model.qkv_bias=False"
                      " for Mixtral.")
  if cfg.head_dim * cfg.num_heads != cfg.embed_dim:
    raise ConfigError(f"{arch} needs head_dim * num_heads == embed_dim"
                      f" ({cfg.head_dim} * {cfg.num_heads} != {cfg.embed_dim}).")
  kind = 'sliding_attention' if cfg.sliding_window else 'full_attention'
  window = {'use_sliding_window': bool(cfg.sliding_window), 'max_window_layers': cfg.num_layers,
            'sliding_window': cfg.sliding_window or None, 'layer_types': [kind] * cfg.num_layers}
  return dict(_llama_like_to_hf(cfg, arch, 'qwen2_moe'), qkv_bias=cfg.qkv_bias,
              shared_expert_intermediate_size=cfg.shared_expert_mlp_dim, **window,
              **_experts_to_hf(cfg, 'num_experts'), **_sparse_layers_to_hf(cfg))


def _qwen3_moe_from_hf(hf, path):
  arch = 'Qwen3MoeForCausalLM'
  fields = _llama_like(hf, path, arch)
  bias = bool(hf.get('attention_bias', False))  # on q, k, v and o alike
  # transformers' Qwen3-MoE slides every layer's window when use_sliding_window is set.
  window = hf.get('sliding_window') if hf.get('use_sliding_window') else 0
  return dict(fields, qkv_bias=bias, out_bias=bias, qk_norm=True,
              sliding_window=_number(window, 'sliding_window', path, int) if window else 0,
              **_experts_from_hf(hf, path, arch, 'num_experts', 'moe_intermediate_size'),
              **_sparse_layers_from_hf(hf, path))


def _qwen3_moe_to_hf(cfg):
  arch = 'Qwen3MoeForCausalLM'
  _moe_export_checks(cfg, arch, dict(qk_norm=True, shared_expert_mlp_dim=0, mlp_bias=False,
                                     out_bias=cfg.qkv_bias))
  window = {'use_sliding_window': bool(cfg.sliding_window),
            'sliding_window': cfg.sliding_window or None}
  return dict(_llama_like_to_hf(cfg, arch, 'qwen3_moe'), attention_bias=cfg.qkv_bias,
              **window, **_experts_to_hf(cfg, 'num_experts'), **_sparse_layers_to_hf(cfg))


# ----------------------------------------------------------------------------- tensors


def _llama_top(cfg: ModelConfig) -> dict[Path, Layout]:
  v, d = cfg.vocab_size, cfg.embed_dim
  out = {('embed', 'embedding'): table('model.embed_tokens.weight', v, d),
         ('final_norm', 'scale'): vector('model.norm.weight', (d,))}
  if cfg.head == 'score':  # *ForSequenceClassification: score = Linear(hidden, 1, bias=False)
    out[('score', 'kernel')] = table('score.weight', 1, d, transpose=True)
  elif not cfg.tie_embeddings:
    out[('head', 'kernel')] = table('lm_head.weight', v, d, transpose=True)
  return out


def _llama_attention(cfg: ModelConfig) -> dict[Path, Layout]:
  """A llama-like layer's attention and its two norms (the part dense and MoE layers share)."""
  d, h, k, hd = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  p = 'model.layers.{i}.'
  out = {
      ('attn_norm', 'scale'): vector(p + 'input_layernorm.weight', (d,)),
      ('attn', 'q', 'kernel'): linear(p + 'self_attn.q_proj.weight', (d,), (h, hd)),
      ('attn', 'k', 'kernel'): linear(p + 'self_attn.k_proj.weight', (d,), (k, hd)),
      ('attn', 'v', 'kernel'): linear(p + 'self_attn.v_proj.weight', (d,), (k, hd)),
      ('attn', 'o', 'kernel'): linear(p + 'self_attn.o_proj.weight', (h, hd), (d,)),
      ('mlp_norm', 'scale'): vector(p + 'post_attention_layernorm.weight', (d,)),
  }
  if cfg.qkv_bias:
    out[('attn', 'q', 'bias')] = vector(p + 'self_attn.q_proj.bias', (h, hd))
    out[('attn', 'k', 'bias')] = vector(p + 'self_attn.k_proj.bias', (k, hd))
    out[('attn', 'v', 'bias')] = vector(p + 'self_attn.v_proj.bias', (k, hd))
  if cfg.out_bias:
    out[('attn', 'o', 'bias')] = vector(p + 'self_attn.o_proj.bias', (d,))
  if cfg.qk_norm:  # Qwen3: RMSNorm scales [head_dim], shared by all heads
    out[('attn', 'q_norm', 'scale')] = vector(p + 'self_attn.q_norm.weight', (hd,))
    out[('attn', 'k_norm', 'scale')] = vector(p + 'self_attn.k_norm.weight', (hd,))
  return out


def _swiglu(prefix: Path, hf: str, d: int, f: int, bias: bool = False,
            names=('gate_proj', 'up_proj', 'down_proj')) -> dict[Path, Layout]:
  """A SwiGLU's three projections under params path `prefix`, HF module `hf` (its `names`)."""
  gate, up, down = (f'{hf}.{n}' for n in names)
  out = {prefix + ('gate', 'kernel'): linear(gate + '.weight', (d,), (f,)),
         prefix + ('up', 'kernel'): linear(up + '.weight', (d,), (f,)),
         prefix + ('down', 'kernel'): linear(down + '.weight', (f,), (d,))}
  if bias:
    out[prefix + ('gate', 'bias')] = vector(gate + '.bias', (f,))
    out[prefix + ('up', 'bias')] = vector(up + '.bias', (f,))
    out[prefix + ('down', 'bias')] = vector(down + '.bias', (d,))
  return out


def _llama_block(cfg: ModelConfig) -> dict[Path, Layout]:
  """A dense llama-like layer (also Qwen2-MoE's / Qwen3-MoE's dense layers)."""
  return {**_llama_attention(cfg),
          **_swiglu(('mlp',), 'model.layers.{i}.mlp', cfg.embed_dim, cfg.mlp_dim, cfg.mlp_bias)}


def _moe_block(module: str, expert_names: tuple[str, str, str]) -> Callable:
  """An MoE layer's tensors: attention as `_llama_attention`; the router `{module}.gate`
  [experts, embed]; each expert e's SwiGLU at `{module}.experts.{e}.<expert_names>` (gate, up,
  down), stacked into moe/{gate,up,down}/kernel [experts, ...]; and with
  model.shared_expert_mlp_dim (Qwen2-MoE) `{module}.shared_expert.*` and
  `{module}.shared_expert_gate` [1, embed]."""
  def tensors(cfg: ModelConfig) -> dict[Path, Layout]:
    d, e, f, fs = cfg.embed_dim, cfg.num_experts, cfg.moe_mlp_dim, cfg.shared_expert_mlp_dim
    m = 'model.layers.{i}.' + module
    out = _llama_attention(cfg)
    out[('moe', 'router', 'kernel')] = linear(m + '.gate.weight', (d,), (e,))
    for path, layout in _swiglu(('moe',), m + '.experts.{e}', d, f, names=expert_names).items():
      out[path] = experts(layout, e)
    if fs:
      out.update(_swiglu(('moe', 'shared_expert'), m + '.shared_expert', d, fs))
      out[('moe', 'shared_gate', 'kernel')] = linear(m + '.shared_expert_gate.weight', (d,), (1,))
    return out
  return tensors


def _gpt2_top(cfg: ModelConfig) -> dict[Path, Layout]:
  v, d = cfg.vocab_size, cfg.embed_dim
  out = {('embed', 'embedding'): table('transformer.wte.weight', v, d),
         ('pos_embedding',): table('transformer.wpe.weight', cfg.max_seq_len, d),
         ('final_norm', 'scale'): vector('transformer.ln_f.weight', (d,)),
         ('final_norm', 'bias'): vector('transformer.ln_f.bias', (d,))}
  if not cfg.tie_embeddings and cfg.head == 'lm':
    out[('head', 'kernel')] = table('lm_head.weight', v, d, transpose=True)
  return out


def _gpt2_block(cfg: ModelConfig) -> dict[Path, Layout]:
  d, h, hd, f = cfg.embed_dim, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
  p = 'transformer.h.{i}.'
  out = {
      ('attn_norm', 'scale'): vector(p + 'ln_1.weight', (d,)),
      ('attn_norm', 'bias'): vector(p + 'ln_1.bias', (d,)),
      ('attn', 'o', 'kernel'): conv1d(p + 'attn.c_proj.weight', (h, hd), (d,)),
      ('attn', 'o', 'bias'): vector(p + 'attn.c_proj.bias', (d,)),
      ('mlp_norm', 'scale'): vector(p + 'ln_2.weight', (d,)),
      ('mlp_norm', 'bias'): vector(p + 'ln_2.bias', (d,)),
      ('mlp', 'up', 'kernel'): conv1d(p + 'mlp.c_fc.weight', (d,), (f,)),
      ('mlp', 'up', 'bias'): vector(p + 'mlp.c_fc.bias', (f,)),
      ('mlp', 'down', 'kernel'): conv1d(p + 'mlp.c_proj.weight', (f,), (d,)),
      ('mlp', 'down', 'bias'): vector(p + 'mlp.c_proj.bias', (d,)),
  }
  # c_attn is q, k and v side by side along its output axis: [embed, 3 * embed].
  for n, name in enumerate('qkv'):
    fused = (n * d, (n + 1) * d, 3 * d)
    out[('attn', name, 'kernel')] = conv1d(p + 'attn.c_attn.weight', (d,), (h, hd), fused)
    out[('attn', name, 'bias')] = vector(p + 'attn.c_attn.bias', (h, hd), fused)
  return out


def _gpt2_rename(name: str) -> str:
  # The original OpenAI checkpoints (openai-community/gpt2) store the transformer's tensors
  # without the 'transformer.' prefix that GPT2LMHeadModel.save_pretrained writes.
  return name if name.startswith(('transformer.', 'lm_head.')) else 'transformer.' + name


def _num_labels(hf: dict) -> int:
  """num_labels as transformers' PretrainedConfig derives it: len(id2label), else the
  num_labels field, else its default 2."""
  if hf.get('id2label'):
    return len(hf['id2label'])
  return int(hf.get('num_labels') or 2)


def _score_from_hf(lm_from_hf: Callable, arch: str) -> Callable[[dict, str], dict]:
  """config.json of `arch` (a *ForSequenceClassification) -> fields: the LM family's plus
  head='score'; only num_labels=1 (one reward per sequence) is a reward model."""
  def to_model(hf, path):
    n = _num_labels(hf)
    if n != 1:
      raise ConfigError(f"{path}: {arch} with num_labels={n} is a classifier; llmjax loads"
                        " reward models only (num_labels=1, one score per sequence).")
    return dict(lm_from_hf(hf, path), head='score')
  return to_model


def _score_to_hf(lm_to_hf: Callable, arch: str) -> Callable[[ModelConfig], dict]:
  def to_hf(cfg):
    out = dict(lm_to_hf(cfg), architectures=[arch])
    # What PretrainedConfig writes for num_labels=1 (it keeps no num_labels field).
    out.update(id2label={'0': 'LABEL_0'}, label2id={'LABEL_0': 0})
    return out
  return to_hf


ARCHITECTURES: dict[str, Family] = {
    'LlamaForCausalLM': Family('LlamaForCausalLM', 'llama', _llama_from_hf, _llama_to_hf,
                               _llama_top, _llama_block, ignored=r'\.rotary_emb\.inv_freq$'),
    'Qwen2ForCausalLM': Family('Qwen2ForCausalLM', 'qwen2', _qwen2_from_hf, _qwen2_to_hf,
                               _llama_top, _llama_block, ignored=r'\.rotary_emb\.inv_freq$'),
    'MistralForCausalLM': Family('MistralForCausalLM', 'mistral', _mistral_from_hf,
                                 _mistral_to_hf, _llama_top, _llama_block,
                                 ignored=r'\.rotary_emb\.inv_freq$'),
    # attn.bias / attn.masked_bias are the causal-mask buffers older GPT-2 files carry.
    'GPT2LMHeadModel': Family('GPT2LMHeadModel', 'gpt2', _gpt2_from_hf, _gpt2_to_hf, _gpt2_top,
                              _gpt2_block, ignored=r'\.attn\.(masked_)?bias$',
                              rename=_gpt2_rename),
}
# Mixtures of experts: their dense layers (Qwen's decoder_sparse_step, mlp_only_layers) are
# `_llama_block`s, their sparse ones `sparse_tensors`.
MOE_ARCHITECTURES: dict[str, Family] = {
    'MixtralForCausalLM': Family(
        'MixtralForCausalLM', 'mixtral', _mixtral_from_hf, _mixtral_to_hf, _llama_top,
        _llama_block, ignored=r'\.rotary_emb\.inv_freq$',
        sparse_tensors=_moe_block('block_sparse_moe', ('w1', 'w3', 'w2'))),
    'Qwen2MoeForCausalLM': Family(
        'Qwen2MoeForCausalLM', 'qwen2_moe', _qwen2_moe_from_hf, _qwen2_moe_to_hf, _llama_top,
        _llama_block, ignored=r'\.rotary_emb\.inv_freq$',
        sparse_tensors=_moe_block('mlp', ('gate_proj', 'up_proj', 'down_proj'))),
    'Qwen3MoeForCausalLM': Family(
        'Qwen3MoeForCausalLM', 'qwen3_moe', _qwen3_moe_from_hf, _qwen3_moe_to_hf, _llama_top,
        _llama_block, ignored=r'\.rotary_emb\.inv_freq$',
        sparse_tensors=_moe_block('mlp', ('gate_proj', 'up_proj', 'down_proj'))),
}
ARCHITECTURES.update(MOE_ARCHITECTURES)
# Reward models: the same trunk tensors, `score.weight` [1, hidden] instead of lm_head.weight.
for _lm, _score in (('LlamaForCausalLM', 'LlamaForSequenceClassification'),
                    ('Qwen2ForCausalLM', 'Qwen2ForSequenceClassification'),
                    ('MistralForCausalLM', 'MistralForSequenceClassification')):
  ARCHITECTURES[_score] = dataclasses.replace(
      ARCHITECTURES[_lm], architecture=_score, head='score',
      to_model=_score_from_hf(ARCHITECTURES[_lm].to_model, _score),
      to_hf=_score_to_hf(ARCHITECTURES[_lm].to_hf, _score))
# The LM class of each reward-model class and back (for errors and `family_for`).
SCORE_OF = {'LlamaForCausalLM': 'LlamaForSequenceClassification',
            'Qwen2ForCausalLM': 'Qwen2ForSequenceClassification',
            'MistralForCausalLM': 'MistralForSequenceClassification'}


def family_of(hf: dict, path: str) -> Family:
  """The family of a config.json, by its `architectures` list."""
  archs = hf.get('architectures') or []
  for arch in archs:
    if arch in ARCHITECTURES:
      return ARCHITECTURES[arch]
  raise ConfigError(f"{path}: architectures={archs} is not supported; llmjax imports"
                    f" {', '.join(ARCHITECTURES)}.")


def family_for(cfg: ModelConfig) -> Family:
  """The family an llmjax model exports as, from the features it uses (a score model as the
  *ForSequenceClassification of that family)."""
  if cfg.num_experts:
    # Qwen3-MoE is the one with q/k norms, Qwen2-MoE the one with a shared expert (and q/k/v
    # biases); Mixtral has neither, nor dense layers.
    if cfg.qk_norm:
      name = 'Qwen3MoeForCausalLM'
    elif cfg.shared_expert_mlp_dim or cfg.qkv_bias:
      name = 'Qwen2MoeForCausalLM'
    else:
      name = 'MixtralForCausalLM'
  elif cfg.position == 'learned':
    name = 'GPT2LMHeadModel'
  elif cfg.qkv_bias and not cfg.out_bias:
    name = 'Qwen2ForCausalLM'
  elif cfg.sliding_window:
    name = 'MistralForCausalLM'
  else:
    name = 'LlamaForCausalLM'
  if cfg.head == 'score':
    if name not in SCORE_OF:
      raise ConfigError(f"a score model (model.head='score') with this model's features exports"
                        f" as {name}, which has no reward-model class; llmjax writes"
                        f" {', '.join(SCORE_OF.values())}.")
    name = SCORE_OF[name]
  return ARCHITECTURES[name]


def is_ignored(family: Family, name: str, cfg: ModelConfig) -> bool:
  """Stored tensors that are not parameters: buffers, and a tied model's copy of the head (or
  an LM's head when a score model starts from it)."""
  lm_head_unused = cfg.tie_embeddings or cfg.head == 'score'
  return bool(re.search(family.ignored, name)) or (lm_head_unused and name == 'lm_head.weight')
