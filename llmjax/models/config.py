"""Model configuration and named presets with the published shapes.

One frozen `ModelConfig` describes every supported family (GPT-2, Llama 3, Qwen2/2.5,
Mistral): the families differ only in the fields below, never in separate model classes.
Experiment files hold the same fields in an ml-collections `ConfigDict` (`config.model`);
`ModelConfig.from_dict` turns it back into this dataclass and validates it.
"""

import dataclasses
from typing import Any, Callable

from llmjax.errors import ConfigError, closest


class _Names:
  """The names of a registry dict in a module that imports this one, read on first use.

  `layers.NORMS`, `layers.MLPS` and `transformer.REMAT_POLICIES` map names to code and are the
  one source of truth; a tuple here would drift from them, and importing them at module level
  would be a cycle (those modules import `ModelConfig`). Iterable and supports `in`, like the
  tuples below.
  """

  def __init__(self, registry: Callable[[], dict]):
    self._registry = registry

  def __iter__(self):
    return iter(self._registry())

  def __contains__(self, name) -> bool:
    return name in self._registry()

  def __len__(self) -> int:
    return len(self._registry())

  def __repr__(self) -> str:
    return repr(tuple(self))


def _norms() -> dict:
  from llmjax.models.layers import NORMS as registry
  return registry


def _mlps() -> dict:
  from llmjax.models.layers import MLPS as registry
  return registry


def _remat_policies() -> dict:
  from llmjax.models.transformer import REMAT_POLICIES as registry
  return registry


# Registries of the choices a config can name, so grep leads from a config value to its code.
# The first three are the keys of the dicts that implement them.
NORMS = _Names(_norms)  # llmjax.models.layers.NORMS
MLPS = _Names(_mlps)  # llmjax.models.layers.MLPS
POSITIONS = ('rope', 'learned')
ROPE_SCALINGS = ('', 'linear', 'dynamic', 'llama3')
REMAT_POLICIES = _Names(_remat_policies)  # llmjax.models.transformer.REMAT_POLICIES
DTYPES = ('float32', 'bfloat16', 'float16')
# What the last layer computes: 'lm' the next-token logits [B, T, vocab]; 'score' one scalar
# per position [B, T] (a reward model, transformers' *ForSequenceClassification with
# num_labels=1), read at each sequence's last token by `llmjax.train.reward`.
HEADS = ('lm', 'score')
# model.virtual_tokens: '' none, 'prompt' prompt tuning, 'prefix' prefix tuning (set from
# config.peft.method by `llmjax.config.validate`: PEFT_METHODS there).
VIRTUAL_TOKENS = ('', 'prompt', 'prefix')
# Projections that can carry LoRA adapters, by target name: the call site of each projection
# passes `adapters.for_target(cfg, <target>)` (attention.py, layers.py, transformer.py).
LORA_TARGETS = ('q', 'k', 'v', 'o', 'gate', 'up', 'down', 'head')
BASE_QUANTS = ('', 'nf4', 'int8', 'int4')  # model.base_quant; the stores are `layers.KERNEL_STORES`


