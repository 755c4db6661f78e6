"""The grids of DeepGaze III and the nearest-neighbour maps between them.

Every resize in DeepGaze III is nearest-neighbour (`F.interpolate` default mode). Such a resize copies one source
cell to each output cell, so it is fully described by one source index per output row and per output column. The
indices are taken from `F.interpolate` itself (an index ramp is resized once per shape and cached), so they match
PyTorch exactly at every size, odd ones included.

Grids of an H x W image subsampled by `downsample` d before the backbone (d = 2 in the release, 1.5 in the SALICON
pretraining stage): backbone input `floor(H * (1/d)) x floor(W * (1/d))`, readout grid `ceil(H/d/4) x ceil(W/d/4)`,
finalizer grid `floor(H/4) x floor(W/4)` (centre bias subsampled by 4). Sizes and indices follow the reference's
`F.interpolate(x, scale_factor=1/d, recompute_scale_factor=False)` and `math.ceil(H / d / readout_factor)` exactly.
"""

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

DOWNSAMPLE = 2
"""The release's factor by which the image is subsampled before the backbone (the default `downsample`)."""
READOUT_FACTOR = 4
"""The readout grid is the backbone input subsampled by this factor (rounded up)."""
SALIENCY_MAP_FACTOR = 4
"""The finalizer grid is the image subsampled by this factor (rounded down)."""


def readout_shape(image_shape: tuple[int, int], downsample: float = DOWNSAMPLE) -> tuple[int, int]:
    """Readout grid (rows, columns) of an image of `image_shape` (H, W) pixels subsampled by `downsample`."""
    return tuple(math.ceil(side / downsample / READOUT_FACTOR) for side in image_shape)


def subsampled_side(side: int, downsample: float) -> int:
    """Pixels along one side after `F.interpolate(x, scale_factor=1 / downsample)`: floor(side * (1 / downsample))
    in float64, as PyTorch computes it (not always floor(side / downsample): 33 px by 1.1 give 30, not 29)."""
    return math.floor(side * (1 / downsample))


def shared_tensors() -> torch.inference_mode:
    """Context for tensors cached across calls: made outside inference mode even when the first call is under it
    (Lightning's validation and prediction), since an inference tensor cannot be saved for a later backward pass."""
    return torch.inference_mode(False)


@functools.lru_cache(maxsize=512)
def _source_index(in_size: int, out_size: int | None, factor: float | None, device: torch.device) -> Tensor:
    """(out,) int64 source index of each output row of a nearest resize, as `F.interpolate` computes it for 4-D
    inputs (its 2-D kernel copies rows when the size does not change, where its 1-D kernel may not)."""
    with shared_tensors():
        ramp = torch.arange(in_size, dtype=torch.float32).view(1, 1, in_size, 1)
        if factor is None:
            resized = F.interpolate(ramp, size=(out_size, 1), mode="nearest")
        else:
            resized = F.interpolate(ramp, scale_factor=(1 / factor, 1.0), mode="nearest")
        return resized.view(-1).to(dtype=torch.int64, device=device)


