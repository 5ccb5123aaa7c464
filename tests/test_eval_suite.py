"""Evaluation inside the train loop (`eval.tasks`, `data.builtin_tasks`; llmjax.eval.suite).

The loop's scores are checked against the harness run afresh on the checkpoint the run saved
(the params a user would evaluate with `python -m llmjax.eval`), the per-example files against
the built-in tasks' own records; bad entries and bad records fail before training starts.
"""

import filecmp
import json
import os

import pytest

from llmjax import config as config_lib
from llmjax import generate as generate_lib
from llmjax.data import sources, tasks
from llmjax.errors import ConfigError, DataError
from llmjax.eval import harness, scoring, suite
from llmjax.train.loop import train_and_evaluate

from test_loop import tiny_config


def _rows(workdir):
  return [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]


def _sft_config(**train):
  c = tiny_config(**{'steps': 4, 'eval_every': 2, **train})
  c.data.format = 'prompt_completion'
  c.data.builtin_tasks = ('arithmetic', 'strings')
  c.train.unigram_baseline_batches = 0
  c.eval.max_examples = 6
  c.eval.max_new_tokens = 6
  c.eval.batch_size = 4
  c.sample.prompts = ()
  return c


@pytest.fixture(scope='module')
def sft_run(tmp_path_factory):
  """A 4-step SFT run on two built-in tasks plus a multiple-choice and a perplexity file."""
  root = tmp_path_factory.mktemp('suite')
  mc = root / 'mc.jsonl'
  mc.write_text(''.join(json.dumps({'context': f'Q: What is {a} + 1?\nA:',
                                    'choices': [f' {a + 1}', f' {a + 2}', ' Paris'],
                                    'answer': 0, 'note': 'ignored'}) + '\n' for a in range(5)))
  text = root / 'ppl.txt'
  text.write_text('Once upon a time, there was a cat named Leo. Leo lived in Lyon.\n')
  c = _sft_config()
  c.eval.tasks = (f'mc=multiple_choice:{mc}', f'perplexity:{text}', 'arithmetic')
  workdir = str(root / 'run')
  train_and_evaluate(c, workdir)
  return c, workdir, str(mc), str(text)


def test_every_eval_logs_each_task_metric(sft_run):
  c, workdir, _, _ = sft_run
  evals = [r for r in _rows(workdir) if 'eval_loss' in r]
  assert [r['step'] for r in evals] == [2, 4]
  want = {'eval_arithmetic_exact_match', 'eval_strings_exact_match', 'eval_mc_acc',
          'eval_mc_acc_norm', 'eval_perplexity_perplexity', 'eval_perplexity_bits_per_byte'}
  for r in evals:
    assert want <= set(r), sorted(r)
    assert 0.0 <= r['eval_mc_acc'] <= 1.0 and r['eval_perplexity_perplexity'] > 1.0
  # 'arithmetic' in eval.tasks as well as data.builtin_tasks is scored once, not twice.
  assert sorted(os.listdir(os.path.join(workdir, 'eval'))) == ['arithmetic', 'mc', 'perplexity',
                                                               'strings']


def test_scores_equal_the_harness_on_the_saved_checkpoint(sft_run):
  c, workdir, mc, text = sft_run
  final = [r for r in _rows(workdir) if 'eval_loss' in r][-1]
  cfg, params, tok = generate_lib.load({'workdir': workdir, 'hf': ''})
  for name in ('arithmetic', 'strings'):
    heldout = tasks.make_task(name, 'heldout', 0)[:6]
    per = [json.loads(l) for l in open(os.path.join(workdir, 'eval', name, 'step_4.jsonl'))]
    assert [r['target'] for r in per] == [r['answer'] for r in heldout]
    assert [r['prompt'] for r in per] == [r['prompt'] for r in heldout]
    for r in per:
      assert r['correct'] == (r['generated'].strip() == r['target'])
      assert '\n' not in r['generated']  # built-in answers are one line
    assert final[f'eval_{name}_exact_match'] == sum(r['correct'] for r in per) / len(per)
    m, again = harness.generate_task(cfg, params, tok, [{'prompt': r['prompt'],
                                                         'target': r['answer']} for r in heldout],
                                     max_new_tokens=6, stop=['\n'], batch_size=4)
    assert [r['generated'] for r in again] == [r['generated'] for r in per]
  from llmjax.eval import records
  m, _ = harness.multiple_choice(cfg, params, tok, records.multiple_choice_records(mc))
  assert final['eval_mc_acc'] == pytest.approx(m['acc'])
  assert final['eval_mc_acc_norm'] == pytest.approx(m['acc_norm'])
  m, _ = harness.perplexity(cfg, params, tok, records.perplexity_texts(text))
  assert final['eval_perplexity_perplexity'] == pytest.approx(m['perplexity'], rel=1e-5)
  assert final['eval_perplexity_bits_per_byte'] == pytest.approx(m['bits_per_byte'], rel=1e-5)


