"""llmjax.quant: NF4 against hand-made blocks and bitsandbytes 0.50.2 goldens; int8 per channel
against hand-computed values; qdot against x @ dequantize(q).

tests/golden/quant/{native,reference}/ (tools/make_quant_goldens.py) hold bitsandbytes'
quantize_4bit(quant_type='nf4') packed bytes, absmax and dequantize_4bit outputs, with and
without compress_statistics, from bitsandbytes as installed (`native`: its C++ CPU kernel
quantizes the absmax through a 65536-bin lookup table) and from its pure-torch reference
backend (`reference`: exact nearest code, the rounding of its CUDA kernels and of llmjax).
"""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import quant
from llmjax.errors import ConfigError

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'golden', 'quant')
CODE = quant.NF4_CODE
MIDPOINTS = (CODE[:-1] + CODE[1:]) / np.float32(2)


def _np(x):
  return np.asarray(x)


# ------------------------------------------------------------------------------------ NF4 table


def test_nf4_code_table_is_bitsandbytes():
  assert CODE.dtype == np.float32 and CODE.shape == (16,)
  assert np.all(np.diff(CODE) > 0)
  assert CODE[0] == -1.0 and CODE[quant.NF4_ZERO_INDEX] == 0.0 and CODE[15] == 1.0
  # A few entries by value, from bitsandbytes' get_4bit_type('nf4').
  assert CODE[1] == np.float32(-0.6961928009986877)
  assert CODE[8] == np.float32(0.07958029955625534)
  assert CODE[14] == np.float32(0.7229568362236023)


# ---------------------------------------------------------------------------- hand-made blocks


def test_known_values_map_to_code_indices():
  # One block of 8: absmax 2, normalised [1, -1, 0, 0.05, -0.05, 0.6, -0.6, 0.3].
  w = np.array([2.0, -2.0, 0.0, 0.1, -0.1, 1.2, -1.2, 0.6], np.float32)
  q = quant.quantize_nf4(w, block_size=8)
  # 0.05 is above the 0/0.0796 midpoint 0.0398 -> 8; -0.05 is below the -0.0911/0 midpoint
  # -0.0455 -> 6; 0.6 is below the 0.5626/0.7230 midpoint 0.6428 -> 13; -0.6 is above the
  # -0.6962/-0.5251 midpoint -0.6106 -> 2; 0.3 is above the 0.2461/0.3379 midpoint 0.2920 -> 11.
  np.testing.assert_array_equal(_np(quant.nf4_indices(q)), [15, 0, 7, 8, 6, 13, 2, 11])
  np.testing.assert_array_equal(_np(q.absmax), [2.0])


def test_midpoints_round_to_the_lower_code():
  # bitsandbytes bucketizes on the midpoints: a value exactly on one takes the lower code,
  # the next float up the upper one. absmax is 1 (first element), so scaling is exact.
  above = np.nextafter(MIDPOINTS, np.float32(2))
  w = np.concatenate([[1.0], MIDPOINTS, above]).astype(np.float32)
  idx = _np(quant.nf4_indices(quant.quantize_nf4(w, block_size=w.size)))
  np.testing.assert_array_equal(idx[1:16], np.arange(15))
  np.testing.assert_array_equal(idx[16:], np.arange(1, 16))


def test_absmax_per_block_and_partial_last_block():
  w = np.array([0.5, -3.0, 1.0, 2.0,  # block 0: absmax 3
                0.0, 0.0, 0.0, 0.0,  # block 1: all zero -> absmax 0, every value code 0.0
                -7.0, 1.0],  # block 2: partial (2 of 4 values), absmax 7
               np.float32)
  q = quant.quantize_nf4(w, block_size=4)
  np.testing.assert_array_equal(_np(q.absmax), [3.0, 0.0, 7.0])
  idx = _np(quant.nf4_indices(q))
  np.testing.assert_array_equal(idx[4:8], [quant.NF4_ZERO_INDEX] * 4)
  assert idx[8] == 0 and idx[1] == 0  # -absmax -> code -1
  out = _np(quant.dequantize_nf4(q))
  assert out.shape == (10,) and np.all(out[4:8] == 0) and out[8] == -7.0


