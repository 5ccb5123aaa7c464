"""Pipeline tests: packed rows against the tokenizer's own encoding, long documents, host shards,
epoch reshuffles, Orbax-checkpointed iterator state, and build_data from a config."""

import collections
import os

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from llmjax.data import (SentencePieceTokenizer, build_data, default_corpus, in_memory_source,
                         make_dataset)
from llmjax.errors import ConfigError, DataError

# Lengths 3..~60 tokens, plus two documents far longer than any row.
DOCS = ([f'Doc {i}: ' + ' '.join(['alpha', 'beta', 'gamma'][i % 3] for _ in range(i % 23))
         for i in range(90)]
        + ['long one ' + ' '.join(str(k) for k in range(300)), 'x' * 700])


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  path = tmp_path_factory.mktemp('tok') / 'tokenizer.model'
  return SentencePieceTokenizer.train(default_corpus('train')[:2000], str(path), 400)


def _tokens(tok, doc):
  return [tok.bos_id] + tok.encode(doc) + [tok.eos_id]


def _segments(batch):
  """Yields (row, segment id, token indices) for every packed piece of a batch."""
  for r in range(batch['segment_ids'].shape[0]):
    seg = batch['segment_ids'][r]
    for s in sorted(set(seg.tolist()) - {0}):
      yield r, s, np.flatnonzero(seg == s)


def test_rows_recover_each_document_exactly(tok):
  """With rows longer than every document, each segment is one whole document: its tokens
  ([bos] + encode(doc) + [eos], from the tokenizer alone) are inputs + the last target."""
  docs = DOCS[:90]
  want = collections.Counter(tuple(_tokens(tok, d)) for d in docs)
  assert max(sum(want, ())) < tok.vocab_size and max(len(t) for t in want) <= 128
  ds = make_dataset(in_memory_source(docs), tok, seq_len=128, batch_size=1, seed=3,
                    shuffle=True, repeat=False)  # batch 1: drop_remainder drops nothing, so all docs appear
  got = collections.Counter()
  for batch in ds:
    assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == {
        'inputs': ((1, 128), 'int32'), 'targets': ((1, 128), 'int32'),
        'segment_ids': ((1, 128), 'int32'), 'positions': ((1, 128), 'int32'),
        'loss_mask': ((1, 128), 'float32')}
    seg, mask = batch['segment_ids'][0], batch['loss_mask'][0]
    used = np.flatnonzero(seg)
    assert list(used) == list(range(len(used)))  # padding only after the last piece
    np.testing.assert_array_equal(mask, seg > 0)  # zero exactly on padding
    assert (batch['inputs'][0][seg == 0] == 0).all() and (batch['positions'][0][seg == 0] == 0).all()
    for r, s, idx in _segments(batch):
      assert idx[0] == 0 or seg[idx[0] - 1] == s - 1  # segments numbered 1, 2, ... in order
      np.testing.assert_array_equal(batch['positions'][r][idx], np.arange(len(idx)))
      inp, tgt = batch['inputs'][r][idx], batch['targets'][r][idx]
      np.testing.assert_array_equal(inp[1:], tgt[:-1])  # targets = inputs shifted by one
      got[tuple(inp.tolist()) + (int(tgt[-1]),)] += 1
  assert got == want


def test_long_documents_become_consecutive_pieces_without_loss(tok):
  seq = 16
  doc = DOCS[-2]
  want = _tokens(tok, doc)
  assert len(want) > 20 * seq  # many pieces
  ds = make_dataset(in_memory_source([doc]), tok, seq_len=seq, batch_size=1, seed=0,
                    shuffle=False, repeat=False)
  pieces = []
  for batch in ds:
    for r, _, idx in _segments(batch):
      assert batch['positions'][r][idx][0] == 0
      pieces.append((batch['inputs'][r][idx].tolist(), batch['targets'][r][idx].tolist()))
  # Every piece but the last is full; inputs laid end to end are the document minus its eos,
  # and every next-token pair occurs exactly once.
  assert all(len(i) == seq for i, _ in pieces[:-1])
  assert sum((i for i, _ in pieces), []) == want[:-1]
  assert sum((t for _, t in pieces), []) == want[1:]


def test_hosts_get_disjoint_whole_documents_covering_the_epoch(tok):
  docs = DOCS[:90]
  by_host = []
  for host in range(2):
    ds = make_dataset(in_memory_source(docs), tok, seq_len=128, batch_size=2, seed=5,
                      repeat=False, process_index=host, process_count=2)
    seen = []
    for batch in ds:
      assert batch['inputs'].shape == (1, 128)  # global batch 2 over 2 hosts
      for r, _, idx in _segments(batch):
        seen.append(tok.decode(batch['inputs'][r][idx][1:]))  # drop bos; eos is the last target
    by_host.append(seen)
  assert not set(by_host[0]) & set(by_host[1])
  assert sorted(by_host[0] + by_host[1]) == sorted(docs)  # each document once, on one host


