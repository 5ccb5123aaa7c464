"""Chat SFT data (data.format='messages'): loss_mask on the assistant turns only, against a
hand-written ChatML rendering; data.loss_on's three values against hand-computed masks; the Llama 3 template (prefix consistency, one BOS); templates
from an HF checkpoint dir and from a .jinja file; record, template and config errors; JSONL
round trip; build_data with a trained tokenizer; a short training run."""

import fnmatch
import json
import os
import re
import shlex
import tomllib

import ml_collections
import numpy as np
import pytest

from llmjax import config as config_lib
from llmjax.data import build_data, local_files_source, make_dataset
from llmjax.data import chat
from llmjax.data.chat import ChatTemplate, load_template
from llmjax.data.sources import Conversation, iter_conversations
from llmjax.data.tokenizer import Tokenizer
from llmjax.errors import ConfigError, DataError
from llmjax.interop.tokenizer import load_tokenizer
from test_data_sft import CharTokenizer, ids

# ChatML as Qwen2.5 writes it, without its default system message.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# Meta-Llama-3-8B-Instruct's tokenizer_config.json chat_template, verbatim (no golden dir under
# tests/golden ships it).
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content ="
          " '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+"
          " message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content ="
          " bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt"
          " %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

CONVERSATION = (
    {'role': 'system', 'content': 'Be brief.'},
    {'role': 'user', 'content': 'Hi!'},
    {'role': 'assistant', 'content': ' Hello there. '},
    {'role': 'user', 'content': 'Bye?'},
    {'role': 'assistant', 'content': 'Bye.'},
)


def _rows(conversations, template, seq_len):
  """Every row of one unshuffled pass, batch size 1: a list of dicts of [seq_len] arrays."""
  ds = make_dataset(conversations, template.tokenizer, seq_len=seq_len, batch_size=1, seed=0,
                    shuffle=False, repeat=False, chat_template=template)
  return [{k: v[0] for k, v in batch.items()} for batch in ds]


def _runs(values, mask, want):
  """The maximal runs of consecutive `values` whose mask equals `want`, as lists."""
  out, run = [], []
  for v, m in zip(values, mask):
    if m == want:
      run.append(v)
    elif run:
      out, run = out + [run], []
  return out + [run] if run else out


def test_hand_computed_chatml_row_trains_on_both_assistant_turns():
  """The row's targets are the hand-written ChatML text after BOS (the template writes none);
  the targets under loss_mask 1 are exactly each assistant content + '<|im_end|>\\n'; system,
  user and the '<|im_start|>assistant\\n' headers are all 0."""
  tok = CharTokenizer()
  (row,) = _rows([Conversation(CONVERSATION)], ChatTemplate(CHATML, tok), seq_len=256)
  text = ('<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n'
          '<|im_start|>assistant\n Hello there. <|im_end|>\n'
          '<|im_start|>user\nBye?<|im_end|>\n<|im_start|>assistant\nBye.<|im_end|>\n')
  n = len(text)  # [bos] + text: n + 1 tokens, n next-token pairs
  assert row['inputs'].tolist() == [1] + ids(text)[:-1] + [0] * (256 - n)
  assert row['targets'].tolist() == ids(text) + [0] * (256 - n)
  targets, mask = row['targets'][:n].tolist(), row['loss_mask'][:n].tolist()
  assert [tok.decode(r) for r in _runs(targets, mask, 1.0)] == [
      ' Hello there. <|im_end|>\n', 'Bye.<|im_end|>\n']
  assert [tok.decode(r) for r in _runs(targets, mask, 0.0)] == [
      '<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n'
      '<|im_start|>assistant\n', '<|im_start|>user\nBye?<|im_end|>\n<|im_start|>assistant\n']
  assert row['loss_mask'][n:].sum() == 0 and row['segment_ids'].tolist() == [1] * n + [0] * (256 - n)


@pytest.mark.parametrize('loss_on', ['assistant', 'last_assistant', 'all'])
def test_loss_on_against_hand_computed_masks_on_shipped_chatml(loss_on):
  """data.loss_on on the two-assistant-turn CONVERSATION with data.chat_template='chatml': the
  mask is written out by hand per character of the ChatML text (the target at i is character
  i), through the whole pipeline."""
  tok = CharTokenizer()
  template = load_template(ml_collections.ConfigDict(dict(chat_template='chatml')), tok)
  head = ('<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n'
          '<|im_start|>assistant\n')
  turn1 = ' Hello there. <|im_end|>\n'
  middle = '<|im_start|>user\nBye?<|im_end|>\n<|im_start|>assistant\n'
  turn2 = 'Bye.<|im_end|>\n'
  text = head + turn1 + middle + turn2
  trained = {'assistant': (0, 1, 0, 1), 'last_assistant': (0, 0, 0, 1), 'all': (1, 1, 1, 1)}
  want = [float(w) for part, w in zip((head, turn1, middle, turn2), trained[loss_on])
          for _ in part]
  tokens, weights = template.tokenize(Conversation(CONVERSATION), loss_on)
  assert tokens.tolist() == [1] + ids(text)
  assert weights.tolist() == [0.0] + want  # the BOS added for ChatML is never a target
  ds = make_dataset([Conversation(CONVERSATION)], tok, seq_len=256, batch_size=1, seed=0,
                    shuffle=False, repeat=False, chat_template=template, loss_on=loss_on)
  (batch,) = list(ds)
  n = len(text)
  assert batch['targets'][0].tolist() == ids(text) + [0] * (256 - n)
  assert batch['loss_mask'][0].tolist() == want + [0.0] * (256 - n)