def test_partial_block_divides_full_blocks_multiply_by_the_reciprocal():
  # bitsandbytes' reference backend scales full blocks by x * (1 / absmax) but the partial last
  # block by x / absmax. For this pair x / a is 0.64278692, the 13/14 midpoint (-> 13), while
  # x * (1 / a) is one float above it (-> 14); bitsandbytes 0.50.2 packs [a, x] * 16 + [a, x]
  # with blocksize 32 as bytes 0xfe ... 0xfd.
  a, x = np.float32(2.729365825653076), np.float32(1.7544007301330566)
  assert x / a == MIDPOINTS[13] and x * (np.float32(1) / a) > MIDPOINTS[13]
  w = np.array([a, x] * 17, np.float32)
  q = quant.quantize_nf4(w, block_size=32)
  assert int(q.data[0]) == 0xFE and int(q.data[-1]) == 0xFD
  # Also when XLA sees the whole computation (it rewrites A / broadcast(B) as a multiply).
  q = jax.jit(quant.quantize_nf4, static_argnames='block_size')(w, block_size=32)
  assert int(q.data[0]) == 0xFE and int(q.data[-1]) == 0xFD


def test_nibble_order_high_nibble_first():
  # Indices [15, 0, 7, 15]: element 0 is the high nibble of byte 0.
  w = np.array([[1.0, -1.0], [0.0, 1.0]], np.float32)
  q = quant.quantize_nf4(w, block_size=4)
  np.testing.assert_array_equal(_np(q.data), [0xF0, 0x7F])
  assert q.data.dtype == jnp.uint8
  # An odd count is padded with one value 0.0, i.e. code index 7 in the last low nibble.
  q = quant.quantize_nf4(np.array([1.0, -1.0, 1.0], np.float32), block_size=4)
  np.testing.assert_array_equal(_np(q.data), [0xF0, 0xF7])
  np.testing.assert_array_equal(_np(quant.dequantize_nf4(q)), [1.0, -1.0, 1.0])


def test_code_values_times_absmax_round_trip_exactly():
  rng = np.random.default_rng(0)
  scales = np.array([0.5, 3.0, 1e-3, 17.25], np.float32)
  # Every block holds each of the 16 codes once (so +-1 set the absmax), shuffled.
  idx = np.stack([rng.permutation(16) for _ in scales])  # [4, 16]
  w = (CODE[idx] * scales[:, None]).astype(np.float32)  # [4, 16]
  q = quant.quantize_nf4(w, block_size=16)
  np.testing.assert_array_equal(_np(q.absmax), scales)
  np.testing.assert_array_equal(_np(quant.nf4_indices(q)), idx.reshape(-1))
  np.testing.assert_array_equal(_np(quant.dequantize_nf4(q)), w)
  assert quant.dequantize_nf4(q).dtype == jnp.float32


@pytest.mark.parametrize('block_size', [64, 32])
def test_random_normal_round_trip_is_the_nearest_code(block_size):
  w = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (24, 40)), np.float32)  # 960 values
  q = quant.quantize_nf4(w, block_size=block_size)
  out = _np(quant.dequantize_nf4(q)).reshape(-1)
  flat = w.reshape(-1)
  absmax = np.repeat(_np(q.absmax), block_size)[:flat.size]
  err = np.abs(out - flat)
  # Each value is reconstructed by the nearest code times its block absmax...
  all_err = np.abs(CODE[None, :] * absmax[:, None] - flat[:, None])  # [n, 16]
  assert np.all(err <= all_err.min(axis=1) * (1 + 1e-6) + 1e-7)
  # ...so the error is at most half the widest gap between codes (0.139) of the absmax.
  assert np.all(err <= absmax * np.max(np.diff(CODE)) / 2 + 1e-6)
  assert np.sqrt(np.mean(err**2)) < 0.12  # QLoRA-scale error for N(0, 1) weights


def test_bfloat16_weights_dequantize_to_bfloat16():
  w = jax.random.normal(jax.random.PRNGKey(2), (4, 64), jnp.bfloat16)
  q = quant.quantize_nf4(w)
  assert q.dtype == jnp.bfloat16 and q.shape == (4, 64)
  out = quant.dequantize_nf4(q)
  assert out.dtype == jnp.bfloat16
  ref = quant.dequantize_nf4(quant.quantize_nf4(w.astype(jnp.float32)), jnp.float32)
  np.testing.assert_array_equal(_np(out.astype(jnp.float32)),
                                _np(ref.astype(jnp.bfloat16).astype(jnp.float32)))


