"""Workdir file I/O that works the same for a local directory and a gs:// (or other URL) one.

Every read and write of a workdir goes through `etils.epath`, which serves local paths with
`os`/`open` and gs:// with fsspec + gcsfs (the `tpu`/`gpu` extras install gcsfs). Three things
an object store cannot do shape the helpers here:
  - no rename: a local file is written to a temporary name and renamed, so a crash never leaves
    half a file; a GCS object appears whole or not at all, so it is written directly;
  - no append: `AppendOnlyText` keeps the text and rewrites the object;
  - libraries that only take local paths (sentencepiece training and loading, the tokenizers
    library, TensorBoard writers) get a local copy (`local_dir`, `download_dir`).
"""

import contextlib
import os
import shutil
import tempfile
from typing import Iterator

from etils import epath

from llmjax.errors import ConfigError


def is_remote(path) -> bool:
  """True for gs://, s3://, ... paths: those that the local filesystem cannot open."""
  return '://' in os.fspath(path)


def check_local(key: str, path: str) -> None:
  """ConfigError unless `path` (the value of config key `key`) is on local disk."""
  if is_remote(path):
    raise ConfigError(f"{key}='{path}' is not on local disk; copy the files to every host"
                      " (gcloud storage cp) and pass the local path or glob.")


def resolve(workdir: str) -> str:
  """A workdir as every module should see it: local paths absolute (a later chdir cannot move
  the run), URLs unchanged (`os.path.abspath('gs://b/r')` would make a local 'gs:' folder)."""
  workdir = os.fspath(workdir)
  return workdir.rstrip('/') if is_remote(workdir) else os.path.abspath(workdir)


def join(base: str, *names: str) -> str:
  """`os.path.join` that also suits URLs (posix separators; both are '/' where we run)."""
  return os.path.join(os.fspath(base), *names)


def exists(path) -> bool:
  """True if `path` names a file or a directory (a GCS 'directory' is a common prefix)."""
  return epath.Path(path).exists()


def isdir(path) -> bool:
  """True if `path` is a directory (or, on GCS, a prefix holding objects)."""
  return epath.Path(path).is_dir()


def makedirs(path) -> None:
  """Creates `path` and its parents if needed (a no-op for GCS, which has no directories)."""
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def read_text(path) -> str:
  """The UTF-8 text of `path`."""
  return epath.Path(path).read_text()


def read_bytes(path) -> bytes:
  """The bytes of `path`."""
  return epath.Path(path).read_bytes()


def write_bytes(path, data: bytes) -> None:
  """Writes `data` to `path` whole: readers never see a half-written file.

  Locally that takes a per-process temporary name and a rename (hosts sharing a workdir never
  collide); a GCS upload is atomic by itself.
  """
  path = os.fspath(path)
  if is_remote(path):
    epath.Path(path).write_bytes(data)
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'wb') as f:
    f.write(data)
  os.replace(tmp, path)


def write_text(path, text: str) -> None:
  """Writes `text` (UTF-8) to `path` whole, like `write_bytes`."""
  write_bytes(path, text.encode('utf-8'))


def copy_file(src, dst) -> None:
  """Copies one file; either side may be local or remote."""
  write_bytes(dst, read_bytes(src))


def same_bytes(a, b) -> bool:
  """True if the two files hold the same bytes."""
  return read_bytes(a) == read_bytes(b)


@contextlib.contextmanager
def download_dir(src, names=None) -> Iterator[str]:
  """A local directory holding `src`'s files (`names` only, if given): `src` itself when it is
  local, else a temporary copy deleted on exit. For libraries that read only local paths."""
  src = os.fspath(src)
  if not is_remote(src):
    yield src
    return
  with tempfile.TemporaryDirectory(prefix='llmjax-') as tmp:
    for f in epath.Path(src).iterdir():
      if (names is None or f.name in names) and not f.is_dir():
        (epath.Path(tmp) / f.name).write_bytes(f.read_bytes())
    yield tmp


class AppendOnlyText:
  """A text file that only grows (metrics.jsonl), on any filesystem.

  Locally it is an ordinary file opened with 'a'. An object store cannot append, so for a
  remote path the whole text (earlier runs' lines included, read when opened) is kept in memory
  and the object is rewritten by `flush`; metrics files are small (a few hundred bytes a line).
  """

  def __init__(self, path):
    self.path = os.fspath(path)
    self.remote = is_remote(self.path)
    if self.remote:
      p = epath.Path(self.path)
      self._text = p.read_text() if p.exists() else ''
      self._dirty = False
    else:
      self._f = open(self.path, 'a')

  def write(self, text: str) -> None:
    if self.remote:
      self._text += text
      self._dirty = True
    else:
      self._f.write(text)

  def flush(self) -> None:
    if not self.remote:
      self._f.flush()
    elif self._dirty:
      epath.Path(self.path).write_text(self._text)
      self._dirty = False

  def close(self) -> None:
    self.flush()
    if not self.remote:
      self._f.close()


class LocalMirror:
  """A local directory whose files are copied to `dst` on `sync` (remote `dst` only).

  For writers that take only local paths (tensorboardX without its optional GCS deps): they
  write to `self.local`, and `sync` uploads every file that changed since the last sync.
  For a local `dst`, `self.local` is `dst` itself and `sync` does nothing.
  """

  def __init__(self, dst):
    self.dst = os.fspath(dst)
    self.remote = is_remote(self.dst)
    self.local = tempfile.mkdtemp(prefix='llmjax-') if self.remote else self.dst
    self._sizes = {}

  def sync(self) -> None:
    if not self.remote:
      return
    for root, _, names in os.walk(self.local):
      for name in names:
        src = os.path.join(root, name)
        size = os.path.getsize(src)
        if self._sizes.get(src) != size:
          rel = os.path.relpath(src, self.local)
          with open(src, 'rb') as f:
            epath.Path(join(self.dst, rel)).write_bytes(f.read())
          self._sizes[src] = size

  def close(self) -> None:
    """Syncs a last time and removes the local copy."""
    self.sync()
    if self.remote:
      shutil.rmtree(self.local, ignore_errors=True)