def test_each_epoch_is_a_new_permutation(tok):
  # 32 documents of one unseen CJK character each: 3 byte-fallback tokens + bos + eos = exactly
  # one full row of 4 inputs, so packing (16 open rows, shuffled) never mixes two epochs.
  docs = [chr(0x4e00 + i) for i in range(32)]
  assert all(len(_tokens(tok, d)) == 5 for d in docs)
  ds = make_dataset(in_memory_source(docs), tok, seq_len=4, batch_size=1, seed=1)
  it = iter(ds)
  order = [tok.decode(next(it)['inputs'][0][1:]) for _ in range(64)]
  first, second = order[:32], order[32:]
  assert sorted(first) == sorted(second) == sorted(docs)  # each epoch sees every document once
  assert first != docs and first != second  # shuffled, and differently each epoch
  again = iter(make_dataset(in_memory_source(docs), tok, seq_len=4, batch_size=1, seed=1))
  assert [tok.decode(next(again)['inputs'][0][1:]) for _ in range(32)] == first  # seeded


@pytest.mark.parametrize('skip', [3, 60])  # mid-epoch, and into the second (57 batches each)
def test_orbax_checkpointed_iterator_resumes_exactly(tok, tmp_path, skip):
  make = lambda: iter(make_dataset(in_memory_source(DOCS), tok, seq_len=32, batch_size=4,
                                   seed=11))
  it = make()
  for _ in range(skip):
    next(it)
  with ocp.CheckpointManager(tmp_path / 'ckpt') as mgr:
    mgr.save(skip, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mgr.wait_until_finished()
  want = [next(it) for _ in range(5)]
  fresh = make()
  with ocp.CheckpointManager(tmp_path / 'ckpt') as mgr:
    mgr.restore(skip, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  for w in want:
    got = next(fresh)
    for k in w:
      np.testing.assert_array_equal(got[k], w[k], err_msg=k)
  # A fresh iterator starts elsewhere, so the comparison above could have failed.
  assert not np.array_equal(next(make())['inputs'], want[0]['inputs'])


def test_dropped_examples_keep_the_iterator_state_exact_and_are_counted_per_whole_pass(tok):
  """SFT examples, every third with a prompt longer than seq_len (dropped whole): an iterator
  restored from get_state mid-epoch yields exactly the batches of the uninterrupted one; the
  restored iterator's counter waits for a pass it saw from the start, then counts the same 10."""
  from llmjax.data.sources import PromptCompletion
  examples = [PromptCompletion(('long prompt ' * 8) if i % 3 == 0 else f'Q{i}', f' A{i}.')
              for i in range(30)]
  assert all(len(tok.encode(e.prompt)) > 12 for e in examples[::3])
  make = lambda: make_dataset(examples, tok, seq_len=12, batch_size=2, seed=5)
  ds = make()
  it = iter(ds)
  for _ in range(7):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(40)]  # into the following passes
  assert ds.dropped_examples.count == 10
  fresh_ds = make()
  fresh = iter(fresh_ds)
  fresh.set_state(state)
  for w in want:
    got = next(fresh)
    for k in w:
      np.testing.assert_array_equal(got[k], w[k], err_msg=k)
  assert fresh_ds.dropped_examples.count == 10
  # Every kept row trains only examples whose prompt fits: no 'long prompt' is ever an input.
  for w in want:
    assert 'long prompt long prompt' not in tok.decode(w['inputs'].ravel().tolist())


def test_dropped_examples_counts_only_passes_seen_whole():
  from llmjax.data.pipeline import DroppedExamples
  d = DroppedExamples(seq_len=8, num_documents=4)
  for position, dropped in [(2, True), (3, False)]:  # a pass joined mid-way: not counted
    d.observe(position, dropped)
  assert d.count is None
  for position, dropped in [(4, True), (5, False), (5, False), (6, True), (7, True)]:
    d.observe(position, dropped)  # 5 twice: Grain recomputing a restored element
  assert d.count == 3
  for position, dropped in [(8, True), (10, False), (11, True)]:  # 9 skipped: not whole
    d.observe(position, dropped)
  assert d.count == 3
  assert d.message(12) == '12 examples dropped: their answers did not fit in seq_len=8'
  with pytest.raises(DataError, match=r"^all 4 examples were dropped: their answers do not fit"
                     r" in data.seq_len=8; raise data.seq_len or shorten the prompts\.$"):
    for position in range(12, 16):  # a whole pass dropped: a repeated stream would never end
      d.observe(position, True)
  assert DroppedExamples(256, 4, 'validation split').message(2) == (
      '2 examples dropped: their answers did not fit in seq_len=256 (validation split)')


def test_bad_arguments():
  src = in_memory_source(['a', 'b', 'c'])
  tok = None  # never reached: arguments are checked first
  with pytest.raises(ConfigError, match='batch_size=3 is not divisible by the 2 hosts'):
    make_dataset(src, tok, seq_len=8, batch_size=3, seed=0, process_count=2)
  with pytest.raises(ConfigError, match='seq_len=0'):
    make_dataset(src, tok, seq_len=0, batch_size=2, seed=0)
  with pytest.raises(DataError, match='3 documents cannot be shared by 4 hosts'):
    make_dataset(src, tok, seq_len=8, batch_size=4, seed=0, process_count=4)


def _data_cfg(**kw):
  c = ml_collections.ConfigDict(dict(path='', tfds_name='', text_key='text', seq_len=48,
                                     tokenizer_path='', vocab_size=400, tokenizer_type='bpe',
                                     eval_batches=3))
  c.update(kw)
  return c


def test_build_data_on_the_embedded_corpus_trains_then_reuses_its_tokenizer(tmp_path):
  cfg = _data_cfg()
  tok, train, eval_batches = build_data(cfg, str(tmp_path), seed=0, batch_size=4)
  path = tmp_path / 'tokenizer.model'
  stamp = os.stat(path).st_mtime_ns
  batch = next(iter(train))
  assert batch['inputs'].shape == (4, 48) and batch['inputs'].max() < tok.vocab_size
  evals = eval_batches()
  assert len(evals) == 3 and eval_batches() is evals  # computed once
  # The validation split's first document, in order, starts the first eval row.
  first = [tok.bos_id] + tok.encode(default_corpus('validation')[0])
  assert evals[0]['inputs'][0][:len(first)].tolist() == first[:48]
  # A restart reuses WORKDIR/tokenizer.model untouched and yields the same batches.
  tok2, train2, _ = build_data(cfg, str(tmp_path), seed=0, batch_size=4)
  assert os.stat(path).st_mtime_ns == stamp
  np.testing.assert_array_equal(next(iter(train2))['inputs'], batch['inputs'])
  # Two hosts each get half of every batch and the same number of eval batches.
  for host in range(2):
    _, train_h, eval_h = build_data(cfg, str(tmp_path), seed=0, batch_size=4,
                                    process_index=host, process_count=2)
    assert next(iter(train_h))['inputs'].shape == (2, 48) and len(eval_h()) == 3


def test_build_data_copies_a_given_tokenizer_and_refuses_to_switch_it(tmp_path, tok):
  cfg = _data_cfg(tokenizer_path=tok.path)
  got, _, _ = build_data(cfg, str(tmp_path / 'run'), seed=0, batch_size=2)
  assert got.encode('Mia the fox') == tok.encode('Mia the fox')
  assert (tmp_path / 'run' / 'tokenizer.model').read_bytes() == open(tok.path, 'rb').read()
  other = SentencePieceTokenizer.train(default_corpus('train')[:500], str(tmp_path / 'o.model'),
                                       450)
  with pytest.raises(DataError, match='differs from data.tokenizer_path=.*use a new workdir'):
    build_data(_data_cfg(tokenizer_path=other.path), str(tmp_path / 'run'), seed=0, batch_size=2)
  with pytest.raises(ConfigError, match='set only one'):
    build_data(_data_cfg(path='x.txt', tfds_name='lm1b'), str(tmp_path), seed=0, batch_size=2)


def test_build_data_from_local_jsonl(tmp_path):
  docs = [f'Record {i} says hello to record {i + 1}.' for i in range(60)]
  path = tmp_path / 'docs.jsonl'
  path.write_text(''.join(f'{{"id": {i}, "body": "{d}"}}\n' for i, d in enumerate(docs)))
  cfg = _data_cfg(path=str(path), text_key='body', vocab_size=300, eval_batches=2)
  tok, train, eval_batches = build_data(cfg, str(tmp_path / 'run'), seed=0, batch_size=2)
  texts = set()
  for batch in eval_batches():
    for r, _, idx in _segments(batch):
      texts.add(tok.decode(batch['inputs'][r][idx][1:]))
  assert texts == set(docs[19::20])  # validation = every 20th document, nothing else
  assert next(iter(train))['loss_mask'].sum() > 0
  assert (tmp_path / 'run' / 'tfds').is_dir()
