"""Chat templates: conversations rendered as a checkpoint renders them, with the assistant turns
marked for the loss (data.format='messages').

A chat template is the Jinja source a Hugging Face checkpoint ships (tokenizer_config.json's
`chat_template`, or chat_template.jinja); it turns a list of {"role", "content"} messages into
the exact text the model was tuned on. It is rendered here as transformers'
`apply_chat_template` renders it (a sandboxed Jinja environment with trim_blocks and
lstrip_blocks; variables `messages`, `add_generation_prompt`, `bos_token`, `eos_token`; a
`raise_exception` function and a `tojson` filter), so a model fine-tuned here sees the same
text at inference time through any HF-compatible server. data.chat_template names one of the
templates shipped in llmjax/data/templates/ (TEMPLATES: 'chatml', 'llama3', 'qwen2.5') or a
.jinja file.

Which characters belong to assistant turn i is found without parsing the template:
render(messages[:i], add_generation_prompt=True) ends where the assistant's text starts, and
render(messages[:i + 1]) ends where it stops (after the template's end-of-turn token, e.g.
<|eot_id|> or <|im_end|>\\n, which the model must learn to emit). Both are prefixes of the whole
conversation's rendering for every template that renders a turn the same way whatever follows
it ("prefix-stable"); one that is not (e.g. a template that drops earlier turns' reasoning) is
refused with a DataError rather than trained on misaligned weights.
"""

import importlib.resources
import json
import os
import re

import jinja2
import jinja2.ext
import jinja2.sandbox
import numpy as np

from llmjax import files
from llmjax.data.sources import Conversation, check_loss_on
from llmjax.data.tokenizer import Tokenizer
from llmjax.errors import ConfigError, DataError, closest


def _raise_exception(message: str):
  # Templates call raise_exception('Conversation roles must alternate ...') on input they
  # cannot format; ChatTemplate turns it into a DataError naming the record.
  raise jinja2.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
  # transformers' override of Jinja's tojson: no HTML escaping, non-ASCII kept as is.
  return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
  # As transformers' _compile_jinja_template, except that `strftime_now` is left undefined:
  # templates that use it (Llama 3.x) then fall back to their fixed date, so the same file
  # gives the same tokens on every day, host and restart.
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
  env.filters['tojson'] = _tojson
  env.globals['raise_exception'] = _raise_exception
  return env


def encode_with_specials(tokenizer: Tokenizer, specials: dict[str, int], text: str) -> list[int]:
  """tokenizer.encode(text) with the special texts of `specials` ({text: id}) mapped to their ids
  (a sentencepiece model would spell '</s>' out as characters; HF tokenizers map them anyway)."""
  if not specials:
    return tokenizer.encode(text)
  ids, start = [], 0
  pattern = '|'.join(re.escape(s) for s in sorted(specials, key=len, reverse=True))
  for m in re.finditer(pattern, text):
    ids += tokenizer.encode(text[start:m.start()]) if m.start() > start else []
    ids.append(specials[m.group()])
    start = m.end()
  return ids + (tokenizer.encode(text[start:]) if start < len(text) else [])


