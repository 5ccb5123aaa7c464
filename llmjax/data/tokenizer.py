"""Tokenizers behind one small interface; the project's own is a trained sentencepiece model.

`encode` never adds BOS/EOS: the data pipeline and the sampler add them explicitly, so the
same tokenizer serves pretraining, chat formatting and generation. Other tokenizers (Hugging
Face) implement the same members.
"""

import io
import json
import os
import random
from typing import Iterable

import sentencepiece as spm

from llmjax import files
from llmjax.errors import DataError


class Tokenizer:
  """The interface every tokenizer implements.

  Attributes:
    vocab_size: number of ids; every id is in [0, vocab_size).
    bos_id, eos_id: the ids the pipeline puts around each document.
    pad_id: the id of padding; padded positions are also masked out by `loss_mask`.
  """
  vocab_size: int
  bos_id: int
  eos_id: int
  pad_id: int

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without BOS/EOS."""
    raise NotImplementedError

  def decode(self, ids: Iterable[int]) -> str:
    """The text of `ids` (a list or a 1-D array)."""
    raise NotImplementedError

  def special_text(self, i: int) -> str:
    """The text of special token `i` (bos_id, eos_id) as a chat template writes it,
    e.g. '<|begin_of_text|>': `decode` may drop special tokens, this must not."""
    return self.decode([i])


class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece model (BPE or unigram) with byte fallback."""

  # Fixed ids for the models we train; loaded third-party models keep their own.
  PAD, UNK, BOS, EOS = 0, 1, 2, 3

  def __init__(self, processor: spm.SentencePieceProcessor, path: str = ''):
    self.sp = processor
    self.path = path
    self.vocab_size = processor.get_piece_size()
    self.bos_id = processor.bos_id()
    self.eos_id = processor.eos_id()
    # Some public models (Llama 2) define no pad piece (-1); rows are padded with 0 and masked.
    self.pad_id = max(processor.pad_id(), 0)

  @classmethod
  def load(cls, path: str) -> 'SentencePieceTokenizer':
    """Reads a sentencepiece .model file (local or gs://); DataError naming `path` if it is
    missing or corrupt."""
    remote = files.is_remote(path)
    is_file = (files.exists(path) and not files.isdir(path)) if remote else os.path.isfile(path)
    if not is_file:
      raise DataError(f"tokenizer {path} does not exist; pass a sentencepiece .model file.")
    sp = spm.SentencePieceProcessor()
    try:
      if remote:  # sentencepiece opens only local files; the model is a few MB at most
        sp.load_from_serialized_proto(files.read_bytes(path))
      else:
        sp.load(path)
    except (OSError, RuntimeError) as e:
      raise DataError(f"tokenizer {path} is not a valid sentencepiece model ({e}).") from None
    if sp.bos_id() < 0 or sp.eos_id() < 0:
      raise DataError(f"tokenizer {path} defines no BOS/EOS piece; the pipeline needs both:"
                      " retrain it with bos_id and eos_id set.")
    return cls(sp, path)

  @classmethod
  def train(cls, texts: Iterable[str], path: str, vocab_size: int,
            model_type: str = 'bpe', max_sentences: int = 300_000) -> 'SentencePieceTokenizer':
    """Trains on `texts` (documents) and writes the model to `path` (local or gs://) atomically.

    Normalisation is the identity and no dummy prefix/whitespace folding is applied, so
    decode(encode(x)) == x for any string; byte fallback covers characters never seen in
    training (Chinese, emoji) with the 256 byte pieces. At most `max_sentences` lines, a
    seeded uniform sample, are used, so training time is bounded on big corpora and the same
    texts always give the same model (every host of a pod trains an identical one).
    """
    if model_type not in ('bpe', 'unigram'):
      raise DataError(f"data.tokenizer_type='{model_type}' is not 'bpe' or 'unigram'.")
    # Sentencepiece trains on lines: a newline is never inside a piece, it becomes byte <0x0A>.
    # It also skips lines over 4192 bytes, so long ones are cut (1,000 chars <= 4,000 bytes).
    lines = [line[i:i + 1000] for doc in texts for line in doc.split('\n') if line.strip()
             for i in range(0, len(line), 1000)]
    if not lines:
      raise DataError("cannot train a tokenizer on an empty corpus; check data.path.")
    if len(lines) > max_sentences:
      # Sampled here, not by sentencepiece's input_sentence_size: its sample differs from run
      # to run even with a fixed seed.
      keep = sorted(random.Random(0).sample(range(len(lines)), max_sentences))
      lines = [lines[i] for i in keep]
    model = io.BytesIO()
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
          model_type=model_type, byte_fallback=True, character_coverage=1.0,
          normalization_rule_name='identity', add_dummy_prefix=False,
          remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
          pad_id=cls.PAD, unk_id=cls.UNK, bos_id=cls.BOS, eos_id=cls.EOS,
          # A small corpus cannot fill a large vocabulary; a soft limit gives fewer pieces
          # instead of an error (the model only needs vocab_size >= tokenizer.vocab_size).
          hard_vocab_limit=False, num_threads=2, minloglevel=2)
    except RuntimeError as e:
      reason = str(e).split('] ')[-1]
      raise DataError(f"training a {vocab_size}-piece tokenizer failed: {reason} (byte fallback"
                      " alone takes 256 pieces): raise data.vocab_size.") from None
    # Atomic (a crash never leaves a half-written tokenizer behind); `path` may be gs://.
    files.write_bytes(path, model.getvalue())
    return cls.load(path)

  def encode(self, text: str) -> list[int]:
    return self.sp.encode(text, out_type=int)

  def decode(self, ids: Iterable[int]) -> str:
    # Ids past the pieces are dropped, as Hugging Face tokenizers do: a model's vocab_size may
    # exceed the tokenizer's (a soft-limit trained one, a padded head) and sample them.
    return self.sp.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

  def special_text(self, i: int) -> str:
    return self.sp.id_to_piece(i)  # decode drops control pieces such as <s>

  # Grain worker processes receive the tokenizer by pickling; the processor itself is a C++
  # object, so it travels as its serialized model.
  def __getstate__(self):
    return {'proto': self.sp.serialized_model_proto(), 'path': self.path}

  def __setstate__(self, state):
    sp = spm.SentencePieceProcessor()
    sp.load_from_serialized_proto(state['proto'])
    self.__init__(sp, state['path'])


