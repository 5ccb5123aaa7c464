"""Preference data (data.format='preference' and 'unpaired_preference'): tokenized as TRL 1.16's
DPOTrainer and KTOTrainer tokenize it, batched as rows of whole pairs.

Tokenization (TRL's `_prepare_dataset` of dpo_trainer.py / kto_trainer.py, with
`trl.data_utils._tokenize` and `common_prefix_length`):
  plain text     prompt_ids = tokenizer(prompt), prompt_chosen_ids = tokenizer(prompt + chosen +
                 eos_text), the EOS text appended only when chosen does not already end with
                 it. `tokenizer(text)` adds the tokenizer's own special tokens
                 (add_special_tokens=True): for a Hugging Face tokenizer.json exactly what its
                 post-processor adds (Llama 3: <|begin_of_text|>; Qwen2 and a tokenizer.json
                 without a post-processor: nothing), for a sentencepiece model (the project's,
                 Llama 2's) BOS. prompt + chosen is one string, tokenized as a whole.
  conversations  prompt_ids = apply_chat_template(prompt, add_generation_prompt=True),
                 prompt_chosen_ids = apply_chat_template(prompt + chosen): the run's chat
                 template renders them, and the rendering is tokenized with no special token
                 added (BOS only where the template writes it, unlike data.format='messages';
                 no EOS appended: the template's end-of-turn token ends the completion).
  the split      the completion starts where the tokenized prompt and prompt + completion
                 diverge: prompt_len = min(common prefix with prompt_chosen_ids, with
                 prompt_rejected_ids); chosen_ids = prompt_chosen_ids[prompt_len:], ...
  KTO            the same for (prompt, completion), with one completion.
An implicit-prompt record is split by `sources.extract_prompt` first (TRL's extract_prompt).

Truncation, as TRL's max_length with truncation_mode='keep_start': every sequence (prompt +
completion) is cut to max_length = data.seq_len // 2 tokens, so that both halves of a pair always
fit one row; a pair whose prompt alone has >= max_length tokens is skipped (TRL drops it too).
A TRL run compares with DPOConfig(max_length=seq_len // 2).

Skipped, counted and logged ("12 pairs skipped: 10 chosen equals rejected, 2 ... (validation
split)") after a pass over the data, never trained on with an empty loss: a pair whose chosen
equals rejected (as records, or once tokenized), an empty completion (a blank string, or
messages whose contents are all blank), a prompt that leaves no room (above).

Rows (the contract of issue 12): a row holds P = data.pairs_per_row whole pairs; pair k is
segment 2k+1 (prompt + chosen) and segment 2k+2 (prompt + rejected), positions restarting at 0
in each segment. Unlike the SFT rows, a segment's inputs hold its whole sequence: its last
position's input is the sequence's last token (the EOS after prompt + completion), where a
reward head reads, and that position's target is 0 with loss_mask 0. Elsewhere targets[t] is
the next token of the same segment and loss_mask[t] its weight: 1 on completion tokens (EOS
included), 0 on prompt tokens and padding. A sequence of n tokens takes n positions, so a pair
takes len(chosen seq) + len(rejected seq) <= seq_len.
  pair_mask  float32 [P]: 1 where the row holds pair k.
  margin     float32 [P]: the record's `margin` (0 when absent), for 'preference'.
  label      float32 [P]: 1 desirable, 0 undesirable, for 'unpaired_preference', where segment
             2k+2 is example k's KL counterpart: its prompt with the completion of the example
             before it in its group (the first one takes the last's), TRL's KTO rotation
             `[completion_ids[-1]] + completion_ids[:-1]` over each batch of
             per_device_train_batch_size examples; a group here is one host's batch of
             (batch_size // hosts) * P examples in stream order.
  ref_logps  float32 [2P], with dpo.precompute_ref: the reference model's summed log-probs of
             each segment's completion (`llmjax.train.reference`), looked up by the pair's
             record index in a table [records, 2] computed before training.
pairs_per_row=1 gives one pair per row in stream order (what TRL batches); > 1 packs whole pairs
first fit into rows of seq_len (a pair never split, so never across micro-batches).
"""

