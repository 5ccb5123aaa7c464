"""Document sources: in-memory lists, local .txt/.jsonl files (as a TFDS dataset), TFDS names.

Every source is random-access (`len` and `__getitem__` returning one document), which Grain
needs for a seeded global shuffle and for checkpointing the iterator as a few integers. A
document is a `str` for data.format='text' (pretraining), a `PromptCompletion` for
data.format='prompt_completion' (supervised fine-tuning: JSONL records
`{"prompt": ..., "completion": ...}`, TRL's prompt-completion format; only the completion is
trained on, see `llmjax.data.pipeline`) and for data.format='alpaca' (JSONL records
`{"instruction": ..., "input": ..., "output": ...}`, Stanford Alpaca's format: the prompt is
Alpaca's template filled with the instruction and input, the completion is the output), and
a `Conversation` for data.format='messages' (JSONL records `{"messages": [{"role": ...,
"content": ...}, ...]}`, TRL's and the HF Hub's conversational format; rendered by a chat
template and trained on the assistant turns, see `llmjax.data.chat`).

Local files are converted once into a TFDS dataset in ArrayRecord format under
WORKDIR/tfds/ and read back with `as_data_source`: no TensorFlow is involved (TFDS only needs
TF for its tf.data readers and TFRecord files, neither of which this path touches), and later
runs reuse the prepared files. Each document is one JSONL object's text field (its prompt
and completion fields for 'prompt_completion', its rendered prompt and output for 'alpaca',
its messages list as a JSON string for 'messages'), or one blank-line-separated paragraph of a .txt file: paragraphs keep a unit of
meaning together while giving the shuffle something finer than whole books; a paragraph
longer than MAX_TXT_DOCUMENT_CHARS (a file without blank lines) is cut at line boundaries, so
one huge
document never fills many consecutive batches with the same text.
"""

import functools
import glob
import hashlib
import json
import logging
import os
from typing import Callable, Iterator, NamedTuple

from llmjax.errors import ConfigError, DataError, closest

# Every VALIDATION_EVERY-th document (in file order) is held out for evaluation: deterministic,
# spread over all files, and independent of how many documents there are.
VALIDATION_EVERY = 20
MAX_TXT_DOCUMENT_CHARS = 32_000  # ~8k tokens: a few rows of any usual seq_len
# Bump when the way files become documents changes, so prepared copies are rebuilt.
_FORMAT = 2
# The values of data.format: what one document is. 'prompt_completion', 'alpaca' and 'messages'
# read only local JSONL files (the embedded corpus and TFDS catalog datasets are plain text).
# 'preference' and 'unpaired_preference' are the preference-optimisation formats (DPO and reward
# models; KTO): see PreferencePair and UnpairedExample, and `llmjax.data.preference`.
DATA_FORMATS = ('text', 'prompt_completion', 'alpaca', 'messages', 'preference',
                'unpaired_preference')
PREFERENCE_FORMATS = ('preference', 'unpaired_preference')
# The values of data.loss_on, for data.format='messages': which tokens of a rendered
# conversation are trained on (`llmjax.data.chat.ChatTemplate.tokenize`). 'assistant': every
# assistant turn and its end-of-turn token(s) (TRL's assistant_only_loss); 'last_assistant':
# only the final assistant turn (the earlier ones are context, as in a multi-turn prompt);
# 'all': every token of the rendering, template markup included (language modelling on chats).
LOSS_ON = ('assistant', 'last_assistant', 'all')
# The roles a 'messages' conversation may use: those every chat template knows (tool calls
# need per-template fields that records do not carry portably).
ROLES = ('system', 'user', 'assistant')
# The formats data.builtin_tasks can be trained in (`llmjax.data.tasks.builtin_sources`).
BUILTIN_FORMATS = ('prompt_completion', 'messages', 'preference', 'unpaired_preference')
# The formats whose records may be conversations rendered by data.chat_template.
TEMPLATE_FORMATS = ('messages', 'preference', 'unpaired_preference')
# The values of data.split: how files become train and validation splits. 'documents': every
# VALIDATION_EVERY-th document (in file order) is held out. 'tail': the .txt files are one
# continuous text and its last data.val_fraction of characters are held out (nanoGPT's split:
# train = data[:int(n * 0.9)]); both parts are cut into windows of data.seq_len + 1 characters
# (`text_windows`), so a char tokenizer makes one row of each.
SPLITS = ('documents', 'tail')
# The JSONL record of each format that reads only local files, for error messages.
_RECORDS = {'prompt_completion': '{"prompt": ..., "completion": ...}',
            'alpaca': '{"instruction": ..., "input": ..., "output": ...}',
            'messages': '{"messages": [{"role": ..., "content": ...}, ...]}',
            'preference': '{"prompt": ..., "chosen": ..., "rejected": ...}',
            'unpaired_preference': '{"prompt": ..., "completion": ..., "label": true|false}'}

