"""Preference data (data.format='preference' / 'unpaired_preference'): the ids and masks TRL 1.16
computes (tests/golden/preference_tokens.json, tools/make_preference_token_goldens.py) from the
JSONL reader through the pipeline; whole pairs packed with pair_mask and margin; skipped pairs
counted; the built-in pairs checked against the tasks' answers; bad lines name file:line."""

import json
import os

import numpy as np
import pytest

from llmjax.data import build_data, make_dataset, preference, sources, tasks
from llmjax.data.chat import ChatTemplate
from llmjax.data.sources import PreferencePair, UnpairedExample
from llmjax.data.tokenizer import Tokenizer
from llmjax.errors import ConfigError, DataError

from test_data_sft import CharTokenizer, ids  # one id per character

GOLDEN = os.path.join(os.path.dirname(__file__), 'golden')
CASES = json.load(open(os.path.join(GOLDEN, 'preference_tokens.json')))['cases']


def _rows(ds):
  return [{k: v[i] for k, v in batch.items()} for batch in ds for i in range(len(batch['inputs']))]


def _segments(row):
  """{segment id: (inputs, targets, loss_mask)} of one row, positions checked to restart."""
  out = {}
  for s in sorted(set(row['segment_ids'].tolist()) - {0}):
    idx = np.flatnonzero(row['segment_ids'] == s)
    assert idx.tolist() == list(range(idx[0], idx[0] + len(idx)))  # contiguous
    np.testing.assert_array_equal(row['positions'][idx], np.arange(len(idx)))
    out[s] = (row['inputs'][idx].tolist(), row['targets'][idx].tolist(),
              row['loss_mask'][idx].tolist())
  return out


def _check_sequence(segment, trl_sequence):
  """Our segment is TRL's collated sequence: the same ids; our loss_mask[t] (the weight of
  targets[t] = token t + 1) is TRL's completion_mask[t + 1]; the last position predicts
  nothing."""
  inputs, targets, mask = segment
  want = trl_sequence['input_ids']
  assert inputs == want
  assert targets == want[1:] + [0]
  assert mask == [float(m) for m in trl_sequence['completion_mask'][1:]] + [0.0]


@pytest.mark.parametrize('case', CASES, ids=[c['name'] for c in CASES])
def test_pipeline_matches_trl_token_for_token(case, tmp_path):
  from llmjax.interop.tokenizer import load_tokenizer
  tok = load_tokenizer(os.path.join(GOLDEN, case['tokenizer']))
  template = ChatTemplate(case['template'], tok) if case.get('template') else None
  path = tmp_path / 'data.jsonl'
  path.write_text(''.join(json.dumps(r) + '\n' for r in case['records']))
  unpaired = case['format'] == 'unpaired_preference'
  read = sources.iter_unpaired if unpaired else sources.iter_preference_pairs
  examples = list(read(str(path)))
  batch = case.get('batch_size', 1)
  ds = make_dataset(examples, tok, seq_len=2 * case['max_length'], batch_size=batch, seed=0,
                    shuffle=False, repeat=False, chat_template=template)
  rows = _rows(ds)
  trl = case['trl']
  assert len(rows) == len(trl)
  assert ds.skipped_pairs.count == len(case['records']) - len(trl)
  for row, want in zip(rows, trl):
    segs = _segments(row)
    assert sorted(segs) == [1, 2]
    assert row['pair_mask'].tolist() == [1.0]
    if unpaired:
      _check_sequence(segs[1], want['sequence'])
      _check_sequence(segs[2], want['kl_sequence'])
      assert row['label'].tolist() == [float(want['label'])]
    else:
      _check_sequence(segs[1], want['chosen'])
      _check_sequence(segs[2], want['rejected'])
  # The split itself (before truncation), from the tokenizer alone.
  enc = preference.PreferenceTokenizer(tok, template)
  kept = [e for e in examples if 'skip' not in preference.tokenize_example(
      e, enc, 2 * case['max_length'])]
  for e, want, row in zip(kept, trl, rows):
    if not unpaired:  # the record's margin (TRL's tokenization does not carry it)
      assert row['margin'].tolist() == [e.margin]
    got = preference.tokenize_example(e, enc, 2 * case['max_length'])
    assert got['prompt'] == want['prompt_ids']
    keys = ('completion_ids',) if unpaired else ('chosen_ids', 'rejected_ids')
    assert got['completions'] == [want[k] for k in keys]


