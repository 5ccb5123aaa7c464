"""Source tests: local .txt/.jsonl files through a TFDS ArrayRecord dataset with TensorFlow
unimportable, the catalog path on a locally registered dataset, and one-line bad-input errors."""

import json
import sys

import numpy as np
import pytest

from llmjax.data import local_files_source, tfds_source
from llmjax.data import sources
from llmjax.errors import DataError


@pytest.fixture
def no_tensorflow():
  """The test must not import TensorFlow: not installed here, so an import would fail; where
  it is installed, it must still be absent from sys.modules afterwards."""
  if 'tensorflow' in sys.modules:
    pytest.skip('tensorflow was already imported by another test')
  yield
  assert 'tensorflow' not in sys.modules


def _all(src):
  return [src[i] for i in range(len(src))]


def test_jsonl_and_txt_round_trip_through_tfds_without_tensorflow(tmp_path, no_tensorflow):
  docs = [f'json doc {i}: 你好 🎉\n\tindented  twice' for i in range(30)]
  (tmp_path / 'a.jsonl').write_text(
      ''.join(json.dumps({'id': i, 'content': d}) + '\n' + ('\n' if i % 7 == 0 else '')
              for i, d in enumerate(docs)))
  paragraphs = [f'para {i}\nsecond line of {i}' for i in range(25)]
  (tmp_path / 'b.txt').write_text('\n\n\n'.join(paragraphs) + '\n')
  for pattern, key, want in (('a.jsonl', 'content', docs), ('b.txt', 'text', paragraphs),
                             ('*.*', 'content', docs + paragraphs)):
    srcs = local_files_source(str(tmp_path / pattern), key, str(tmp_path / 'tfds'))
    train, val = _all(srcs['train']), _all(srcs['validation'])
    assert sorted(val) == sorted(want[19::20])  # every 20th document, in file order
    assert sorted(train + val) == sorted(want)  # nothing lost, changed or duplicated
    assert all(isinstance(t, str) for t in train)
  assert list((tmp_path / 'tfds').rglob('*.array_record*'))


def test_prepared_copy_is_reused_until_a_file_changes(tmp_path):
  path = tmp_path / 'a.jsonl'
  path.write_text(''.join(json.dumps({'text': f'v1 {i}'}) + '\n' for i in range(20)))
  first = local_files_source(str(path), 'text', str(tmp_path / 'tfds'))
  assert len(list((tmp_path / 'tfds').iterdir())) == 1
  local_files_source(str(path), 'text', str(tmp_path / 'tfds'))  # reused
  assert len(list((tmp_path / 'tfds').iterdir())) == 1
  path.write_text(''.join(json.dumps({'text': f'v2 {i}'}) + '\n' for i in range(21)))
  second = local_files_source(str(path), 'text', str(tmp_path / 'tfds'))
  assert len(list((tmp_path / 'tfds').iterdir())) == 2
  assert first['train'][0].startswith('v1') and second['train'][0].startswith('v2')


def test_long_txt_paragraphs_are_cut_at_line_boundaries(tmp_path):
  lines = [f'line {i} ' + 'z' * 90 + '\r\n' for i in range(1000)]  # ~100 KB, no blank line
  path = tmp_path / 'book.txt'
  path.write_bytes(''.join(lines).encode())
  docs = list(sources.iter_documents(str(path)))
  assert len(docs) == 4 and all(len(d) <= sources.MAX_TXT_DOCUMENT_CHARS + 200 for d in docs)
  assert '\n'.join(docs) + '\n' == ''.join(lines).replace('\r\n', '\n')  # CRLF -> LF, no loss


