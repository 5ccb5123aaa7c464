"""The Grain input pipeline: shard, shuffle, tokenize, split, pack, batch.

    documents --(host shard, seeded shuffle per epoch)--> [bos] + ids + [eos], weights
      --(split into pieces of <= seq_len + 1 tokens)--> {inputs, targets, weights} per piece
      --(first-fit packing into rows of seq_len)--> + segment_ids, positions
      --(batch)--> dict of [per_host_batch, seq_len] numpy arrays

Batch keys, all [batch_size // process_count, seq_len]:
  inputs, targets  int32  token ids; targets[i] is the token after inputs[i] in the same document
  segment_ids      int32  1, 2, ... for the pieces packed into the row, 0 on padding
  positions        int32  position within the piece, restarting at 0 for each
  loss_mask        float32  1 where targets[i] is trained on, 0 elsewhere: for data.format
                   'text', every real token (0 on padding only); for 'prompt_completion'
                   and 'alpaca', the completion's (output's) tokens and its eos (0 on the
                   prompt's tokens and padding); for 'messages', the tokens data.loss_on
                   names: by default every assistant turn, its end-of-turn token(s)
                   included (0 on system/user turns, role headers and padding)
A row holds several pieces, so the model must attend only within equal segment_ids; RoPE sees
each piece from position 0. A document longer than seq_len + 1 tokens is cut into pieces that
overlap by one token, so every next-token pair of it is trained exactly once (a continuation
piece starts without BOS at position 0: it trains on text without its earlier context, the
usual trade-off of fixed-length training; for SFT, a completion cut this way is trained
partly without its prompt, so choose seq_len above most examples' length).

An example whose weighted targets all lie past its first seq_len (an SFT prompt that fills a
row by itself: its answer would be trained only without its prompt, or not at all) is dropped
whole, never trained on with an empty loss, and counted: `DroppedExamples` logs "12 examples
dropped: their answers did not fit in seq_len=256" once per run, when a pass over the data
completes (and a first notice when the first one goes). A text document always fits.

A prompt/completion example is tokenized as [bos] + encode(prompt) + encode(completion) +
[eos] (the two parts encoded separately, so the boundary is a token boundary), with a weight
per token: 0 on bos and the prompt, 1 on the completion and eos. The weight belongs to the
token being predicted, so loss_mask[i] is the weight of targets[i], i.e. of token i + 1 of
the example: the prediction of the first completion token (made at the last prompt token) is
trained, the prediction of the first prompt token (made at bos) is not.

An Alpaca record (data.format='alpaca') is a prompt/completion example whose prompt is
Alpaca's template filled with its instruction and input (`sources.alpaca_prompt`) and whose
completion is its output: the same tokens and weights.

A conversation (data.format='messages') is rendered by the chat template and tokenized piece by
piece (`llmjax.data.chat.ChatTemplate.tokenize`): with data.loss_on='assistant' (the
default), weight 1 on each assistant message's text and the template's end-of-turn token(s)
after it, 0 elsewhere (the generation-prompt header '<|im_start|>assistant\n' included);
'last_assistant' keeps only the final assistant turn's; 'all' weights every token. No eos is
added (the end-of-turn token plays its part), and bos only when the template does not write
one itself.

The iterator's state (a few integers: epoch, index, packing offsets) is what the trainer
checkpoints with `grain.checkpoint.CheckpointSave(iterator)`; restoring it resumes the exact
data order.

Config keys (`config.data`, read by `build_data`):
  path            local .txt/.jsonl file or glob; '' = the embedded generated corpus
                  (`llmjax.data.corpus`). Files become a TFDS dataset under WORKDIR/tfds
                  (for a gs:// workdir: under $LLMJAX_CACHE_DIR/tfds, default
                  ~/.cache/llmjax/tfds, on each host's local disk).
  tfds_name       a TFDS catalog name instead of `path` (downloaded on first use); ''.
  format          what one document is, a value of `sources.DATA_FORMATS`: 'text'
                  (pretraining; documents from text_key), 'prompt_completion' (SFT: JSONL
                  records {"prompt": str, "completion": str}, loss on the completion only;
                  needs path), 'alpaca' (SFT: JSONL records {"instruction": str, "input":
                  str, "output": str} with Alpaca's prompt template, loss on the output
                  only; needs path) or 'messages' (chat SFT: JSONL records {"messages":
                  [{"role": "system"|"user"|"assistant", "content": str}, ...]} rendered by
                  the chat template, loss as loss_on says; needs path), 'preference'
                  (DPO / reward models: JSONL {"prompt", "chosen", "rejected"}, strings or
                  conversations, the prompt optional) or 'unpaired_preference' (KTO: JSONL
                  {"prompt", "completion", "label"}), both tokenized as TRL does and batched
                  as rows of whole pairs (`llmjax.data.preference`). Absent = 'text'.
  text_key        the JSONL field / TFDS feature holding the text ('text').
  prompt_key, completion_key  the JSONL fields of a prompt_completion record ('prompt',
                  'completion', as in TRL).
  instruction_key, input_key, output_key  the JSONL fields of an alpaca record
                  ('instruction', 'input', 'output', as in Stanford Alpaca's data).
  messages_key    the JSONL field holding a conversation's message list ('messages').
  chosen_key, rejected_key  the JSONL fields of a 'preference' record ('chosen', 'rejected';
                  its prompt is prompt_key, absent = an implicit prompt); label_key the true/
                  false field of an 'unpaired_preference' record ('label'; its prompt and
                  completion are prompt_key and completion_key). See `llmjax.data.preference`.
  pairs_per_row   for the preference formats: whole pairs per row (1 = one pair per row, as
                  TRL batches; > 1 packs pairs first fit), so train.batch_size counts rows.
  loss_on         for 'messages', what is trained on (`sources.LOSS_ON`): 'assistant' (every
                  assistant turn; the default), 'last_assistant' or 'all' (every token).
  chat_template   for 'messages': a .jinja file to render conversations with; '' = the
                  tokenizer's own (an HF checkpoint's chat_template; a tokenizer trained by
                  the run or a sentencepiece .model file has none, so it needs this key).
  seq_len         tokens per packed row.
  tokenizer_path  a sentencepiece .model to use (copied to WORKDIR/tokenizer.model so the run
                  directory is self-contained), or a Hugging Face checkpoint dir (its
                  tokenizer files copied to WORKDIR/hf_tokenizer/; init.hf_dir sets this
                  when it is ''); '' = train one on the train split into
                  WORKDIR/tokenizer.model, or reuse it there, so a restarted run gets the
                  same token ids.
  vocab_size      pieces of a trained tokenizer (a soft limit: a small corpus gives fewer).
  split           how data.path files become train and validation (`sources.SPLITS`):
                  'documents' (every 20th document held out) or 'tail' (the .txt files as one
                  text, its last val_fraction of characters held out, both cut into windows
                  of seq_len + 1 characters: `sources.tail_split_source`).
  val_fraction    for split='tail': the held-out fraction (0.1, nanoGPT's).
  tokenizer_type  'bpe' or 'unigram' for a trained sentencepiece tokenizer, 'char' for
                  characters as tokens (`tokenizer.CharTokenizer`: no BOS/EOS, an unseen
                  character is an error).
  eval_batches    batches per evaluation: the first eval_batches of the validation split,
                  the same at every evaluation so losses are comparable across steps.
"""

