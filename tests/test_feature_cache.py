"""FeatureCache: hits and misses, budgets, namespaces (invalidation), the disk tier, and exactness on the real
backbone."""

import math

import pytest
import torch
from torch import nn

from deepgaze_lit import DeepGazeIII
from deepgaze_lit.feature_cache import (
    BackboneFingerprint,
    FeatureCache,
    backbone_fingerprint,
    compute_signature,
    feature_namespace,
)

ENTRY_BYTES = 2048 * 2 * 3 * 4
"""Bytes of one fake entry (2048, 2, 3) float32."""


class CountingBackbone:
    """A fake `backbone_features`: (B,3,H,W) -> (B,2048,2,3) whose values depend on the image only; counts calls
    and images."""

    def __init__(self):
        self.calls = 0
        self.images = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.images += images.shape[0]
        means = images.float().mean(dim=(1, 2, 3))
        return means[:, None, None, None] + torch.arange(2048 * 6, dtype=torch.float32).view(1, 2048, 2, 3)


def images_for(indices: list[int]) -> torch.Tensor:
    """(B,3,8,8) uint8 images whose content is a function of their index."""
    return torch.stack([torch.full((3, 8, 8), index * 7 % 256, dtype=torch.uint8) for index in indices])


def fetch(cache: FeatureCache, backbone: CountingBackbone, indices: list[int], namespace: str = "ns",
          slot: str = "train") -> torch.Tensor:
    return cache.get_or_compute(slot, namespace, torch.tensor(indices), images_for(indices), backbone)


def test_second_epoch_is_served_from_memory_bit_identically():
    cache, backbone = FeatureCache(memory_mb=1), CountingBackbone()
    first = [fetch(cache, backbone, batch) for batch in ([0, 1], [2, 3])]
    second = [fetch(cache, backbone, batch) for batch in ([0, 1], [2, 3])]
    assert (backbone.calls, backbone.images) == (2, 4)
    assert cache.stats.computed == 4 and cache.stats.memory_hits == 4
    assert cache.stats.memory_bytes == 4 * ENTRY_BYTES
    for expected, served in zip(first, second):
        assert torch.equal(expected, served)
    reordered = fetch(cache, backbone, [3, 0])
    assert torch.equal(reordered, torch.stack([first[1][1], first[0][0]]))
    assert backbone.calls == 2


def test_a_missing_image_sends_the_whole_batch_through_the_backbone():
    cache, backbone = FeatureCache(memory_mb=1), CountingBackbone()
    fetch(cache, backbone, [0, 1])
    features = fetch(cache, backbone, [1, 2])
    assert (backbone.calls, backbone.images) == (2, 4)
    assert torch.equal(features, CountingBackbone()(images_for([1, 2])))
    assert cache.stats.memory_bytes == 3 * ENTRY_BYTES


def test_repeated_image_in_a_batch_is_stored_once():
    cache, backbone = FeatureCache(memory_mb=1), CountingBackbone()
    fetch(cache, backbone, [5, 5, 6])
    assert cache.stats.memory_bytes == 2 * ENTRY_BYTES
    fetch(cache, backbone, [6, 5, 5])
    assert backbone.calls == 1


def test_memory_budget_keeps_the_first_entries_and_recomputes_the_rest():
    cache, backbone = FeatureCache(memory_mb=2.5 * ENTRY_BYTES / 2**20), CountingBackbone()
    for _ in range(3):
        for index in range(4):
            fetch(cache, backbone, [index])
    assert cache.stats.memory_bytes == 2 * ENTRY_BYTES
    assert cache.stats.memory_hits == 2 * 2
    assert backbone.images == 4 + 2 * 2


def test_zero_memory_budget_caches_nothing():
    cache, backbone = FeatureCache(memory_mb=0), CountingBackbone()
    fetch(cache, backbone, [0])
    fetch(cache, backbone, [0])
    assert backbone.calls == 2 and cache.stats.memory_bytes == 0


