"""Tokenizers behind one small interface; the project's own is a trained sentencepiece model.

`encode` never adds BOS/EOS: the data pipeline and the sampler add them explicitly, so the
same tokenizer serves pretraining, chat formatting and generation.
"""

import io
import os
from typing import Iterable

import sentencepiece as spm

from llmjax.errors import DataError


class Tokenizer:
  """The interface every tokenizer implements."""
  vocab_size: int
  bos_id: int
  eos_id: int
  pad_id: int

  def encode(self, text: str) -> list[int]:
    raise NotImplementedError

  def decode(self, ids: Iterable[int]) -> str:
    raise NotImplementedError


class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece model (BPE or unigram) with byte fallback."""

  PAD, UNK, BOS, EOS = 0, 1, 2, 3

  def __init__(self, processor: spm.SentencePieceProcessor, path: str = ''):
    self.sp = processor
    self.path = path
    self.vocab_size = processor.get_piece_size()
    self.bos_id = processor.bos_id()
    self.eos_id = processor.eos_id()
    self.pad_id = processor.pad_id()

  @classmethod
  def load(cls, path: str) -> 'SentencePieceTokenizer':
    if not os.path.isfile(path):
      raise DataError(f"tokenizer {path} does not exist; pass a sentencepiece .model file.")
    sp = spm.SentencePieceProcessor()
    try:
      sp.load(path)
    except (OSError, RuntimeError) as e:
      raise DataError(f"tokenizer {path} is not a valid sentencepiece model ({e}).") from None
    return cls(sp, path)

  @classmethod
  def train(cls, texts: Iterable[str], path: str, vocab_size: int,
            model_type: str = 'bpe', max_sentences: int = 200_000) -> 'SentencePieceTokenizer':
    """Trains on `texts` (documents) and writes the model to `path`.

    Normalisation is the identity and no dummy prefix/whitespace folding is applied, so
    decode(encode(x)) == x for any string; byte fallback covers characters never seen in
    training (Chinese, emoji) with the 256 byte pieces.
    """
    if model_type not in ('bpe', 'unigram'):
      raise DataError(f"data.tokenizer_type='{model_type}' is not 'bpe' or 'unigram'.")
    lines = [line for doc in texts for line in doc.split('\n') if line.strip()]
    if not lines:
      raise DataError("cannot train a tokenizer on an empty corpus; check data.path.")
    model = io.BytesIO()
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=iter(lines[:max_sentences]), model_writer=model, vocab_size=vocab_size,
          model_type=model_type, byte_fallback=True, character_coverage=1.0,
          normalization_rule_name='identity', add_dummy_prefix=False,
          remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
          pad_id=cls.PAD, unk_id=cls.UNK, bos_id=cls.BOS, eos_id=cls.EOS,
          hard_vocab_limit=False, num_threads=2, minloglevel=2)
    except RuntimeError as e:
      reason = str(e).split('] ')[-1]
      raise DataError(f"training a {vocab_size}-piece tokenizer failed: {reason} (byte fallback"
                      " alone takes 256 pieces): raise data.vocab_size.") from None
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + '.tmp'
    with open(tmp, 'wb') as f:
      f.write(model.getvalue())
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written tokenizer behind
    return cls.load(path)

  def encode(self, text: str) -> list[int]:
    return self.sp.encode(text, out_type=int)

  def decode(self, ids: Iterable[int]) -> str:
    return self.sp.decode([int(i) for i in ids])
