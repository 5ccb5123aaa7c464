"""llmjax.launch: the exact gcloud commands each subcommand runs (--dry-run), and bad input."""

import shlex

import pytest

from llmjax import launch


def dry(capsys, *argv):
  assert launch.main([*argv, '--dry-run']) == 0
  return [shlex.split(l[2:]) for l in capsys.readouterr().out.splitlines() if l.startswith('$ ')]


def test_create_tpu_vm(capsys):
  (c,) = dry(capsys, 'create', '--name=job', '--zone=us-east5-a', '--accelerator=v5p-8')
  assert c == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'job', '--zone=us-east5-a',
               '--accelerator-type=v5p-8', '--version=v2-alpha-tpuv5']


def test_create_queued_spot_v5e_with_project(capsys):
  (c,) = dry(capsys, 'create', '--name=job', '--zone=us-west4-a', '--accelerator=v5e-8', '--spot',
             '--queued', '--project=p1')
  assert c == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'job', '--node-id=job',
               '--zone=us-west4-a', '--project=p1', '--accelerator-type=v5litepod-8',
               '--runtime-version=v2-alpha-tpuv5-lite', '--spot']


def test_setup_copies_this_checkout_to_every_worker(capsys):
  archive, scp, ssh = dry(capsys, 'setup', '--name=job', '--zone=z')
  assert archive[:2] == ['sh', '-c'] and 'git stash create' in archive[2]
  assert scp == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', '/tmp/llmjax-job.tar.gz',
                 'job:/tmp/llmjax.tar.gz', '--zone=z', '--worker=all']
  assert ssh[:8] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'job', '--zone=z', '--worker=all']
  assert 'tar xzf /tmp/llmjax.tar.gz' in ssh[8] and "pip install -q -e '.[tpu]'" in ssh[8]


def test_setup_from_git(capsys):
  (ssh,) = dry(capsys, 'setup', '--name=job', '--zone=z', '--repo=https://x/llmjax.git', '--ref=v1')
  assert 'git clone -q https://x/llmjax.git ~/llmjax' in ssh[-1] and 'checkout -q v1' in ssh[-1]


def test_run_same_command_on_every_worker(capsys):
  (ssh,) = dry(capsys, 'run', '--name=job', '--zone=z', '--config=experiments/quickstart.py:steps=5',
               '--workdir=gs://b/run1', '--', '--config.train.steps=7')
  assert ssh[:8] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'job', '--zone=z', '--worker=all']
  assert ssh[8] == ("--command=cd ~/llmjax && LLMJAX_DISTRIBUTED=1 ~/venv/bin/python -m llmjax.main"
                    " --config=experiments/quickstart.py:steps=5 --workdir=gs://b/run1"
                    " --config.train.steps=7 2>&1 | tee ~/llmjax_run.log")


def test_run_detached(capsys):
  (ssh,) = dry(capsys, 'run', '--name=job', '--zone=z', '--config=experiments/quickstart.py',
               '--workdir=gs://b/r', '--detach')
  assert ssh[8].startswith('--command=nohup sh -c') and '~/llmjax_run.log' in ssh[8]


def test_delete(capsys):
  (c,) = dry(capsys, 'delete', '--name=job', '--zone=z')
  assert c == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'job', '--zone=z', '--quiet']
  (c,) = dry(capsys, 'delete', '--name=job', '--zone=z', '--queued')
  assert c[:5] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'delete'] and '--force' in c


@pytest.mark.parametrize('argv, message', [
    ([], 'first argument must be a subcommand'),
    (['start', '--name=x'], 'first argument must be a subcommand'),
    (['create', '--name=x', '--zone=z'], "'create' needs --accelerator=..."),
    (['create', '--name=x', '--zone=z', '--accelerator=v9-8'], 'is not a TPU type'),
    (['create', '--name=x', '--zone=z', '--accelerator=v5p-8', '--workers=2'],
     "unknown flag '--workers=2'."),
    (['run', '--name=x', '--zone=z', '--config=experiments/quickstart.py', '--workdir=/tmp/w'],
     'must be a gs:// path'),
    (['run', '--name=x', '--zone=z', '--config=experiments/nope.py', '--workdir=gs://b/w'],
     'does not exist here'),
    (['delete', '--name=x', '--zone=z', '--', '--config.a=1'], "only 'run' passes flags"),
])
def test_bad_input(capsys, argv, message):
  assert launch.main([*argv, '--dry-run']) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and message in err and err.count('\n') == 1, err