class LoraRanks(dict):
  """model.lora_ranks: {target: rank}. A dict (so ConfigDicts and JSON hold it as one) that
  hashes by its items, because a ModelConfig is a Flax module attribute; treat it as frozen."""

  def __hash__(self):
    return hash(tuple(sorted(self.items())))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and choices of a decoder-only Transformer."""
  vocab_size: int
  num_layers: int
  embed_dim: int
  num_heads: int
  num_kv_heads: int  # == num_heads: MHA; 1: MQA; otherwise GQA.
  head_dim: int  # 0: embed_dim // num_heads
  mlp_dim: int
  max_seq_len: int  # size of the learned position table; the longest context for RoPE models.
  norm: str = 'rmsnorm'
  norm_eps: float = 1e-5
  mlp: str = 'swiglu'
  position: str = 'rope'
  rope_theta: float = 10_000.0
  # RoPE scaling as in Hugging Face's `rope_scaling` (Llama 3.1+ uses 'llama3').
  rope_scaling: str = ''
  rope_scaling_factor: float = 1.0
  rope_low_freq_factor: float = 1.0  # llama3 only
  rope_high_freq_factor: float = 4.0  # llama3 only
  rope_original_max_len: int = 8192  # llama3 and dynamic: the pretraining context
  qkv_bias: bool = False  # Qwen2 and GPT-2
  out_bias: bool = False  # GPT-2: bias on the attention output projection
  mlp_bias: bool = False  # GPT-2
  tie_embeddings: bool = False  # the LM head reuses the input embedding
  sliding_window: int = 0  # Mistral: attend to the last `sliding_window` tokens; 0 = no window.
  dtype: str = 'float32'  # compute dtype of matmuls; softmax, norms and losses stay float32.
  param_dtype: str = 'float32'
  attention: str = 'xla'  # implementation name, see `llmjax.kernels.dispatch.IMPLEMENTATIONS`.
  remat: str = 'none'  # see `llmjax.models.transformer.REMAT_POLICIES`.
  scan_layers: bool = True  # one compiled block for all layers: compile time independent of depth.
  init_std: float = 0.02
  # 'lm': the LM head (logits); 'score': a [embed, 1] projection without bias instead, the
  # reward model's scalar head (HF's `score` Linear). An architecture field: an LM checkpoint
  # can initialise a score model (the head is the one new leaf), not the other way round.
  head: str = 'lm'
  # PPO's critic on the policy trunk (TRL's AutoModelForCausalLMWithValueHead): a [embed, 1]
  # projection with a bias from the final-norm output, one value per position, beside the LM
  # head. A training-time leaf: a source checkpoint without it gets a fresh one, and merging
  # (generate, convert, quantize) drops it.
  value_head: bool = False
  # LoRA (Hu et al. 2021): rank > 0 adds adapters A [in, rank] (random) and B [rank, out]
  # (zeros) to each projection named in lora_targets, scaled by lora_alpha / lora_rank, and
  # training updates only them (`llmjax.models.lora`). The adapters stay float32 whatever
  # param_dtype is, so the frozen base can be bfloat16.
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')
  # Per-target ranks overriding lora_rank, e.g. {'q': 16, 'down': 4} (PEFT's rank_pattern);
  # the scaling of each is alpha / its own rank.
  lora_ranks: LoraRanks = dataclasses.field(default_factory=LoraRanks)
  # Dropout on each adapter's input while training (PEFT's lora_dropout); 0.0 in evaluation.
  lora_dropout: float = 0.0
  # rsLoRA (Kalajdzievski 2023): scale alpha / sqrt(rank) instead of alpha / rank, so the
  # update's size does not shrink as the rank grows (PEFT's use_rslora).
  use_rslora: bool = False
  # DoRA (Liu et al. 2024, PEFT's use_dora): plus a learned magnitude per output feature
  # (`lora_magnitude`, initialised to the base weight's column norms), see `adapters.DoRA`.
  use_dora: bool = False
  # QLoRA (Dettmers et al. 2023): the frozen base's projection kernels stored quantized and
  # dequantized inside each matmul; the adapters, embedding, norms and LM head stay as they
  # are. '' (off), 'nf4' (4-bit NormalFloat in blocks of quant_block_size, QLoRA's), 'int8'
  # (per output channel) or 'int4' (symmetric absmax per group of quant_block_size inputs).
  # quant_double: NF4 double quantization of the block absmax (QLoRA sec. 3, ~0.37 bits/param
  # less). Leaves and shardings: `layers.KERNEL_STORES`. Without adapters (lora_rank=0) this
  # is a weight-only quantized model for inference (`python -m llmjax.quantize` writes one;
  # training one needs adapters: `llmjax.config.validate`).
  base_quant: str = ''
  quant_block_size: int = 64  # QLoRA's and bitsandbytes' default (NF4 blocks, int4 groups)
  quant_double: bool = False

  # Virtual tokens (PEFT's prompt learning), set from config.peft by `llmjax.config.validate`
  # (peft.method, peft.num_virtual_tokens); the base stays frozen and only they train.
  # 'prompt': prompt tuning (Lester et al. 2021): `num_virtual_tokens` learned embeddings
  #   [V, embed] (`prompt_embedding`) placed before the tokens; the real tokens sit at positions
  #   V.., as in PEFT, and the logits cover the real tokens only.
  # 'prefix': prefix tuning without the reparametrising MLP (Li and Liang 2021; P-tuning v2):
  #   per layer learned keys and values `prefix_k` / `prefix_v` [V, kv_heads, head_dim] that
  #   every query attends to (not rotated: they are stored as PEFT's past_key_values are).
  # Either way each layer's attention sees V prefix keys before the sequence's own, visible to
  # every position of every packed document (`models.attention`); the KV cache holds the real
  # tokens only (prompt tuning recomputes its V tokens' keys each call).
  virtual_tokens: str = ''
  num_virtual_tokens: int = 0

  # Mixture of experts (`llmjax.models.moe`): num_experts > 0 replaces the SwiGLU of the sparse
  # layers by `num_experts` SwiGLU experts of width moe_mlp_dim, num_experts_per_tok of them per
  # token. The names are transformers' (MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig).
  num_experts: int = 0  # 0: a dense model
  num_experts_per_tok: int = 2  # top-k
  moe_mlp_dim: int = 0  # each expert's hidden width; 0: mlp_dim (Mixtral's experts are its MLP)
  # Qwen2-MoE: a dense SwiGLU of this width on every token, scaled by sigmoid(shared_gate(x));
  # 0: none.
  shared_expert_mlp_dim: int = 0
  # Renormalise the top-k probabilities to sum to 1 (Mixtral: always, it is its softmax over
  # the top-k logits; Qwen3-MoE: True; Qwen1.5-MoE: False).
  norm_topk_prob: bool = True
  # Layer i (0-based) is sparse iff (i + 1) % decoder_sparse_step == 0 and i is not in
  # mlp_only_layers (transformers' Qwen2-MoE rule); the others keep the dense mlp_dim SwiGLU.
  decoder_sparse_step: int = 1
  mlp_only_layers: tuple[int, ...] = ()
  # Loss coefficients (`llmjax.train.losses.moe_losses`): the load-balancing loss as
  # transformers' load_balancing_loss_func (Switch Transformer, Fedus et al. 2021, eq. 4) and the
  # router z-loss (ST-MoE, Zoph et al. 2022, eq. 5).
  router_aux_loss_coef: float = 0.001
  router_z_loss_coef: float = 0.0
  # 0: dropless (grouped matmuls over tokens sorted by expert, every token gets its k experts);
  # > 0: fixed shapes, each expert takes ceil(factor * tokens * k / experts) token copies and the
  # rest are dropped (counted in the `moe_dropped` metric).
  moe_capacity_factor: float = 0.0
  # Qwen3: an RMSNorm over head_dim on every query and key head before RoPE.
  qk_norm: bool = False

  @classmethod
  def from_dict(cls, d: Any) -> 'ModelConfig':
    """Builds and validates a config from a dict/ConfigDict; unknown keys name the closest."""
    d = dict(d)
    d.pop('preset', None)
    if 'lora_targets' in d:  # a list in ConfigDicts and JSON; a hashable tuple here
      d['lora_targets'] = tuple(d['lora_targets'])
    if 'mlp_only_layers' in d:
      d['mlp_only_layers'] = tuple(int(i) for i in d['mlp_only_layers'])
    if 'lora_ranks' in d:  # a ConfigDict or dict (or None: none)
      ranks = d['lora_ranks'] or {}
      if not hasattr(ranks, 'items'):
        raise ConfigError(f"model.lora_ranks={ranks!r} must be a mapping target -> rank, e.g."
                          " {'q': 16}.")
      d['lora_ranks'] = LoraRanks(ranks.items())
    names = {f.name for f in dataclasses.fields(cls)}
    for key in d:
      if key not in names:
        raise ConfigError(f"model.{key}: unknown model key.{closest(key, names)}")
    try:
      cfg = cls(**d)
    except TypeError as e:
      missing = sorted(names - set(d))
      raise ConfigError(f"model: missing keys {missing} ({e}); start from a preset.") from None
    cfg.validate()
    return cfg

  def __post_init__(self):
    if not isinstance(self.lora_ranks, LoraRanks):  # dataclasses.replace(cfg, lora_ranks={...})
      object.__setattr__(self, 'lora_ranks', LoraRanks(self.lora_ranks or {}))
    if self.head_dim == 0 and self.num_heads > 0 and self.embed_dim % self.num_heads == 0:
      object.__setattr__(self, 'head_dim', self.embed_dim // self.num_heads)
    if not isinstance(self.mlp_only_layers, tuple):
      object.__setattr__(self, 'mlp_only_layers', tuple(self.mlp_only_layers))
    if self.num_experts and self.moe_mlp_dim == 0:
      object.__setattr__(self, 'moe_mlp_dim', self.mlp_dim)

  def validate(self) -> None:
    """Raises ConfigError naming the key and the fix."""
    if self.head_dim == 0 and self.num_heads > 0:
      raise ConfigError(
          f"model.num_heads={self.num_heads} does not divide model.embed_dim={self.embed_dim};"
          " pick a divisor, or set model.head_dim explicitly.")
    for key in ('vocab_size', 'num_layers', 'embed_dim', 'num_heads', 'num_kv_heads',
                'head_dim', 'mlp_dim', 'max_seq_len'):
      if int(getattr(self, key)) <= 0:
        raise ConfigError(f"model.{key}={getattr(self, key)} must be positive.")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(
          f"model.num_kv_heads={self.num_kv_heads} must divide model.num_heads={self.num_heads};"
          f" pick a divisor of {self.num_heads}.")
    for key, allowed in (('norm', NORMS), ('mlp', MLPS), ('position', POSITIONS),
                         ('rope_scaling', ROPE_SCALINGS), ('remat', REMAT_POLICIES),
                         ('dtype', DTYPES), ('param_dtype', DTYPES), ('head', HEADS)):
      value = getattr(self, key)
      if value not in allowed:
        raise ConfigError(f"model.{key}='{value}' is not one of {list(allowed)}."
                          f"{closest(value, allowed)}")
    if self.lora_rank < 0:
      raise ConfigError(f"model.lora_rank={self.lora_rank} must be >= 0 (0: no LoRA).")
    for target in self.lora_targets:
      if target not in LORA_TARGETS:
        raise ConfigError(f"model.lora_targets: '{target}' is not one of {list(LORA_TARGETS)}."
                          f"{closest(target, LORA_TARGETS)}")
    if self.lora_rank and not self.lora_targets:
      raise ConfigError(f"model.lora_rank={self.lora_rank} but model.lora_targets is empty;"
                        f" name projections from {list(LORA_TARGETS)}.")
    if self.lora_rank and 'head' in self.lora_targets and self.tie_embeddings:
      # A tied model's LM head is the input embedding (a gather and a transposed matmul, no
      # 'head' projection), so the adapter would not exist and nothing would train.
      raise ConfigError("model.lora_targets names 'head' but model.tie_embeddings=True: a tied"
                        " model has no separate LM head to adapt; drop 'head' from"
                        " model.lora_targets.")
    if self.lora_rank and 'head' in self.lora_targets and self.head == 'score':
      raise ConfigError("model.lora_targets names 'head' but model.head='score': a score model"
                        " has no LM head (its `score` head is trained in full with LoRA); drop"
                        " 'head' from model.lora_targets.")
    self._validate_lora_options()
    self._validate_virtual_tokens()
    self._validate_base_quant()
    self._validate_moe()
    if self.sliding_window < 0:
      raise ConfigError(f"model.sliding_window={self.sliding_window} must be >= 0 (0: none).")

  def _validate_moe(self) -> None:
    e, k = self.num_experts, self.num_experts_per_tok
    if e < 0:
      raise ConfigError(f"model.num_experts={e} must be >= 0 (0: a dense model).")
    if not e:
      used = [key for key in ('shared_expert_mlp_dim', 'moe_mlp_dim', 'mlp_only_layers')
              if getattr(self, key)]
      if used or self.decoder_sparse_step != 1 or self.moe_capacity_factor:
        key = used[0] if used else ('decoder_sparse_step' if self.decoder_sparse_step != 1
                                    else 'moe_capacity_factor')
        raise ConfigError(f"model.{key} is set but model.num_experts=0 (a dense model); set"
                          " model.num_experts > 0 or drop it.")
      return
    if not 1 <= k <= e:
      raise ConfigError(f"model.num_experts_per_tok={k} must be between 1 and model.num_experts"
                        f"={e}; use at most {e}.")
    if self.mlp != 'swiglu':
      raise ConfigError(f"model.num_experts={e} needs model.mlp='swiglu' (the experts are"
                        f" SwiGLUs); it is '{self.mlp}'.")
    if self.moe_mlp_dim <= 0 or self.shared_expert_mlp_dim < 0:
      raise ConfigError(f"model.moe_mlp_dim={self.moe_mlp_dim} must be positive and"
                        f" model.shared_expert_mlp_dim={self.shared_expert_mlp_dim} >= 0.")
    if self.decoder_sparse_step < 1:
      raise ConfigError(f"model.decoder_sparse_step={self.decoder_sparse_step} must be >= 1"
                        " (1: every layer sparse).")
    bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_layers]
    if bad:
      raise ConfigError(f"model.mlp_only_layers names layer {bad[0]}, outside 0.."
                        f"{self.num_layers - 1}; list 0-based layer indices.")
    for key in ('router_aux_loss_coef', 'router_z_loss_coef', 'moe_capacity_factor'):
      if getattr(self, key) < 0:
        raise ConfigError(f"model.{key}={getattr(self, key)} must be >= 0.")
    if not any(self.moe_layers):
      raise ConfigError(f"model.num_experts={e} but no layer is sparse (decoder_sparse_step="
                        f"{self.decoder_sparse_step}, mlp_only_layers={list(self.mlp_only_layers)});"
                        " set model.num_experts=0 for a dense model.")
    mlp_targets = [t for t in self.lora_targets if t in ('gate', 'up', 'down')]
    if self.lora_rank and mlp_targets:
      raise ConfigError(f"model.lora_targets names '{mlp_targets[0]}' but model.num_experts={e}:"
                        " LoRA on MoE experts is not supported; target the attention"
                        " projections, model.lora_targets=['q', 'k', 'v', 'o'].")
    if self.base_quant:
      raise ConfigError(f"model.base_quant={self.base_quant!r} with model.num_experts={e}: the"
                        " stacked expert weights cannot be stored quantized yet; use"
                        " base_quant=''.")

  @property
  def moe_layers(self) -> tuple[bool, ...]:
    """Per layer: True where it is an MoE layer (transformers' Qwen2-MoE rule, which Mixtral's
    every-layer-sparse is the decoder_sparse_step=1 case of)."""
    step, skip = self.decoder_sparse_step, set(self.mlp_only_layers)
    return tuple(bool(self.num_experts) and (i + 1) % step == 0 and i not in skip
                 for i in range(self.num_layers))

  @property
  def scan_period(self) -> int:
    """Layers per scanned step: decoder_sparse_step for an MoE model (its repeating pattern,
    e.g. [dense, moe] for 2), else 1."""
    return self.decoder_sparse_step if self.num_experts else 1

  def layer_groups(self) -> tuple[tuple[int, int, tuple[bool, ...]], ...]:
    """The layer stack as scan groups (first layer, repeats, kinds of one period): runs of
    consecutive periods of the same pattern are one group (one `nn.scan`); an mlp_only layer
    breaks a run, and layers past the last whole period are a group of their own. A dense or
    an every-layer-sparse model is one group ((0, num_layers, (kind,)))."""
    p, kinds = self.scan_period, self.moe_layers
    periods = [(i, kinds[i:i + p]) for i in range(0, self.num_layers, p)]
    groups = []
    for first, pattern in periods:
      if groups and groups[-1][2] == pattern:
        groups[-1][1] += 1
      else:
        groups.append([first, 1, pattern])
    return tuple((first, n, pattern) for first, n, pattern in groups)

  def _validate_base_quant(self) -> None:
    if self.base_quant not in BASE_QUANTS:
      raise ConfigError(f"model.base_quant={self.base_quant!r} must be one of {list(BASE_QUANTS)}"
                        f" ('' = a float base).{closest(self.base_quant, BASE_QUANTS)}")
    if not self.base_quant:
      return
    if self.virtual_tokens:
      raise ConfigError(f"model.base_quant={self.base_quant!r} with peft.method="
                        f"'{self.virtual_tokens}': a quantized base takes LoRA adapters only;"
                        " use model.lora_rank or base_quant=''.")
    if self.use_dora:
      # DoRA's magnitude init and per-step weight norm ||W + sAB||_c need the full-precision
      # W (PEFT computes them on the dequantized weight, a different model than the float one).
      raise ConfigError(f"model.base_quant={self.base_quant!r} with model.use_dora=True: DoRA"
                        " needs the full-precision weight's norms; use plain LoRA or base_quant=''.")
    bs = self.quant_block_size
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 2 or bs % 2:
      raise ConfigError(f"model.quant_block_size={bs!r} must be an even integer >= 2"
                        " (bitsandbytes uses 64).")

  def _validate_lora_options(self) -> None:
    uses = [k for k in ('lora_ranks', 'lora_dropout', 'use_rslora', 'use_dora') if getattr(self, k)]
    if not self.lora_rank and uses:
      raise ConfigError(f"model.{uses[0]} is set but model.lora_rank=0 (no LoRA); set"
                        " model.lora_rank > 0 or drop it.")
    if not 0.0 <= self.lora_dropout < 1.0:
      raise ConfigError(f"model.lora_dropout={self.lora_dropout} must be in [0, 1).")
    for target, rank in self.lora_ranks.items():
      if target not in self.lora_targets:
        raise ConfigError(f"model.lora_ranks: '{target}' is not in model.lora_targets"
                          f" {list(self.lora_targets)}; add it there or drop it here."
                          f"{closest(target, self.lora_targets)}")
      if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ConfigError(f"model.lora_ranks['{target}']={rank!r} must be a positive integer.")
    if not self.lora_rank:
      return
    # A rank above a projection's smaller side adds parameters and no expressiveness (and
    # breaks PEFT's export): usually a rank meant for a bigger model.
    for target, (n_in, n_out) in self.lora_projections().items():
      rank = self.lora_ranks.get(target, self.lora_rank)
      if rank > min(n_in, n_out):
        key = f"model.lora_ranks['{target}']" if target in self.lora_ranks else 'model.lora_rank'
        raise ConfigError(f"{key}={rank} is larger than the '{target}' projection [{n_in} ->"
                          f" {n_out}]; use a rank <= {min(n_in, n_out)}.")

  def _validate_virtual_tokens(self) -> None:
    if self.virtual_tokens not in VIRTUAL_TOKENS:
      raise ConfigError(f"model.virtual_tokens='{self.virtual_tokens}' is not one of"
                        f" {list(VIRTUAL_TOKENS)}; set peft.method instead.")
    if self.num_virtual_tokens < 0 or bool(self.virtual_tokens) != bool(self.num_virtual_tokens):
      raise ConfigError(f"peft.num_virtual_tokens={self.num_virtual_tokens} must be > 0 with a"
                        " prompt-learning peft.method ('prompt_tuning', 'prefix_tuning') and 0"
                        " without one.")
    if self.virtual_tokens and self.lora_rank:
      raise ConfigError("peft.method and model.lora_rank are both set; train one kind of"
                        " adapter at a time (set model.lora_rank=0 or peft.method='').")

  @property
  def num_virtual_params(self) -> int:
    """Parameters of the virtual tokens: V x embed (prompt), 2 x layers x V x kv x head_dim
    (prefix)."""
    if self.virtual_tokens == 'prompt':
      return self.num_virtual_tokens * self.embed_dim
    if self.virtual_tokens == 'prefix':
      return 2 * self.num_layers * self.num_virtual_tokens * self.num_kv_heads * self.head_dim
    return 0

  @property
  def frozen_base(self) -> bool:
    """True when training updates only adapters (LoRA, DoRA, virtual tokens)."""
    return bool(self.lora_rank or self.num_virtual_tokens)

  def lora_projections(self) -> dict[str, tuple[int, int]]:
    """{target: (in, out) features} of every projection in model.lora_targets that exists."""
    d, h, kv, hd, f, v = (self.embed_dim, self.num_heads, self.num_kv_heads, self.head_dim,
                          self.mlp_dim, self.vocab_size)
    sizes = {'q': (d, h * hd), 'k': (d, kv * hd), 'v': (d, kv * hd), 'o': (h * hd, d),
             'gate': (d, f) if self.mlp == 'swiglu' else None, 'up': (d, f), 'down': (f, d),
             'head': (d, v) if not self.tie_embeddings and self.head == 'lm' else None}
    return {t: sizes[t] for t in self.lora_targets if sizes.get(t)}

  @property
  def num_lora_params(self) -> int:
    """Adapter parameters: rank x (in + out) for each targeted projection, plus out for its
    DoRA magnitude; per layer, and once for the LM head."""
    if not self.lora_rank:
      return 0
    total = 0
    for target, (n_in, n_out) in self.lora_projections().items():
      n = self.lora_ranks.get(target, self.lora_rank) * (n_in + n_out) + n_out * self.use_dora
      total += n if target == 'head' else self.num_layers * n
    return total

  @property
  def num_params(self) -> int:
    """Exact parameter count from the shapes, adapters excluded (`num_lora_params`)."""
    return self._count_params(active=False)

  @property
  def num_active_params(self) -> int:
    """Parameters one token runs through: an MoE layer counts its router, k experts and the
    shared expert; equals num_params for a dense model."""
    return self._count_params(active=True)

  def _moe_params(self, active: bool) -> int:
    """One MoE layer's feed-forward: router, experts (k of them when `active`), shared expert
    and its gate."""
    d, fs = self.embed_dim, self.shared_expert_mlp_dim
    experts = self.num_experts_per_tok if active else self.num_experts
    return d * self.num_experts + experts * 3 * d * self.moe_mlp_dim + (3 * d * fs + d) * (fs > 0)

  def _count_params(self, active: bool) -> int:
    d, h, kv, hd, f, v = (self.embed_dim, self.num_heads, self.num_kv_heads, self.head_dim,
                          self.mlp_dim, self.vocab_size)
    norm = d * (2 if self.norm == 'layernorm' else 1)
    attn = d * h * hd + 2 * d * kv * hd + h * hd * d
    attn += (h * hd + 2 * kv * hd) * self.qkv_bias + d * self.out_bias
    attn += 2 * hd * self.qk_norm
    mlp = (3 if self.mlp == 'swiglu' else 2) * d * f + (f + d) * self.mlp_bias
    total = sum(attn + 2 * norm + (self._moe_params(active) if sparse else mlp)
                for sparse in self.moe_layers) + v * d + norm
    if self.head == 'score':
      total += d  # the [embed, 1] score head; no LM head
    else:
      total += 0 if self.tie_embeddings else d * v
    total += self.max_seq_len * d if self.position == 'learned' else 0
    return total

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12*L*d_attn*T,
    N the active parameters (an MoE token's k experts, `num_active_params`)
    (with LoRA: 4N + 6 x adapter parameters + the same attention term).

    N excludes the input embedding (a gather, not a matmul); attention is counted over the
    full (non-causal) T x T score matrix, as in the PaLM MFU formula.
    """
    # The input embedding is a gather unless it is also the (tied) LM head.
    embed_is_head = self.tie_embeddings and self.head == 'lm'
    # An MoE token runs through its k experts only: the active parameters (Switch Transformer).
    n_matmul = self.num_active_params - self.vocab_size * self.embed_dim * (not embed_is_head)
    if self.position == 'learned':
      n_matmul -= self.max_seq_len * self.embed_dim
    attention = 12 * self.num_layers * self.num_heads * self.head_dim * seq_len
    if self.frozen_base:
      # A frozen base needs no weight gradients: forward 2N + activation gradients 2N; the
      # adapters cost 6 per parameter like any trained weight. Attention's backward is unchanged
      # (dq, dk, dv are needed to reach earlier layers). DoRA's weight norms (A B per
      # projection, 2 r in out) are per step, not per token, and not counted.
      # Virtual tokens count the same way (their V extra positions per call are not counted).
      return 4 * n_matmul + 6 * (self.num_lora_params + self.num_virtual_params) + attention
    return 6 * n_matmul + attention


