"""A gs:// workdir end to end (train, resume, generate), with GCS mocked by etils.epath.

`etils.epath.testing.mock_epath` swaps epath's backends for one whose functions we wrap: every
`gs://bucket/...` path is served from BUCKET_ROOT/bucket/..., with GCS's semantics where they
differ from a disk (writing an object needs no parent "directory"). Nothing else is patched in
the workdir's file I/O, so a local-only call left on the gs:// path (`open`, `os.path.exists`,
`os.makedirs`, `os.path.abspath`) either misses the files or creates a literal 'gs:' folder in
the working directory, which the tests check stays empty.

Orbax is the exception: it writes arrays through tensorstore, whose own GCS driver the epath
mock cannot redirect. The tests therefore patch `checkpoint.checkpoint_dir` (the one function
that turns a workdir into Orbax's directory) to apply the same gs:// -> BUCKET_ROOT mapping,
so checkpoints land in the mocked bucket too; Orbax's native gs:// support is not exercised.
"""

import contextlib
import json
import os

import pytest
from etils import epath
from etils.epath import gpath
from etils.epath import testing as epath_testing

from llmjax import config as config_lib
from llmjax import files
from llmjax import generate as generate_lib
from llmjax.data import pipeline
from llmjax.errors import ConfigError
from llmjax.train import checkpoint
from llmjax.train import metrics as metrics_lib
from llmjax.train.loop import train_and_evaluate

from test_loop import tiny_config

WORKDIR = 'gs://bucket/run'


def _to_local(root: str, path) -> str:
  path = os.fspath(path)
  return os.path.join(root, path[len('gs://'):]) if path.startswith('gs://') else path


def _to_gs(root: str, path) -> str:
  path = os.fspath(path)
  return 'gs://' + os.path.relpath(path, root) if path.startswith(root + os.sep) else path


@contextlib.contextmanager
def mock_gcs(root: str):
  """Serves gs://bucket/x from root/bucket/x for every epath call."""
  loc = lambda p: _to_local(root, p)

  def open_(fn, path, mode):
    if any(m in mode for m in 'wa'):  # an object's "parent directory" need not exist
      os.makedirs(os.path.dirname(loc(path)), exist_ok=True)
    return fn(loc(path), mode)

  def back(asked, path):  # results of a gs:// query name gs:// paths; local ones stay local
    return _to_gs(root, path) if os.fspath(asked).startswith('gs://') else path

  def walk(fn, top, **kw):
    for d, dirs, names in fn(loc(top), **kw):
      yield back(top, d), dirs, names

  one = lambda fn, path, **kw: fn(loc(path), **kw)
  two = lambda fn, path, dst, **kw: fn(loc(path), loc(dst), **kw)
  with epath_testing.mock_epath(
      open=open_, exists=one, isdir=one, listdir=one, makedirs=one, mkdir=one, remove=one,
      rmtree=one, stat=one, copy=two, rename=two, replace=two, walk=walk,
      glob=lambda fn, pattern: [back(pattern, p) for p in fn(loc(pattern))]):
    yield


@pytest.fixture
def gcs(tmp_path, monkeypatch):
  """A mocked bucket (returned: its local root) and an empty cwd that must stay empty."""
  root = str(tmp_path / 'gcs')
  os.makedirs(root)
  cwd = tmp_path / 'cwd'
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  # With TensorFlow installed epath would pick tf.io.gfile for gs://, around the mock.
  monkeypatch.setattr(gpath, '_is_tf_installed', lambda: False)
  local_ckpt = checkpoint.checkpoint_dir
  monkeypatch.setattr(checkpoint, 'checkpoint_dir', lambda w: _to_local(root, local_ckpt(w)))
  with mock_gcs(root):
    yield root
  assert os.listdir(cwd) == [], 'a local-only call wrote a gs:// path relative to the cwd'
  assert not os.path.exists('/gs:') and not os.path.exists('/gs')


def _rows(root):
  text = open(os.path.join(root, 'bucket/run/metrics.jsonl')).read()
  return [json.loads(l) for l in text.splitlines()]


def test_gs_workdir_trains_resumes_and_generates(gcs, capsys, monkeypatch):
  run = os.path.join(gcs, 'bucket/run')
  # Upload at every logged step, so the mid-run rewrite/upload path runs too, not only close.
  monkeypatch.setattr(metrics_lib.MetricsLogger, 'REMOTE_SYNC_EVERY_S', 0.0)
  out = train_and_evaluate(tiny_config(steps=6, stop_at_step=3, eval_every=3), WORKDIR)
  assert out['step'] == 3
  for name in ('metrics.jsonl', 'config.json', 'model_config.json', 'tokenizer.model',
               'loss_curve.png'):
    assert os.path.isfile(os.path.join(run, name)), name
  assert sorted(os.listdir(os.path.join(run, 'checkpoints'))) == ['3']
  assert any(f.startswith('events') for f in os.listdir(os.path.join(run, 'tensorboard')))
  assert json.load(open(os.path.join(run, 'config.json')))['train']['steps'] == 6
  first = _rows(gcs)
  assert [r['step'] for r in first if 'loss' in r] == [1, 2, 3]
  tokenizer_bytes = open(os.path.join(run, 'tokenizer.model'), 'rb').read()

  out = train_and_evaluate(tiny_config(steps=6, eval_every=3), WORKDIR)  # resumes at step 3
  assert out['step'] == 6
  rows = _rows(gcs)
  assert rows[:len(first)] == first  # earlier lines kept: the object was not just overwritten
  assert [r['step'] for r in rows if 'loss' in r] == [1, 2, 3, 4, 5, 6]
  assert 'unigram_perplexity' not in rows[-1] and sum('unigram_perplexity' in r for r in rows) == 1
  assert sorted(os.listdir(os.path.join(run, 'checkpoints'))) == ['3', '6']
  assert open(os.path.join(run, 'tokenizer.model'), 'rb').read() == tokenizer_bytes  # reused
  assert len([f for f in os.listdir(os.path.join(run, 'tensorboard'))
              if f.startswith('events')]) == 2  # one events file per run, none overwritten

  capsys.readouterr()
  rc = generate_lib.main([f'--workdir={WORKDIR}', '--prompt=Once upon a time',
                          '--max_new_tokens=4', '--temperature=0', '--json'])
  assert rc == 0
  got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert len(got['ids']) == 4 and isinstance(got['text'], str)


