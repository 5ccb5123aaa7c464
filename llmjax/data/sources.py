"""Document sources: in-memory lists, local .txt/.jsonl files (as a TFDS dataset), TFDS names.

Every source is random-access (`len` and `__getitem__`), which Grain needs for a seeded global
shuffle and for checkpointing the iterator as a handful of integers.

Local files are converted once into a TFDS dataset in ArrayRecord format under
WORKDIR/tfds/ and read back with `as_data_source`: no TensorFlow is involved, and later runs
(and every host of a pod) reuse the prepared files. Each document is one JSONL object's text
field, or one blank-line-separated paragraph of a .txt file (paragraphs keep the unit of
meaning together while giving the shuffle something finer than whole books).
"""

import functools
import glob
import hashlib
import json
import os

from llmjax.errors import DataError

# Every VALIDATION_EVERY-th document (in file order) is held out for evaluation.
VALIDATION_EVERY = 20


def resolve_files(pattern: str) -> list[str]:
  """The files a path or glob names, sorted; DataError when none or of an unknown kind."""
  files = sorted(f for f in glob.glob(pattern) if os.path.isfile(f))
  if not files:
    raise DataError(f"data.path='{pattern}' matches no file; pass an existing .txt/.jsonl file"
                    " or glob.")
  for f in files:
    if not f.endswith(('.txt', '.jsonl')):
      raise DataError(f"{f}: unsupported file type; data.path takes .txt and .jsonl files.")
  return files


def iter_documents(path: str, text_key: str = 'text'):
  """Yields the documents of one .txt/.jsonl file; a bad JSONL line raises `path:line: ...`."""
  if path.endswith('.jsonl'):
    with open(path, encoding='utf-8') as f:
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          obj = json.loads(line)
        except json.JSONDecodeError as e:
          raise DataError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno}); fix or"
                          " delete that line.") from None
        if not isinstance(obj, dict) or text_key not in obj:
          raise DataError(f"{path}:{n}: no '{text_key}' field; set data.text_key to the field"
                          " that holds the text.")
        if not isinstance(obj[text_key], str):
          raise DataError(f"{path}:{n}: field '{text_key}' is not a string.")
        if obj[text_key]:
          yield obj[text_key]
  else:
    with open(path, encoding='utf-8') as f:
      paragraph = []
      for line in f:
        if line.strip():
          paragraph.append(line)
        elif paragraph:
          yield ''.join(paragraph).rstrip('\n')
          paragraph = []
      if paragraph:
        yield ''.join(paragraph).rstrip('\n')


def _validate_files(files: list[str], text_key: str) -> int:
  """Reads every file once before anything is written; returns the document count."""
  count = sum(1 for f in files for _ in iter_documents(f, text_key))
  if count == 0:
    raise DataError(f"data.path: {', '.join(files)} hold no documents (empty corpus).")
  if count < VALIDATION_EVERY:
    raise DataError(f"data.path holds {count} documents; at least {VALIDATION_EVERY} are needed"
                    " to hold out a validation split.")
  return count


@functools.cache
def _builder_class():
  import tensorflow_datasets as tfds

  # Not registered in the TFDS catalog: it is not a named public dataset, and registering
  # would clash when the class is built again in another process or test.
  class LocalText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Local .txt/.jsonl files as a TFDS dataset with 'train' and 'validation' splits."""
    VERSION = tfds.core.Version('1.0.0')

    def __init__(self, *, files, text_key, **kwargs):
      self._files, self._text_key = files, text_key
      super().__init__(**kwargs)

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, features=tfds.features.FeaturesDict({'text': tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples(False),
              'validation': self._generate_examples(True)}

    def _generate_examples(self, validation):
      n = 0
      for f in self._files:
        for doc in iter_documents(f, self._text_key):
          if (n % VALIDATION_EVERY == VALIDATION_EVERY - 1) == validation:
            yield n, {'text': doc}
          n += 1

  return LocalText


def local_files_source(pattern: str, text_key: str, data_dir: str) -> dict:
  """{'train': source, 'validation': source} for local files, prepared once under data_dir.

  The prepared copy is keyed by the files' paths, sizes and modification times, so editing a
  file builds a new one instead of silently reusing stale data.
  """
  files = [os.path.abspath(f) for f in resolve_files(pattern)]
  key = hashlib.sha256(json.dumps(
      [text_key] + [(f, os.path.getsize(f), os.path.getmtime(f)) for f in files]).encode())
  data_dir = os.path.join(data_dir, key.hexdigest()[:16])
  builder = _builder_class()(files=files, text_key=text_key, data_dir=data_dir,
                             file_format='array_record')
  if not os.path.isdir(builder.data_dir) or not builder.is_prepared():
    _validate_files(files, text_key)
    builder.download_and_prepare()
  return {split: TextSource(builder.as_data_source(split)) for split in ('train', 'validation')}


def tfds_source(name: str, text_key: str, data_dir: str | None = None) -> dict:
  """A TFDS catalog dataset (downloaded and prepared by TFDS on first use; needs network)."""
  import tensorflow_datasets as tfds
  try:
    builder = tfds.builder(name, data_dir=data_dir, file_format='array_record')
  except Exception as e:  # tfds raises its own DatasetNotFoundError subclasses
    raise DataError(f"data.tfds_name='{name}': {str(e).splitlines()[0]}") from None
  builder.download_and_prepare(file_format='array_record')
  splits = builder.info.splits
  val = 'validation' if 'validation' in splits else 'test'
  return {'train': TextSource(builder.as_data_source('train'), text_key),
          'validation': TextSource(builder.as_data_source(val), text_key)}


class TextSource:
  """Random-access documents as `str`, from a source of str, bytes or dicts holding them."""

  def __init__(self, source, text_key: str = 'text'):
    self.source, self.text_key = source, text_key

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    x = self.source[i]
    if isinstance(x, dict):
      x = x[self.text_key]
    return x.decode('utf-8') if isinstance(x, bytes) else x


def in_memory_source(texts: list[str]) -> TextSource:
  if not texts:
    raise DataError("the corpus is empty: no documents to train on.")
  return TextSource(list(texts))
