"""Chat with a trained workdir or a Hugging Face checkpoint: a multi-turn conversation in the
terminal, the reply printed token by token as it is sampled.

    python -m llmjax.chat --workdir=/tmp/sft
    python -m llmjax.chat --hf=HF_DIR --system="You are terse." --temperature=0

Each line you type is a user message; the whole conversation so far (after the system message)
is rendered with the chat template, as `generate --chat` renders one prompt (the run's
data.chat_template, else the tokenizer's), and the reply is streamed until an EOS id, the
template's end-of-turn text (e.g. <|im_end|>, which a tokenizer trained by the run spells as
plain text), a --stop string or --max_new_tokens. The reply joins the conversation. When the
conversation and --max_new_tokens no longer fit in the model's context, the oldest turns are
dropped (said on stderr). With the same flags the reply to a conversation is always the same:
the n-th reply since the last reset is sampled with seed --seed + n.

Commands: /reset (forget the conversation, keep the system message), /system TEXT (a new
system message, conversation forgotten; bare /system removes it), /help; Ctrl-D or Ctrl-C at
the prompt quits, Ctrl-C during a reply stops it (the part printed is kept). Without a
terminal on stdin (a pipe, a file) each line is read the same way and no prompt is printed.
"""

import sys

from llmjax import cli, generate
from llmjax.errors import UserError

FLAGS = (
    cli.Flag('workdir', '', 'an llmjax run to chat with (local or gs://): its latest checkpoint,'
             ' LoRA adapters merged, its tokenizer and chat template', metavar='DIR'),
    cli.Flag('hf', '', 'or a Hugging Face checkpoint dir (config.json + safetensors + tokenizer'
             ' with a chat template)', metavar='HF_DIR'),
    cli.Flag('system', '', 'the system message at the start of the conversation', metavar='TEXT'),
    *generate.sampling_flags(
        max_new_tokens=256, temperature=0.7,
        seed='random seed: reply n of a conversation is sampled with seed + n',
        stop='end a reply where this string first appears (not printed)'),
)

HELP = """commands:
  /reset        forget the conversation (the system message stays)
  /system TEXT  a new system message; the conversation is forgotten (bare /system: none)
  /help         this list
  Ctrl-D        quit (Ctrl-C stops a reply; at the prompt it quits too)"""


def parse_flags(argv: list[str]) -> dict:
  """argv -> {flag: value}; a missing or contradictory choice is a one-line UserError."""
  flags = cli.parse(argv, FLAGS, prog='llmjax.chat', doc=__doc__)
  if bool(flags['workdir']) == bool(flags['hf']):
    raise UserError("pass exactly one of --workdir=DIR (an llmjax run) or --hf=HF_DIR.")
  if flags['max_new_tokens'] < 1:
    raise UserError(f"--max_new_tokens={flags['max_new_tokens']}: must be at least 1.")
  generate.sampling_params(flags)  # out-of-range values fail here, before the model loads
  return flags


def _held_back(text: str, stops: list[str]) -> int:
  """How many characters at the end of `text` may begin a stop string (not printed yet)."""
  held = 0
  for s in stops:
    for n in range(min(len(s) - 1, len(text)), held, -1):
      if text.endswith(s[:n]):
        held = n
        break
  return held


class Printer:
  """Prints a reply's text as its ids arrive: each step decodes all ids so far and writes only
  what is new, so a character split over several tokens (byte-level pieces of 'é', an emoji)
  is printed once whole; stop strings end the reply and are never printed, nor is a text that
  may still become one."""

  def __init__(self, tokenizer, stops: list[str], out):
    self.tokenizer, self.stops, self.out = tokenizer, [s for s in stops if s], out
    self.ids, self.text, self.printed = [], '', 0
    self.stopped = False

  def add(self, token: int) -> bool:
    """Takes one sampled id; False when a stop string has appeared (the reply ends)."""
    self.ids.append(token)
    text = self.tokenizer.decode(self.ids)
    cut = min((i for i in (text.find(s) for s in self.stops) if i != -1), default=-1)
    if cut != -1:
      self.text, self.stopped = text[:cut], True
      self._write(len(self.text))
      return False
    self.text = text
    # A trailing U+FFFD is a character whose bytes are not all sampled yet.
    end = len(text.rstrip('\ufffd'))
    self._write(end - _held_back(text[:end], self.stops))
    return True

  def finish(self) -> str:
    """Prints what was held back; returns the reply's text."""
    self._write(len(self.text))
    print(file=self.out, flush=True)
    return self.text

  def _write(self, end: int):
    if end > self.printed:
      # Decoding more ids only appends for the tokenizers here; where a decoder rewrites
      # earlier text (space clean-up), the reply kept is the decoded one, printed as it came.
      self.out.write(self.text[self.printed:end])
      self.out.flush()
      self.printed = end


