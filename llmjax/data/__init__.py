"""Data: the generated default corpus, tokenizers, document sources and the Grain pipeline."""

from llmjax.data.corpus import default_corpus
from llmjax.data.pipeline import (build_data, build_tokenizer, get_sources, make_dataset,
                                  run_tokenizer_path)
from llmjax.data.sources import TextSource, in_memory_source, local_files_source, tfds_source
from llmjax.data.tokenizer import CharTokenizer, SentencePieceTokenizer, Tokenizer