def test_truncation_skips_only_the_pair_whose_prompt_fills_max_length():
  (case,) = [c for c in CASES if c['name'] == 'truncated']
  assert len(case['trl']) == 2  # TRL dropped the long prompt, as the pipeline does above
  assert len(case['trl'][0]['chosen']['input_ids']) == case['max_length']  # cut keep_start


def test_hand_computed_pair_row_and_packing():
  """Char tokenizer, bos 1 eos 2: prompt 'ab', chosen 'cd', rejected 'e' -> segments
  [1 a b c d 2] and [1 a b e 2]; targets shifted within the segment, 0 at its end; mask on the
  completion's targets and EOS."""
  tok = CharTokenizer()
  pairs = [PreferencePair('ab', 'cd', 'e', 0.5), PreferencePair('q', 'rs', 't', -1.0),
           PreferencePair('x', 'y', 'z')]
  ds = make_dataset(pairs, tok, seq_len=16, batch_size=1, seed=0, shuffle=False, repeat=False)
  rows = _rows(ds)
  assert len(rows) == 3
  segs = _segments(rows[0])
  assert segs[1] == ([1] + ids('abcd') + [2], ids('abcd') + [2, 0],
                     [0.0, 0.0, 1.0, 1.0, 1.0, 0.0])
  assert segs[2] == ([1] + ids('abe') + [2], ids('abe') + [2, 0], [0.0, 0.0, 1.0, 1.0, 0.0])
  assert rows[0]['margin'].tolist() == [0.5] and rows[0]['pair_mask'].tolist() == [1.0]
  assert rows[0]['segment_ids'].tolist()[11:] == [0] * 5
  # Packed 3 per row: all three pairs' segments intact in one row, in pair order 2k+1, 2k+2.
  ds = make_dataset(pairs, tok, seq_len=32, batch_size=1, seed=0, shuffle=False, repeat=False,
                    pairs_per_row=3)
  (row,) = _rows(ds)
  packed = _segments(row)
  assert sorted(packed) == [1, 2, 3, 4, 5, 6]
  alone = [s for r in rows for s in _segments(r).values()]
  assert sorted(packed.values()) == sorted(alone)
  for k in range(3):  # chosen and rejected of one pair share its prompt
    assert packed[2 * k + 1][0][:2] == packed[2 * k + 2][0][:2]
  assert row['pair_mask'].tolist() == [1.0, 1.0, 1.0]
  assert sorted(row['margin'].tolist()) == [-1.0, 0.0, 0.5]
  # 4 slots, room for 2 pairs of 20 tokens in a 24-token row: empty slots are masked.
  ds = make_dataset(pairs, tok, seq_len=24, batch_size=1, seed=0, shuffle=False, repeat=False,
                    pairs_per_row=4)
  got = _rows(ds)
  assert sum(r['pair_mask'].sum() for r in got) == 3
  for r in got:
    n = int(r['pair_mask'].sum())
    assert r['pair_mask'].tolist() == [1.0] * n + [0.0] * (4 - n)
    assert sorted(_segments(r)) == list(range(1, 2 * n + 1))


def test_kto_rows_pair_each_example_with_the_previous_completion():
  tok = CharTokenizer()
  examples = [UnpairedExample('ab', 'c', True), UnpairedExample('d', 'ef', False),
              UnpairedExample('g', 'h', True), UnpairedExample('i', 'j', False)]
  ds = make_dataset(examples, tok, seq_len=16, batch_size=2, seed=0, shuffle=False,
                    repeat=False)
  rows = _rows(ds)
  kl = [_segments(r)[2][0] for r in rows]
  # Groups of one batch (2): (ab, ef) (d, c) | (g, j) (i, h).
  assert kl == [[1] + ids('abef') + [2], [1] + ids('dc') + [2], [1] + ids('gj') + [2],
                [1] + ids('ih') + [2]]
  assert [r['label'].tolist() for r in rows] == [[1.0], [0.0], [1.0], [0.0]]


