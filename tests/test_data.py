"""Data tests: tokenizer round trips, packing, host sharding, iterator checkpoints, sources."""

import json
import sys

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from llmjax.data import (SentencePieceTokenizer, default_corpus, get_sources, in_memory_source,
                         local_files_source, make_dataset)
from llmjax.data.sources import VALIDATION_EVERY
from llmjax.errors import DataError


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  path = tmp_path_factory.mktemp('tok') / 'tokenizer.model'
  return SentencePieceTokenizer.train(default_corpus('train')[:3000], str(path), 512)


def test_round_trip_is_exact_on_unseen_scripts_code_and_whitespace(tok):
  for text in ['你好，世界', 'emoji 🎉🚀 done', 'def f(x):\n\treturn  x  +  1\n', '  leading',
               'naïve café', 'tab\tand\r\nCRLF', '']:
    assert tok.decode(tok.encode(text)) == text
  assert tok.vocab_size == 512 and len({tok.pad_id, tok.bos_id, tok.eos_id}) == 3


def test_bad_tokenizer_files(tmp_path):
  with pytest.raises(DataError, match='does not exist'):
    SentencePieceTokenizer.load(str(tmp_path / 'nope.model'))
  (tmp_path / 'bad.model').write_bytes(b'not a model')
  with pytest.raises(DataError, match='not a valid sentencepiece model'):
    SentencePieceTokenizer.load(str(tmp_path / 'bad.model'))
  with pytest.raises(DataError, match='raise data.vocab_size'):
    SentencePieceTokenizer.train(['héllo wörld 你好'] * 10, str(tmp_path / 't.model'), 100)


DOCS = [f'document {i}: ' + 'word ' * (i % 37) for i in range(120)]


def _rows(ds, n):
  it = iter(ds)
  return [next(it) for _ in range(n)]


def test_packed_rows_hold_whole_documents_with_restarting_positions(tok):
  seq = 24
  ds = make_dataset(in_memory_source(DOCS), tok, seq_len=seq, batch_size=4, seed=0,
                    shuffle=False, repeat=False)
  # The pieces a document must become: [bos] + ids + [eos] cut every `seq` tokens, each piece
  # one token longer than its inputs (the last target), consecutive pieces sharing one token.
  want = []
  for d in DOCS:
    t = [tok.bos_id] + tok.encode(d) + [tok.eos_id]
    want += [tuple(t[s:s + seq + 1]) for s in range(0, len(t) - 1, seq)]
  got = []
  for batch in ds:
    assert all(v.shape == (4, seq) for v in batch.values())
    for r in range(4):
      seg, pos = batch['segment_ids'][r], batch['positions'][r]
      np.testing.assert_array_equal(batch['loss_mask'][r], (seg > 0).astype(np.float32))
      assert (seg == 0).sum() == 0 or seg[-1] == 0  # padding only at the end
      for s in set(seg.tolist()) - {0}:
        idx = np.flatnonzero(seg == s)
        np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))  # restart at 0
        inp, tgt = batch['inputs'][r][idx], batch['targets'][r][idx]
        np.testing.assert_array_equal(inp[1:], tgt[:-1])  # targets = inputs shifted
        got.append(tuple(int(x) for x in inp) + (int(tgt[-1]),))
  from collections import Counter
  assert not Counter(got) - Counter(want)  # every packed piece is a piece of a document
  assert len(got) >= 0.9 * len(want)  # and nearly all are there (the last batch is dropped)


def test_hosts_read_disjoint_documents_that_cover_an_epoch(tok):
  seen = []
  for host in range(2):
    ds = make_dataset(in_memory_source(DOCS), tok, seq_len=512, batch_size=4, seed=0,
                      shuffle=True, repeat=False, process_index=host, process_count=2)
    docs = set()
    for b in ds:
      assert b['inputs'].shape == (2, 512)  # per-host half of the global batch
      for r in range(2):
        for s in set(b['segment_ids'][r].tolist()) - {0}:
          idx = b['segment_ids'][r] == s
          docs.add(tok.decode(b['inputs'][r][idx][1:]))
    seen.append(docs)
  assert not seen[0] & seen[1]
  assert len(seen[0] | seen[1]) >= 0.9 * len(DOCS)


