"""Lazy reading and sharded writing of Hugging Face safetensors checkpoints (no torch).

A checkpoint directory holds either one `model.safetensors` or shards
`model-0000i-of-0000N.safetensors` listed by `model.safetensors.index.json`
({"metadata": {"total_size": bytes}, "weight_map": {tensor name: shard file}}).
`Reader` opens every file's header up front (cheap: the header is a few KB of JSON; the data is
memory-mapped), so a missing shard or a truncated file is reported before any tensor is read,
and reads only the region of a tensor that is asked for.
"""

import json
import os
from typing import Iterable

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from llmjax.errors import CheckpointError

SINGLE_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'

# safetensors dtype names we can load. bfloat16 comes back as ml_dtypes.bfloat16 from the numpy
# backend (safetensors >= 0.4.4); older versions cannot, hence the check in `Reader.__init__`.
DTYPES = {'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16, 'F64': np.float64}


class Reader:
  """Tensors of a checkpoint directory by name, read lazily.

  Attributes:
    shapes: {name: shape} of every tensor (from the headers only).
    dtypes: {name: safetensors dtype string, e.g. 'BF16'}.
  """

  def __init__(self, hf_dir: str, rename=lambda name: name):
    """`rename` maps a stored tensor name to the canonical one (e.g. GPT-2's missing prefix)."""
    self.hf_dir = hf_dir
    files = self._files(hf_dir)
    self._handles = {}
    self._where: dict[str, tuple[str, str]] = {}  # canonical name -> (file, stored name)
    self.shapes: dict[str, tuple[int, ...]] = {}
    self.dtypes: dict[str, str] = {}
    for file in files:
      path = os.path.join(hf_dir, file)
      try:
        handle = safe_open(path, framework='numpy')
      except Exception as e:  # safetensors raises its own SafetensorError for corrupt files
        raise CheckpointError(f"{path} is truncated or not a safetensors file ({e}); download"
                              " it again.") from None
      self._handles[file] = handle
      for stored in handle.keys():
        name = rename(stored)
        sl = handle.get_slice(stored)
        self._where[name] = (file, stored)
        self.shapes[name] = tuple(sl.get_shape())
        self.dtypes[name] = sl.get_dtype()
    bad = sorted({f'{n} ({d})' for n, d in self.dtypes.items() if d not in DTYPES})
    if bad:
      raise CheckpointError(f"{hf_dir}: tensors of unsupported dtype {bad[:3]}; only float"
                            f" checkpoints ({', '.join(DTYPES)}) load; dequantize them first.")

  @staticmethod
  def _files(hf_dir: str) -> list[str]:
    index = os.path.join(hf_dir, INDEX_FILE)
    if os.path.exists(index):
      try:
        with open(index) as f:
          weight_map = json.load(f)['weight_map']
      except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{index} is not a safetensors index ({e}); it needs a"
                              " 'weight_map' of tensor name -> shard file.") from None
      files = sorted(set(weight_map.values()))
      missing = [f for f in files if not os.path.exists(os.path.join(hf_dir, f))]
      if missing:
        raise CheckpointError(f"{index} lists shards {missing} that are not in {hf_dir};"
                              " download the complete checkpoint.")
      return files
    if os.path.exists(os.path.join(hf_dir, SINGLE_FILE)):
      return [SINGLE_FILE]
    others = sorted(f for f in os.listdir(hf_dir) if f.endswith(('.bin', '.pt', '.pth', '.gguf')))
    hint = (f" (found {others[:3]}: convert them to safetensors with transformers first)"
            if others else "")
    raise CheckpointError(f"{hf_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}{hint}.")

  def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
    """The tensor `name`, or only its region `index` (one slice per axis), as numpy."""
    file, stored = self._where[name]
    sl = self._handles[file].get_slice(stored)
    region = sl[index] if index else sl[:]
    return np.asarray(region)

  def close(self) -> None:
    self._handles.clear()


def write_sharded(hf_dir: str, tensors: Iterable[tuple[str, np.ndarray]],
                  max_shard_bytes: int) -> list[str]:
  """Writes (name, array) pairs into shards of at most `max_shard_bytes` (a tensor larger
  than that gets a shard of its own), plus the index when there is more than one shard.

  Tensors are consumed one at a time, so at most one shard is held in host memory.
  Returns the file names written.
  """
  os.makedirs(hf_dir, exist_ok=True)
  # `format: pt` is what transformers' loader checks for in the shard metadata.
  metadata = {'format': 'pt'}
  temp_files, weight_files, shard, shard_bytes, total = [], {}, {}, 0, 0

  def flush():
    nonlocal shard, shard_bytes
    if shard:
      tmp = f'.shard-{len(temp_files):05d}.tmp'
      save_file(shard, os.path.join(hf_dir, tmp), metadata=metadata)
      temp_files.append((tmp, list(shard)))
    shard, shard_bytes = {}, 0

  for name, array in tensors:
    array = np.ascontiguousarray(array)
    if shard and shard_bytes + array.nbytes > max_shard_bytes:
      flush()
    shard[name] = array
    shard_bytes += array.nbytes
    total += array.nbytes
  flush()
  n = len(temp_files)
  names = ([SINGLE_FILE] if n == 1 else
           [f'model-{i + 1:05d}-of-{n:05d}.safetensors' for i in range(n)])
  for (tmp, keys), final in zip(temp_files, names):
    os.replace(os.path.join(hf_dir, tmp), os.path.join(hf_dir, final))
    weight_files.update({k: final for k in keys})
  index = os.path.join(hf_dir, INDEX_FILE)
  if n > 1:
    with open(index, 'w') as f:
      json.dump({'metadata': {'total_size': total}, 'weight_map': dict(sorted(weight_files.items()))},
                f, indent=2)
  elif os.path.exists(index):  # a stale index from an earlier export would shadow the file
    os.remove(index)
  return names