import functools
import logging
import os
from typing import NamedTuple

import grain
import grain.experimental as gx
import numpy as np

from llmjax import files
from llmjax.data import chat, corpus, sources
from llmjax.data.tokenizer import (CHAR_TOKENIZER_FILE, CharTokenizer, SentencePieceTokenizer,
                                   Tokenizer, load_file)
from llmjax.errors import ConfigError, DataError

# Enough documents to learn a subword vocabulary; more only slows tokenizer training.
TOKENIZER_TRAINING_DOCUMENTS = 50_000

_log = logging.getLogger(__name__)


class DroppedExamples:
  """Counts the examples `_SplitIntoPieces` drops whole (their answers did not fit in
  seq_len), and logs the count once per run, when a pass over this host's documents completes.

  It lives in the process that iterates the dataset: the pipeline's transforms run there (no
  worker processes). `observe` is called in stream order with each document's position in the
  stream (pass * num_documents + index in the pass). Grain's restore recomputes the element it
  resumes at (the same position again: not counted twice); a position that does not follow
  the last one (a new iterator, a restored checkpoint) starts the pass's tally over, and only a
  pass observed from its first document to its last sets `count`. Which examples are dropped
  depends on each example alone, so every pass drops the same ones, in a new order.

  Attributes:
    count: examples dropped in one whole pass; None until a pass has been observed whole.
    dropped_so_far: examples dropped in the pass under way, since its tally started.
  """

  def __init__(self, seq_len: int, num_documents: int, where: str = ''):
    self.seq_len, self.num_documents, self.where = seq_len, num_documents, where
    self.count, self.dropped_so_far = None, 0
    self._last, self._whole, self._noticed, self._in_a_row = -1, False, False, 0

  def _suffix(self) -> str:
    return f' ({self.where})' if self.where else ''

  def message(self, count: int) -> str:
    return (f"{count} examples dropped: their answers did not fit in seq_len={self.seq_len}"
            f"{self._suffix()}")

  def observe(self, position: int, dropped: bool) -> None:
    if position == self._last:
      return
    n = self.num_documents
    if position != self._last + 1:  # a jump: a new iterator, or one restored
      self._in_a_row = 0
    if position != self._last + 1 or position % n == 0:  # a jump, or a new pass begins
      self.dropped_so_far, self._whole = 0, position % n == 0
    self._last = position
    self._in_a_row = self._in_a_row + 1 if dropped else 0
    if self._in_a_row >= n:  # every document dropped: a repeated stream would spin forever
      raise DataError(f"all {n} examples{self._suffix()} were dropped: their answers do not"
                      f" fit in data.seq_len={self.seq_len}; raise data.seq_len or shorten the"
                      " prompts.")
    if dropped:
      self.dropped_so_far += 1
      if not self._noticed:  # a short run may never finish a pass: say so at the first one
        self._noticed = True
        _log.warning(f"an example was dropped: its answer did not fit in seq_len={self.seq_len}"
                     f"{self._suffix()}; the count follows after a pass over the data. Raise"
                     " data.seq_len or shorten the prompts.")
    if position % n == n - 1 and self._whole:
      first = self.count is None
      self.count = self.dropped_so_far
      if first and self.count:
        _log.warning(self.message(self.count))