@dataclass(frozen=True, eq=False)
class NearestMap:
    """Nearest-neighbour resize from an `in_shape` grid to an `(len(rows), len(cols))` grid.

    Output cell (i, j) copies input cell (rows[i], cols[j]). `rows`, `cols`: int64 index tensors (shared by a cache:
    never modify them in place).
    """

    rows: Tensor
    cols: Tensor
    in_shape: tuple[int, int]

    @staticmethod
    def to_size(in_shape: tuple[int, int], out_shape: tuple[int, int], device: torch.device) -> "NearestMap":
        """The map of `F.interpolate(x, size=out_shape)` (one shared instance per shapes and device)."""
        return _nearest_map(tuple(in_shape), tuple(out_shape), None, torch.device(device))

    @staticmethod
    def by_factor(in_shape: tuple[int, int], factor: float, device: torch.device) -> "NearestMap":
        """The map of `F.interpolate(x, scale_factor=1 / factor)`: output size `subsampled_side(in, factor)` (one
        shared instance per shape, factor and device)."""
        return _nearest_map(tuple(in_shape), None, factor, torch.device(device))

    @property
    def out_shape(self) -> tuple[int, int]:
        return (self.rows.numel(), self.cols.numel())

    def after(self, inner: "NearestMap") -> "NearestMap":
        """The composed map: first `inner`, then this one (whose input grid is `inner`'s output grid)."""
        return NearestMap(inner.rows[self.rows], inner.cols[self.cols], inner.in_shape)

    def apply(self, x: Tensor) -> Tensor:
        """Resize the last two dimensions of `x` (..., in_h, in_w) -> (..., out_h, out_w)."""
        return x.index_select(-2, self.rows).index_select(-1, self.cols)

    @functools.cached_property
    def flat_index(self) -> Tensor:
        """(out_h * out_w,) index into the flattened input grid, row-major (computed once per map)."""
        with shared_tensors():
            return (self.rows[:, None] * self.in_shape[1] + self.cols[None, :]).reshape(-1)

    def cell_counts(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """(in_h, in_w): how many output cells copy each input cell."""
        return self._cell_counts.to(dtype)

    @functools.cached_property
    def _cell_counts(self) -> Tensor:
        """int64 cell counts, computed once per map (bincount reads its size back from a GPU)."""
        with shared_tensors():
            row_counts = torch.bincount(self.rows, minlength=self.in_shape[0])
            col_counts = torch.bincount(self.cols, minlength=self.in_shape[1])
            return row_counts[:, None] * col_counts[None, :]


@functools.lru_cache(maxsize=512)
def _nearest_map(
    in_shape: tuple[int, int], out_shape: tuple[int, int] | None, factor: float | None, device: torch.device
) -> NearestMap:
    """The shared NearestMap to `out_shape` (or by `factor`), so its flat index and cell counts are computed once."""
    rows = _source_index(in_shape[0], None if out_shape is None else out_shape[0], factor, device)
    cols = _source_index(in_shape[1], None if out_shape is None else out_shape[1], factor, device)
    return NearestMap(rows, cols, in_shape)


@dataclass(frozen=True, eq=False)
class HeadGrids:
    """Every index map the head needs for one (feature grid, image size, downsample), as plain tensors and maps
    whose tensors are fields (nothing computed on access), so that a compiled head reads them as graph inputs.

    `native_counts` (h32 * w32,) int64: readout cells copying each native feature cell (the LayerNorm weights of
    maps on the native grid); `native_to_readout` (h * w,) flat index of the readout grid into the native grid;
    `readout_to_grid` and `native_to_grid` (h4 * w4,) flat indices of the finalizer grid into the readout and the
    native grid; `image_to_readout`, `image_to_grid`, `grid_to_image`: the maps between the image, the readout and
    the finalizer grid; `grid_counts` (h4, w4) int64: full-resolution pixels each finalizer cell stands for.
    """

    native_counts: Tensor
    native_to_readout: Tensor
    readout_to_grid: Tensor
    native_to_grid: Tensor
    image_to_readout: NearestMap
    image_to_grid: NearestMap
    grid_to_image: NearestMap
    grid_counts: Tensor

    @property
    def grid_shape(self) -> tuple[int, int]:
        """(h4, w4): the finalizer grid."""
        return self.image_to_grid.out_shape


@torch.compiler.disable(reason="index maps are built once per shape, outside the compiled graph")
def head_grids(
    feature_shape: tuple[int, int], image_shape: tuple[int, int], downsample: float, device: torch.device
) -> HeadGrids:
    """The shared `HeadGrids` of features of `feature_shape` (h32, w32) from an image of `image_shape` (H, W)."""
    return _head_grids(tuple(feature_shape), tuple(image_shape), downsample, torch.device(device))


@functools.lru_cache(maxsize=512)
def _head_grids(
    feature_shape: tuple[int, int], image_shape: tuple[int, int], downsample: float, device: torch.device
) -> HeadGrids:
    with shared_tensors():
        readout = readout_shape(image_shape, downsample)
        native_to_readout = NearestMap.to_size(feature_shape, readout, device)
        image_to_grid = NearestMap.by_factor(image_shape, SALIENCY_MAP_FACTOR, device)
        readout_to_grid = NearestMap.to_size(readout, image_to_grid.out_shape, device)
        grid_to_image = NearestMap.to_size(image_to_grid.out_shape, image_shape, device)
        return HeadGrids(
            native_counts=native_to_readout.cell_counts(torch.int64).flatten(),
            native_to_readout=native_to_readout.flat_index,
            readout_to_grid=readout_to_grid.flat_index,
            native_to_grid=readout_to_grid.after(native_to_readout).flat_index,
            image_to_readout=NearestMap.to_size(image_shape, readout, device),
            image_to_grid=image_to_grid,
            grid_to_image=grid_to_image,
            grid_counts=grid_to_image.cell_counts(torch.int64),
        )
