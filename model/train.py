"""Training: lesion-grouped splits, weighted sampling, class-aware loss, warm-up + cosine LR,
best-by-val-balanced-accuracy, early stopping, resume, temperature scaling, self-describing output.

Files written to ``out`` as training goes (so a killed run can ``--resume``):

* ``state.pt``        — last epoch's weights, optimiser, scheduler, RNG and history
  (plain tensors/containers, loadable with ``weights_only=True``);
* ``best/``           — best-so-far checkpoint (safetensors + config);
* ``history.csv`` / ``history.json`` / ``learning_curve.png`` — per-epoch logs;
* ``splits.csv``      — the exact split used;
* at the end ``model.safetensors`` + ``config.json`` — the calibrated final checkpoint, with val
  and test metrics.
"""

from __future__ import annotations

import json
import math
import random
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from data_pipeline.dataset import LesionDataset, class_counts, make_weighted_sampler
from data_pipeline.ham10000 import load_metadata
from data_pipeline.schema import CLASSES
from data_pipeline.splits import load_or_make_splits
from data_pipeline.transforms import AugmentConfig, ImageTransform, Preprocessing
from model.calibration import fit_temperature, softmax
from model.checkpoint import CheckpointConfig, save_checkpoint
from model.ema import WeightEMA
from model.engine import collect_logits
from model.metrics import compute_metrics, headline
from model.network import FusionNet, ModelConfig, Network
from model.ood import FeatureDistance, fit_ood

DEFAULT_SPLITS = Path(__file__).resolve().parent.parent / "splits" / "ham10000_seed42.csv"


@dataclass
class TrainConfig:
    data_dir: str
    out: str
    splits: str = str(DEFAULT_SPLITS)
    backbone: str = "tf_efficientnet_lite0"
    use_metadata: bool = True
    pretrained: bool = True
    height: int = 192
    width: int = 192
    epochs: int = 14
    batch_size: int = 32
    lr: float = 1e-3
    backbone_lr_mult: float = 0.3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    sampler_power: float = 0.5
    loss_power: float = 0.5
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


def _repo_relative(path: str | Path) -> str:
    """Paths inside the repository are stored relative to it, so configs travel between clones."""
    p = Path(path).resolve()
    root = DEFAULT_SPLITS.parent.parent
    return str(p.relative_to(root)) if p.is_relative_to(root) else str(p)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def loss_weights(counts: np.ndarray, sampler_power: float, loss_power: float) -> torch.Tensor:
    """Class weights ∝ n_c^-loss_power, normalised to mean 1 under the sampled distribution."""
    counts = np.maximum(np.asarray(counts, dtype=np.float64), 1.0)
    w = counts**-loss_power
    sampled = counts ** (1.0 - sampler_power)
    sampled = sampled / sampled.sum()
    return torch.tensor(w / (w * sampled).sum(), dtype=torch.float32)


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, [h["train_loss"] for h in history], "o-", label="train loss")
    a.plot(ep, [h["val_loss"] for h in history], "o-", label="val loss (NLL)")
    a.set_xlabel("epoch")
    a.legend()
    for key in ("val_balanced_accuracy", "val_macro_auc", "val_accuracy"):
        b.plot(ep, [h[key] for h in history], "o-", label=key.replace("val_", "val "))
    b.set_xlabel("epoch")
    b.set_ylim(0, 1)
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def make_loaders(cfg: TrainConfig, df: pd.DataFrame, pre: Preprocessing):
    train_df = df[df["split"] == "train"]
    blank = cfg.meta_blank_prob if cfg.use_metadata else 0.0
    train_ds = LesionDataset(
        train_df, ImageTransform(pre, train=True, aug=AugmentConfig()), blank, cfg.seed
    )
    sampler = make_weighted_sampler(train_ds.labels, cfg.sampler_power, seed=cfg.seed)
    kw = dict(num_workers=cfg.workers, persistent_workers=cfg.workers > 0)
    train_loader = DataLoader(
        train_ds, batch_size=cfg.batch_size, sampler=sampler, drop_last=True, **kw
    )
    eval_tf = ImageTransform(pre, train=False)
    loaders = {"train": train_loader}
    for split in ("val", "test"):
        ds = LesionDataset(df[df["split"] == split], eval_tf)
        loaders[split] = DataLoader(ds, batch_size=64, shuffle=False, **kw)
    return loaders, train_ds