class CharTokenizer(Tokenizer):
  """Characters as tokens (data.tokenizer_type='char'): id 0 is padding, then the sorted set of
  the characters of the training text, as nanoGPT's shakespeare_char prepares it.

  No BOS or EOS (bos_id = eos_id = -1): a character LM reads one continuous text, and the
  pipeline then puts nothing between documents (segment ids still separate packed ones), as
  for checkpoints without BOS (Qwen2). Encoding a character the training text never had
  raises DataError naming it (there is no unk id: a model could not have learned one); decode
  drops padding and ids past the vocabulary.

  Stored as JSON {"type": "char", "chars": "..."} (CHAR_TOKENIZER_FILE in a workdir).
  """

  PAD = 0

  def __init__(self, chars: str, path: str = ''):
    self.chars, self.path = chars, path
    self.vocab_size = len(chars) + 1
    self.bos_id = self.eos_id = -1
    self.pad_id = self.PAD
    self._ids = {c: i for i, c in enumerate(chars, 1)}

  @classmethod
  def train(cls, texts: Iterable[str], path: str) -> 'CharTokenizer':
    """The characters of `texts`, sorted, written to `path` (local or gs://) atomically."""
    chars = set()
    for text in texts:
      chars.update(text)
    if not chars:
      raise DataError("cannot build a char tokenizer from an empty corpus; check data.path.")
    tokenizer = cls(''.join(sorted(chars)), path)
    files.write_text(path, json.dumps({'type': 'char', 'chars': tokenizer.chars}))
    return tokenizer

  @classmethod
  def load(cls, path: str) -> 'CharTokenizer':
    """Reads a char tokenizer's JSON file; DataError naming `path` if missing or not one."""
    if not files.exists(path):
      raise DataError(f"tokenizer {path} does not exist; pass a char tokenizer .json file.")
    try:
      d = json.loads(files.read_text(path))
      chars = d['chars'] if d.get('type') == 'char' else None
    except (ValueError, AttributeError, KeyError):
      chars = None
    if not isinstance(chars, str) or len(set(chars)) != len(chars):
      raise DataError(f"tokenizer {path} is not a char tokenizer file (JSON {{\"type\": \"char\","
                      " \"chars\": ...}} with distinct characters).")
    return cls(chars, path)

  def encode(self, text: str) -> list[int]:
    try:
      return [self._ids[c] for c in text]
    except KeyError as e:
      c = e.args[0]
      raise DataError(f"character {c!r} (U+{ord(c):04X}) is not in the char tokenizer"
                      f" {self.path or ''} (it has the {len(self.chars)} characters of the"
                      " training text); remove it from the text or build the tokenizer on a"
                      " text that has it.") from None

  def decode(self, ids: Iterable[int]) -> str:
    n = len(self.chars)
    return ''.join(self.chars[i - 1] for i in map(int, ids) if 1 <= i <= n)

  def special_text(self, i: int) -> str:
    return ''  # padding is the only special id, and has no text


# data.tokenizer_type values: the sentencepiece model types, and characters.
TOKENIZER_TYPES = ('bpe', 'unigram', 'char')
CHAR_TOKENIZER_FILE = 'char_tokenizer.json'  # a char tokenizer in a workdir


def load_file(path: str) -> Tokenizer:
  """A tokenizer file: a char tokenizer's .json, else a sentencepiece .model."""
  if path.endswith('.json'):
    return CharTokenizer.load(path)
  return SentencePieceTokenizer.load(path)
