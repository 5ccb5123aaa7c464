"""Built-in instruction tasks (llmjax.data.tasks) and their CLI (llmjax.tasks).

Every answer is recomputed here without the module's tables: arithmetic by evaluating the
numbers in the question, strings with Python's string operations on the word in the question,
facts by finding the entity and the relation in the question and looking them up in
corpus.py's world, format by parsing the JSON and recomputing the inner question. Also: splits
disjoint (within and across tasks), deterministic by seed (across processes), different for
another seed, sizes, the written files (both formats) and the SFT pipeline reading them.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from llmjax import tasks as tasks_cli
from llmjax.data import corpus, sources
from llmjax.data import tasks
from llmjax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ('arithmetic', 'facts', 'strings', 'format')
CITY_COUNTRY = {c: country for country, (cap, others) in corpus.COUNTRIES.items()
                for c in (cap,) + others}


def _question(prompt: str) -> str:
  m = re.fullmatch(r'Q: (.+)\nA:', prompt, flags=re.S)
  assert m, prompt
  return m.group(1)


def _fact(question: str) -> tuple[str, str]:
  """(relation, entity) of a facts question, found by keywords; the entity in the question."""
  words = re.findall(r"[A-Za-z]+", question)
  if 'capital' in words:
    (country,) = [w for w in words if w in corpus.COUNTRIES]
    return 'capital', country
  if 'country' in words:
    (city,) = [w for w in words if w in CITY_COUNTRY]
    return 'country', city
  (name,) = [w for w in words if w in corpus.PEOPLE]
  for relation, keys in (('colour', {'colour'}), ('friend', {'friend'}),
                         ('animal', {'animal'}), ('food', {'food', 'eat'}),
                         ('city', {'city', 'live'})):
    if keys & set(words):
      return relation, name
  raise AssertionError(question)


def _fact_answer(relation: str, entity: str) -> str:
  if relation == 'capital':
    return corpus.COUNTRIES[entity][0]
  if relation == 'country':
    return CITY_COUNTRY[entity]
  return corpus.PEOPLE[entity][relation]


def expected(task: str, question: str):
  """The answer's value (int or str) to one question of `task`, recomputed independently."""
  if task == 'arithmetic':
    a, op, b = re.fullmatch(r'What is (\d{1,2}) ([+-]) (\d{1,2})\?', question).groups()
    value = int(a) + int(b) if op == '+' else int(a) - int(b)
    assert value >= 0
    return value
  if task == 'strings':
    (word,) = re.findall(r'the word ([a-z]+)', question)
    if 'backwards' in question:
      return ''.join(reversed(word))
    if 'capital letters' in question:
      return ''.join(chr(ord(c) - 32) for c in word)  # a-z -> A-Z, not str.upper
    if 'How many letters' in question:
      return sum(1 for _ in word)
    if 'first letter' in question:
      return word[:1]
    raise AssertionError(question)
  if task == 'facts':
    return _fact_answer(*_fact(question))
  raise AssertionError(task)


def _source(question: str) -> str:
  """The task a format question comes from."""
  if re.fullmatch(r'What is \d+ [+-] \d+\?', question):
    return 'arithmetic'
  return 'strings' if 'the word ' in question else 'facts'


@pytest.mark.parametrize('name', NAMES)
def test_every_answer_is_correct(name):
  for split in tasks.SPLITS:
    records = tasks.make_task(name, split)
    assert records
    for r in records:
      assert set(r) == {'prompt', 'completion', 'answer'}
      assert r['completion'] == ' ' + r['answer']
      q = _question(r['prompt'])
      if name == 'format':
        inner = q.removesuffix(' Answer in JSON.')
        assert inner != q
        value = expected(_source(inner), inner)
        assert json.loads(r['answer']) == {'answer': value}
        assert type(json.loads(r['answer'])['answer']) is type(value)  # 19, not "19"
      else:
        assert r['answer'] == str(expected(name, q)), r