def test_bad_pairs_are_skipped_and_counted(caplog):
  tok = CharTokenizer()
  pairs = [PreferencePair('ab', 'c', 'c'), PreferencePair('ab', '', 'd'),
           PreferencePair('ab', ' ', 'd'), PreferencePair('x' * 10, 'c', 'd'),
           PreferencePair('a', 'b', 'c'), PreferencePair('q', 'r', 's')]
  with caplog.at_level('WARNING', logger='llmjax.data.preference'):
    ds = make_dataset(pairs, tok, seq_len=16, batch_size=1, seed=0, shuffle=False,
                      repeat=False)
    rows = _rows(ds)
  assert len(rows) == 2
  for r in rows:  # never an empty loss
    segs = _segments(r)
    assert all(sum(mask) > 0 for _, _, mask in segs.values())
  assert ds.skipped_pairs.count == 4
  assert ds.skipped_pairs.reasons == {'identical': 1, 'empty': 2, 'no_room': 1}
  msgs = [r.getMessage() for r in caplog.records if 'pairs skipped' in r.getMessage()]
  assert msgs == ['4 pairs skipped: 1 chosen equals rejected, 2 an empty completion, 1 the'
                  ' prompt leaves no room for the completion (each sequence gets seq_len // 2'
                  ' = 8 tokens: raise data.seq_len)']
  with pytest.raises(DataError, match=r'^all 2 pairs were skipped'):
    next(iter(make_dataset(pairs[:2], tok, seq_len=16, batch_size=1, seed=0)))


def test_implicit_prompt_as_trl_extracts_it():
  assert sources.extract_prompt('The sky is blue.', 'The sky is green.') == (
      'The sky is', ' blue.', ' green.')
  assert sources.extract_prompt('abc', 'abcdef') == ('ab', 'c', 'cdef')
  u, a, b = {'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'x'}, {
      'role': 'assistant', 'content': 'y'}
  assert sources.extract_prompt((u, a), (u, b)) == ((u,), (a,), (b,))


@pytest.mark.parametrize('line,match', [
    ('{"prompt": "a", "rejected": "b"}', r":2: no 'chosen' field; set data.chosen_key"),
    ('{"prompt": "a", "chosen": 3, "rejected": "b"}', r":2: field 'chosen' is a int, not a str"),
    ('{"prompt": "a", "chosen": "c", "rejected": [{"role": "assistant", "content": "b"}]}',
     r":2: 'chosen' is a string, 'rejected' is a conversation"),
    ('{"prompt": "a", "chosen": "c", "rejected": "b", "margin": "big"}',
     r":2: field 'margin' is \"big\", not a number"),
    ('{"prompt": [{"role": "robot", "content": "a"}], "chosen": [], "rejected": []}',
     r":2: field 'chosen' is an empty list"),
])
def test_bad_preference_lines_name_file_and_line(tmp_path, line, match):
  path = tmp_path / 'p.jsonl'
  path.write_text('{"prompt": "a", "chosen": "c", "rejected": "b"}\n' + line + '\n')
  with pytest.raises(DataError, match=f'^{path}' + match):
    list(sources.iter_preference_pairs(str(path)))
  with pytest.raises(DataError, match=f'^{path}' + match):  # before anything is prepared
    sources.local_files_source(str(path), 'text', str(tmp_path / 'tfds'),
                               data_format='preference')
  assert not (tmp_path / 'tfds').exists()


@pytest.mark.parametrize('line,match', [
    ('{"prompt": "a", "completion": "b"}', r":1: no 'label' field; set data.label_key"),
    ('{"prompt": "a", "completion": "b", "label": 1}', r":1: field 'label' is 1, not true or"),
    ('{"prompt": "a", "label": true}', r":1: no 'completion' field"),
])
def test_bad_unpaired_lines_name_file_and_line(tmp_path, line, match):
  path = tmp_path / 'u.jsonl'
  path.write_text(line + '\n')
  with pytest.raises(DataError, match=f'^{path}' + match):
    list(sources.iter_unpaired(str(path)))