class _Tokenize(grain.transforms.MapWithIndex):
  """(position, document) -> {tokens: [bos] + ids + [eos], weights: float32, position} as
  int32 / float32 [num_tokens]; position (the document's place in the stream) is passed on
  for `DroppedExamples`.

  weights[j] says whether predicting token j is trained on: 1 everywhere for a text document,
  0 on bos and the prompt of a `PromptCompletion`, 1 on the tokens `loss_on` names of a
  `Conversation` (tokens as its chat template renders them). A class, not a lambda, so that
  Grain worker processes can pickle it.
  """

  def __init__(self, tokenizer: Tokenizer, chat_template: chat.ChatTemplate | None = None,
               loss_on: str = 'assistant'):
    self.tokenizer, self.chat_template, self.loss_on = tokenizer, chat_template, loss_on

  def map_with_index(self, position: int, document) -> dict:
    return dict(self.map(document), position=position)

  def map(self, document: str | sources.PromptCompletion | sources.Conversation) -> dict:
    if isinstance(document, sources.Conversation):
      if self.chat_template is None:
        raise ConfigError("data.format='messages' needs a chat template; set"
                          " data.chat_template to a .jinja file.")
      tokens, weights = self.chat_template.tokenize(document, self.loss_on)
      return {'tokens': tokens, 'weights': weights}
    t = self.tokenizer
    # Some checkpoints' tokenizers have no BOS (Qwen2) or EOS (-1): then only the segment ids
    # separate documents.
    bos = [t.bos_id] if t.bos_id >= 0 else []
    eos = [t.eos_id] if t.eos_id >= 0 else []
    if isinstance(document, sources.PromptCompletion):
      prompt = bos + t.encode(document.prompt)
      rest = t.encode(document.completion) + eos  # eos is trained: the model learns to stop
    else:
      prompt, rest = bos, t.encode(document) + eos
    weights = np.concatenate([np.zeros(len(prompt), np.float32), np.ones(len(rest), np.float32)])
    return {'tokens': np.asarray(prompt + rest, np.int32), 'weights': weights}