def test_loss_on_errors_and_dropped_conversations(caplog):
  """A bad data.loss_on is one line with the closest value, from make_dataset and tokenize too;
  with 'last_assistant' a conversation whose last answer starts past seq_len is dropped and
  counted, though its first answer fits ('assistant' keeps it)."""
  tok = CharTokenizer()
  template = ChatTemplate(CHATML, tok)
  for call in (lambda: template.tokenize(Conversation(CONVERSATION), 'assistants'),
               lambda: make_dataset([Conversation(CONVERSATION)], tok, seq_len=8, batch_size=1,
                                    seed=0, chat_template=template, loss_on='assistants')):
    with pytest.raises(ConfigError, match=r"^data.loss_on='assistants' is not one of"
                       r" \['assistant', 'last_assistant', 'all'\]\. Did you mean 'assistant'\?$"):
      call()
  # The second answer starts at character 171 of the rendering (target 171): past seq_len=100.
  assert CHATML_TEXT.index('Bye.<|im_end|>') > 100 > CHATML_TEXT.index(' Hello there.')
  short = Conversation(CONVERSATION[1:3])  # 'Hi!' / ' Hello there. ': fits either way
  for loss_on, count in (('assistant', 0), ('last_assistant', 1)):
    ds = make_dataset([Conversation(CONVERSATION), short], tok, seq_len=100, batch_size=1,
                      seed=0, shuffle=False, repeat=False, chat_template=template,
                      loss_on=loss_on)
    with caplog.at_level('WARNING', logger='llmjax.data.pipeline'):
      trained = [tok.decode(b['targets'][0][b['loss_mask'][0] == 1]) for b in ds]
    assert ds.dropped_examples.count == count
    assert ''.join(trained).count('Bye.<|im_end|>') == 1 - count  # the long one's last answer
    assert ''.join(trained).count(' Hello there. <|im_end|>') == 2 - count
  assert [r.getMessage() for r in caplog.records if 'examples dropped' in r.getMessage()] == [
      '1 examples dropped: their answers did not fit in seq_len=100']


class SpecialCharTokenizer(Tokenizer):
  """One id per character, plus Llama 3's special tokens as single ids that `encode` finds in
  text, as an HF tokenizer does with its added tokens."""
  SPECIALS = {'<|begin_of_text|>': 1, '<|eot_id|>': 2, '<|start_header_id|>': 3,
              '<|end_header_id|>': 4}
  vocab_size, pad_id, bos_id, eos_id = 128, 0, 1, 2

  def encode(self, text):
    parts = re.split('(' + '|'.join(map(re.escape, self.SPECIALS)) + ')', text)
    return [i for p in parts for i in ([self.SPECIALS[p]] if p in self.SPECIALS else ids(p))]

  def decode(self, ids_):
    names = {i: s for s, i in self.SPECIALS.items()}
    return ''.join(names.get(int(i), chr(int(i))) for i in ids_)

  def special_text(self, i):
    return {v: k for k, v in self.SPECIALS.items()}[i]


def test_llama3_template_is_prefix_consistent_with_one_bos():
  """The tokens decode to the renderer's text of the whole conversation (the pieces cut at the
  assistant turns add up to it); the template's own BOS is the only one; each trained run is
  the trimmed content + <|eot_id|>, the headers before it untrained."""
  tok = SpecialCharTokenizer()
  template = ChatTemplate(LLAMA3, tok)
  tokens, weights = template.tokenize(Conversation(CONVERSATION))
  full = template.render(CONVERSATION)
  assert full.startswith('<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n')
  assert tok.decode(tokens) == full
  assert ''.join(text for text, _ in template.segments(CONVERSATION)) == full
  assert tokens[0] == tok.bos_id and (tokens == tok.bos_id).sum() == 1
  assert [tok.decode(r) for r in _runs(tokens.tolist(), weights.tolist(), 1.0)] == [
      'Hello there.<|eot_id|>', 'Bye.<|eot_id|>']
  assert tok.decode(_runs(tokens.tolist(), weights.tolist(), 0.0)[-1]).endswith(
      '<|start_header_id|>assistant<|end_header_id|>\n\n')
  # Through the pipeline: the pipeline adds no second BOS and no EOS after the last turn.
  (row,) = _rows([Conversation(CONVERSATION)], template, seq_len=256)
  n = len(tokens) - 1
  assert row['inputs'][:n].tolist() == tokens[:-1].tolist()
  assert row['targets'][:n].tolist() == tokens[1:].tolist()
  assert row['loss_mask'][:n].tolist() == weights[1:].tolist()


