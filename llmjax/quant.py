"""Weight quantization: NF4 (QLoRA, bitsandbytes layout), int8 per-channel and int4 group-wise
absmax. Pure JAX.

NF4 follows bitsandbytes 0.50 (`bitsandbytes/functional.py: quantize_4bit, get_4bit_type`,
`bitsandbytes/backends/default/ops.py: quantize_4bit, quantize_blockwise`), which implements
QLoRA (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314, sections 2-3):

  * the tensor is flattened in row-major order and cut into blocks of `block_size` (64)
    values; the last block may be partial (bitsandbytes pads instead of refusing such shapes,
    and so do we);
  * each block keeps its float32 absmax; each value is divided by it (clipped to [-1, 1]) and
    mapped to the nearest of the 16 NF4 code values, by comparing with the 15 midpoints
    between sorted codes (`torch.bucketize(x, midpoints)`: a value exactly on a midpoint takes
    the lower code);
  * two 4-bit indices go into one uint8, element 2i in the HIGH nibble, element 2i+1 in the
    low nibble; an odd count is padded with one value 0.0 (code index 7);
  * double quantization (bitsandbytes' `compress_statistics=True`, QLoRA section 3): the
    per-block absmax values minus their mean are quantized again with 8-bit blockwise
    quantization (blocks of 256, bitsandbytes' signed "dynamic" code map from
    `create_dynamic_map`), keeping one float32 absmax per 256 blocks and the float32 mean
    ("offset").

bitsandbytes quantizes a torch Linear weight, which is [out, in]; its bytes are that array's
row-major flattening. llmjax kernels are [in, out], so a kernel whose bytes must equal a
bitsandbytes checkpoint's is quantized as `quantize_nf4(kernel.T)`; for our own use either
layout is fine and `qdot` takes the kernel as [in, out] (blocks then run along `out`).

int8 is per-output-channel absmax (LLM.int8's vector-wise quantization, bitsandbytes
`int8_vectorwise_quant` without outliers): q = round(w * 127 / absmax), scale = absmax / 127.
For an llmjax kernel [in..., out...] the channel axes are the out axes (`axis=-1` for [in, out]).

int4 is group-wise symmetric absmax along the input axis (groups of 128 input features by
default, GPTQ's / AWQ's group size, round to nearest), packed two values a byte: layout below.

One module serves QLoRA training (`model.base_quant` with adapters) and inference
(`python -m llmjax.quantize`): the same stored leaves, the same dequantize-in-the-matmul store
(`llmjax.models.layers.KERNEL_STORES`). Why not qwix (google/qwix 0.1.8, what MaxText and
Tunix use)? Read before writing this: qwix quantizes by intercepting a module's jnp/lax ops
(`qwix.quantize_model` with `QtRule`/`PtqProvider` regex rules over module paths) and stores
`QArray(qvalue, scale)` leaves with jnp.int4 / uint4 values; its NF4 (`numerics.fp_to_nf4`)
picks the nearest code by argmin per element, with no bitsandbytes block flattening, tie rule,
nibble order or double quantization, so its NF4 bytes are not a PEFT/bitsandbytes
checkpoint's, and QLoRA needs them to be (adapters trained over exactly the base PEFT
loads). Using qwix for int8/int4 only would give two quantization paths (interception for
inference, stores for QLoRA) and two checkpoint layouts for the same config key; and jnp.int4
arrays take a whole byte each on XLA:CPU and in Orbax, so int4 would cost int8's memory. qwix's
strengths (activation quantization, QAT, GPTQ/AWQ calibration) are beyond weight-only
round-to-nearest; it is the place to go when those are wanted.
"""

import math
from typing import Optional, Sequence, Union

import flax
import jax
import jax.numpy as jnp
import numpy as np

from llmjax.errors import ConfigError

# The 16 NF4 values, copied from bitsandbytes 0.50.2 `bitsandbytes/functional.py`
# `get_4bit_type('nf4')` (the same table is `_NF4_QUANT_TABLE` in
# `bitsandbytes/backends/utils.py` and `nf4_values` in csrc/cpu_ops.cpp). They are the
# quantiles of N(0, 1) with equal area per bin, normalised to [-1, 1], with an exact 0
# (`create_normal_map(offset=0.9677083, use_extra_value=True)`); sorted ascending.
NF4_CODE = np.array([
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
], dtype=np.float32)

