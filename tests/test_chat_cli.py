"""`python -m llmjax.chat`: the reply to one turn is what `generate --chat` prints, the history
goes into the next prompt, /reset and /system, stop strings, streaming by characters, the
context window, and a template without an assistant marker refused before any model loads."""

import dataclasses
import io
import json
import os
import shutil
import sys

import jax
import pytest

import llmjax.models
from llmjax import chat, generate
from llmjax.data import chat as chat_data
from llmjax.eval import __main__ as eval_cli
from llmjax.infer import sampler

HERE = os.path.dirname(__file__)
QWEN = os.path.join(HERE, 'golden', 'qwen2_bias_tied')  # a tiny byte-level BPE with a template
NO_MARKER = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def _tokenizer_dir(workdir):
  from llmjax.data.pipeline import HF_TOKENIZER_DIR
  from llmjax.interop.tokenizer import TOKENIZER_READ_FILES
  os.makedirs(os.path.join(workdir, HF_TOKENIZER_DIR))
  for name in TOKENIZER_READ_FILES:
    if os.path.exists(os.path.join(QWEN, name)):
      shutil.copy(os.path.join(QWEN, name), os.path.join(workdir, HF_TOKENIZER_DIR, name))


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A run's workdir as SFT with data.chat_template='chatml' leaves it: params at step 0, the
  tokenizer, chat_template.jinja. A large init makes the greedy replies vary with the prompt
  (the golden weights' greedy reply is one token that decodes to '')."""
  from llmjax.interop import load_hf
  from llmjax.train import checkpoint
  d = str(tmp_path_factory.mktemp('run'))
  cfg, _, _ = load_hf(QWEN)
  params = llmjax.models.init_params(dataclasses.replace(cfg, init_std=0.3), jax.random.key(0))
  checkpoint.write_params_workdir(d, cfg, params)
  _tokenizer_dir(d)
  with open(os.path.join(d, chat_data.RUN_TEMPLATE), 'w') as f:
    f.write(chat_data.template_source('chatml')[0])
  return d


@pytest.fixture
def spy(monkeypatch):
  """The prompt ids of every reply, in order."""
  prompts, real = [], sampler.stream

  def stream(cfg, params, prompt_ids, *args, **kwargs):
    prompts.append(list(prompt_ids))
    return real(cfg, params, prompt_ids, *args, **kwargs)
  monkeypatch.setattr(sampler, 'stream', stream)
  return prompts


def _chat(monkeypatch, capsys, argv, lines):
  monkeypatch.setattr(sys, 'stdin', io.StringIO(''.join(line + '\n' for line in lines)))
  rc = chat.main(argv)
  out, err = capsys.readouterr()
  return rc, out, err


def _template(workdir):
  flags = {'workdir': workdir, 'hf': ''}
  return generate.chat_template(flags, generate.load_tokenizer(flags))


def _user(text):
  return {'role': 'user', 'content': text}


def test_one_turn_prints_what_generate_chat_prints(workdir, monkeypatch, capsys, spy):
  flags = [f'--workdir={workdir}', '--max_new_tokens=12', '--system=Be brief.']
  assert generate.main(flags + ['--chat', '--prompt=Hi there', '--temperature=0']) == 0
  want = capsys.readouterr().out
  assert generate.main(flags + ['--chat', '--prompt=Hi there', '--temperature=0', '--json']) == 0
  record = json.loads(capsys.readouterr().out)
  assert len(record['text']) >= 3  # a reply worth comparing
  rc, out, err = _chat(monkeypatch, capsys, flags + ['--temperature=0'], ['Hi there'])
  assert rc == 0, err
  assert out == want + '\n'  # the reply's line, then the newline of the EOF
  assert spy == [record['prompt_ids']]
  # Sampled with the same seed and temperature (the CLIs' default temperatures differ): stream
  # and generate draw the same tokens.
  sampled = ['--seed=3', '--temperature=0.7']
  assert generate.main(flags + ['--chat', '--prompt=Hi there', *sampled]) == 0
  want = capsys.readouterr().out
  assert _chat(monkeypatch, capsys, flags + sampled, ['Hi there'])[1] == want + '\n'


def test_history_reset_and_system(workdir, monkeypatch, capsys, spy):
  template = _template(workdir)
  replies, send = [], chat.Chat.send
  monkeypatch.setattr(chat.Chat, 'send', lambda self, text: replies.append(send(self, text))
                      or replies[-1])
  rc, out, err = _chat(monkeypatch, capsys, [f'--workdir={workdir}', '--max_new_tokens=10'], [
      'Hi there', '', 'What is up?', '/reset', 'Hi there', '/system talk like a pirate',
      'Hi there', '/help', '/frobnicate'])
  assert rc == 0, err
  assert len(spy) == len(replies) == 4  # the empty line asked for nothing
  assert out == ''.join(r + '\n' for r in replies) + '\n'  # as streamed
  r1, _, r3, _ = replies
  # Turn 2's prompt is the whole conversation: turn 1 and its reply, then the new message.
  assert spy[0] == template.prompt_ids([_user('Hi there')])
  assert spy[1] == template.prompt_ids([_user('Hi there'), {'role': 'assistant', 'content': r1},
                                        _user('What is up?')])
  assert spy[1][:len(spy[0])] == spy[0]
  # /reset: the first conversation again, the same reply (sampled: reply n uses seed + n).
  assert spy[2] == spy[0] and r3 == r1
  # /system: a new conversation after the system message.
  assert spy[3] == template.prompt_ids([{'role': 'system', 'content': 'talk like a pirate'},
                                        _user('Hi there')])
  assert 'talk like a pirate' in template.tokenizer.decode(spy[3])  # lowercase: in its vocab
  assert '/reset' in err and '/system TEXT' in err  # /help
  assert err.strip().splitlines()[-1] == ('[unknown command /frobnicate: /help lists the'
                                          ' commands]')


def test_stop_strings_end_the_reply_unprinted(workdir, monkeypatch, capsys):
  argv = [f'--workdir={workdir}', '--max_new_tokens=12', '--temperature=0']
  reply = _chat(monkeypatch, capsys, argv, ['Hi there'])[1][:-2]
  stop = reply[2:4]
  rc, out, _ = _chat(monkeypatch, capsys, argv + [f'--stop={stop}'], ['Hi there'])
  assert rc == 0 and out == sampler.cut_at_stop(reply, [stop]) + '\n\n'


def test_eof_and_empty_input_exit_0(workdir, monkeypatch, capsys, spy):
  argv = [f'--workdir={workdir}', '--max_new_tokens=8']
  assert _chat(monkeypatch, capsys, argv, []) == (0, '\n', '')
  assert _chat(monkeypatch, capsys, argv, ['', '  '])[:2] == (0, '\n')
  assert spy == []
  # The default 256 new tokens leave no room in this model's 128 positions: said at once.
  assert _chat(monkeypatch, capsys, argv[:1], ['hi']) == (
      2, '', "error: --max_new_tokens=256 leaves no room for a prompt in the model's context of"
      " 128 tokens; lower it.\n")


def test_help_and_flag_errors(capsys):
  assert chat.main(['--help']) == 0
  out = capsys.readouterr().out
  assert out.startswith('usage: python -m llmjax.chat')
  for name in ('workdir', 'hf', 'system', 'max_new_tokens', 'temperature', 'top_k', 'top_p',
               'seed', 'stop'):
    assert f'  --{name}' in out
  assert chat.main(['--system=x']) == 2
  assert chat.main(['--workdir=a', '--hf=b']) == 2
  err = capsys.readouterr().err.splitlines()
  assert err == ['error: pass exactly one of --workdir=DIR (an llmjax run) or --hf=HF_DIR.'] * 2


# --- A template that marks no assistant turn: one line, before any model loads.

@pytest.fixture
def no_marker_run(tmp_path, monkeypatch):
  """A workdir whose chat_template.jinja has no generation prompt (and no params at all)."""
  d = str(tmp_path / 'run')
  _tokenizer_dir(d)
  with open(os.path.join(d, chat_data.RUN_TEMPLATE), 'w') as f:
    f.write(NO_MARKER)

  def load(flags, tokenizer=None):
    raise AssertionError('the model must not load')
  monkeypatch.setattr(generate, 'load', load)
  return d


def test_no_assistant_marker_is_one_line_before_the_model_loads(no_marker_run, monkeypatch,
                                                                 capsys, tmp_path):
  path = os.path.join(no_marker_run, chat_data.RUN_TEMPLATE)
  want = (f"error: {path} has no assistant marker: add_generation_prompt=True adds nothing after"
          " a user message, so nothing marks where a reply starts; use a template with a"
          " generation prompt (e.g. data.chat_template=chatml).")
  assert _chat(monkeypatch, capsys, [f'--workdir={no_marker_run}'], ['hi']) == (2, '', want + '\n')
  assert generate.main([f'--workdir={no_marker_run}', '--chat', '--prompt=hi']) == 2
  assert capsys.readouterr().err == want + '\n'
  data = tmp_path / 'gen.jsonl'
  data.write_text(json.dumps({'prompt': 'hi', 'answer': 'x'}) + '\n')
  assert eval_cli.main([f'--workdir={no_marker_run}', '--task=generate', f'--data={data}',
                        '--chat']) == 2
  assert capsys.readouterr().err == want + '\n'


# --- The pieces: printing a stream, the context window.

class ByteTokenizer:
  """One id per UTF-8 byte; decode replaces an incomplete character with U+FFFD, as byte-level
  tokenizers do."""

  def decode(self, ids):
    return bytes(ids).decode('utf-8', errors='replace')


class Recorder(io.StringIO):
  def __init__(self):
    super().__init__()
    self.writes = []

  def write(self, s):
    self.writes.append(s)
    return super().write(s)


@pytest.mark.parametrize('text, stops, printed', [
    ('né 🙂 ok', [], 'né 🙂 ok'),
    ('Hello.\nUser: more', ['\nUser:'], 'Hello.'),  # '\nUs' is held back until it is sure
    ('a\nUb', ['\nUser:'], 'a\nUb'),  # a stop prefix that does not complete is printed in the end
    ('café<|im_end|>\nrest', ['<|im_end|>', 'zzz'], 'café'),
])
def test_printer_writes_whole_characters_and_never_a_stop_string(text, stops, printed):
  out = Recorder()
  printer = chat.Printer(ByteTokenizer(), stops, out)
  for b in text.encode():
    if not printer.add(b):
      break
  assert printer.finish() == printed
  assert out.getvalue() == printed + '\n'
  assert not any('\ufffd' in w for w in out.writes)
  for s in stops:  # not even the start of a completed stop string went out
    assert not any(s in ''.join(out.writes[:i + 1]) for i in range(len(out.writes)))


class FakeTemplate:
  """prompt_ids: one id per character of the contents, and one per message."""

  def prompt_ids(self, messages):
    return [0] * sum(len(m['content']) + 1 for m in messages)

  def end_of_turn(self):
    return ''


def test_the_oldest_turns_are_dropped_to_fit_the_context(capsys):
  cfg = llmjax.models.get_preset('tiny', max_seq_len=64)
  flags = dict(system='sys', max_new_tokens=20, temperature=0, top_k=0, top_p=1.0, seed=0,
               stop=[], workdir='w', hf='')
  c = chat.Chat(cfg, None, ByteTokenizer(), FakeTemplate(), flags)
  turns = [_user('u' * 9), {'role': 'assistant', 'content': 'a' * 9}] * 2 + [_user('x' * 9)]
  c.history = list(turns)  # 4 + 5 * 10 = 54 ids: 44 fit with 20 new tokens
  assert len(c.prompt_ids()) == 4 + 3 * 10 and c.history == turns[2:]
  assert capsys.readouterr().err == ("[dropped the oldest 1 turn to fit the model's context of"
                                     " 64 tokens]\n")
  c.history = turns[:4] + [_user('x' * 41)]  # 4 + 42 > 44: even alone it does not fit
  assert c.prompt_ids() is None and c.history == turns[:4]  # the conversation stays
  assert 'the last message (46 tokens with the system message) does not fit' in (
      capsys.readouterr().err)
