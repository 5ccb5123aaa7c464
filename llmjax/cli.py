"""The command line of every llmjax CLI: flag parsing, --help, and one-line errors.

Each CLI (llmjax.main, .generate, .convert, .plan, .launch, .tasks, .eval) declares its flags
beside its code, as `Flag(name, default, help)`s, and hands its body to `run`:

    FLAGS = (cli.Flag('workdir', '', 'the llmjax run to sample from', metavar='DIR'), ...)

    def main(argv: list[str]) -> int:
      return cli.run(_main, argv)

    def _main(argv):
      flags = cli.parse(argv, FLAGS, prog='llmjax.generate', doc=__doc__)
      ...

Flags are spelt --name=value, a bool flag also bare --name; the default's type types the value
and a list default makes the flag repeatable. `-h`/`--help` prints the module docstring and a
table of the flags, and exits 0. The CLIs that take an experiment also accept big_vision's
`--config=experiments/x.py:arg --config.a.b=value` (`CONFIG_FLAGS`, `load_config`).

Why not absl flags with ml_collections.config_flags, which spell the same command line: they
cannot give these errors. A bad `:arg` or a failing get_config arrives as an
IllegalFlagValueError whose message embeds the traceback; a misspelt --config.train.stpes is
"Unknown command line flag" with no hint of the key it meant; absl's FLAGS is process-global,
so the CLIs' main(argv), which tests and notebooks call repeatedly in one process, would need
unparse/redefine dances; and a key whose value is None needs a placeholder there.
"""

import dataclasses
import sys
import textwrap
from typing import Any, Callable, Sequence

from llmjax.errors import ConfigError, UserError, closest

HELP_FLAGS = ('-h', '--help')


@dataclasses.dataclass(frozen=True)
class Flag:
  """One --name=value flag: its default (whose type types the value; a list: repeatable)."""
  name: str
  default: Any
  help: str
  metavar: str = ''  # shown as --name=METAVAR in --help; default from the type

  @property
  def repeated(self) -> bool:
    return isinstance(self.default, list)

  def usage(self) -> str:
    if isinstance(self.default, bool):
      return f'--{self.name}'
    kind = str if self.repeated else type(self.default)
    meta = self.metavar or {int: 'N', float: 'X'}.get(kind, self.name.upper())
    return f'--{self.name}={meta}'

  def parse(self, value: str | None):
    """The flag's text (None: given bare, without '=') as the default's type."""
    if isinstance(self.default, bool):
      if value is None or value.lower() in ('true', '1', 'yes'):
        return True
      if value.lower() in ('false', '0', 'no'):
        return False
      raise UserError(f"--{self.name}={value}: expected true or false (or bare --{self.name}).")
    if value is None:
      raise UserError(f"--{self.name} needs a value: {self.usage()}.")
    kind = str if self.repeated else type(self.default)
    try:
      return kind(value)
    except ValueError:
      raise UserError(f"--{self.name}={value}: expected {'an' if kind is int else 'a'}"
                      f" {kind.__name__}.") from None


CONFIG_FLAGS = (
    Flag('config', '', 'the experiment: a file with get_config(arg), and the string passed as'
         ' its arg (e.g. experiments/pretrain.py:model=llama3-1b,seq_len=2048)',
         metavar='FILE.py[:ARG]'),
    Flag('workdir', '', 'where checkpoints, logs and the tokenizer go (local or gs://); rerunning'
         ' with the same one resumes', metavar='DIR'),
)
_OVERRIDE_USAGE = '--config.KEY=VALUE'
_OVERRIDE_HELP = ('sets one config key, typed like its current value (e.g.'
                  ' --config.train.steps=100); repeatable, applied in order after get_config')


class Args(dict):
  """Flag values by name; `overrides` holds the (dotted key, text) of each --config.a.b=text."""
  overrides: list[tuple[str, str]]


class Help(Exception):
  """-h/--help was given: `run` prints the text and exits 0."""


