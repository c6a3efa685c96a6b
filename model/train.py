"""Training: multi-source data, weighted sampling, a source-aware imbalance loss, warm-up + cosine
LR, weight EMA, selection on a rule that includes external validation sets, early stopping,
resume, temperature scaling and a self-describing output.

Files written to ``out`` as training goes (so a killed run can ``--resume``):

* ``state.pt``        — last epoch's weights, optimiser, scheduler, EMA, RNG and history
  (plain tensors/containers, loadable with ``weights_only=True``);
* ``best/``           — best-so-far checkpoint (safetensors + config);
* ``history.csv`` / ``history.json`` / ``learning_curve.png`` — per-epoch logs;
* ``splits.csv``      — every row used, with its source and split;
* at the end ``model.safetensors`` + ``config.json`` + ``ood.safetensors`` — the calibrated final
  checkpoint, with val, external-val and test metrics.

Started by ``torchrun`` the same loop runs data-parallel (``DistributedDataParallel``); what that
changes, and why, is in :mod:`model.distributed`. Only rank 0 writes any of these files.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from common.errors import DermError
from common.plotting import pyplot
from data_pipeline.dataset import (
    DistributedWeightedSampler,
    LesionDataset,
    class_counts,
    make_weighted_sampler,
    share_counts,
)
from data_pipeline.ham10000 import folder_classes
from data_pipeline.schema import HAM7, ClassSet
from data_pipeline.sources import Source, class_masks, load_sources
from data_pipeline.splits import DEFAULT_SPLITS, REPO_ROOT
from data_pipeline.transforms import DEFAULT_SIZE, AugmentConfig, ImageTransform, Preprocessing
from model import distributed
from model.checkpoint import CheckpointConfig, load_checkpoint, save_checkpoint
from model.ema import WeightEMA
from model.engine import eval_loader
from model.losses import class_weights, sampled_prior, source_aware_ce
from model.metrics import headline
from model.network import DEFAULT_BACKBONE, FusionEnsemble, FusionNet, ModelConfig, Network
from model.onnx_runtime import export_onnx
from model.scoring import (
    EvalSets,
    calibrate_and_score,
    selection_rule,
    selection_score,
    validate,
)


@dataclass
class TrainConfig:
    data_dir: str
    out: str
    splits: str = str(DEFAULT_SPLITS)
    extra_train: tuple[str, ...] = ()
    external_val: tuple[str, ...] = ()
    backbone: str = DEFAULT_BACKBONE
    use_metadata: bool = True
    pretrained: bool = True
    init_from: str = ""
    init_member: int = 0
    height: int = DEFAULT_SIZE
    width: int = DEFAULT_SIZE
    geometry: str = "squash"
    color_constancy: str = "shades_of_gray"
    crop_jitter: bool = True
    acquisition_aug: bool = True
    epochs: int = 14
    epoch_samples: int = 0
    batch_size: int = 32
    lr: float = 1e-3
    backbone_lr_mult: float = 0.3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    sampler_power: float = 0.5
    loss: str = "weighted_ce"
    loss_power: float = 0.5
    la_tau: float = 1.0
    source_mask: bool = False
    class_share: str = "union"
    label_smoothing: float = 0.05
    meta_blank_prob: float = 0.15
    patience: int = 4
    ema_decay: float = 0.998
    seed: int = 42
    workers: int = 0
    threads: int = 0
    device: str = "auto"
    max_train_batches: int = 0
    resume: bool = False
    name: str = ""
    command: str = field(default="", metadata={"help": "the command line, recorded in config"})

    def preprocessing(self) -> Preprocessing:
        return Preprocessing(
            height=self.height,
            width=self.width,
            geometry=self.geometry,
            color_constancy=self.color_constancy,
        )

    def augment(self) -> AugmentConfig:
        return AugmentConfig(random_resized_crop=self.crop_jitter, acquisition=self.acquisition_aug)


@dataclass
class TrainData:
    """Everything the loop needs from the data: loaders, the held-out sets and provenance."""

    train: DataLoader
    sets: EvalSets
    counts: np.ndarray
    sources: list[Source]
    split_hash: str
    #: the counts the sampler's class shares (and the logit-adjusted prior) are computed from
    share_counts: np.ndarray | None = None
    #: the run's class set: the primary folder's (its dataset.json ``classes``, else HAM10000's)
    classes: ClassSet = HAM7


@dataclass
class Progress:
    """What survives a restart: history and the best epoch so far."""

    history: list[dict] = field(default_factory=list)
    start_epoch: int = 1
    best_score: float = -1.0
    best_epoch: int = 0


def repo_relative(path: str | Path) -> str:
    """Paths inside the repository are stored relative to it, so configs travel between clones."""
    p = Path(path).resolve()
    return str(p.relative_to(REPO_ROOT)) if p.is_relative_to(REPO_ROOT) else str(p)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def lr_lambda(total_steps: int, warmup_steps: int):
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def write_history(history: list[dict], out: Path) -> None:
    pd.DataFrame(history).to_csv(out / "history.csv", index=False)
    (out / "history.json").write_text(json.dumps(history, indent=2))
    plot_learning_curve(history, out / "learning_curve.png")


def plot_learning_curve(history: list[dict], path: Path) -> None:
    plt = pyplot()
    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, [h["train_loss"] for h in history], "o-", label="train loss")
    a.plot(ep, [h["val_loss"] for h in history], "o-", label="val loss (NLL)")
    a.set_xlabel("epoch")
    a.legend()
    keys = ["val_balanced_accuracy", "val_macro_auc", "selection_score"]
    keys += [k for k in history[0] if k.startswith("ext_") and k.endswith("_mel_auc")]
    for key in keys:
        b.plot(ep, [h.get(key) for h in history], "o-", label=key.replace("_", " "))
    b.set_xlabel("epoch")
    b.set_ylim(0, 1)
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def prepare_data(cfg: TrainConfig, out: Path) -> TrainData:
    """Load every source, write ``splits.csv`` and build the loaders."""
    rank, world = distributed.rank(), distributed.world_size()
    if rank != 0:
        distributed.barrier()  # rank 0 first: it may create the split file
    classes = folder_classes(cfg.data_dir)
    df, sources, split_hash = load_sources(
        cfg.data_dir, cfg.splits, cfg.extra_train, cfg.external_val, seed=cfg.seed, classes=classes
    )
    if rank == 0:
        distributed.barrier()
        df[["source", "image_id", "lesion_id", "dx", "split"]].to_csv(
            out / "splits.csv", index=False
        )
    pre = cfg.preprocessing()
    train_df = df[df["split"] == "train"]
    masks = class_masks(train_df, sources) if cfg.source_mask else None
    blank = cfg.meta_blank_prob if cfg.use_metadata else 0.0
    train_tf = ImageTransform(pre, train=True, aug=cfg.augment())
    train_ds = LesionDataset(train_df, train_tf, blank, cfg.seed + rank, masks=masks)
    n = cfg.epoch_samples or len(train_ds)
    reference = None
    if cfg.class_share == "primary":
        primary = train_df["source"] == sources[0].name
        reference = class_counts(train_df.loc[primary, "label"].to_numpy(), len(classes))
    elif cfg.class_share != "union":
        raise DermError(f"Unknown --class-share {cfg.class_share!r}: use union or primary.")
    sampler = make_weighted_sampler(
        train_ds.labels,
        cfg.sampler_power,
        n,
        seed=cfg.seed,
        rank=rank,
        world_size=world,
        reference_counts=reference,
        n_classes=len(classes),
    )
    train = DataLoader(
        train_ds,
        batch_size=cfg.batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=cfg.workers,
        persistent_workers=cfg.workers > 0,
    )
    external = {
        name: eval_loader(rows, pre, workers=cfg.workers)
        for name, rows in df[df["split"] == "external"].groupby("source", sort=False)
    }
    sets = EvalSets(
        val=eval_loader(df[df["split"] == "val"], pre, workers=cfg.workers),
        test=eval_loader(df[df["split"] == "test"], pre, workers=cfg.workers),
        external=external,
    )
    counts = class_counts(train_ds.labels, len(classes))
    return TrainData(
        train, sets, counts, sources, split_hash, share_counts(counts, reference), classes
    )


def build_model(
    cfg: TrainConfig, device: torch.device, classes: ClassSet = HAM7
) -> tuple[FusionNet, str]:
    """A fresh network (ImageNet backbone), or one warm-started from a trained checkpoint;
    returns it with the version it started from ("" for ImageNet), recorded in the config."""
    mcfg = ModelConfig(
        backbone=cfg.backbone, use_metadata=cfg.use_metadata, num_classes=len(classes)
    )
    model = FusionNet(mcfg, pretrained=cfg.pretrained and not cfg.init_from)
    init_version = ""
    if cfg.init_from:
        source, source_cfg = load_checkpoint(cfg.init_from)
        init_version = source_cfg.version
        if isinstance(source, FusionEnsemble):
            if not 0 <= cfg.init_member < len(source.members):
                raise DermError(
                    f"--init-member {cfg.init_member}: {cfg.init_from} has "
                    f"{len(source.members)} members."
                )
            source = source.nets[cfg.init_member]
        if source_cfg.classes.codes != classes.codes:
            raise DermError(
                f"{cfg.init_from} predicts {', '.join(source_cfg.classes.codes)}; it cannot "
                f"initialise a model of {', '.join(classes.codes)}."
            )
        if source.cfg != mcfg:
            raise DermError(
                f"{cfg.init_from} is a {source.cfg.backbone} model (metadata: "
                f"{source.cfg.use_metadata}); it cannot initialise a {mcfg.backbone} one."
            )
        model.load_state_dict(source.state_dict())
    return model.to(device), init_version


class Trainer:
    """One training job: the model, its optimiser and schedule, and the epoch loop pieces."""

    def __init__(
        self,
        cfg: TrainConfig,
        data: TrainData,
        device: torch.device,
        dist_info: distributed.DistInfo | None = None,
    ) -> None:
        self.cfg, self.data, self.device = cfg, data, device
        self.dist = dist_info or distributed.DistInfo()
        model, self.init_version = build_model(cfg, device, data.classes)
        self.model = distributed.prepare_model(model, self.dist, device)
        # What runs forward / backward: DDP under torchrun, else the model itself.
        self.net = distributed.wrap(self.model, self.dist, device)
        self.opt = torch.optim.AdamW(
            self.model.param_groups(cfg.lr, cfg.backbone_lr_mult), weight_decay=cfg.weight_decay
        )
        self.steps = len(data.train)
        if cfg.max_train_batches:
            self.steps = min(self.steps, cfg.max_train_batches)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lr_lambda(cfg.epochs * self.steps, int(cfg.warmup_epochs * self.steps))
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
        self.ema = WeightEMA(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        # What is validated, selected and shipped: the EMA weights when EMA is on.
        self.evaluated = cast(Network, self.ema.module) if self.ema else self.model
        self.weight, self.offset = None, None
        shares = data.counts if data.share_counts is None else data.share_counts
        if cfg.loss == "weighted_ce":
            self.weight = class_weights(shares, cfg.sampler_power, cfg.loss_power).to(device)
        elif cfg.loss == "logit_adjusted":
            prior = sampled_prior(shares, cfg.sampler_power)
            self.offset = torch.tensor(cfg.la_tau * np.log(prior), dtype=torch.float32).to(device)
        else:
            raise DermError(f"Unknown loss {cfg.loss!r}: use weighted_ce or logit_adjusted.")

    def loss(
        self, logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        return source_aware_ce(
            logits, y, mask, self.weight, self.cfg.label_smoothing, logit_offset=self.offset
        )

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the sampler; returns the mean loss and the throughput."""
        from tqdm import tqdm

        self.model.train()
        sampler = self.data.train.sampler
        if isinstance(sampler, DistributedWeightedSampler):
            sampler.set_epoch(epoch)
        t0, seen, total = time.time(), 0, 0.0
        bar = tqdm(
            self.data.train,
            total=self.steps,
            desc=f"epoch {epoch}/{self.cfg.epochs}",
            disable=not self.dist.is_main,
        )
        for step, batch in enumerate(bar):
            if step >= self.steps:
                break
            images, meta, y = (t.to(self.device) for t in batch[:3])
            mask = batch[3].to(self.device) if len(batch) > 3 else None
            with torch.autocast(device_type=self.device.type, enabled=self.device.type == "cuda"):
                logits = self.net(images, meta).float()
            loss = self.loss(logits, y, mask)
            self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
            self.sched.step()
            if self.dist.enabled and not _synced_bn(self.device):
                distributed.sync_buffers(self.model)  # rank 0's BatchNorm statistics everywhere
            if self.ema is not None:
                self.ema.update(self.model)
            seen += len(y)
            total += loss.item() * len(y)
            bar.set_postfix(loss=f"{total / seen:.3f}", img_s=f"{seen / (time.time() - t0):.1f}")
        bar.close()
        elapsed = time.time() - t0
        total, n = distributed.all_sum(total, seen)  # over all ranks
        return {"train_loss": total / max(n, 1), "train_img_per_s": n / elapsed}

    def validate_epoch(self, epoch: int, train_stats: dict, t0: float) -> tuple[dict, dict]:
        """Score every validation set; returns (history row, per-set metrics).

        Under DDP rank 0 scores the full sets alone (identical to one process) and every rank
        receives its result, so all take the same selection and early-stopping decisions."""
        result = None
        if self.dist.is_main:
            result = self._validate_epoch(epoch, train_stats, t0)
        return cast(tuple[dict, dict], distributed.broadcast(result))

    def _validate_epoch(self, epoch: int, train_stats: dict, t0: float) -> tuple[dict, dict]:
        per_set = validate(self.evaluated, self.data.sets, self.device, classes=self.data.classes)
        val = per_set["val"]
        row: dict[str, Any] = {
            "epoch": epoch,
            **train_stats,
            "val_loss": val["nll"],
            "val_accuracy": val["accuracy"],
            "val_balanced_accuracy": val["balanced_accuracy"],
            "val_macro_f1": val["macro_f1"],
            "val_macro_auc": val["macro_auc"],
            "val_mel_auc": (val.get("melanoma") or {}).get("auc"),
        }
        for name, m in per_set.items():
            if name != "val":
                row[f"ext_{name}_balanced_accuracy"] = m["balanced_accuracy"]
                row[f"ext_{name}_mel_auc"] = (m.get("melanoma") or {}).get("auc")
        row["selection_score"] = selection_score(per_set)
        row["lr_head"] = self.opt.param_groups[1]["lr"]
        row["epoch_seconds"] = time.time() - t0
        print(f"epoch {epoch}: train_loss {row['train_loss']:.4f}  val {headline(val)}", flush=True)
        for name, m in per_set.items():
            if name != "val":
                print(f"  {name}: {headline(m)}", flush=True)
        print(f"  selection score {row['selection_score']:.4f}", flush=True)
        return row, per_set

    def state(self, epoch: int, progress: Progress) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "epoch": epoch,
            "best_score": progress.best_score,
            "best_epoch": progress.best_epoch,
            "history_json": json.dumps(progress.history),
            "torch_rng": torch.get_rng_state(),
            **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
        }

    def restore(self, state_path: Path) -> Progress:
        """Continue from ``state.pt`` (loaded with ``weights_only=True``)."""
        state = torch.load(state_path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])
        if self.dist.is_main:
            print(f"resumed from {state_path} after epoch {int(state['epoch'])}", flush=True)
        return Progress(
            history=json.loads(state["history_json"]),
            start_epoch=int(state["epoch"]) + 1,
            best_score=float(state["best_score"]),
            best_epoch=int(state["best_epoch"]),
        )


