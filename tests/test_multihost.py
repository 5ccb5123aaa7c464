"""Two processes on this CPU (`jax.distributed` with a local coordinator): a SIGTERM to one host
stops both at the same step, both save it and exit 0, and the rerun resumes from it."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)

WORKER = r'''
import sys
import jax
port, process_id, workdir, steps = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
jax.distributed.initialize(coordinator_address=f'localhost:{port}', num_processes=2,
                           process_id=process_id)
sys.path.insert(0, sys.argv[5])
import test_loop
from llmjax.train.loop import train_and_evaluate
c = test_loop.tiny_config(steps=steps, eval_every=100000, checkpoint_every=100000, log_every=1,
                          unigram_baseline_batches=0)
c.sample.prompts = ()
out = train_and_evaluate(c, workdir)
print(f"process {process_id} finished at step {out['step']}", flush=True)
'''


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _start(workdir, steps):
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
  # One CPU device per process: drop a device count, keep any other flag (conftest's -O1).
  env['XLA_FLAGS'] = ' '.join(f for f in env.get('XLA_FLAGS', '').split()
                              if 'xla_force_host_platform_device_count' not in f)
  return [subprocess.Popen([sys.executable, '-c', WORKER, str(port), str(i), str(workdir),
                            str(steps), TESTS], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True) for i in range(2)]


def _finish(procs, timeout=300):
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise AssertionError('a process hung (hosts disagreed on the stop step?)')
  return outs


@pytest.mark.slow
def test_sigterm_to_one_host_stops_both_at_the_same_step_and_resumes(tmp_path):
  procs = _start(tmp_path, 100000)
  metrics = tmp_path / 'metrics.jsonl'  # written by process 0
  deadline = time.time() + 300
  while time.time() < deadline and not (metrics.exists()
                                        and len(metrics.read_text().splitlines()) >= 3):
    assert all(p.poll() is None for p in procs), _finish(procs)
    time.sleep(0.5)
  procs[1].send_signal(signal.SIGTERM)  # only the second host is preempted
  outs = _finish(procs)
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  saved = int(outs[0].split('SIGTERM: saved step ')[1].split(';')[0])
  assert os.listdir(tmp_path / 'checkpoints') == [str(saved)]
  # Both hosts stopped at `saved`: each finished there, and the checkpoint (one collective
  # save) is complete, with each host's data-iterator state.
  for i, out in enumerate(outs):
    assert f'process {i} finished at step {saved}' in out, out[-2000:]
  procs = _start(tmp_path, saved + 2)
  outs = _finish(procs)
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, out[-3000:]
    assert f'process {i} finished at step {saved + 2}' in out
  assert f'resuming at step {saved}' in outs[0]
