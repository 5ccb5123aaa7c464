"""The Colab notebooks (colab/*.ipynb): generated from colab/source/*.py by
tools/make_notebooks.py, each badge pointing at pyproject.toml's [project.urls] Repository, no
outputs committed, and each one run top to bottom on the CPU in its small setting
(LLMJAX_NOTEBOOK_TEST=1) by nbclient in a fresh kernel, so a notebook that breaks fails here.
"""

import importlib.util
import json
import os
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLAB = os.path.join(ROOT, 'colab')
NAMES = ('finetune', 'quickstart', 'rl', 'scaling')
# Seconds one cell may run in the small setting before the test fails: the slowest cell (a
# training run) takes under 30 s on 2 busy CPU cores; a hung cell must not hang CI.
CELL_TIMEOUT = 240


def _generator():
  spec = importlib.util.spec_from_file_location(
      'make_notebooks', os.path.join(ROOT, 'tools', 'make_notebooks.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _present() -> list[str]:
  return sorted(f[:-len('.ipynb')] for f in os.listdir(COLAB) if f.endswith('.ipynb'))


def _load(name: str) -> dict:
  with open(os.path.join(COLAB, name + '.ipynb')) as f:
    return json.load(f)


def test_every_notebook_is_generated_from_its_source():
  gen = _generator()
  assert gen.names() == _present() == sorted(NAMES)
  for name in gen.names():
    with open(os.path.join(COLAB, name + '.ipynb')) as f:
      assert f.read() == gen.notebook(name), (
          f'colab/{name}.ipynb is stale: run python tools/make_notebooks.py')


@pytest.mark.parametrize('name', NAMES)
def test_badge_is_the_repository_and_no_outputs(name):
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    repo = tomllib.load(f)['project']['urls']['Repository']
  owner_name = repo.removeprefix('https://github.com/')
  nb = _load(name)
  first = ''.join(nb['cells'][0]['source'])
  assert first == ('[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]'
                   f'(https://colab.research.google.com/github/{owner_name}/blob/main/colab/'
                   f'{name}.ipynb)')
  text = json.dumps(nb)
  assert f'git clone -q {repo} ' in text
  assert 'YOUR_ORG' not in text
  for cell in nb['cells']:
    if cell['cell_type'] == 'code':
      assert cell['outputs'] == [] and cell['execution_count'] is None, cell['source'][:1]


def test_readme_lists_every_notebook_with_its_badge():
  gen = _generator()
  with open(os.path.join(ROOT, 'README.md')) as f:
    readme = f.read()
  for name in NAMES:
    assert f'{gen.badge(name)} `colab/{name}.ipynb`' in readme, name


def test_generator_rejects_text_outside_cells(tmp_path):
  gen = _generator()
  with pytest.raises(SystemExit, match=r'x\.py:1: text outside a cell'):
    gen.parse('print(1)\n# %%\n', 'x.py')
  cells = gen.parse('# %% [markdown]\n# # Title\n#\n# text\n\n# %%\nx = 1\n\n', 'x.py')
  assert [c['cell_type'] for c in cells] == ['markdown', 'code']
  assert cells[0]['source'] == ['# Title\n', '\n', 'text']
  assert cells[1]['source'] == ['x = 1']


def _run_notebook(name, tmp_path):
  nbclient = pytest.importorskip('nbclient')
  nbformat = pytest.importorskip('nbformat')
  nb = nbformat.read(os.path.join(COLAB, name + '.ipynb'), as_version=4)
  client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name='python3',
                                   resources={'metadata': {'path': str(tmp_path)}})
  client.execute()  # raises CellExecutionError, with the cell and its traceback, on failure


@pytest.mark.slow
def test_finetune_notebook_runs_from_a_hugging_face_checkpoint(tmp_path, monkeypatch):
  # The notebook's HF_DIR path: SFT, DPO, the chat and both exports from a transformers
  # checkpoint (a tiny random Llama with a tokenizer) instead of the quickstart model.
  monkeypatch.setenv('LLMJAX_NOTEBOOK_TEST', '1')
  monkeypatch.setenv('LLMJAX_NOTEBOOK_WORKDIRS', str(tmp_path))
  monkeypatch.setenv('LLMJAX_NOTEBOOK_HF_DIR', os.path.join(os.path.dirname(__file__), 'golden',
                                                            'dpo', 'policy'))
  _run_notebook('finetune', tmp_path)
  assert 'quickstart' not in os.listdir(tmp_path), 'the HF path must not train the quickstart'
  # The exported model is the checkpoint's architecture (a 2-layer Llama of width 32).
  exported = json.load(open(tmp_path / 'export' / 'dpo_hf' / 'config.json'))
  source = json.load(open(os.path.join(os.path.dirname(__file__), 'golden', 'dpo', 'policy',
                                       'config.json')))
  for key in ('num_hidden_layers', 'hidden_size', 'vocab_size', 'num_key_value_heads'):
    assert exported[key] == source[key], key


@pytest.mark.slow
@pytest.mark.parametrize('name', NAMES)
def test_notebook_runs(name, tmp_path, monkeypatch):
  # The kernel inherits this environment: the small setting, workdirs under tmp_path, and
  # conftest's JAX_PLATFORMS=cpu, XLA flags and compilation cache (shared by the notebooks,
  # which compile the same quickstart programs).
  monkeypatch.setenv('LLMJAX_NOTEBOOK_TEST', '1')
  monkeypatch.setenv('LLMJAX_NOTEBOOK_WORKDIRS', str(tmp_path))
  _run_notebook(name, tmp_path)