def test_template_from_an_hf_checkpoint_dir_and_bos_written_by_the_template(tmp_path):
  """qwen2_bias_tied ships a chat template without bos_token: load_template takes it from the
  tokenizer and the pipeline adds the one BOS. A template writing {{ bos_token }} (here '<s>',
  an added token of that tokenizer) gets no second one."""
  tok = load_tokenizer('tests/golden/qwen2_bias_tied')
  cfg = ml_collections.ConfigDict(dict(chat_template=''))
  template = load_template(cfg, tok)
  assert template.source == tok.chat_template and template.bos_token == '<s>'
  conversation = Conversation(CONVERSATION[1:3])
  tokens, weights = template.tokenize(conversation)
  assert tokens[0] == tok.bos_id and tokens[1] != tok.bos_id
  assert (tokens == tok.eos_id).sum() == 2  # each turn ends with '</s>' in this template
  assert tokens[-1] == tok.eos_id and weights[-1] == 1  # the assistant's closing token is trained
  path = tmp_path / 'bos.jinja'
  path.write_text('{{ bos_token }}' + tok.chat_template)
  template = load_template(ml_collections.ConfigDict(dict(chat_template=str(path))), tok)
  assert template.origin == f'data.chat_template={path}'
  again, _ = template.tokenize(conversation)
  assert again.tolist() == tokens.tolist()


# --- Shipped templates (data.chat_template='chatml', 'llama3', 'qwen2.5') -----------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# CONVERSATION in ChatML, written by hand.
CHATML_TEXT = ('<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n'
               '<|im_start|>assistant\n Hello there. <|im_end|>\n'
               '<|im_start|>user\nBye?<|im_end|>\n<|im_start|>assistant\nBye.<|im_end|>\n')
# CONVERSATION as Llama 3 Instruct renders it, by hand: BOS once, contents trimmed.
LLAMA3_TEXT = ('<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>'
               '<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>'
               '<|start_header_id|>assistant<|end_header_id|>\n\nHello there.<|eot_id|>'
               '<|start_header_id|>user<|end_header_id|>\n\nBye?<|eot_id|>'
               '<|start_header_id|>assistant<|end_header_id|>\n\nBye.<|eot_id|>')


def _readme_chat_example():
  """The README's chat SFT example: (argv after `python -m llmjax.main`, the chat.jsonl line its
  comment shows), so the test runs the command as the README writes it."""
  text = open(os.path.join(ROOT, 'README.md')).read()
  for block in re.findall(r'```bash\n(.*?)```', text, re.S):
    lines = block.replace('\\\n', ' ').splitlines()
    for line in lines:
      if 'llmjax.main' in line and '--config.data.format=messages' in line:
        argv = shlex.split(line)
        (record,) = [l.split(':', 1)[1].strip() for l in lines if l.startswith('# chat.jsonl:')]
        return argv[argv.index('llmjax.main') + 1:], record
  raise AssertionError('the README has no llmjax.main example with --config.data.format=messages')


def test_readme_chat_example_validates_and_renders_chatml(tmp_path, monkeypatch):
  """The README's command line, parsed as main parses it (in a directory holding its chat.jsonl),
  validates and renders ChatML exactly as written by hand, loss on the assistant turns only."""
  argv, record = _readme_chat_example()
  assert '--config.data.chat_template=chatml' in argv
  monkeypatch.chdir(tmp_path)
  (tmp_path / 'chat.jsonl').write_text(record + '\n')
  argv = [a.replace('=experiments/', f'={ROOT}/experiments/') for a in argv]
  config, workdir, rest = config_lib.parse_cli(argv)
  assert (workdir, rest, config.data.chat_template) == ('DIR', {}, 'chatml')
  config_lib.validate(config)
  template = load_template(config.data, CharTokenizer())
  assert template.origin == 'data.chat_template=chatml'
  assert template.render(CONVERSATION) == CHATML_TEXT
  assert template.render(CONVERSATION[:2], add_generation_prompt=True) == (
      '<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n'
      '<|im_start|>assistant\n')
  (row,) = _rows([Conversation(CONVERSATION)], template, seq_len=256)
  n = len(CHATML_TEXT)
  assert row['targets'][:n].tolist() == ids(CHATML_TEXT)
  assert [template.tokenizer.decode(r) for r in _runs(row['targets'][:n].tolist(),
                                                      row['loss_mask'][:n].tolist(), 1.0)] == [
      ' Hello there. <|im_end|>\n', 'Bye.<|im_end|>\n']
  # The README record itself renders as its one user turn and one assistant turn.
  (conversation,) = iter_conversations(str(tmp_path / 'chat.jsonl'))
  assert template.render(conversation.messages) == (
      '<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>\n')