def test_moving_a_slot_to_a_new_namespace_drops_the_old_one():
    cache, backbone = FeatureCache(memory_mb=1), CountingBackbone()
    fetch(cache, backbone, [0, 1], namespace="old", slot="train")
    fetch(cache, backbone, [0], namespace="val", slot="val")
    fetch(cache, backbone, [0, 1], namespace="new", slot="train")
    assert backbone.calls == 3
    assert cache.stats.memory_bytes == 3 * ENTRY_BYTES
    fetch(cache, backbone, [0, 1], namespace="old", slot="train")
    assert backbone.calls == 4


def test_namespace_held_by_another_slot_stays():
    cache, backbone = FeatureCache(memory_mb=1), CountingBackbone()
    fetch(cache, backbone, [0], namespace="shared", slot="val")
    fetch(cache, backbone, [0], namespace="shared", slot="test")
    fetch(cache, backbone, [0], namespace="other", slot="test")
    fetch(cache, backbone, [0], namespace="shared", slot="val")
    assert backbone.calls == 2


def test_index_count_must_match_the_batch():
    with pytest.raises(ValueError, match="2 image indices for a batch of 1"):
        FeatureCache().get_or_compute("train", "ns", torch.tensor([0, 1]), images_for([0]), CountingBackbone())


def test_budgets_are_checked():
    with pytest.raises(ValueError, match=">= 0 MiB"):
        FeatureCache(memory_mb=-1)
    with pytest.raises(ValueError, match="set disk_mb"):
        FeatureCache(disk_dir="somewhere", disk_mb=0)


# ---- namespaces -----------------------------------------------------------------------------------------------


def small_backbone() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))


def test_backbone_fingerprint_follows_every_weight_and_buffer():
    torch.manual_seed(0)
    backbone = small_backbone()
    fingerprint = BackboneFingerprint(backbone)
    original = fingerprint()
    assert original == backbone_fingerprint(backbone) and len(original) == 32
    assert fingerprint() == original
    with torch.no_grad():
        backbone[0].weight[0, 0, 0, 0] += 1e-6
    changed = fingerprint()
    assert changed != original
    backbone[1].running_mean.add_(1.0)
    assert fingerprint() not in (original, changed)
    twin = small_backbone()
    twin.load_state_dict(backbone.state_dict())
    assert backbone_fingerprint(twin) == fingerprint()


def test_backbone_fingerprint_sees_a_loaded_state_dict():
    torch.manual_seed(0)
    backbone, other = small_backbone(), small_backbone()
    fingerprint = BackboneFingerprint(backbone)
    before = fingerprint()
    backbone.load_state_dict(other.state_dict())
    assert fingerprint() == backbone_fingerprint(other) != before


def test_compute_signature_tells_apart_precision_and_memory_format():
    images = torch.zeros(2, 3, 8, 8)
    plain = compute_signature(images)
    assert plain == {"device": "cpu", "autocast": "off", "memory_format": "contiguous"}
    assert compute_signature(images.contiguous(memory_format=torch.channels_last))["memory_format"] == "channels_last"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_signature(images)["autocast"] == "torch.bfloat16"
    keys = {feature_namespace("data", "backbone", plain), feature_namespace("data2", "backbone", plain),
            feature_namespace("data", "backbone2", plain),
            feature_namespace("data", "backbone", {**plain, "autocast": "torch.bfloat16"})}
    assert len(keys) == 4


# ---- disk tier ------------------------------------------------------------------------------------------------


def test_disk_tier_serves_a_new_process_bit_identically(tmp_path):
    backbone = CountingBackbone()
    expected = fetch(FeatureCache(memory_mb=0, disk_dir=tmp_path, disk_mb=1), backbone, [0, 1])
    assert sorted(path.name for path in (tmp_path / "ns").iterdir()) == ["0.pt", "1.pt", "key.json"]
    fresh = FeatureCache(memory_mb=1, disk_dir=tmp_path, disk_mb=1)
    served = fetch(fresh, backbone, [0, 1])
    assert torch.equal(served, expected)
    assert backbone.calls == 1 and fresh.stats.disk_hits == 2
    fetch(fresh, backbone, [1, 0])
    assert fresh.stats.memory_hits == 2