def test_jsonl_round_trip_through_the_prepared_copy(tmp_path):
  path = tmp_path / 'p.jsonl'
  conv = {'prompt': [{'role': 'user', 'content': 'hi'}],
          'chosen': [{'role': 'assistant', 'content': 'yes'}],
          'rejected': [{'role': 'assistant', 'content': 'no'}], 'margin': 2}
  records = [{'q': f'p{i}', 'good': ' c', 'bad': ' r'} for i in range(19)] + [conv]
  path.write_text(''.join(json.dumps(r) + '\n' for r in records))
  with pytest.raises(DataError, match=r":20: no 'good' field; set data.chosen_key"):
    sources.local_files_source(str(path), 'text', str(tmp_path / 't'), data_format='preference',
                               prompt_key='q', chosen_key='good', rejected_key='bad')
  records[-1] = {'q': conv['prompt'], 'good': conv['chosen'], 'bad': conv['rejected'],
                 'margin': 2}
  path.write_text(''.join(json.dumps(r) + '\n' for r in records))
  srcs = sources.local_files_source(str(path), 'text', str(tmp_path / 't'),
                                    data_format='preference', prompt_key='q', chosen_key='good',
                                    rejected_key='bad')
  got = [s[i] for s in (srcs['train'], srcs['validation']) for i in range(len(s))]
  assert len(got) == 20
  assert PreferencePair('p0', ' c', ' r', 0.0, f'{path}:1') in got
  assert PreferencePair(tuple(conv['prompt']), tuple(conv['chosen']), tuple(conv['rejected']),
                        2.0, f'{path}:20') in got


@pytest.mark.parametrize('name', tasks.task_names())
def test_builtin_pairs_chosen_correct_rejected_wrong_splits_disjoint(name):
  pairs = {split: tasks.preference_pairs(name, split, 0) for split in tasks.SPLITS}
  for split, recs in pairs.items():
    answers = {r['prompt']: r for r in tasks.make_task(name, split, 0)}
    assert len(recs) == len(answers)
    for p in recs:
      rec = answers[p['prompt']]
      assert p['chosen'] == rec['completion'] == ' ' + rec['answer']
      assert p['rejected'] != p['chosen'] and p['rejected'].startswith(' ')
      if name == 'arithmetic':  # recomputed: off by a little, never negative
        a, op, b = tasks.question(p)[len('What is '):-1].split()
        right = int(a) + int(b) if op == '+' else int(a) - int(b)
        assert int(p['chosen']) == right
        assert 0 < abs(int(p['rejected']) - right) <= 3 and int(p['rejected']) >= 0
      if name == 'format':
        assert json.loads(p['chosen'])['answer'] is not None
  train = {p['prompt'] for p in pairs['train']}
  assert not train & {p['prompt'] for p in pairs['heldout']}
  assert tasks.preference_pairs(name, 'train', 0) == pairs['train']  # deterministic
  assert tasks.preference_pairs(name, 'train', 1) != pairs['train']


def test_builtin_preference_build_data(tmp_path):
  import ml_collections
  from llmjax.config import base_config
  cfg = base_config()
  data = cfg.data
  # strings: this tiny vocab has lower-case letters only (no digits: arithmetic pairs would all
  # tokenize to chosen == rejected, and be skipped).
  data.format, data.builtin_tasks, data.seq_len = 'preference', ('strings',), 64
  data.eval_batches, data.pairs_per_row = 1, 2
  data.tokenizer_path = os.path.join(GOLDEN, 'qwen2_bias_tied')
  tok, train, eval_batches = build_data(data, str(tmp_path), seed=0, batch_size=4)
  b = next(iter(train))
  assert b['inputs'].shape == (4, 64) and b['pair_mask'].shape == (4, 2)
  assert b['margin'].shape == (4, 2)
  (e,) = eval_batches()
  assert e['pair_mask'].shape == (4, 2)
  heldout = {tasks.question(p) for p in tasks.preference_pairs('strings', 'heldout', 0)}
  assert all(e['pair_mask'][b].any() for b in range(4)) and heldout
  with pytest.raises(ConfigError, match='data.pairs_per_row=0'):
    sources.check_data_format(ml_collections.ConfigDict(dict(data, pairs_per_row=0)))


def test_written_preference_files_read_back_as_pairs(tmp_path):
  from llmjax import tasks as tasks_cli
  assert tasks_cli.main([f'--out={tmp_path}', '--tasks=format', '--format=preference']) == 0
  got = list(sources.iter_preference_pairs(str(tmp_path / 'format' / 'heldout.jsonl')))
  want = tasks.preference_pairs('format', 'heldout', 0)
  assert [(p.prompt, p.chosen, p.rejected) for p in got] == [
      (r['prompt'], r['chosen'], r['rejected']) for r in want]


