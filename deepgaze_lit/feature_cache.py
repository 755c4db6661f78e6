"""FeatureCache: each image's frozen-backbone features, computed once and reused by later epochs.

DeepGaze III's backbone is frozen and stays in eval mode, so the features of an image (B,2048,h32,w32) at their
native stride-32 resolution depend only on the image pixels, the network input size, the backbone weights and
how they are computed (device type, autocast dtype, memory format). Those make up the cache's *namespace*
(`feature_namespace`); an entry is (namespace, image index), where the index is the image's position in the split
whose `SaliencyDataModule.data_fingerprint(stage)` went into the namespace. `CachedBackbone` is how the
LightningModule uses it. A changed image, resize policy or
backbone weight gives another namespace, so stale entries are never read.

Two tiers, each with its own byte budget:
- memory: CPU tensors (pinned when the features live on a GPU) in the process that runs the model, never in
  DataLoader workers; with DDP every rank holds its own.
- disk (optional): one `torch.save` file per entry under `<disk_dir>/<namespace>/`, read back with
  `weights_only=True`, written atomically (several ranks may share the folder).

Entries are admitted while they fit and are not evicted for one another: every epoch visits every image once, so
with a budget smaller than the split the first images stay cached and the rest are recomputed each epoch (evicting
the least recently used entry would evict exactly the images the next epoch needs). A `slot` (the split name)
holds one namespace at a time; when it moves to another namespace (new weights, new data, other precision), the
old namespace leaves memory. On disk, folders of namespaces no slot holds are deleted, least recently used first,
when a new entry needs room.

Exactness: when any image of a batch is missing, the whole batch goes through the backbone, exactly as without
the cache, so the features of that batch are bit-identical to the uncached ones. Batches served from the cache
are bit-identical to the uncached computation on the CPU (the backbone runs one image at a time there); on a GPU
when the image was first computed in a batch of the same size (the rounding of batched convolutions can depend on
the batch size, ~1e-5 relative). The cache assumes no random augmentation:
with augmented images an image's features are not a function of its index, and the cache must stay off.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from deepgaze_lit.model.grids import DOWNSAMPLE

CACHE_FORMAT = 2
"""Version of the on-disk layout and of the namespace recipe; part of every namespace."""
ENTRY_SUFFIX = ".pt"
KEY_FILE = "key.json"


def backbone_fingerprint(backbone: nn.Module) -> str:
    """Hex SHA-256 (32 digits) of the backbone's state dict: names, dtypes, shapes and values of every tensor."""
    digest = hashlib.sha256()
    for name, tensor in backbone.state_dict().items():
        values = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{values.dtype}:{tuple(values.shape)}".encode())
        digest.update(values.view(torch.uint8).numpy().tobytes() if values.numel() else b"")
    return digest.hexdigest()[:32]


class BackboneFingerprint:
    """`backbone_fingerprint` of one module, recomputed only when one of its tensors was replaced or modified
    in place (tracked through each tensor's identity and version counter)."""

    def __init__(self, backbone: nn.Module):
        self.backbone = backbone
        self._versions: Optional[tuple] = None
        self._fingerprint = ""

    def _tensor_versions(self) -> tuple:
        return tuple((id(tensor), tensor._version) for tensor in self.backbone.state_dict(keep_vars=True).values())

    def __call__(self) -> str:
        versions = self._tensor_versions()
        if versions != self._versions:
            self._fingerprint = backbone_fingerprint(self.backbone)
            self._versions = versions
        return self._fingerprint