# Stanford Alpaca's prompt templates (tatsu-lab/stanford_alpaca, train.py PROMPT_DICT),
# verbatim: the prompt ends at 'Response:' and the output follows it directly, as Alpaca
# trained (source + target, with the loss on the target and EOS only). A record whose input is
# empty (or absent) takes the template without the Input section, as Alpaca's code does.
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further"
    " context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately"
    " completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:")


def alpaca_prompt(instruction: str, input_text: str = '') -> str:
  """The Alpaca prompt of one record: ALPACA_PROMPT_INPUT, or ALPACA_PROMPT_NO_INPUT when
  `input_text` is empty."""
  if input_text:
    return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=input_text)
  return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


class PromptCompletion(NamedTuple):
  """One supervised example: the model is trained to continue `prompt` with `completion`."""
  prompt: str
  completion: str


class Conversation(NamedTuple):
  """One chat example: the model is trained on the assistant messages of `messages`.

  messages: {"role": one of ROLES, "content": str} dicts (other keys pass to the template).
  where: 'path:line' of its JSONL record, for error messages ('' for in-memory ones).
  """
  messages: tuple[dict, ...]
  where: str = ''


def check_data_format(data_cfg, *, data_files: bool = True) -> str:
  """data.format, checked against the other data keys; ConfigError naming the key and fix.

  Configs older than data.format (and bare test configs) lack the key: they mean 'text'.
  data_files=False skips the need for data.path (a plan compiles without the data).
  """
  fmt = data_cfg.get('format', 'text')
  if fmt not in DATA_FORMATS:
    raise ConfigError(f"data.format='{fmt}' is not one of {list(DATA_FORMATS)}."
                      f"{closest(fmt, DATA_FORMATS)}")
  builtin = tuple(data_cfg.get('builtin_tasks', ()))
  if builtin:
    from llmjax.data import tasks  # the names, with did-you-mean, before anything is read
    tasks.check_task_names(builtin, where='data.builtin_tasks')
    if fmt not in BUILTIN_FORMATS:
      raise ConfigError(f"data.builtin_tasks needs data.format='prompt_completion' (the Q/A"
                        f" records as they are), 'messages' (as conversations, with"
                        f" data.chat_template), 'preference' or 'unpaired_preference' (their"
                        f" preference pairs); this run's is '{fmt}'.")
    for key in ('path', 'tfds_name'):
      if data_cfg.get(key, ''):
        raise ConfigError(f"data.builtin_tasks={builtin} and data.{key}='{data_cfg[key]}' are"
                          f" both set; train on one of them (data.{key}='' for the tasks).")
  elif data_files and fmt in _RECORDS and not data_cfg.get('path', ''):
    raise ConfigError(f"data.format='{fmt}' needs data.path: a .jsonl file or glob of"
                      f" {_RECORDS[fmt]} records (the embedded corpus and data.tfds_name are"
                      " text only), or data.builtin_tasks.")
  if data_cfg.get('chat_template', '') and fmt not in TEMPLATE_FORMATS:
    raise ConfigError(f"data.chat_template='{data_cfg.chat_template}' is only read for"
                      f" data.format='messages' (this run's is '{fmt}') and the preference"
                      " formats; set data.format or data.chat_template=''.")
  pairs_per_row = data_cfg.get('pairs_per_row', 1)
  if not isinstance(pairs_per_row, int) or pairs_per_row < 1:
    raise ConfigError(f"data.pairs_per_row={pairs_per_row!r} must be an integer >= 1 (1: one"
                      " pair per row, as TRL batches).")
  split = data_cfg.get('split', 'documents')
  if split not in SPLITS:
    raise ConfigError(f"data.split='{split}' is not one of {list(SPLITS)}.{closest(split, SPLITS)}")
  if split == 'tail':
    fraction = data_cfg.get('val_fraction', 0.1)
    if fmt != 'text':
      raise ConfigError(f"data.split='tail' holds out the end of one continuous text: it needs"
                        f" data.format='text' (this run's is '{fmt}'); use data.split="
                        "'documents'.")
    if data_files and not data_cfg.get('path', ''):
      raise ConfigError("data.split='tail' needs data.path: the .txt file(s) whose last"
                        " data.val_fraction of characters is held out.")
    if not 0 < fraction < 1:
      raise ConfigError(f"data.val_fraction={fraction} must be in (0, 1), e.g. 0.1 (the last"
                        " 10% of the characters).")
  loss_on = data_cfg.get('loss_on', 'assistant')
  check_loss_on(loss_on)
  if loss_on != 'assistant' and fmt != 'messages':
    raise ConfigError(f"data.loss_on='{loss_on}' is only read for data.format='messages' (this"
                      f" run's is '{fmt}'); set data.format or data.loss_on='assistant'.")
  return fmt


def check_loss_on(loss_on: str) -> None:
  """ConfigError, with the closest value, when data.loss_on is not one of LOSS_ON."""
  if loss_on not in LOSS_ON:
    raise ConfigError(f"data.loss_on='{loss_on}' is not one of {list(LOSS_ON)}."
                      f"{closest(str(loss_on), LOSS_ON)}")