def _synced_bn(device: torch.device) -> bool:
    """SyncBatchNorm is used under DDP on CUDA; PyTorch's does not run on CPU (see
    :mod:`model.distributed`)."""
    return device.type == "cuda"


def base_config(
    cfg: TrainConfig,
    data: TrainData,
    device: torch.device,
    init_version: str = "",
    dist_info: distributed.DistInfo | None = None,
) -> dict[str, Any]:
    """What the checkpoint says about how it was made (command, data, recipe)."""
    return dict(
        name=cfg.name or Path(cfg.out).name,
        model=ModelConfig(
            backbone=cfg.backbone, use_metadata=cfg.use_metadata, num_classes=len(data.classes)
        ),
        classes=data.classes,
        preprocessing=cfg.preprocessing(),
        training={
            "command": cfg.command,
            "config": asdict(cfg),
            "split_file": repo_relative(data.sources[0].split_file or cfg.splits),
            "split_sha256": data.split_hash,
            "sources": [s.to_dict() for s in data.sources],
            "train_class_counts": dict(zip(data.classes, data.counts.tolist(), strict=True)),
            "selection_rule": selection_rule(data.classes),
            "init_from_version": init_version,
            "device": str(device),
            **_distributed_config(dist_info or distributed.DistInfo(), device, cfg.batch_size),
        },
    )


