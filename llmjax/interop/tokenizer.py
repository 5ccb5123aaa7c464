"""Hugging Face tokenizers behind llmjax's `Tokenizer` interface (`llmjax.data.tokenizer`).

A checkpoint directory carries either `tokenizer.json` (the `tokenizers` library) or a
sentencepiece `tokenizer.model`; its special tokens are named in `tokenizer_config.json` and
`special_tokens_map.json` (as strings) and in `generation_config.json`/`config.json` (as ids).
The first that names a token wins, in that order. `encode` adds no BOS/EOS, as everywhere in
llmjax; the chat template (Jinja source, rendered by the data code) is the `chat_template`
attribute.

Export: a bare sentencepiece model (an llmjax run's own WORKDIR/tokenizer.model) gets the
files transformers and vLLM read written beside it (`write_sentencepiece_hf_files`): a
tokenizer.json that tokenizes exactly as sentencepiece does, tokenizer_config.json and
special_tokens_map.json.
"""

import json
import os
from typing import Iterable

import sentencepiece as spm
import tokenizers

from llmjax.data.tokenizer import SentencePieceTokenizer, Tokenizer
from llmjax.errors import CheckpointError

# Files `save_hf`/`convert` copy along with the weights.
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer.model', 'tokenizer_config.json',
                   'special_tokens_map.json', 'chat_template.jinja', 'chat_template.json',
                   'generation_config.json')
# What loading a tokenizer reads: config.json too, as `special_ids` falls back to its bos/eos.
TOKENIZER_READ_FILES = TOKENIZER_FILES + ('config.json',)


def _json(hf_dir: str, name: str) -> dict:
  path = os.path.join(hf_dir, name)
  if not os.path.exists(path):
    return {}
  try:
    with open(path) as f:
      out = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path} is not valid JSON ({e}); download it again.") from None
  if not isinstance(out, dict):
    raise CheckpointError(f"{path} holds a JSON {type(out).__name__}, not an object; download"
                          " it again.")
  return out


def _token_string(value) -> str | None:
  """tokenizer_config.json writes a token as 'text' or as an AddedToken dict."""
  if isinstance(value, dict):
    return value.get('content')
  return value if isinstance(value, str) else None


def _first_id(value) -> int | None:
  if isinstance(value, list):  # generation_config: several stop ids (Llama 3 instruct)
    return value[0] if value else None
  return value if isinstance(value, int) else None


def special_ids(hf_dir: str, token_to_id) -> dict[str, int | None]:
  """{'bos': id, 'eos': id, 'pad': id, 'eos_ids': [ids]}; None where the checkpoint names none."""
  tok_config = _json(hf_dir, 'tokenizer_config.json')
  tok_map = _json(hf_dir, 'special_tokens_map.json')
  gen = _json(hf_dir, 'generation_config.json')
  model = _json(hf_dir, 'config.json')
  out = {}
  for kind in ('bos', 'eos', 'pad'):
    found = None
    for source in (tok_config, tok_map):
      text = _token_string(source.get(f'{kind}_token'))
      if text is not None and token_to_id(text) is not None:
        found = token_to_id(text)
        break
    for source in (gen, model):
      if found is None:
        found = _first_id(source.get(f'{kind}_token_id'))
    out[kind] = found
  eos_ids = gen.get('eos_token_id', model.get('eos_token_id'))
  eos_ids = eos_ids if isinstance(eos_ids, list) else [eos_ids] if eos_ids is not None else []
  out['eos_ids'] = sorted({i for i in [out['eos'], *eos_ids] if i is not None})
  return out


def chat_template(hf_dir: str) -> str | None:
  """The default chat template: chat_template.jinja, chat_template.json or tokenizer_config."""
  path = os.path.join(hf_dir, 'chat_template.jinja')
  if os.path.exists(path):
    with open(path) as f:
      return f.read()
  template = (_json(hf_dir, 'chat_template.json').get('chat_template')
              or _json(hf_dir, 'tokenizer_config.json').get('chat_template'))
  if isinstance(template, list):  # [{'name': 'default', 'template': ...}, {'name': 'tool_use', ...}]
    named = {t.get('name'): t.get('template') for t in template if isinstance(t, dict)}
    template = named.get('default') or next(iter(named.values()), None)
  return template


class HFTokenizer(Tokenizer):
  """A `tokenizer.json` tokenizer with the checkpoint's special tokens.

  Attributes beyond `Tokenizer`: eos_ids (every stop id of generation_config), chat_template.
  Absent bos/eos are -1; pad falls back to eos (then 0): padded positions are masked anyway.
  """

  def __init__(self, tok: tokenizers.Tokenizer, special: dict, template: str | None):
    self.tok = tok
    self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
    _set_special(self, special)
    self.chat_template = template

  def encode(self, text: str) -> list[int]:
    return self.tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Iterable[int]) -> str:
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def special_text(self, i: int) -> str:
    return self.tok.id_to_token(i)