class TextSource:
  """Random-access documents as `str`, from a source of str, bytes or dicts holding them."""

  def __init__(self, source, text_key: str = 'text'):
    self.source, self.text_key = source, text_key

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> str:
    x = self.source[i]
    if isinstance(x, dict):
      x = x[self.text_key]
    return x.decode('utf-8') if isinstance(x, bytes) else x

  def __repr__(self) -> str:
    return f'TextSource({len(self)} documents)'


class PromptCompletionSource:
  """Random-access `PromptCompletion`s from a source of dicts with 'prompt' and 'completion'
  (str or bytes): the features of a prepared prompt_completion copy, whatever data.prompt_key
  and data.completion_key named them in the JSONL files (and of an alpaca copy: its prompt
  already rendered)."""

  def __init__(self, source):
    self.source = source

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> PromptCompletion:
    x = self.source[i]
    return PromptCompletion(*(v.decode('utf-8') if isinstance(v, bytes) else v
                              for v in (x['prompt'], x['completion'])))

  def __repr__(self) -> str:
    return f'PromptCompletionSource({len(self)} examples)'


class ConversationSource:
  """Random-access `Conversation`s from a source of dicts {'messages': JSON list, 'where':
  'path:line'} (str or bytes): the features of a prepared 'messages' copy."""

  def __init__(self, source):
    self.source = source

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> Conversation:
    x = {k: v.decode('utf-8') if isinstance(v, bytes) else v for k, v in self.source[i].items()}
    return Conversation(tuple(json.loads(x['messages'])), x['where'])

  def __repr__(self) -> str:
    return f'ConversationSource({len(self)} conversations)'


# A preference text: a plain string, or a conversation (a tuple of {"role", "content"} dicts).
PreferenceText = str | tuple


class PreferencePair(NamedTuple):
  """One paired preference example (data.format='preference', TRL's preference format).

  prompt, chosen, rejected: all strings, or all conversations: the prompt's messages (rendered
  with the generation prompt) and the completions' assistant messages. An implicit-prompt
  record (no prompt) has already been split by `extract_prompt`.
  margin: the record's optional numeric `margin` field (0.0 when absent), for reward models.
  where: 'path:line' of its JSONL record, for messages ('' for in-memory ones).
  """
  prompt: PreferenceText
  chosen: PreferenceText
  rejected: PreferenceText
  margin: float = 0.0
  where: str = ''


class UnpairedExample(NamedTuple):
  """One unpaired preference example (data.format='unpaired_preference', KTO's
  `{"prompt", "completion", "label"}`): label True = desirable, False = undesirable."""
  prompt: PreferenceText
  completion: PreferenceText
  label: bool
  where: str = ''


def _as_text(value) -> PreferenceText:
  return tuple(value) if isinstance(value, list) else value


class PreferenceSource:
  """Random-access `PreferencePair`s or `UnpairedExample`s from a source of dicts {'record':
  JSON object str, 'where': 'path:line'} (str or bytes): the features of a prepared
  'preference' / 'unpaired_preference' copy, and the built-in pairs. A conversation is a JSON
  list, so TFDS's fixed features hold it as text."""

  def __init__(self, source):
    self.source = source

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> PreferencePair | UnpairedExample:
    x = {k: v.decode('utf-8') if isinstance(v, bytes) else v for k, v in self.source[i].items()}
    r = json.loads(x['record'])
    if 'label' in r:
      return UnpairedExample(_as_text(r['prompt']), _as_text(r['completion']), r['label'],
                             x['where'])
    return PreferencePair(_as_text(r['prompt']), _as_text(r['chosen']), _as_text(r['rejected']),
                          float(r.get('margin', 0.0)), x['where'])

  def __repr__(self) -> str:
    return f'PreferenceSource({len(self)} examples)'


def extract_prompt(chosen, rejected):
  """(prompt, chosen, rejected) of an implicit-prompt pair: the prompt is the longest common
  prefix of chosen and rejected (characters of strings, messages of conversations), as TRL's
  `trl.data_utils.extract_prompt` computes it, quirks included:
  - a space just before the first difference goes to the completions, not the prompt;
  - when one is a prefix of the other (no difference found), the prompt stops one element
    short of the shorter, so each completion keeps at least its last element.
  One divergence: TRL's space rule at a difference in the very first element (idx 0) looks at
  element -1 (the last character) and may return chosen[:-1] as the prompt; here the prompt is
  then empty.
  """
  n = min(len(chosen), len(rejected))
  idx = 0
  for idx in range(n):
    if chosen[idx] != rejected[idx]:
      if idx > 0 and chosen[idx - 1] == ' ':
        idx -= 1
      break
  return chosen[:idx], chosen[idx:], rejected[idx:]