class _SplitIntoPieces(grain.experimental.FlatMapTransform):
  """{tokens, weights, position} [n] -> pieces {inputs: p[:-1], targets: p[1:], weights: w[1:]}
  with len(p) <= seq_len + 1, where w is the weights of p's tokens; none for an example whose
  weighted targets all lie past its first piece (counted by `dropped`)."""

  max_fan_out = 1 << 30  # only MapDataset.flat_map reads it; FlatMapIterDataset has no limit

  def __init__(self, seq_len: int, dropped: DroppedExamples | None = None):
    self.seq_len, self.dropped = seq_len, dropped

  def flat_map(self, example: dict) -> list[dict]:
    n = self.seq_len
    tokens, weights = example['tokens'], example['weights']
    # A weight belongs to the token predicted, so it follows the targets: w[1:], not w[:-1].
    # An example with weighted targets but none in its first piece (an SFT prompt that fills
    # seq_len) would train its answer without its prompt, or, cut anywhere else, with an empty
    # loss: dropped whole and counted, so the user learns that seq_len is too short.
    cut = weights[1:].any() and not weights[1:n + 1].any()
    if self.dropped is not None and 'position' in example:
      self.dropped.observe(int(example['position']), bool(cut))
    if cut:
      return []
    # Consecutive pieces share one token: the last target of one is the first input of the next.
    pieces = [(tokens[s:s + n + 1], weights[s:s + n + 1]) for s in range(0, len(tokens) - 1, n)]
    # A later piece with no weighted target (the middle of a long user turn) would only cost a
    # forward and backward pass: dropped. Every kept example keeps its first piece.
    return [{'inputs': p[:-1], 'targets': p[1:], 'weights': w[1:]} for p, w in pieces
            if w[1:].any()]


def _finish_row(row: dict) -> dict:
  """Grain's packed row -> the batch keys of the module docstring, each [seq_len]."""
  segment_ids = row['inputs_segment_ids'].astype(np.int32)
  # Packing pads weights with 0, so padding is masked without a separate test on segment_ids.
  return {'inputs': row['inputs'].astype(np.int32), 'targets': row['targets'].astype(np.int32),
          'segment_ids': segment_ids, 'positions': row['inputs_positions'].astype(np.int32),
          'loss_mask': row['weights'].astype(np.float32)}


def _stack_padded(rows: int, batch: list[dict]) -> dict:
  """The rows of `batch` stacked, then zero rows (empty: segment 0, loss_mask 0) up to `rows`."""
  out = {k: np.stack([r[k] for r in batch]) for k in batch[0]}
  return {k: np.concatenate([v, np.zeros((rows - len(v),) + v.shape[1:], v.dtype)])
          for k, v in out.items()}