class HFSentencePieceTokenizer(SentencePieceTokenizer):
  """A sentencepiece `tokenizer.model` (Llama 2, Mistral) with the checkpoint's special tokens."""

  def __init__(self, processor: spm.SentencePieceProcessor, path: str = '',
               special: dict | None = None, template: str | None = None):
    super().__init__(processor, path)
    # Without config files the model's own pieces decide (as in SentencePieceTokenizer).
    special = special or {'bos': None, 'eos': None, 'pad': None, 'eos_ids': []}
    _set_special(self, special, fallback=(self.bos_id, self.eos_id, self.pad_id))
    self.chat_template = template

  def __getstate__(self):
    return dict(super().__getstate__(), special=self._special, template=self.chat_template)

  def __setstate__(self, state):
    sp = spm.SentencePieceProcessor()
    sp.load_from_serialized_proto(state['proto'])
    self.__init__(sp, state['path'], state['special'], state['template'])


def _set_special(tok, special: dict, fallback=(-1, -1, 0)) -> None:
  tok._special = special
  pick = lambda v, default: default if v is None else v
  tok.bos_id = pick(special['bos'], fallback[0])
  tok.eos_id = pick(special['eos'], fallback[1])
  tok.pad_id = pick(special['pad'], tok.eos_id if tok.eos_id >= 0 else fallback[2])
  tok.eos_ids = special['eos_ids'] or ([tok.eos_id] if tok.eos_id >= 0 else [])


def load_tokenizer(hf_dir: str) -> Tokenizer | None:
  """The checkpoint's tokenizer (tokenizer.json preferred), or None when it ships none."""
  template = chat_template(hf_dir)
  path = os.path.join(hf_dir, 'tokenizer.json')
  if os.path.exists(path):
    try:
      tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
      raise CheckpointError(f"{path} could not be loaded by the tokenizers library ({e}).") from None
    return HFTokenizer(tok, special_ids(hf_dir, tok.token_to_id), template)
  path = os.path.join(hf_dir, 'tokenizer.model')
  if os.path.exists(path):
    sp = spm.SentencePieceProcessor()
    try:
      sp.load(path)
    except (OSError, RuntimeError) as e:
      raise CheckpointError(f"{path} is not a valid sentencepiece model ({e}).") from None

    def to_id(piece: str) -> int | None:  # sentencepiece maps unknown pieces to unk
      i = sp.piece_to_id(piece)
      return i if i != sp.unk_id() or piece == sp.id_to_piece(i) else None

    return HFSentencePieceTokenizer(sp, path, special_ids(hf_dir, to_id), template)
  return None


# ------------------------------------------------------------------------------ export

# sentencepiece_model.proto enums.
_SP_BPE, _SP_UNIGRAM = 2, 1
_SP_NORMAL, _SP_UNKNOWN, _SP_CONTROL, _SP_USER_DEFINED, _SP_UNUSED, _SP_BYTE = 1, 2, 3, 4, 5, 6
_SPACE = '\u2581'  # sentencepiece's visible space, '▁'


def _sp_proto(sp: spm.SentencePieceProcessor):
  from sentencepiece import sentencepiece_model_pb2
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(sp.serialized_model_proto())
  return proto