def _gpt2(layers, dim, heads):
  return ModelConfig(
      vocab_size=50257, num_layers=layers, embed_dim=dim, num_heads=heads, num_kv_heads=heads,
      head_dim=dim // heads, mlp_dim=4 * dim, max_seq_len=1024, norm='layernorm', mlp='gelu',
      position='learned', qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=True)


def _llama3(layers, dim, heads, kv_heads, head_dim, mlp, tie, scaled):
  # Llama 3.2 1B/3B ship with llama3 RoPE scaling (factor 32 over an 8192 pretraining context).
  scaling = dict(rope_scaling='llama3', rope_scaling_factor=32.0, rope_low_freq_factor=1.0,
                 rope_high_freq_factor=4.0, rope_original_max_len=8192) if scaled else {}
  return ModelConfig(
      vocab_size=128256, num_layers=layers, embed_dim=dim, num_heads=heads,
      num_kv_heads=kv_heads, head_dim=head_dim, mlp_dim=mlp,
      max_seq_len=131072 if scaled else 8192, rope_theta=500_000.0, tie_embeddings=tie,
      **scaling)


def _qwen25(layers, dim, heads, kv_heads, mlp, vocab, tie):
  return ModelConfig(
      vocab_size=vocab, num_layers=layers, embed_dim=dim, num_heads=heads,
      num_kv_heads=kv_heads, head_dim=dim // heads, mlp_dim=mlp, max_seq_len=32768,
      norm_eps=1e-6, rope_theta=1_000_000.0, qkv_bias=True, tie_embeddings=tie)