@pytest.mark.parametrize('content, match', [
    ('{"text": "a"}\n{"text": "b"}\n{"text": "c\n', r'file\.jsonl:3: invalid JSON .*; fix or'
     ' delete that line'),
    ('{"text": "a"}\n\n{"text": "b"}\n[1, 2]\n', r"file\.jsonl:4: no 'text' field; set"
     ' data.text_key'),
    ('{"text": "a"}\n{"txt": "b"}\n', r"file\.jsonl:2: no 'text' field; .* Did you mean 'txt'"),
    ('{"text": "a"}\n{"text": 5}\n', r"file\.jsonl:2: field 'text' is a int, not a string"),
    ('{"text": "a"}\n{"text": "b"}\n{"text": "trunc', r'file\.jsonl:3: invalid JSON'),
])
def test_bad_jsonl_names_file_and_line_before_writing_anything(tmp_path, content, match):
  path = tmp_path / 'file.jsonl'
  path.write_text(content + '{"text": "more"}\n' * 30 if content.endswith('\n') else content)
  with pytest.raises(DataError, match=match) as e:
    local_files_source(str(path), 'text', str(tmp_path / 'tfds'))
  assert str(path) in str(e.value) and '\n' not in str(e.value)
  assert not list(tmp_path.rglob('*.array_record*'))


def test_bad_files_and_empty_corpora(tmp_path, caplog):
  with pytest.raises(DataError, match=r"data.path='.*nothing\*.jsonl' matches no file"):
    local_files_source(str(tmp_path / 'nothing*.jsonl'), 'text', str(tmp_path / 'tfds'))
  (tmp_path / 'empty.txt').write_text('\n  \n\n')
  with pytest.raises(DataError, match='empty corpus'):
    local_files_source(str(tmp_path / 'empty.txt'), 'text', str(tmp_path / 'tfds'))
  (tmp_path / 'few.jsonl').write_text(''.join(f'{{"text": "x{i}"}}\n' for i in range(5)))
  with caplog.at_level('WARNING'):
    few = local_files_source(str(tmp_path / 'few.jsonl'), 'text', str(tmp_path / 'tfds'))
  assert 'holds 5 documents, fewer than 20: no validation split' in caplog.text
  assert sorted(few['train'][i] for i in range(5)) == [f'x{i}' for i in range(5)]
  assert len(few['validation']) == 0
  (tmp_path / 'data.csv').write_text('a,b\n')
  with pytest.raises(DataError, match='data.csv: unsupported file type'):
    local_files_source(str(tmp_path / 'data.csv'), 'text', str(tmp_path / 'tfds'))
  (tmp_path / 'latin1.txt').write_bytes(b'ok\n\ncaf\xe9\n')
  with pytest.raises(DataError, match=r'latin1\.txt:3: not valid UTF-8'):
    local_files_source(str(tmp_path / 'latin1.txt'), 'text', str(tmp_path / 'tfds'))
  with pytest.raises(DataError, match='corpus is empty'):
    sources.in_memory_source([])
  with pytest.raises(DataError, match='document 1 is a bytes'):
    sources.in_memory_source(['a', b'b'])


def test_held_out_views_match_a_plain_index_split():
  items = list(range(103))
  train, val = (sources._HeldOut(items, 20, h) for h in (False, True))
  assert [val[i] for i in range(len(val))] == [i for i in items if i % 20 == 19]
  assert [train[i] for i in range(len(train))] == [i for i in items if i % 20 != 19]


def test_tfds_catalog_path_on_a_locally_registered_dataset(tmp_path, no_tensorflow):
  """The same calls a catalog name takes (tfds.data_source by name), on a builder registered
  here, so no network is needed. It has only a 'train' split, so validation is held out."""
  import tensorflow_datasets as tfds

  class LlmjaxTinyCatalogTest(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {'body': tfds.features.Text(), 'n': tfds.features.Scalar(dtype=np.int32)}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples()}

    def _generate_examples(self):
      for i in range(40):
        yield i, {'body': f'example {i} ✓', 'n': i}

  name = 'llmjax_tiny_catalog_test'
  srcs = tfds_source(name, 'body', data_dir=str(tmp_path))
  train, val = _all(srcs['train']), _all(srcs['validation'])
  assert len(val) == 2 and sorted(train + val) == sorted(f'example {i} ✓' for i in range(40))
  with pytest.raises(DataError, match="no feature 'text' .*'body'"):
    tfds_source(name, 'text', data_dir=str(tmp_path))
  with pytest.raises(DataError, match="data.tfds_name='llmjax_no_such_dataset' is not in"):
    tfds_source('llmjax_no_such_dataset', 'text', data_dir=str(tmp_path))