def sentencepiece_to_tokenizers(sp: spm.SentencePieceProcessor) -> tokenizers.Tokenizer | None:
  """The `tokenizers` twin of a sentencepiece model: the same ids for every string, None where
  its normalization has no exact twin (only 'identity' and the dummy prefix do).

  What a transformers `tokenizer.json` needs so that `AutoTokenizer` (and vLLM) tokenize as
  llmjax does. Like sentencepiece: no pre-tokenizer (pieces never cross a '▁' that is not
  their first character, so none is needed); ' ' becomes '▁'; characters without a piece become
  their UTF-8 byte pieces <0xNN>. A BPE model's merges are every split of a piece into two
  pieces, ranked by the merged piece's score: sentencepiece merges the adjacent pair whose union
  scores highest, `tokenizers` the pair of lowest rank, so the two pick the same pairs (the
  construction of transformers' `SentencePieceExtractor`).

  Two known differences: text that spells a control piece ('</s>') is that special token here,
  as in every transformers tokenizer (sentencepiece spells it out in bytes); and a unigram
  model's Viterbi may break ties between equally scored segmentations differently (a run of
  spaces as '▁'+'▁▁▁' or '▁▁▁'+'▁'). BPE, the default of trained tokenizers, has no such ties.
  """
  from tokenizers import AddedToken, decoders, models, normalizers
  proto = _sp_proto(sp)
  norm, trainer = proto.normalizer_spec, proto.trainer_spec
  if (norm.name not in ('identity', '') or norm.precompiled_charsmap
      or norm.remove_extra_whitespaces or not norm.escape_whitespaces
      or trainer.treat_whitespace_as_suffix
      or trainer.model_type not in (_SP_BPE, _SP_UNIGRAM)):
    return None
  pieces = list(proto.pieces)
  vocab = {p.piece: i for i, p in enumerate(pieces)}
  unk = next((i for i, p in enumerate(pieces) if p.type == _SP_UNKNOWN), None)
  byte_fallback = trainer.byte_fallback
  if trainer.model_type == _SP_BPE:
    mergeable = {p.piece for p in pieces if p.type in (_SP_NORMAL, _SP_USER_DEFINED)}
    merges = []
    for i, p in enumerate(pieces):
      if p.type != _SP_NORMAL:
        continue
      splits = [(p.piece[:k], p.piece[k:]) for k in range(1, len(p.piece))
                if p.piece[:k] in mergeable and p.piece[k:] in mergeable]
      merges += [(-p.score, i, vocab[a], vocab[b], a, b) for a, b in splits]
    merges = [(a, b) for *_, a, b in sorted(merges)]
    model = models.BPE(vocab=vocab, merges=merges, unk_token=pieces[unk].piece if unk is not None
                       else None, byte_fallback=byte_fallback, fuse_unk=True)
  else:
    # Only normal and user pieces are matched in text; the others must never win Viterbi.
    floor = min(p.score for p in pieces if p.type == _SP_NORMAL) - 1e4
    scores = [(p.piece, p.score if p.type in (_SP_NORMAL, _SP_USER_DEFINED) else floor)
              for p in pieces]
    model = models.Unigram(scores, unk_id=unk, byte_fallback=byte_fallback)
  tok = tokenizers.Tokenizer(model)
  steps = [normalizers.Prepend(_SPACE)] if norm.add_dummy_prefix else []
  tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(' ', _SPACE)])
  tok.pre_tokenizer = None
  strip = [decoders.Strip(' ', 1, 0)] if norm.add_dummy_prefix else []
  tok.decoder = decoders.Sequence([decoders.Replace(_SPACE, ' '), decoders.ByteFallback(),
                                   decoders.Fuse()] + strip)
  # Control pieces (<s>, </s>, <pad>) and <unk> are special: never produced from text by the
  # model, skipped by decode(skip_special_tokens=True) as sentencepiece's decode skips them.
  tok.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                          for p in pieces if p.type in (_SP_CONTROL, _SP_UNKNOWN)])
  user = [AddedToken(p.piece, special=False, normalized=False)
          for p in pieces if p.type == _SP_USER_DEFINED]
  if user:
    tok.add_tokens(user)
  return tok


def write_sentencepiece_hf_files(tokenizer: SentencePieceTokenizer, hf_dir: str,
                                 model_max_length: int) -> list[str]:
  """Writes what `AutoTokenizer.from_pretrained(hf_dir)` needs next to `tokenizer.model`:
  tokenizer.json (`sentencepiece_to_tokenizers`), tokenizer_config.json and
  special_tokens_map.json naming bos/eos/pad/unk. Returns the names written.

  `AutoTokenizer(text)` puts BOS first (the tokenizer.json post-processor), as llmjax's pipeline
  and sampler do; EOS is left to generation (generation_config.json's eos_token_id).
  """
  from tokenizers import processors
  sp = tokenizer.sp
  piece = lambda i: sp.id_to_piece(i) if 0 <= i < sp.get_piece_size() else None
  special = {'bos_token': piece(tokenizer.bos_id), 'eos_token': piece(tokenizer.eos_id),
             'unk_token': piece(sp.unk_id()),
             'pad_token': piece(sp.pad_id()) if sp.pad_id() >= 0 else piece(tokenizer.pad_id)}
  special = {k: v for k, v in special.items() if v is not None}
  written = []
  tok = sentencepiece_to_tokenizers(sp)
  if tok is not None:
    if 'bos_token' in special:
      bos = special['bos_token']
      tok.post_processor = processors.TemplateProcessing(
          single=f'{bos} $A', pair=f'{bos} $A {bos} $B', special_tokens=[(bos, tokenizer.bos_id)])
    tok.save(os.path.join(hf_dir, 'tokenizer.json'))
    written.append('tokenizer.json')
  config = dict(
      # PreTrainedTokenizerFast reads tokenizer.json as written (LlamaTokenizer would rebuild
      # its own normalizer, with a dummy prefix this model may not have).
      tokenizer_class='PreTrainedTokenizerFast', **special,
      add_bos_token='bos_token' in special, add_eos_token=False,
      clean_up_tokenization_spaces=False, model_max_length=model_max_length)
  for name, content in (('tokenizer_config.json', config), ('special_tokens_map.json', special)):
    with open(os.path.join(hf_dir, name), 'w') as f:
      json.dump(content, f, indent=2, ensure_ascii=False)
    written.append(name)
  return written