import functools
import logging

import grain
import grain.experimental as gx
import numpy as np

from llmjax.data import sources
from llmjax.data.chat import ChatTemplate, encode_with_specials
from llmjax.data.tokenizer import Tokenizer
from llmjax.errors import ConfigError, DataError

_log = logging.getLogger(__name__)

# Why a pair is skipped, in the order checked, as the log line says it.
SKIP_REASONS = {
    'identical': 'chosen equals rejected',
    'empty': 'an empty completion',
    'no_room': 'the prompt leaves no room for the completion',
}


def common_prefix_length(a, b) -> int:
  """Number of leading tokens `a` and `b` share (TRL's common_prefix_length)."""
  n = 0
  for x, y in zip(a, b):
    if x != y:
      break
    n += 1
  return n


def max_length(seq_len: int) -> int:
  """The tokens each sequence of a pair may have: half a row (TRL's max_length)."""
  return seq_len // 2


def _blank(text) -> bool:
  if isinstance(text, tuple):
    return all(not m['content'].strip() for m in text)
  return not text.strip()


class PreferenceTokenizer:
  """Token ids as TRL tokenizes preference records, for the run's tokenizer and template."""

  def __init__(self, tokenizer: Tokenizer, chat_template: ChatTemplate | None = None):
    self.tokenizer, self.chat_template = tokenizer, chat_template
    from llmjax.interop.tokenizer import HFTokenizer  # here: interop imports the data package
    self._hf = tokenizer.tok if isinstance(tokenizer, HFTokenizer) else None
    t = tokenizer
    self.eos_text = t.special_text(t.eos_id) if t.eos_id >= 0 else ''
    # A sentencepiece model encodes '</s>' as characters: its special texts are split out.
    self._specials = {s: i for s, i in (
        (t.special_text(t.bos_id) if t.bos_id >= 0 else '', t.bos_id), (self.eos_text, t.eos_id))
        if s}

  def __getstate__(self):  # picklable for Grain workers: the HF tokenizer is found again
    return {'tokenizer': self.tokenizer, 'chat_template': self.chat_template}

  def __setstate__(self, state):
    self.__init__(state['tokenizer'], state['chat_template'])

  def plain(self, text: str) -> list[int]:
    """`tokenizer(text)['input_ids']`: the text with the tokenizer's own special tokens."""
    if self._hf is not None:
      return self._hf.encode(text, add_special_tokens=True).ids
    bos = self.tokenizer.bos_id
    return ([bos] if bos >= 0 else []) + encode_with_specials(self.tokenizer, self._specials, text)

  def plain_with_eos(self, prompt: str, completion: str) -> list[int]:
    """tokenizer(prompt + completion + eos_text), the EOS text added only when missing."""
    if self._hf is not None:
      if self.eos_text and not completion.endswith(self.eos_text):
        completion += self.eos_text
      return self.plain(prompt + completion)
    ids, eos = self.plain(prompt + completion), self.tokenizer.eos_id
    return ids + [eos] if eos >= 0 and ids[-1:] != [eos] else ids

  def chat(self, messages, where: str, add_generation_prompt: bool = False) -> list[int]:
    if self.chat_template is None:
      raise ConfigError(f"{where}: a conversational preference record needs a chat template;"
                        " set data.chat_template (e.g. 'chatml') or use a tokenizer that ships"
                        " one (an HF checkpoint dir).")
    text = self.chat_template.render(messages, add_generation_prompt, where=where)
    return self.chat_template.encode(text)

  def split(self, prompt, completions, where: str) -> tuple[list[int], list[list[int]]]:
    """(prompt_ids, [completion_ids, ...]) of one prompt and its completions, as TRL splits
    them: each completion starts where the tokenized prompt and prompt + completion diverge,
    the same place for all (the least common prefix)."""
    if isinstance(prompt, tuple):
      prompt_ids = self.chat(prompt, where, add_generation_prompt=True)
      full = [self.chat(prompt + c, where) for c in completions]
    else:
      prompt_ids = self.plain(prompt)
      full = [self.plain_with_eos(prompt, c) for c in completions]
    n = min(common_prefix_length(prompt_ids, f) for f in full)
    return prompt_ids[:n], [f[n:] for f in full]