def test_shipped_llama3_renders_as_llama3_instruct():
  tok = SpecialCharTokenizer()
  template = load_template(ml_collections.ConfigDict(dict(chat_template='llama3')), tok)
  assert template.origin == 'data.chat_template=llama3'
  assert template.render(CONVERSATION) == LLAMA3_TEXT
  assert template.render(CONVERSATION) == ChatTemplate(LLAMA3, tok).render(CONVERSATION)
  assert template.render(CONVERSATION[:2], add_generation_prompt=True) == (
      LLAMA3_TEXT[:LLAMA3_TEXT.index('Hello')])
  tokens, weights = template.tokenize(Conversation(CONVERSATION))
  assert tok.decode(tokens) == LLAMA3_TEXT and (tokens == tok.bos_id).sum() == 1
  assert [tok.decode(r) for r in _runs(tokens.tolist(), weights.tolist(), 1.0)] == [
      'Hello there.<|eot_id|>', 'Bye.<|eot_id|>']


def test_shipped_qwen25_is_chatml_with_its_default_system_message():
  template = load_template(ml_collections.ConfigDict(dict(chat_template='qwen2.5')),
                           CharTokenizer())
  assert template.render(CONVERSATION) == CHATML_TEXT  # the conversation has a system message
  default = ('<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful'
             ' assistant.<|im_end|>\n')
  assert template.render(CONVERSATION[1:3]) == default + (
      '<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n Hello there. <|im_end|>\n')
  tokens, weights = template.tokenize(Conversation(CONVERSATION[1:]))
  assert [template.tokenizer.decode(r) for r in _runs(tokens.tolist(), weights.tolist(), 1.0)] == [
      ' Hello there. <|im_end|>\n', 'Bye.<|im_end|>\n']


def test_a_name_wins_over_a_file_of_that_name_and_paths_still_work(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / 'chatml').write_text(
      '{{ messages[0].content }}{% if add_generation_prompt %}<a>{% endif %}')
  tok = CharTokenizer()
  assert load_template(ml_collections.ConfigDict(dict(chat_template='chatml')), tok).render(
      CONVERSATION) == CHATML_TEXT
  for path in ('./chatml', str(tmp_path / 'chatml')):
    template = load_template(ml_collections.ConfigDict(dict(chat_template=path)), tok)
    assert template.render(CONVERSATION) == 'Be brief.'


@pytest.mark.parametrize('value, hint', [
    ('chatml.jinja', " Did you mean 'chatml'?"),  # the README's old spelling, no such file
    ('lama3', " Did you mean 'llama3'?"),
    ('templates/qwen2.5.jinja', " Did you mean 'qwen2.5'?"),
    ('vicuna', ''),
])
def test_an_unknown_name_that_is_no_file_is_one_line_listing_the_names(tmp_path, value, hint):
  want = (f"data.chat_template='{value}' does not exist: it is neither a shipped template"
          " ('chatml', 'llama3', 'qwen2.5') nor a file; pass one of those names, a .jinja file,"
          f" or '' for the tokenizer's own template.{hint}")
  with pytest.raises(ConfigError) as e:
    load_template(ml_collections.ConfigDict(dict(chat_template=value)), CharTokenizer())
  assert str(e.value) == want
  c = config_lib.base_config()
  c.data.format, c.data.chat_template = 'messages', value
  c.data.path = _write(tmp_path / 'chat.jsonl', [_chat(0)])
  with pytest.raises(ConfigError) as e:
    config_lib.validate(c)
  assert str(e.value) == want


def test_every_shipped_template_is_package_data():
  """A non-editable install carries each file of llmjax/data/templates (pyproject's
  package-data matches it) and TEMPLATES names each of them."""
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    patterns = tomllib.load(f)['tool']['setuptools']['package-data']['llmjax.data']
  shipped = sorted(os.listdir(os.path.join(ROOT, 'llmjax', 'data', 'templates')))
  assert shipped == sorted(chat.TEMPLATES.values())
  for name in shipped:
    assert any(fnmatch.fnmatch(f'templates/{name}', p) for p in patterns), name
  for name in chat.TEMPLATES:
    source, _ = chat.template_source(name)
    ChatTemplate(source, CharTokenizer())  # compiles


# --- Errors ------------------------------------------------------------------------------------

