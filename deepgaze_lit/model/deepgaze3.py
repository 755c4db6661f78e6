"""DeepGaze III (Kümmerer, Bethge, Wallis 2022, JOV 22(5):7): a uniform mixture of K components on a frozen
DenseNet-201, and its output on the finalizer grid (`BlockLogDensity`).

The computation is the reference's, sized to what the output needs: the 1x1-convolution saliency path runs on the
backbone's native grid (LayerNorm statistics weighted by how often nearest upsampling copies each cell; the
2048-channel statistics computed once for all components), the scanpath encoding is computed only at the
readout-grid sample positions and once per distinct history of the batch, components run one after the other on
the readout grid, their 128-channel hidden maps never held whole (`fused.conv_softplus_layer_norm_conv`: small
working set, little kept for the backward pass), and the finalizer and the mixture run on the finalizer grid,
normalised over the full image with the block sizes as weights.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

from deepgaze_lit.batch import HISTORY_LENGTH, missing_history
from deepgaze_lit.model.backbone import FEATURE_CHANNELS, DenseNetFeatures, check_image_side
from deepgaze_lit.model.checkpoint import (
    BackboneRecord,
    CheckpointMismatchError,
    LoadReport,
    holds_backbone,
    load_weights,
    mixture_components,
    network_state,
    read_state_dict,
    read_training_checkpoint,
    require_backbone_weights,
)
from deepgaze_lit.model.errors import ModelConfigError
from deepgaze_lit.model.grids import DOWNSAMPLE, SALIENCY_MAP_FACTOR, NearestMap, head_grids
from deepgaze_lit.model.layers import normalise
from deepgaze_lit.model.readout import (
    Finalizer,
    FixationSelectionNetwork,
    SaliencyNetwork,
    ScanpathNetwork,
    finalize,
    scanpath_encoding,
)

RELEASE_COMPONENTS = 10


@dataclass(frozen=True, eq=False)
class BlockLogDensity:
    """A full-resolution log density that is constant on the nearest-neighbour blocks of the finalizer grid.

    `values` (B, 1, h4, w4): log density (nats) of ONE full-resolution pixel of each grid cell, normalised over the
    full image; `grid_to_image`: the nearest map from the grid to the image (pixel (i, j) takes cell
    (rows[i], cols[j])).
    """

    values: Tensor
    grid_to_image: NearestMap

    @property
    def image_shape(self) -> tuple[int, int]:
        """(H, W) in pixels."""
        return self.grid_to_image.out_shape

    def full(self) -> Tensor:
        """(B, 1, H, W) log density (nats); logsumexp over the pixels of each image is 0."""
        return self.grid_to_image.apply(self.values)

    def at(self, batch_index: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """(K,) log density (nats) at K fixations: sample `batch_index` (K,) int64, pixel [int(y), int(x)].

        x, y (K,) pixel coordinates; coordinates outside the image are clamped to its border pixels.
        """
        height, width = self.image_shape
        rows = self.grid_to_image.rows[y.long().clamp(0, height - 1)]
        cols = self.grid_to_image.cols[x.long().clamp(0, width - 1)]
        return self.values[batch_index, 0, rows, cols]

    def cell_sizes(self) -> Tensor:
        """(h4, w4): number of full-resolution pixels each grid cell stands for."""
        return self.grid_to_image.cell_counts(self.values.dtype)

    def entropy(self) -> Tensor:
        """(B,) entropy (nats) of each full-resolution density."""
        values = self.values[:, 0]
        p_log_p = torch.where(torch.isfinite(values), values.exp() * values, 0)
        return -(self.cell_sizes() * p_log_p).sum(dim=(-2, -1))


def distinct_histories(x_hist: Tensor, y_hist: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The distinct rows of a batch's histories (B, 4) (pixels, NaN = missing) and, for each sample, the index
    (B,) of its row among them. Slots count as equal when both are missing, so samples with the same history (the
    dummy central history of a batch of one image size, or none) share one scanpath-network evaluation.
    Histories that need a gradient, or under torch.compile (the number of distinct rows depends on the data), are
    returned as they are (torch.unique has no gradient).
    """
    if x_hist.requires_grad or y_hist.requires_grad or torch.compiler.is_compiling():
        return x_hist, y_hist, torch.arange(x_hist.shape[0], device=x_hist.device)
    present = torch.isfinite(x_hist) & torch.isfinite(y_hist)
    key = torch.cat([torch.where(present, x_hist, torch.inf), torch.where(present, y_hist, torch.inf)], dim=1)
    distinct, row = torch.unique(key, dim=0, return_inverse=True)
    missing = torch.isinf(distinct)
    distinct = distinct.masked_fill(missing, torch.nan)
    slots = x_hist.shape[1]
    return distinct[:, :slots], distinct[:, slots:], row


