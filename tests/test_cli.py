"""llmjax.cli and every CLI on it: --help, typed flags, one-line errors with exit codes."""

import os
import subprocess
import sys

import pytest

from llmjax import chat as chat_cli
from llmjax import cli, config as config_lib, convert, generate, launch, main as main_lib, plan
from llmjax import tasks as tasks_cli
from llmjax.eval import __main__ as eval_cli
from llmjax.errors import ConfigError, UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, 'experiments', 'quickstart.py')

# Every flag each CLI takes today, as the README, colab/ and the module docstrings spell them:
# --help must list them all (so none is renamed or dropped unnoticed).
PUBLIC_FLAGS = {
    main_lib: ['config', 'workdir', 'config.KEY'],
    generate: ['workdir', 'hf', 'prompt', 'prompt_ids', 'max_new_tokens', 'temperature', 'top_k',
               'top_p', 'seed', 'stop', 'json', 'chat', 'system'],
    convert: ['from', 'to', 'src', 'dst', 'dtype', 'max_shard_bytes', 'architecture', 'step',
              'base_model'],
    plan: ['config', 'topology', 'slices', 'config.KEY'],
    launch: ['name', 'zone', 'accelerator', 'version', 'spot', 'queued', 'project', 'dry-run',
             'repo', 'ref', 'config', 'workdir', 'detach'],
    tasks_cli: ['out', 'tasks', 'seed', 'format'],
    eval_cli: ['workdir', 'hf', 'task', 'data', 'max_new_tokens', 'stop', 'chat', 'system',
               'batch_size', 'json'],
    chat_cli: ['workdir', 'hf', 'system', 'max_new_tokens', 'temperature', 'top_k', 'top_p',
               'seed', 'stop'],
}
# The module a user runs (`python -m NAME`): a package's CLI lives in its __main__.
RUN_AS = {eval_cli: 'llmjax.eval'}


def _one_line_error(capsys) -> str:
  err = capsys.readouterr().err
  assert err.startswith('error: ') and err.count('\n') == 1 and 'Traceback' not in err, err
  return err.strip()


# ---------------------------------------------------------------------------------- --help


@pytest.mark.parametrize('module', list(PUBLIC_FLAGS), ids=lambda m: m.__name__)
@pytest.mark.parametrize('flag', ['--help', '-h'])
def test_help_lists_every_flag_and_exits_0(capsys, module, flag):
  assert module.main([flag]) == 0
  out = capsys.readouterr().out
  assert out.startswith('usage: python -m ' + RUN_AS.get(module, module.__name__))
  for name in PUBLIC_FLAGS[module]:
    assert f'  --{name}' in out, (name, out)
  assert '-h, --help' in out


def test_help_wins_over_bad_flags(capsys):
  assert generate.main(['--promt=x', '--help']) == 0
  assert '--prompt=TEXT' in capsys.readouterr().out
  assert launch.main(['run', '--help']) == 0
  out = capsys.readouterr().out
  assert 'usage: python -m llmjax.launch run' in out and '--detach' in out
  assert '  --accelerator=' not in out.split('flags:')[1]  # only run's flags


@pytest.mark.parametrize('module', ['llmjax.main', 'llmjax.generate', 'llmjax.convert',
                                    'llmjax.plan', 'llmjax.launch', 'llmjax.tasks',
                                    'llmjax.eval', 'llmjax.chat'])