def _qwen_moe(layers, dim, heads, kv_heads, head_dim, mlp, moe_mlp, shared, experts, k,
              norm_topk, max_len, **kw):
  return ModelConfig(
      vocab_size=151936, num_layers=layers, embed_dim=dim, num_heads=heads,
      num_kv_heads=kv_heads, head_dim=head_dim, mlp_dim=mlp, max_seq_len=max_len, norm_eps=1e-6,
      rope_theta=1_000_000.0, num_experts=experts, num_experts_per_tok=k, moe_mlp_dim=moe_mlp,
      shared_expert_mlp_dim=shared, norm_topk_prob=norm_topk, router_aux_loss_coef=0.001, **kw)


# Published shapes. `tiny` and `small` are the CPU benchmark sizes (the same as the Hugging Face
# peer in benchmarks/), Llama-style; their vocab is replaced by the tokenizer's.
PRESETS: dict[str, ModelConfig] = {
    # Few layers: unrolled (scan_layers=False) they train ~20% faster on a CPU and still
    # compile in seconds.
    'tiny': ModelConfig(vocab_size=8192, num_layers=4, embed_dim=256, num_heads=4,
                        num_kv_heads=2, head_dim=64, mlp_dim=704, max_seq_len=1024,
                        scan_layers=False),
    'small': ModelConfig(vocab_size=32000, num_layers=8, embed_dim=512, num_heads=8,
                         num_kv_heads=4, head_dim=64, mlp_dim=1408, max_seq_len=2048,
                         scan_layers=False),
    'gpt2': _gpt2(12, 768, 12),
    'gpt2-medium': _gpt2(24, 1024, 16),
    'gpt2-large': _gpt2(36, 1280, 20),
    'gpt2-xl': _gpt2(48, 1600, 25),
    'llama3-1b': _llama3(16, 2048, 32, 8, 64, 8192, tie=True, scaled=True),
    'llama3-3b': _llama3(28, 3072, 24, 8, 128, 8192, tie=True, scaled=True),
    'llama3-8b': _llama3(32, 4096, 32, 8, 128, 14336, tie=False, scaled=False),
    'qwen2.5-0.5b': _qwen25(24, 896, 14, 2, 4864, 151936, tie=True),
    'qwen2.5-1.5b': _qwen25(28, 1536, 12, 2, 8960, 151936, tie=True),
    'qwen2.5-7b': _qwen25(28, 3584, 28, 4, 18944, 152064, tie=False),
    # Mixture of experts. `tiny-moe` matches `tiny`'s active parameters (top-2 of 8 experts of
    # half tiny's MLP width, plus the router): benchmarks/moe.py trains the two side by side.
    'tiny-moe': ModelConfig(vocab_size=8192, num_layers=4, embed_dim=256, num_heads=4,
                            num_kv_heads=2, head_dim=64, mlp_dim=704, max_seq_len=1024,
                            num_experts=8, num_experts_per_tok=2, moe_mlp_dim=352,
                            router_aux_loss_coef=0.01, scan_layers=False),
    # mistralai/Mixtral-8x7B-v0.1: 46.7B parameters, 12.9B active.
    'mixtral-8x7b': ModelConfig(
        vocab_size=32000, num_layers=32, embed_dim=4096, num_heads=32, num_kv_heads=8,
        head_dim=128, mlp_dim=14336, max_seq_len=32768, rope_theta=1_000_000.0, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=True, router_aux_loss_coef=0.02),
    # Qwen/Qwen1.5-MoE-A2.7B (Qwen2MoeForCausalLM): 14.3B, 2.7B active; 60 experts + a shared one.
    'qwen1.5-moe-a2.7b': _qwen_moe(24, 2048, 16, 16, 128, 5632, 1408, 5632, 60, 4,
                                   norm_topk=False, max_len=8192, qkv_bias=True),
    # Qwen/Qwen3-30B-A3B (Qwen3MoeForCausalLM): 30.5B, 3.3B active; q/k norms, no biases.
    'qwen3-30b-a3b': _qwen_moe(48, 2048, 32, 4, 128, 6144, 768, 0, 128, 8, norm_topk=True,
                               max_len=40960, qk_norm=True),
    'mistral-7b': ModelConfig(
        vocab_size=32000, num_layers=32, embed_dim=4096, num_heads=32, num_kv_heads=8,
        head_dim=128, mlp_dim=14336, max_seq_len=32768, sliding_window=4096),
}