def make_dataset(source, tokenizer: Tokenizer, *, seq_len: int, batch_size: int, seed: int,
                 shuffle: bool = True, repeat: bool = True, process_index: int = 0,
                 process_count: int = 1, chat_template: chat.ChatTemplate | None = None,
                 loss_on: str = 'assistant', where: str = '',
                 pairs_per_row: int = 1, ref_logps=None,
                 pad_remainder: bool = False) -> grain.IterDataset:
  """Packed batches of `source`'s documents for this host.

  Args:
    source: random-access documents (`len`, `[i] -> str`, `sources.PromptCompletion` or
      `sources.Conversation`), e.g. a list or a `sources` source.
    tokenizer: adds no BOS/EOS itself; the pipeline puts them around each document.
    seq_len: tokens per row.
    batch_size: the global batch; this host yields batch_size // process_count rows.
    seed: document shuffle (a new permutation each epoch) and packed-row shuffle.
    shuffle: False keeps file order (evaluation).
    repeat: loop forever (training) or make one pass (the last partial batch is dropped,
      unless pad_remainder).
    pad_remainder: with repeat=False, the last partial batch is kept and filled up with empty
      rows (segment_ids and loss_mask 0), so a pass scores every token at one batch shape.
    process_index, process_count: this host reads documents process_index, process_index +
      process_count, ...: whole documents, disjoint across hosts.
    chat_template: renders `sources.Conversation` documents (bound to `tokenizer`).
    loss_on: data.loss_on, what of a `sources.Conversation` is trained on (`sources.LOSS_ON`).
    where: named in the dropped-examples log lines, e.g. 'validation split' ('' for train).
    pairs_per_row: data.pairs_per_row, for preference sources (`sources.PreferencePair` or
      `sources.UnpairedExample` documents): their batches are
      `llmjax.data.preference.make_preference_dataset`'s (rows of whole pairs, with pair_mask
      and margin or label; a `skipped_pairs` attribute instead of `dropped_examples`).
    ref_logps: for preference sources, the precomputed reference table [len(source), 2]
      (`make_preference_dataset`).
  Returns:
    An IterDataset of dicts {inputs, targets, segment_ids, positions, loss_mask}, each
    [batch_size // process_count, seq_len]; `iter()` of it has get_state/set_state. Its
    `dropped_examples` attribute is the `DroppedExamples` that counts this host's examples
    dropped because their answers did not fit in seq_len.
  """
  if seq_len < 1:
    raise ConfigError(f"data.seq_len={seq_len} must be at least 1.")
  if not 0 <= process_index < process_count:
    raise ConfigError(f"process_index={process_index} is not in [0, {process_count}).")
  if batch_size < process_count or batch_size % process_count:
    raise ConfigError(f"train.batch_size={batch_size} is not divisible by the {process_count}"
                      " hosts; use a multiple.")
  sources.check_loss_on(loss_on)
  if len(source) and isinstance(source[0], (sources.PreferencePair, sources.UnpairedExample)):
    from llmjax.data import preference
    return preference.make_preference_dataset(
        source, tokenizer, seq_len=seq_len, batch_size=batch_size, seed=seed, shuffle=shuffle,
        repeat=repeat, process_index=process_index, process_count=process_count,
        chat_template=chat_template, pairs_per_row=pairs_per_row, where=where,
        ref_logps=ref_logps)
  if len(source) < process_count:
    raise DataError(f"{len(source)} documents cannot be shared by {process_count} hosts; add"
                    " documents.")
  ds = grain.MapDataset.source(source)
  ds = ds[process_index::process_count]  # shard before shuffling: hosts never share documents
  if shuffle:
    ds = ds.shuffle(seed=seed)  # repeated below, it draws a new permutation every epoch
  num_documents = len(ds)
  if repeat:
    ds = ds.repeat(None)
  # map_with_index: the index is the document's position in the (repeated) stream, which
  # DroppedExamples needs to know where a pass over the data ends.
  ds = ds.map_with_index(_Tokenize(tokenizer, chat_template, loss_on))
  if process_count > 1:
    where = ', '.join(filter(None, [where, f'host {process_index} of {process_count}']))
  dropped = DroppedExamples(seq_len, num_documents, where)
  it = gx.FlatMapIterDataset(ds.to_iter_dataset(), _SplitIntoPieces(seq_len, dropped))
  local_batch = batch_size // process_count
  # First fit over >= 16 open rows fills ~93% of the tokens on the embedded corpus (best fit
  # is no better there, and slower). Shuffling the finished rows breaks up the runs of short
  # documents that first fit groups together.
  it = gx.FirstFitPackIterDataset(
      it, length_struct={'inputs': seq_len, 'targets': seq_len, 'weights': seq_len},
      num_packing_bins=max(local_batch, 16), seed=seed, shuffle_bins=shuffle)
  it = it.map(_finish_row)
  it = it.batch(local_batch, drop_remainder=not pad_remainder,
                batch_fn=functools.partial(_stack_padded, local_batch) if pad_remainder else None)
  it.dropped_examples = dropped
  return it


def get_sources(data_cfg, workdir: str) -> dict:
  """{'train', 'validation'} document sources for the configured corpus."""
  if data_cfg.path and data_cfg.tfds_name:
    raise ConfigError(f"data.path='{data_cfg.path}' and data.tfds_name='{data_cfg.tfds_name}'"
                      " are both set; set only one.")
  data_format = sources.check_data_format(data_cfg)
  if data_cfg.get('builtin_tasks', ()):
    from llmjax.data import tasks  # generated in memory: nothing to prepare on disk
    return tasks.builtin_sources(data_cfg.builtin_tasks, data_format,
                                 data_cfg.get('builtin_seed', 0),
                                 conversational=bool(data_cfg.get('chat_template', '')),
                                 weights=tuple(data_cfg.get('builtin_weights', ())))
  if data_cfg.path and data_cfg.get('split', 'documents') == 'tail':
    files.check_local('data.path', data_cfg.path)
    return sources.tail_split_source(data_cfg.path, data_cfg.get('val_fraction', 0.1),
                                     data_cfg.seq_len)
  if data_cfg.path:
    files.check_local('data.path', data_cfg.path)  # read by glob and TFDS on each host
    return sources.local_files_source(
        data_cfg.path, data_cfg.text_key, tfds_dir(workdir), data_format=data_format,
        prompt_key=data_cfg.get('prompt_key', 'prompt'),
        completion_key=data_cfg.get('completion_key', 'completion'),
        messages_key=data_cfg.get('messages_key', 'messages'),
        instruction_key=data_cfg.get('instruction_key', 'instruction'),
        input_key=data_cfg.get('input_key', 'input'),
        output_key=data_cfg.get('output_key', 'output'),
        chosen_key=data_cfg.get('chosen_key', 'chosen'),
        rejected_key=data_cfg.get('rejected_key', 'rejected'),
        label_key=data_cfg.get('label_key', 'label'))
  if data_cfg.tfds_name:
    return sources.tfds_source(data_cfg.tfds_name, data_cfg.text_key)
  return {split: sources.in_memory_source(corpus.default_corpus(split))
          for split in ('train', 'validation')}


