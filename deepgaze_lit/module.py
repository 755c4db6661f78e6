"""DeepGazeModule: the LightningModule that trains and evaluates a DeepGaze III network.

It wires the network (`model/`), DeepGaze's loss and the entropy regulariser (`loss.py`), the backbone feature
cache (`feature_cache.CachedBackbone`) and the evaluation of a split (`metrics.Evaluation`) to Lightning's hooks
and loggers. What it needs to know about a split comes from `SaliencyDataModule.split_info(stage)`.
"""

from typing import Any, Literal, Optional

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

from deepgaze_lit.data.split_info import SplitInfo
from deepgaze_lit.feature_cache import CachedBackbone, FeatureCache
from deepgaze_lit.loss import fixation_log_likelihood_bits, regulariser_entropy, weighted_nll_bits
from deepgaze_lit.metrics.evaluation import Evaluation, evaluation_scalars, write_evaluation_report
from deepgaze_lit.metrics.per_image import PER_IMAGE_FILE_NAME
from deepgaze_lit.metrics.provenance import build_provenance
from deepgaze_lit.metrics.shuffle_pool import ShufflePool
from deepgaze_lit.model.checkpoint import (
    BACKBONE_PREFIX,
    BACKBONE_RECORD,
    NETWORK_PREFIX,
    BackboneRecord,
    CheckpointMismatchError,
    backbone_fingerprint,
    check_initialisation,
    diff_state_dict,
    holds_backbone,
    network_state,
)
from deepgaze_lit.model.deepgaze3 import BlockLogDensity, DeepGazeIII
from deepgaze_lit.model.errors import ModelConfigError
from deepgaze_lit.model.freeze import freeze_parameters
from deepgaze_lit.model.grids import DOWNSAMPLE

SETUP_SPLITS = {"fit": ("fit", "validate"), "validate": ("validate",), "test": ("test",)}
"""Lightning stage -> the stages whose splits it runs (fit validates as it goes); the last one is evaluated."""