def test_facts_cover_the_world_and_held_out_facts_are_taught_in_train():
  """Each (relation, entity) of the corpus's world is asked in train; each held-out question
  asks a fact that train asks in another form (the same answer to another prompt)."""
  train = {}
  for r in tasks.make_task('facts', 'train'):
    train.setdefault(_fact(_question(r['prompt'])), set()).add(r['prompt'])
  want = ({(rel, n) for n in corpus.NAMES for rel in ('colour', 'friend', 'animal', 'food', 'city')}
          | {('capital', c) for c in corpus.COUNTRIES} | {('country', c) for c in CITY_COUNTRY})
  assert set(train) == want
  heldout = tasks.make_task('facts', 'heldout')
  for r in heldout:
    key = _fact(_question(r['prompt']))
    assert len(train[key]) >= 2 and r['prompt'] not in train[key]
  # The three kinds are all held out somewhere.
  assert {'capital', 'colour', 'friend'} <= {_fact(_question(r['prompt']))[0] for r in heldout}


def test_splits_are_disjoint_within_and_across_tasks():
  train = {n: {r['prompt'] for r in tasks.make_task(n, 'train')} for n in NAMES}
  heldout = {n: {r['prompt'] for r in tasks.make_task(n, 'heldout')} for n in NAMES}
  for n in NAMES:
    assert len(train[n]) == len(tasks.make_task(n, 'train'))  # no prompt twice
    assert len(heldout[n]) == len(tasks.make_task(n, 'heldout'))
  all_train = set().union(*train.values())
  all_heldout = set().union(*heldout.values())
  assert not all_train & all_heldout
  # A format held-out question is held out of its source task too (no leak when mixed).
  suffix = ' Answer in JSON.'
  inner = lambda prompts: {_question(p).removesuffix(suffix) for p in prompts}
  assert not inner(heldout['format']) & inner(all_train)
  assert not inner(train['format']) & inner(all_heldout)


def test_sizes():
  sizes = {n: tuple(len(tasks.make_task(n, s)) for s in tasks.SPLITS) for n in NAMES}
  assert sizes['arithmetic'] == (10000, 200)
  assert sizes['format'] == (600, 150)
  for n in ('facts', 'strings'):
    train, heldout = sizes[n]
    assert 300 <= train + heldout <= 600 and 0.05 <= heldout / (train + heldout) <= 0.3, sizes
  # Both operations and all four string operations are in each split.
  for split in tasks.SPLITS:
    qs = [_question(r['prompt']) for r in tasks.make_task('arithmetic', split)]
    assert {'+', '-'} == {q.split()[3] for q in qs}
    qs = [_question(r['prompt']) for r in tasks.make_task('strings', split)]
    assert all(any(k in q for q in qs) for k in ('backwards', 'capital', 'How many', 'first'))


def test_deterministic_by_seed_and_another_seed_differs():
  for n in NAMES:
    for split in tasks.SPLITS:
      a = tasks.make_task(n, split, seed=0)
      tasks._splits.cache_clear()  # regenerate, not a cached copy
      assert tasks.make_task(n, split, seed=0) == a
      b = tasks.make_task(n, split, seed=1)
      assert b != a
      if n in ('arithmetic', 'format'):  # fixed sizes; facts and strings vary a little
        assert len(b) == len(a)
  a = tasks.make_task('arithmetic', 'train')
  a[0]['answer'] = 'changed'  # callers get their own records
  assert tasks.make_task('arithmetic', 'train')[0]['answer'] != 'changed'


def test_unknown_names_are_one_line_errors_with_did_you_mean(capsys):
  with pytest.raises(ConfigError, match=r"^unknown built-in task 'arithmetc'\. Did you mean"
                                        r" 'arithmetic'\? The tasks: arithmetic, facts"):
    tasks.make_task('arithmetc', 'train')
  with pytest.raises(ConfigError, match=r"no split 'test'.*heldout"):
    tasks.make_task('facts', 'test')
  with pytest.raises(ConfigError, match="'facts' is given twice"):
    tasks.check_task_names(['facts', 'facts'])
  assert tasks_cli.main(['--out=/nonexistent/x', '--tasks=arithmetic,fatcs']) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and "error: unknown built-in task 'fatcs'. Did you mean 'facts'?" in err
  assert not os.path.exists('/nonexistent/x')  # checked before writing anything
  assert tasks_cli.main(['--out=/tmp/x', '--format=mesages']) == 2
  assert "Did you mean 'messages'?" in capsys.readouterr().err
  assert tasks_cli.main(['--tasks=facts']) == 2
  assert 'missing --out=DIR' in capsys.readouterr().err