def _distributed_config(
    info: distributed.DistInfo, device: torch.device, batch_size: int
) -> dict[str, Any]:
    """``world_size`` always; how the processes cooperated when there were several."""
    if not info.enabled:
        return {"world_size": 1}
    return {
        "world_size": info.world_size,
        "distributed": {
            "backend": info.backend,
            "batch_size_per_process": batch_size,
            "global_batch_size": batch_size * info.world_size,
            "sync_batchnorm": _synced_bn(device),
            "sampler": "DistributedWeightedSampler (disjoint shares of one weighted sample)",
            "validation": "rank 0 on the full validation sets",
        },
    }


def train(cfg: TrainConfig) -> Path:
    """Run a full training job; returns the output folder holding the final checkpoint.

    Under ``torchrun`` every process runs this; they join one process group first."""
    info, dist_device = distributed.init(cfg.device)
    try:
        return _train(cfg, info, dist_device or pick_device(cfg.device))
    finally:
        distributed.shutdown()


def _train(cfg: TrainConfig, info: distributed.DistInfo, device: torch.device) -> Path:
    out = Path(cfg.out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # Each rank its own augmentation / dropout stream; rank 0's is the single-process one.
    seed_everything(cfg.seed + info.rank)
    try:
        data = prepare_data(cfg, out)
    except BaseException:
        if created and info.is_main:  # refused data (a leak, a bad folder): no empty run left
            shutil.rmtree(out, ignore_errors=True)
        raise
    trainer = Trainer(cfg, data, device, info)
    state_path = out / "state.pt"
    progress = trainer.restore(state_path) if cfg.resume and state_path.is_file() else Progress()
    if info.enabled and progress.start_epoch > 1:
        # state.pt holds rank 0's random state; give every rank back a stream of its own.
        seed_everything(cfg.seed + info.rank + 7919 * progress.start_epoch)
    base = base_config(cfg, data, device, trainer.init_version, info)
    for epoch in range(progress.start_epoch, cfg.epochs + 1):
        if progress.best_epoch and epoch - progress.best_epoch > cfg.patience:
            print(f"early stop: no val improvement for {cfg.patience} epochs", flush=True)
            break
        t0 = time.time()
        row, per_set = trainer.validate_epoch(epoch, trainer.train_epoch(epoch), t0)
        progress.history.append(row)
        improved = row["selection_score"] > progress.best_score
        if improved:
            progress.best_score, progress.best_epoch = row["selection_score"], epoch
        if info.is_main:
            if improved:
                ck = CheckpointConfig(**base, metrics={"val_uncalibrated": per_set})
                ck.training["best_epoch"] = epoch
                save_checkpoint(trainer.evaluated, ck, out / "best")
            write_history(progress.history, out)
            torch.save(trainer.state(epoch, progress), state_path.with_suffix(".tmp"))
            state_path.with_suffix(".tmp").replace(state_path)
    if info.enabled:
        digest = distributed.check_identical(trainer.model, trainer.evaluated)
        if info.is_main:
            print(f"all {info.world_size} ranks hold identical weights (sha256 {digest})")
    if info.is_main:
        finalize(out, data.sets, device)
    distributed.barrier()  # the other ranks wait for rank 0's final checkpoint
    return out


def finalize(out: Path, sets: EvalSets, device: torch.device) -> Path:
    """Calibrate the best checkpoint on val, score it on test, write the final checkpoint."""
    model, ck = load_checkpoint(out / "best", device=device)
    detector = calibrate_and_score(model, ck, sets, device)
    save_checkpoint(model, ck, out)
    detector.save(out)
    export_onnx(out, model, ck)  # every final checkpoint ships with its ONNX export
    return out
