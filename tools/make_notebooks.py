"""Writes colab/*.ipynb from their reviewable sources, colab/source/*.py.

    python tools/make_notebooks.py          # rewrite every notebook
    python tools/make_notebooks.py --check  # exit 1, naming the notebook, if one is stale

A source is a Python file in the "percent" format (as jupytext writes it): `# %%` starts a code
cell, `# %% [markdown]` a markdown cell whose lines are comments (`# ` stripped), and a line
`# %% install` is replaced by the install cell below. Each notebook starts with an "Open in
Colab" badge; the badge and the install cell's `git clone` both take the repository's location
from pyproject.toml's [project.urls] Repository, the one place it is written, so neither can
drift from it (tests/test_notebooks.py checks the committed notebooks against this script). The
notebooks are written without outputs or execution counts.
"""

import json
import os
import sys
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE_DIR = os.path.join(ROOT, 'colab', 'source')
NOTEBOOK_DIR = os.path.join(ROOT, 'colab')
BRANCH = 'main'  # the branch the badges open

# The install cell, the same in every notebook. In Colab llmjax is not importable yet: clone
# it and install it with the accelerator's JAX (a TPU runtime has /dev/accel* or /dev/vfio/N, a
# GPU one nvidia-smi). Where it is importable already (tests/test_notebooks.py's kernel, a
# local Jupyter in the repository's venv) nothing is installed. Either way the kernel then
# works in the repository's root, where experiments/ are.
INSTALL = """\
# Install llmjax (Colab: a clone of {repository} with the accelerator's JAX). Where llmjax is
# importable already (a local Jupyter, the test suite) nothing is installed.
import glob, importlib.util, os, shutil, sys
if importlib.util.find_spec('llmjax') is None:
  if not os.path.isdir('/content/llmjax'):
    !git clone -q {repository} /content/llmjax
  extra = ('[tpu]' if glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*') else
           '[gpu]' if shutil.which('nvidia-smi') else '')
  %pip install -q -e "/content/llmjax{{extra}}"
  sys.path.insert(0, '/content/llmjax')  # the editable install's path hook loads at start-up
import llmjax
os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(llmjax.__file__))))  # the repo root
# tests/test_notebooks.py sets LLMJAX_NOTEBOOK_TEST=1 (the smallest sizes, to run in CI) and
# LLMJAX_NOTEBOOK_WORKDIRS (a temporary dir). Rerunning a training cell resumes its workdir.
TEST = os.environ.get('LLMJAX_NOTEBOOK_TEST') == '1'
WORKDIRS = os.environ.get('LLMJAX_NOTEBOOK_WORKDIRS') or (
    '/content/workdirs' if os.path.isdir('/content') else os.path.expanduser('~/llmjax_workdirs'))"""


def repository() -> str:
  """pyproject.toml's [project.urls] Repository: https://github.com/OWNER/NAME."""
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    url = tomllib.load(f)['project']['urls']['Repository']
  prefix = 'https://github.com/'
  if not url.startswith(prefix) or url[len(prefix):].count('/') != 1:
    raise SystemExit(f"pyproject.toml [project.urls] Repository={url!r}: expected"
                     f" {prefix}OWNER/NAME (Colab opens notebooks from GitHub).")
  return url.rstrip('/')


def badge(name: str) -> str:
  """The markdown of notebook `name`'s "Open in Colab" badge."""
  path = repository()[len('https://github.com/'):]
  return (f'[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]'
          f'(https://colab.research.google.com/github/{path}/blob/{BRANCH}/colab/{name}.ipynb)')


def _cell(kind: str, lines: list[str]) -> dict:
  while lines and not lines[-1].strip():
    lines.pop()
  text = '\n'.join(lines)
  source = [line + '\n' for line in text.split('\n')]
  source[-1] = source[-1][:-1]
  cell = {'cell_type': kind, 'metadata': {}, 'source': source}
  if kind == 'code':
    cell.update(execution_count=None, outputs=[])
  return cell


def parse(text: str, where: str) -> list[dict]:
  """The cells of a percent-format source."""
  cells, kind, lines = [], None, []
  for n, line in enumerate(text.split('\n'), 1):
    if line.startswith('# %%'):
      if kind is not None:
        cells.append(_cell(kind, lines))
      marker = line[len('# %%'):].strip()
      if marker == 'install':
        cells.append(_cell('code', INSTALL.format(repository=repository()).split('\n')))
        kind, lines = None, []
      elif marker in ('', '[markdown]'):
        kind, lines = ('markdown' if marker else 'code'), []
      else:
        raise SystemExit(f"{where}:{n}: unknown cell marker {line!r}; use '# %%',"
                         " '# %% [markdown]' or '# %% install'.")
    elif kind is None:
      if line.strip():
        raise SystemExit(f"{where}:{n}: text outside a cell; start the file with '# %%'.")
    elif kind == 'markdown':
      if line.strip() and not line.startswith('#'):
        raise SystemExit(f"{where}:{n}: a markdown cell's lines are comments ('# ...').")
      lines.append(line[2:] if line.startswith('# ') else line[1:])
    else:
      lines.append(line)
  if kind is not None:
    cells.append(_cell(kind, lines))
  return cells


def notebook(name: str) -> str:
  """The .ipynb text of colab/source/NAME.py."""
  path = os.path.join(SOURCE_DIR, name + '.py')
  with open(path) as f:
    cells = parse(f.read(), os.path.relpath(path, ROOT))
  nb = {
      'nbformat': 4, 'nbformat_minor': 5,
      'metadata': {
          'accelerator': 'TPU',  # Colab opens it on a TPU runtime; it runs on any
          'colab': {'provenance': []},
          'kernelspec': {'name': 'python3', 'display_name': 'Python 3'},
          'language_info': {'name': 'python'},
      },
      'cells': [_cell('markdown', [badge(name)])] + cells,
  }
  for i, cell in enumerate(nb['cells']):
    cell['id'] = f'{name}-{i}'  # nbformat 4.5 wants ids; stable ones keep diffs small
  return json.dumps(nb, indent=1, ensure_ascii=False) + '\n'


def names() -> list[str]:
  return sorted(f[:-3] for f in os.listdir(SOURCE_DIR) if f.endswith('.py'))


def main(argv: list[str]) -> int:
  check = argv == ['--check']
  if argv and not check:
    raise SystemExit('usage: python tools/make_notebooks.py [--check]')
  stale = []
  for name in names():
    path = os.path.join(NOTEBOOK_DIR, name + '.ipynb')
    text = notebook(name)
    old = open(path).read() if os.path.exists(path) else None
    if old == text:
      continue
    if check:
      stale.append(os.path.relpath(path, ROOT))
    else:
      with open(path, 'w') as f:
        f.write(text)
      print(f'wrote {os.path.relpath(path, ROOT)}')
  if stale:
    print(f"stale: {', '.join(stale)}; run python tools/make_notebooks.py", file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