class TokenizedExample(dict):
  """{'prompt': ids, 'completions': [ids, ...], 'value': margin or label, 'position': int,
  'index': int, ['ref': (chosen, rejected) reference log-probs]} or, for a skipped example,
  {'skip': reason, 'position': int, 'index': int}. position: in the (shuffled, repeated)
  stream; index: the record's in the source."""


class _Indexed:
  """source[i] -> (i, source[i]): the record index travels with the record through shuffling."""

  def __init__(self, source):
    self.source = source

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    return int(i), self.source[i]


class _TokenizePreference(grain.transforms.MapWithIndex):
  """(position, (index, PreferencePair | UnpairedExample)) -> TokenizedExample (a class, not a
  lambda, so Grain workers can pickle it). ref_logps: the precomputed reference table
  [records, 2] or None."""

  def __init__(self, enc: PreferenceTokenizer, seq_len: int, ref_logps=None, where: str = ''):
    self.enc, self.seq_len, self.ref_logps, self.where = enc, seq_len, ref_logps, where

  def map_with_index(self, position: int, indexed) -> dict:
    index, example = indexed
    out = dict(tokenize_example(example, self.enc, self.seq_len), position=position, index=index)
    if self.ref_logps is not None and 'skip' not in out:
      ref = self.ref_logps[index]
      if not np.all(np.isfinite(ref)):
        raise DataError(f"{example.where or f'record {index}'}{self.where}: the precomputed"
                        " reference log-probs have no entry for this pair; delete the workdir's"
                        " reference_logps/ directory to compute them again.")
      out['ref'] = (float(ref[0]), float(ref[1]))
    return out


def tokenize_example(example, enc: PreferenceTokenizer, seq_len: int) -> dict:
  """A pair or unpaired example -> {'prompt', 'completions', 'value'} token lists (untruncated),
  or {'skip': reason} (a key of SKIP_REASONS)."""
  where = example.where or 'a preference record'
  if isinstance(example, sources.PreferencePair):
    completions, value = (example.chosen, example.rejected), example.margin
    if any(_blank(c) for c in completions):
      return {'skip': 'empty'}
    if example.chosen == example.rejected:
      return {'skip': 'identical'}
  elif isinstance(example, sources.UnpairedExample):
    completions, value = (example.completion,), float(example.label)
    if _blank(example.completion):
      return {'skip': 'empty'}
  else:
    raise DataError(f"{where}: a {type(example).__name__} is not a preference example.")
  prompt_ids, ids = enc.split(example.prompt, completions, where)
  if not all(ids):
    return {'skip': 'empty'}
  if len(ids) == 2 and ids[0] == ids[1]:
    return {'skip': 'identical'}
  if len(prompt_ids) >= max_length(seq_len):
    return {'skip': 'no_room'}
  return {'prompt': prompt_ids, 'completions': ids, 'value': float(value)}