NF4_ZERO_INDEX = 7  # NF4_CODE[7] == 0.0; the padding nibble of an odd-sized tensor
DEFAULT_BLOCK_SIZE = 64  # QLoRA's and bitsandbytes' default
ABSMAX_BLOCK_SIZE = 256  # bitsandbytes quantizes the absmax values in blocks of 256
# bitsandbytes refuses other 4-bit block sizes; we accept any positive size (tiny blocks make
# hand-checkable tests) but only these give tensors bitsandbytes can load.
BNB_BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def dynamic_map(max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
  """bitsandbytes' signed 8-bit "dynamic" code map from its formula, float32 [256], sorted.

  Port of `bitsandbytes.functional.create_dynamic_map(signed=True)` (Dettmers 2015,
  https://arxiv.org/abs/1511.04561): for e = 0..6 the values +-10^(e-6) * m for the 2^e
  midpoints m of linspace(0.1, 1, 2^e + 1), plus 0 and 1.0; min -0.993 (not -1), max 1.0.
  Computed in float64 and rounded once; bitsandbytes computes it in float32 with torch's
  vectorised linspace, whose last bit depends on the CPU's vector width, so its table can
  differ from this by an ulp. DYNAMIC_CODE (what we quantize with) is bitsandbytes' table.
  """
  non_sign_bits = total_bits - 1
  if 2**(non_sign_bits - max_exponent_bits) - 1 > 0:
    raise NotImplementedError('only the default dynamic map (max_exponent_bits=7) is ported')
  data = [0.0, 1.0]
  for i in range(max_exponent_bits):
    boundaries = np.linspace(0.1, 1.0, 2**(i + non_sign_bits - max_exponent_bits) + 1)
    means = (boundaries[:-1] + boundaries[1:]) / 2.0
    data += list(10.0**(-(max_exponent_bits - 1) + i) * means)
    data += list(-(10.0**(-(max_exponent_bits - 1) + i)) * means)
  data += [0.0] * (2**total_bits - len(data))
  return np.array(sorted(data), dtype=np.float32)


# bitsandbytes' `create_dynamic_map()` (0.50.2, torch 2.13, x86-64 CPU), the code of the 8-bit
# quantization of the absmax under double quantization; tests/test_quant.py checks it against
# the table stored by tools/make_quant_goldens.py and against dynamic_map() (within an ulp).
DYNAMIC_CODE = np.array([
    -0.99296874, -0.9789063, -0.96484375, -0.9507812, -0.93671876, -0.92265624,
    -0.9085938, -0.89453125, -0.8804687, -0.86640626, -0.85234374, -0.8382813,
    -0.82421875, -0.8101562, -0.79609376, -0.78203124, -0.7679688, -0.75390625,
    -0.7398437, -0.72578126, -0.7117188, -0.6976563, -0.68359375, -0.6695312,
    -0.65546876, -0.6414063, -0.6273438, -0.61328125, -0.5992187, -0.58515626,
    -0.5710938, -0.5570313, -0.54296875, -0.5289062, -0.5148437, -0.50078124,
    -0.4867187, -0.47265625, -0.45859373, -0.44453126, -0.43046874, -0.41640624,
    -0.40234375, -0.38828123, -0.37421876, -0.36015624, -0.34609374, -0.33203125,
    -0.31796873, -0.30390626, -0.28984374, -0.27578127, -0.26171875, -0.24765624,
    -0.23359375, -0.21953125, -0.20546874, -0.19140625, -0.17734376, -0.16328125,
    -0.14921875, -0.13515624, -0.12109375, -0.107031256, -0.09859375, -0.09578126,
    -0.092968754, -0.09015625, -0.08734375, -0.08453125, -0.08171876, -0.07890625,
    -0.07609375, -0.07328125, -0.070468746, -0.067656256, -0.06484375, -0.06203125,
    -0.059218753, -0.05640625, -0.05359375, -0.05078125, -0.04796875, -0.04515625,
    -0.042343747, -0.03953125, -0.036718752, -0.03390625, -0.03109375, -0.028281251,
    -0.02546875, -0.02265625, -0.019843752, -0.01703125, -0.01421875, -0.01140625,
    -0.00971875, -0.009156249, -0.00859375, -0.00803125, -0.00746875, -0.00690625,
    -0.00634375, -0.00578125, -0.0052187503, -0.0046562497, -0.00409375, -0.0035312497,
    -0.00296875, -0.00240625, -0.00184375, -0.0012812499, -0.0009437501, -0.00083125,
    -0.00071875006, -0.0006062501, -0.00049375003, -0.00038125002, -0.00026875004, -0.00015625001,
    -8.875e-05, -6.625e-05, -4.375e-05, -2.1249998e-05, -7.75e-06, -3.2500002e-06,
    -5.5000004e-07, 0.0, 5.5000004e-07, 3.2500002e-06, 7.75e-06, 2.1249998e-05,
    4.375e-05, 6.625e-05, 8.875e-05, 0.00015625001, 0.00026875004, 0.00038125002,
    0.00049375003, 0.0006062501, 0.00071875006, 0.00083125, 0.0009437501, 0.0012812499,
    0.00184375, 0.00240625, 0.00296875, 0.0035312497, 0.00409375, 0.0046562497,
    0.0052187503, 0.00578125, 0.00634375, 0.00690625, 0.00746875, 0.00803125,
    0.00859375, 0.009156249, 0.00971875, 0.01140625, 0.01421875, 0.01703125,
    0.019843752, 0.02265625, 0.02546875, 0.028281251, 0.03109375, 0.03390625,
    0.036718752, 0.03953125, 0.042343747, 0.04515625, 0.04796875, 0.05078125,
    0.05359375, 0.05640625, 0.059218753, 0.06203125, 0.06484375, 0.067656256,
    0.070468746, 0.07328125, 0.07609375, 0.07890625, 0.08171876, 0.08453125,
    0.08734375, 0.09015625, 0.092968754, 0.09578126, 0.09859375, 0.107031256,
    0.12109375, 0.13515624, 0.14921875, 0.16328125, 0.17734376, 0.19140625,
    0.20546874, 0.21953125, 0.23359375, 0.24765624, 0.26171875, 0.27578127,
    0.28984374, 0.30390626, 0.31796873, 0.33203125, 0.34609374, 0.36015624,
    0.37421876, 0.38828123, 0.40234375, 0.41640624, 0.43046874, 0.44453126,
    0.45859373, 0.47265625, 0.4867187, 0.50078124, 0.5148437, 0.5289062,
    0.54296875, 0.5570313, 0.5710938, 0.58515626, 0.5992187, 0.61328125,
    0.6273438, 0.6414063, 0.65546876, 0.6695312, 0.68359375, 0.6976563,
    0.7117188, 0.72578126, 0.7398437, 0.75390625, 0.7679688, 0.78203124,
    0.79609376, 0.8101562, 0.82421875, 0.8382813, 0.85234374, 0.86640626,
    0.8804687, 0.89453125, 0.9085938, 0.92265624, 0.93671876, 0.9507812,
    0.96484375, 0.9789063, 0.99296874, 1,
], dtype=np.float32)


@flax.struct.dataclass
class NF4Tensor:
  """An NF4-quantized tensor; a pytree whose leaves are the arrays below.

  n = prod(shape) values, nb = ceil(n / block_size) blocks. Exactly one of `absmax` and
  (`absmax_q`, `absmax_scale`, `absmax_offset`) is set.
  """
  data: jax.Array  # uint8 [ceil(n / 2)]: element 2i in the high nibble, 2i+1 in the low one
  absmax: Optional[jax.Array]  # float32 [nb]; None with double quantization
  absmax_q: Optional[jax.Array]  # uint8 [nb]: DYNAMIC_CODE indices of (absmax - offset)
  absmax_scale: Optional[jax.Array]  # float32 [ceil(nb / 256)]: absmax of each 256-block
  absmax_offset: Optional[jax.Array]  # float32 []: mean of the absmax values
  shape: tuple = flax.struct.field(pytree_node=False)
  dtype: np.dtype = flax.struct.field(pytree_node=False)  # dtype of the original tensor
  block_size: int = flax.struct.field(pytree_node=False, default=DEFAULT_BLOCK_SIZE)

  @property
  def double_quant(self) -> bool:
    return self.absmax is None

  @property
  def nbytes(self) -> int:
    """Bytes of all arrays held (what the quantized tensor costs in memory)."""
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(self))