def test_help(capsys):
  assert tasks_cli.main(['--help']) == 0
  out = capsys.readouterr().out
  assert 'usage: python -m llmjax.tasks' in out and '--format=FORMAT' in out
  # The CLI's default (kept there so --help imports nothing heavy) lists every task.
  (flag,) = [f for f in tasks_cli.FLAGS if f.name == 'tasks']
  assert flag.default == ','.join(tasks.task_names())


def _read(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_cli_writes_both_formats_in_another_process(tmp_path):
  """`python -m llmjax.tasks` in a fresh interpreter (another hash seed) writes exactly the
  records of make_task here; --format=messages writes the same examples as conversations."""
  out = tmp_path / 'pc'
  env = dict(os.environ, PYTHONPATH=ROOT, PYTHONHASHSEED='12345', JAX_PLATFORMS='cpu')
  r = subprocess.run([sys.executable, '-m', 'llmjax.tasks', f'--out={out}',
                      '--tasks=arithmetic,facts', '--seed=3'],
                     capture_output=True, text=True, env=env, timeout=120)
  assert r.returncode == 0, r.stderr
  assert sorted(os.listdir(out)) == ['arithmetic', 'facts']
  for n in ('arithmetic', 'facts'):
    for split in tasks.SPLITS:
      assert _read(out / n / f'{split}.jsonl') == tasks.make_task(n, split, seed=3)
  assert 'arithmetic:' in r.stdout and 'train 10000, heldout 200' in r.stdout

  out = tmp_path / 'msg'
  assert tasks_cli.main([f'--out={out}', '--tasks=format,strings', '--format=messages']) == 0
  for n in ('format', 'strings'):
    for split in tasks.SPLITS:
      got = _read(out / n / f'{split}.jsonl')
      want = tasks.make_task(n, split)
      assert len(got) == len(want)
      for g, w in zip(got, want):
        assert g == {'messages': [{'role': 'user', 'content': _question(w['prompt'])},
                                  {'role': 'assistant', 'content': w['answer']}],
                     'answer': w['answer']}
      # The SFT reader of data.format='messages' accepts every line.
      convs = list(sources.iter_conversations(str(out / n / f'{split}.jsonl')))
      assert len(convs) == len(want)


def test_sft_pipeline_trains_on_the_written_completions(tmp_path):
  """data.format='prompt_completion' with data.path at the written train files passes
  config.validate, and build_data's batches train on exactly the completions (then EOS)."""
  from llmjax import config as config_lib
  from llmjax.data import build_data

  tasks.write_tasks(str(tmp_path / 'tasks'), ['arithmetic', 'facts'])
  c = config_lib.load_config(os.path.join(ROOT, 'experiments/quickstart.py'))
  c.data.path = str(tmp_path / 'tasks' / '*' / 'train.jsonl')
  c.data.format = 'prompt_completion'
  c.data.vocab_size = c.model.vocab_size = 400
  c.data.seq_len, c.data.eval_batches = 32, 1
  config_lib.validate(c)
  tok, train, eval_batches = build_data(c.data, str(tmp_path / 'work'), seed=0, batch_size=4)
  completions = {r['completion'] for n in ('arithmetic', 'facts')
                 for r in tasks.make_task(n, 'train')}
  it = iter(train)
  seen = 0
  for batch in [next(it) for _ in range(3)] + eval_batches():
    for row in range(batch['inputs'].shape[0]):
      seg, mask = batch['segment_ids'][row], batch['loss_mask'][row]
      for s in set(seg.tolist()) - {0}:
        idx = np.flatnonzero(seg == s)
        trained = batch['targets'][row][idx][mask[idx] == 1].tolist()
        if not trained or trained[-1] != tok.eos_id:
          continue  # a piece cut by packing at the row's end
        assert tok.decode(trained[:-1]) in completions
        seen += 1
  assert seen >= 8


@pytest.mark.parametrize('fmt', ['prompt_completion', 'preference'])
def test_builtin_validation_split_interleaves_the_tasks(fmt):
  """Evals read the first data.eval_batches batches in order: every prefix of the held-out
  split holds each task in proportion to its size (within one record), all records once."""
  from llmjax.data import tasks as tasks_lib
  names = ('arithmetic', 'facts', 'strings')
  src = tasks_lib.builtin_sources(names, fmt, 0)['validation']
  prompt = (lambda r: r.prompt) if fmt == 'preference' else (lambda r: r[0])
  sizes = {n: len(tasks_lib.make_task(n, 'heldout', 0)) for n in names}
  which = {tasks_lib.make_task(n, 'heldout', 0)[i]['prompt']: n
           for n in names for i in range(sizes[n])}
  order = [which[prompt(src[i])] for i in range(len(src))]
  assert len(order) == sum(sizes.values())
  total = len(order)
  for k in range(1, total + 1):
    for n in names:
      assert abs(order[:k].count(n) - k * sizes[n] / total) <= 1.0, (k, n)


def test_builtin_weights_mix_the_train_splits_and_never_the_held_out():
  """data.builtin_weights=(1, 2): facts is a third of the train source and arithmetic two
  thirds; the smaller share is cycled (every record at least once, counts differ by at most
  one), nothing is cut, and the held-out split is the unweighted one."""
  names = ('facts', 'arithmetic')
  plain = tasks.builtin_sources(names, 'preference', 0)
  mixed = tasks.builtin_sources(names, 'preference', 0, weights=(1, 2))
  sizes = [len(tasks.preference_pairs(n, 'train', 0)) for n in names]
  counts = tasks.mixture_counts(sizes, (1.0, 2.0))
  assert counts[1] == sizes[1] and abs(counts[0] - sizes[1] / 2) <= 1  # arithmetic once
  prompts = [mixed['train'][i].prompt for i in range(len(mixed['train']))]
  assert len(prompts) == sum(counts)
  facts = [p for p in tasks.preference_pairs('facts', 'train', 0)]
  seen = {}
  for p in prompts[:counts[0]]:
    seen[p] = seen.get(p, 0) + 1
  assert set(seen) == {r['prompt'] for r in facts}
  assert max(seen.values()) - min(seen.values()) <= 1
  assert len(mixed['validation']) == len(plain['validation'])
  assert ([mixed['validation'][i].prompt for i in range(len(plain['validation']))]
          == [plain['validation'][i].prompt for i in range(len(plain['validation']))])
  # Equal weights: the sizes' ratio no longer matters.
  assert tasks.mixture_counts([10_000, 379, 389], [1, 1, 1]) == [10_000] * 3


@pytest.mark.parametrize('weights, needle', [((1,), 'has 1 weight(s) for 2'),
                                             ((1, 0), "task 'arithmetic' has weight 0"),
                                             ((1, -2.5), 'positive number')])
def test_builtin_weights_errors_are_one_line_before_training(weights, needle):
  from llmjax import config as config_lib
  c = config_lib.base_config('tiny')
  c.data.format = 'prompt_completion'
  c.data.builtin_tasks = ('facts', 'arithmetic')
  c.data.builtin_weights = weights
  with pytest.raises(ConfigError, match=re.escape(needle)) as e:
    config_lib.validate(c)
  assert '\n' not in str(e.value) and 'data.builtin_weights' in str(e.value)
  c.data.builtin_tasks = ()
  c.data.format = 'text'  # the embedded corpus
  c.data.builtin_weights = (1, 1)
  with pytest.raises(ConfigError, match='data.builtin_tasks is empty'):
    config_lib.validate(c)