# -------------------------------------------------------------------------- double quantization


def test_dynamic_map_is_bitsandbytes_table():
  golden = np.load(os.path.join(GOLDEN, 'reference', 'dynamic_code.npz'))['code']
  np.testing.assert_array_equal(quant.DYNAMIC_CODE, golden)
  # The formula port (float64, rounded once) is within an ulp of bitsandbytes' float32 table.
  np.testing.assert_array_max_ulp(quant.dynamic_map(), quant.DYNAMIC_CODE, maxulp=1)
  assert quant.DYNAMIC_CODE.shape == (256,) and np.all(np.diff(quant.DYNAMIC_CODE) >= 0)


def test_double_quant_absmax_error_and_layout():
  # 300 blocks of 16 -> 300 absmax values -> two 256-blocks (one partial) of 8-bit absmax.
  w = jax.random.normal(jax.random.PRNGKey(3), (300, 16)) * jnp.linspace(0.1, 2.0, 300)[:, None]
  plain = quant.quantize_nf4(w, block_size=16)
  q = quant.quantize_nf4(w, block_size=16, double_quant=True)
  assert q.double_quant and q.absmax is None
  assert q.absmax_q.dtype == jnp.uint8 and q.absmax_q.shape == (300,)
  assert q.absmax_scale.shape == (2,) and q.absmax_offset.shape == ()
  np.testing.assert_array_equal(_np(q.data), _np(plain.data))  # 4-bit codes use the exact absmax
  np.testing.assert_allclose(_np(q.absmax_offset), np.mean(_np(plain.absmax)), rtol=1e-6)
  centred = _np(plain.absmax) - _np(q.absmax_offset)
  np.testing.assert_allclose(_np(q.absmax_scale),
                             [np.abs(centred[:256]).max(), np.abs(centred[256:]).max()])
  # The dynamic map's widest gap is 0.0141 (near +-1), so the absmax error is below
  # 0.0071 * the 256-block's absmax.
  got = _np(quant.nf4_absmax(q))
  bound = np.repeat(_np(q.absmax_scale), 256)[:300] * np.max(np.diff(quant.DYNAMIC_CODE)) / 2
  assert np.all(np.abs(got - _np(plain.absmax)) <= bound + 1e-7)
  assert q.nbytes == quant.nf4_nbytes((300, 16), 16, double_quant=True) < plain.nbytes


# ------------------------------------------------------------------------ bitsandbytes goldens


def _cases(kind):
  paths = sorted(glob.glob(os.path.join(GOLDEN, kind, 'b*.npz')))
  assert len(paths) == 5, f'missing goldens in {GOLDEN}/{kind}; run tools/make_quant_goldens.py'
  return [(os.path.basename(p)[:-4], np.load(p)) for p in paths]


def _golden_dq_tensor(g):
  w = g['w']
  return quant.NF4Tensor(data=jnp.asarray(g['dq_packed']), absmax=None,
                         absmax_q=jnp.asarray(g['dq_absmax_q']),
                         absmax_scale=jnp.asarray(g['dq_absmax_scale']),
                         absmax_offset=jnp.asarray(g['dq_offset']), shape=w.shape,
                         dtype=np.dtype(np.float32), block_size=int(g['block_size']))


@pytest.mark.parametrize('kind', ['reference', 'native'])
def test_nf4_equals_bitsandbytes(kind):
  for name, g in _cases(kind):
    w, block_size = g['w'].astype(np.float32), int(g['block_size'])
    q = quant.quantize_nf4(w, block_size=block_size)
    np.testing.assert_array_equal(_np(q.data), g['packed'], err_msg=name)
    np.testing.assert_array_equal(_np(q.absmax), g['absmax'], err_msg=name)
    if 'dequant' in g:
      np.testing.assert_array_equal(_np(quant.dequantize_nf4(q)), g['dequant'], err_msg=name)
    # bitsandbytes' own packed bytes and absmax dequantize to its output, exactly.
    theirs = quant.NF4Tensor(data=jnp.asarray(g['packed']), absmax=jnp.asarray(g['absmax']),
                             absmax_q=None, absmax_scale=None, absmax_offset=None,
                             shape=w.shape, dtype=np.dtype(np.float32), block_size=block_size)
    if 'dequant' in g:
      np.testing.assert_array_equal(_np(quant.dequantize_nf4(theirs)), g['dequant'],
                                    err_msg=name)