@flax.struct.dataclass
class Int8Tensor:
  """An int8 per-channel-quantized tensor: w ~= values * scale."""
  values: jax.Array  # int8 [shape]
  scale: jax.Array  # float32, shape with every non-channel axis of size 1 (= absmax / 127)
  axis: tuple = flax.struct.field(pytree_node=False)  # the channel axes (non-negative)
  dtype: np.dtype = flax.struct.field(pytree_node=False)

  @property
  def shape(self) -> tuple:
    return tuple(self.values.shape)

  @property
  def nbytes(self) -> int:
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(self))


# ---------------------------------------------------------------------------------------------
# Checks (one-line ConfigErrors, raised from shapes and dtypes only, so they also work under jit)


def _check_float(w, name: str) -> None:
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise ConfigError(f'{name}: cannot quantize dtype {w.dtype}; only floating-point '
                      'weights (float32/bfloat16/float16) can be quantized.')
  if w.size == 0:
    raise ConfigError(f'{name}: cannot quantize an empty tensor of shape {tuple(w.shape)}.')


def _check_block_size(block_size, name: str, key: str = 'block_size') -> None:
  if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
    raise ConfigError(f'{name}: {key}={block_size!r} must be a positive integer '
                      f'(bitsandbytes uses one of {BNB_BLOCK_SIZES}; default '
                      f'{DEFAULT_BLOCK_SIZE}).')


def _check_out_dtype(dtype, name: str):
  dtype = jnp.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ConfigError(f'{name}: cannot dequantize to dtype {dtype}; pass a floating-point '
                      'dtype such as jnp.bfloat16 or jnp.float32.')
  return dtype


# ---------------------------------------------------------------------------------------------
# Blockwise absmax quantization onto a sorted code table (shared by NF4 and the 8-bit absmax)