def test_iterator_state_restores_through_orbax(tok, tmp_path):
  make = lambda: iter(make_dataset(in_memory_source(DOCS), tok, seq_len=32, batch_size=4, seed=7))
  it = make()
  for _ in range(5):
    next(it)
  mgr = ocp.CheckpointManager(tmp_path / 'ckpt', item_names=('data',))
  mgr.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  mgr.wait_until_finished()
  want = [next(it) for _ in range(4)]
  fresh = make()
  mgr.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  got = [next(fresh) for _ in range(4)]
  for a, b in zip(want, got):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  other = make()  # and it differs from a fresh start, so the test can fail
  assert not np.array_equal(next(other)['inputs'], want[0]['inputs'])


def test_epochs_are_reshuffled(tok):
  ds = grain.MapDataset.source(list(range(20))).shuffle(seed=0).repeat(2)
  order = list(ds)
  assert sorted(order[:20]) == sorted(order[20:]) == list(range(20))
  assert order[:20] != order[20:]


def test_local_jsonl_and_text_become_tfds_splits_without_tensorflow(tmp_path):
  (tmp_path / 'corpus').mkdir()
  jl = tmp_path / 'corpus' / 'a.jsonl'
  jl.write_text('\n'.join(json.dumps({'text': f'json doc {i} 你好', 'id': i}) for i in range(40)))
  txt = tmp_path / 'corpus' / 'b.txt'
  txt.write_text('\n\n'.join(f'para {i}\nsecond line' for i in range(20)))
  for pattern, n in ((str(jl), 40), (str(txt), 20), (str(tmp_path / 'corpus' / '*'), 60)):
    srcs = local_files_source(pattern, 'text', str(tmp_path / 'tfds'))
    train, val = srcs['train'], srcs['validation']
    assert len(train) + len(val) == n and len(val) == n // VALIDATION_EVERY
    texts = {train[i] for i in range(len(train))} | {val[i] for i in range(len(val))}
    assert ('json doc 3 你好' in texts) == (pattern != str(txt))
    assert ('para 4\nsecond line' in texts) == (pattern != str(jl))
  assert 'tensorflow' not in sys.modules


def test_bad_jsonl_line_names_file_and_line(tmp_path):
  jl = tmp_path / 'bad.jsonl'
  jl.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c\n' + '{"text": "d"}\n' * 30)
  with pytest.raises(DataError, match=r'bad.jsonl:3: invalid JSON'):
    local_files_source(str(jl), 'text', str(tmp_path / 'tfds'))
  jl.write_text('{"text": "a"}\n' * 30 + '{"body": "b"}\n')
  with pytest.raises(DataError, match=r"bad.jsonl:31: no 'text' field; set data.text_key"):
    local_files_source(str(jl), 'text', str(tmp_path / 'tfds'))
  assert not (tmp_path / 'tfds').exists() or not any((tmp_path / 'tfds').rglob('*.array_record*'))


def test_empty_corpus_and_missing_files(tmp_path):
  (tmp_path / 'empty.txt').write_text('\n\n')
  with pytest.raises(DataError, match='empty corpus'):
    local_files_source(str(tmp_path / 'empty.txt'), 'text', str(tmp_path / 'tfds'))
  with pytest.raises(DataError, match='matches no file'):
    local_files_source(str(tmp_path / 'nothing*.jsonl'), 'text', str(tmp_path / 'tfds'))
  with pytest.raises(DataError, match='corpus is empty'):
    in_memory_source([])


def test_embedded_corpus_is_deterministic_with_disjoint_splits():
  a, b = default_corpus('train'), default_corpus('train')
  assert a == b and len(a) == 20_000
  val = default_corpus('validation')
  assert len(val) > 300 and not set(val) & set(a)
  kinds = [d.startswith('Once upon a time') for d in a]
  assert 0.2 < np.mean(kinds) < 0.5