def test_build_data_from_preference_jsonl_trains_a_tokenizer_on_its_texts(tmp_path):
  from llmjax.config import base_config
  path = tmp_path / 'pairs.jsonl'
  words = ['apple', 'river', 'stone', 'cloud', 'green', 'small']
  path.write_text(''.join(json.dumps({'prompt': f'Q: {w} {i}?\nA:', 'chosen': f' {w}',
                                      'rejected': f' {words[i % 5 - 1]}x', 'margin': i % 3})
                          + '\n' for i, w in enumerate(words * 7)))
  data = base_config().data
  data.path, data.format, data.seq_len, data.vocab_size, data.eval_batches = (
      str(path), 'preference', 64, 300, 1)
  tok, train, eval_batches = build_data(data, str(tmp_path / 'w'), seed=0, batch_size=2)
  b = next(iter(train))
  assert b['pair_mask'].tolist() == [[1.0], [1.0]]
  assert set(b['margin'].ravel().tolist()) <= {0.0, 1.0, 2.0}
  for row in _rows([b]):
    (c_in, _, c_mask), (r_in, _, r_mask) = _segments(row).values()
    assert c_in[-1] == tok.eos_id == r_in[-1] and c_mask[-2] == 1.0 == r_mask[-2]
  assert eval_batches()[0]['inputs'].shape == (2, 64)


@pytest.mark.parametrize('fmt, tasks_, pairs', [
    ('text', (), 1),
    ('prompt_completion', ('strings',), 1),
    ('preference', ('strings',), 1),
    ('preference', ('strings',), 2),
    ('unpaired_preference', ('strings',), 2),
    ('preference+precompute_ref', ('strings',), 2),
])
def test_batch_shapes_are_those_of_build_datas_batches(tmp_path, fmt, tasks_, pairs):
  """`pipeline.batch_shapes` (what llmjax.plan compiles for) against real batches."""
  from llmjax.config import base_config
  from llmjax.data.pipeline import batch_shapes
  c = base_config()
  fmt, precompute = fmt.split('+')[0], '+' in fmt
  c.data.format, c.data.builtin_tasks, c.data.seq_len = fmt, tasks_, 64
  c.data.eval_batches, c.data.pairs_per_row = 1, pairs
  c.data.tokenizer_path = os.path.join(GOLDEN, 'qwen2_bias_tied')
  c.train.batch_size = 4
  if fmt in sources.PREFERENCE_FORMATS:
    c.train.objective = 'dpo'
    c.dpo.loss = 'kto' if fmt == 'unpaired_preference' else 'sigmoid'
  tables = None
  if precompute:  # tables of the right length (values: llmjax.train.reference)
    from llmjax.data.pipeline import prepare
    c.dpo.precompute_ref = True
    srcs = prepare(c.data, str(tmp_path)).sources
    tables = {k: np.zeros((len(v), 2), np.float32) for k, v in srcs.items()}
  _, train, eval_batches = build_data(c.data, str(tmp_path), seed=0, batch_size=4,
                                      ref_logps=tables)
  want = batch_shapes(c)
  assert ('ref_logps' in want) == precompute
  for b in (next(iter(train)), eval_batches()[0]):
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == want
  assert batch_shapes(c, batch_size=8)['inputs'] == ((8, 64), np.dtype(np.int32))


def test_batch_shapes_with_precomputed_reference_log_probs():
  from llmjax.config import base_config
  from llmjax.data.pipeline import batch_shapes
  c = base_config()
  c.data.format, c.data.seq_len, c.data.pairs_per_row, c.train.batch_size = 'preference', 64, 3, 4
  c.train.objective = 'dpo'
  assert 'ref_logps' not in batch_shapes(c)
  c.dpo.precompute_ref = True
  shapes = batch_shapes(c)
  # Two sequences (chosen, rejected) per pair slot: [B, 2P].
  assert shapes['ref_logps'] == ((4, 6), np.dtype(np.float32))
  assert shapes['margin'] == shapes['pair_mask'] == ((4, 3), np.dtype(np.float32))
  c.dpo.loss = 'simpo'  # reference-free: no reference, nothing precomputed
  assert 'ref_logps' not in batch_shapes(c)
