"""The evaluation tasks of a training run (`eval.tasks`, `data.builtin_tasks`), run at every eval.

The same harness as `python -m llmjax.eval` (`llmjax.eval.harness`), over files named in the
config, plus the held-out split of every built-in task the run trains on. Each entry of
`eval.tasks` is one of

    'arithmetic'                 a built-in task (llmjax.data.tasks): generate on its held-out
                                 split, exact match; metric eval_arithmetic_exact_match
    'generate:FILE.jsonl'        {"prompt", "answer"} records: eval_generate_exact_match
    'multiple_choice:FILE.jsonl' {"context", "choices", "answer"}: eval_multiple_choice_acc,
                                 eval_multiple_choice_acc_norm
    'perplexity:FILE'            text or {"text"} JSONL: eval_perplexity_perplexity,
                                 eval_perplexity_bits_per_byte
    'NAME=KIND:FILE'             the same, logged as eval_NAME_<metric> (two files of one kind
                                 need names)

Every file is read and checked line by line when the run starts (`load_tasks`, before the
model is built), so a bad record fails there, not at the first eval an hour in. Each eval
writes what every example produced to WORKDIR/eval/NAME/step_N.jsonl, so a score can be
checked by hand.
"""

import dataclasses
import json
import math

from llmjax import files
from llmjax.errors import ConfigError, DataError, closest

KINDS = ('generate', 'multiple_choice', 'perplexity')
# The metrics each kind logs (as eval_<name>_<metric>): rates only, not the counts behind them.
METRICS = {'generate': ('exact_match',), 'multiple_choice': ('acc', 'acc_norm'),
           'perplexity': ('perplexity', 'bits_per_byte')}
# A built-in task's answer is one line: generation stops at the first newline, so a model that
# answers and then keeps writing the corpus (`19.\nQ: ...`) is judged on its answer line.
BUILTIN_STOP = ('\n',)


@dataclasses.dataclass(frozen=True)
class Spec:
  """One entry of eval.tasks, parsed: name (metric prefix), kind, and the file or built-in."""
  name: str
  kind: str
  path: str = ''  # '' for a built-in task
  builtin: str = ''  # the built-in task's name


def parse_spec(entry: str) -> Spec:
  """'arithmetic' | 'KIND:FILE' | 'NAME=KIND:FILE' -> Spec; one-line ConfigError otherwise."""
  from llmjax.data import tasks
  text = entry.strip()
  head, sep, path = text.partition(':')
  if not sep:
    if text not in tasks.TASKS:
      raise ConfigError(f"eval.tasks entry '{entry}' is neither a built-in task"
                        f" ({', '.join(tasks.TASKS)}) nor KIND:FILE with KIND one of"
                        f" {', '.join(KINDS)}.{closest(text, tasks.TASKS)}")
    return Spec(name=text, kind='generate', builtin=text)
  name, eq, kind = head.rpartition('=')
  if not eq:
    name = kind
  if kind not in KINDS:
    raise ConfigError(f"eval.tasks entry '{entry}': '{kind}' is not a task kind."
                      f"{closest(kind, KINDS)} Write KIND:FILE with KIND one of"
                      f" {', '.join(KINDS)}, or a built-in task's name.")
  if not name.isidentifier():
    raise ConfigError(f"eval.tasks entry '{entry}': the name '{name}' must be a word (letters,"
                      " digits, _): it becomes the metric eval_<name>_<metric>.")
  if not path:
    raise ConfigError(f"eval.tasks entry '{entry}' names no file; write {kind}:FILE.jsonl.")
  return Spec(name=name, kind=kind, path=path)


def specs_from_config(config, *, data_files: bool = True) -> list[Spec]:
  """The run's eval tasks: data.builtin_tasks' held-out splits, then eval.tasks' entries.

  ConfigError (one line) for a bad entry, a file that does not exist (data_files=True), or two
  entries with one name.
  """
  ev = config.get('eval', {})
  score_model = config.model.get('head', 'lm') == 'score'
  # A reward model generates nothing and has no token log-probs: its built-in tasks are
  # scored by its own eval (accuracy on held-out pairs), not by these.
  specs = [] if score_model else [Spec(name=n, kind='generate', builtin=n)
                                  for n in config.data.get('builtin_tasks', ())]
  for entry in ev.get('tasks', ()):
    spec = parse_spec(entry)
    if score_model:
      raise ConfigError(f"eval.tasks entry '{entry}': model.head='score' (a reward model)"
                        " neither generates nor has token log-probs; score it with"
                        " `python -m llmjax.eval --task=reward`, and leave eval.tasks empty.")
    if spec.builtin and spec.builtin in config.data.get('builtin_tasks', ()):
      continue  # already evaluated as a task the run trains on
    specs.append(spec)
  seen = {}
  for s in specs:
    if s.name in seen:
      raise ConfigError(f"eval.tasks: two tasks are named '{s.name}' ({seen[s.name]} and"
                        f" {s.path or s.builtin}); name them: NAME={s.kind}:{s.path or 'FILE'}.")
    seen[s.name] = s.path or s.builtin
    if data_files and s.path:
      files.check_local(f"eval.tasks entry '{s.name}'", s.path)
      if not files.exists(s.path):
        raise ConfigError(f"eval.tasks entry '{s.name}': {s.path} does not exist; pass an"
                          " existing file.")
  return specs