def test_append_only_text_keeps_earlier_lines_on_gcs(gcs):
  path = 'gs://bucket/x/metrics.jsonl'
  log = files.AppendOnlyText(path)
  log.write('a\n')
  assert not os.path.exists(os.path.join(gcs, 'bucket/x/metrics.jsonl'))  # not until flushed
  log.close()
  log = files.AppendOnlyText(path)
  log.write('b\n')
  log.flush()
  assert epath.Path(path).read_text() == 'a\nb\n'
  log.close()


def test_local_mirror_uploads_changed_files(gcs):
  mirror = files.LocalMirror('gs://bucket/tb')
  assert not files.is_remote(mirror.local) and mirror.local != 'gs://bucket/tb'
  with open(os.path.join(mirror.local, 'events.1'), 'w') as f:
    f.write('x')
  mirror.sync()
  with open(os.path.join(mirror.local, 'events.1'), 'a') as f:
    f.write('y')
  mirror.close()
  assert open(os.path.join(gcs, 'bucket/tb/events.1')).read() == 'xy'
  assert not os.path.exists(mirror.local)


def test_write_bytes_and_download_dir_on_gcs(gcs):
  files.write_bytes('gs://bucket/d/a.json', b'{}')
  files.write_text('gs://bucket/d/b.txt', 'hi')
  assert files.same_bytes('gs://bucket/d/a.json', os.path.join(gcs, 'bucket/d/a.json'))
  with files.download_dir('gs://bucket/d', ['a.json']) as local:
    assert os.listdir(local) == ['a.json']
    assert open(os.path.join(local, 'a.json'), 'rb').read() == b'{}'
  assert not os.path.exists(local)


def test_gs_data_path_is_refused_and_tfds_cache_stays_local(gcs, monkeypatch, tmp_path):
  c = tiny_config()
  c.data.path = 'gs://bucket/data/*.jsonl'
  for check in (lambda: config_lib.validate(c), lambda: pipeline.get_sources(c.data, WORKDIR)):
    with pytest.raises(ConfigError, match=r"data.path='gs://bucket/data/\*.jsonl' is not on local"):
      check()
  monkeypatch.setenv('LLMJAX_CACHE_DIR', str(tmp_path / 'cache'))
  assert pipeline.tfds_dir(WORKDIR) == str(tmp_path / 'cache' / 'tfds')
  assert pipeline.tfds_dir('/runs/a') == '/runs/a/tfds'


def test_resolve_keeps_urls_and_makes_local_paths_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert files.resolve('gs://bucket/run/') == 'gs://bucket/run'
  assert files.resolve('run') == str(tmp_path / 'run')
  assert checkpoint.checkpoint_dir('gs://bucket/run') == 'gs://bucket/run/checkpoints'
  assert checkpoint.checkpoint_dir('run') == str(tmp_path / 'run' / 'checkpoints')


def test_tokenizer_path_on_gcs_is_copied_into_a_gs_workdir(gcs):
  from llmjax.data import corpus
  from llmjax.data.tokenizer import SentencePieceTokenizer
  from llmjax.errors import DataError
  texts = corpus.default_corpus('train')[:200]
  SentencePieceTokenizer.train(texts, 'gs://bucket/tok.model', 400)  # trained into the bucket
  c = tiny_config()
  c.data.tokenizer_path = 'gs://bucket/tok.model'
  config_lib.validate(c)  # exists on gs://: no "does not exist" error
  tok = pipeline.build_tokenizer(c.data, WORKDIR, train_source=None)
  assert files.same_bytes('gs://bucket/tok.model', f'{WORKDIR}/tokenizer.model')
  assert pipeline.load_run_tokenizer(WORKDIR).encode('hello') == tok.encode('hello')
  SentencePieceTokenizer.train(texts[:100], 'gs://bucket/other.model', 380)
  c.data.tokenizer_path = 'gs://bucket/other.model'
  with pytest.raises(DataError, match='differs from data.tokenizer_path'):
    pipeline.build_tokenizer(c.data, WORKDIR, train_source=None)


def test_convert_round_trip_through_a_gs_workdir(gcs, tmp_path):
  from llmjax import convert
  from test_interop_hf import golden, stored_tensors
  src, _, _ = golden('llama_mqa_tied_linear')
  work, out = 'gs://bucket/conv', str(tmp_path / 'hf')
  assert convert.main(['--from=hf', f'--src={src}', f'--dst={work}']) == 0
  assert os.path.isfile(os.path.join(gcs, 'bucket/conv/model_config.json'))
  assert os.path.isfile(os.path.join(gcs, 'bucket/conv/tokenizer.model'))
  assert convert.main(['--to=hf', f'--src={work}', f'--dst={out}']) == 0
  ours, theirs = stored_tensors(out), stored_tensors(src)
  assert sorted(ours) == sorted(theirs)
  assert os.path.isfile(os.path.join(out, 'tokenizer.model'))  # via the local temp copy
  assert convert.main(['--from=hf', f'--src={src}', f'--dst={work}']) == 1  # already there