def test_a_missing_or_broken_template_names_data_chat_template(tmp_path):
  cfg = ml_collections.ConfigDict(dict(chat_template=''))
  with pytest.raises(ConfigError, match=r"^data.format='messages' needs a chat template .*set"
                     r" data.chat_template to a shipped template \('chatml', 'llama3',"
                     r" 'qwen2.5'\) or a .jinja file"):
    load_template(cfg, CharTokenizer())  # like a trained sentencepiece tokenizer: none
  cfg.chat_template = str(tmp_path / 'nope.jinja')
  with pytest.raises(ConfigError, match=r"data.chat_template='.*nope.jinja' does not exist"):
    load_template(cfg, CharTokenizer())
  (tmp_path / 'bad.jinja').write_text('{% for m in messages %}{{ m.content }}')
  cfg.chat_template = str(tmp_path / 'bad.jinja')
  with pytest.raises(ConfigError, match=r"data.chat_template=.*bad.jinja is not valid Jinja"):
    load_template(cfg, CharTokenizer())


@pytest.mark.parametrize('template, match', [
    # Drops earlier assistant turns (as Qwen3 drops earlier reasoning): not prefix-stable.
    ("{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}[A]{% else %}"
     "<{{ m.role }}>{{ m.content }}{% endif %}{% endfor %}"
     "{% if add_generation_prompt %}<assistant>{% endif %}",
     r"^f\.jsonl:7: the chat template is not prefix-stable: .* assistant message 2 cannot be"
     r" located; .*\(data.chat_template\)\.$"),
    ("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system role')"
     " }}{% endif %}{{ m.content }}{% endfor %}",
     r"^f\.jsonl:7: the chat template refused it \(no system role\); fix the conversation"),
    ("{% for m in messages %}{% if m.role != 'assistant' %}{{ m.content }}{% endif %}{% endfor %}",
     r"^f\.jsonl:7: the chat template renders nothing for assistant message 2;"),
])
def test_templates_that_cannot_mark_the_assistant_turns_name_the_record(template, match):
  template = ChatTemplate(template, CharTokenizer())
  with pytest.raises(DataError, match=match):
    template.tokenize(Conversation(CONVERSATION, 'f.jsonl:7'))
  with pytest.raises(DataError, match=match.rstrip('$')):  # Grain passes it on (with a note)
    _rows([Conversation(CONVERSATION, 'f.jsonl:7')], template, seq_len=64)


def _write(path, records):
  path.write_text(''.join((r if isinstance(r, str) else json.dumps(r)) + '\n' for r in records))
  return str(path)


def _chat(i):
  return {'messages': [{'role': 'user', 'content': f'What colour is box {i}?'},
                       {'role': 'assistant', 'content': f'Box {i} is {COLOURS[i % 5]}.'}]}


COLOURS = ['red', 'green', 'blue', 'amber', 'violet']
FIX = r'each message needs a "role" and a string "content"\.$'


@pytest.mark.parametrize('line, match', [
    ({'mesages': []}, r"chat\.jsonl:3: no 'messages' field; set data.messages_key .* Did you"
     r" mean 'mesages'\?$"),
    ({'messages': 'hi'}, r"chat\.jsonl:3: field 'messages' is a str, not a list of"),
    ({'messages': ['hi']}, r"chat\.jsonl:3: message 0 is a str, not an object; " + FIX),
    ({'messages': [{'content': 'hi'}]}, r"chat\.jsonl:3: message 0 has no 'role'; " + FIX),
    ({'messages': [{'role': 'user', 'content': 'hi'}, {'role': 'assistant'}]},
     r"chat\.jsonl:3: message 1 has no 'content'; " + FIX),
    ({'messages': [{'role': 'assistent', 'content': 'hi'}]}, r"chat\.jsonl:3: message 0 has"
     r" role 'assistent'; use one of \['system', 'user', 'assistant'\]\. Did you mean"
     r" 'assistant'\?$"),
    ({'messages': [{'role': 'tool', 'content': 'hi'}]}, r"message 0 has role 'tool'; use one of"),
    ({'messages': [{'role': 'assistant', 'content': [{'type': 'text'}]}]},
     r"chat\.jsonl:3: message 0's content is a list, not a string; " + FIX),
    ({'messages': [{'role': 'user', 'content': 'hi'}]}, r"chat\.jsonl:3: the conversation has"
     r" no assistant message, so nothing to train on; add one or delete that line\.$"),
    ({'messages': []}, r"chat\.jsonl:3: the conversation has no assistant message"),
    ('{"messages": [', r"chat\.jsonl:3: invalid JSON"),
])
def test_bad_records_name_file_line_and_fix_before_writing_anything(tmp_path, line, match):
  path = _write(tmp_path / 'chat.jsonl', [_chat(0), _chat(1), line] + [_chat(i) for i in range(30)])
  with pytest.raises(DataError, match=match) as e:
    local_files_source(path, 'text', str(tmp_path / 'tfds'), data_format='messages')
  assert path in str(e.value) and '\n' not in str(e.value)
  assert not list(tmp_path.rglob('*.array_record*'))


