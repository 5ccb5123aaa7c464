"""Logical axis names for parameters and activations.

Layers name every dimension with one of these; the config's rules table maps them to mesh
axes (see `llmjax.sharding`), so no layer ever mentions a mesh. A leaf module (it imports
nothing) at the package top, so that both `llmjax.models` and `llmjax.kernels` (whose shard_map
wrapper reads the rules for q/k/v) can use it: kernels never import `llmjax.models`.
"""

BATCH = 'batch'
LENGTH = 'length'        # sequence positions of activations
KV_LENGTH = 'kv_length'  # positions of the KV cache
EMBED = 'embed'          # model width
HEADS = 'heads'          # query heads
KV_HEADS = 'kv_heads'    # key/value heads (GQA/MQA)
HEAD_DIM = 'head_dim'
MLP = 'mlp'              # feed-forward hidden width
VOCAB = 'vocab'
LAYERS = 'layers'        # the stacked axis of scanned layers
LORA = 'lora'            # the rank of LoRA adapters: small, so no rule maps it (replicated)
POSITIONS = 'positions'  # learned absolute position table (GPT-2)
EXPERT = 'expert'       # the stacked experts of an MoE layer (mesh.expert: expert parallelism)
SCORE = 'score'          # the reward head's one output (model.head='score'): no rule maps it
