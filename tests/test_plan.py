"""llmjax.plan: AOT-compiles the real train step for a TPU topology on this CPU-only machine."""

import os
import subprocess
import sys

import pytest

from llmjax import config as config_lib
from llmjax import plan as plan_lib
from llmjax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**mesh):
  c = config_lib.base_config('tiny', vocab_size=256, num_layers=2, embed_dim=64, num_heads=4,
                             num_kv_heads=2, head_dim=16, mlp_dim=128, max_seq_len=128)
  c.data.seq_len = 128
  c.train.batch_size = 8
  c.mesh.update(mesh)
  return c


def test_plan_reports_the_compiled_steps_memory_analysis():
  c = tiny_config()
  report, compiled = plan_lib.plan(c, 'v5e:2x2')
  mem = compiled.memory_analysis()
  assert report.num_devices == 4 and report.mesh == {'data': 1, 'fsdp': 4, 'sequence': 1, 'tensor': 1}
  assert report.argument_bytes == mem.argument_size_in_bytes
  assert report.output_bytes == mem.output_size_in_bytes
  assert report.alias_bytes == mem.alias_size_in_bytes
  assert report.temp_bytes == mem.temp_size_in_bytes
  assert report.code_bytes == mem.generated_code_size_in_bytes
  assert report.total_bytes == (mem.argument_size_in_bytes + mem.output_size_in_bytes
                                - mem.alias_size_in_bytes + mem.temp_size_in_bytes
                                + mem.generated_code_size_in_bytes)
  assert report.hbm_bytes == 15.75 * 2**30 and report.fits
  # Independent: the arguments hold at least this device's share of params + Adam moments
  # (fsdp=4 splits every weight 4 ways), and the donated state comes back aliased.
  n = c.model
  params = (n.vocab_size * n.embed_dim * 2
            + n.num_layers * (n.embed_dim * (n.num_heads + 2 * n.num_kv_heads) * n.head_dim
                              + n.num_heads * n.head_dim * n.embed_dim + 3 * n.embed_dim * n.mlp_dim
                              + 2 * n.embed_dim) + n.embed_dim)
  assert report.argument_bytes >= params * 3 * 4 / 4
  assert report.alias_bytes >= params * 3 * 4 / 4
  text = plan_lib.format_report(c, report)
  assert 'data=1 x fsdp=4 x sequence=1 x tensor=1' in text and 'fits' in text


def test_plan_over_two_slices_puts_data_across_them():
  c = tiny_config(data=1, fsdp=4, dcn_data=2)
  report, _ = plan_lib.plan(c, 'v5e:2x2', slices=2)
  assert report.mesh == {'data': 2, 'fsdp': 4, 'sequence': 1, 'tensor': 1} and report.num_devices == 8


@pytest.mark.parametrize('topology, message', [
    ('v5x:2x2', 'not a TPU topology name'),
    ('v5p:2x2', 'not a TPU topology name'),  # v5p is a 3-D torus
    ('v5e:3x3', 'libtpu has no such slice'),
])
def test_bad_topology_names(topology, message):
  with pytest.raises(ConfigError, match=message):
    plan_lib.plan(tiny_config(), topology)


def test_mesh_that_does_not_match_the_topology():
  with pytest.raises(ConfigError, match=r'fsdp=3 .* = 3 devices, but there are 4'):
    plan_lib.plan(tiny_config(fsdp=3), 'v5e:2x2')


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu', ALLOW_MULTIPLE_LIBTPU_LOAD='1', PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, '-m', 'llmjax.plan', *args], capture_output=True,
                        text=True, env=env, cwd=ROOT, timeout=300)


def test_cli_fails_with_advice_when_the_step_does_not_fit():
  # A 1-layer model with a 1M-token vocabulary, replicated (pure data parallel): ~8 GiB of
  # params per chip, x3 with Adam, on 15.75 GiB v5e chips.
  p = _cli('--config=experiments/quickstart.py', '--topology=v5e:2x2',
           '--config.model.vocab_size=1048576', '--config.model.embed_dim=2048',
           '--config.model.num_heads=16', '--config.model.head_dim=0',
           '--config.model.num_layers=1', '--config.sharding.rules=data',
           '--config.mesh.data=-1', '--config.mesh.fsdp=1')
  assert p.returncode == 1, p.stderr[-2000:]
  err = [l for l in p.stderr.splitlines() if l.startswith('error:')]
  assert len(err) == 1, p.stderr[-2000:]
  assert 'v5e device has 15.75' in err[0] and '--config.mesh.fsdp=-1' in err[0], err[0]
  assert '--config.model.remat=full' in err[0], err[0]


def test_cli_prints_the_report_and_exits_0_when_it_fits():
  p = _cli('--config=experiments/quickstart.py', '--topology=v5e:2x2')
  assert p.returncode == 0, p.stderr[-2000:]
  assert 'total' in p.stdout and '-> fits' in p.stdout and 'largest tensors' in p.stdout


def test_cli_without_topology():
  p = _cli('--config=experiments/quickstart.py')
  assert p.returncode == 2 and 'missing --topology' in p.stderr