def test_double_quant_equals_bitsandbytes_reference():
  for name, g in _cases('reference'):
    w, block_size = g['w'].astype(np.float32), int(g['block_size'])
    q = quant.quantize_nf4(w, block_size=block_size, double_quant=True)
    np.testing.assert_array_equal(_np(q.data), g['dq_packed'], err_msg=name)
    # The offset is a float32 mean; the summation order may differ from torch's by an ulp.
    np.testing.assert_array_max_ulp(_np(q.absmax_offset), g['dq_offset'], maxulp=2)
    # Given bitsandbytes' offset, the 8-bit quantization of the absmax is bit-exact...
    idx, scale = quant.quantize_blockwise_8bit(jnp.asarray(g['absmax'] - g['dq_offset']))
    np.testing.assert_array_equal(_np(idx), g['dq_absmax_q'], err_msg=name)
    np.testing.assert_array_equal(_np(scale), g['dq_absmax_scale'], err_msg=name)
    # ...its dequantization too, and the whole tensor's,
    theirs = _golden_dq_tensor(g)
    np.testing.assert_array_equal(_np(quant.nf4_absmax(theirs)), g['dq_absmax'], err_msg=name)
    np.testing.assert_array_equal(_np(quant.dequantize_nf4(theirs)), g['dq_dequant'],
                                  err_msg=name)
    # and ours (with our offset) is within float32 rounding of it.
    absmax_scale = np.repeat(g['dq_absmax_scale'], 256)[:g['absmax'].size]
    np.testing.assert_allclose(_np(quant.nf4_absmax(q)), g['dq_absmax'], rtol=0,
                               atol=4e-7 * absmax_scale.max() + 4e-7 * abs(g['dq_offset']))
    np.testing.assert_allclose(_np(quant.dequantize_nf4(q)), g['dq_dequant'], rtol=1e-5,
                               atol=1e-6 * np.abs(g['dq_dequant']).max(), err_msg=name)


def test_double_quant_against_bitsandbytes_native_cpu_kernel():
  # bitsandbytes' C++ CPU kernel looks the 8-bit index up in a 65536-bin table instead of
  # finding the nearest code, so a few absmax indices may differ by one; the dequantized
  # absmax stays within the 8-bit quantization error.
  for name, g in _cases('native'):
    idx, _ = quant.quantize_blockwise_8bit(jnp.asarray(g['absmax'] - g['dq_offset']))
    diff = np.abs(_np(idx).astype(int) - g['dq_absmax_q'].astype(int))
    assert diff.max() <= 1 and np.mean(diff > 0) <= 0.02, name
    q = quant.quantize_nf4(g['w'].astype(np.float32), int(g['block_size']), double_quant=True)
    np.testing.assert_array_equal(_np(q.data), g['dq_packed'], err_msg=name)
    bound = np.repeat(g['dq_absmax_scale'], 256)[:g['absmax'].size] * 0.0071
    assert np.all(np.abs(_np(quant.nf4_absmax(q)) - g['dq_absmax']) <= bound + 1e-6), name


# --------------------------------------------------------------------------------------- int8


def test_int8_hand_computed():
  # [in=2, out=3] kernel, per output channel: column absmax [2, 0.5, 0].
  w = np.array([[1.0, -0.5, 0.0], [-2.0, 0.25, 0.0]], np.float32)
  q = quant.quantize_int8(w, axis=-1)
  # 1 * 127 / 2 = 63.5 and 0.25 * 127 / 0.5 = 63.5 round half to even -> 64.
  np.testing.assert_array_equal(_np(q.values), [[64, -127, 0], [-127, 64, 0]])
  assert q.values.dtype == jnp.int8 and q.scale.dtype == jnp.float32
  np.testing.assert_allclose(_np(q.scale), [[2 / 127, 0.5 / 127, 0.0]], rtol=1e-7)
  assert q.axis == (1,) and q.scale.shape == (1, 3)
  out = _np(quant.dequantize_int8(q))
  np.testing.assert_allclose(out, [[64 * 2 / 127, -0.5, 0.0], [-2.0, 64 * 0.5 / 127, 0.0]],
                             rtol=1e-6)
  # absmax 127 -> ratio 1, so rounding is visible: 0.5 -> 0, 1.5 -> 2, -2.5 -> -2 (half even).
  q = quant.quantize_int8(np.array([[127.0], [0.5], [1.5], [-2.5], [3.4]], np.float32))
  np.testing.assert_array_equal(_np(q.values)[:, 0], [127, 0, 2, -2, 3])
  np.testing.assert_array_equal(_np(q.scale), [[1.0]])