class DeepGazeModule(L.LightningModule):
    """Trains a `DeepGazeIII` network with DeepGaze's loss; evaluates it with the saliency metrics.

    Args:
        num_components: mixture components of the network.
        scanpath: with scanpath networks (history-dependent); False = spatial-only readout.
        backbone_weights: "imagenet" (torchvision's DenseNet-201 file, offline), "none" (random, for tests and the
            synthetic quickstart) or a path to a DenseNet-201 state dict.
        init_from: starting weights: the released `deepgaze3.pth`, a single-fold checkpoint of the reference, a
            training checkpoint (`.ckpt`, any stage) or a `deepgaze export` file, loaded with
            `deepgaze_lit.model.checkpoint.load_weights`: the parameters the file holds in the same shapes are
            loaded, the others keep their fresh initialisation (a spatial model into a scanpath model: the scanpath
            networks); the key report is printed. Not used when a run restores a training checkpoint
            (`--ckpt_path`).
        component: load only component k of the mixture in `init_from` into a one-component network (to evaluate
            fold k of the release on its own held-out fold); requires num_components 1.
        downsample: factor by which images are subsampled before the backbone (`DeepGazeIII`): 2 as the release,
            1.5 in the reference's SALICON pretraining.
        freeze: parameter-name prefixes (`deepgaze_lit.model.freeze`, e.g. `saliency_networks.*.conv0`) whose
            parameters keep their initial values: not trained and not given to the optimiser (the frozen backbone
            is given, as before this option existed, and never changes: it has no gradient).
        checkpoint_backbone: keep the frozen backbone's tensors (80 MB) in the training checkpoints. By default they
            are left out and the backbone is rebuilt from `backbone_weights` on load, checked against the
            fingerprint the checkpoint records; a backbone that `init_from` supplied is always kept.
        optimizer, lr_scheduler: chosen in YAML (`class_path` + `init_args`); the scheduler steps once per epoch.
        entropy_weight, entropy_mode, entropy_every, entropy_normalise: the entropy regulariser (`deepgaze_lit.loss`).
        feature_cache_mb: memory budget (MiB) of the backbone feature cache (`deepgaze_lit.feature_cache`): the
            backbone is frozen, so each image's features are computed once and reused by later epochs; 0 = off.
        feature_cache_dir, feature_cache_disk_mb: optional disk tier of that cache (folder and budget in MiB),
            reused across runs on the same data.
        channels_last: keep the backbone's weights and feed it the images in channels_last memory format (faster
            convolutions on GPUs; the same numbers up to float rounding).
        compile_head: run the readout head (`DeepGazeIII.head`, everything after the backbone) through
            `torch.compile` (compiled at its first use, once per image size; the compiled head computes the fused
            layers as plain operations, and its index maps and blur kernels eagerly).
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
        checkpoint_backbone: bool = False,
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
            raise ModelConfigError(
                f"model.component {component} loads one component of a mixture: set model.num_components 1 "
                f"(got {num_components})"
            )
        if entropy_every < 1:
            raise ModelConfigError(f"model.entropy_every must be a positive number of steps, got {entropy_every}")
        self.model = DeepGazeIII(
            num_components=num_components, scanpath=scanpath, backbone_weights=backbone_weights, downsample=downsample
        )
        if channels_last:
            self.model.features.to(memory_format=torch.channels_last)
        self._compiled_head = None
        self._backbone_from_weights = True  # the backbone is what backbone_weights builds (it can be left out)
        self._backbone_fingerprint: Optional[str] = None  # of the current backbone, once computed
        if init_from is not None:
            self._initialise_from(init_from, component)
        self._frozen: frozenset[str] = frozenset()
        if freeze:
            self._frozen = frozenset(freeze_parameters(self.model, freeze))
            rank_zero_info(f"model.freeze: {len(self._frozen)} parameters frozen ({', '.join(freeze)})")
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.feature_cache = None
        self._cached_backbone = None
        if feature_cache_mb > 0 or feature_cache_dir is not None:
            self.feature_cache = FeatureCache(feature_cache_mb, feature_cache_dir, feature_cache_disk_mb)
            self._cached_backbone = CachedBackbone(self.feature_cache, self.model)
        self._splits: dict[str, SplitInfo] = {}  # stage -> its split, handed over at setup
        self.evaluation: Optional[Evaluation] = None

    def _initialise_from(self, path: str, component: Optional[int]) -> None:
        """Load the weights of `path` that fit (non-strict), print the key report and refuse a file that cannot be a
        starting point (`checkpoint.check_initialisation`)."""
        built_backbone = {key: value.clone() for key, value in self.model.state_dict().items()
                          if key.startswith(BACKBONE_PREFIX)}
        report = self.model.load_weights(path, component=component, strict=False)
        rank_zero_info(f"init_from {path}: {report.describe()}")
        check_initialisation(report, self.hparams.num_components, path)
        if any(key.startswith(BACKBONE_PREFIX) for key in report.loaded):
            state = self.model.state_dict()
            self._backbone_from_weights = all(torch.equal(state[key], value) for key, value in built_backbone.items())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Leave the frozen backbone's tensors out (unless `checkpoint_backbone`, or `init_from` supplied the
        backbone) and record how to rebuild and recognise it (`checkpoint.BackboneRecord`)."""
        if self._backbone_fingerprint is None:
            self._backbone_fingerprint = backbone_fingerprint(self.model.state_dict())
        record = BackboneRecord(str(self.hparams.backbone_weights), self._backbone_fingerprint,
                                self._backbone_from_weights)
        checkpoint[BACKBONE_RECORD] = record.as_dict()
        if self._backbone_from_weights and not self.hparams.checkpoint_backbone:
            state = checkpoint["state_dict"]
            for key in [key for key in state if key.startswith(NETWORK_PREFIX + BACKBONE_PREFIX)]:
                del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse, with one sentence, a checkpoint whose parameters do not match this model's; give a checkpoint
        saved without the backbone this model's backbone (built from `backbone_weights`) after checking it is the
        one the checkpoint was trained with."""
        state = checkpoint["state_dict"]
        with_backbone = holds_backbone(network_state(state))
        own_state = self.state_dict()
        expected = [key for key in own_state if with_backbone or not key.startswith(NETWORK_PREFIX + BACKBONE_PREFIX)]
        report = diff_state_dict(state, own_state, expected)
        if not report.ok:
            saved = checkpoint.get("hyper_parameters", {})
            raise CheckpointMismatchError(
                f"the checkpoint was saved by a different architecture (num_components={saved.get('num_components')}, "
                f"scanpath={saved.get('scanpath')}) than this model (num_components={self.hparams.num_components}, "
                f"scanpath={self.hparams.scanpath}): {len(report.missing)} missing, {len(report.unexpected)} "
                f"unexpected and {len(report.mismatched)} differently shaped parameters; use the model settings it "
                "was trained with"
            )
        record = BackboneRecord.of(checkpoint)
        network = self.model.state_dict()
        self._backbone_fingerprint = None
        if not with_backbone:
            if record is None:
                raise CheckpointMismatchError("the checkpoint holds no backbone and no record of how to rebuild it")
            record.check(network, "the checkpoint")
            state.update({NETWORK_PREFIX + key: value for key, value in network.items()
                          if key.startswith(BACKBONE_PREFIX)})
            self._backbone_fingerprint = record.fingerprint
        elif record is not None:
            self._backbone_from_weights = record.from_weights
        else:  # a full checkpoint written before the record existed
            self._backbone_from_weights = backbone_fingerprint(network_state(state)) == backbone_fingerprint(network)

    def forward(self, image, centerbias, x_hist=None, y_hist=None) -> torch.Tensor:
        """Log density (B,1,H,W) in nats; see `DeepGazeIII.forward`."""
        return self.model(image, centerbias, x_hist, y_hist)

    def configure_optimizers(self) -> Any:
        # The frozen backbone stays in the list (it never has a gradient, so the optimiser never changes it): the
        # parameter groups keep the layout of checkpoints written before `freeze` existed, which then still resume.
        trainable = [parameter for name, parameter in self.model.named_parameters() if name not in self._frozen]
        try:
            optimizer = self.optimizer(trainable)
            scheduler = self.lr_scheduler(optimizer) if self.lr_scheduler is not None else None
        except ValueError as error:  # torch's checks of the settings (a negative learning rate, ...)
            raise ModelConfigError(f"model.optimizer / model.lr_scheduler: {error}") from error
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def setup(self, stage: str) -> None:
        """Take the splits of the run from the DataModule and prepare the evaluation of the evaluated one."""
        self._splits = {}
        if self._cached_backbone is not None:
            self._cached_backbone.forget_fingerprints()
        if self.trainer is None or self.trainer.datamodule is None or stage not in SETUP_SPLITS:
            return
        self._splits = {split: self.trainer.datamodule.split_info(split) for split in SETUP_SPLITS[stage]}
        evaluated = self._splits[SETUP_SPLITS[stage][-1]]
        pool = ShufflePool(evaluated.target_x, evaluated.target_y, evaluated.target_image, evaluated.shapes)
        self.evaluation = Evaluation(pool, evaluated.num_images, evaluated.true_log_densities,
                                     self.hparams.gold_kernel_size).to(self.device)

    # ---- forward pieces -------------------------------------------------------------------------------------

    def _features(self, batch: dict, stage: str) -> torch.Tensor:
        """Backbone features (B,2048,h,w) of the batch's images of the `stage` split, from the feature cache when
        it is on."""
        images = batch["image"]
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self._cached_backbone is None:
            return self.model.backbone_features(images)
        return self._cached_backbone(stage, self._splits[stage].data_fingerprint, images, batch["image_index"])

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

    def _fixation_log_likelihood_bits(self, batch: dict, block: BlockLogDensity) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample IG over uniform (B,) bit/fix and target fixation counts (B,) of the batch."""
        return fixation_log_likelihood_bits(
            block, batch["fix_batch"], batch["fix_x"], batch["fix_y"], batch["image"].shape[0]
        )

    # ---- training -------------------------------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        batch_size = batch["image"].shape[0]
        block = self._block_log_density(batch, "fit")
        ll_bits, counts = self._fixation_log_likelihood_bits(batch, block)
        nll = weighted_nll_bits(ll_bits, counts, batch["weight"])
        loss = nll
        entropy = self._entropy(block)
        if entropy is not None:
            loss = nll - self.hparams.entropy_weight * entropy
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size)
        self.log("train/nll", nll, on_step=True, on_epoch=True, batch_size=batch_size)
        return loss

    def _entropy(self, block: BlockLogDensity) -> Optional[torch.Tensor]:
        """The regulariser's entropy (`loss.regulariser_entropy`) when it is on and computed at this step, else
        None. Written to the loggers as `train/entropy` every time it is computed."""
        if self.hparams.entropy_weight == 0.0:
            return None
        hp = self.hparams
        entropy = regulariser_entropy(block, self.model, hp.entropy_mode, self.global_step, hp.entropy_every,
                                      hp.entropy_normalise)
        if entropy is not None and self.trainer.is_global_zero:
            for logger in self.loggers:
                logger.log_metrics({"train/entropy": float(entropy.detach())}, step=self.global_step)
        return entropy

    def on_train_epoch_end(self) -> None:
        """Log the finalizers' blur `sigma` (finalizer-grid pixels) and `center_bias_weight`, mean over components."""
        finalizers = self.model.finalizers
        sigma = torch.stack([finalizer.gauss.sigma.detach() for finalizer in finalizers]).float().mean()
        weight = torch.cat([finalizer.center_bias_weight.detach() for finalizer in finalizers]).float().mean()
        self.log("finalizer/sigma", sigma)
        self.log("finalizer/center_bias_weight", weight)

    # ---- validation and test --------------------------------------------------------------------------------

    def validation_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._evaluation_step(batch, "validate")

    def test_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._evaluation_step(batch, "test")

    def _evaluation_step(self, batch: dict, stage: str) -> dict[str, torch.Tensor]:
        block = self._block_log_density(batch, stage)
        ll_bits, counts = self._fixation_log_likelihood_bits(batch, block)
        log_density = block.full().float()
        self.evaluation.update(batch, log_density, ll_bits, counts)
        return {"log_density": log_density}

    def on_validation_epoch_start(self) -> None:
        self.evaluation.reset()

    def on_test_epoch_start(self) -> None:
        self.evaluation.reset()

    def on_validation_epoch_end(self) -> None:
        self._finish_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._finish_evaluation("test")

    def _finish_evaluation(self, split: str) -> None:
        """Log `<split>/<scalar>` (`metrics.evaluation_scalars`); the reference results are kept after a complete
        pass (not Lightning's sanity check). After `deepgaze validate|test` (not during fit), rank 0 writes the
        report (`metrics.json` with its provenance, `metrics.txt`, `metrics_per_image.csv`) into the logger's run
        folder and prints its table."""
        results, loss = self.evaluation.compute(complete=not self.trainer.sanity_checking)
        for name, value in evaluation_scalars(results, loss).items():
            self.log(f"{split}/{name}", value, prog_bar=name in ("loss", "ig"))
        if self.trainer.state.fn == TrainerFn.FITTING or not self.loggers:
            return
        evaluated = self._splits[SETUP_SPLITS[self.trainer.state.fn.value][-1]]
        rows = self.evaluation.per_image_rows(evaluated.image_names, evaluated.image_ids)  # collective: every rank
        if self.trainer.is_global_zero:
            checkpoint = self.trainer.ckpt_path
            provenance = build_provenance(checkpoint, evaluated.provenance,
                                          weights=None if checkpoint else self.hparams.init_from)
            table = write_evaluation_report(self.trainer.log_dir, results, provenance, rows)
            rank_zero_info(f"{split} report written to {self.trainer.log_dir}/metrics.json, metrics.txt and "
                           f"{PER_IMAGE_FILE_NAME}:\n" + table)
