"""Reading and checking evaluation files: every bad line is a one-line DataError naming the
file and line, raised before any model loads. Fields a task does not use are ignored."""

import json

from llmjax import files
from llmjax.errors import DataError


def read_jsonl(path: str) -> list[tuple[int, dict]]:
  """(line number, record) for each non-blank line of a JSONL file."""
  if not files.exists(path):
    raise DataError(f"--data={path} does not exist; pass a JSONL file of records.")
  out = []
  for n, line in enumerate(files.read_text(path).splitlines(), 1):
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}:{n}: not valid JSON ({e.msg}); each line must be one object.") from None
    if not isinstance(rec, dict):
      raise DataError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}.")
    out.append((n, rec))
  if not out:
    raise DataError(f"--data={path} holds no records.")
  return out


def _field(path, n, rec, name, kinds, what):
  if name not in rec:
    raise DataError(f"{path}:{n}: the record lacks the field '{name}' ({what}); it has"
                    f" {sorted(rec) or 'no fields'}.")
  value = rec[name]
  if not isinstance(value, kinds) or isinstance(value, bool):
    raise DataError(f"{path}:{n}: '{name}' must be {what}, got {json.dumps(value)[:60]}.")
  return value


def generate_records(path: str) -> list[dict]:
  """{'prompt', 'target'} per line: target is `answer` (or `completion` when there is none)."""
  out = []
  for n, rec in read_jsonl(path):
    prompt = _field(path, n, rec, 'prompt', str, 'a string')
    key = 'answer' if 'answer' in rec else 'completion'
    if key not in rec:
      raise DataError(f"{path}:{n}: the record lacks the field 'answer' (or 'completion'):"
                      " what the generated text must match.")
    target = _field(path, n, rec, key, (str, int, float), 'a string')
    out.append({'prompt': prompt, 'target': str(target)})
  return out


def multiple_choice_records(path: str) -> list[dict]:
  """{'context', 'choices', 'answer'} per line, checked: choices a non-empty list of
  strings, answer an index into them."""
  out = []
  for n, rec in read_jsonl(path):
    context = _field(path, n, rec, 'context', str, 'a string')
    choices = _field(path, n, rec, 'choices', list, 'a list of strings')
    if not choices:
      raise DataError(f"{path}:{n}: 'choices' is empty; give at least one choice.")
    if not all(isinstance(c, str) for c in choices):
      raise DataError(f"{path}:{n}: every entry of 'choices' must be a string.")
    answer = _field(path, n, rec, 'answer', int, 'an int (the index of the right choice)')
    if not 0 <= answer < len(choices):
      raise DataError(f"{path}:{n}: 'answer'={answer} is out of range: there are"
                      f" {len(choices)} choices (indices 0..{len(choices) - 1}).")
    out.append({'context': context, 'choices': choices, 'answer': answer})
  return out


def perplexity_texts(path: str) -> list[str]:
  """The documents of --data: the `text` of each line of a .jsonl file, else the whole file
  as one document."""
  if path.endswith('.jsonl'):
    return [_field(path, n, rec, 'text', str, 'a string') for n, rec in read_jsonl(path)]
  if not files.exists(path):
    raise DataError(f"--data={path} does not exist; pass a text file or a JSONL file of"
                    " {\"text\"} records.")
  text = files.read_text(path)
  if not text.strip():
    raise DataError(f"--data={path} is empty.")
  return [text]


def reward_records(path: str) -> list[dict]:
  """{'prompt', 'chosen', 'rejected'} strings per line (TRL's standard preference format with
  an explicit prompt); the optional 'margin' is ignored (it shapes training, not scores)."""
  out = []
  for n, rec in read_jsonl(path):
    fields = {k: _field(path, n, rec, k, str, 'a string') for k in ('prompt', 'chosen', 'rejected')}
    out.append(fields)
  return out
