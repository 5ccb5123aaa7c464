"""Supervised fine-tuning data (data.format='prompt_completion'): loss_mask on the completion's
targets only, against hand-computed rows of a character tokenizer; across piece boundaries and
packing; JSONL errors; build_data end to end; the loss ignoring prompt targets; a short run."""

import collections
import json

import ml_collections
import numpy as np
import pytest

from llmjax.data import build_data, local_files_source, make_dataset
from llmjax.data.sources import PromptCompletion, iter_prompt_completions
from llmjax.data.tokenizer import Tokenizer
from llmjax.errors import ConfigError, DataError


class CharTokenizer(Tokenizer):
  """One id per character (its code point), so expected rows can be written by hand."""
  vocab_size, pad_id = 128, 0

  def __init__(self, bos_id=1, eos_id=2):
    self.bos_id, self.eos_id = bos_id, eos_id

  def encode(self, text):
    return [ord(c) for c in text]

  def decode(self, ids):
    return ''.join(chr(i) for i in ids)


def _rows(examples, tok, seq_len):
  """Every row of one unshuffled pass, batch size 1: a list of dicts of [seq_len] arrays."""
  ds = make_dataset(examples, tok, seq_len=seq_len, batch_size=1, seed=0, shuffle=False,
                    repeat=False)
  return [{k: v[0] for k, v in batch.items()} for batch in ds]


def _pieces(rows):
  """(inputs, targets, loss_mask) of every packed piece, as lists."""
  for row in rows:
    for s in sorted(set(row['segment_ids'].tolist()) - {0}):
      idx = np.flatnonzero(row['segment_ids'] == s)
      np.testing.assert_array_equal(row['positions'][idx], np.arange(len(idx)))
      yield (row['inputs'][idx].tolist(), row['targets'][idx].tolist(),
             row['loss_mask'][idx].tolist())


def ids(text):
  return [ord(c) for c in text]


@pytest.mark.parametrize('bos,eos', [(1, 2), (-1, 2), (-1, -1)])  # Llama / Qwen2 / no EOS
def test_hand_computed_row(bos, eos):
  """prompt 'ab', completion 'xyz': tokens [bos] a b x y z [eos]. The target at i is token
  i + 1, so the mask is 0 on the targets a, b (a is the first prompt token, predicted from
  bos) and 1 on x (the first completion token, predicted from b), y, z and eos."""
  (row,) = _rows([PromptCompletion('ab', 'xyz')], CharTokenizer(bos, eos), seq_len=8)
  B, E = [bos] * (bos >= 0), [eos] * (eos >= 0)
  tokens = B + ids('abxyz') + E
  mask = [0.0] * len(B) + [0, 1, 1, 1] + [1.0] * len(E)  # weights of tokens[1:]
  n = len(tokens) - 1
  pad = [0] * (8 - n)
  assert row['inputs'].tolist() == tokens[:-1] + pad
  assert row['targets'].tolist() == tokens[1:] + pad
  assert row['loss_mask'].tolist() == mask + pad
  assert row['loss_mask'].dtype == np.float32
  assert row['segment_ids'].tolist() == [1] * n + pad
  assert row['positions'].tolist() == list(range(n)) + pad


def test_mask_follows_the_targets_across_piece_boundaries():
  """seq_len 4: the prompt 'abc' ends one target before the first piece's end, so that piece's
  last target (d, the first completion token, predicted from c) is its only trained one; a
  mask taken from the inputs' weights would make the piece all 0 (and drop it). The next
  piece starts at d and trains all its targets."""
  tok = CharTokenizer()
  got = list(_pieces(_rows([PromptCompletion('abc', 'defgh')], tok, seq_len=4)))
  want = [([1] + ids('abc'), ids('abcd'), [0, 0, 0, 1]),
          (ids('defg'), ids('efgh'), [1, 1, 1, 1]),
          (ids('h'), [2], [1])]
  assert sorted(got) == sorted(want)
  # A completion split mid-way: every completion target stays 1 in every piece.
  got = list(_pieces(_rows([PromptCompletion('ab', 'cdefghij')], tok, seq_len=4)))
  want = [([1] + ids('abc'), ids('abcd'), [0, 0, 1, 1]),
          (ids('defg'), ids('efgh'), [1, 1, 1, 1]),
          (ids('hij'), ids('ij') + [2], [1, 1, 1])]
  assert sorted(got) == sorted(want)


