"""The Grain input pipeline: shard, shuffle, tokenize, split, pack, batch.

    documents --(host shard, seeded shuffle per epoch)--> [bos] + ids + [eos]
      --(split into pieces of <= seq_len + 1 tokens)--> {inputs, targets} per piece
      --(first-fit packing into rows of seq_len)--> + segment_ids, positions
      --(batch)--> dict of [per_host_batch, seq_len] numpy arrays

Batch keys: inputs, targets, segment_ids, positions (int32) and loss_mask (float32). A row
holds several pieces; segment_ids number them 1, 2, ... (0 = padding) and positions restart
at 0 in each, so the model never attends across documents and RoPE sees each document from
position 0. Long documents are split into pieces that overlap by one token, so every next-token
pair is trained exactly once. The iterator's state (a few integers) is checkpointed with the
model and restores the exact data order.

Config keys (`config.data`): path, tfds_name, text_key, seq_len, tokenizer_path, vocab_size,
tokenizer_type, eval_batches — documented in `llmjax.config.base_config`.
"""

import os

import grain
import grain.experimental as gx
import numpy as np

from llmjax.data import corpus, sources
from llmjax.data.tokenizer import SentencePieceTokenizer, Tokenizer
from llmjax.errors import ConfigError


class _SplitIntoPieces(gx.FlatMapTransform):
  """[bos, t1, ..., eos] -> pieces {inputs: p[:-1], targets: p[1:]} with len(p) <= seq_len + 1."""

  def __init__(self, seq_len: int, max_pieces: int = 4096):
    self.seq_len = seq_len
    self.max_fan_out = max_pieces

  def flat_map(self, tokens):
    n = self.seq_len
    starts = range(0, max(len(tokens) - 1, 1), n)
    pieces = [tokens[s:s + n + 1] for s in starts][:self.max_fan_out]
    return [{'inputs': p[:-1], 'targets': p[1:]} for p in pieces if len(p) >= 2]


def _finish_row(row: dict) -> dict:
  segment_ids = row['inputs_segment_ids'].astype(np.int32)
  return {'inputs': row['inputs'].astype(np.int32), 'targets': row['targets'].astype(np.int32),
          'segment_ids': segment_ids, 'positions': row['inputs_positions'].astype(np.int32),
          'loss_mask': (segment_ids > 0).astype(np.float32)}


def make_dataset(source, tokenizer: Tokenizer, *, seq_len: int, batch_size: int, seed: int,
                 shuffle: bool = True, repeat: bool = True, process_index: int = 0,
                 process_count: int = 1) -> grain.IterDataset:
  """Packed batches of `source`'s documents for this host.

  Args:
    source: random-access documents (str).
    batch_size: the global batch; each host yields batch_size // process_count rows.
    repeat: loop forever (training) or make one pass (evaluation).
  Returns: an IterDataset; `iter()` of it has get_state/set_state for checkpoints.
  """
  if batch_size % process_count:
    raise ConfigError(f"train.batch_size={batch_size} is not divisible by the {process_count}"
                      " hosts; use a multiple.")
  bos, eos = tokenizer.bos_id, tokenizer.eos_id
  ds = grain.MapDataset.source(source)
  ds = ds[process_index::process_count]  # each host reads a disjoint shard of the documents
  if shuffle:
    ds = ds.shuffle(seed=seed)  # a new permutation every epoch when repeated
  if repeat:
    ds = ds.repeat(None)
  ds = ds.map(lambda text: np.asarray([bos] + tokenizer.encode(text) + [eos], np.int32))
  it = gx.FlatMapIterDataset(ds.to_iter_dataset(), _SplitIntoPieces(seq_len))
  local_batch = batch_size // process_count
  it = gx.FirstFitPackIterDataset(
      it, length_struct={'inputs': seq_len, 'targets': seq_len},
      num_packing_bins=max(local_batch, 8), seed=seed, shuffle_bins=shuffle)
  it = it.map(_finish_row)
  return it.batch(local_batch, drop_remainder=True)


def build_tokenizer(data_cfg, workdir: str, train_texts) -> Tokenizer:
  """data.tokenizer_path if set; else WORKDIR/tokenizer.model, trained once on the train split
  (a restart reuses it, so token ids never change under a resumed run)."""
  if data_cfg.tokenizer_path:
    return SentencePieceTokenizer.load(data_cfg.tokenizer_path)
  path = os.path.join(workdir, 'tokenizer.model')
  if os.path.exists(path):
    return SentencePieceTokenizer.load(path)
  return SentencePieceTokenizer.train(train_texts(), path, data_cfg.vocab_size,
                                      data_cfg.tokenizer_type)


def get_sources(data_cfg, workdir: str) -> dict:
  """{'train', 'validation'} document sources for the configured corpus."""
  if data_cfg.path and data_cfg.tfds_name:
    raise ConfigError("set only one of data.path and data.tfds_name.")
  if data_cfg.path:
    return sources.local_files_source(data_cfg.path, data_cfg.text_key,
                                      os.path.join(workdir, 'tfds'))
  if data_cfg.tfds_name:
    return sources.tfds_source(data_cfg.tfds_name, data_cfg.text_key)
  return {split: sources.in_memory_source(corpus.default_corpus(split))
          for split in ('train', 'validation')}


def build_data(data_cfg, workdir: str, *, seed: int, batch_size: int, process_index: int = 0,
               process_count: int = 1):
  """Returns (tokenizer, train IterDataset, eval_batches() -> list of batches).

  Evaluation always reads the same first `data.eval_batches` batches of the validation split,
  so eval losses are comparable across steps and runs.
  """
  srcs = get_sources(data_cfg, workdir)
  # Sentencepiece samples at most a few hundred thousand sentences; 50k documents are plenty.
  tokenizer = build_tokenizer(
      data_cfg, workdir, lambda: (srcs['train'][i] for i in range(min(len(srcs['train']), 50_000))))
  common = dict(seq_len=data_cfg.seq_len, batch_size=batch_size, process_index=process_index,
                process_count=process_count)
  train = make_dataset(srcs['train'], tokenizer, seed=seed, **common)
  eval_ds = make_dataset(srcs['validation'], tokenizer, seed=seed, shuffle=False, repeat=False,
                         **common)
  cache = []

  def eval_batches():
    if not cache:
      it = iter(eval_ds)
      for _ in range(data_cfg.eval_batches):
        try:
          cache.append(next(it))
        except StopIteration:
          break
      if not cache:
        raise ConfigError(f"the validation split is smaller than one batch of {batch_size} rows;"
                          " lower train.batch_size or add documents.")
    return cache

  return tokenizer, train, eval_batches