class _HeldOut:
  """Every `every`-th item of `source` (held_out=True) or all the others, by index arithmetic
  (no index list: a catalog split may hold hundreds of millions of examples)."""

  def __init__(self, source, every: int, held_out: bool):
    self.source, self.every, self.held_out = source, every, held_out

  def __len__(self) -> int:
    n = len(self.source) // self.every
    return n if self.held_out else len(self.source) - n

  def __getitem__(self, i: int):
    e = self.every
    if self.held_out:
      return self.source[i * e + e - 1]
    return self.source[(i // (e - 1)) * e + i % (e - 1)]


def in_memory_source(texts: list[str]) -> TextSource:
  """A source over a list of documents (tests, the embedded corpus)."""
  if not texts:
    raise DataError("the corpus is empty: no documents to train on.")
  bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
  if bad is not None:
    raise DataError(f"document {bad} is a {type(texts[bad]).__name__}, not a str.")
  return TextSource(list(texts))


# --- Local files -------------------------------------------------------------------------------

def resolve_files(pattern: str) -> list[str]:
  """The files a path or glob names, sorted; DataError when none or of an unknown kind."""
  files = sorted(f for f in glob.glob(pattern) if os.path.isfile(f))
  if not files:
    raise DataError(f"data.path='{pattern}' matches no file; pass an existing .txt/.jsonl file"
                    " or glob.")
  for f in files:
    if not f.endswith(('.txt', '.jsonl')):
      raise DataError(f"{f}: unsupported file type; data.path takes .txt and .jsonl files.")
  return files


def _lines(path: str) -> Iterator[tuple[int, str]]:
  """(line number, text) of a UTF-8 file; a bad byte raises DataError naming path:line."""
  with open(path, 'rb') as f:  # binary, so a decoding error is pinned to its own line
    for n, raw in enumerate(f, 1):
      try:
        yield n, raw.decode('utf-8').replace('\r\n', '\n')
      except UnicodeDecodeError as e:
        raise DataError(f"{path}:{n}: not valid UTF-8 ({e.reason} at byte {e.start}); re-encode"
                        " the file as UTF-8.") from None


def _jsonl_objects(path: str) -> Iterator[tuple[int, object]]:
  """(line number, parsed value) of each non-blank line of a JSONL file."""
  for n, line in _lines(path):
    if not line.strip():
      continue
    try:
      yield n, json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno}); fix or"
                      " delete that line.") from None


def _string_field(path: str, n: int, obj, key: str, setting: str, what: str,
                  taken: tuple[str, ...] = ()) -> str:
  """obj[key] when it is a str; else DataError naming path:n, the field and the config key.

  `taken`: fields read for something else, never suggested as the one meant (difflib finds
  'prompt' close to 'completion').
  """
  if not isinstance(obj, dict) or key not in obj:
    hint = closest(key, [k for k in obj if k not in taken]) if isinstance(obj, dict) else ''
    raise DataError(f"{path}:{n}: no '{key}' field; set {setting} to the field that holds the"
                    f" {what}.{hint}")
  if not isinstance(obj[key], str):
    raise DataError(f"{path}:{n}: field '{key}' is a {type(obj[key]).__name__}, not a string;"
                    f" set {setting} to the field that holds the {what}.")
  return obj[key]


def _jsonl_documents(path: str, text_key: str) -> Iterator[str]:
  for n, obj in _jsonl_objects(path):
    text = _string_field(path, n, obj, text_key, 'data.text_key', 'text')
    if text:
      yield text


def _txt_documents(path: str) -> Iterator[str]:
  paragraph, size = [], 0
  for _, line in _lines(path):
    if line.strip():
      paragraph.append(line)
      size += len(line)
      if size < MAX_TXT_DOCUMENT_CHARS:
        continue
    if paragraph:
      yield ''.join(paragraph).rstrip('\n')
      paragraph, size = [], 0
  if paragraph:
    yield ''.join(paragraph).rstrip('\n')


def iter_documents(path: str, text_key: str = 'text') -> Iterator[str]:
  """The documents of one .txt/.jsonl file; a bad line raises DataError `path:line: ...`."""
  return _jsonl_documents(path, text_key) if path.endswith('.jsonl') else _txt_documents(path)


def iter_prompt_completions(path: str, prompt_key: str = 'prompt',
                            completion_key: str = 'completion') -> Iterator[PromptCompletion]:
  """The examples of one .jsonl file; a bad line raises DataError `path:line: ...`.

  A record whose prompt and completion are both empty is skipped, as an empty text document is.
  """
  if not path.endswith('.jsonl'):
    raise DataError(f"{path}: data.format='prompt_completion' reads .jsonl files of"
                    ' {"prompt": ..., "completion": ...} records; convert it or set'
                    " data.format='text'.")
  for n, obj in _jsonl_objects(path):
    example = PromptCompletion(
        _string_field(path, n, obj, prompt_key, 'data.prompt_key', 'prompt', (completion_key,)),
        _string_field(path, n, obj, completion_key, 'data.completion_key', 'completion',
                      (prompt_key,)))
    if example.prompt or example.completion:
      yield example