def train(cfg: TrainConfig) -> Path:
    """Run a full training job; returns the output folder holding the final checkpoint."""
    from tqdm import tqdm

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    command = " ".join(shlex.quote(a) for a in ["python", "-m", "scripts.train", *sys.argv[1:]])

    df = load_metadata(cfg.data_dir)
    df, split_hash = load_or_make_splits(df, cfg.splits, seed=cfg.seed)
    df[["image_id", "lesion_id", "dx", "split"]].to_csv(out / "splits.csv", index=False)
    pre = Preprocessing(height=cfg.height, width=cfg.width)
    loaders, train_ds = make_loaders(cfg, df, pre)
    counts = class_counts(train_ds.labels)

    mcfg = ModelConfig(backbone=cfg.backbone, use_metadata=cfg.use_metadata)
    model = FusionNet(mcfg, pretrained=cfg.pretrained).to(device)
    opt = torch.optim.AdamW(
        model.param_groups(cfg.lr, cfg.backbone_lr_mult), weight_decay=cfg.weight_decay
    )
    steps_per_epoch = len(loaders["train"])
    if cfg.max_train_batches:
        steps_per_epoch = min(steps_per_epoch, cfg.max_train_batches)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lr_lambda(cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)),
    )
    criterion = nn.CrossEntropyLoss(
        weight=loss_weights(counts, cfg.sampler_power, cfg.loss_power).to(device),
        label_smoothing=cfg.label_smoothing,
    )
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    ema = WeightEMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    evaluated = ema.module if ema else model  # what is validated, selected and shipped

    history: list[dict] = []
    start_epoch, best_score, best_epoch = 1, -1.0, 0
    state_path = out / "state.pt"
    if cfg.resume and state_path.is_file():
        state = torch.load(state_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        history = json.loads(state["history_json"])
        start_epoch = int(state["epoch"]) + 1
        best_score, best_epoch = float(state["best_score"]), int(state["best_epoch"])
        torch.set_rng_state(state["torch_rng"])
        if ema is not None and "ema" in state:
            ema.load_state_dict(state["ema"])
        print(f"resumed from {state_path} after epoch {start_epoch - 1}", flush=True)

    name = cfg.name or out.name
    base_cfg = dict(
        name=name,
        model=mcfg,
        preprocessing=pre,
        training={
            "command": command,
            "config": asdict(cfg),
            "split_file": _repo_relative(cfg.splits),
            "split_sha256": split_hash,
            "train_class_counts": dict(zip(CLASSES, counts.tolist())),
            "device": str(device),
        },
    )
    for epoch in range(start_epoch, cfg.epochs + 1):
        if best_epoch and epoch - best_epoch > cfg.patience:
            print(f"early stop: no val improvement for {cfg.patience} epochs", flush=True)
            break
        model.train()
        t0, seen, total_loss = time.time(), 0, 0.0
        bar = tqdm(loaders["train"], total=steps_per_epoch, desc=f"epoch {epoch}/{cfg.epochs}")
        for step, (images, meta, y) in enumerate(bar):
            if step >= steps_per_epoch:
                break
            images, meta, y = images.to(device), meta.to(device), y.to(device)
            with torch.autocast(device_type=device.type, enabled=device.type == "cuda"):
                loss = criterion(model(images, meta).float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            if ema is not None:
                ema.update(model)
            seen += len(y)
            total_loss += loss.item() * len(y)
            bar.set_postfix(
                loss=f"{total_loss / seen:.3f}", img_s=f"{seen / (time.time() - t0):.1f}"
            )
        bar.close()
        train_time = time.time() - t0
        logits, labels = collect_logits(evaluated, loaders["val"], device)
        val = compute_metrics(labels, softmax(logits), CLASSES)
        row = {
            "epoch": epoch,
            "train_loss": total_loss / max(seen, 1),
            "train_img_per_s": seen / train_time,
            "val_loss": val["nll"],
            "val_accuracy": val["accuracy"],
            "val_balanced_accuracy": val["balanced_accuracy"],
            "val_macro_f1": val["macro_f1"],
            "val_macro_auc": val["macro_auc"],
            "lr_head": opt.param_groups[1]["lr"],
            "epoch_seconds": time.time() - t0,
        }
        history.append(row)
        print(f"epoch {epoch}: train_loss {row['train_loss']:.4f}  val {headline(val)}", flush=True)
        if val["balanced_accuracy"] > best_score:
            best_score, best_epoch = val["balanced_accuracy"], epoch
            ck = CheckpointConfig(**base_cfg, metrics={"val_uncalibrated": val})
            ck.training["best_epoch"] = epoch
            save_checkpoint(evaluated, ck, out / "best")
        write_history(history, out)
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "epoch": epoch,
                "best_score": best_score,
                "best_epoch": best_epoch,
                "history_json": json.dumps(history),
                "torch_rng": torch.get_rng_state(),
                **({"ema": ema.state_dict()} if ema is not None else {}),
            },
            state_path.with_suffix(".tmp"),
        )
        state_path.with_suffix(".tmp").replace(state_path)

    return finalize(out, loaders, device)


def finalize(out: Path, loaders: dict, device: torch.device) -> Path:
    """Calibrate the best checkpoint on val, score it on test, write the final checkpoint."""
    from model.checkpoint import load_checkpoint

    model, ck = load_checkpoint(out / "best", device=device)
    detector = calibrate_and_score(model, ck, loaders, device)
    save_checkpoint(model, ck, out)
    detector.save(out)
    return out


def calibrate_and_score(
    model: Network, ck: CheckpointConfig, loaders: dict, device: torch.device | str
) -> FeatureDistance:
    """Fit the OOD check and the temperature on val, score val and test; fills ``ck`` in place.
    Shared by training and by ensembling, so both ship identically described checkpoints."""
    detector, ck.ood = fit_ood(model, loaders["val"], device)
    val_logits, val_labels = collect_logits(model, loaders["val"], device)
    ck.temperature = fit_temperature(val_logits, val_labels)
    test_logits, test_labels = collect_logits(model, loaders["test"], device)
    ck.metrics = {
        "val": compute_metrics(val_labels, softmax(val_logits, ck.temperature), CLASSES),
        "test": compute_metrics(test_labels, softmax(test_logits, ck.temperature), CLASSES),
    }
    print(f"temperature {ck.temperature:.3f}", flush=True)
    print(f"val  {headline(ck.metrics['val'])}", flush=True)
    print(f"test {headline(ck.metrics['test'])}", flush=True)
    return detector