def get_preset(name: str, **overrides) -> ModelConfig:
  """The named preset with `overrides` applied; unknown names list the presets."""
  if name not in PRESETS:
    raise ConfigError(f"model preset '{name}' is unknown.{closest(name, PRESETS)}"
                      f" Presets: {', '.join(PRESETS)}.")
  cfg = dataclasses.replace(PRESETS[name], **overrides)
  cfg.validate()
  return cfg


# Fields that say how to run a model, not what it computes: they may differ between a source
# checkpoint (an HF dir, another run's workdir) and the run that starts from it. LoRA settings
# are here because adapters are added on top of a source's weights.
RUNTIME_FIELDS = ('dtype', 'param_dtype', 'attention', 'remat', 'scan_layers', 'init_std',
                  'lora_rank', 'lora_alpha', 'lora_targets', 'lora_ranks', 'lora_dropout',
                  'use_rslora', 'use_dora', 'base_quant', 'quant_block_size', 'quant_double')
# Virtual tokens too are added on top of a source's weights.
RUNTIME_FIELDS += ('virtual_tokens', 'num_virtual_tokens')
# So is PPO's value head (`value_head`): no checkpoint format but llmjax's holds one.
RUNTIME_FIELDS += ('value_head',)
# The MoE loss coefficients and the capacity factor size no parameter: a checkpoint can be
# trained on with others.
RUNTIME_FIELDS += ('router_aux_loss_coef', 'router_z_loss_coef', 'moe_capacity_factor')