def compute_signature(images: Tensor) -> dict[str, str]:
    """How features of `images` (B,C,H,W) would be computed now: device type, autocast dtype (or "off"), memory
    format and, on CUDA, whether TF32 convolutions are allowed. Different signatures can round differently."""
    device = images.device.type
    autocast = str(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else "off"
    channels_last = images.dim() == 4 and images.is_contiguous(memory_format=torch.channels_last) \
        and not images.is_contiguous()
    signature = {"device": device, "autocast": autocast, "memory_format": "channels_last" if channels_last else "contiguous"}
    if device == "cuda":
        signature["cudnn_tf32"] = str(torch.backends.cudnn.allow_tf32)
    return signature


def feature_namespace(
    data_fingerprint: str, backbone: str, signature: dict[str, str], downsample: float = DOWNSAMPLE
) -> str:
    """Hex SHA-256 (32 digits) naming one set of cached features: a split's `data_fingerprint` (image contents
    in index order, sizes, resize policy), the backbone fingerprint, the `compute_signature` and the factor by which
    the images are subsampled before the backbone."""
    key = {
        "format": CACHE_FORMAT, "data": data_fingerprint, "backbone": backbone, "compute": signature,
        "downsample": float(downsample),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


@dataclass
class CacheStats:
    """Counts since creation: images served from memory / disk, images whose features were computed, and the
    bytes held in memory and on disk (all namespaces)."""

    memory_hits: int = 0
    disk_hits: int = 0
    computed: int = 0
    memory_bytes: int = 0
    disk_bytes: int = 0


def _nbytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class FeatureCache:
    """Backbone features per (namespace, image index) in memory and optionally on disk.

    Args:
        memory_mb: budget of the memory tier in MiB (0: no memory tier).
        disk_dir: folder of the disk tier (created when needed); None: no disk tier.
        disk_mb: budget of the disk tier in MiB, for everything under `disk_dir`.
    """

    def __init__(self, memory_mb: float = 2048, disk_dir: Optional[str | Path] = None, disk_mb: float = 0):
        if memory_mb < 0 or disk_mb < 0:
            raise ValueError(f"feature cache budgets must be >= 0 MiB, got memory {memory_mb}, disk {disk_mb}")
        if disk_dir is not None and disk_mb == 0:
            raise ValueError(f"feature cache folder {disk_dir} given with a disk budget of 0 MiB: set disk_mb")
        self.memory_budget = int(memory_mb * 2**20)
        self.disk_budget = int(disk_mb * 2**20)
        self.disk_dir = None if disk_dir is None else Path(disk_dir)
        self.stats = CacheStats()
        self._memory: dict[str, dict[int, Tensor]] = {}
        self._slots: dict[str, str] = {}
        self._disk_scanned = False

    def get_or_compute(
        self, slot: str, namespace: str, image_index: Tensor, images: Tensor, compute: Callable[[Tensor], Tensor]
    ) -> Tensor:
        """Features (B,2048,h,w) of `images` (B,C,H,W), whose indices in the namespace's split are `image_index`
        (B,); `compute(images)` is called (on the whole batch) when any of them is missing.

        `slot` names the role of the namespace (the split); moving a slot to a new namespace drops the old one
        from memory unless another slot holds it.
        """
        self._hold(slot, namespace)
        indices = [int(index) for index in image_index.tolist()]
        if len(indices) != images.shape[0]:
            raise ValueError(f"{len(indices)} image indices for a batch of {images.shape[0]} images")
        entries = [self._lookup(namespace, index) for index in indices]
        if any(entry is None for entry in entries):
            features = compute(images)
            self._store(namespace, indices, entries, features)
            self.stats.computed += len(indices)
            return features
        return self._assemble(entries, images)

    def _hold(self, slot: str, namespace: str) -> None:
        previous = self._slots.get(slot)
        if previous == namespace:
            return
        self._slots[slot] = namespace
        if previous is not None and previous not in self._slots.values():
            dropped = self._memory.pop(previous, {})
            self.stats.memory_bytes -= sum(_nbytes(entry) for entry in dropped.values())
        if self.disk_dir is not None:
            self._mark_used(namespace)

    def _lookup(self, namespace: str, index: int) -> Optional[Tensor]:
        entry = self._memory.get(namespace, {}).get(index)
        if entry is not None:
            self.stats.memory_hits += 1
            return entry
        entry = self._read_disk(namespace, index)
        if entry is not None:
            self.stats.disk_hits += 1
            self._remember(namespace, index, entry)
        return entry

    def _assemble(self, entries: list[Tensor], images: Tensor) -> Tensor:
        """Stack the entries on the images' device, in the memory format the backbone would give."""
        if images.device.type == "cpu":
            features = torch.stack(entries)
        else:
            features = torch.empty((len(entries), *entries[0].shape), dtype=entries[0].dtype, device=images.device)
            for position, entry in enumerate(entries):
                features[position].copy_(entry, non_blocking=True)
        if compute_signature(images)["memory_format"] == "channels_last":
            features = features.contiguous(memory_format=torch.channels_last)
        return features

    def _store(self, namespace: str, indices: list[int], entries: list[Optional[Tensor]], features: Tensor) -> None:
        """Keep the features of the batch's missing images (each image once)."""
        stored = set()
        for position, (index, entry) in enumerate(zip(indices, entries)):
            if entry is not None or index in stored:
                continue
            stored.add(index)
            value = features[position].detach().to("cpu", copy=True).contiguous()
            if features.device.type == "cuda":
                value = value.pin_memory()
            self._remember(namespace, index, value)
            self._write_disk(namespace, index, value)

    def _remember(self, namespace: str, index: int, value: Tensor) -> None:
        size = _nbytes(value)
        if self.stats.memory_bytes + size > self.memory_budget:
            return
        self._memory.setdefault(namespace, {})[index] = value
        self.stats.memory_bytes += size

    # ---- disk tier ------------------------------------------------------------------------------------------

    def _entry_path(self, namespace: str, index: int) -> Path:
        return self.disk_dir / namespace / f"{index}{ENTRY_SUFFIX}"

    def _scan_disk(self) -> None:
        """Count the bytes of every entry under `disk_dir` (other processes may write and delete there)."""
        total = 0
        for path in self.disk_dir.glob(f"*/*{ENTRY_SUFFIX}"):
            try:
                total += path.stat().st_size
            except FileNotFoundError:
                continue
        self.stats.disk_bytes = total

    def _mark_used(self, namespace: str) -> None:
        """Create the namespace's folder with its key file, or refresh the key file's time (its LRU age)."""
        folder = self.disk_dir / namespace
        folder.mkdir(parents=True, exist_ok=True)
        key_file = folder / KEY_FILE
        if key_file.exists():
            os.utime(key_file)
        else:
            key_file.write_text(json.dumps({"format": CACHE_FORMAT, "namespace": namespace}) + "\n")

    def _read_disk(self, namespace: str, index: int) -> Optional[Tensor]:
        if self.disk_dir is None:
            return None
        path = self._entry_path(namespace, index)
        if not path.is_file():
            return None
        try:
            value = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError):
            path.unlink(missing_ok=True)
            return None
        if not isinstance(value, Tensor) or value.dim() != 3:
            path.unlink(missing_ok=True)
            return None
        return value

    def _write_disk(self, namespace: str, index: int, value: Tensor) -> None:
        if self.disk_dir is None:
            return
        if not self._disk_scanned:
            self._scan_disk()
            self._disk_scanned = True
        size = _nbytes(value)
        if self.stats.disk_bytes + size > self.disk_budget and not self._free_disk(size):
            return
        path = self._entry_path(namespace, index)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(handle, "wb") as stream:
            torch.save(value, stream)
        written = Path(temporary).stat().st_size
        os.replace(temporary, path)
        self.stats.disk_bytes += written

    def _free_disk(self, needed: int) -> bool:
        """Delete the folders of namespaces no slot holds, least recently used first, until `needed` more bytes
        fit; True when they do."""
        self._scan_disk()
        held = set(self._slots.values())
        folders = [folder for folder in self.disk_dir.iterdir() if folder.is_dir() and folder.name not in held]
        folders.sort(key=_last_used)
        for folder in folders:
            if self.stats.disk_bytes + needed <= self.disk_budget:
                break
            shutil.rmtree(folder, ignore_errors=True)
            self._scan_disk()
        return self.stats.disk_bytes + needed <= self.disk_budget


class CachedBackbone:
    """A network's backbone features through a `FeatureCache`, one slot per split: a split's namespace is made of
    its data fingerprint and the backbone fingerprint, taken once (until `forget_fingerprints`), and of every
    batch's compute signature.

    Args:
        cache: the feature cache.
        network: a `DeepGazeIII`: its frozen `features` are fingerprinted, its `backbone_features` (looked up at
            every call) computes the features of missing images.
    """

    def __init__(self, cache: FeatureCache, network: nn.Module):
        self.cache = cache
        self.network = network
        self._backbone_fingerprint = BackboneFingerprint(network.features)
        self._fingerprints: dict[str, tuple[str, str]] = {}  # slot -> (data, backbone)

    def forget_fingerprints(self) -> None:
        """Fingerprint data and weights again at their next use (a new run may bring other data or weights; the
        backbone is frozen, so within a run they do not change)."""
        self._fingerprints.clear()

    def __call__(self, slot: str, data_fingerprint: Callable[[], str], images: Tensor, image_index: Tensor) -> Tensor:
        """Features (B,2048,h,w) of `images` (B,C,H,W) of the split `slot`, whose indices in that split are
        `image_index` (B,); `data_fingerprint()` gives the split's fingerprint (called once per slot)."""
        if slot not in self._fingerprints:
            self._fingerprints[slot] = (data_fingerprint(), self._backbone_fingerprint())
        namespace = feature_namespace(*self._fingerprints[slot], compute_signature(images), self.network.downsample)
        return self.cache.get_or_compute(slot, namespace, image_index, images, self.network.backbone_features)


def _last_used(folder: Path) -> float:
    """When a namespace folder was last held (its key file's modification time; 0 without one)."""
    try:
        return (folder / KEY_FILE).stat().st_mtime
    except FileNotFoundError:
        return 0.0
