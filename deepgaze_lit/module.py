"""DeepGazeModule: the LightningModule that trains and evaluates a DeepGaze III network.

Loss (DeepGaze's): for every sample the mean log density at its target fixations, as information gain over a
uniform density in bit/fix, `(mean log p + log(H*W)) / ln 2`; samples averaged with their `weight` normalised to
mean 1 (equal image weights); loss = minus that. It reads the log density only at the fixations
(`BlockLogDensity.at`), never at full resolution.

Entropy regularisation (off unless `entropy_weight` > 0): loss = NLL - entropy_weight * H, with H in nats
(divided by log(H*W) with `entropy_normalise`), so a positive weight pushes the entropy up:
- `bias_map`: H is the entropy of the model's mean density over 16 content-free probe images (uniform colours with
  channel intensities in {0, 0.5, 1} x 255, uniform centre bias, one central dummy history fixation), i.e. of the
  bias the network adds on its own. It is recomputed, with gradient, on every training step whose global step is
  a multiple of `entropy_every`, and enters the loss on those steps only (on the others loss = NLL).
- `prediction`: H is the mean entropy of the predicted densities of the training batch (a confidence penalty),
  computed on every training step.
"""

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Optional

import lightning as L
import numpy as np
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MeanMetric

from deepgaze_lit.feature_cache import BackboneFingerprint, FeatureCache, compute_signature, feature_namespace
from deepgaze_lit.metrics.accumulator import SaliencyMetrics, information_gain_bits
from deepgaze_lit.metrics.report import write_report
from deepgaze_lit.metrics.shuffle_pool import ShufflePool
from deepgaze_lit.model.checkpoint import CheckpointMismatchError, diff_state_dict
from deepgaze_lit.model.deepgaze3 import BlockLogDensity, DeepGazeIII
from deepgaze_lit.model.freeze import freeze_parameters
from deepgaze_lit.model.grids import DOWNSAMPLE

LN2 = math.log(2.0)
PROBE_LEVELS = (0.0, 127.5, 255.0)
NUM_PROBES = 16