def iter_alpaca(path: str, instruction_key: str = 'instruction', input_key: str = 'input',
                output_key: str = 'output') -> Iterator[PromptCompletion]:
  """The examples of one .jsonl file of Alpaca records, as `PromptCompletion(alpaca_prompt(
  instruction, input), output)`; a bad line raises DataError `path:line: ...`.

  All three fields are required, the input too ('' when there is none, as in Alpaca's own
  data): a file whose inputs are under another name would otherwise lose them silently.
  """
  if not path.endswith('.jsonl'):
    raise DataError(f"{path}: data.format='alpaca' reads .jsonl files of"
                    ' {"instruction": ..., "input": ..., "output": ...} records; convert it or'
                    " set data.format='text'.")
  keys = (instruction_key, input_key, output_key)
  for n, obj in _jsonl_objects(path):
    instruction = _string_field(path, n, obj, instruction_key, 'data.instruction_key',
                                'instruction', keys)
    input_text = _string_field(path, n, obj, input_key, 'data.input_key',
                               'input ("" when there is none)', keys)
    output = _string_field(path, n, obj, output_key, 'data.output_key', 'output', keys)
    yield PromptCompletion(alpaca_prompt(instruction, input_text), output)


def _messages_field(path: str, n: int, obj, key: str) -> list[dict]:
  """obj[key] when it is a valid conversation; else DataError naming path:n and the fix."""
  fix = 'each message needs a "role" and a string "content"'
  if not isinstance(obj, dict) or key not in obj:
    hint = closest(key, obj) if isinstance(obj, dict) else ''
    raise DataError(f"{path}:{n}: no '{key}' field; set data.messages_key to the field that"
                    f' holds the list of {{"role": ..., "content": ...}} messages.{hint}')
  messages = obj[key]
  if not isinstance(messages, list):
    raise DataError(f"{path}:{n}: field '{key}' is a {type(messages).__name__}, not a list of"
                    f' {{"role": ..., "content": ...}} messages; set data.messages_key to the'
                    " field that holds them.")
  _check_message_items(path, n, messages, '')
  if not any(m['role'] == 'assistant' for m in messages):
    raise DataError(f"{path}:{n}: the conversation has no assistant message, so nothing to"
                    " train on; add one or delete that line.")
  return messages


def iter_conversations(path: str, messages_key: str = 'messages') -> Iterator[Conversation]:
  """The conversations of one .jsonl file; a bad line raises DataError `path:line: ...`."""
  if not path.endswith('.jsonl'):
    raise DataError(f"{path}: data.format='messages' reads .jsonl files of"
                    ' {"messages": [{"role": ..., "content": ...}, ...]} records; convert it'
                    " or set data.format='text'.")
  for n, obj in _jsonl_objects(path):
    yield Conversation(tuple(_messages_field(path, n, obj, messages_key)), f'{path}:{n}')


def _check_messages(path: str, n: int, key: str, messages: list, setting: str) -> tuple:
  """A list of {"role", "content"} messages, checked; else DataError naming path:n."""
  if not messages:
    raise DataError(f"{path}:{n}: field '{key}' is an empty list of messages; give it at least"
                    f" one message (or a string), or set {setting}.")
  _check_message_items(path, n, messages, f'{key} ')
  return tuple(messages)


def _check_message_items(path: str, n: int, messages: list, prefix: str) -> None:
  """Each message a {"role" in ROLES, "content": str} object; else DataError naming path:n
  and '<prefix>message j'."""
  fix = 'each message needs a "role" and a string "content"'
  for j, m in enumerate(messages):
    what = f"{prefix}message {j}"
    if not isinstance(m, dict):
      raise DataError(f"{path}:{n}: {what} is a {type(m).__name__}, not an object; {fix}.")
    for field in ('role', 'content'):
      if field not in m:
        raise DataError(f"{path}:{n}: {what} has no '{field}'; {fix}.")
    if m['role'] not in ROLES:
      raise DataError(f"{path}:{n}: {what} has role {m['role']!r}; use one of"
                      f" {list(ROLES)}.{closest(str(m['role']), ROLES)}")
    if not isinstance(m['content'], str):
      raise DataError(f"{path}:{n}: {what}'s content is a {type(m['content']).__name__}, not a"
                      f" string; {fix}.")


def _preference_field(path: str, n: int, obj: dict, key: str, setting: str, what: str,
                      taken: tuple[str, ...]):
  """obj[key] as a str or a checked message list; DataError naming path:n and the key."""
  if key not in obj:
    hint = closest(key, [k for k in obj if k not in taken])
    raise DataError(f"{path}:{n}: no '{key}' field; set {setting} to the field that holds the"
                    f" {what}.{hint}")
  value = obj[key]
  if isinstance(value, list):
    return _check_messages(path, n, key, value, setting)
  if not isinstance(value, str):
    raise DataError(f"{path}:{n}: field '{key}' is a {type(value).__name__}, not a string or a"
                    f' list of {{"role": ..., "content": ...}} messages; set {setting} to the'
                    f" field that holds the {what}.")
  return value