def help_text(flags: Sequence[Flag], *, prog: str, doc: str = '', overrides: bool = False) -> str:
  rows = [(f.usage(), f.help + ('; repeatable' if f.repeated else '')
           + ('' if f.repeated or f.default == '' or f.default is False
              else f' (default: {f.default})'))
          for f in flags]
  if overrides:
    rows.append((_OVERRIDE_USAGE, _OVERRIDE_HELP))
  rows.append(('-h, --help', 'prints this help and exits'))
  width = min(max(len(u) for u, _ in rows), 22) + 2
  lines = [f'usage: python -m {prog} [flags]', '']
  if doc:
    lines += [doc.strip(), '']
  lines.append('flags:')
  for u, h in rows:  # a long usage gets its help on the next line
    first = f'  {u:<{width}}' if len(u) < 24 else f'  {u}\n' + ' ' * (width + 2)
    lines.append(first + textwrap.fill(h, 100, subsequent_indent=' ' * (width + 2),
                                       initial_indent=' ' * (width + 2))[width + 2:])
  return '\n'.join(lines)


def parse(argv: Sequence[str], flags: Sequence[Flag], *, prog: str, doc: str = '',
          overrides: bool = False, hint: str = '', unknown: dict | None = None) -> Args:
  """argv -> Args {name: typed value}, defaults filled in; bad flags raise a one-line UserError.

  overrides: also take --config.a.b=value (into `Args.overrides`, in order).
  hint: appended to the error for an unknown flag or a stray argument.
  unknown: a dict to collect unknown --name=value flags into (as text) instead of failing.
  """
  if any(a in HELP_FLAGS or a.startswith('--help=') for a in argv):
    raise Help(help_text(flags, prog=prog, doc=doc, overrides=overrides))
  by_name = {f.name: f for f in flags}
  args = Args({f.name: (list(f.default) if f.repeated else f.default) for f in flags})
  args.overrides = []
  for a in argv:
    if not a.startswith('--') or a == '--':
      raise UserError(f"unexpected argument '{a}'; flags look like --name=value.{hint}")
    name, eq, value = a[2:].partition('=')
    if overrides and name.startswith('config.'):
      args.overrides.append((name[len('config.'):], value))
    elif name in by_name:
      flag = by_name[name]
      parsed = flag.parse(value if eq else None)
      if flag.repeated:
        args[name].append(parsed)
      else:
        args[name] = parsed
    elif unknown is not None:
      unknown[name] = value
    else:
      names = [f'--{f.name}' for f in flags] + ([_OVERRIDE_USAGE] if overrides else [])
      raise UserError(f"unknown flag '{a}'.{closest(name, by_name)} Flags: {', '.join(names)}"
                      f" (--help says what they mean).{hint}")
  return args


def load_config(args: Args, *, need_workdir: bool = True):
  """The ConfigDict of --config=FILE[:ARG] with args.overrides applied in order."""
  from llmjax import config as config_lib  # pulls in the model code: not needed for --help
  if not args['config']:
    raise ConfigError("missing --config=experiments/<job>.py[:arg]; e.g."
                      " --config=experiments/quickstart.py.")
  if need_workdir and not args['workdir']:
    raise ConfigError("missing --workdir=DIR: where checkpoints, logs and the tokenizer go.")
  config = config_lib.load_config(args['config'])
  for dotted, text in args.overrides:
    config_lib.apply_override(config, dotted, text)
  return config


def run(body: Callable[[list[str]], int], argv: Sequence[str], *, error_code: int = 2,
        error_codes: dict[type, int] | None = None) -> int:
  """Runs a CLI's body: --help prints and returns 0; a UserError prints `error: <msg>` (one
  line, no traceback) and returns `error_code` (or that of the first class of `error_codes`
  it is an instance of); Ctrl-C returns 130.
  """
  try:
    return body(list(argv))
  except Help as h:
    print(h)
    return 0
  except UserError as e:
    print('error: ' + ' '.join(str(e).split('\n')), file=sys.stderr)
    for kind, code in (error_codes or {}).items():
      if isinstance(e, kind):
        return code
    return error_code
  except KeyboardInterrupt:
    return 130