def test_txt_files_are_refused(tmp_path):
  (tmp_path / 'a.txt').write_text('some text\n')
  with pytest.raises(DataError, match=r"a\.txt: data.format='messages' reads .jsonl files"):
    local_files_source(str(tmp_path / 'a.txt'), 'text', str(tmp_path / 'tfds'),
                       data_format='messages')
  with pytest.raises(DataError, match=r"a\.txt: data.format='messages'"):
    list(iter_conversations(str(tmp_path / 'a.txt')))


def test_config_keys_are_checked_before_anything_runs(tmp_path):
  c = config_lib.base_config()
  c.data.format = 'messages'
  with pytest.raises(ConfigError, match=r"data.format='messages' needs data.path"):
    config_lib.validate(c)
  c.data.path = _write(tmp_path / 'chat.jsonl', [_chat(0)])
  with pytest.raises(ConfigError, match=r"^data.format='messages' needs a chat template"):
    config_lib.validate(c)  # a tokenizer trained in the run has none: said before training it
  c.data.chat_template = str(tmp_path / 'missing.jinja')
  with pytest.raises(ConfigError, match=r"data.chat_template='.*missing.jinja' does not exist"):
    config_lib.validate(c)
  (tmp_path / 't.jinja').write_text(CHATML)
  c.data.chat_template = str(tmp_path / 't.jinja')
  config_lib.validate(c)
  c.data.chat_template, c.data.tokenizer_path = '', 'tests/golden/qwen2_bias_tied'  # has one
  config_lib.validate(c)
  c.data.chat_template, c.data.tokenizer_path = str(tmp_path / 't.jinja'), ''
  c.data.format = 'text'
  with pytest.raises(ConfigError, match=r"data.chat_template=.* is only read for"
                     r" data.format='messages' \(this run's is 'text'\)"):
    config_lib.validate(c)


# --- Files, build_data and a run ---------------------------------------------------------------

def test_jsonl_round_trip_next_to_text_and_prompt_completion_copies(tmp_path):
  records = [dict(_chat(i), text=f'doc {i}', prompt='p', completion='c', chat=_chat(i)['messages'])
             for i in range(40)]
  path = _write(tmp_path / 'chat.jsonl', records)
  srcs = local_files_source(path, 'text', str(tmp_path / 'tfds'), data_format='messages',
                            messages_key='chat')
  got = [srcs[s][i] for s in ('train', 'validation') for i in range(len(srcs[s]))]
  assert all(isinstance(x, Conversation) for x in got) and len(srcs['validation']) == 2
  key = lambda c: (c.where, json.dumps(c.messages))
  assert sorted(got, key=key) == sorted(
      (Conversation(tuple(_chat(i)['messages']), f'{path}:{i + 1}') for i in range(40)), key=key)
  local_files_source(path, 'text', str(tmp_path / 'tfds'))
  local_files_source(path, 'text', str(tmp_path / 'tfds'), data_format='prompt_completion')
  local_files_source(path, 'text', str(tmp_path / 'tfds'), data_format='messages')  # other key
  assert len(list((tmp_path / 'tfds').iterdir())) == 4


# A ChatML-like template that closes turns with the tokenizer's own EOS, as many do.
EOS_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
                "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope='module')
def chat_files(tmp_path_factory):
  d = tmp_path_factory.mktemp('chat')
  records = [{'messages': [{'role': 'system', 'content': 'You answer about painted boxes.'}]
              + _chat(i)['messages'] + [{'role': 'user', 'content': 'Sure?'},
                                         {'role': 'assistant', 'content': 'Quite sure.'}]}
             for i in range(60)]
  (d / 'chat.jinja').write_text(EOS_TEMPLATE)
  return _write(d / 'chat.jsonl', records), str(d / 'chat.jinja')