def _kinds_match(path: str, n: int, named: dict) -> None:
  """DataError unless the fields are all strings or all conversations."""
  kinds = {k: 'a conversation' if isinstance(v, tuple) else 'a string' for k, v in named.items()}
  if len(set(kinds.values())) > 1:
    said = ', '.join(f"'{k}' is {v}" for k, v in kinds.items())
    raise DataError(f"{path}:{n}: {said}; a record's fields must be all strings or all lists of"
                    " messages.")


def _check_jsonl(path: str, fmt: str) -> None:
  if not path.endswith('.jsonl'):
    raise DataError(f"{path}: data.format='{fmt}' reads .jsonl files of {_RECORDS[fmt]} records;"
                    " convert it or set data.format='text'.")


def iter_preference_pairs(path: str, prompt_key: str = 'prompt', chosen_key: str = 'chosen',
                          rejected_key: str = 'rejected') -> Iterator[PreferencePair]:
  """The pairs of one .jsonl file of TRL preference records; a bad line raises DataError
  `path:line: ...`. A record without the prompt field has an implicit prompt (the common
  prefix of chosen and rejected, `extract_prompt`); so has one whose prompt is a string while
  its completions are conversations (or the reverse), as TRL's maybe_extract_prompt decides.
  An optional numeric `margin` is kept."""
  _check_jsonl(path, 'preference')
  keys = (prompt_key, chosen_key, rejected_key)
  for n, obj in _jsonl_objects(path):
    if not isinstance(obj, dict):
      raise DataError(f"{path}:{n}: a {type(obj).__name__}, not a JSON object; write"
                      f" {_RECORDS['preference']} records.")
    chosen = _preference_field(path, n, obj, chosen_key, 'data.chosen_key', 'chosen completion',
                               keys)
    rejected = _preference_field(path, n, obj, rejected_key, 'data.rejected_key',
                                 'rejected completion', keys)
    _kinds_match(path, n, {chosen_key: chosen, rejected_key: rejected})
    prompt = None
    if prompt_key in obj:
      prompt = _preference_field(path, n, obj, prompt_key, 'data.prompt_key', 'prompt', keys)
      if isinstance(prompt, tuple) != isinstance(chosen, tuple):
        prompt = None  # TRL: the prompt is then inside the completions
    if prompt is None:
      prompt, chosen, rejected = extract_prompt(chosen, rejected)
    margin = obj.get('margin', 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
      raise DataError(f"{path}:{n}: field 'margin' is {json.dumps(margin)}, not a number; give"
                      " a number or leave the field out.")
    yield PreferencePair(prompt, chosen, rejected, float(margin), f'{path}:{n}')


def iter_unpaired(path: str, prompt_key: str = 'prompt', completion_key: str = 'completion',
                  label_key: str = 'label') -> Iterator[UnpairedExample]:
  """The examples of one .jsonl file of KTO records {"prompt", "completion", "label":
  true|false}; a bad line raises DataError `path:line: ...`."""
  _check_jsonl(path, 'unpaired_preference')
  keys = (prompt_key, completion_key, label_key)
  for n, obj in _jsonl_objects(path):
    if not isinstance(obj, dict):
      raise DataError(f"{path}:{n}: a {type(obj).__name__}, not a JSON object; write"
                      f" {_RECORDS['unpaired_preference']} records.")
    prompt = _preference_field(path, n, obj, prompt_key, 'data.prompt_key', 'prompt', keys)
    completion = _preference_field(path, n, obj, completion_key, 'data.completion_key',
                                   'completion', keys)
    _kinds_match(path, n, {prompt_key: prompt, completion_key: completion})
    if label_key not in obj:
      raise DataError(f"{path}:{n}: no '{label_key}' field; set data.label_key to the field that"
                      " holds true (desirable) or false (undesirable)."
                      f"{closest(label_key, [k for k in obj if k not in keys])}")
    if not isinstance(obj[label_key], bool):
      raise DataError(f"{path}:{n}: field '{label_key}' is {json.dumps(obj[label_key])}, not"
                      " true or false; write true for a desirable completion, false for an"
                      " undesirable one.")
    yield UnpairedExample(prompt, completion, obj[label_key], f'{path}:{n}')


def preference_feature(example: PreferencePair | UnpairedExample) -> dict:
  """The {'record', 'where'} dict `PreferenceSource` reads back as `example`."""
  r = example._asdict()
  where = r.pop('where')
  return {'record': json.dumps(r, ensure_ascii=False), 'where': where}


# One TFDS example per document: {'text': str}, {'prompt': str, 'completion': str} (also for
# 'alpaca') or {'messages': JSON str, 'where': 'path:line'}.
def _text_examples(path: str, text_key: str) -> Iterator[dict]:
  for doc in iter_documents(path, text_key):
    yield {'text': doc}


def _prompt_completion_examples(path: str, prompt_key: str, completion_key: str) -> Iterator[dict]:
  for example in iter_prompt_completions(path, prompt_key, completion_key):
    yield example._asdict()


def _alpaca_examples(path: str, instruction_key: str, input_key: str,
                     output_key: str) -> Iterator[dict]:
  for example in iter_alpaca(path, instruction_key, input_key, output_key):
    yield example._asdict()


def _conversation_examples(path: str, messages_key: str) -> Iterator[dict]:
  for conversation in iter_conversations(path, messages_key):
    # A JSON string: TFDS features are fixed-shape, a conversation is a ragged list of dicts.
    yield {'messages': json.dumps(conversation.messages, ensure_ascii=False),
           'where': conversation.where}


def _preference_examples(path: str, fmt: str, prompt_key: str, chosen_key: str,
                          rejected_key: str, completion_key: str, label_key: str) -> Iterator[dict]:
  if fmt == 'preference':
    examples = iter_preference_pairs(path, prompt_key, chosen_key, rejected_key)
  else:
    examples = iter_unpaired(path, prompt_key, completion_key, label_key)
  for example in examples:
    yield preference_feature(example)


def _count_documents(files: list[str], examples: Callable[[str], Iterator[dict]]) -> int:
  """Reads every file once before anything is written, so bad input fails fast."""
  count = sum(1 for f in files for _ in examples(f))
  if count == 0:
    raise DataError(f"data.path: {', '.join(files)} hold no documents (empty corpus).")
  if count < VALIDATION_EVERY:
    # A handful of examples is a check, not a corpus (one TRL-comparison batch): trained on
    # whole, with no validation split rather than refused.
    logging.getLogger(__name__).warning(
        "data.path holds %d documents, fewer than %d: no validation split is held out, so"
        " eval_loss is not measured (eval tasks still run).", count, VALIDATION_EVERY)
  return count


@functools.cache  # one class per process: TFDS keys some of its caches by class
def _builder_class():
  import tensorflow_datasets as tfds

  # Not registered in the TFDS catalog: it is not a named public dataset, and registering
  # would clash when the class is built again in another process or test.
  class LocalText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Local .txt/.jsonl files as a TFDS dataset with 'train' and 'validation' splits."""
    VERSION = tfds.core.Version('1.0.0')

    def __init__(self, *, files, examples, features, **kwargs):
      # examples(path) yields one dict per document, with the keys `features`.
      self._files, self._examples, self._features = files, examples, features
      super().__init__(**kwargs)

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {name: tfds.features.Text() for name in self._features}))

    # Set by local_files_source before preparing: False when the files hold too few
    # documents to spare any (TFDS refuses an empty split, so there is then none).
    hold_out = True

    def _split_generators(self, dl_manager):
      if not self.hold_out:
        return {'train': self._generate_examples(validation=None)}
      return {'train': self._generate_examples(validation=False),
              'validation': self._generate_examples(validation=True)}

    def _generate_examples(self, validation: bool):
      n = 0
      for f in self._files:
        for example in self._examples(f):
          if validation is None or (n % VALIDATION_EVERY == VALIDATION_EVERY - 1) == validation:
            yield n, example  # key n: TFDS orders examples by a hash of it
          n += 1

  return LocalText


def local_files_source(pattern: str, text_key: str, data_dir: str, *,
                       data_format: str = 'text', prompt_key: str = 'prompt',
                       completion_key: str = 'completion', messages_key: str = 'messages',
                       instruction_key: str = 'instruction', input_key: str = 'input',
                       output_key: str = 'output', chosen_key: str = 'chosen',
                       rejected_key: str = 'rejected', label_key: str = 'label') -> dict:
  """{'train', 'validation'} sources for local files, prepared once under `data_dir`.

  data_format 'text' gives `TextSource`s of str; 'prompt_completion' (JSONL only) gives
  `PromptCompletionSource`s of `PromptCompletion`; 'alpaca' (JSONL only) too, each prompt the
  rendered Alpaca template (so it trains exactly as a prompt_completion file of those
  prompts would); 'messages' (JSONL only) gives
  `ConversationSource`s of `Conversation`; 'preference' and 'unpaired_preference' (JSONL only)
  give `PreferenceSource`s of `PreferencePair` / `UnpairedExample`. The prepared copy is keyed
  by the format,
  its field names and the files' paths, sizes and modification times, so editing a file or
  switching the format builds a new one instead of silently reusing stale data.
  """
  if data_format not in DATA_FORMATS:
    raise ConfigError(f"data.format='{data_format}' is not one of {list(DATA_FORMATS)}."
                      f"{closest(data_format, DATA_FORMATS)}")
  files = [os.path.abspath(f) for f in resolve_files(pattern)]
  spec = [_FORMAT, VALIDATION_EVERY, MAX_TXT_DOCUMENT_CHARS, text_key]
  # Text copies keep the key they had before data.format existed, so existing prepared copies
  # stay valid; other formats add theirs, so no two formats ever share a copy.
  if data_format == 'text':
    examples = functools.partial(_text_examples, text_key=text_key)
    features, wrap = ('text',), TextSource
  elif data_format == 'prompt_completion':
    spec += [data_format, prompt_key, completion_key]
    examples = functools.partial(_prompt_completion_examples, prompt_key=prompt_key,
                                 completion_key=completion_key)
    features, wrap = PromptCompletion._fields, PromptCompletionSource
  elif data_format == 'alpaca':
    # The template's text is part of the key: a change to it must not reuse old prompts.
    spec += [data_format, instruction_key, input_key, output_key, ALPACA_PROMPT_INPUT,
             ALPACA_PROMPT_NO_INPUT]
    examples = functools.partial(_alpaca_examples, instruction_key=instruction_key,
                                 input_key=input_key, output_key=output_key)
    features, wrap = PromptCompletion._fields, PromptCompletionSource
  elif data_format in PREFERENCE_FORMATS:
    spec += [data_format, prompt_key, chosen_key, rejected_key, completion_key, label_key]
    examples = functools.partial(_preference_examples, fmt=data_format, prompt_key=prompt_key,
                                 chosen_key=chosen_key, rejected_key=rejected_key,
                                 completion_key=completion_key, label_key=label_key)
    features, wrap = ('record', 'where'), PreferenceSource
  else:  # 'messages'
    spec += [data_format, messages_key]
    examples = functools.partial(_conversation_examples, messages_key=messages_key)
    features, wrap = Conversation._fields, ConversationSource
  key = hashlib.sha256(json.dumps(
      spec + [(f, os.path.getsize(f), os.path.getmtime(f)) for f in files]).encode())
  data_dir = os.path.join(data_dir, key.hexdigest()[:16])
  builder = _builder_class()(files=files, examples=examples, features=features,
                             data_dir=data_dir, file_format='array_record')
  # is_prepared() on a folder that does not exist yet logs a warning: check the folder first.
  if not os.path.isdir(builder.data_dir) or not builder.is_prepared():
    builder.hold_out = _count_documents(files, examples) >= VALIDATION_EVERY
    builder.download_and_prepare()
  return {split: wrap(builder.as_data_source(split) if split in builder.info.splits else [])
          for split in ('train', 'validation')}


def text_windows(text: str, n: int) -> list[str]:
  """`text` cut into windows of n + 1 characters that overlap by one, starting every n: each
  character after the first is predicted once, with up to n - 1 characters of its window before
  it (nanoGPT's fullval.py windows); the last window is shorter."""
  return [text[s:s + n + 1] for s in range(0, len(text) - 1, n)]


def tail_split_source(pattern: str, val_fraction: float, window: int) -> dict[str, TextSource]:
  """{'train', 'validation'} of data.split='tail': the .txt files (sorted, concatenated) as one
  text whose first int(n * (1 - val_fraction)) characters train and the rest validate, each
  cut into `text_windows` of `window` + 1 characters. Read into memory (no TFDS copy): the
  split is meant for small single-text corpora such as Tiny Shakespeare (1 MB)."""
  paths = resolve_files(pattern)
  bad = next((f for f in paths if not f.endswith('.txt')), None)
  if bad:
    raise DataError(f"{bad}: data.split='tail' reads .txt files as one text; use"
                    " data.split='documents' for .jsonl files.")
  text = ''.join(line for f in paths for _, line in _lines(f))
  cut = int(len(text) * (1 - val_fraction))
  if cut < 2 or len(text) - cut < 2:
    raise DataError(f"data.path: {', '.join(paths)} hold {len(text)} characters, too few to"
                    f" split at data.val_fraction={val_fraction}; add text.")
  return {'train': TextSource(text_windows(text[:cut], window)),
          'validation': TextSource(text_windows(text[cut:], window))}


# --- TFDS catalog ------------------------------------------------------------------------------

def tfds_source(name: str, text_key: str, data_dir: str | None = None) -> dict[str, TextSource]:
  """{'train', 'validation'} sources of a TFDS catalog dataset, in ArrayRecord format.

  TFDS downloads and prepares it on first use (network needed then) under `data_dir`
  (default: $TFDS_DATA_DIR or ~/tensorflow_datasets). Evaluation uses the 'validation' split,
  else 'test', else every VALIDATION_EVERY-th example of 'train'.
  """
  import tensorflow_datasets as tfds
  try:
    splits = tfds.data_source(name, data_dir=data_dir,
                              builder_kwargs={'file_format': 'array_record'})
  except tfds.core.DatasetNotFoundError:
    raise DataError(f"data.tfds_name='{name}' is not in the TFDS catalog; see"
                    " https://www.tensorflow.org/datasets/catalog.") from None
  if 'train' not in splits:
    raise DataError(f"data.tfds_name='{name}' has no 'train' split (it has {list(splits)}).")
  train = splits['train']
  val = splits.get('validation', splits.get('test'))
  if val is None:
    train, val = (_HeldOut(train, VALIDATION_EVERY, held_out) for held_out in (False, True))
  example = train[0]
  if isinstance(example, dict) and text_key not in example:
    raise DataError(f"data.tfds_name='{name}' has no feature '{text_key}' (it has"
                    f" {sorted(example)}); set data.text_key.{closest(text_key, example)}")
  return {'train': TextSource(train, text_key), 'validation': TextSource(val, text_key)}