def test_int8_multi_axis_channels_and_error_bound():
  # An [in, heads, head_dim] kernel: channels are (heads, head_dim), absmax over `in`.
  w = jax.random.normal(jax.random.PRNGKey(4), (16, 2, 3))
  q = quant.quantize_int8(w, axis=(1, 2))
  assert q.scale.shape == (1, 2, 3) and q.axis == (1, 2)
  np.testing.assert_allclose(_np(q.scale)[0], np.abs(_np(w)).max(axis=0) / 127, rtol=1e-6)
  err = np.abs(_np(quant.dequantize_int8(q)) - _np(w))
  assert np.all(err <= _np(q.scale) / 2 * (1 + 1e-5) + 1e-7)
  assert q.nbytes == quant.int8_nbytes((16, 2, 3), axis=(1, 2)) == 16 * 6 + 4 * 6
  q = quant.quantize_int8(w.astype(jnp.bfloat16), axis=-2)
  assert quant.dequantize_int8(q).dtype == jnp.bfloat16 and q.scale.shape == (1, 2, 1)


# --------------------------------------------------------------------------------------- qdot


@pytest.mark.parametrize('fmt', ['nf4', 'nf4_dq', 'int8'])
def test_qdot_equals_dot_with_dequantized_kernel_and_grad_wrt_x(fmt):
  kx, kw, kg = jax.random.split(jax.random.PRNGKey(5), 3)
  w = jax.random.normal(kw, (32, 12)) * 0.1  # [in, out]
  x = jax.random.normal(kx, (5, 32))  # [tokens, in]
  q = {'nf4': lambda: quant.quantize_nf4(w, block_size=32),
       'nf4_dq': lambda: quant.quantize_nf4(w, block_size=32, double_quant=True),
       'int8': lambda: quant.quantize_int8(w, axis=-1)}[fmt]()
  deq = quant.dequantize_nf4 if fmt != 'int8' else quant.dequantize_int8
  w32 = _np(deq(q, jnp.float32))
  y = jax.jit(quant.qdot, static_argnames='dtype')(x, q, dtype=jnp.float32)
  assert y.dtype == jnp.float32 and y.shape == (5, 12)
  np.testing.assert_allclose(_np(y), _np(x) @ w32, rtol=1e-5, atol=1e-5)
  # bfloat16 compute: both operands rounded to bfloat16, float32 accumulation.
  y16 = jax.jit(quant.qdot)(x, q)
  ref16 = (_np(x.astype(jnp.bfloat16).astype(jnp.float32))
           @ _np(deq(q, jnp.bfloat16).astype(jnp.float32)))
  assert y16.dtype == jnp.float32
  np.testing.assert_allclose(_np(y16), ref16, rtol=1e-4, atol=1e-4)
  # d/dx sum(g * x W) = g W^T.
  g = jax.random.normal(kg, (5, 12))
  dx = jax.jit(jax.grad(lambda x: jnp.sum(g * quant.qdot(x, q, jnp.float32))))(x)
  np.testing.assert_allclose(_np(dx), _np(g) @ w32.T, rtol=1e-5, atol=1e-5)
  # The quantized weights get no gradient, even through their float leaves.
  if fmt == 'nf4':
    dq = jax.grad(lambda q: jnp.sum(quant.qdot(x, q, jnp.float32)), allow_int=True)(q)
    assert np.all(_np(dq.absmax) == 0)


