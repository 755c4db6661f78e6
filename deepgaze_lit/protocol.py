"""`deepgaze protocol`: the published DeepGaze III experiment as one resumable command.

    deepgaze protocol --config configs/deepgaze3_protocol.yaml                  # everything, one step after another
    deepgaze protocol --config configs/deepgaze3_protocol.yaml --stage salicon  # one stage (all folds, or --fold k)
    deepgaze protocol --config configs/deepgaze3_protocol.yaml --fold 3         # fold 3's stages and its test score
    deepgaze protocol --config configs/deepgaze3_protocol.yaml --stage evaluate # score the folds, pool the report
    deepgaze protocol --config configs/deepgaze3_protocol.yaml --stage assemble # the folds -> one mixture .pth
    deepgaze protocol --config configs/deepgaze3_protocol.yaml --weights deepgaze3.pth  # score the release

The protocol config names the stage configs (`deepgaze fit` YAML files, run in order), the folds, the experiments
root and the hand-off. Stages with `per_fold: false` (SALICON pretraining) run once; the others run per fold k,
each starting from the previous stage's result of the same fold (`model.init_from`, model weights only: a fresh
optimiser and scheduler). Every stage is one in-process `deepgaze fit --ckpt_path last` (so SLURM requeue and
DDP work as in `deepgaze fit`) in the experiment `<experiments_root>/<name>/<stage>` or `<stage>_fold<k>`; when
it finishes, the stage's result `result.pth` (a DeepGazeIII state dict, backbone included) is written next to its
checkpoints: its final weights (`handoff: final`, the reference's rule) or those of its best checkpoint (`best`).
A stage with a result is skipped on a re-run; an interrupted one resumes from its newest checkpoint.

Evaluation: fold k's result of the last stage is scored by `deepgaze test` on fold k's TEST chunk only
(`<name>/evaluation/fold<k>/`); the pooled report over all folds is `<name>/evaluation/crossval_report.json`
(see `deepgaze_lit.protocol_results`). Assembly writes `<name>/<name>.pth`: the last stage's fold models as the
components of one mixture in the released `deepgaze3.pth` layout (component k = fold k).
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional

import torch
import yaml
from jsonargparse import ActionConfigFile, ArgumentParser
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from deepgaze_lit.cli import UsageError, run_trainer_cli
from deepgaze_lit.experiment import BEST, ExperimentDir
from deepgaze_lit.model import DeepGazeIII
from deepgaze_lit.model.checkpoint import BACKBONE_PREFIX, COMPONENT_PREFIXES
from deepgaze_lit.protocol_results import PROVENANCE_FILE, pooled_report
from deepgaze_lit.resilience import StopSignals

RESULT_FILE = "result.pth"
"""A finished stage's result (model weights handed to the next stage), beside its `checkpoints/` folder."""
SETTINGS_FILE = "protocol_settings.yaml"
"""The settings the protocol adds to a stage config (second `--config` of its `deepgaze fit`)."""
EVALUATE = "evaluate"
ASSEMBLE = "assemble"
STEPS = (EVALUATE, ASSEMBLE)
"""Pseudo-stages of `--stage` besides the training stages."""
_COMPONENT_ZERO = re.compile(rf"^({'|'.join(COMPONENT_PREFIXES.values())})\.0\.")


@dataclass
class Stage:
    """One training stage of the protocol.

    Attributes:
        name: its name (`--stage`, the experiment folder `<name>` or `<name>_fold<k>`).
        config: its `deepgaze fit` config file.
        per_fold: run once per fold (MIT1003 stages) or once for all (SALICON pretraining).
        settings: config values merged over `config` (nested like the config: data paths, trainer devices, ...).
    """

    name: str
    config: str
    per_fold: bool = True
    settings: dict = field(default_factory=dict)


def merge(base: dict, update: dict) -> dict:
    """Nested dicts merged: `update`'s values win, dicts merged key by key (neither input changed)."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write(partial)` into a temporary file of this process, then renamed over `path` (every rank of a DDP job
    writes the same file; none may read a half-written one)."""
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    write(partial)
    os.replace(partial, path)


def save_atomically(state: dict, path: Path) -> None:
    """torch.save `state` to `path` (`replace_atomically`)."""
    replace_atomically(path, lambda partial: torch.save(state, partial))