def test_help_from_the_shell(module):
  r = subprocess.run([sys.executable, '-m', module, '--help'], capture_output=True, text=True,
                     cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
  assert r.returncode == 0 and r.stdout.startswith(f'usage: python -m {module}'), r.stderr


# ------------------------------------------------------------------------- unknown flags


@pytest.mark.parametrize('module,argv,meant,code', [
    (main_lib, ['--worddir=/tmp/x'], 'workdir', 2),
    (generate, ['--workdir=w', '--promt=hi'], 'prompt', 2),
    (convert, ['--form=hf'], 'from', 1),
    (plan, ['--topolgy=v5e:2x2'], 'topology', 2),
    (launch, ['create', '--name=x', '--zone=z', '--accelrator=v5p-8'], 'accelerator', 2),
], ids=lambda x: getattr(x, '__name__', None))
def test_unknown_flag_names_the_closest(capsys, module, argv, meant, code):
  assert module.main(argv) == code
  err = _one_line_error(capsys)
  assert f"unknown flag '{argv[-1]}'. Did you mean '{meant}'?" in err, err
  assert '--help' in err


def test_unknown_flag_from_the_shell_is_one_line_exit_2():
  r = subprocess.run([sys.executable, '-m', 'llmjax.main', '--config=experiments/quickstart.py',
                      '--wrokdir=/tmp/x'], capture_output=True, text=True, cwd=ROOT,
                     env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
  assert r.returncode == 2
  assert r.stderr.splitlines() == [
      "error: unknown flag '--wrokdir=/tmp/x'. Did you mean 'workdir'? Flags: --config,"
      " --workdir, --config.KEY=VALUE (--help says what they mean)."]


def test_config_overrides_only_where_a_config_is_taken(capsys):
  assert generate.main(['--workdir=w', '--prompt=x', '--config.train.steps=1']) == 2
  assert "unknown flag '--config.train.steps=1'" in _one_line_error(capsys)


# ------------------------------------------------------------------------ llmjax.main input


def test_main_misspelt_config_key(capsys, tmp_path):
  assert main_lib.main([f'--config={QUICKSTART}', f'--workdir={tmp_path}',
                        '--config.train.stpes=1']) == 2
  err = _one_line_error(capsys)
  assert "--config.train.stpes: 'stpes' is not a key of train. Did you mean 'steps'?" in err
  assert not os.listdir(tmp_path)  # refused before anything was written


@pytest.mark.parametrize('argv,message', [
    (['--workdir=/tmp/x'], 'missing --config=experiments/<job>.py[:arg]'),
    ([f'--config={QUICKSTART}'], 'missing --workdir=DIR'),
    ([f'--config={QUICKSTART}', '--workdir'], '--workdir needs a value: --workdir=DIR.'),
    ([f'--config={QUICKSTART}:steps=ten', '--workdir=/tmp/x'],
     'config argument steps=ten: expected int; the default is 400.'),
    (['experiments/quickstart.py'], "unexpected argument 'experiments/quickstart.py'"),
])
def test_main_bad_input_exits_2(capsys, argv, message):
  assert main_lib.main(argv) == 2
  assert message in _one_line_error(capsys)


def test_plan_missing_config(capsys):
  assert plan.main(['--topology=v5e:2x2']) == 2
  assert 'missing --config=' in _one_line_error(capsys)


def test_bad_boolean_in_config_arg(capsys, tmp_path):
  with pytest.raises(ConfigError, match=r"config argument fast=maybe: 'maybe' is not a boolean"):
    config_lib.parse_arg('fast=maybe', fast=False, steps=3)
  assert config_lib.parse_arg('fast=yes,steps=4', fast=False, steps=3).to_dict() == {
      'fast': True, 'steps': 4}
  experiment = tmp_path / 'exp.py'
  experiment.write_text(
      'from llmjax import config as config_lib\n\n\n'
      'def get_config(arg):\n'
      '  a = config_lib.parse_arg(arg, fast=False)\n'
      '  return config_lib.base_config()\n')
  assert main_lib.main([f'--config={experiment}:fast=maybe', f'--workdir={tmp_path}/w']) == 2
  assert "'maybe' is not a boolean (true or false)" in _one_line_error(capsys)


# ------------------------------------------------------------------------- llmjax.launch


def test_missing_gcloud_is_one_line_before_anything_runs(capsys, monkeypatch, tmp_path):
  monkeypatch.setenv('PATH', str(tmp_path))  # an empty directory: no gcloud, no sh
  monkeypatch.setattr(launch.subprocess, 'call', lambda c: pytest.fail(f'ran {c}'))
  assert launch.main(['create', '--name=x', '--zone=z', '--accelerator=v5p-8']) == 2
  captured = capsys.readouterr()
  assert '$ ' not in captured.out  # nothing was started
  assert captured.err.strip() == 'error: ' + launch.NO_GCLOUD
  assert 'Google Cloud SDK' in captured.err and 'PATH' in captured.err


def test_gcloud_vanishing_mid_run_is_one_line(capsys, monkeypatch):
  monkeypatch.setattr(launch.shutil, 'which', lambda program: '/usr/bin/' + program)

  def call(c):
    raise FileNotFoundError(2, 'No such file or directory', c[0])
  monkeypatch.setattr(launch.subprocess, 'call', call)
  assert launch.main(['delete', '--name=x', '--zone=z']) == 2
  assert _one_line_error(capsys) == 'error: ' + launch.NO_GCLOUD


def test_launch_bool_flags_are_typed(capsys):
  assert launch.main(['create', '--name=j', '--zone=z', '--accelerator=v5p-8', '--spot=false',
                      '--dry-run']) == 0
  assert '--spot' not in capsys.readouterr().out  # was the truthy string 'false' before
  assert launch.main(['create', '--name=j', '--zone=z', '--accelerator=v5p-8', '--spot=maybe',
                      '--dry-run']) == 2
  assert '--spot=maybe: expected true or false' in _one_line_error(capsys)


# ----------------------------------------------------------------------- llmjax.convert


def _workdir_with_step_0(path):
  import numpy as np

  from llmjax.models.config import get_preset
  from llmjax.train import checkpoint
  checkpoint.write_model_config(str(path), get_preset('tiny'))
  manager = checkpoint.make_manager(str(path), max_to_keep=1, async_save=False)
  checkpoint.save(manager, 0, {'params': {'w': np.zeros(3, np.float32)}}, force=True)
  manager.wait_until_finished()
  manager.close()


def test_convert_missing_step_is_one_line(capsys, tmp_path):
  _workdir_with_step_0(tmp_path / 'w')
  assert convert.main(['--to=hf', f'--src={tmp_path}/w', f'--dst={tmp_path}/hf', '--step=5']) == 1
  assert '--step=5: no such checkpoint' in _one_line_error(capsys)


def test_convert_corrupt_checkpoint_is_one_line(capsys, tmp_path):
  _workdir_with_step_0(tmp_path / 'w')
  state = tmp_path / 'w' / 'checkpoints' / '0' / 'state'
  for dirpath, _, names in os.walk(state):
    for name in names:  # every file of the item, its metadata included
      os.remove(os.path.join(dirpath, name))
  assert convert.main(['--to=hf', f'--src={tmp_path}/w', f'--dst={tmp_path}/hf']) == 1
  assert 'checkpoint step 0 in' in _one_line_error(capsys)


# ------------------------------------------------------------------------- cli.parse


FLAGS = (cli.Flag('n', 3, 'an int'), cli.Flag('x', 0.5, 'a float'), cli.Flag('s', '', 'text'),
         cli.Flag('b', False, 'a switch'), cli.Flag('r', [], 'repeatable'))


def test_parse_types_defaults_and_repeats():
  args = cli.parse(['--n=7', '--x=2', '--r=a', '--b', '--r=b=c', '--s='], FLAGS, prog='t')
  assert dict(args) == {'n': 7, 'x': 2.0, 's': '', 'b': True, 'r': ['a', 'b=c']}
  assert isinstance(args['x'], float) and args.overrides == []
  assert cli.parse([], FLAGS, prog='t') == {'n': 3, 'x': 0.5, 's': '', 'b': False, 'r': []}
  assert FLAGS[4].default == []  # the default list is copied, not appended to
  for text, want in [('false', False), ('0', False), ('no', False), ('True', True), ('1', True)]:
    assert cli.parse([f'--b={text}'], FLAGS, prog='t')['b'] is want


def test_parse_overrides_in_order_and_unknown_collected():
  flags = cli.CONFIG_FLAGS
  args = cli.parse(['--config.a.b=1', '--config=f.py:x', '--config.a.b=2'], flags, prog='t',
                   overrides=True)
  assert args['config'] == 'f.py:x' and args.overrides == [('a.b', '1'), ('a.b', '2')]
  rest = {}
  cli.parse(['--topology=v5e:2x2', '--config=f.py'], flags, prog='t', unknown=rest)
  assert rest == {'topology': 'v5e:2x2'}


@pytest.mark.parametrize('argv,message', [
    (['--n=seven'], '--n=seven: expected an int.'),
    (['--x=big'], '--x=big: expected a float.'),
    (['--n'], '--n needs a value: --n=N.'),
    (['-n=1'], "unexpected argument '-n=1'; flags look like --name=value."),
    (['--'], "unexpected argument '--'"),
])
def test_parse_errors(argv, message):
  with pytest.raises(UserError) as e:
    cli.parse(argv, FLAGS, prog='t')
  assert message in str(e.value)


def test_run_epilogue(capsys):
  def body(argv):
    raise ConfigError('bad key\nsecond line')
  assert cli.run(body, [], error_code=5) == 5
  assert capsys.readouterr().err == 'error: bad key second line\n'
  assert cli.run(body, [], error_codes={ConfigError: 7}) == 7

  def interrupted(argv):
    raise KeyboardInterrupt
  assert cli.run(interrupted, []) == 130