def fixation_log_likelihood_bits(
    block: BlockLogDensity, fix_batch: torch.Tensor, fix_x: torch.Tensor, fix_y: torch.Tensor, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, the mean log density at its target fixations as IG over uniform in bit/fix (B,) float32, and
    its number of target fixations (B,) float32."""
    log_density = block.at(fix_batch, fix_x, fix_y).float()
    sums = torch.zeros(batch_size, dtype=torch.float32, device=log_density.device).index_add(0, fix_batch, log_density)
    counts = torch.zeros_like(sums).index_add(0, fix_batch, torch.ones_like(log_density))
    height, width = block.image_shape
    mean_log_density = sums / counts.clamp_min(1.0)
    return (mean_log_density + math.log(height * width)) / LN2, counts


def weighted_nll_bits(ll_bits: torch.Tensor, counts: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Loss in bit/fix: minus the per-sample IG over uniform `ll_bits` (B,) averaged with `weight` (B,)
    normalised to mean 1 over the samples that have target fixations (`counts` > 0)."""
    weight = weight.float() * (counts > 0)
    return -(weight * ll_bits).sum() / weight.sum()


def probe_inputs(height: int, width: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The `bias_map` probes: 16 uniform-colour images (16,3,H,W) uint8 with channel intensities in
    {0, 127.5, 255} (16 of the 27 colours, evenly spaced in their lexicographic order, black and white included),
    a uniform centre bias (16,H,W) in nats and one central history fixation (16,4) in pixels (NaN = missing)."""
    levels = torch.tensor(PROBE_LEVELS, dtype=torch.float64)
    colours = torch.cartesian_prod(levels, levels, levels)
    chosen = torch.linspace(0, len(colours) - 1, NUM_PROBES).round().long()
    image = colours[chosen].round().to(torch.uint8)[:, :, None, None].expand(NUM_PROBES, 3, height, width)
    centerbias = torch.full((NUM_PROBES, height, width), -math.log(height * width))
    x_hist = torch.full((NUM_PROBES, 4), math.nan)
    y_hist = torch.full((NUM_PROBES, 4), math.nan)
    x_hist[:, 0] = width / 2
    y_hist[:, 0] = height / 2
    inputs = {"image": image.contiguous(), "centerbias": centerbias, "x_hist": x_hist, "y_hist": y_hist}
    return {name: value.to(device) for name, value in inputs.items()}


class DeepGazeModule(L.LightningModule):
    """Trains a `DeepGazeIII` network with DeepGaze's loss; evaluates it with the saliency metrics.

    Args:
        num_components: mixture components of the network.
        scanpath: with scanpath networks (history-dependent); False = spatial-only readout.
        backbone_weights: "imagenet" (torchvision's DenseNet-201 file, offline), "none" (random, for tests and the
            synthetic quickstart) or a path to a DenseNet-201 state dict.
        init_from: starting weights: the released `deepgaze3.pth` or a single-fold checkpoint of the reference,
            loaded with `deepgaze_lit.model.checkpoint.load_weights` (its key report is printed). Not used when a
            run restores a training checkpoint (`--ckpt_path`).
        component: load only component k of the mixture in `init_from` into a one-component network (to evaluate
            fold k of the release on its own held-out fold); requires num_components 1.
        downsample: factor by which images are subsampled before the backbone (`DeepGazeIII`): 2 as the release,
            1.5 in the reference's SALICON pretraining.
        freeze: parameter-name prefixes (`deepgaze_lit.model.freeze`, e.g. `saliency_networks.*.conv0`) whose
            parameters keep their initial values: not trained and not given to the optimiser (the frozen backbone
            is given, as before this option existed, and never changes: it has no gradient).
        optimizer, lr_scheduler: chosen in YAML (`class_path` + `init_args`); the scheduler steps once per epoch.
        entropy_weight, entropy_mode, entropy_every, entropy_normalise: the entropy regulariser (module docstring).
        feature_cache_mb: memory budget (MiB) of the backbone feature cache (`deepgaze_lit.feature_cache`): the
            backbone is frozen, so each image's features are computed once and reused by later epochs; 0 = off.
        feature_cache_dir, feature_cache_disk_mb: optional disk tier of that cache (folder and budget in MiB),
            reused across runs on the same data.
        channels_last: keep the backbone's weights and feed it the images in channels_last memory format (faster
            convolutions on GPUs; the same numbers up to float rounding).
        compile_head: run the readout head (`DeepGazeIII.head`, everything after the backbone) through
            `torch.compile` (compiled at its first use, once per image size; the fused custom-gradient layers
            run eagerly between the compiled parts).
        gold_kernel_size: standard deviation (pixels of the evaluated images) of the Gaussian that turns the
            fixations into the gold-standard map for CC, KLDiv and SIM; None leaves these metrics out.
    """

    def __init__(
        self,
        num_components: int = 10,
        scanpath: bool = True,
        backbone_weights: str = "imagenet",
        init_from: Optional[str] = None,
        component: Optional[int] = None,
        downsample: float = DOWNSAMPLE,
        freeze: Optional[list[str]] = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        entropy_weight: float = 0.0,
        entropy_mode: Literal["bias_map", "prediction"] = "bias_map",
        entropy_every: int = 50,
        entropy_normalise: bool = False,
        feature_cache_mb: float = 0.0,
        feature_cache_dir: Optional[str] = None,
        feature_cache_disk_mb: float = 0.0,
        channels_last: bool = False,
        compile_head: bool = False,
        gold_kernel_size: Optional[float] = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if component is not None and num_components != 1:
            raise ValueError(
                f"model.component {component} loads one component of a mixture: set model.num_components 1 "
                f"(got {num_components})"
            )
        if entropy_every < 1:
            raise ValueError(f"model.entropy_every must be a positive number of steps, got {entropy_every}")
        self.model = DeepGazeIII(
            num_components=num_components, scanpath=scanpath, backbone_weights=backbone_weights, downsample=downsample
        )
        if channels_last:
            self.model.features.to(memory_format=torch.channels_last)
        self._compiled_head = None
        if init_from is not None:
            self._initialise_from(init_from, component)
        self._frozen: frozenset[str] = frozenset()
        if freeze:
            self._frozen = frozenset(freeze_parameters(self.model, freeze))
            rank_zero_info(f"model.freeze: {len(self._frozen)} parameters frozen ({', '.join(freeze)})")
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.eval_loss = MeanMetric().set_dtype(torch.float64)  # float64 sums: DDP gives the 1-process value
        self.evaluation_metrics: Optional[torch.nn.ModuleDict] = None
        self.feature_cache = None
        if feature_cache_mb > 0 or feature_cache_dir is not None:
            self.feature_cache = FeatureCache(feature_cache_mb, feature_cache_dir, feature_cache_disk_mb)
        self._backbone_fingerprint = BackboneFingerprint(self.model.features)
        self._fingerprints: dict[str, tuple[str, str]] = {}  # split -> (data, backbone), taken once per setup
        self._true_log_densities: Optional[Sequence[np.ndarray]] = None  # (H, W) log densities (nats)
        self._reference_results: Optional[dict[str, dict[str, float]]] = None

    def _initialise_from(self, path: str, component: Optional[int]) -> None:
        """Load the weights of `path` that fit (non-strict) and print the key report."""
        report = self.model.load_weights(path, component=component, strict=False)
        rank_zero_info(f"init_from {path}: {report}")
        readout_keys = [key for key in self.model.state_dict() if not key.startswith("features.")]
        unfilled = report.unfilled()
        if all(key in unfilled for key in readout_keys):
            raise CheckpointMismatchError(
                f"init_from {path} fits no readout parameter of this model (num_components="
                f"{self.hparams.num_components}, scanpath={self.hparams.scanpath}): it holds another architecture"
            )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse, with one sentence, a checkpoint whose parameters do not match this model's."""
        report = diff_state_dict(checkpoint["state_dict"], self.state_dict())
        if not report.ok:
            saved = checkpoint.get("hyper_parameters", {})
            raise CheckpointMismatchError(
                f"the checkpoint was saved by a different architecture (num_components={saved.get('num_components')}, "
                f"scanpath={saved.get('scanpath')}) than this model (num_components={self.hparams.num_components}, "
                f"scanpath={self.hparams.scanpath}): {len(report.missing)} missing, {len(report.unexpected)} "
                f"unexpected and {len(report.mismatched)} differently shaped parameters; use the model settings it "
                "was trained with"
            )

    def forward(self, image, centerbias, x_hist=None, y_hist=None) -> torch.Tensor:
        """Log density (B,1,H,W) in nats; see `DeepGazeIII.forward`."""
        return self.model(image, centerbias, x_hist, y_hist)

    def configure_optimizers(self) -> Any:
        # The frozen backbone stays in the list (it never has a gradient, so the optimiser never changes it): the
        # parameter groups keep the layout of checkpoints written before `freeze` existed, which then still resume.
        trainable = [parameter for name, parameter in self.model.named_parameters() if name not in self._frozen]
        optimizer = self.optimizer(trainable)
        if self.lr_scheduler is None:
            return optimizer
        scheduler = self.lr_scheduler(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    # ---- forward pieces -------------------------------------------------------------------------------------

    def _features(self, batch: dict, stage: str) -> torch.Tensor:
        """Backbone features (B,2048,h,w) of the batch's images of the datamodule's `stage` split, from the
        feature cache when it is on."""
        images = batch["image"]
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.feature_cache is None:
            return self.model.backbone_features(images)
        if stage not in self._fingerprints:  # the backbone is frozen: its weights change only between runs
            self._fingerprints[stage] = (self.trainer.datamodule.data_fingerprint(stage), self._backbone_fingerprint())
        namespace = feature_namespace(*self._fingerprints[stage], compute_signature(images), self.model.downsample)
        return self.feature_cache.get_or_compute(
            stage, namespace, batch["image_index"], images, self.model.backbone_features
        )

    def _block_log_density(self, batch: dict, stage: str) -> BlockLogDensity:
        features = self._features(batch, stage)
        return self._head()(features, batch["centerbias"], batch["x_hist"], batch["y_hist"])

    def _head(self):
        """`DeepGazeIII.head`, compiled on first use when `compile_head` is set."""
        if not self.hparams.compile_head:
            return self.model.head
        if self._compiled_head is None:
            self._compiled_head = torch.compile(self.model.head, dynamic=False)
        return self._compiled_head

    # ---- training -------------------------------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        batch_size = batch["image"].shape[0]
        block = self._block_log_density(batch, "fit")
        ll_bits, counts = fixation_log_likelihood_bits(
            block, batch["fix_batch"], batch["fix_x"], batch["fix_y"], batch_size
        )
        nll = weighted_nll_bits(ll_bits, counts, batch["weight"])
        loss = nll
        entropy = self._entropy(block)
        if entropy is not None:
            loss = nll - self.hparams.entropy_weight * entropy
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size)
        self.log("train/nll", nll, on_step=True, on_epoch=True, batch_size=batch_size)
        return loss

    def _entropy(self, block: BlockLogDensity) -> Optional[torch.Tensor]:
        """The regulariser's entropy in nats (normalised when asked) on steps where it is computed, else None.
        Written to the loggers as `train/entropy` every time it is computed."""
        if self.hparams.entropy_weight == 0.0:
            return None
        if self.hparams.entropy_mode == "prediction":
            entropy = block.entropy().float().mean()
        elif self.global_step % self.hparams.entropy_every == 0:
            entropy = self.bias_map_entropy(*block.image_shape)
        else:
            return None
        if self.hparams.entropy_normalise:
            entropy = entropy / math.log(block.image_shape[0] * block.image_shape[1])
        if self.trainer.is_global_zero:
            for logger in self.loggers:
                logger.log_metrics({"train/entropy": float(entropy.detach())}, step=self.global_step)
        return entropy

    def bias_map_entropy(self, height: int, width: int) -> torch.Tensor:
        """Entropy in nats (0-dim, with gradient) of the network's mean density over the probe images of size
        `height` x `width`. Probes run in eval mode; the previous train/eval mode is restored afterwards."""
        was_training = self.model.training
        self.model.eval()
        try:
            probes = probe_inputs(height, width, self.device)
            features = self.model.backbone_features(probes["image"])
            block = self.model.head(features, probes["centerbias"], probes["x_hist"], probes["y_hist"])
            mean_log_density = torch.logsumexp(block.values, dim=0, keepdim=True) - math.log(NUM_PROBES)
            return BlockLogDensity(mean_log_density, block.grid_to_image).entropy()[0].float()
        finally:
            self.model.train(was_training)

    def on_train_epoch_end(self) -> None:
        """Log the finalizers' blur `sigma` (finalizer-grid pixels) and `center_bias_weight`, mean over components."""
        finalizers = self.model.finalizers
        sigma = torch.stack([finalizer.gauss.sigma.detach() for finalizer in finalizers]).float().mean()
        weight = torch.cat([finalizer.center_bias_weight.detach() for finalizer in finalizers]).float().mean()
        self.log("finalizer/sigma", sigma)
        self.log("finalizer/center_bias_weight", weight)

    # ---- validation and test --------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        self._fingerprints.clear()  # each run may bring other data or weights: fingerprint them again
        if self.trainer is None or self.trainer.datamodule is None:
            return
        if stage in ("fit", "validate"):
            self._prepare_evaluation("validate")
        elif stage == "test":
            self._prepare_evaluation("test")

    def _prepare_evaluation(self, stage: str) -> None:
        """Accumulators for the stage's split: the model, the centre bias and (synthetic data) the true density."""
        dataset = self.trainer.datamodule.split_dataset(stage)
        pool = ShufflePool(dataset.x[dataset.is_target], dataset.y[dataset.is_target], dataset.n[dataset.is_target],
                           dataset.shapes)
        sources = ["model", "centerbias"]
        self._true_log_densities = dataset.true_log_densities
        if dataset.true_log_densities is not None:
            sources.append("gold")
        self.evaluation_metrics = torch.nn.ModuleDict(
            {
                source: SaliencyMetrics(pool, self.hparams.gold_kernel_size, num_images=dataset.n_images)
                for source in sources
            }
        ).to(self.device)
        self._reference_results = None

    def validation_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._evaluation_step(batch, "validate")

    def test_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._evaluation_step(batch, "test")

    def _evaluation_step(self, batch: dict, stage: str) -> dict[str, torch.Tensor]:
        batch_size = batch["image"].shape[0]
        block = self._block_log_density(batch, stage)
        ll_bits, counts = fixation_log_likelihood_bits(
            block, batch["fix_batch"], batch["fix_x"], batch["fix_y"], batch_size
        )
        has_fixations = counts > 0
        self.eval_loss.update(-ll_bits[has_fixations], batch["weight"].float()[has_fixations])
        log_density = block.full().float()
        fixations = (batch["fix_batch"], batch["fix_x"], batch["fix_y"], batch["image_index"], batch["weight"])
        self.evaluation_metrics["model"].update(log_density, *fixations)
        if self._reference_results is not None:
            return {"log_density": log_density}
        self.evaluation_metrics["centerbias"].update(batch["centerbias"], *fixations)
        if "gold" in self.evaluation_metrics:
            true_log_density = torch.stack(
                [torch.as_tensor(self._true_log_densities[index]) for index in batch["image_index"].tolist()]
            ).to(self.device)
            self.evaluation_metrics["gold"].update(true_log_density, *fixations)
        return {"log_density": log_density}

    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Log density (B,1,H,W) in nats of a predict batch (image, centerbias, dummy history), at the network
        input size; `PredictionWriter` writes it."""
        return self.model(batch["image"], batch["centerbias"], batch["x_hist"], batch["y_hist"]).float()

    def on_validation_epoch_start(self) -> None:
        self._reset_evaluation()

    def on_test_epoch_start(self) -> None:
        self._reset_evaluation()

    def _reset_evaluation(self) -> None:
        """Zero the accumulators at the START of an evaluation, under that evaluation's grad mode: states zeroed
        under `deepgaze validate`'s inference mode could not be updated later by fit's validation."""
        self.eval_loss.reset()
        for source, metrics in self.evaluation_metrics.items():
            if source == "model" or self._reference_results is None:
                metrics.reset()

    def _compute_reference_results(self) -> dict[str, dict[str, float]]:
        """Metrics of the centre bias and (synthetic data) the true density. They do not depend on the model, so
        after the first complete evaluation of the split they are kept and not accumulated again (the sanity
        check's partial pass is not kept)."""
        results = {
            source: metrics.compute() for source, metrics in self.evaluation_metrics.items() if source != "model"
        }
        if not self.trainer.sanity_checking:
            self._reference_results = results
        return results

    def on_validation_epoch_end(self) -> None:
        self._finish_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._finish_evaluation("test")

    def _finish_evaluation(self, split: str) -> None:
        """Log `<split>/loss` and the metrics; after `deepgaze validate|test` (not during fit), write the report
        into the logger's run folder and print its table."""
        results = {"model": self.evaluation_metrics["model"].compute()}
        results.update(self._reference_results or self._compute_reference_results())
        loss = self.eval_loss.compute()
        scalars = evaluation_scalars(results, float(loss))
        for name, value in scalars.items():
            self.log(f"{split}/{name}", value, prog_bar=name in ("loss", "ig"))
        if self.trainer.state.fn != TrainerFn.FITTING and self.loggers and self.trainer.is_global_zero:
            write_report(self.trainer.log_dir, results["model"], results["centerbias"], results.get("gold"))
            rank_zero_info(f"{split} report written to {self.trainer.log_dir}/metrics.json and metrics.txt:\n"
                           + (Path(self.trainer.log_dir) / "metrics.txt").read_text())


def evaluation_scalars(results: dict[str, dict[str, float]], loss: float) -> dict[str, float]:
    """Scalars logged after an evaluation, all averaged over images as the loss is: loss and LL (IG over
    uniform) in bit/fix, IG over the centre bias in bit/fix, NSS, AUC, sAUC (and CC, KLDiv, MIT KLDiv, SIM with a
    gold kernel); the centre bias's own LL, NSS, AUC;
    with a true density, its IG over the centre bias (`gold_ig`) and the share the model reaches (`ig_explained`)."""
    model, centerbias = results["model"], results["centerbias"]
    scalars = {
        "loss": loss,
        "ll": model["ig_uniform_bits_image"],
        "ig": information_gain_bits(model, centerbias)["ig_bits_image"],
        "nss": model["nss_image"],
        "auc": model["auc_image"],
        "sauc": model["sauc_image"],
        "centerbias_ll": centerbias["ig_uniform_bits_image"],
        "centerbias_nss": centerbias["nss_image"],
        "centerbias_auc": centerbias["auc_image"],
    }
    for name in ("cc", "kldiv", "mit_kldiv", "sim"):
        if f"{name}_image" in model:
            scalars[name] = model[f"{name}_image"]
    if "gold" in results:
        scalars["gold_ig"] = information_gain_bits(results["gold"], centerbias)["ig_bits_image"]
        scalars["ig_explained"] = scalars["ig"] / scalars["gold_ig"]
    return scalars