def architecture_diffs(source: ModelConfig, target: ModelConfig,
                       also: tuple[str, ...] = ()) -> list[str]:
  """The names of the fields in which `target` computes something other than `source`: the
  one comparator behind the resume check, the `init.params_dir` check and the HF check.

  Runtime fields are ignored unless named in `also` (a resumed run's saved arrays depend on
  scan_layers and the LoRA fields too), and so is max_seq_len of a RoPE model (it sizes no
  parameter there; a learned position table it does).
  """
  skip = set(RUNTIME_FIELDS) - set(also)
  if target.position == 'rope' and source.position == 'rope':
    skip.add('max_seq_len')
  return [f.name for f in dataclasses.fields(ModelConfig)
          if f.name not in skip and getattr(source, f.name) != getattr(target, f.name)]


def check_architecture(source: ModelConfig, target: ModelConfig, *, key: str, source_name: str,
                       fix: str, also: tuple[str, ...] = (), error: type = ConfigError) -> None:
  """Raises one ConfigError '<key>: the experiment's model differs from <source_name>:
  model.F=<target> but <source_name> has <source>; ... <fix>' (at most four fields named) as
  `error` (a UserError subclass)."""
  diffs = [f"model.{n}={getattr(target, n)!r} but {source_name} has {getattr(source, n)!r}"
           for n in architecture_diffs(source, target, also)]
  if diffs:
    raise error(f"{key}: the experiment's model differs from {source_name}: "
                      + '; '.join(diffs[:4]) + ('; ...' if len(diffs) > 4 else '') + f". {fix}")