class ChatTemplate:
  """A chat template bound to the run's tokenizer: conversation -> (tokens, weights).

  Attributes:
    source: the Jinja source.
    origin: where it came from, for error messages ('data.chat_template=x.jinja', ...).
    bos_token, eos_token: the texts `{{ bos_token }}`/`{{ eos_token }}` render to ('' when the
      tokenizer has none); `tokenize` maps them back to the tokenizer's bos/eos ids.
  """

  def __init__(self, source: str, tokenizer: Tokenizer, origin: str = 'the chat template'):
    self.source, self.tokenizer, self.origin = source, tokenizer, origin
    self.bos_token = tokenizer.special_text(tokenizer.bos_id) if tokenizer.bos_id >= 0 else ''
    self.eos_token = tokenizer.special_text(tokenizer.eos_id) if tokenizer.eos_id >= 0 else ''
    # A sentencepiece model encodes the text '</s>' as characters, not as its eos id, so the
    # special texts are split out before encoding (HF tokenizers would map them anyway).
    self._specials = {text: i for text, i in ((self.bos_token, tokenizer.bos_id),
                                              (self.eos_token, tokenizer.eos_id)) if text}
    self._compiled = None
    self._compile()  # a syntax error fails here, before any data is read

  def _compile(self):
    if self._compiled is None:
      try:
        self._compiled = _environment().from_string(self.source)
      except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"{self.origin} is not valid Jinja ({e.message} at line {e.lineno});"
                          " fix the template or set data.chat_template to another .jinja file."
                          ) from None
    return self._compiled

  # Grain workers receive the template by pickling; a compiled Jinja template does not pickle.
  def __getstate__(self):
    return dict(self.__dict__, _compiled=None)

  def render(self, messages, add_generation_prompt: bool = False, where: str = '') -> str:
    """The template's text for `messages` (a list of {"role", "content"} dicts)."""
    try:
      return self._compile().render(
          messages=list(messages), add_generation_prompt=add_generation_prompt,
          bos_token=self.bos_token, eos_token=self.eos_token)
    except jinja2.TemplateError as e:
      raise DataError(f"{where or 'a conversation'}: {self.origin} refused it ({e}); fix the"
                      " conversation or use another template (data.chat_template).") from None

  def check_assistant_marker(self) -> None:
    """ConfigError (one line) when the template marks no start of the assistant's answer."""
    check_assistant_marker(self.source, self.origin, self.bos_token, self.eos_token)

  def end_of_turn(self) -> str:
    """The markup the template writes after an assistant message's content, stripped of
    whitespace ('<|im_end|>' for ChatML); '' when none. A model tuned on the template ends its
    reply with it, so a chat stops there even where it is plain text to the tokenizer, not an
    EOS id (ChatML on a tokenizer trained by the run)."""
    reply = 'Y3s, th1s is the repl7.'  # text no template writes by itself
    user = [{'role': 'user', 'content': 'hi'}]
    try:
      start = self.render(user, add_generation_prompt=True)
      full = self.render(user + [{'role': 'assistant', 'content': reply}])
    except DataError:  # a template that refuses this conversation has no usable answer
      return ''
    if not full.startswith(start) or reply not in full[len(start):]:
      return ''
    return full[len(start):].split(reply, 1)[1].strip()

  def segments(self, messages, where: str = '') -> list[tuple[str, bool]]:
    """The whole conversation's rendering cut into (text, is_assistant) pieces, in order.

    The texts concatenate to render(messages) exactly. An assistant piece runs from the end of
    the generation prompt before that message to the end of the rendering through it.
    """
    where = where or 'a conversation'
    full = self.render(messages, where=where)
    out, pos = [], 0
    for i, message in enumerate(messages):
      if message['role'] != 'assistant':
        continue
      start = self.render(messages[:i], add_generation_prompt=True, where=where)
      end = self.render(messages[:i + 1], where=where)
      if not (end.startswith(start) and full.startswith(end) and len(start) >= pos):
        raise DataError(
            f"{where}: {self.origin} is not prefix-stable: the rendering of messages[:{i}] with"
            f" add_generation_prompt=True and of messages[:{i + 1}] are not prefixes of the"
            f" whole conversation's, so assistant message {i} cannot be located; use a template"
            " that renders each turn the same whatever follows (data.chat_template).")
      if message['content'] and len(end) == len(start):
        raise DataError(f"{where}: {self.origin} renders nothing for assistant message {i};"
                        " use a template that renders assistant turns (data.chat_template).")
      out += [(full[pos:len(start)], False), (full[len(start):len(end)], True)]
      pos = len(end)
    out.append((full[pos:], False))
    return [(text, assistant) for text, assistant in out if text]

  def _encode(self, text: str) -> list[int]:
    return encode_with_specials(self.tokenizer, self._specials, text)

  def encode(self, text: str) -> list[int]:
    """Token ids of a rendering: the bos/eos texts the template wrote become their ids, nothing
    is added (as transformers' apply_chat_template(tokenize=True) tokenizes, with
    add_special_tokens=False; TRL's preference trainers tokenize conversations so)."""
    return self._encode(text)

  def prompt_ids(self, messages) -> list[int]:
    """Token ids of `messages` followed by the template's assistant header: the prompt to
    sample the next assistant turn from (BOS as in `tokenize`)."""
    ids = self._encode(self.render(messages, add_generation_prompt=True))
    bos = self.tokenizer.bos_id
    return [bos] + ids if bos >= 0 and ids[:1] != [bos] else ids

  def tokenize(self, conversation: Conversation,
               loss_on: str = 'assistant') -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32 [n], weights float32 [n]): weight 1 on the tokens trained on, 0 elsewhere.

    loss_on (data.loss_on, `sources.LOSS_ON`): 'assistant' weights the tokens of every
    assistant turn (their end-of-turn tokens included) and nothing else; 'last_assistant'
    only those of the final assistant turn; 'all' every token of the rendering, role headers
    and template markup included (a BOS added here is never a target, so its weight is moot).

    Each piece of `segments` is encoded on its own, so a turn boundary is a token boundary.
    The pipeline's EOS is not appended: the template's end-of-turn token already ends every
    assistant turn (for instruct checkpoints it is among the stop ids), and segment_ids
    separate packed conversations. BOS is prepended only when the rendering does not already
    start with it: templates of checkpoints that have one mostly write `{{ bos_token }}`
    (Llama 3, Mistral, Gemma), and a second BOS would be a sequence the model never saw;
    templates without it (ChatML on a project tokenizer) still start like a pretraining
    document.
    """
    check_loss_on(loss_on)
    segments = self.segments(conversation.messages, conversation.where)
    # The last assistant piece is the final assistant turn: segments keeps them in order.
    last = max((j for j, (_, assistant) in enumerate(segments) if assistant), default=-1)
    tokens, weights = [], []
    for j, (text, assistant) in enumerate(segments):
      ids = self._encode(text)
      trained = {'assistant': assistant, 'last_assistant': j == last, 'all': True}[loss_on]
      tokens += ids
      weights += [float(trained)] * len(ids)
    bos = self.tokenizer.bos_id
    if bos >= 0 and tokens[:1] != [bos]:
      tokens, weights = [bos] + tokens, [0.0] + weights
    return np.asarray(tokens, np.int32), np.asarray(weights, np.float32)


# The templates shipped in llmjax/data/templates/ (package data), by the name that
# data.chat_template selects them with. Each file is the checkpoint's Jinja source verbatim.
TEMPLATES = {
    # ChatML as the transformers chat-templating docs write it (and ChatML checkpoints such as
    # OpenHermes 2.5 ship it): no default system message, so nothing the data does not say is
    # trained on. The choice for a tokenizer trained by the run.
    'chatml': 'chatml.jinja',
    # Meta-Llama-3-8B-Instruct's tokenizer_config.json chat_template: {{ bos_token }} first,
    # contents trimmed, every turn closed by <|eot_id|>.
    'llama3': 'llama3.jinja',
    # Qwen2.5-7B-Instruct's: ChatML plus Qwen's default system message when the conversation
    # has none, and tool calls.
    'qwen2.5': 'qwen2.5.jinja',
}


def template_source(value: str) -> tuple[str, str]:
  """data.chat_template -> (Jinja source, origin for messages): a name of TEMPLATES (a name
  wins over a file of that name in the working directory, so a config means the same thing
  wherever it runs), else a .jinja file (local or gs://). ConfigError, one line, for neither."""
  if value in TEMPLATES:
    resource = importlib.resources.files(__package__).joinpath('templates', TEMPLATES[value])
    return resource.read_text(encoding='utf-8'), f"data.chat_template={value}"
  check_template(value)
  return files.read_text(value), f"data.chat_template={value}"


def check_template(value: str) -> None:
  """ConfigError when data.chat_template is neither a shipped name nor an existing file; cheap
  (config validation calls it before anything runs)."""
  if value in TEMPLATES or (files.exists(value) and not files.isdir(value)):
    return
  stem = os.path.basename(value)
  stem = stem[:-len('.jinja')] if stem.endswith('.jinja') else stem
  raise ConfigError(f"data.chat_template='{value}' does not exist: it is neither a shipped"
                    f" template ({', '.join(repr(n) for n in TEMPLATES)}) nor a file; pass one"
                    " of those names, a .jinja file, or '' for the tokenizer's own template."
                    f"{closest(stem, TEMPLATES)}")


def check_assistant_marker(source: str, origin: str, bos_token: str = '<s>',
                           eos_token: str = '</s>') -> None:
  """ConfigError when `source` renders a user message the same with add_generation_prompt=True
  as without: nothing then marks where the assistant's answer starts, so no prompt can ask the
  model for one (chat, `generate --chat`) and SFT could not tell the answer from the markup
  before it. Needs no tokenizer, so config validation can call it: the bos/eos texts default
  to stand-ins, which can only let a template pass that the tokenizer's own texts then refuse
  (`ChatTemplate.check_assistant_marker`, in `load_template`). A template that refuses this
  one-message conversation is left to the data to fail, naming the record.
  """
  try:
    env = _environment().from_string(source)
    user = [{'role': 'user', 'content': 'hi'}]
    texts = [env.render(messages=user, add_generation_prompt=g, bos_token=bos_token,
                        eos_token=eos_token) for g in (True, False)]
  except jinja2.TemplateError:  # a syntax error is ChatTemplate's to report, a refusal the
    return  # data's (with the record named)
  if texts[0] == texts[1]:
    raise ConfigError(f"{origin} has no assistant marker: add_generation_prompt=True adds nothing"
                      " after a user message, so nothing marks where a reply starts; use a"
                      " template with a generation prompt (e.g. data.chat_template=chatml).")


NO_TEMPLATE = ("data.format='messages' needs a chat template and the tokenizer has none (one"
               " trained by the run or a sentencepiece .model file never does): set"
               " data.chat_template to a shipped template ('chatml', 'llama3', 'qwen2.5') or a"
               " .jinja file, or use an HF checkpoint dir that ships one (data.tokenizer_path or"
               " init.hf_dir).")


RUN_TEMPLATE = 'chat_template.jinja'  # WORKDIR/chat_template.jinja: a run's data.chat_template


def load_template(data_cfg, tokenizer: Tokenizer) -> ChatTemplate:
  """The run's chat template: data.chat_template's (a shipped name or a .jinja file), else the
  tokenizer's own (an HF checkpoint's, through data.tokenizer_path or init.hf_dir); ConfigError
  when there is none or it has no assistant marker (`check_assistant_marker`)."""
  value = data_cfg.get('chat_template', '')
  if value:
    source, origin = template_source(value)
    template = ChatTemplate(source, tokenizer, origin)
  else:
    source = getattr(tokenizer, 'chat_template', None)
    if not source:
      raise ConfigError(NO_TEMPLATE)
    template = ChatTemplate(source, tokenizer, "the tokenizer's chat_template")
  template.check_assistant_marker()
  return template