def test_build_data_with_a_trained_tokenizer_and_a_template_file(chat_files, tmp_path):
  """A trained sentencepiece tokenizer (no template of its own) with data.chat_template: the
  template's '</s>' becomes the eos id (sentencepiece alone would spell it out), '<s>' the one
  bos; every segment's trained targets are its two answers, each followed by eos."""
  path, template = chat_files
  cfg = ml_collections.ConfigDict(dict(
      path=path, tfds_name='', format='messages', text_key='text', messages_key='messages',
      chat_template=template, seq_len=128, tokenizer_path='', vocab_size=400,
      tokenizer_type='bpe', eval_batches=2))
  tok, train, eval_batches = build_data(cfg, str(tmp_path), seed=0, batch_size=4)
  assert len(tok.encode(' painted')) == 1  # trained on the contents, system messages included
  # A model's larger vocab_size may sample ids past the pieces: dropped, as HF tokenizers do.
  assert tok.decode([tok.vocab_size + 5] + tok.encode('Box')) == 'Box'
  seen = 0
  for batch in [next(iter(train))] + eval_batches():
    for r in range(batch['inputs'].shape[0]):
      seg, mask = batch['segment_ids'][r], batch['loss_mask'][r]
      assert (mask[seg == 0] == 0).all()
      for s in set(seg.tolist()) - {0}:
        idx = np.flatnonzero(seg == s)  # seq_len 128 holds a whole conversation: no cut pieces
        assert batch['inputs'][r][idx[0]] == tok.bos_id
        assert (batch['inputs'][r][idx][1:] != tok.bos_id).all()
        runs = _runs(batch['targets'][r][idx].tolist(), mask[idx].tolist(), 1.0)
        assert [run[-1] for run in runs] == [tok.eos_id] * 2
        answer = tok.decode(runs[0][:-1])
        assert re.fullmatch(r'Box \d+ is (red|green|blue|amber|violet)\.', answer)
        assert tok.decode(runs[1][:-1]) == 'Quite sure.'
        seen += 1
  assert seen
  cfg.chat_template = ''
  with pytest.raises(ConfigError, match=r"needs a chat template .* data.chat_template"):
    build_data(cfg, str(tmp_path), seed=0, batch_size=4)


def test_next_token_loss_ignores_system_and_user_targets(chat_files, tmp_path):
  """The train step's loss on a batch of the real pipeline (trained tokenizer, the shipped
  'chatml' template): loss_mask is 0 on every system/user/header target, and rewriting those
  targets leaves the loss bit for bit; rewriting one assistant target changes it."""
  import jax
  import jax.numpy as jnp

  from llmjax.models.config import get_preset
  from llmjax.models.transformer import Transformer

  path, _ = chat_files
  cfg = ml_collections.ConfigDict(dict(
      path=path, tfds_name='', format='messages', text_key='text', messages_key='messages',
      chat_template='chatml', seq_len=128, tokenizer_path='', vocab_size=400,
      tokenizer_type='bpe', eval_batches=2))
  tok, train, _ = build_data(cfg, str(tmp_path), seed=0, batch_size=2)
  batch = next(iter(train))
  mask = batch['loss_mask']
  # Each trained run decodes to an answer and its '<|im_end|>\n'; the rest holds the system
  # message and the questions, untrained.
  for r in range(mask.shape[0]):
    for run in _runs(batch['targets'][r].tolist(), mask[r].tolist(), 1.0):
      assert re.fullmatch(r'(Box \d+ is (red|green|blue|amber|violet)\.|Quite sure\.)'
                          r'<\|im_end\|>\n', tok.decode(run)), tok.decode(run)
    untrained = tok.decode(batch['targets'][r][(mask[r] == 0) & (batch['segment_ids'][r] > 0)])
    assert 'painted boxes' in untrained and 'Sure?' in untrained
  model_cfg = get_preset('tiny', num_layers=1, embed_dim=32, num_heads=2, num_kv_heads=2,
                         head_dim=16, mlp_dim=64, vocab_size=tok.vocab_size)
  model = Transformer(model_cfg)
  params = jax.jit(model.init)(jax.random.key(0), jnp.asarray(batch['inputs']))  # one compile
  from sft_checks import assert_loss_ignores_unweighted_targets
  assert_loss_ignores_unweighted_targets(params, model.apply, batch, tok.vocab_size)


@pytest.mark.slow
def test_train_and_evaluate_learns_the_answers_on_messages_jsonl(chat_files, tmp_path):
  """The whole job (the fastest loop-test settings, 40 steps, seed fixed by the config) on chat
  data from the config: the answers ('Box i is <one of 5 colours>.', 'Quite sure.') are
  learnt fast, so the loss on them falls to a third of the first step's."""
  from test_loop import losses, tiny_config
  from llmjax.train.loop import train_and_evaluate

  c = tiny_config(steps=40, eval_every=40)
  c.data.path, c.data.chat_template = chat_files
  # 64, not the loop tests' 32: the system message and question alone fill 32 tokens, and a
  # conversation whose answers start past seq_len is dropped, not trained without its prompt.
  c.data.format, c.data.vocab_size, c.data.seq_len = 'messages', 400, 64
  out = train_and_evaluate(c, str(tmp_path))
  assert out['step'] == 40
  got = losses(tmp_path)
  assert sorted(got) == list(range(1, 41))
  assert got[1] > 5.0  # it starts from nothing
  assert max(got[38], got[39], got[40]) < got[1] / 3, got
  # The run keeps its template; `generate --chat` prompts with it: the user turn then the
  # assistant header, exactly as the template renders a conversation awaiting a reply.
  from llmjax import generate
  from llmjax.data.chat import ChatTemplate
  from llmjax.data.pipeline import load_run_tokenizer
  kept = (tmp_path / 'chat_template.jinja').read_text()
  assert kept == open(chat_files[1]).read()
  template = ChatTemplate(kept, load_run_tokenizer(str(tmp_path)))
  messages = [{'role': 'user', 'content': 'What colour is box 3?'}]
  want = template.prompt_ids(messages)
  assert template.tokenizer.decode(want).endswith(
      template.render(messages, add_generation_prompt=True)[-8:])
  import contextlib
  import io
  import json
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    assert generate.main([f'--workdir={tmp_path}', '--chat', '--prompt=What colour is box 3?',
                          '--max_new_tokens=3', '--temperature=0', '--json']) == 0
  assert json.loads(buf.getvalue().strip().splitlines()[-1])['prompt_ids'] == want