class Chat:
  """A conversation with one model: `send(text)` streams the reply to `out`, returns it."""

  def __init__(self, cfg, params, tokenizer, template, flags, out=None, err=None):
    self.cfg, self.params, self.tokenizer, self.template = cfg, params, tokenizer, template
    self.flags, self.out, self.err = flags, out or sys.stdout, err or sys.stderr
    self.sampling = generate.sampling_params(flags)
    self.eos = generate.stop_ids(tokenizer)
    end = template.end_of_turn()
    self.stops = list(flags['stop']) + ([end] if end else [])
    self.system = flags['system']
    self.history = []  # user, assistant, user, ... messages since the last reset
    self.replies = 0  # replies since the last reset: reply n is sampled with seed + n

  def reset(self, system: str | None = None):
    if system is not None:
      self.system = system
    self.history, self.replies = [], 0

  def _messages(self, history=None):
    history = self.history if history is None else history
    return ([{'role': 'system', 'content': self.system}] if self.system else []) + history

  def prompt_ids(self) -> list[int] | None:
    """The prompt for the next reply, the oldest turns dropped until it fits with
    max_new_tokens in the model's context; None (said on stderr, the last message dropped)
    when even the system message and the last message alone do not fit."""
    room = self.cfg.max_seq_len - self.sampling.max_new_tokens
    alone = len(self.template.prompt_ids(self._messages(self.history[-1:])))
    if alone > room:
      self.history.pop()  # the conversation before it stays
      print(f"[the last message ({alone} tokens with the system message) does not fit the"
            f" model's context of {self.cfg.max_seq_len} tokens with --max_new_tokens="
            f"{self.sampling.max_new_tokens}; it was dropped: write a shorter one]",
            file=self.err, flush=True)
      return None
    ids, dropped = self.template.prompt_ids(self._messages()), 0
    while len(ids) > room:  # ends by the last message alone at the latest, which fits
      self.history = self.history[2:]  # the oldest user message and its reply
      ids, dropped = self.template.prompt_ids(self._messages()), dropped + 1
    if dropped:
      print(f"[dropped the oldest {dropped} turn{'s' if dropped > 1 else ''} to fit the model's"
            f" context of {self.cfg.max_seq_len} tokens]", file=self.err, flush=True)
    return ids

  def send(self, text: str) -> str | None:
    """Adds a user message and streams the reply to `out`; returns the reply (None when the
    message was dropped)."""
    from llmjax.infer import sampler
    self.history.append({'role': 'user', 'content': text})
    try:
      ids = self.prompt_ids()
    except UserError:  # the template refuses the conversation: forget the message
      self.history.pop()
      raise
    if ids is None:
      return None
    printer = Printer(self.tokenizer, self.stops, self.out)
    tokens = sampler.stream(self.cfg, self.params, ids, self.sampling, eos_id=self.eos,
                            seed=self.flags['seed'] + self.replies)
    try:
      for token in tokens:
        if not printer.add(token):
          break
    except KeyboardInterrupt:  # stops this reply only
      pass
    finally:
      tokens.close()
    reply = printer.finish()
    self.history.append({'role': 'assistant', 'content': reply})
    self.replies += 1
    return reply

  def command(self, line: str) -> None:
    """Runs a /command line."""
    name, _, arg = line.partition(' ')
    if name == '/reset':
      self.reset()
      print('[conversation reset]', file=self.err, flush=True)
    elif name == '/system':
      self.reset(arg.strip())
      print(f"[system message {'set' if self.system else 'removed'}; conversation reset]",
            file=self.err, flush=True)
    elif name == '/help':
      print(HELP, file=self.err, flush=True)
    else:
      print(f"[unknown command {name}: /help lists the commands]", file=self.err, flush=True)


def repl(chat: Chat, stdin=None) -> int:
  """Reads user lines until EOF (or Ctrl-C at the prompt) and answers each; returns 0."""
  stdin = stdin or sys.stdin
  prompt = '> ' if stdin.isatty() else ''
  if prompt:
    try:
      import readline  # noqa: F401  (line editing and history for input())
    except ImportError:  # not on every platform; input() works without it
      pass
    print(f"[chatting with {chat.flags['workdir'] or chat.flags['hf']}; /help lists the"
          " commands, Ctrl-D quits]", file=chat.err, flush=True)
  while True:
    try:
      line = input(prompt) if prompt else stdin.readline()
      if not (prompt or line):
        raise EOFError
    except (EOFError, KeyboardInterrupt):
      print(file=chat.out, flush=True)
      return 0
    line = line.strip()
    if not line:
      continue
    if line.startswith('/'):
      chat.command(line)
      continue
    try:
      chat.send(line)
    except UserError as e:  # one message the template refuses: the chat goes on
      print('error: ' + ' '.join(str(e).split('\n')), file=chat.err, flush=True)


def main(argv: list[str]) -> int:
  return cli.run(_main, argv)


def _main(argv: list[str]) -> int:
  flags = parse_flags(argv)
  tokenizer = generate.load_tokenizer(flags)
  template = generate.chat_template(flags, tokenizer)  # unusable: fails before the params load
  cfg, params, tokenizer = generate.load(flags, tokenizer)
  if flags['max_new_tokens'] >= cfg.max_seq_len:
    raise UserError(f"--max_new_tokens={flags['max_new_tokens']} leaves no room for a prompt in"
                    f" the model's context of {cfg.max_seq_len} tokens; lower it.")
  return repl(Chat(cfg, params, tokenizer, template, flags))


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
