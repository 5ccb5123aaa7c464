import os
import shutil
import tempfile

import pytest

# Tests run on the CPU even where libtpu is installed (it comes with the test extra for TPU
# AOT-compile tests); several test processes may load libtpu at once.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

# The tests' programs are tiny, so nearly all their time is XLA compiling them; at LLVM -O1 the
# CPU backend compiles about twice as fast as at its default -O2 and runs them about as fast.
# (-O0 compiles as fast but changed float results enough, ~4e-6 relative, to fail a 1e-6
# tolerance in test_dpo.) Subprocesses inherit the flag (tests that set XLA_FLAGS for a
# subprocess append theirs to the inherited value). LLMJAX_TEST_XLA_O1=0 turns it off.
_O1 = '--xla_backend_optimization_level=1'
if (os.environ.get('LLMJAX_TEST_XLA_O1', '1') != '0'
    and 'xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', '')):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + _O1).strip()

# One JAX persistent compilation cache per pytest run. Many tests compile the very same tiny
# programs (the quickstart step, the tiny model's forward), in-process and in the CLI and
# multi-device subprocesses they start; compiling each once per run instead of once per test
# saves minutes. It is set here, at import, as environment variables: the pytest-xdist
# controller imports this file before it spawns its workers, so every worker and every
# subprocess inherits the same directory (a worker finds it already set and keeps it). The
# directory is made fresh for the run and removed at its end, so nothing carries over between
# runs and a clean checkout never depends on it. Entries are keyed by the HLO, the compile
# options and the backend, so a test can only ever load the executable of its own program.
# No max size (-1): with one, JAX takes a file lock around every read and write and, on every
# write, lists and stats the whole directory under that lock to find what to evict. The
# directory only grows during a run, so each write gets slower as the run goes on (0.4 s a
# write at 6,000 entries) and holds up every other worker's and subprocess's compiles.
# Nothing here needs eviction (the directory lives for one run). Without the lock
# a process may read an entry another is still writing; JAX then fails to decompress it,
# warns and compiles the program itself (compiler._cache_read), so a torn read costs one
# compile, never a wrong executable. Eager op-by-op code compiles thousands of trivial
# programs, so only compiles over 0.1 s are stored. LLMJAX_TEST_JAX_CACHE=0 turns it off.
_OWN_CACHE_DIR = None
if (os.environ.get('LLMJAX_TEST_JAX_CACHE', '1') != '0'
    and 'JAX_COMPILATION_CACHE_DIR' not in os.environ):
  _OWN_CACHE_DIR = tempfile.mkdtemp(prefix='llmjax-test-jax-cache-')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _OWN_CACHE_DIR
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.1')
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
  os.environ.setdefault('JAX_COMPILATION_CACHE_MAX_SIZE', '-1')


def pytest_unconfigure(config):
  # Only the process that made the directory (the xdist controller, or the one process of a
  # plain run) removes it, after every worker has finished.
  if _OWN_CACHE_DIR is not None:
    shutil.rmtree(_OWN_CACHE_DIR, ignore_errors=True)


# A test that kills its xdist worker (a native crash: a segfault or an abort inside XLA) is run
# once more on a fresh worker, and the rerun is named in the summary. Runs of the ~1,150 tests
# have seen about one such crash each, always a segfault inside XLA:CPU's compile or executable
# serialization (tests/test_train.py's chunked-loss test, tests/test_serve.py's engine thread),
# each passing on its rerun: a nondeterministic fault in the native runtime, not a wrong
# result. Ordinary failures are never rerun, and a test that crashes twice fails.
_CRASH_RERUNS: dict[str, int] = {}


@pytest.hookimpl(optionalhook=True)  # an xdist hook: absent under -p no:xdist
def pytest_handlecrashitem(crashitem, report, sched):
  if _CRASH_RERUNS.get(crashitem, 0) == 0 and hasattr(sched, 'mark_test_pending'):
    _CRASH_RERUNS[crashitem] = 1
    sched.mark_test_pending(crashitem)
    report.outcome = 'rerun'


def pytest_report_teststatus(report):
  if report.outcome == 'rerun':
    return 'rerun', 'R', 'RERUN'


def pytest_terminal_summary(terminalreporter):
  for nodeid in _CRASH_RERUNS:
    terminalreporter.write_line(f'rerun after a worker crash: {nodeid}')
