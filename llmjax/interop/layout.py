"""How one llmjax parameter is laid out inside one Hugging Face tensor, both ways.

    llmjax leaf = hf_tensor[narrow].reshape(split).transpose(perm)

`split` breaks each HF axis into the llmjax dims it holds (q_proj.weight [heads*head_dim, embed]
-> [heads, head_dim, embed]); `perm` orders them as llmjax does ([embed, heads, head_dim]);
`narrow` cuts one range out of a fused tensor (GPT-2's c_attn holds q, k and v side by side).

`read_block` maps a block of the llmjax leaf (what one device holds under a sharding) back to
the HF region that contains it, so a sharded load reads only that region from disk.

An MoE layer's experts are one llmjax leaf [experts, ...] but one HF tensor per expert
(`experts.{e}.gate_proj.weight`): a Layout with `experts` > 0 stacks them on read (only the
experts of the block: an expert-sharded load reads only its experts' files) and splits them on
write (`write`).
"""

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class Layout:
  hf_name: str  # '{i}' stands for the layer index in per-layer tensors
  hf_shape: tuple[int, ...]  # the whole HF tensor, for shape checks
  split: tuple[tuple[int, ...], ...]  # per HF axis (after narrowing): the dims it holds
  perm: tuple[int, ...]  # llmjax axis j = axis perm[j] of the split tensor
  narrow: tuple[int, int, int] | None = None  # (hf axis, start, stop) of a fused tensor
  # > 0: the leaf is [experts, *shape of one expert], one HF tensor per expert ('{e}' in
  # hf_name; hf_shape, split, perm and narrow describe one expert's tensor).
  experts: int = 0

  @property
  def shape(self) -> tuple[int, ...]:
    """The llmjax leaf's shape (per layer)."""
    dims = [d for group in self.split for d in group]
    return (self.experts,) * (self.experts > 0) + tuple(dims[p] for p in self.perm)

  def name(self, layer: int | None, expert: int | None = None) -> str:
    return self.hf_name.format_map({'i': layer, 'e': expert})

  def names(self, layer: int | None) -> list[str]:
    """Every HF tensor this leaf lives in (one per expert for stacked experts)."""
    if self.experts:
      return [self.name(layer, e) for e in range(self.experts)]
    return [self.name(layer)]

  def read_block(self, read, layer: int | None, index: tuple[slice, ...]) -> np.ndarray:
    """The block `index` (slices of the llmjax leaf) read through `read(name, hf_slices)`.
    Stacked experts: index[0] picks the experts, each read from its own tensor.
    """
    if not self.experts:
      return self._read(read, self.name(layer), index)
    index = tuple(index) + (slice(None),) * (len(self.shape) - len(index))
    experts = range(*index[0].indices(self.experts))
    return np.stack([self._read(read, self.name(layer, e), index[1:]) for e in experts])

  def _read(self, read, name: str, index: tuple[slice, ...]) -> np.ndarray:
    """One HF tensor's part of the leaf (one expert's, for stacked experts).

    Along an HF axis split into (outer, inner...), only the outer dim's range is narrowed on
    disk; inner dims (head_dim) are read whole and cut in memory, which keeps the read one
    contiguous range per axis.
    """
    dims = [d for group in self.split for d in group]
    by_split_axis = [slice(None)] * len(dims)
    for j, sl in enumerate(index):
      by_split_axis[self.perm[j]] = sl
    ranges = [range(*sl.indices(d)) for sl, d in zip(by_split_axis, dims)]
    hf_index, shape, inner, pos = [], [], [], 0
    for axis, group in enumerate(self.split):
      stride = math.prod(group[1:])
      outer = ranges[pos]
      start, stop = outer.start * stride, outer.stop * stride
      if self.narrow and self.narrow[0] == axis:
        start, stop = start + self.narrow[1], stop + self.narrow[1]
      hf_index.append(slice(start, stop))
      shape += [len(outer), *group[1:]]
      inner += [slice(None)] + [slice(r.start, r.stop) for r in ranges[pos + 1:pos + len(group)]]
      pos += len(group)
    block = read(name, tuple(hf_index)).reshape(shape)[tuple(inner)]
    return block.transpose(self.perm)

  def write(self, leaf: np.ndarray, layer: int | None, out: dict[str, np.ndarray]) -> None:
    """Writes the llmjax leaf (one layer) into the HF tensors of `out` (name -> array),
    one per expert for stacked experts; fused tensors are assembled in place."""
    if not self.experts:
      out[self.name(layer)] = self.to_hf(leaf, out.get(self.name(layer)))
      return
    for e in range(self.experts):
      out[self.name(layer, e)] = self.to_hf(leaf[e], out.get(self.name(layer, e)))

  def to_hf(self, leaf: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """Writes the llmjax leaf (one layer; one expert's part for stacked experts) into its HF
    tensor `out` (allocated when None)."""
    x = leaf.transpose(np.argsort(self.perm))
    x = x.reshape([math.prod(group) for group in self.split])
    if self.narrow is None:
      return x
    if out is None:
      out = np.zeros(self.hf_shape, leaf.dtype)
    axis, start, stop = self.narrow
    index = [slice(None)] * out.ndim
    index[axis] = slice(start, stop)
    out[tuple(index)] = x
    return out


def linear(hf_name: str, in_dims: tuple[int, ...], out_dims: tuple[int, ...]) -> Layout:
  """torch.nn.Linear weight [prod(out), prod(in)] -> llmjax kernel [*in, *out]."""
  n_out = len(out_dims)
  perm = tuple(range(n_out, n_out + len(in_dims))) + tuple(range(n_out))
  return Layout(hf_name, (math.prod(out_dims), math.prod(in_dims)), (out_dims, in_dims), perm)


def experts(layout: Layout, num_experts: int) -> Layout:
  """`layout` of one expert's tensor ('{e}' in its name) -> the leaf [experts, ...] of all."""
  return dataclasses.replace(layout, experts=num_experts)


def conv1d(hf_name: str, in_dims: tuple[int, ...], out_dims: tuple[int, ...],
           fused: tuple[int, int, int] | None = None) -> Layout:
  """GPT-2's Conv1D weight [prod(in), prod(out)] (already input-major) -> [*in, *out].

  fused = (start, stop, total): this kernel is columns start:stop of a [in, total] tensor.
  """
  hf_shape = (math.prod(in_dims), fused[2] if fused else math.prod(out_dims))
  narrow = (1, fused[0], fused[1]) if fused else None
  return Layout(hf_name, hf_shape, (in_dims, out_dims), tuple(range(len(in_dims) + len(out_dims))),
                narrow)


def vector(hf_name: str, dims: tuple[int, ...], fused: tuple[int, int, int] | None = None) -> Layout:
  """A bias or norm scale [prod(dims)] -> [*dims]; `fused` as in `conv1d`."""
  hf_shape = (fused[2] if fused else math.prod(dims),)
  narrow = (0, fused[0], fused[1]) if fused else None
  return Layout(hf_name, hf_shape, (dims,), tuple(range(len(dims))), narrow)


def table(hf_name: str, rows: int, cols: int, transpose: bool = False) -> Layout:
  """An embedding table [rows, cols]; `transpose`: the LM head [vocab, embed] -> [embed, vocab]."""
  if transpose:
    return Layout(hf_name, (rows, cols), ((rows,), (cols,)), (1, 0))
  return Layout(hf_name, (rows, cols), ((rows,), (cols,)), (0, 1))