class SkippedPairs:
  """Counts the pairs (or unpaired examples) skipped, per reason, and logs them once per run,
  when a pass over this host's data completes: the bookkeeping of
  `llmjax.data.pipeline.DroppedExamples` (positions in stream order; a jump restarts the tally;
  only a pass seen whole sets `count`).

  Attributes:
    count: pairs skipped in one whole pass; None until a pass has been observed whole.
    reasons: {reason: count} of that pass.
  """

  def __init__(self, seq_len: int, num_documents: int, where: str = '', what: str = 'pairs'):
    self.seq_len, self.num_documents, self.where, self.what = seq_len, num_documents, where, what
    self.count, self.reasons = None, {}
    self._so_far, self._last, self._whole, self._noticed, self._in_a_row = {}, -1, False, False, 0

  def _suffix(self) -> str:
    return f' ({self.where})' if self.where else ''

  def message(self, reasons: dict) -> str:
    said = ', '.join(f'{n} {SKIP_REASONS[r]}' for r, n in reasons.items() if n)
    if reasons.get('no_room'):
      said += (f' (each sequence gets seq_len // 2 = {max_length(self.seq_len)} tokens: raise'
               ' data.seq_len)')
    return f'{sum(reasons.values())} {self.what} skipped: {said}{self._suffix()}'

  def observe(self, position: int, reason: str | None) -> None:
    if position == self._last:
      return
    n = self.num_documents
    if position != self._last + 1:
      self._in_a_row = 0
    if position != self._last + 1 or position % n == 0:
      self._so_far, self._whole = {}, position % n == 0
    self._last = position
    self._in_a_row = self._in_a_row + 1 if reason else 0
    if self._in_a_row >= n:
      raise DataError(f"all {n} {self.what}{self._suffix()} were skipped (the last:"
                      f" {SKIP_REASONS[reason]}); fix the data or raise data.seq_len.")
    if reason:
      self._so_far[reason] = self._so_far.get(reason, 0) + 1
      if not self._noticed:
        self._noticed = True
        _log.warning(f"a preference example was skipped: {SKIP_REASONS[reason]}"
                     f"{self._suffix()}; the count follows after a pass over the data.")
    if position % n == n - 1 and self._whole:
      first = self.count is None
      self.reasons, self.count = dict(self._so_far), sum(self._so_far.values())
      if first and self.count:
        _log.warning(self.message(self.reasons))


class _Keep(grain.transforms.Filter):
  """Drops skipped examples, counting them in stream order (the filter runs in order)."""

  def __init__(self, skipped: SkippedPairs):
    self.skipped = skipped

  def filter(self, example: dict) -> bool:
    reason = example.get('skip')
    self.skipped.observe(int(example['position']), reason)
    return reason is None


def _rotate(group: list[dict]) -> list[dict]:
  """KTO's KL counterparts: example i of the group gets example i - 1's completion (the first
  the last's), as TRL's add_kl_completion_ids; each then holds [completion, KL completion]."""
  kl = [group[-1]] + group[:-1]
  return [dict(e, completions=[e['completions'][0], k['completions'][0]])
          for e, k in zip(group, kl)]


class _Ungroup(gx.FlatMapTransform):
  max_fan_out = 1 << 30

  def flat_map(self, group):
    return _rotate(list(group))


def pair_element(example: dict, seq_len: int) -> dict:
  """A tokenized pair (or example + KL counterpart) -> the arrays of its two segments, each
  [len(seq_1) + len(seq_2)]: inputs, targets, loss_mask, half (1 first segment, 2 second),
  pos (position in its segment), value (margin/label on every token), and with a precomputed
  reference `ref` (each segment's reference log-prob on its tokens)."""
  L = max_length(seq_len)
  out = {k: [] for k in ('inputs', 'targets', 'loss_mask', 'half', 'pos')}
  for half, completion in enumerate(example['completions'], 1):
    ids = (example['prompt'] + completion)[:L]
    weights = ([0.0] * len(example['prompt']) + [1.0] * len(completion))[:L]
    out['inputs'] += ids
    out['targets'] += ids[1:] + [0]  # the last token predicts nothing in this sequence
    out['loss_mask'] += weights[1:] + [0.0]
    out['half'] += [half] * len(ids)
    out['pos'] += list(range(len(ids)))
  n = len(out['inputs'])
  arrays = {k: np.asarray(v, np.float32 if k == 'loss_mask' else np.int32) for k, v in out.items()}
  arrays['value'] = np.full(n, example['value'], np.float32)
  if 'ref' in example:
    arrays['ref'] = np.where(arrays['half'] == 1, *example['ref']).astype(np.float32)
  return arrays


def _pad(element: dict, seq_len: int) -> dict:
  """One pair alone in a row: the packed layout FirstFitPack would give it."""
  n = len(element['inputs'])
  out = {k: np.pad(v, (0, seq_len - n)) for k, v in element.items()}
  out['inputs_segment_ids'] = np.pad(np.ones(n, np.int32), (0, seq_len - n))
  return out