def test_a_corrupt_disk_entry_is_recomputed(tmp_path):
    backbone = CountingBackbone()
    fetch(FeatureCache(memory_mb=0, disk_dir=tmp_path, disk_mb=1), backbone, [0])
    (tmp_path / "ns" / "0.pt").write_bytes(b"not a tensor")
    features = fetch(FeatureCache(memory_mb=0, disk_dir=tmp_path, disk_mb=1), backbone, [0])
    assert backbone.calls == 2
    assert torch.equal(features, CountingBackbone()(images_for([0])))
    assert torch.load(tmp_path / "ns" / "0.pt", weights_only=True).shape == (2048, 2, 3)


def test_disk_budget_evicts_unheld_namespaces_least_recently_used_first(tmp_path):
    budget_mb = 3.5 * ENTRY_BYTES / 2**20
    backbone = CountingBackbone()
    for namespace in ("oldest", "newer"):
        fetch(FeatureCache(memory_mb=0, disk_dir=tmp_path, disk_mb=budget_mb), backbone, [0], namespace=namespace)
    cache = FeatureCache(memory_mb=0, disk_dir=tmp_path, disk_mb=budget_mb)
    fetch(cache, backbone, [0, 1], namespace="current")
    assert not (tmp_path / "oldest").exists() and (tmp_path / "newer" / "0.pt").exists()
    fetch(cache, backbone, [2, 3], namespace="current")
    assert not (tmp_path / "newer").exists()
    assert sorted(path.name for path in (tmp_path / "current").glob("*.pt")) == ["0.pt", "1.pt", "2.pt"]
    assert cache.stats.disk_bytes <= budget_mb * 2**20


# ---- the real network -----------------------------------------------------------------------------------------


def test_cache_on_and_off_give_identical_losses_and_weights():
    """Three epochs of two batches on the real (random-weight) DeepGazeIII, plain torch loop."""

    def train(cache: FeatureCache | None) -> tuple[list[float], dict]:
        torch.manual_seed(0)
        model = DeepGazeIII(num_components=2, backbone_weights="none")
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        generator = torch.Generator().manual_seed(1)
        images = torch.randint(0, 256, (4, 3, 128, 160), dtype=torch.uint8, generator=generator)
        centerbias = torch.full((4, 128, 160), -math.log(128 * 160))
        x_hist = torch.full((4, 4), math.nan)
        y_hist = torch.full((4, 4), math.nan)
        x_hist[:, 0], y_hist[:, 0] = 80.0, 64.0
        fixations = torch.rand(4, 2, generator=generator) * torch.tensor([160.0, 128.0])
        namespace = feature_namespace("data", BackboneFingerprint(model.features)(), compute_signature(images))
        losses = []
        for epoch in range(3):
            order = [[0, 1], [2, 3]] if epoch % 2 == 0 else [[3, 1], [0, 2]]
            for batch in order:
                index = torch.tensor(batch)
                if cache is None:
                    features = model.backbone_features(images[index])
                else:
                    features = cache.get_or_compute("train", namespace, index, images[index], model.backbone_features)
                block = model.head(features, centerbias[index], x_hist[index], y_hist[index])
                loss = -block.at(torch.arange(2), fixations[index, 0], fixations[index, 1]).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
        return losses, model.state_dict()

    cache = FeatureCache(memory_mb=64)
    cached_losses, cached_weights = train(cache)
    plain_losses, plain_weights = train(None)
    assert cache.stats.computed == 4 and cache.stats.memory_hits == 8
    assert cached_losses == plain_losses
    assert cached_weights.keys() == plain_weights.keys()
    for key, value in plain_weights.items():
        assert torch.equal(cached_weights[key], value), key
