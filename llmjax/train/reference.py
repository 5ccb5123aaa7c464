"""Precomputed reference log-probs (dpo.precompute_ref=True): the reference model runs once,
before training, and never again.

DPO's reference is frozen, so its summed log-probs of each pair's chosen and rejected
completion are constants of the run. One forward pass over the train and validation pairs
(`precomputed_logps`) writes them to

    WORKDIR/reference_logps/<key>.npz    train [records, 2], validation [records, 2] float32
                                         (chosen, rejected; NaN for a skipped pair)
    WORKDIR/reference_logps/<key>.json   what the key was made of

and the batches then carry them as `ref_logps` [B, 2P] (`llmjax.data.preference`), so the
train step holds no reference in memory and runs one forward pass a step instead of two (for
an 8B model on a v5p-8 that is the reference's 16 GB of bf16 weights freed, and about a
quarter of the step's FLOPs). The key is a hash of everything the numbers depend on: the
records of both splits, the tokenizer's files and the chat template, data.seq_len (the
truncation), the reference checkpoint (its path, and its files' names, sizes and modification
times: not their bytes, which would mean reading 16 GB to decide not to read them) and the
model's numerics (dtype, attention, ...). A restart with the same key reuses the file and loads
no reference; a changed dataset, tokenizer or reference gets a new key and a new pass.

The pass uses the rows the training pipeline makes (one pair per row, as pairs_per_row=1) and
the loss's own summed log-probs (`losses.sequence_logprobs`), so the values equal the
on-the-fly reference's (tests/test_reference.py).
"""

import dataclasses
import hashlib
import io
import json
import time

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from llmjax import files
from llmjax.data import pipeline, preference
from llmjax.models import lora
from llmjax.train import losses
from llmjax.train import state as state_lib

DIR = 'reference_logps'
SPLITS = ('train', 'validation')


def _sha(*parts) -> str:
  h = hashlib.sha256()
  for p in parts:
    h.update(p if isinstance(p, bytes) else str(p).encode())
    h.update(b'\0')
  return h.hexdigest()


def _records_digest(source) -> str:
  """A hash of the records' texts (prompt and completions, not their file:line), in order."""
  h = hashlib.sha256()
  for i in range(len(source)):
    r = source[i]
    h.update(json.dumps([r.prompt, r.chosen, r.rejected], sort_keys=True).encode())
    h.update(b'\n')
  return f'{len(source)} records {h.hexdigest()}'


def _files(path: str, depth: int = 2) -> list:
  """The files of `path` (itself if a file), `depth` directory levels down: an HF dir is flat,
  an Orbax step two levels deep, and GCS has no cheap recursive listing."""
  p = epath.Path(path)
  if not p.is_dir():
    return [p]
  if depth == 0:
    return []
  return [f for x in sorted(p.iterdir()) for f in _files(x, depth - 1)]


def _files_digest(path: str) -> list:
  """[name, size, mtime] of the files under `path`."""
  p = epath.Path(path)
  out = []
  for x in _files(path):
    st = x.stat()
    out.append([str(x.relative_to(p)) if x != p else x.name, st.length, st.mtime])
  return out


def _tokenizer_digest(workdir: str) -> str:
  """The bytes of the run's tokenizer files (small: a .model or tokenizer.json)."""
  return _sha(*(x.read_bytes() for x in _files(pipeline.run_tokenizer_path(workdir))))


def _reference_identity(config) -> dict:
  hf_dir, params_dir = state_lib.reference_source(config)
  if hf_dir:
    return {'hf_dir': files.resolve(hf_dir), 'files': _files_digest(hf_dir)}
  if params_dir:
    from llmjax.train import checkpoint
    step = checkpoint.latest_step(params_dir)
    return {'params_dir': files.resolve(params_dir), 'step': step,
            'files': _files_digest(files.join(checkpoint.checkpoint_dir(params_dir), str(step)))}
  return {'init_seed': config.train.seed}