def test_examples_whose_answers_start_past_seq_len_are_dropped_and_counted(caplog):
  """seq_len 4: 'abcd' + 'efgh' is [bos] a b c d | e ...: the first piece's targets a b c d are
  all prompt, so the answer is cut off from its prompt entirely; the example is dropped whole
  (before 8ad6c80's piece rule alone, its answer was trained without any prompt) and counted,
  once, with the issue's message. The examples that fit are all still there."""
  tok = CharTokenizer()
  examples = [PromptCompletion('abcd', 'efgh'), PromptCompletion('a', 'b'),
              PromptCompletion('wxyz', 'q'), PromptCompletion('', 'c'),
              PromptCompletion('abcdefgh', 'i')]  # 3 of 5 do not fit
  ds = make_dataset(examples, tok, seq_len=4, batch_size=1, seed=0, shuffle=False,
                    repeat=False)
  with caplog.at_level('WARNING', logger='llmjax.data.pipeline'):
    rows = [{k: v[0] for k, v in batch.items()} for batch in ds]
  got = sorted(_pieces(rows))
  assert got == [([1] + ids('ab'), ids('ab') + [2], [0, 1, 1]),
                 ([1] + ids('c'), ids('c') + [2], [1, 1])]
  assert ds.dropped_examples.count == 3
  counts = [r.getMessage() for r in caplog.records if 'examples dropped' in r.getMessage()]
  assert counts == ['3 examples dropped: their answers did not fit in seq_len=4']
  # Every pass drops the same examples: over many passes the count is logged once per run.
  caplog.clear()
  it = iter(make_dataset(examples, tok, seq_len=4, batch_size=1, seed=0))
  with caplog.at_level('WARNING', logger='llmjax.data.pipeline'):
    for _ in range(12):  # ~1 row per fitting example: 4+ passes
      next(it)
  assert [r.getMessage() for r in caplog.records if 'examples dropped' in r.getMessage()] == [
      '3 examples dropped: their answers did not fit in seq_len=4']
  # Nothing dropped: nothing logged, count 0.
  caplog.clear()
  ds = make_dataset(examples[1:2] * 3, tok, seq_len=4, batch_size=1, seed=0, shuffle=False,
                    repeat=False)
  with caplog.at_level('WARNING', logger='llmjax.data.pipeline'):
    list(ds)
  assert ds.dropped_examples.count == 0 and not caplog.records


def test_packed_examples_keep_their_own_masks_and_segments():
  examples = [PromptCompletion('ab', 'c'), PromptCompletion('d', 'ef'), PromptCompletion('', 'gh')]
  (row,) = _rows(examples, CharTokenizer(), seq_len=16)  # 4 + 4 + 3 inputs: one row
  assert row['segment_ids'].tolist() == [1] * 4 + [2] * 4 + [3] * 3 + [0] * 5
  assert row['positions'].tolist() == [0, 1, 2, 3] * 2 + [0, 1, 2] + [0] * 5
  assert row['targets'].tolist() == ids('abc') + [2] + ids('def') + [2] + ids('gh') + [2] + [0] * 5
  assert row['loss_mask'].tolist() == ([0, 0, 1, 1] + [0, 1, 1, 1] + [1, 1, 1]  # empty prompt:
                                       + [0] * 5)                              # all trained


def test_text_documents_keep_every_target(tmp_path):
  """The pretraining path through the same weights: 1 on every real target, 0 on padding."""
  (row,) = _rows(['abc', 'de'], CharTokenizer(), seq_len=10)
  assert row['loss_mask'].tolist() == [1] * 7 + [0] * 3
  assert row['targets'].tolist() == ids('abc') + [2] + ids('de') + [2] + [0] * 3


# --- JSONL files -------------------------------------------------------------------------------

def _write(path, records):
  path.write_text(''.join(json.dumps(r) + '\n' for r in records))
  return str(path)