def write_yaml_atomically(values: dict, path: Path) -> None:
    """`values` as YAML at `path` (`replace_atomically`)."""
    replace_atomically(path, lambda partial: partial.write_text(yaml.safe_dump(values)))


class Protocol:
    """The protocol of one config: its stages, folds and folders, and what each step does.

    Args:
        name: the protocol's folder below `experiments_root` (and the assembled file's name).
        experiments_root: folder of all experiments.
        folds: number of cross-validation folds (data.folds of every per-fold stage).
        handoff: "final" (a stage's last weights, the reference's) or "best" (its best checkpoint's).
        common: config values merged into every stage (and the evaluation) before the stage's own settings.
        stages: the training stages in order; the ones with `per_fold: false` first.
        signals: the process's signal records (`resilience.StopSignals`), handed to every run's preemption callback.
    """

    def __init__(self, name: str, experiments_root: str, folds: int, handoff: str, common: dict,
                 stages: list[Stage], signals: StopSignals):
        if not stages or not any(stage.per_fold for stage in stages):
            raise UsageError("protocol: list the training stages under `stages`, at least one with per_fold true")
        names = [stage.name for stage in stages]
        if len(set(names)) != len(names) or set(names) & set(STEPS):
            raise UsageError(f"protocol: stage names must be unique and not {' or '.join(STEPS)}, got {names}")
        first_per_fold = next(index for index, stage in enumerate(stages) if stage.per_fold)
        if not all(stage.per_fold for stage in stages[first_per_fold:]):
            raise UsageError("protocol: the stages with per_fold false (run once) must come before the per-fold ones")
        if folds < 3:
            raise UsageError(f"protocol: folds must be at least 3 (train, validation, test chunks), got {folds}")
        for stage in stages:
            if not Path(stage.config).is_file():
                raise UsageError(f"protocol: stage {stage.name}: config {stage.config} not found")
        self.name = name
        self.root = Path(experiments_root) / name
        self.folds = folds
        self.handoff = handoff
        self.common = common
        self.stages = stages
        self.signals = signals

    # ---- names and files ------------------------------------------------------------------------------------

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        valid = ", ".join([stage.name for stage in self.stages] + list(STEPS))
        raise UsageError(f"protocol: no stage {name!r}; the stages are {valid}")

    def check_fold(self, fold: int) -> None:
        if not 0 <= fold < self.folds:
            raise UsageError(f"protocol: fold {fold} is outside 0..{self.folds - 1} (folds: {self.folds})")

    def experiment(self, stage: Stage, fold: Optional[int]) -> ExperimentDir:
        """The experiment folder of `stage` (of fold `fold` when the stage runs per fold)."""
        return ExperimentDir(self.root, f"{stage.name}_fold{fold}" if stage.per_fold else stage.name)

    def result(self, stage: Stage, fold: Optional[int]) -> Path:
        return self.experiment(stage, fold).path / RESULT_FILE

    def previous(self, stage: Stage) -> Optional[Stage]:
        index = self.stages.index(stage)
        return self.stages[index - 1] if index > 0 else None

    @property
    def last(self) -> Stage:
        return self.stages[-1]

    def evaluation_dir(self, weights: Optional[str]) -> Path:
        return self.root / ("evaluation" if weights is None else "evaluation_release")

    @property
    def assembled(self) -> Path:
        return self.root / f"{self.name}.pth"

    # ---- training -------------------------------------------------------------------------------------------

    def settings_for(self, stage: Stage, fold: Optional[int], experiment: str, init_from: Optional[str]) -> dict:
        """What the protocol sets on top of the stage config: common + the stage's settings + folders, fold and
        starting weights."""
        settings = merge(self.common, stage.settings)
        settings = merge(settings, {"experiment": experiment, "experiments_root": str(self.root)})
        if init_from is not None:
            settings = merge(settings, {"model": {"init_from": init_from}})
        if stage.per_fold:
            settings = merge(settings, {"data": {"fold": fold, "folds": self.folds}})
        return settings

    def run_stage(self, stage: Stage, fold: Optional[int]) -> None:
        """Train `stage` (of fold `fold`) unless its result exists; resume it when it was interrupted."""
        result = self.result(stage, fold)
        where = stage.name + (f" fold {fold}" if stage.per_fold else "")
        if result.is_file():
            print(f"deepgaze protocol: {where} is finished ({result}), skipped", flush=True)
            return
        previous = self.previous(stage)
        init_from = None
        if previous is not None:
            init_from = self.result(previous, fold)
            if not init_from.is_file():
                raise UsageError(f"protocol: {where} starts from stage {previous.name}'s result {init_from}, "
                                 f"which does not exist: run stage {previous.name} first")
            init_from = str(init_from)
        experiment = self.experiment(stage, fold)
        experiment.path.mkdir(parents=True, exist_ok=True)
        settings_file = experiment.path / SETTINGS_FILE
        write_yaml_atomically(self.settings_for(stage, fold, experiment.name, init_from), settings_file)
        print(f"deepgaze protocol: {where}: deepgaze fit --config {stage.config} --config {settings_file} "
              "--ckpt_path last", flush=True)
        run_trainer_cli(["fit", "--config", stage.config, "--config", str(settings_file), "--ckpt_path", "last"],
                        self.signals)
        source = experiment.checkpoints.last if self.handoff == "final" else experiment.existing_checkpoint(BEST)
        save_atomically(DeepGazeIII.from_checkpoint(source).state_dict(), result)  # backbone included
        print(f"deepgaze protocol: {where} finished: {result} ({self.handoff} weights, from {source})", flush=True)

    def run_fold(self, fold: int) -> None:
        """Every per-fold stage of `fold`, then its test score; the once-only stages must be finished."""
        for stage in self.stages:
            if stage.per_fold:
                self.run_stage(stage, fold)
        self.evaluate_fold(fold)

    # ---- evaluation -----------------------------------------------------------------------------------------

    def evaluate_fold(self, fold: int, weights: Optional[str] = None) -> Path:
        """Score fold `fold`'s model (the last stage's result, or component `fold` of the released `weights`) on
        fold `fold`'s test chunk with `deepgaze test`; the folder of its per-image results (skipped when they
        exist)."""
        output = self.evaluation_dir(weights) / f"fold{fold}"
        if (output / PROVENANCE_FILE).is_file():  # written last
            return output
        if weights is None:
            checkpoint = self.result(self.last, fold)
            if not checkpoint.is_file():
                raise UsageError(f"protocol: fold {fold} has no result of stage {self.last.name} ({checkpoint}): "
                                 f"run the protocol with --fold {fold} first")
            model = {"init_from": str(checkpoint)}
        else:
            if not Path(weights).is_file():
                raise UsageError(f"protocol: --weights {weights} not found")
            checkpoint = Path(weights)
            model = {"init_from": str(checkpoint), "component": fold, "num_components": 1}
        callback = {"class_path": "deepgaze_lit.protocol_results.PerImageMetrics",
                    "init_args": {"output_dir": str(output), "fold": fold, "checkpoint": str(checkpoint),
                                  "component": None if weights is None else fold}}
        settings = merge(self.common, self.last.settings)
        settings = merge(settings, {"experiment": f"{output.parent.name}/fold{fold}",
                                    "experiments_root": str(self.root), "model": model,
                                    "data": {"split": "crossval", "fold": fold, "folds": self.folds},
                                    "trainer": {"callbacks": [callback]}})
        output.mkdir(parents=True, exist_ok=True)
        settings_file = output / SETTINGS_FILE
        write_yaml_atomically(settings, settings_file)
        print(f"deepgaze protocol: scoring fold {fold} ({checkpoint}) on its test chunk", flush=True)
        run_trainer_cli(["test", "--config", self.last.config, "--config", str(settings_file)], self.signals)
        return output

    def evaluate(self, weights: Optional[str] = None, folds: Optional[list[int]] = None) -> None:
        """Score `folds` (default all); when every fold is scored, write the pooled cross-validated report."""
        for fold in folds if folds is not None else range(self.folds):
            self.evaluate_fold(fold, weights)
        fold_dirs = {fold: self.evaluation_dir(weights) / f"fold{fold}" for fold in range(self.folds)}
        if not all((folder / PROVENANCE_FILE).is_file() for folder in fold_dirs.values()):
            return
        if rank_zero_only.rank == 0:
            output = self.evaluation_dir(weights)
            pooled_report(fold_dirs, output)
            print(f"deepgaze protocol: cross-validated report of {self.folds} folds in {output}:\n"
                  + (output / "crossval_report.txt").read_text(), flush=True)

    # ---- assembly -------------------------------------------------------------------------------------------

    def assemble(self) -> Path:
        """The last stage's fold models as components 0..folds-1 of one mixture state dict (released layout)."""
        states = []
        for fold in range(self.folds):
            path = self.result(self.last, fold)
            if not path.is_file():
                raise UsageError(f"protocol: assembling needs every fold's {self.last.name} result; {path} is "
                                 f"missing: run the protocol with --fold {fold} first")
            states.append(torch.load(path, map_location="cpu", weights_only=True))
        shared = {key: value for key, value in states[0].items() if key.startswith(BACKBONE_PREFIX)}
        mixture = dict(shared)
        for fold, state in enumerate(states):
            backbone = {key: value for key, value in state.items() if key.startswith(BACKBONE_PREFIX)}
            if backbone.keys() != shared.keys() or not all(torch.equal(value, shared[key])
                                                           for key, value in backbone.items()):
                raise UsageError(f"protocol: fold {fold}'s backbone differs from fold 0's; the mixture shares one "
                                 "backbone, so every fold must be trained from the same backbone weights")
            for key, value in state.items():
                if not key.startswith(BACKBONE_PREFIX):
                    mixture[_COMPONENT_ZERO.sub(lambda match: f"{match.group(1)}.{fold}.", key)] = value
        if rank_zero_only.rank == 0:
            save_atomically(mixture, self.assembled)
            print(f"deepgaze protocol: {self.folds} fold models assembled into {self.assembled}", flush=True)
        return self.assembled

    # ---- the command ----------------------------------------------------------------------------------------

    def run(self, stage: Optional[str] = None, fold: Optional[int] = None, weights: Optional[str] = None) -> None:
        """What `deepgaze protocol` does with its `--stage`, `--fold` and `--weights`."""
        if fold is not None:
            self.check_fold(fold)
        folds = list(range(self.folds)) if fold is None else [fold]
        if weights is not None:
            if stage is not None:
                raise UsageError("protocol: --weights scores released weights and trains nothing: leave out --stage")
            self.evaluate(weights, folds)
            return
        if stage == EVALUATE:
            self.evaluate(None, folds)
        elif stage == ASSEMBLE:
            self.assemble()
        elif stage is not None:
            chosen = self.stage(stage)
            if not chosen.per_fold and fold is not None:
                raise UsageError(f"protocol: stage {chosen.name} runs once for all folds: leave out --fold")
            for each in folds if chosen.per_fold else [None]:
                self.run_stage(chosen, each)
        elif fold is not None:
            self.run_fold(fold)
        else:
            for once in self.stages:
                if not once.per_fold:
                    self.run_stage(once, None)
            for each in folds:
                self.run_fold(each)
            self.evaluate()
            self.assemble()