@dataclasses.dataclass(frozen=True)
class Task:
  """An eval task, ready to run: its records read and checked, its prompts tokenized."""
  spec: Spec
  records: list  # generate/multiple_choice: dicts; perplexity: texts
  prompts: list | None = None  # generate: token ids of each prompt
  stop: tuple[str, ...] = ()


def _generate_records(spec: Spec, config) -> list[dict]:
  from llmjax.data import tasks
  from llmjax.eval import records
  if not spec.builtin:
    return records.generate_records(spec.path)
  seed = config.data.get('builtin_seed', 0)
  return [{'prompt': r['prompt'], 'target': r['answer'], 'question': tasks.question(r)}
          for r in tasks.make_task(spec.builtin, 'heldout', seed)]


def load_tasks(config, tokenizer, model_cfg, template=None) -> list[Task]:
  """Reads and checks every eval task of the run (DataError naming file and line), before any
  model is built; tokenizes the generate prompts.

  template: the run's chat template (`llmjax.data.chat.ChatTemplate`), which renders generate
  prompts as user turns for built-in tasks of a data.format='messages' run and for every
  generate file when eval.chat is set; None otherwise.
  """
  from llmjax.eval import harness, records
  ev = config.get('eval', {})
  limit = ev.get('max_examples', 0)
  max_new = ev.get('max_new_tokens', 32)
  chat_run = config.data.get('format', 'text') == 'messages'
  out = []
  for spec in specs_from_config(config):
    if spec.kind == 'multiple_choice':
      recs = records.multiple_choice_records(spec.path)
    elif spec.kind == 'perplexity':
      recs = records.perplexity_texts(spec.path)
    else:
      recs = _generate_records(spec, config)
    recs = recs[:limit] if limit else recs
    if spec.kind != 'generate':
      out.append(Task(spec, recs))
      continue
    chat = chat_run if spec.builtin else ev.get('chat', False)
    if chat:
      if template is None:
        raise ConfigError(f"eval.tasks entry '{spec.name}' is generated as chat (eval.chat, or a"
                          " built-in task of a data.format='messages' run) but the run has no"
                          " chat template; set data.chat_template.")
      prompts = [template.prompt_ids([{'role': 'user', 'content': r.get('question', r['prompt'])}])
                 for r in recs]
    else:
      prompts = harness.prompt_ids(tokenizer, [r['prompt'] for r in recs])
    room = model_cfg.max_seq_len - max_new
    for k, ids in enumerate(prompts):
      if len(ids) > room:
        where = spec.path or f"built-in task {spec.builtin} (held-out record {k})"
        raise DataError(f"eval.tasks '{spec.name}': {where}: prompt {k} is {len(ids)} tokens,"
                        f" more than the model context {model_cfg.max_seq_len} minus"
                        f" eval.max_new_tokens={max_new}; shorten it or lower"
                        " eval.max_new_tokens.")
    stop = tuple(ev.get('stop', ())) + (BUILTIN_STOP if spec.builtin else ())
    out.append(Task(spec, recs, prompts, stop))
  return out


def run_tasks(eval_tasks: list[Task], config, model_cfg, params, tokenizer, *, step: int,
              workdir: str = '', write: bool = True) -> dict:
  """{eval_<name>_<metric>: value} over every task; per-example results to
  WORKDIR/eval/<name>/step_<step>.jsonl when `write` (process 0)."""
  from llmjax.eval import harness
  ev = config.get('eval', {})
  bs = ev.get('batch_size', 32)
  metrics = {}
  for task in eval_tasks:
    spec = task.spec
    if spec.kind == 'generate':
      m, per = harness.generate_task(model_cfg, params, tokenizer, task.records,
                                     max_new_tokens=ev.get('max_new_tokens', 32),
                                     stop=task.stop, prompts=task.prompts, batch_size=bs)
    elif spec.kind == 'multiple_choice':
      m, per = harness.multiple_choice(model_cfg, params, tokenizer, task.records, batch_size=bs)
    else:
      m, per = harness.perplexity(model_cfg, params, tokenizer, task.records, batch_size=bs)
    for key in METRICS[spec.kind]:
      value = float(m[key])
      metrics[f'eval_{spec.name}_{key}'] = value if math.isfinite(value) else float('nan')
    if write and workdir:
      path = files.join(workdir, 'eval', spec.name, f'step_{step}.jsonl')
      files.write_text(path, ''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in per))
  return metrics
