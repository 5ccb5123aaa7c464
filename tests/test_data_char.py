"""The char tokenizer (data.tokenizer_type='char') and the tail split (data.split='tail')."""

import ml_collections
import numpy as np
import pytest

from llmjax.data import pipeline, sources
from llmjax.data.tokenizer import CharTokenizer, load_file
from llmjax.errors import ConfigError, DataError


def test_char_tokenizer_round_trip_save_and_load(tmp_path):
  text = 'To be, or not to be:\nthat is the question. Ünïcode ok\n'
  path = str(tmp_path / 'char_tokenizer.json')
  tok = CharTokenizer.train([text[:20], text[20:]], path)
  chars = sorted(set(text))
  assert tok.vocab_size == len(chars) + 1 and tok.pad_id == 0
  assert tok.bos_id == tok.eos_id == -1  # one continuous text: nothing between documents
  ids = tok.encode(text)
  assert ids == [chars.index(c) + 1 for c in text]  # nanoGPT's stoi, shifted past padding
  assert tok.decode(ids) == text
  assert tok.decode([0] + ids[:3] + [tok.vocab_size, 0]) == text[:3]  # pad / past vocab dropped
  again = load_file(path)
  assert isinstance(again, CharTokenizer) and again.encode(text) == ids
  with pytest.raises(DataError, match=r"character 'Z' \(U\+005A\) is not in the char"):
    tok.encode('Zebra')


def test_char_tokenizer_bad_files(tmp_path):
  with pytest.raises(DataError, match='does not exist'):
    CharTokenizer.load(str(tmp_path / 'nope.json'))
  bad = tmp_path / 'bad.json'
  for content in ('not json', '{"type": "bpe"}', '{"type": "char", "chars": "aa"}'):
    bad.write_text(content)
    with pytest.raises(DataError, match='is not a char tokenizer file'):
      CharTokenizer.load(str(bad))
  with pytest.raises(DataError, match='empty corpus'):
    CharTokenizer.train([''], str(tmp_path / 'e.json'))


def _data_cfg(path, **kw):
  d = dict(path=str(path), tfds_name='', format='text', text_key='text', seq_len=8,
           tokenizer_path='', vocab_size=0, tokenizer_type='char', split='tail',
           val_fraction=0.1, eval_batches=1)
  d.update(kw)
  return ml_collections.ConfigDict(d)


def test_tail_split_is_nanogpts_and_windows_cover_every_character(tmp_path):
  rng = np.random.default_rng(0)
  text = ''.join(rng.choice(list('abc \n'), 1003))
  f = tmp_path / 'a.txt'
  f.write_text(text)
  srcs = pipeline.get_sources(_data_cfg(f), str(tmp_path / 'w'))
  n = len(text)
  train, val = text[:int(n * 0.9)], text[int(n * 0.9):]  # nanoGPT's prep.py
  for split, want in (('train', train), ('validation', val)):
    docs = [srcs[split][i] for i in range(len(srcs[split]))]
    assert all(len(d) == 9 for d in docs[:-1])  # seq_len + 1: one row each
    # Consecutive windows share one character, so dropping it rebuilds the split.
    assert docs[0] + ''.join(d[1:] for d in docs[1:]) == want
  tok = pipeline.build_tokenizer(_data_cfg(f), str(tmp_path / 'w'), srcs['train'])
  assert tok.chars == ''.join(sorted(set(train)))
  assert pipeline.run_tokenizer_path(str(tmp_path / 'w')).endswith('char_tokenizer.json')
  assert pipeline.load_run_tokenizer(str(tmp_path / 'w')).chars == tok.chars


def test_full_split_batches_score_every_target_once(tmp_path):
  text = 'the quick brown fox jumps over the lazy dog\n' * 30
  f = tmp_path / 'a.txt'
  f.write_text(text)
  _, _, eval_batches = pipeline.build_data(_data_cfg(f, val_fraction=0.25), str(tmp_path / 'w'),
                                           seed=0, batch_size=4)
  full = eval_batches(full=True)
  val = text[int(len(text) * 0.75):]
  mask = np.concatenate([b['loss_mask'] for b in full]) > 0
  targets = np.concatenate([b['targets'] for b in full])[mask]
  tok = CharTokenizer.load(str(tmp_path / 'w' / 'char_tokenizer.json'))
  assert tok.decode(targets) == val[1:]  # every character after the first, in order
  assert all(b['inputs'].shape == (4, 8) for b in full)  # the last batch padded
  assert len(eval_batches()) == 1  # the usual eval keeps data.eval_batches


def test_tail_split_bad_config(tmp_path):
  f = tmp_path / 'a.txt'
  f.write_text('abc' * 10)
  with pytest.raises(ConfigError, match="data.split='nope' is not one of"):
    sources.check_data_format(_data_cfg(f, split='nope'))
  with pytest.raises(ConfigError, match='data.val_fraction=1.5 must be in'):
    sources.check_data_format(_data_cfg(f, val_fraction=1.5))
  with pytest.raises(ConfigError, match="needs data.path"):
    sources.check_data_format(_data_cfg(''))
  j = tmp_path / 'a.jsonl'
  j.write_text('{"text": "abc"}\n')
  with pytest.raises(DataError, match="reads .txt files as one text"):
    sources.tail_split_source(str(j), 0.1, 8)
  with pytest.raises(ConfigError, match="needs data.format='text'"):
    sources.check_data_format(_data_cfg(j, format='prompt_completion'))