def test_jsonl_round_trip_with_renamed_fields_next_to_a_text_copy(tmp_path):
  records = [{'q': f'Q{i}?', 'a': f' A{i}.', 'text': f'doc {i}'} for i in range(40)]
  records.insert(5, {'q': '', 'a': '', 'text': 'x'})  # nothing to train on: skipped
  path = _write(tmp_path / 'sft.jsonl', records)
  srcs = local_files_source(path, 'text', str(tmp_path / 'tfds'),
                            data_format='prompt_completion', prompt_key='q', completion_key='a')
  got = [srcs[s][i] for s in ('train', 'validation') for i in range(len(srcs[s]))]
  assert all(isinstance(x, PromptCompletion) for x in got)
  assert sorted(got) == sorted(PromptCompletion(f'Q{i}?', f' A{i}.') for i in range(40))
  assert len(srcs['validation']) == 2
  # The same file as text is another prepared copy, not the prompt/completion one.
  text = local_files_source(path, 'text', str(tmp_path / 'tfds'))
  assert sorted(text['train'][i] for i in range(len(text['train'])))[0] == 'doc 0'
  assert len(list((tmp_path / 'tfds').iterdir())) == 2


@pytest.mark.parametrize('line, match', [
    ({'prompt': 'p'}, r"sft\.jsonl:3: no 'completion' field; set data.completion_key to the"
     r" field that holds the completion\.$"),
    ({'promt': 'p', 'completion': 'c'}, r"sft\.jsonl:3: no 'prompt' field; set data.prompt_key"
     r" .* Did you mean 'promt'\?"),
    ({'prompt': ['p'], 'completion': 'c'}, r"sft\.jsonl:3: field 'prompt' is a list, not a"
     r" string; set data.prompt_key"),
    ({'prompt': 'p', 'completion': None}, r"sft\.jsonl:3: field 'completion' is a NoneType"),
    ('"just a string"', r"sft\.jsonl:3: no 'prompt' field"),
    ('{"prompt": "p", ', r"sft\.jsonl:3: invalid JSON"),
])
def test_bad_records_name_file_line_and_field_before_writing_anything(tmp_path, line, match):
  good = json.dumps({'prompt': 'p', 'completion': 'c'}) + '\n'
  bad = line if isinstance(line, str) else json.dumps(line)
  path = tmp_path / 'sft.jsonl'
  path.write_text(good * 2 + bad + '\n' + good * 30)
  with pytest.raises(DataError, match=match) as e:
    local_files_source(str(path), 'text', str(tmp_path / 'tfds'),
                       data_format='prompt_completion')
  assert str(path) in str(e.value) and '\n' not in str(e.value)
  assert not list(tmp_path.rglob('*.array_record*'))


def test_txt_files_and_unknown_formats_are_refused(tmp_path):
  (tmp_path / 'a.txt').write_text('some text\n')
  with pytest.raises(DataError, match=r"a\.txt: data.format='prompt_completion' reads .jsonl"):
    local_files_source(str(tmp_path / 'a.txt'), 'text', str(tmp_path / 'tfds'),
                       data_format='prompt_completion')
  with pytest.raises(DataError, match=r"a\.txt: data.format='prompt_completion'"):
    list(iter_prompt_completions(str(tmp_path / 'a.txt')))
  with pytest.raises(ConfigError, match=r"data.format='txt' is not one of"):
    local_files_source(str(tmp_path / 'a.txt'), 'text', str(tmp_path / 'tfds'), data_format='txt')


# --- build_data and the loss -------------------------------------------------------------------

def _data_cfg(**kw):
  c = ml_collections.ConfigDict(dict(
      path='', tfds_name='', format='prompt_completion', text_key='text', prompt_key='prompt',
      completion_key='completion', seq_len=32, tokenizer_path='', vocab_size=400,
      tokenizer_type='bpe', eval_batches=2))
  c.update(kw)
  return c


COLOURS = ['red', 'green', 'blue', 'amber', 'violet']


@pytest.fixture(scope='module')
def sft_jsonl(tmp_path_factory):
  path = tmp_path_factory.mktemp('sft') / 'qa.jsonl'
  return _write(path, [{'prompt': f'Q: what colour is box {i}?\nA:',
                        'completion': f' box {i} is painted {COLOURS[i % 5]}.'}
                       for i in range(60)])