def test_qdot_multi_axis_kernel():
  w = jax.random.normal(jax.random.PRNGKey(6), (4, 8, 6))  # [heads, head_dim, embed]
  x = jax.random.normal(jax.random.PRNGKey(7), (3, 32))  # [tokens, heads * head_dim]
  q = quant.quantize_nf4(w, block_size=64)
  y = quant.qdot(x, q, jnp.float32, in_ndim=2)
  assert y.shape == (3, 6)
  ref = _np(x) @ _np(quant.dequantize_nf4(q)).reshape(32, 6)
  np.testing.assert_allclose(_np(y), ref, rtol=1e-5, atol=1e-5)
  # out axes kept: [in, heads, head_dim] with in_ndim=1 gives [tokens, heads, head_dim].
  y = quant.qdot(x[:, :4], q, jnp.float32, in_ndim=1)
  assert y.shape == (3, 8, 6)


def test_quantize_under_jit_matches_eager():
  w = jax.random.normal(jax.random.PRNGKey(8), (10, 13))  # 130 values: partial block, even
  eager = quant.quantize_nf4(w, double_quant=True)
  jitted = jax.jit(quant.quantize_nf4, static_argnames=('block_size', 'double_quant'))(
      w, double_quant=True)
  np.testing.assert_array_equal(_np(jitted.data), _np(eager.data))
  np.testing.assert_array_equal(_np(jitted.absmax_q), _np(eager.absmax_q))
  # The absmax mean is a float32 reduction whose order XLA may change when it fuses.
  np.testing.assert_array_max_ulp(_np(jitted.absmax_offset), _np(eager.absmax_offset), 2)
  np.testing.assert_array_max_ulp(_np(jitted.absmax_scale), _np(eager.absmax_scale), 2)
  assert jitted.shape == (10, 13) and jitted.block_size == 64


# ------------------------------------------------------------------------------------- memory


def test_bytes_per_param():
  assert quant.nf4_bytes_per_param() == 0.5 + 4 / 64 == 0.5625
  assert quant.nf4_bytes_per_param(64, double_quant=True) == 0.5 + 1 / 64 + 4 / (64 * 256)
  assert quant.int8_bytes_per_param(4096) == 1 + 4 / 4096
  # Exact counts agree with the arrays, and approach the per-parameter rates.
  for shape, bs, dq in [((7, 9), 64, False), ((7, 9), 32, True), ((3, 5, 11), 16, False)]:
    q = quant.quantize_nf4(jnp.ones(shape), block_size=bs, double_quant=dq)
    assert q.nbytes == quant.nf4_nbytes(shape, bs, dq)
  n = 4096 * 4096
  assert quant.nf4_nbytes((4096, 4096)) / n == pytest.approx(quant.nf4_bytes_per_param())
  assert (quant.nf4_nbytes((4096, 4096), double_quant=True) / n
          == pytest.approx(quant.nf4_bytes_per_param(double_quant=True), rel=1e-6))
  assert quant.int8_nbytes((4096, 1024)) / (4096 * 1024) == quant.int8_bytes_per_param(4096)


# ------------------------------------------------------------------------------------- errors


def test_errors_are_one_line_config_errors():
  w = jnp.ones((4, 4))
  with pytest.raises(ConfigError, match=r"^layers\.0\.q_proj: cannot quantize dtype int32"):
    quant.quantize_nf4(jnp.ones((4, 4), jnp.int32), name='layers.0.q_proj')
  with pytest.raises(ConfigError, match='block_size=0 must be a positive integer'):
    quant.quantize_nf4(w, block_size=0)
  with pytest.raises(ConfigError, match='empty tensor'):
    quant.quantize_nf4(jnp.ones((0, 4)))
  with pytest.raises(ConfigError, match='cannot dequantize to dtype int8'):
    quant.dequantize_nf4(quant.quantize_nf4(w), jnp.int8)
  with pytest.raises(ConfigError, match='axis=2 is out of range'):
    quant.quantize_int8(w, axis=2)
  with pytest.raises(ConfigError, match=r'x has shape \(3, 5\) but the kernel \(4, 4\) needs'):
    quant.qdot(jnp.ones((3, 5)), quant.quantize_nf4(w))
  with pytest.raises(ConfigError) as e:
    quant.quantize_int8(w, axis=5, name='wo')
  assert '\n' not in str(e.value) and str(e.value).startswith('wo:')
