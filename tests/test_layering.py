"""Imports run one way: `llmjax.models` imports `llmjax.kernels`, never the reverse.

The kernels (and their `Mask`, references and dispatcher) must be importable without the model
layer, so that a kernel can be tested, benchmarked or reused alone and no import cycle can form.
Two checks: the import statements themselves (every `import`, also inside functions), and a
fresh interpreter that imports each kernel module with `llmjax.models` made unimportable.
"""

import ast
import os
import pathlib
import subprocess
import sys

import llmjax

ROOT = pathlib.Path(llmjax.__file__).parent
KERNEL_FILES = sorted((ROOT / 'kernels').glob('*.py'))
FORBIDDEN = 'llmjax.models'


def imported_modules(path: pathlib.Path) -> set[str]:
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0:
      names.add(node.module)
      names.update(f'{node.module}.{a.name}' for a in node.names)  # `from llmjax import models`
  return names


def test_kernel_files_do_not_import_the_model_layer():
  assert len(KERNEL_FILES) >= 7, KERNEL_FILES  # the glob found the package
  bad = {p.name: sorted(n for n in imported_modules(p)
                        if n == FORBIDDEN or n.startswith(FORBIDDEN + '.'))
         for p in KERNEL_FILES}
  assert not {k: v for k, v in bad.items() if v}


def test_the_ast_check_catches_an_import_of_the_model_layer(tmp_path):
  f = tmp_path / 'k.py'
  f.write_text('def f():\n  from llmjax import models\n  import llmjax.models.axes\n')
  assert {'llmjax.models', 'llmjax.models.axes'} <= imported_modules(f)


BLOCKED_IMPORT = '''
import importlib, sys

class Block:
  def find_spec(self, name, path=None, target=None):
    if name == {forbidden!r} or name.startswith({forbidden!r} + '.'):
      raise ImportError('blocked: ' + name)
    return None

sys.meta_path.insert(0, Block())
for name in {modules!r}:
  importlib.import_module(name)
assert not any(m == {forbidden!r} or m.startswith({forbidden!r} + '.') for m in sys.modules)
print('ok')
'''


def run_blocked(modules: list[str]) -> subprocess.CompletedProcess:
  code = BLOCKED_IMPORT.format(forbidden=FORBIDDEN, modules=modules)
  env = dict(os.environ, PYTHONPATH=str(ROOT.parent), JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env,
                        timeout=300)


def test_kernel_modules_import_with_the_model_layer_blocked():
  # One fresh interpreter for all modules (importing jax dominates the time); the block is
  # global, so any of them reaching `llmjax.models`, directly or through another, fails.
  modules = [f'llmjax.kernels.{p.stem}' for p in KERNEL_FILES if p.stem != '__init__']
  modules.append('llmjax.axes')
  r = run_blocked(modules)
  assert r.returncode == 0 and r.stdout.strip() == 'ok', r.stderr[-2000:]


def test_the_block_works():
  r = run_blocked(['llmjax.models.attention'])
  assert r.returncode != 0 and 'blocked: llmjax.models' in r.stderr