def tfds_dir(workdir: str) -> str:
  """Where data.path files are prepared as a TFDS dataset: WORKDIR/tfds for a local workdir.

  For a gs:// workdir it is a local cache instead ($LLMJAX_CACHE_DIR/tfds, default
  ~/.cache/llmjax/tfds): preparing writes many array_record shards that the pipeline then reads
  at random, which wants a local disk, and the source files are local to each host anyway, so
  every host prepares its own copy. The prepared copy is keyed by the files' paths, sizes and
  times (`sources.local_files_source`), so runs can share the cache safely.
  """
  if not files.is_remote(workdir):
    return os.path.join(workdir, 'tfds')
  cache = os.environ.get('LLMJAX_CACHE_DIR') or os.path.expanduser('~/.cache/llmjax')
  return os.path.join(cache, 'tfds')


HF_TOKENIZER_DIR = 'hf_tokenizer'  # WORKDIR/hf_tokenizer/: a Hugging Face tokenizer's files


def build_tokenizer(data_cfg, workdir: str, train_source) -> Tokenizer:
  """The run's tokenizer, always stored in the workdir (where `generate` reads it back).

  data.tokenizer_path is copied there: a sentencepiece .model to WORKDIR/tokenizer.model, a
  char tokenizer's .json to WORKDIR/char_tokenizer.json, a Hugging Face checkpoint dir's
  tokenizer files to WORKDIR/hf_tokenizer/. Otherwise one is built there: for
  data.tokenizer_type='char', the characters of the whole train split (a set: cheap even for a
  large text); for 'bpe' / 'unigram', a sentencepiece model trained into WORKDIR/tokenizer.model
  on up to TOKENIZER_TRAINING_DOCUMENTS documents spread evenly over `train_source` (a
  prompt/completion example gives both texts: the model reads prompts too; a conversation
  gives its messages' contents, whatever their role). What the workdir holds is reused, so a
  resumed run keeps its ids.
  """
  given = data_cfg.tokenizer_path
  if given and files.isdir(given):
    return _copy_hf_tokenizer(given, workdir)
  char = given.endswith('.json') if given else data_cfg.tokenizer_type == 'char'
  path = files.join(workdir, CHAR_TOKENIZER_FILE if char else 'tokenizer.model')
  if given:
    tokenizer = load_file(given)  # validates before copying
    if not files.exists(path):
      files.copy_file(given, path)
    elif not files.same_bytes(given, path):
      raise DataError(f"{path} differs from data.tokenizer_path={given}; a run keeps its"
                      " tokenizer: use a new workdir.")
    return tokenizer
  if files.exists(path):
    return load_file(path)
  if char:
    return CharTokenizer.train((text for i in range(len(train_source))
                                for text in _texts(train_source[i])), path)
  n = len(train_source)
  stride = max(1, n // TOKENIZER_TRAINING_DOCUMENTS)
  texts = (text for i in range(0, n, stride) for text in _texts(train_source[i]))
  return SentencePieceTokenizer.train(texts, path, data_cfg.vocab_size, data_cfg.tokenizer_type)


def _texts(document: str | sources.PromptCompletion | sources.Conversation) -> tuple[str, ...]:
  """The texts a tokenizer trains on from one document."""
  if isinstance(document, sources.Conversation):
    # The contents only: the template's markup is the same few strings in every example and
    # would take vocabulary from the text (a sentencepiece model splits it into pieces anyway).
    return tuple(m['content'] for m in document.messages)
  if isinstance(document, (sources.PreferencePair, sources.UnpairedExample)):
    parts = (document[:3] if isinstance(document, sources.PreferencePair) else document[:2])
    return tuple(m['content'] if isinstance(p, tuple) else p
                 for p in parts for m in (p if isinstance(p, tuple) else (p,)))
  return tuple(document) if isinstance(document, sources.PromptCompletion) else (document,)


def _copy_hf_tokenizer(hf_dir: str, workdir: str) -> Tokenizer:
  from llmjax.interop.tokenizer import TOKENIZER_READ_FILES
  tokenizer = _load_hf_tokenizer(hf_dir)
  if tokenizer is None:
    raise DataError(f"{hf_dir} has no tokenizer.json or tokenizer.model; pass"
                    " data.tokenizer_path to a tokenizer.")
  dst = files.join(workdir, HF_TOKENIZER_DIR)
  for name in TOKENIZER_READ_FILES:
    src = files.join(hf_dir, name)
    if not files.exists(src):
      continue
    if not files.exists(files.join(dst, name)):
      files.copy_file(src, files.join(dst, name))
    elif not files.same_bytes(src, files.join(dst, name)):
      raise DataError(f"{files.join(dst, name)} differs from {src}; a run keeps its"
                      " tokenizer: use a new workdir.")
  return tokenizer  # loaded from files byte-equal to the workdir's copies


def _load_hf_tokenizer(hf_dir: str) -> Tokenizer | None:
  # The tokenizers library reads only local files: a gs:// dir is copied to a temporary one,
  # which may go once loaded (tokenizers and sentencepiece read the whole file).
  from llmjax.interop.tokenizer import TOKENIZER_READ_FILES, load_tokenizer
  with files.download_dir(hf_dir, TOKENIZER_READ_FILES) as local:
    return load_tokenizer(local)


def run_tokenizer_path(workdir: str) -> str:
  """The tokenizer `build_tokenizer` stored in an llmjax workdir, as a data.tokenizer_path
  (its hf_tokenizer/ dir, its tokenizer.model or its char_tokenizer.json); '' when it holds
  none."""
  hf_dir = files.join(workdir, HF_TOKENIZER_DIR)
  if files.isdir(hf_dir):
    return hf_dir
  for name in ('tokenizer.model', CHAR_TOKENIZER_FILE):
    path = files.join(workdir, name)
    if files.exists(path):
      return path
  return ''


def load_run_tokenizer(workdir: str) -> Tokenizer:
  """The tokenizer `build_tokenizer` stored in `workdir`, local or gs:// (for generate)."""
  path = run_tokenizer_path(workdir)
  if path and files.isdir(path):
    return _load_hf_tokenizer(path)
  # No tokenizer at all: the sentencepiece loader's error names the file a run writes.
  return load_file(path or files.join(workdir, 'tokenizer.model'))


class Prepared(NamedTuple):
  sources: dict  # {'train', 'validation'}: `get_sources`
  tokenizer: Tokenizer
  chat_template: chat.ChatTemplate | None
  loss_on: str


def prepare(data_cfg, workdir: str, process_index: int = 0) -> Prepared:
  """The run's sources, tokenizer and chat template (what `build_data` batches), each checked
  on the first record."""
  srcs = get_sources(data_cfg, workdir)
  tokenizer = build_tokenizer(data_cfg, workdir, srcs['train'])
  template, loss_on = None, data_cfg.get('loss_on', 'assistant')
  data_format = sources.check_data_format(data_cfg)
  if data_format in sources.PREFERENCE_FORMATS:
    from llmjax.data import preference  # a template only for conversational records
    template = preference.load_template(data_cfg, tokenizer, srcs['train'])
    if template is not None and data_cfg.get('chat_template', '') and process_index == 0:
      files.write_text(files.join(workdir, chat.RUN_TEMPLATE), template.source)
  elif data_format == 'messages':
    template = chat.load_template(data_cfg, tokenizer)
    if data_cfg.get('chat_template', '') and process_index == 0:
      # Kept with the run, so `llmjax.generate --chat` prompts the model as it was tuned.
      files.write_text(files.join(workdir, chat.RUN_TEMPLATE), template.source)
    # Renders one conversation now: a template that refuses the data fails here, before
    # anything compiles, rather than inside the first training step's input.
    template.tokenize(srcs['train'][0], loss_on)
  return Prepared(srcs, tokenizer, template, loss_on)


def build_data(data_cfg, workdir: str, *, seed: int, batch_size: int, process_index: int = 0,
               process_count: int = 1, ref_logps: dict | None = None):
  """The run's tokenizer and data, from `config.data` (keys in the module docstring).

  ref_logps: {'train', 'validation'} tables of a preference run's precomputed reference
    log-probs (`llmjax.train.reference`), which its batches then carry as `ref_logps`.
  Returns:
    (tokenizer, train, eval_batches): `train` an infinite shuffled IterDataset of batches
    (checkpoint `iter(train)`); `eval_batches()` the list of the first data.eval_batches
    batches of the validation split, computed once and cached; `eval_batches(full=True)` every
    batch of one pass over it, the last padded with empty rows (for eval.full_split).
  """
  srcs, tokenizer, template, loss_on = prepare(data_cfg, workdir, process_index)
  ref_logps = ref_logps or {}
  common = dict(seq_len=data_cfg.seq_len, batch_size=batch_size, process_index=process_index,
                process_count=process_count, chat_template=template, loss_on=loss_on,
                pairs_per_row=data_cfg.get('pairs_per_row', 1))
  train = make_dataset(srcs['train'], tokenizer, seed=seed, ref_logps=ref_logps.get('train'),
                       **common)
  # Repeated (but not shuffled) so that every host yields exactly eval_batches batches even
  # when the validation split is small: hosts must run the same number of eval steps.
  # No validation split when the files hold too few documents to spare any (sources.py).
  eval_ds = make_dataset(srcs['validation'], tokenizer, seed=seed, shuffle=False, repeat=True,
                         where='validation split', ref_logps=ref_logps.get('validation'),
                         **common) if len(srcs['validation']) else None
  cache = []

  def eval_batches(full: bool = False) -> list[dict]:
    if eval_ds is None:
      return []
    if full:  # one pass, not kept: the caller iterates it once
      return list(make_dataset(srcs['validation'], tokenizer, seed=seed, shuffle=False,
                               repeat=False, pad_remainder=True, where='validation split',
                               ref_logps=ref_logps.get('validation'), **common))
    if not cache:
      it = iter(eval_ds)
      cache.extend(next(it) for _ in range(data_cfg.eval_batches))
    return cache

  return tokenizer, train, eval_batches


LM_KEYS = ('inputs', 'targets', 'segment_ids', 'positions', 'loss_mask')


def batch_shapes(config, batch_size: int | None = None) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """{key: (shape, dtype)} of the global batch that `build_data` yields for `config` (its
  data.format, data.seq_len, data.pairs_per_row and train.objective), without reading data:
  what `llmjax.plan` compiles the train step for.

  B = batch_size (default train.batch_size), T = data.seq_len, P = data.pairs_per_row:
    inputs, targets, segment_ids, positions  int32 [B, T]   every format
    loss_mask                                float32 [B, T] every format
    pair_mask                                float32 [B, P] 'preference', 'unpaired_preference'
    margin                                   float32 [B, P] 'preference'
    label                                    float32 [B, P] 'unpaired_preference' (KTO)
    ref_logps                                float32 [B, 2P] when the reference's log-probs
                                             are precomputed (dpo.precompute_ref,
                                             `objectives.precomputes_reference`)
  GRPO and RLOO (train.objective 'grpo', 'rloo': `llmjax.rl.rollout.to_batch`): no loss_mask; completion_mask,
  old_logps, sampler_logps float32 [B, T], advantages float32 [B, 1].
  """
  from llmjax.train import objectives  # here: the data layer imports no jax at module level
  b = config.train.batch_size if batch_size is None else batch_size
  t = config.data.seq_len
  shapes = {k: ((b, t), np.dtype(np.float32 if k == 'loss_mask' else np.int32)) for k in LM_KEYS}
  if objectives.objective(config) in objectives.RL_OBJECTIVES:
    del shapes['loss_mask']
    f32 = np.dtype(np.float32)
    shapes.update(completion_mask=((b, t), f32), old_logps=((b, t), f32),
                  sampler_logps=((b, t), f32), advantages=((b, 1), f32))
    return shapes
  fmt = sources.check_data_format(config.data, data_files=False)
  if fmt in sources.PREFERENCE_FORMATS:
    p = config.data.get('pairs_per_row', 1)
    value_key = 'label' if fmt == 'unpaired_preference' else 'margin'  # preference.finish_row
    shapes['pair_mask'] = shapes[value_key] = ((b, p), np.dtype(np.float32))
    if objectives.precomputes_reference(config):
      # Each pair's two sequences (chosen, rejected; KTO: completion, KL counterpart).
      shapes['ref_logps'] = ((b, 2 * p), np.dtype(np.float32))
  return shapes