class DeepGazeIII(nn.Module):
    """DeepGaze III: a uniform mixture of `num_components` saliency / scanpath / fixation-selection / finalizer
    components on a frozen DenseNet-201.

    Args:
        num_components: number of mixture components K (the release has 10, one per MIT1003 fold).
        scanpath: with scanpath networks (fixation history); False gives the spatial-only model.
        backbone_weights: 'imagenet' (torchvision IMAGENET1K_V1 from the torch hub cache, never downloaded),
            'none' (random) or the path of a torchvision densenet201 state dict (.pth).
        downsample: factor (> 0) by which the image is subsampled (nearest) before the backbone; the readout grid is
            ceil(H / downsample / 4) x ceil(W / downsample / 4). 2 in the release, 1.5 in the reference's SALICON
            pretraining. Not part of the state dict: a model must be evaluated with the factor it was trained with.

    State-dict keys are those of the released `deepgaze3.pth` (`features.`, `saliency_networks.N.`,
    `scanpath_networks.N.`, `fixation_selection_networks.N.`, `finalizers.N.`).
    """

    def __init__(
        self,
        num_components: int = RELEASE_COMPONENTS,
        scanpath: bool = True,
        backbone_weights: str | Path = "imagenet",
        downsample: float = DOWNSAMPLE,
    ):
        super().__init__()
        if num_components < 1:
            raise ModelConfigError(f"model.num_components must be >= 1, got {num_components}")
        if not (math.isfinite(downsample) and downsample > 0):
            raise ModelConfigError(
                f"downsample must be a finite factor > 0 (2 as in the release, 1.5 for SALICON), got {downsample!r}"
            )
        self.scanpath = scanpath
        self.downsample = downsample
        self.features = DenseNetFeatures(backbone_weights)
        self.saliency_networks = nn.ModuleList(SaliencyNetwork() for _ in range(num_components))
        if scanpath:
            self.scanpath_networks = nn.ModuleList(ScanpathNetwork() for _ in range(num_components))
        self.fixation_selection_networks = nn.ModuleList(
            FixationSelectionNetwork(scanpath) for _ in range(num_components)
        )
        self.finalizers = nn.ModuleList(Finalizer() for _ in range(num_components))

    @property
    def num_components(self) -> int:
        return len(self.finalizers)

    @classmethod
    def from_release(cls, path: str | Path, component: int | None = None) -> "DeepGazeIII":
        """The model of a state dict file in the release's layout (`deepgaze3.pth`, or `deepgaze export`'s output),
        backbone included.

        component=None: the whole mixture (the release: 10 scanpath components; an exported file: as many
        components as it holds, with scanpath networks when it has them); component=k: a 1-component model holding
        component k (the fold-k model, to be evaluated on fold k only). The subsampling factor is not part of the
        file: the model has the release's `downsample` 2.
        """
        state = read_state_dict(path)
        scanpath = any(key.startswith("scanpath_networks.") for key in state)
        components = len(mixture_components(state)) or RELEASE_COMPONENTS
        model = cls(components if component is None else 1, scanpath=scanpath, backbone_weights="none")
        model.load_weights(state, component=component)
        return model

    @classmethod
    def from_checkpoint(cls, path: str | Path, backbone_weights: str | Path | None = None) -> "DeepGazeIII":
        """The network of a training checkpoint (`deepgaze fit`'s `.ckpt`), built from its saved hyper-parameters
        (num_components, scanpath, backbone_weights, downsample); no Lightning and no `init_from` file needed.

        The frozen backbone comes from the checkpoint when it holds it, else it is rebuilt from the saved
        `backbone_weights` ("none": the seeded random backbone it was trained with; a file: FileNotFoundError naming
        it when it is missing) or from `backbone_weights` given here (the same weights elsewhere); weights other than
        those it was trained with raise CheckpointMismatchError.
        """
        checkpoint = read_training_checkpoint(path)
        hparams = checkpoint.get("hyper_parameters", {})
        state = network_state(checkpoint["state_dict"])
        record = BackboneRecord.of(checkpoint)
        with_backbone = holds_backbone(state)
        if with_backbone:
            weights = "none"
        elif record is None:
            raise CheckpointMismatchError(f"{path} holds no backbone and no record of how to rebuild it")
        else:
            weights = record.backbone_weights if backbone_weights is None else str(backbone_weights)
            require_backbone_weights(weights, str(path))
        model = cls(
            num_components=hparams.get("num_components", RELEASE_COMPONENTS),
            scanpath=hparams.get("scanpath", True),
            backbone_weights=weights,
            downsample=hparams.get("downsample", DOWNSAMPLE),
        )
        if not with_backbone:
            record.check(model.state_dict(), str(path))
        model.load_weights(state)
        return model

    def load_weights(self, source: str | Path | dict, component: int | None = None, strict: bool = True) -> LoadReport:
        """Initialise from a mixture or single-model (one fold) state dict; see `checkpoint.load_weights`."""
        return load_weights(self, source, component=component, strict=strict)

    def backbone_features(self, image: Tensor) -> Tensor:
        """Frozen backbone features: image (B, 3 or 1, H, W) RGB 0..255 (float or uint8) -> (B, 2048, h32, w32).

        The image is subsampled by `downsample` (nearest) and passed through DenseNet-201 (stride 32) without
        gradient. On the CPU one image at a time: the same speed, a third less peak memory (smaller temporaries
        fragment the heap less), and each image's features do not depend on the rest of the batch (exact feature
        caching).
        """
        if image.dim() != 4 or image.shape[1] not in (1, 3):
            raise ValueError(f"image must be (B, 3, H, W) RGB or (B, 1, H, W) greyscale, got {tuple(image.shape)}")
        height, width = image.shape[-2:]
        check_image_side(height, width, self.downsample)
        channels_last = image.is_contiguous(memory_format=torch.channels_last) and not image.is_contiguous()
        subsampled = NearestMap.by_factor((height, width), self.downsample, image.device).apply(image)
        subsampled = subsampled.expand(-1, 3, -1, -1)
        dtype = self.features.features[0].mean.dtype
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        subsampled = subsampled.to(dtype=dtype, memory_format=memory_format)
        with torch.no_grad():
            if subsampled.device.type == "cpu":
                return torch.cat([self.features(one) for one in subsampled.split(1)])
            return self.features(subsampled)

    def head(
        self, features: Tensor, centerbias: Tensor, x_hist: Tensor | None = None, y_hist: Tensor | None = None
    ) -> BlockLogDensity:
        """Everything after the backbone: features (B, 2048, h, w), centerbias (B, H, W) log density (nats),
        x_hist, y_hist (B, 4) pixels, most recent first, NaN = missing (ignored without scanpath networks).

        The image size is centerbias.shape[-2:]. Returns the mixture's log density as a BlockLogDensity.
        """
        batch = features.shape[0]
        self._check_head_inputs(features, centerbias)
        dtype = self.finalizers[0].center_bias_weight.dtype
        device = features.device
        image_shape = tuple(centerbias.shape[-2:])
        grids = head_grids(tuple(features.shape[-2:]), image_shape, self.downsample, device)
        cell_weight = grids.native_counts.to(dtype)
        normalised_features = normalise(features.to(dtype).flatten(2), cell_weight)
        if self.scanpath:
            x_hist, y_hist = self._history(x_hist, y_hist, batch, dtype, device)
            x_distinct, y_distinct, history_row = distinct_histories(x_hist, y_hist)
            encoding, valid = scanpath_encoding(x_distinct, y_distinct, grids.image_to_readout)
            to_grid = grids.readout_to_grid
        else:
            to_grid = grids.native_to_grid

        readouts = []
        for component in range(self.num_components):
            saliency = self.saliency_networks[component](normalised_features, cell_weight)
            selection = self.fixation_selection_networks[component]
            saliency = selection.normalise_saliency(saliency, cell_weight)
            if self.scanpath:
                history = self.scanpath_networks[component](encoding, valid).index_select(0, history_row)
                readouts.append(selection(saliency.index_select(-1, grids.native_to_readout), history))
            else:
                readouts.append(selection(saliency, None, cell_weight))

        final_dtype = torch.promote_types(dtype, torch.float32)
        with torch.autocast(device.type, enabled=False):
            on_grid = torch.cat(readouts, dim=1).to(final_dtype).index_select(-1, to_grid)
            on_grid = on_grid.view(batch, self.num_components, *grids.grid_shape)
            centerbias_on_grid = grids.image_to_grid.apply(centerbias.to(final_dtype))[:, None]
            log_cell_size = grids.grid_counts.to(final_dtype).log()
            components = finalize(list(self.finalizers), on_grid, centerbias_on_grid, log_cell_size)
            mixture = torch.logsumexp(components, dim=1, keepdim=True) - math.log(self.num_components)
        return BlockLogDensity(mixture, grids.grid_to_image)

    def forward(
        self, image: Tensor, centerbias: Tensor, x_hist: Tensor | None = None, y_hist: Tensor | None = None
    ) -> Tensor:
        """(B, 1, H, W) log density (nats) of the next fixation; arguments as in `backbone_features` and `head`."""
        if tuple(image.shape[-2:]) != tuple(centerbias.shape[-2:]):
            raise ValueError(
                f"image {tuple(image.shape[-2:])} and centerbias {tuple(centerbias.shape[-2:])} sizes differ"
            )
        return self.head(self.backbone_features(image), centerbias, x_hist, y_hist).full()

    @staticmethod
    def _check_head_inputs(features: Tensor, centerbias: Tensor) -> None:
        if features.dim() != 4 or features.shape[1] != FEATURE_CHANNELS:
            raise ValueError(f"features must be (B, {FEATURE_CHANNELS}, h, w), got {tuple(features.shape)}")
        if centerbias.dim() != 3 or centerbias.shape[0] != features.shape[0]:
            raise ValueError(
                f"centerbias must be (B, H, W) with B = {features.shape[0]} (the features' batch), "
                f"got {tuple(centerbias.shape)}"
            )
        if min(centerbias.shape[-2:]) < SALIENCY_MAP_FACTOR:
            raise ValueError(f"image sides must be >= {SALIENCY_MAP_FACTOR}, got {tuple(centerbias.shape[-2:])}")

    @staticmethod
    def _history(
        x_hist: Tensor | None, y_hist: Tensor | None, batch: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        """The (B, 4) history coordinates; None for both means no history (all slots missing)."""
        if x_hist is None and y_hist is None:
            return missing_history(batch, dtype, device)
        if x_hist is None or y_hist is None:
            raise ValueError("give both x_hist and y_hist, or neither")
        for name, hist in (("x_hist", x_hist), ("y_hist", y_hist)):
            if tuple(hist.shape) != (batch, HISTORY_LENGTH):
                raise ValueError(f"{name} must be (B, {HISTORY_LENGTH}) with B = {batch}, got {tuple(hist.shape)}")
        return x_hist.to(dtype=dtype, device=device), y_hist.to(dtype=dtype, device=device)
