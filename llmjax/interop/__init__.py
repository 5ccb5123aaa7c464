"""Hugging Face interop: transformers checkpoints <-> llmjax configs, params and tokenizers.

    cfg, params, tokenizer = load_hf(HF_DIR, mesh=mesh, rules=rules)   # import, sharded
    save_hf(OUT_DIR, cfg, params, tokenizer_dir=HF_DIR)               # export

Families: `families.ARCHITECTURES` (Llama, Qwen2, Mistral, GPT-2). The command line is
`python -m llmjax.convert`.
"""

from llmjax.interop.families import ARCHITECTURES
from llmjax.interop.hf import config_from_hf, config_to_hf, load_hf, read_params, save_hf
from llmjax.interop.tokenizer import HFSentencePieceTokenizer, HFTokenizer, load_tokenizer
