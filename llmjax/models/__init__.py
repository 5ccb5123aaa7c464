"""Decoder-only Transformer models: config and presets, layers, attention, the model."""

from llmjax.models.attention import IMPLEMENTATIONS, Mask, attention
from llmjax.models.config import PRESETS, ModelConfig, get_preset
from llmjax.models.transformer import Cache, Transformer, init_params, logical_axes