def test_generate_chat_flag_errors_are_one_line(capsys):
  from llmjax import generate
  assert generate.main(['--workdir=w', '--chat', '--prompt_ids=1,2']) == 2
  assert generate.main(['--workdir=w', '--system=Be brief.', '--prompt=Hi']) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ['error: --chat renders --prompt texts; it cannot take --prompt_ids.',
                 'error: --system needs --chat.']


# --- A template that marks no assistant turn (add_generation_prompt adds nothing) --------------

NO_MARKER = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
NO_MARKER_MESSAGE = (r" has no assistant marker: add_generation_prompt=True adds nothing after a"
                     r" user message, so nothing marks where a reply starts; use a template with"
                     r" a generation prompt \(e\.g\. data\.chat_template=chatml\)\.$")


@pytest.mark.parametrize('name', list(chat.TEMPLATES))
def test_shipped_templates_have_an_assistant_marker_and_an_end_of_turn(name):
  source, origin = chat.template_source(name)
  chat.check_assistant_marker(source, origin)  # as config validation calls it: no tokenizer
  template = load_template(ml_collections.ConfigDict(dict(chat_template=name)), CharTokenizer())
  assert template.end_of_turn() == {'chatml': '<|im_end|>', 'llama3': '<|eot_id|>',
                                    'qwen2.5': '<|im_end|>'}[name]


def test_a_template_without_assistant_marker_is_refused_by_config_and_load_template(tmp_path):
  path = tmp_path / 'plain.jinja'
  path.write_text(NO_MARKER)
  want = re.escape(f'data.chat_template={path}') + NO_MARKER_MESSAGE
  c = config_lib.base_config()
  c.data.format, c.data.chat_template = 'messages', str(path)
  c.data.path = _write(tmp_path / 'chat.jsonl', [_chat(0)])
  with pytest.raises(ConfigError, match='^' + want):  # before a tokenizer is trained
    config_lib.validate(c)
  with pytest.raises(ConfigError, match='^' + want):  # build_data's call, with the tokenizer
    load_template(c.data, CharTokenizer())
  # The tokenizer's own template (an HF checkpoint's), named as such.
  tok = CharTokenizer()
  tok.chat_template = NO_MARKER
  with pytest.raises(ConfigError, match="^the tokenizer's chat_template" + NO_MARKER_MESSAGE):
    load_template(ml_collections.ConfigDict(dict(chat_template='')), tok)
  # A marker that is only the EOS text counts where the tokenizer has one (config validation,
  # without a tokenizer, lets it pass); without an EOS it renders nothing.
  only_eos = NO_MARKER + '{% if add_generation_prompt %}{{ eos_token }}{% endif %}'
  chat.check_assistant_marker(only_eos, 'x')
  ChatTemplate(only_eos, CharTokenizer()).check_assistant_marker()
  with pytest.raises(ConfigError, match='^y' + NO_MARKER_MESSAGE):
    ChatTemplate(only_eos, CharTokenizer(eos_id=-1), 'y').check_assistant_marker()
  # Only for data.format='messages': a text run ignores the key (and says so, as before).
  c.data.format = 'text'
  with pytest.raises(ConfigError, match=r"is only read for data.format='messages'"):
    config_lib.validate(c)


def test_the_marker_check_leaves_refusals_to_the_data():
  # A template that refuses a conversation without a system message cannot be checked on one
  # user message: the records are rendered later and a refusal names the record.
  source = ("{% if messages[0].role != 'system' %}{{ raise_exception('system first') }}{% endif %}"
            "{% for m in messages %}{{ m.content }}{% endfor %}")
  chat.check_assistant_marker(source, 'x')
  assert ChatTemplate(source, CharTokenizer()).end_of_turn() == ''
  chat.check_assistant_marker(CHATML, 'x')
  assert ChatTemplate(CHATML, CharTokenizer()).end_of_turn() == '<|im_end|>'
