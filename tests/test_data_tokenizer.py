"""Tokenizer tests: exact round trips through byte fallback, special ids, bad model files."""

import pickle

import pytest
import sentencepiece as spm

from llmjax.data import SentencePieceTokenizer, Tokenizer, default_corpus
from llmjax.errors import DataError

# Nothing here occurs in the training corpus below: other scripts, emoji, tabs, runs of
# spaces, CRLF, leading/trailing whitespace, an empty string.
UNSEEN = ['你好，世界！这是测试。', 'emoji 🎉🚀👩‍👩‍👧 done', 'def f(x):\n\treturn  x  +  1\n\n',
          '   leading and trailing   ', 'naïve café Ωμέγα', 'tab\tand\r\nCRLF\r\n', '',
          'x = {"k": [1, 2, 3]}  # 12345678901234567890']


@pytest.fixture(scope='module', params=['bpe', 'unigram'])
def trained(request, tmp_path_factory):
  texts = default_corpus('train')[:1500]
  path = tmp_path_factory.mktemp(request.param) / 'tokenizer.model'
  return texts, SentencePieceTokenizer.train(texts, str(path), 400, request.param)


def test_round_trip_is_exact_on_text_unseen_in_training(trained):
  texts, tok = trained
  corpus = '\n'.join(texts)
  assert not {'你', '🎉', 'é', '\t', '\r'} & set(corpus) and '  ' not in corpus  # really unseen
  for text in UNSEEN:
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
  for text in texts[:50]:
    assert tok.decode(tok.encode(text)) == text


def test_special_ids_are_fixed_and_not_added_by_encode(trained):
  texts, tok = trained
  assert isinstance(tok, Tokenizer)
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
  assert tok.vocab_size == 400
  ids = tok.encode(texts[0])
  assert tok.bos_id not in ids and tok.eos_id not in ids and tok.pad_id not in ids
  # Digits are split, so arithmetic is learnt digit by digit.
  assert [tok.decode([i]) for i in tok.encode('2024')] == ['2', '0', '2', '4']


def test_pickles_for_grain_workers(trained):
  _, tok = trained
  copy = pickle.loads(pickle.dumps(tok))
  assert copy.encode(UNSEEN[1]) == tok.encode(UNSEEN[1]) and copy.vocab_size == tok.vocab_size


def test_vocab_size_is_a_soft_limit_on_a_small_corpus(tmp_path):
  tok = SentencePieceTokenizer.train(['ab ab abc'] * 20, str(tmp_path / 't.model'), 5000)
  assert 256 < tok.vocab_size < 5000 and tok.decode(tok.encode('abc 你')) == 'abc 你'


def test_training_is_reproducible_with_sampling_and_long_lines(tmp_path):
  # Documents that are single 6,000-character lines (sentencepiece skips lines over 4,192
  # bytes), and more lines than max_sentences, so the sample is taken.
  texts = [' '.join(default_corpus('train')[i:i + 40]) for i in range(0, 2000, 40)]
  assert min(map(len, texts)) > 4200
  a = SentencePieceTokenizer.train(texts, str(tmp_path / 'a.model'), 400, max_sentences=200)
  b = SentencePieceTokenizer.train(texts, str(tmp_path / 'b.model'), 400, max_sentences=200)
  assert open(a.path, 'rb').read() == open(b.path, 'rb').read()
  assert a.vocab_size == 400 and len(a.encode(texts[0])) < 0.7 * len(texts[0])  # real merges


def test_bad_inputs_name_the_file_and_the_fix(tmp_path):
  with pytest.raises(DataError, match=f'tokenizer {tmp_path}/nope.model does not exist'):
    SentencePieceTokenizer.load(str(tmp_path / 'nope.model'))
  good = SentencePieceTokenizer.train(['hello world'] * 30, str(tmp_path / 'good.model'), 300)
  (tmp_path / 'cut.model').write_bytes(open(good.path, 'rb').read()[:500])  # truncated
  for name in ('cut.model',):
    with pytest.raises(DataError, match=f'{name} is not a valid sentencepiece model'):
      SentencePieceTokenizer.load(str(tmp_path / name))
  with pytest.raises(DataError, match='empty corpus'):
    SentencePieceTokenizer.train(['', '\n \n'], str(tmp_path / 'e.model'), 300)
  with pytest.raises(DataError, match="tokenizer_type='wordpiece'"):
    SentencePieceTokenizer.train(['a'], str(tmp_path / 'w.model'), 300, 'wordpiece')
  with pytest.raises(DataError, match='raise data.vocab_size'):
    SentencePieceTokenizer.train(['héllo wörld 你好'] * 10, str(tmp_path / 's.model'), 100)
  assert not (tmp_path / 's.model').exists()  # a failed training writes nothing


def test_a_model_without_bos_eos_is_refused(tmp_path):
  spm.SentencePieceTrainer.train(sentence_iterator=iter(['hello world'] * 30),
                                 model_prefix=str(tmp_path / 'nobos'), vocab_size=10,
                                 bos_id=-1, eos_id=-1, minloglevel=2)
  with pytest.raises(DataError, match='defines no BOS/EOS piece'):
    SentencePieceTokenizer.load(str(tmp_path / 'nobos.model'))