def cache_key(config, model_cfg, prepared: pipeline.Prepared, workdir: str) -> tuple[str, dict]:
  """(key, description): the hash naming the reference log-probs of this run's data,
  tokenizer and reference, and what went into it."""
  numerics = dataclasses.asdict(lora.without_lora(model_cfg))
  template = prepared.chat_template
  desc = {
      'data': {s: _records_digest(prepared.sources[s]) for s in SPLITS},
      'seq_len': config.data.seq_len,
      'tokenizer': _tokenizer_digest(workdir),
      'chat_template': _sha(template.source) if template is not None else '',
      'reference': _reference_identity(config),
      'model': numerics,
  }
  return _sha(json.dumps(desc, sort_keys=True, default=str))[:24], desc


def compute(trainer, config, model_cfg, prepared: pipeline.Prepared,
            log=print) -> dict[str, np.ndarray]:
  """{'train', 'validation'}: tables [records, 2] of the reference's summed completion
  log-probs (chosen, rejected), float32, NaN where the pipeline skips the pair. Every host
  computes its share of the rows and receives all of them."""
  began = time.time()
  params = state_lib.reference_params(trainer, config, model_cfg)

  def logps(params, batch):
    apply_fn = lambda p, tokens, **kw: trainer.model.apply({'params': p}, tokens, **kw)
    lp, _ = losses.sequence_logprobs(params, batch, apply_fn, num_segments=2,
                                     loss_chunk=config.train.get('loss_chunk', 0))
    return lp, batch['index']  # [B, 2], [B]

  rows = trainer.batch_sharding  # [B, T] arrays; `index` [B] is split over the same devices
  by_row = jax.sharding.NamedSharding(rows.mesh, jax.sharding.PartitionSpec(rows.spec[0]))
  shardings = lambda b: {k: rows if v.ndim == 2 else by_row for k, v in b.items()}
  fn = jax.jit(logps, in_shardings=(trainer.state_shardings.params, None))
  tables = {}
  for split in SPLITS:
    source = prepared.sources[split]
    table = np.full((len(source), 2), np.nan, np.float32)
    for b in preference.reference_batches(
        source, prepared.tokenizer, seq_len=config.data.seq_len,
        batch_size=config.train.batch_size, process_index=jax.process_index(),
        process_count=jax.process_count(), chat_template=prepared.chat_template):
      batch = {k: jax.make_array_from_process_local_data(shardings(b)[k], v)
               for k, v in b.items()}
      lp, index = (np.asarray(multihost_utils.process_allgather(x, tiled=True))
                   for x in fn(params, batch))
      keep = index >= 0
      table[index[keep]] = lp[keep]
    tables[split] = table
  del params
  n = sum(int(np.isfinite(t[:, 0]).sum()) for t in tables.values())
  log(f"reference log-probs: {n} pairs in {time.time() - began:.1f} s")
  return tables


def precomputed_logps(trainer, config, model_cfg, data_cfg, workdir: str,
                      log=print) -> dict[str, np.ndarray]:
  """The run's reference tables: read from WORKDIR/reference_logps/<key>.npz when a pass with
  the same key ran before (the reference is then not loaded at all), else computed
  (`compute`) and written there. data_cfg: the run's, its tokenizer_path resolved."""
  prepared = pipeline.prepare(data_cfg, workdir, jax.process_index())
  key, desc = cache_key(config, model_cfg, prepared, workdir)
  path = files.join(workdir, DIR, f'{key}.npz')
  if files.exists(path):
    with np.load(io.BytesIO(files.read_bytes(path))) as f:
      tables = {s: f[s] for s in SPLITS}
    log(f"reference log-probs: reusing {path} (same data, tokenizer and reference); the"
        " reference model is not loaded")
    return tables
  tables = compute(trainer, config, model_cfg, prepared, log)
  if jax.process_index() == 0:
    files.makedirs(files.join(workdir, DIR))
    buf = io.BytesIO()
    np.savez(buf, **tables)
    files.write_text(files.join(workdir, DIR, f'{key}.json'),
                     json.dumps(desc, indent=1, sort_keys=True, default=str))
    files.write_bytes(path, buf.getvalue())  # last: its presence means the pass completed
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('llmjax: reference log-probs written')
  log(f"reference log-probs: wrote {path}; training loads no reference model")
  return tables
