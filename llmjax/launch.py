r"""Cloud TPU VM jobs with gcloud: create a slice, install this repo on every worker, run one
experiment on all of them, delete the slice.

    python -m llmjax.launch create --name=llama --zone=us-east5-a --accelerator=v5p-8 [--spot] [--queued]
    python -m llmjax.launch setup  --name=llama --zone=us-east5-a [--repo=https://...git --ref=main]
    python -m llmjax.launch run    --name=llama --zone=us-east5-a \
        --config=experiments/llama3_8b_pretrain.py:tpu=v5p-8 --workdir=gs://BUCKET/llama3_8b \
        [-- --config.train.steps=100 ...]
    python -m llmjax.launch delete --name=llama --zone=us-east5-a [--queued]

Add --dry-run to print the exact commands instead of running them, --project=P for a project
other than gcloud's default. Every worker runs the same `llmjax.main` command; JAX's
distributed runtime finds the other workers through the TPU metadata, each host feeds its
own shard of the global batch, and all hosts write the same gs:// checkpoints.
"""

import os
import shlex
import shutil
import subprocess
import sys

from llmjax import cli
from llmjax.errors import UserError

# Cloud TPU software versions per generation (cloud.google.com/tpu/docs/runtimes).
RUNTIMES = {'v4': 'tpu-ubuntu2204-base', 'v5litepod': 'v2-alpha-tpuv5-lite',
            'v5p': 'v2-alpha-tpuv5', 'v6e': 'v2-alpha-tpuv6e'}
# gcloud spells v5e 'v5litepod'; accept the common name too.
ALIASES = {'v5e': 'v5litepod'}
REMOTE_DIR = '~/llmjax'
REMOTE_PYTHON = '~/venv/bin/python'

_NAME = cli.Flag('name', '', 'the TPU VM (and queued resource) name')
_ZONE = cli.Flag('zone', '', 'its zone, e.g. us-east5-a')
_PROJECT = cli.Flag('project', '', "the Google Cloud project; '': gcloud's default")
_DRY_RUN = cli.Flag('dry-run', False, 'print the exact commands instead of running them')
FLAGS = {
    'create': (
        _NAME, _ZONE,
        cli.Flag('accelerator', '', 'the TPU type: v5p-8, v5e-8 (gcloud: v5litepod-8), v6e-8,'
                 ' v4-8, ...', metavar='TYPE'),
        cli.Flag('version', '', "the TPU software version; '': the generation's (RUNTIMES)"),
        cli.Flag('spot', False, 'a Spot VM: cheaper, and may be preempted'),
        cli.Flag('queued', False, 'a queued resource: waits for capacity instead of failing'
                 ' when the zone has none'),
        _PROJECT, _DRY_RUN),
    'setup': (
        _NAME, _ZONE,
        cli.Flag('repo', '', "clone this git URL on every worker; '': copy this checkout,"
                 ' uncommitted edits included', metavar='URL'),
        cli.Flag('ref', '', "the git ref to check out with --repo; '': main"),
        _PROJECT, _DRY_RUN),
    'run': (
        _NAME, _ZONE,
        cli.Flag('config', '', "the experiment, as llmjax.main takes it (a file of this"
                 " checkout, which setup copied); llmjax.main's other flags go after '--'",
                 metavar='FILE.py[:ARG]'),
        cli.Flag('workdir', '', 'a gs:// dir: every worker writes its checkpoint shards there'
                 ' and resumes from it', metavar='gs://BUCKET/DIR'),
        cli.Flag('detach', False, "keep running after the ssh session ends (log in"
                 " ~/llmjax_run.log); without it every worker's output streams here"),
        _PROJECT, _DRY_RUN),
    'delete': (
        _NAME, _ZONE,
        cli.Flag('queued', False, 'delete the queued resource (a slice created with --queued)'),
        _PROJECT, _DRY_RUN),
}
REQUIRED = {'create': ('name', 'zone', 'accelerator'), 'setup': ('name', 'zone'),
            'run': ('name', 'zone', 'config', 'workdir'), 'delete': ('name', 'zone')}
NO_GCLOUD = ("gcloud is not on PATH: install the Google Cloud SDK"
             " (cloud.google.com/sdk/docs/install) and put its bin/ on PATH, or pass --dry-run"
             " to print the commands.")


def help_text() -> str:
  return '\n\n'.join([f'usage: python -m llmjax.launch {{{",".join(FLAGS)}}} [flags]',
                       __doc__.strip()]
                      + [cli.help_text(f, prog=f'llmjax.launch {cmd}') for cmd, f in FLAGS.items()])


def parse(argv: list[str]) -> tuple[str, dict, list[str]]:
  """'run --name=x ... -- --config.a=b' -> ('run', {'name': 'x', ...}, ['--config.a=b'])."""
  if argv and argv[0] in cli.HELP_FLAGS:
    raise cli.Help(help_text())
  if not argv or argv[0] not in FLAGS:
    raise UserError(f"first argument must be a subcommand: {', '.join(FLAGS)}; e.g."
                    " python -m llmjax.launch create --name=NAME --zone=ZONE --accelerator=v5p-8.")
  cmd, rest = argv[0], argv[1:]
  extra = []
  if '--' in rest:
    i = rest.index('--')
    rest, extra = rest[:i], rest[i + 1:]
    # llmjax.main has no --dry-run: one written after '--' still means "print, do not run".
    if '--dry-run' in extra:
      extra = [a for a in extra if a != '--dry-run']
      rest.append('--dry-run')
  flags = cli.parse(rest, FLAGS[cmd], prog=f'llmjax.launch {cmd}', doc=__doc__,
                    hint=" Pass llmjax.main's flags after '--'." if cmd == 'run' else '')
  missing = [f for f in REQUIRED[cmd] if not flags[f]]
  if missing:
    raise UserError(f"'{cmd}' needs {', '.join('--' + m + '=...' for m in missing)}.")
  if extra and cmd != 'run':
    raise UserError(f"only 'run' passes flags after '--' to llmjax.main; '{cmd}' got {extra}.")
  return cmd, flags, extra


