"""Builds the bitsandbytes NF4 goldens under tests/golden/quant/ (tests/test_quant.py reads them).

    /tmp/hf/bin/python tools/make_quant_goldens.py

Runs in a Python with torch + bitsandbytes (>= 0.49, whose CPU backend does quantize_4bit;
never the test suite's venv). For each case (seeded inputs, float32, some sizes not divisible
by the block size and one of odd length) it stores, in <case>.npz:
    w            the input, float16 [shape] (quantized as float32)
    packed       bitsandbytes' packed bytes, uint8 [ceil(n/2)] (its [ceil(n/2), 1] flattened)
    absmax       per-block absmax, float32 [nb]           (compress_statistics=False)
    dequant      dequantize_4bit of it, float32 [shape] (small cases only)
    dq_packed, dq_absmax_q uint8 [nb], dq_absmax_scale float32 [ceil(nb/256)],
    dq_offset float32 [], dq_absmax float32 [nb] (the dequantized absmax), dq_dequant [shape]
                 the same with compress_statistics=True
and dynamic_code.npz holds `create_dynamic_map()` float32 [256].

Two bitsandbytes paths are recorded, in two processes:
  * `native/`: bitsandbytes as installed. On CPU its 4-bit quantization is the pure-torch
    reference backend (`backends/default/ops.py`), but the 8-bit quantize_blockwise used for
    the double-quantized absmax is the C++ CPU kernel, which since 0.50 looks indices up in a
    65536-bin table over [-1, 1] (csrc/cpu_ops.cpp `build_quantize_lut`) - an approximation
    of nearest-code rounding that differs from the CUDA kernel for values closer than 3e-5
    to a midpoint or to 0.
  * `reference/`: bitsandbytes with its native CPU library hidden, so every op runs the
    pure-torch reference backend (exact nearest code via midpoints), which is the rounding the
    CUDA kernels implement and llmjax.quant follows.
"""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, 'tests', 'golden', 'quant')

# name: (shape, block_size, seed, scale). Small, so the .npz files stay a few KB.
CASES = {
    'b64_8x64': ((8, 64), 64, 0, 1.0),
    'b64_ragged_5x37': ((5, 37), 64, 1, 0.02),  # 185 values: a partial block, odd count
    'b32_3x96': ((3, 96), 32, 2, 3.0),
    'b128_2x200': ((2, 200), 128, 3, 0.5),
    # 264 blocks of 32: two 256-blocks of absmax for the double quantization (one partial).
    'b32_dq2_66x128': ((66, 128), 32, 4, 0.05),
}


def build(kind: str) -> None:
  if kind == 'reference':
    # Hide libbitsandbytes_cpu so bitsandbytes registers no native CPU kernels and runs its
    # pure-torch reference ops (it falls back to them when the library does not load).
    import ctypes
    real_load = ctypes.cdll.LoadLibrary

    def load(path):
      if 'libbitsandbytes' in str(path):
        raise OSError('hidden by make_quant_goldens.py')
      return real_load(path)

    ctypes.cdll.LoadLibrary = load

  import numpy as np
  import torch
  import bitsandbytes
  import bitsandbytes.functional as F
  from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib

  assert isinstance(lib, ErrorHandlerMockBNBNativeLibrary) == (kind == 'reference'), lib
  out_dir = os.path.join(OUT, kind)
  os.makedirs(out_dir, exist_ok=True)
  np.savez(os.path.join(out_dir, 'dynamic_code.npz'), code=F.create_dynamic_map().numpy())
  for name, (shape, block_size, seed, scale) in CASES.items():
    g = torch.Generator().manual_seed(seed)
    # float16-representable values, stored as float16 to keep the files small.
    w = (torch.randn(shape, generator=g, dtype=torch.float32) * scale).half().float()
    if name == 'b64_8x64':
      w[3] = 0.0  # an all-zero block
    packed, state = F.quantize_4bit(w, blocksize=block_size, quant_type='nf4')
    dequant = F.dequantize_4bit(packed, state)
    dq_packed, dq_state = F.quantize_4bit(w, blocksize=block_size, quant_type='nf4',
                                          compress_statistics=True)
    dq_dequant = F.dequantize_4bit(dq_packed, dq_state)
    dq_absmax = F.dequantize_blockwise(dq_state.absmax, dq_state.state2) + dq_state.offset
    assert dq_state.state2.blocksize == 256
    # The large case is there for the double quantization; its plain dequantization (checked
    # on the small cases) is left out to keep the file small.
    plain = dict(dequant=dequant.numpy()) if w.numel() < 4096 else {}
    np.savez(
        os.path.join(out_dir, f'{name}.npz'),
        w=w.half().numpy(), block_size=np.int32(block_size),
        packed=packed.reshape(-1).numpy(), absmax=state.absmax.numpy(), **plain,
        dq_packed=dq_packed.reshape(-1).numpy(), dq_absmax_q=dq_state.absmax.numpy(),
        dq_absmax_scale=dq_state.state2.absmax.numpy(),
        dq_offset=np.float32(dq_state.offset.item()), dq_absmax=dq_absmax.numpy(),
        dq_dequant=dq_dequant.numpy())
  with open(os.path.join(out_dir, 'VERSION'), 'w') as f:
    f.write(f'bitsandbytes {bitsandbytes.__version__}, torch {torch.__version__}\n')
  print(f'{kind}: wrote {len(CASES)} cases to {out_dir}')


if __name__ == '__main__':
  if len(sys.argv) > 1:
    build(sys.argv[1])
  else:
    for kind in ('native', 'reference'):
      subprocess.run([sys.executable, __file__, kind], check=True)