def test_build_data_trains_on_exactly_the_completions(sft_jsonl, tmp_path):
  """With a tokenizer trained on the file's prompts and completions: in every row, the masked-in
  targets of a segment decode to its example's completion, then EOS; nothing else is masked in."""
  tok, train, eval_batches = build_data(_data_cfg(path=sft_jsonl), str(tmp_path), seed=0,
                                        batch_size=4)
  # The tokenizer learned from the completions too: a word only they hold is one piece (8
  # single characters for a tokenizer trained on the prompts alone).
  assert len(tok.encode(' painted')) == 1
  completions = collections.Counter()
  it = iter(train)
  for batch in [next(it) for _ in range(10)] + eval_batches():
    for r in range(batch['inputs'].shape[0]):
      seg, mask = batch['segment_ids'][r], batch['loss_mask'][r]
      assert (mask[seg == 0] == 0).all()
      for s in set(seg.tolist()) - {0}:
        idx = np.flatnonzero(seg == s)
        trained = batch['targets'][r][idx][mask[idx] == 1].tolist()
        assert trained[-1] == tok.eos_id
        text = tok.decode(trained[:-1])
        prompt = tok.decode(batch['inputs'][r][idx][1:][mask[idx][1:] == 0])
        assert text.startswith(' box ') and prompt.startswith('Q: what colour is box')
        assert text.split()[1] == prompt.split()[5].rstrip('?')  # the completion of its prompt
        completions[text] += 1
  assert completions and set(completions) <= {f' box {i} is painted {COLOURS[i % 5]}.'
                                               for i in range(60)}
  with pytest.raises(ConfigError, match="data.format='prompt_completion' needs data.path"):
    build_data(_data_cfg(), str(tmp_path / 'other'), seed=0, batch_size=4)


def test_next_token_loss_ignores_prompt_targets(sft_jsonl, tmp_path):
  """The train step's loss on a pipeline batch: rewriting the targets under loss_mask 0 (the
  prompts) leaves it bit for bit; rewriting one completion target changes it."""
  import jax
  import jax.numpy as jnp

  from llmjax.models.config import get_preset
  from llmjax.models.transformer import Transformer
  from llmjax.train.losses import next_token_loss

  tok, train, _ = build_data(_data_cfg(path=sft_jsonl), str(tmp_path), seed=0, batch_size=2)
  batch = next(iter(train))
  cfg = get_preset('tiny', num_layers=1, embed_dim=32, num_heads=2, num_kv_heads=2, head_dim=16,
                   mlp_dim=64, vocab_size=tok.vocab_size)
  model = Transformer(cfg)
  params = model.init(jax.random.key(0), jnp.asarray(batch['inputs']))
  loss = lambda b: float(next_token_loss(params, {k: jnp.asarray(v) for k, v in b.items()},
                                         model.apply).total)
  mask = batch['loss_mask']
  assert 0 < mask.sum() < (batch['segment_ids'] > 0).sum()  # prompts present and masked
  base = loss(batch)
  prompt_changed = dict(batch, targets=np.where(mask == 0, (batch['targets'] + 7) % tok.vocab_size,
                                                batch['targets']))
  assert loss(prompt_changed) == base
  r, i = np.argwhere(mask == 1)[0]
  completion_changed = dict(batch, targets=batch['targets'].copy())
  completion_changed['targets'][r, i] = (completion_changed['targets'][r, i] + 7) % tok.vocab_size
  assert loss(completion_changed) != base


@pytest.mark.slow
def test_train_and_evaluate_learns_the_completions(sft_jsonl, tmp_path):
  """The whole job (the fastest loop-test settings, 40 steps, seed fixed by the config) on the
  SFT file from the config: the completions are five colours after a copied number, so the
  model learns them fast and the loss on them falls to a third of the first step's (~6.3; a
  uniform guess over the 400 pieces is 6.0)."""
  from test_loop import losses, tiny_config
  from llmjax.train.loop import train_and_evaluate

  c = tiny_config(steps=40, eval_every=40)
  c.data.path, c.data.format, c.data.vocab_size = sft_jsonl, 'prompt_completion', 400
  out = train_and_evaluate(c, str(tmp_path))
  assert out['step'] == 40
  got = losses(tmp_path)
  assert sorted(got) == list(range(1, 41))
  assert got[1] > 5.0  # it starts from nothing
  assert max(got[38], got[39], got[40]) < got[1] / 3, got