def _common(f: dict) -> list[str]:
  out = [f"--zone={f['zone']}"]
  if f.get('project'):
    out.append(f"--project={f['project']}")
  return out


def _ssh(f: dict, command: str) -> list[str]:
  return (['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', f['name'], *_common(f), '--worker=all',
           f'--command={command}'])


def accelerator_type(name: str) -> tuple[str, str]:
  """'v5e-8' -> ('v5litepod-8', 'v5litepod'); checks the generation is known."""
  gen, _, size = name.partition('-')
  gen = ALIASES.get(gen, gen)
  if gen not in RUNTIMES or not size.isdigit():
    raise UserError(f"--accelerator={name} is not a TPU type like v5p-8, v5e-8 (v5litepod-8),"
                    f" v6e-8 or v4-8; known generations: {', '.join(RUNTIMES)}.")
  return f'{gen}-{size}', gen


def commands(cmd: str, f: dict, extra: list[str]) -> list[list[str]]:
  """The exact commands a subcommand runs, in order."""
  if cmd == 'create':
    acc, gen = accelerator_type(f['accelerator'])
    version = f.get('version') or RUNTIMES[gen]
    if f.get('queued'):
      # A queued resource waits for capacity instead of failing when the zone has none.
      c = ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', f['name'],
           f"--node-id={f['name']}", *_common(f), f'--accelerator-type={acc}',
           f'--runtime-version={version}']
    else:
      c = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', f['name'], *_common(f),
           f'--accelerator-type={acc}', f'--version={version}']
    return [c + (['--spot'] if f.get('spot') else [])]
  if cmd == 'setup':
    install = (f"python3 -m venv ~/venv && {REMOTE_PYTHON} -m pip install -q -U pip &&"
               f" cd {REMOTE_DIR} && {REMOTE_PYTHON} -m pip install -q -e '.[tpu]'")
    if f.get('repo'):
      ref = f.get('ref') or 'main'
      fetch = (f"rm -rf {REMOTE_DIR} && git clone -q {shlex.quote(f['repo'])} {REMOTE_DIR} &&"
               f" git -C {REMOTE_DIR} checkout -q {shlex.quote(ref)}")
      return [_ssh(f, f"{fetch} && {install}")]
    # This checkout as it is now, uncommitted edits of tracked files included (`git stash
    # create` makes a commit of them without touching the working tree; empty when clean).
    tarball = f"/tmp/llmjax-{f['name']}.tar.gz"
    return [
        ['sh', '-c', f'ref=$(git stash create); git archive --format=tar.gz -o {tarball}'
                     ' "${ref:-HEAD}"'],
        ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', tarball, f"{f['name']}:/tmp/llmjax.tar.gz",
         *_common(f), '--worker=all'],
        _ssh(f, f"rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} &&"
                f" tar xzf /tmp/llmjax.tar.gz -C {REMOTE_DIR} && {install}"),
    ]
  if cmd == 'run':
    if not f['workdir'].startswith('gs://'):
      raise UserError(f"--workdir={f['workdir']} must be a gs:// path: every worker writes"
                      " its checkpoint shards there and resumes from it; e.g."
                      " --workdir=gs://BUCKET/runs/NAME.")
    job = ' '.join([f'cd {REMOTE_DIR} &&', 'LLMJAX_DISTRIBUTED=1', REMOTE_PYTHON, '-m',
                    'llmjax.main', shlex.quote(f"--config={f['config']}"),
                    shlex.quote(f"--workdir={f['workdir']}"), *map(shlex.quote, extra)])
    if f.get('detach'):
      # Survives the ssh session; `run` without --detach streams every worker's output.
      return [_ssh(f, f"nohup sh -c {shlex.quote(job)} > ~/llmjax_run.log 2>&1 &"
                      " sleep 1; echo started; tail -n 5 ~/llmjax_run.log")]
    return [_ssh(f, f"{job} 2>&1 | tee ~/llmjax_run.log")]
  if cmd == 'delete':
    if f.get('queued'):
      return [['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', f['name'], *_common(f),
               '--force', '--quiet']]
    return [['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', f['name'], *_common(f), '--quiet']]
  raise AssertionError(cmd)


def check_programs(todo: list[list[str]]) -> None:
  """Fails before running anything when a command's program is not installed."""
  for program in dict.fromkeys(c[0] for c in todo):
    if shutil.which(program) is None:
      raise UserError(NO_GCLOUD if program == 'gcloud' else f"{program} is not on PATH; install"
                      " it, or pass --dry-run to print the commands.")


def main(argv: list[str]) -> int:
  return cli.run(_main, argv)


def _main(argv: list[str]) -> int:
  cmd, flags, extra = parse(argv)
  if cmd == 'run':
    path = flags['config'].partition(':')[0]
    if not os.path.isfile(path):
      raise UserError(f"--config: '{path}' does not exist here; pass a file of this checkout"
                      " (setup copies it to every worker).")
  todo = commands(cmd, flags, extra)
  if not flags['dry-run']:
    check_programs(todo)
  for c in todo:
    print('$ ' + shlex.join(c), flush=True)
    if not flags['dry-run']:
      try:
        rc = subprocess.call(c)
      except FileNotFoundError:  # removed since check_programs looked
        raise UserError(NO_GCLOUD if c[0] == 'gcloud' else f"{c[0]} is not on PATH.") from None
      if rc:
        print(f"error: the command above exited with {rc}.", file=sys.stderr)
        return rc
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