def finish_row(row: dict, pairs_per_row: int, value_key: str) -> dict:
  """A packed row of pair elements -> the batch keys of the module docstring, each [seq_len]
  or [pairs_per_row]."""
  pair = row['inputs_segment_ids'].astype(np.int32)  # 1..P per pair, 0 = padding
  real = pair > 0
  segment_ids = np.where(real, 2 * (pair - 1) + row['half'], 0).astype(np.int32)
  pair_mask = np.zeros(pairs_per_row, np.float32)
  value = np.zeros(pairs_per_row, np.float32)
  ref = np.zeros(2 * pairs_per_row, np.float32)
  for k in range(pairs_per_row):
    idx = np.flatnonzero(pair == k + 1)
    if idx.size:
      pair_mask[k], value[k] = 1.0, row['value'][idx[0]]
      if 'ref' in row:
        for half in (1, 2):
          ref[2 * k + half - 1] = row['ref'][idx[row['half'][idx] == half][0]]
  extra = {'ref_logps': ref} if 'ref' in row else {}
  return {**extra, 'inputs': np.where(real, row['inputs'], 0).astype(np.int32),
          'targets': np.where(real, row['targets'], 0).astype(np.int32),
          'segment_ids': segment_ids,
          'positions': np.where(real, row['pos'], 0).astype(np.int32),
          'loss_mask': np.where(real, row['loss_mask'], 0).astype(np.float32),
          'pair_mask': pair_mask, value_key: value}


def make_preference_dataset(source, tokenizer: Tokenizer, *, seq_len: int, batch_size: int,
                            seed: int, shuffle: bool = True, repeat: bool = True,
                            process_index: int = 0, process_count: int = 1,
                            chat_template: ChatTemplate | None = None, pairs_per_row: int = 1,
                            where: str = '', ref_logps=None) -> grain.IterDataset:
  """Batches of `source`'s pairs (`sources.PreferencePair`) or unpaired examples
  (`sources.UnpairedExample`) for this host, as `llmjax.data.pipeline.make_dataset` (same
  arguments, sharding and shuffling) with the rows of the module docstring.

  Returns:
    An IterDataset of dicts {inputs, targets, segment_ids, positions, loss_mask} [B, seq_len]
    and {pair_mask, margin} (paired) or {pair_mask, label} (unpaired) [B, pairs_per_row],
    B = batch_size // process_count; its `skipped_pairs` attribute is the `SkippedPairs`
    counting this host's skipped examples. ref_logps: a table [len(source), 2] of the
    reference's log-probs by record index (`llmjax.train.reference`) adds `ref_logps`
    [B, 2P].
  """
  if not isinstance(pairs_per_row, int) or pairs_per_row < 1:
    raise ConfigError(f"data.pairs_per_row={pairs_per_row!r} must be an integer >= 1.")
  if max_length(seq_len) < 2:
    raise ConfigError(f"data.seq_len={seq_len} leaves no room for a pair (each sequence gets"
                      " seq_len // 2 tokens); raise data.seq_len.")
  if len(source) < process_count:
    raise DataError(f"{len(source)} examples cannot be shared by {process_count} hosts; add"
                    " examples.")
  unpaired = isinstance(source[0], sources.UnpairedExample)
  if ref_logps is not None and np.shape(ref_logps) != (len(source), 2):
    raise DataError(f"the reference log-probs table has shape {np.shape(ref_logps)}, not"
                    f" ({len(source)}, 2) for {len(source)} records{f' ({where})' if where else ''};"
                    " delete the workdir's reference_logps/ directory to compute them again.")
  ds = grain.MapDataset.source(_Indexed(source))[process_index::process_count]
  if shuffle:
    ds = ds.shuffle(seed=seed)
  num_documents = len(ds)
  if repeat:
    ds = ds.repeat(None)
  ds = ds.map_with_index(_TokenizePreference(PreferenceTokenizer(tokenizer, chat_template),
                                             seq_len, ref_logps, f' ({where})' if where else ''))
  if process_count > 1:
    where = ', '.join(filter(None, [where, f'host {process_index} of {process_count}']))
  skipped = SkippedPairs(seq_len, num_documents, where, 'examples' if unpaired else 'pairs')
  it = ds.to_iter_dataset().filter(_Keep(skipped))
  local_batch = batch_size // process_count
  if unpaired:  # KL counterparts within each batch's examples, in stream order
    it = it.batch(local_batch * pairs_per_row, batch_fn=list)
    it = gx.FlatMapIterDataset(it, _Ungroup())
  it = it.map(functools.partial(pair_element, seq_len=seq_len))
  if pairs_per_row == 1:
    it = it.map(functools.partial(_pad, seq_len=seq_len))
  else:
    keys = ('inputs', 'targets', 'loss_mask', 'half', 'pos', 'value') + (
        ('ref',) if ref_logps is not None else ())
    it = gx.FirstFitPackIterDataset(
        it, length_struct={k: seq_len for k in keys}, num_packing_bins=max(local_batch, 16),
        seed=seed, shuffle_bins=shuffle, max_sequences_per_bin=pairs_per_row)
  value_key = 'label' if unpaired else 'margin'
  it = it.map(functools.partial(finish_row, pairs_per_row=pairs_per_row, value_key=value_key))
  it = it.batch(local_batch, drop_remainder=True)
  it.skipped_pairs = skipped
  return it


