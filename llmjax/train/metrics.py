"""Run outputs: console progress bar, metrics.jsonl, TensorBoard events, the loss-curve PNG.

Only process 0 writes; other hosts get a logger that does nothing, so the loop never needs to
ask which host it is on. The workdir may be local or gs:// (`llmjax.files`).
"""

import io
import json
import time

import jax

from llmjax import files

# Peak dense bf16 FLOP/s per chip by `device_kind`, for MFU. Published vendor numbers.
PEAK_FLOPS = {
    'TPU v4': 275e12,
    'TPU v5 lite': 197e12,  # v5e
    'TPU v5e': 197e12,
    'TPU v5': 459e12,  # v5p
    'TPU v5p': 459e12,
    'TPU v6 lite': 918e12,  # v6e (Trillium)
    'TPU v6e': 918e12,
    'NVIDIA H100 80GB HBM3': 989e12,
    'NVIDIA H100': 989e12,
    'NVIDIA H200': 989e12,
    'NVIDIA A100-SXM4-80GB': 312e12,
    'NVIDIA A100-SXM4-40GB': 312e12,
}


def device_peak_flops(override: float = 0.0) -> float:
  """Peak FLOP/s of one local device (0 when unknown, e.g. a CPU), or `override` if set."""
  if override:
    return float(override)
  return PEAK_FLOPS.get(jax.devices()[0].device_kind, 0.0)


class MetricsLogger:
  """Writes one JSON object per logged step and TensorBoard scalars; shows a progress bar.

  With a gs:// workdir, metrics.jsonl is rewritten and new TensorBoard events uploaded at most
  every REMOTE_SYNC_EVERY_S seconds and at `close`: objects cannot be appended to, so each
  upload rewrites the whole file, too often to do at every logged step. A crash (not SIGTERM
  or Ctrl-C, which close the logger) loses at most that many seconds of metrics.
  """

  REMOTE_SYNC_EVERY_S = 30.0

  def __init__(self, workdir: str, total_steps: int, start_step: int, enabled: bool = True):
    self.enabled = enabled and jax.process_index() == 0
    self.workdir = workdir
    if not self.enabled:
      return
    import tensorboardX
    import tqdm
    self.jsonl = files.AppendOnlyText(files.join(workdir, 'metrics.jsonl'))
    # tensorboardX writes gs:// only with extra dependencies: it writes locally and the
    # mirror uploads (for a local workdir the mirror is the directory itself).
    self.tb_dir = files.LocalMirror(files.join(workdir, 'tensorboard'))
    self.tb = tensorboardX.SummaryWriter(self.tb_dir.local)
    self.remote = files.is_remote(workdir)
    self.last_sync = time.time()
    self.bar = tqdm.tqdm(total=total_steps, initial=start_step, dynamic_ncols=True,
                         unit='step', mininterval=1.0, disable=None)  # None: off when not a TTY
    self.start = time.time()

  def step(self, n: int = 1):
    if self.enabled:
      self.bar.update(n)

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    record = {'step': int(step), **{k: float(v) for k, v in metrics.items()}}
    self.jsonl.write(json.dumps(record) + '\n')
    for k, v in record.items():
      if k != 'step':
        self.tb.add_scalar(k, v, step)
    if not self.remote:
      self.jsonl.flush()
    elif time.time() - self.last_sync >= self.REMOTE_SYNC_EVERY_S:
      self.sync()
    shown = {k: record[k] for k in ('loss', 'eval_loss', 'tokens_per_s', 'mfu') if k in record}
    self.bar.set_postfix({k: f'{v:.4g}' for k, v in shown.items()}, refresh=False)

  def sync(self):
    """Makes everything logged so far visible in the workdir (uploads it for gs://)."""
    if self.enabled:
      self.jsonl.flush()
      self.tb.flush()
      self.tb_dir.sync()
      self.last_sync = time.time()

  def print(self, text: str):
    if self.enabled:
      self.bar.write(text)

  def close(self):
    if self.enabled:
      self.bar.close()
      self.jsonl.close()
      self.tb.close()
      self.tb_dir.close()


def plot_loss_curve(workdir: str) -> str | None:
  """Reads metrics.jsonl and writes loss_curve.png (train and eval loss against step)."""
  return _plot(workdir, 'loss_curve.png', [('loss', 'train loss', '-'),
                                           ('eval_loss', 'eval loss', 'o-')],
               'cross-entropy (nats/token)')


def plot_reward_curve(workdir: str) -> str | None:
  """reward_curve.png of an RL run: the rollouts' mean reward and held-out exact match (the
  eval_*_exact_match columns) against step."""
  return _plot(workdir, 'reward_curve.png', [('reward', 'rollout reward (mean)', '-'),
                                             ('eval_*_exact_match', 'held-out exact match', 'o-')],
               'reward / exact match')


def _plot(workdir: str, name: str, series, ylabel: str) -> str | None:
  """series: (metrics key, or 'prefix*suffix' for every matching key; label; line style)."""
  import fnmatch
  path = files.join(workdir, 'metrics.jsonl')
  if jax.process_index() != 0 or not files.exists(path):
    return None
  import matplotlib
  matplotlib.use('Agg')  # no display on TPU VMs or CI
  import matplotlib.pyplot as plt
  rows = [json.loads(line) for line in files.read_text(path).splitlines() if line.strip()]
  fig, ax = plt.subplots(figsize=(6, 4))
  for pattern, label, style in series:
    keys = sorted({k for r in rows for k in r if fnmatch.fnmatch(k, pattern)})
    for key in keys:
      points = [(r['step'], r[key]) for r in rows if key in r]
      if points:
        ax.plot(*zip(*points), style, label=label if key == pattern else f'{label}: {key}')
  ax.set_xlabel('step')
  ax.set_ylabel(ylabel)
  ax.legend()
  ax.grid(alpha=0.3)
  out = files.join(workdir, name)
  fig.tight_layout()
  png = io.BytesIO()  # savefig knows local paths, not gs://: render here, write through epath
  fig.savefig(png, format='png', dpi=100)
  plt.close(fig)
  files.write_bytes(out, png.getvalue())
  return out