def protocol_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="deepgaze protocol", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action=ActionConfigFile, help="The protocol config (YAML).")
    parser.add_argument("--name", type=str, default="deepgaze3",
                        help="Folder of the protocol's experiments below experiments_root.")
    parser.add_argument("--experiments_root", type=str, default="experiments", help="Folder of all experiments.")
    parser.add_argument("--folds", type=int, default=10, help="Cross-validation folds.")
    parser.add_argument("--handoff", type=Literal["final", "best"], default="final",
                        help="A stage's result: its final weights (the reference's) or its best checkpoint's.")
    parser.add_argument("--common", type=dict, default={}, help="Config values merged into every stage.")
    parser.add_argument("--stages", type=list[Stage], default=[], help="The training stages in order.")
    parser.add_argument("--stage", type=Optional[str], default=None,
                        help=f"Run only this stage (all folds, or --fold), or one of {', '.join(STEPS)}.")
    parser.add_argument("--fold", type=Optional[int], default=None, help="Run only this fold (0..folds-1).")
    parser.add_argument("--weights", type=Optional[str], default=None,
                        help="Score these released weights (component k on fold k) instead of training.")
    return parser


def run_protocol(args: list[str], signals: StopSignals) -> None:
    """`deepgaze protocol <args>`; `signals`: the process's signal records (`cli.main`'s)."""
    config = protocol_parser().parse_args(args)
    stages = [Stage(**vars(stage)) if not isinstance(stage, Stage) else stage for stage in config.stages]
    protocol = Protocol(config.name, config.experiments_root, config.folds, config.handoff, config.common, stages,
                        signals)
    protocol.run(config.stage, config.fold, config.weights)