def _blockwise_quantize(flat: jax.Array, code: np.ndarray, block_size: int):
  """Nearest-code indices of flat / absmax(block), and the absmax of each block.

  flat float32 [n] -> (indices int32 [n], absmax float32 [nb]). As bitsandbytes'
  reference backend: full blocks are scaled by the reciprocal 1 / absmax, the
  partial last block is divided by it; the scaled value is clipped to [-1, 1] and bucketized
  on the midpoints of the sorted code (ties go to the lower code).
  """
  n = flat.shape[0]
  nb = -(-n // block_size)
  full = n - n % block_size
  padded = jnp.pad(flat, (0, nb * block_size - n))
  blocks = padded.reshape(nb, block_size)  # [nb, block_size]
  # The zero padding cannot raise an absmax, so the partial block's absmax is exact.
  absmax = jnp.max(jnp.abs(blocks), axis=-1)  # [nb]
  # bitsandbytes scales by 1 / max(absmax, 1e-38), so an all-zero block scales to 0 (code 0.0).
  # 1e-38 is a float32 subnormal, which XLA flushes to 0 (and 0 * (1 / 0) is NaN), so an all-zero
  # block is set to 0 explicitly instead.
  nonzero = absmax[:, None] > 0  # [nb, 1]
  safe = jnp.where(nonzero, absmax[:, None], 1.0)  # [nb, 1]
  scaled = blocks * (1.0 / safe)  # [nb, block_size]
  if full < n:
    # The partial block is divided (x / absmax can sit on a midpoint where x * (1 / absmax)
    # is one float above it). XLA rewrites A / broadcast(B) into A * broadcast(1 / B), so the
    # divisor is broadcast behind an optimization barrier to keep a true division.
    divisor = jax.lax.optimization_barrier(jnp.broadcast_to(safe[-1], (block_size,)))
    scaled = scaled.at[-1].set(blocks[-1] / divisor)
  scaled = jnp.clip(jnp.where(nonzero, scaled, 0.0), -1.0, 1.0)
  midpoints = jnp.asarray((code[:-1] + code[1:]) / np.float32(2.0))  # float32 [len(code) - 1]
  # searchsorted 'left' == torch.bucketize(right=False): midpoints[i-1] < x <= midpoints[i].
  # compare_all (one compare per midpoint, no gathers) is fastest for NF4's 15 midpoints;
  # the 255 of the dynamic map only see the few absmax values, where 'scan' is fine.
  method = 'compare_all' if len(code) <= 16 else 'scan'
  idx = jnp.searchsorted(midpoints, scaled.reshape(-1), side='left', method=method)
  return idx[:n].astype(jnp.int32), absmax


def _blockwise_dequantize(idx: jax.Array, absmax: jax.Array, code: np.ndarray,
                          block_size: int) -> jax.Array:
  """code[idx] * absmax(block), float32 [n] (bitsandbytes multiplies in float32)."""
  n = idx.shape[0]
  nb = absmax.shape[0]
  values = jnp.pad(jnp.asarray(code)[idx], (0, nb * block_size - n))
  return (values.reshape(nb, block_size) * absmax[:, None]).reshape(-1)[:n]


def quantize_blockwise_8bit(x: jax.Array, block_size: int = ABSMAX_BLOCK_SIZE):
  """bitsandbytes' quantize_blockwise with its dynamic map: x float32 [n] -> (uint8 [n],
  float32 absmax [ceil(n / block_size)]). Used for the absmax under double quantization."""
  idx, absmax = _blockwise_quantize(x.astype(jnp.float32), DYNAMIC_CODE, block_size)
  return idx.astype(jnp.uint8), absmax


def dequantize_blockwise_8bit(q: jax.Array, absmax: jax.Array,
                              block_size: int = ABSMAX_BLOCK_SIZE) -> jax.Array:
  """Inverse of quantize_blockwise_8bit: DYNAMIC_CODE[q] * absmax(block), float32 [n]."""
  return _blockwise_dequantize(q.astype(jnp.int32), absmax, DYNAMIC_CODE, block_size)


# ---------------------------------------------------------------------------------------------
# NF4


def quantize_nf4(w: jax.Array,
                 block_size: int = DEFAULT_BLOCK_SIZE,
                 double_quant: bool = False,
                 name: str = 'weight') -> NF4Tensor:
  """NF4-quantizes w (any shape, float) as bitsandbytes' quantize_4bit(quant_type='nf4').

  w is flattened row-major (as bitsandbytes flattens a torch weight); `double_quant` is
  bitsandbytes' `compress_statistics`. `name` names the tensor in error messages.
  Shapes not divisible by block_size are fine (partial last block, as bitsandbytes).
  """
  w = jnp.asarray(w)
  _check_float(w, name)
  _check_block_size(block_size, name)
  flat = w.reshape(-1).astype(jnp.float32)  # bitsandbytes: A.reshape(-1).float()
  idx, absmax = _blockwise_quantize(flat, NF4_CODE, block_size)  # [n], [nb]
  if idx.shape[0] % 2:
    idx = jnp.pad(idx, (0, 1), constant_values=NF4_ZERO_INDEX)
  nibbles = idx.astype(jnp.uint8).reshape(-1, 2)  # [ceil(n/2), 2]
  data = (nibbles[:, 0] << 4) | nibbles[:, 1]  # uint8 [ceil(n/2)]
  fields = dict(data=data, absmax=absmax, absmax_q=None, absmax_scale=None, absmax_offset=None)
  if double_quant:
    # bitsandbytes: offset = absmax.mean(); quantize_blockwise(absmax - offset, blocksize=256)
    # with the dynamic map. (The float32 mean may differ from torch's in the last ulp, as the
    # summation order differs; that moves the dequantized absmax by about an ulp.)
    offset = jnp.mean(absmax)
    absmax_q, absmax_scale = quantize_blockwise_8bit(absmax - offset)
    fields.update(absmax=None, absmax_q=absmax_q, absmax_scale=absmax_scale,
                  absmax_offset=offset)
  return NF4Tensor(**fields, shape=tuple(w.shape), dtype=jnp.dtype(w.dtype),
                   block_size=block_size)


def nf4_absmax(q: NF4Tensor) -> jax.Array:
  """The per-block absmax float32 [nb]; dequantized first under double quantization.

  bitsandbytes: dequantize_blockwise(absmax_q, state2) + offset, in float32.
  """
  if not q.double_quant:
    return q.absmax
  return dequantize_blockwise_8bit(q.absmax_q, q.absmax_scale) + q.absmax_offset


def nf4_indices(q: NF4Tensor) -> jax.Array:
  """The NF4 code indices int32 [n] (unpacked; high nibble first)."""
  n = math.prod(q.shape)
  pairs = jnp.stack([q.data >> 4, q.data & 0xF], axis=-1)  # [ceil(n/2), 2]
  return pairs.reshape(-1)[:n].astype(jnp.int32)


def dequantize_nf4(q: NF4Tensor, dtype=None) -> jax.Array:
  """The tensor back, [q.shape] in `dtype` (default: the original dtype).

  code[index] * absmax is computed in float32 and then cast, as bitsandbytes does.
  """
  dtype = _check_out_dtype(q.dtype if dtype is None else dtype, 'dequantize_nf4')
  values = _blockwise_dequantize(nf4_indices(q), nf4_absmax(q), NF4_CODE, q.block_size)
  return values.reshape(q.shape).astype(dtype)


# ---------------------------------------------------------------------------------------------
# int8 per-channel


def _channel_axes(axis, ndim: int, name: str) -> tuple:
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  if not axes or any(not -ndim <= a < ndim for a in axes):
    raise ConfigError(f'{name}: channel axis={axis!r} is out of range for a {ndim}-d tensor; '
                      'pass the output-feature axes (axis=-1 for an [in, out] kernel).')
  axes = tuple(sorted({a % ndim for a in axes}))
  return axes


def quantize_int8(w: jax.Array, axis: Union[int, Sequence[int]] = -1,
                  name: str = 'weight') -> Int8Tensor:
  """int8 absmax quantization with one float32 scale per channel.

  `axis`: the channel axes, kept in the scale (the output-feature axes: -1 for an llmjax
  [in, out] kernel, the trailing out axes for [in..., out...]); the absmax is taken over all
  other axes. values = round(w * 127 / absmax) (round half to even, as torch.round), scale =
  absmax / 127; an all-zero channel gets scale 0 and values 0.
  """
  w = jnp.asarray(w)
  _check_float(w, name)
  axes = _channel_axes(axis, w.ndim, name)
  reduce_axes = tuple(a for a in range(w.ndim) if a not in axes)
  w32 = w.astype(jnp.float32)
  absmax = jnp.max(jnp.abs(w32), axis=reduce_axes, keepdims=True)  # channel axes kept
  # bitsandbytes int8_vectorwise_quant: round(A * (127 / absmax)).
  ratio = jnp.where(absmax > 0, 127.0 / jnp.where(absmax > 0, absmax, 1.0), 0.0)
  values = jnp.clip(jnp.round(w32 * ratio), -127, 127).astype(jnp.int8)
  return Int8Tensor(values=values, scale=absmax / 127.0, axis=axes, dtype=jnp.dtype(w.dtype))


def dequantize_int8(q: Int8Tensor, dtype=None) -> jax.Array:
  """values * scale in float32, cast to `dtype` (default: the original dtype)."""
  dtype = _check_out_dtype(q.dtype if dtype is None else dtype, 'dequantize_int8')
  return (q.values.astype(jnp.float32) * q.scale).astype(dtype)


# ---------------------------------------------------------------------------------------------
# Matmul


def qdot(x: jax.Array, q: Union[NF4Tensor, Int8Tensor], dtype=jnp.bfloat16,
         in_ndim: int = 1) -> jax.Array:
  """x @ W for a quantized kernel W [in..., out...], float32 result [tokens, out...].

  x: [tokens, in] with in = prod(W.shape[:in_ndim]). The kernel is dequantized in the compute
  `dtype` and contracted with x (cast to `dtype`) with float32 accumulation. This is a plain
  dequantize-then-dot: under jax.jit XLA fuses the dequantization into the dot's operand, so
  the full-precision kernel is not kept around between steps; a Pallas kernel that
  dequantizes tile by tile can replace it without changing callers.

  Differentiable w.r.t. x; the quantized weights get no gradient (stop_gradient), as in
  QLoRA where only the adapters train.
  """
  if isinstance(q, NF4Tensor):
    w = dequantize_nf4(q, dtype)
  elif isinstance(q, Int8Tensor):
    w = dequantize_int8(q, dtype)
  else:
    raise TypeError(f'qdot: expected an NF4Tensor or Int8Tensor, got {type(q).__name__}')
  shape = tuple(q.shape)
  if not 1 <= in_ndim < len(shape):
    raise ConfigError(f'qdot: in_ndim={in_ndim} must be between 1 and {len(shape) - 1} for a '
                      f'kernel of shape {shape}.')
  d_in = math.prod(shape[:in_ndim])
  if x.ndim != 2 or x.shape[1] != d_in:
    raise ConfigError(f'qdot: x has shape {tuple(x.shape)} but the kernel {shape} needs '
                      f'[tokens, {d_in}]; reshape x to 2-d first.')
  w = jax.lax.stop_gradient(w).reshape(d_in, -1)  # [in, out]
  y = jnp.einsum('ti,io->to', x.astype(dtype), w, preferred_element_type=jnp.float32)
  return y.reshape(x.shape[0], *shape[in_ndim:])  # [tokens, out...]


# ---------------------------------------------------------------------------------------------
# Memory accounting (for llmjax.plan)


def nf4_bytes_per_param(block_size: int = DEFAULT_BLOCK_SIZE, double_quant: bool = False) -> float:
  """Asymptotic bytes per parameter of NF4 (large tensors; padding and offset ignored).

  0.5 (a nibble) + 4 / block_size (float32 absmax); with double quantization the absmax costs
  1 / block_size (uint8) + 4 / (256 * block_size) (float32 absmax of the absmax). QLoRA's
  numbers for block 64: 0.5 + 0.0625 = 0.5625 and 0.5 + 0.0158 = 0.5159.
  """
  _check_block_size(block_size, 'nf4_bytes_per_param')
  if double_quant:
    return 0.5 + 1 / block_size + 4 / (ABSMAX_BLOCK_SIZE * block_size)
  return 0.5 + 4 / block_size


def int8_bytes_per_param(values_per_scale: int) -> float:
  """Bytes per parameter of int8 per-channel: 1 + 4 / values_per_scale.

  values_per_scale is the number of values sharing one float32 scale, i.e. the product of the
  non-channel axes: `in` for an [in, out] kernel quantized per output channel (one scale per
  output column of `in` values).
  """
  if values_per_scale < 1:
    raise ConfigError(f'int8_bytes_per_param: values_per_scale={values_per_scale} must be >= 1.')
  return 1 + 4 / values_per_scale


def nf4_nbytes(shape: Sequence[int], block_size: int = DEFAULT_BLOCK_SIZE,
               double_quant: bool = False) -> int:
  """Exact bytes of quantize_nf4 of a tensor of `shape` (equals NF4Tensor.nbytes)."""
  _check_block_size(block_size, 'nf4_nbytes')
  n = math.prod(shape)
  nb = -(-n // block_size)
  if double_quant:
    return -(-n // 2) + nb + 4 * -(-nb // ABSMAX_BLOCK_SIZE) + 4
  return -(-n // 2) + 4 * nb


def int8_nbytes(shape: Sequence[int], axis: Union[int, Sequence[int]] = -1) -> int:
  """Exact bytes of quantize_int8 of a tensor of `shape` (equals Int8Tensor.nbytes)."""
  axes = _channel_axes(axis, len(shape), 'int8_nbytes')
  return math.prod(shape) + 4 * math.prod(shape[a] for a in axes)


# ----------------------------------------------------------------- NF4 in a TPU-friendly layout
# The same blocks, absmax and codes as `quantize_nf4` (so `dequantize_nf4_rows` equals
# `dequantize_nf4` bit for bit), laid out for a model's kernels: the leading axes whose
# remainder splits into whole blocks are kept (so the packed leaf shards like the kernel), each
# row packed with its first half in the high nibbles and its second half in the low ones
# (bitsandbytes pairs neighbours, which needs a [..., 2] axis that the TPU pads to 128 lanes:
# 64 x the memory), and everything elementwise (15 compares to quantize, a tree of selects to
# look codes up: no searchsorted, no gather). The model's QLoRA store uses these
# (`llmjax.models.layers`); so can inference.


def nf4_split(shape: Sequence[int], block_size: int) -> int:
  """k: how many leading axes of a kernel of `shape` the row layout keeps: the most whose
  remainder is a whole number of blocks (0: the kernel flat, its last block maybe partial)."""
  for k in range(len(shape) - 1, 0, -1):
    if math.prod(shape[k:]) % block_size == 0:
      return k
  return 0


def _nf4_rows(x: jax.Array, shape, block_size: int) -> jax.Array:
  """x [shape] -> [lead..., nb, block_size] (zero-padded when k = 0 and blocks are partial)."""
  k = nf4_split(shape, block_size)
  tail = math.prod(shape[k:])
  nb = -(-tail // block_size)
  x = x.reshape(tuple(shape[:k]) + (tail,))
  if nb * block_size != tail:
    x = jnp.pad(x, [(0, 0)] * k + [(0, nb * block_size - tail)])
  return x.reshape(tuple(shape[:k]) + (nb, block_size))


def quantize_nf4_rows(kernel: jax.Array, block_size: int = DEFAULT_BLOCK_SIZE,
                      double_quant: bool = False) -> dict:
  """kernel [shape] -> {'data': uint8 [lead..., nb * bs / 2], 'absmax': float32 [lead..., nb]}
  (with double_quant: 'absmax_q' uint8 [lead..., nb], 'absmax_scale' [blocks of 256],
  'absmax_offset' []) in the row layout above."""
  bs = block_size
  shape = kernel.shape
  blocks = _nf4_rows(kernel.astype(jnp.float32), shape, bs)  # [lead..., nb, bs]
  absmax = jnp.max(jnp.abs(blocks), axis=-1)  # [lead..., nb]
  nonzero = absmax[..., None] > 0
  safe = jnp.where(nonzero, absmax[..., None], 1.0)
  scaled = blocks * (1.0 / safe)
  if blocks.size != math.prod(shape):  # quant: the partial last block is divided instead
    last = jax.lax.optimization_barrier(jnp.broadcast_to(safe[..., -1, :], (bs,)))
    scaled = scaled.at[..., -1, :].set(blocks[..., -1, :] / last)
  scaled = jnp.clip(jnp.where(nonzero, scaled, 0.0), -1.0, 1.0)
  code = NF4_CODE
  idx = jnp.zeros(scaled.shape, jnp.uint8)
  for m in (code[:-1] + code[1:]) / np.float32(2.0):  # searchsorted 'left': #midpoints < x
    idx = idx + (scaled > m).astype(jnp.uint8)
  idx = idx.reshape(idx.shape[:-2] + (-1,))  # [lead..., nb * bs]
  half = idx.shape[-1] // 2
  out = {'data': (idx[..., :half] << 4) | idx[..., half:]}
  if double_quant:
    offset = jnp.mean(absmax.reshape(-1))  # flat, as quant: the same summation order
    q, scale = quantize_blockwise_8bit((absmax - offset).reshape(-1))
    out.update(absmax_q=q.reshape(absmax.shape), absmax_scale=scale, absmax_offset=offset)
  else:
    out['absmax'] = absmax
  return out


def lookup_code(idx: jax.Array, code) -> jax.Array:
  """code[idx] float32 as a tree of selects on the bits of idx (len(code) a power of 2).

  Equal to the gather `jnp.asarray(code)[idx]` (a select copies the value), but elementwise:
  XLA fuses it into the consumer, where the TPU compiler turns a gather from a small table
  into a one-hot contraction with a [n, len(code)] float32 temporary (64 bytes a weight for
  NF4's 16 codes: 17 GiB for two Llama-3-8B layers, `llmjax.plan`)."""
  level = [jnp.float32(c) for c in code]
  for bit in range(int(math.log2(len(code)))):
    on = ((idx >> bit) & 1).astype(bool)
    level = [jnp.where(on, level[2 * i + 1], level[2 * i]) for i in range(len(level) // 2)]
  return level[0]


def dequantize_nf4_rows(leaves: dict, shape: Sequence[int], block_size: int = DEFAULT_BLOCK_SIZE,
                        dtype=jnp.float32) -> jax.Array:
  """The kernel [shape] in `dtype` from `quantize_nf4_rows`' leaves, without gathers."""
  n, bs = math.prod(shape), block_size
  data = leaves['data']  # [lead..., half]
  idx = jnp.concatenate([data >> 4, data & 0xF], axis=-1)  # [lead..., nb * bs]
  if 'absmax' in leaves:
    absmax = leaves['absmax']  # [lead..., nb]
  else:  # double quantization: DYNAMIC_CODE[q] * scale(256-block) + offset, as nf4_absmax
    q = leaves['absmax_q']
    flat_q = q.reshape(-1)
    scale = jnp.repeat(leaves['absmax_scale'], ABSMAX_BLOCK_SIZE)[:flat_q.shape[0]]
    absmax = (lookup_code(flat_q, DYNAMIC_CODE) * scale
              + leaves['absmax_offset']).reshape(q.shape)
  values = lookup_code(idx, NF4_CODE).reshape(absmax.shape + (bs,)) * absmax[..., None]
  values = values.reshape(values.shape[:-2] + (-1,))  # [lead..., nb * bs]
  if values.size != n:  # k = 0 with a partial block: drop the padding
    values = values.reshape(-1)[:n]
  return values.reshape(shape).astype(dtype)


# ------------------------------------------------------------------ int4 group-wise absmax
# Symmetric absmax per group of `group_size` consecutive input features of one output channel
# (GPTQ's and AWQ's "group size", without their error-correcting search: round to nearest):
# scale = absmax(group) / 7, q = round(w / scale) in [-7, 7] (round half to even; -8 unused, so
# the grid is symmetric and 0 is exact), w ~= q * scale. An all-zero group gets scale 0.
#
# Layout of a kernel [in..., out...] with in = prod(in...) (in % group_size == 0):
#   values uint8   [in / 2, out...]          two 4-bit values a byte, stored as q + 8 in [1, 15]
#   scale  float32 [in / group_size, out...]
# Within each group the first half's values sit in the high nibbles and the second half's in
# the low ones (NF4 rows' packing: no [..., 2] axis, which the TPU pads to 128 lanes), so a
# group's bytes are consecutive rows: the packed leaf keeps the kernel's out axes whole and
# cuts its (flattened) input axis only at group boundaries, so it shards as the kernel does
# (FSDP over the input axis when in / group_size divides by the mesh, tensor parallel over the
# out axes) and dequantizes with no communication. Packed bytes rather than jnp.int4 arrays:
# XLA:CPU and Orbax store an int4 element in a whole byte, which would make "int4" cost int8's
# memory; uint8 pairs cost half a byte everywhere.

INT4_MAX = 7
DEFAULT_GROUP_SIZE = 128  # GPTQ's and AWQ's default group size


def check_group_size(group_size, d_in: int, name: str, key: str = 'group_size') -> None:
  """One-line ConfigError unless group_size is an even positive divisor of d_in."""
  if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2 or group_size % 2:
    raise ConfigError(f'{name}: {key}={group_size!r} must be an even integer >= 2 '
                      f'(default {DEFAULT_GROUP_SIZE}).')
  if d_in % group_size:
    fits = [g for g in (256, 128, 64, 32, 16, 8, 4, 2) if d_in % g == 0 and g < group_size]
    hint = f'e.g. {fits[0]}' if fits else 'an even one'
    raise ConfigError(f'{name}: {key}={group_size} does not divide the input size {d_in}; '
                      f'pass a divisor of it ({hint}).')


def quantize_int4(kernel: jax.Array, n_in: int = 1, group_size: int = DEFAULT_GROUP_SIZE,
                  name: str = 'weight') -> dict:
  """kernel [in..., out...] (the first n_in axes are inputs) -> {'values': uint8 [in / 2,
  out...], 'scale': float32 [in / group_size, out...]} in the layout above."""
  kernel = jnp.asarray(kernel)
  _check_float(kernel, name)
  shape = tuple(kernel.shape)
  d_in, out = math.prod(shape[:n_in]), shape[n_in:]
  check_group_size(group_size, d_in, name)
  g = group_size
  w = kernel.astype(jnp.float32).reshape(d_in // g, g, -1)  # [groups, g, out]
  absmax = jnp.max(jnp.abs(w), axis=1, keepdims=True)  # [groups, 1, out]
  # absmax * float32(1/7), not absmax / 7: XLA rewrites a division by a constant into that
  # product on some backends only, so writing it out gives the same scale everywhere.
  scale = absmax * np.float32(1 / INT4_MAX)
  nonzero = scale > 0
  q = jnp.where(nonzero, w / jnp.where(nonzero, scale, 1.0), 0.0)
  q = (jnp.clip(jnp.round(q), -INT4_MAX, INT4_MAX) + 8).astype(jnp.uint8)  # [groups, g, out]
  packed = (q[:, :g // 2] << 4) | q[:, g // 2:]  # [groups, g / 2, out]
  return {'values': packed.reshape((d_in // 2,) + out),
          'scale': scale.reshape((d_in // g,) + out)}


def dequantize_int4(leaves: dict, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
  """The kernel [shape] in `dtype` from `quantize_int4`'s leaves: q * scale in float32."""
  packed, scale = leaves['values'], leaves['scale']
  out = tuple(packed.shape[1:])
  d_in = 2 * packed.shape[0]
  groups = scale.shape[0]
  half = d_in // groups // 2
  p = packed.reshape(groups, half, -1)  # [groups, g / 2, out]
  q = jnp.concatenate([p >> 4, p & 0xF], axis=1).astype(jnp.int32) - 8  # [groups, g, out]
  w = q.astype(jnp.float32) * scale.reshape(groups, 1, -1)
  assert math.prod(shape) == w.size and tuple(shape[len(shape) - len(out):]) == out, (shape, out)
  return w.reshape(shape).astype(dtype)


def int4_nbytes(shape: Sequence[int], n_in: int = 1,
                group_size: int = DEFAULT_GROUP_SIZE) -> int:
  """Exact bytes of quantize_int4 of a kernel of `shape`: in * out / 2 + 4 * in / g * out."""
  n = math.prod(shape)
  return n // 2 + 4 * n // group_size


def int4_bytes_per_param(group_size: int = DEFAULT_GROUP_SIZE) -> float:
  """0.5 (a nibble) + 4 / group_size (a float32 scale per group): 0.53125 at 128."""
  return 0.5 + 4 / group_size