def reference_batches(source, tokenizer: Tokenizer, *, seq_len: int, batch_size: int,
                      process_index: int = 0, process_count: int = 1,
                      chat_template: ChatTemplate | None = None):
  """One pass over this host's pairs of `source` in record order, one pair per row, as the
  batches of `make_preference_dataset` (pairs_per_row=1, the rows the training pipeline makes
  of them) plus `index` int32 [B]: each row's record index, -1 on padding rows. For computing
  the reference's log-probs once (`llmjax.train.reference`); skipped pairs are left out.

  Every host yields the same number of batches, ceil(ceil(len(source) / process_count) / B),
  B = batch_size // process_count (the last ones padded), so collective steps line up.
  """
  enc = PreferenceTokenizer(tokenizer, chat_template)
  local = batch_size // process_count
  indices = range(process_index, len(source), process_count)
  num_batches = -(-(-(-len(source) // process_count)) // local)
  rows = []

  def padding_row():
    empty = {k: np.zeros(0, np.float32 if k in ('loss_mask', 'value') else np.int32)
             for k in ('inputs', 'targets', 'loss_mask', 'half', 'pos', 'value')}
    return dict(finish_row(_pad(empty, seq_len), 1, 'margin'), index=np.int32(-1))

  def flush():
    while len(rows) < local:
      rows.append(padding_row())
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    rows.clear()
    return batch

  done = 0
  for i in indices:
    example = tokenize_example(source[i], enc, seq_len)
    if 'skip' in example:
      continue
    row = finish_row(_pad(pair_element(example, seq_len), seq_len), 1, 'margin')
    rows.append(dict(row, index=np.int32(i)))
    if len(rows) == local:
      yield flush()
      done += 1
  while done < num_batches:
    yield flush()
    done += 1


def load_template(data_cfg, tokenizer: Tokenizer, train_source) -> ChatTemplate | None:
  """The chat template for conversational preference records: data.chat_template's or the
  tokenizer's (`chat.load_template`), loaded when data.chat_template is set or the first train
  record is a conversation; None for plain-text data. The first record is tokenized now, so a
  template that refuses the data fails before anything compiles."""
  from llmjax.data import chat
  first = train_source[0]
  conversational = isinstance(first.prompt, tuple)
  template = None
  if data_cfg.get('chat_template', '') or conversational:
    template = chat.load_template(data_cfg, tokenizer)
  if conversational:
    tokenize_example(first, PreferenceTokenizer(tokenizer, template), data_cfg.seq_len)
  return template
