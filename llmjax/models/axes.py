"""The logical axis names, re-exported from their leaf module `llmjax.axes` (where the kernels
can import them without importing `llmjax.models`); layers use them as `axes.EMBED`."""

from llmjax.axes import (BATCH, EMBED, EXPERT, HEAD_DIM, HEADS, KV_HEADS, KV_LENGTH, LAYERS, LENGTH,  # noqa: F401
                         LORA, MLP, POSITIONS, SCORE, VOCAB)