def test_builtin_sources_are_the_task_splits():
  src = tasks.builtin_sources(('arithmetic', 'facts'), 'prompt_completion', seed=3)
  want = tasks.make_task('arithmetic', 'train', 3) + tasks.make_task('facts', 'train', 3)
  assert [tuple(src['train'][i]) for i in range(len(src['train']))] == [
      (r['prompt'], r['completion']) for r in want]
  held = tasks.make_task('arithmetic', 'heldout', 3) + tasks.make_task('facts', 'heldout', 3)
  assert len(src['validation']) == len(held)
  assert src['validation'][0] == sources.PromptCompletion(held[0]['prompt'], held[0]['completion'])
  conv = tasks.builtin_sources(('strings',), 'messages')
  first = tasks.make_task('strings', 'train', 0)[0]
  assert list(conv['train'][0].messages) == tasks.as_messages(first)['messages']
  assert 'built-in task strings train record 0' == conv['train'][0].where


def test_sft_from_params_dir_keeps_the_source_tokenizer(tmp_path):
  src = str(tmp_path / 'pretrain')
  train_and_evaluate(tiny_config(steps=2, eval_every=2), src)
  c = _sft_config(steps=2, eval_every=2)
  c.data.builtin_tasks = ('strings',)
  c.eval.max_examples = 2
  c.init.params_dir = src
  dst = str(tmp_path / 'sft')
  train_and_evaluate(c, dst)
  # Without it the run would train a new tokenizer on the task texts: other ids, other bytes.
  assert filecmp.cmp(os.path.join(src, 'tokenizer.model'), os.path.join(dst, 'tokenizer.model'),
                     shallow=False)
  assert 'eval_strings_exact_match' in _rows(dst)[-1]


def test_a_bad_eval_record_fails_before_training(tmp_path):
  bad = tmp_path / 'bad.jsonl'
  bad.write_text('{"prompt": "Q: 1 + 1?\\nA:", "answer": "2"}\n{"answer": "3"}\n')
  c = _sft_config()
  c.eval.tasks = (f'generate:{bad}',)
  with pytest.raises(DataError, match=r"bad.jsonl:2: the record lacks the field 'prompt'"):
    train_and_evaluate(c, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')


@pytest.mark.parametrize('entries, match', [
    (('aritmetic',), r"'aritmetic' is neither a built-in task .* Did you mean 'arithmetic'"),
    (('generat:x.jsonl',), r"'generat' is not a task kind\. Did you mean 'generate'"),
    (('generate:',), r"names no file"),
    (('a-b=generate:x.jsonl',), r"the name 'a-b' must be a word"),
    (('generate:{f}', 'generate:{f}'), r"two tasks are named 'generate'.*NAME=generate:"),
    (('generate:/nonexistent/x.jsonl',), r"/nonexistent/x.jsonl does not exist"),
])
def test_bad_eval_tasks_entries_are_one_line_config_errors(tmp_path, entries, match):
  f = tmp_path / 'x.jsonl'
  f.write_text('{"prompt": "a", "answer": "b"}\n')
  c = _sft_config()
  c.eval.tasks = tuple(e.format(f=f) for e in entries)
  with pytest.raises(ConfigError, match=match) as e:
    config_lib.validate(c)
  assert '\n' not in str(e.value)


@pytest.mark.parametrize('setting, match', [
    (dict(builtin_tasks=('arithmetc',)), r"data.builtin_tasks: unknown built-in task"
                                         r" 'arithmetc'\. Did you mean 'arithmetic'"),
    (dict(format='text'), r"data.builtin_tasks needs data.format='prompt_completion'"),
    (dict(path='x.jsonl'), r"data.builtin_tasks=.* and data.path='x.jsonl' are both set"),
    (dict(builtin_tasks=('facts', 'facts')), r"'facts' is given twice"),
])
def test_bad_builtin_tasks_settings_are_one_line_config_errors(setting, match):
  c = _sft_config()
  c.data.update(setting)
  with pytest.raises(ConfigError, match=match):
    config_lib.validate(c)


def test_list_keys_take_comma_separated_words_on_the_command_line():
  c = _sft_config()
  config_lib.apply_override(c, 'data.builtin_tasks', 'arithmetic, facts')
  assert c.data.builtin_tasks == ('arithmetic', 'facts')
  config_lib.apply_override(c, 'eval.tasks', "('generate:a.jsonl',)")  # a literal still works
  assert c.eval.tasks == ('generate:a.jsonl',)


def test_parse_spec_forms():
  assert suite.parse_spec('facts') == suite.Spec('facts', 'generate', builtin='facts')
  assert suite.parse_spec('perplexity:/d/w.txt') == suite.Spec('perplexity', 'perplexity',
                                                               '/d/w.txt')
  assert suite.parse_spec('hella=multiple_choice:gs://b/h.jsonl') == suite.Spec(
      'hella', 'multiple_choice', 'gs://b/h.jsonl')
  assert scoring.exact_match(' 19 ', '19')
