"""Evaluate a checkpoint on a HAM10000-format folder: metrics.json + confusion / ROC / reliability PNGs.

``split="test"`` scores the stored test split (the split file named in the checkpoint, verified by
its SHA-256); ``split="all"`` scores every row — for external sets, which may lack some classes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from torch.utils.data import DataLoader

from data_pipeline.dataset import LesionDataset
from common.errors import DataError
from data_pipeline.ham10000 import load_metadata
from data_pipeline.schema import CLASSES
from data_pipeline.splits import SPLITS, attach_splits, file_sha256, load_splits
from data_pipeline.transforms import ImageTransform
from model.calibration import softmax
from model.checkpoint import CheckpointConfig, load_checkpoint, resolve_dir
from model.engine import collect_logits
from model.metrics import compute_metrics, reliability_bins

REPO = Path(__file__).resolve().parent.parent


def split_file_for(cfg: CheckpointConfig, override: Path | None = None) -> Path:
    """The split CSV a checkpoint was trained with (by stored path, else by name under splits/)."""
    if override is not None:
        return override
    stored = cfg.training.get("split_file")
    if not stored:
        raise DataError("The checkpoint records no split file; pass --splits or use --split all.")
    for candidate in (Path(stored), REPO / "splits" / Path(stored).name):
        if candidate.is_file():
            return candidate
    raise DataError(f"Split file {stored} recorded in the checkpoint was not found; pass --splits.")


def select_rows(
    df: pd.DataFrame, cfg: CheckpointConfig, split: str, splits_path: Path | None
) -> tuple[pd.DataFrame, dict]:
    if split == "all":
        return df, {"split": "all"}
    if split not in SPLITS:
        raise DataError(f"Unknown split {split!r}: use one of {', '.join(SPLITS)} or all.")
    path = split_file_for(cfg, splits_path)
    digest = file_sha256(path)
    expected = cfg.training.get("split_sha256")
    info = {"split": split, "split_file": str(path), "split_sha256": digest}
    if expected and digest != expected:
        info["warning"] = "split file differs from the one the checkpoint was trained with"
    df = attach_splits(df, load_splits(path))
    return df[df["split"] == split], info


def evaluate(
    data_dir: Path | str,
    checkpoint: Path | str | None = None,
    out: Path | str | None = None,
    split: str = "test",
    tta: bool = False,
    splits_path: Path | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    progress: bool = False,
) -> dict:
    """Score ``checkpoint`` (None → shipped model); writes files to ``out`` when given."""
    folder = resolve_dir(checkpoint)
    model, cfg = load_checkpoint(folder, device=device)
    df, info = select_rows(load_metadata(data_dir), cfg, split, splits_path)
    if df.empty:
        raise DataError(f"No rows in split {split!r} of {data_dir}.")
    loader = DataLoader(
        LesionDataset(df, ImageTransform(cfg.preprocessing, train=False)),
        batch_size=batch_size,
        shuffle=False,
    )
    logits, labels = collect_logits(model, loader, device, tta=tta, progress=progress)
    probs = softmax(logits, cfg.temperature)
    metrics = compute_metrics(labels, probs, CLASSES)
    metrics.update(
        {
            "checkpoint": str(folder),
            "model_version": cfg.version,
            "data_dir": str(data_dir),
            "tta": tta,
            "temperature": cfg.temperature,
            **info,
        }
    )
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        pd.DataFrame(
            {
                "image_id": df["image_id"].to_numpy(),
                "dx": df["dx"].to_numpy(),
                **{f"p_{c}": probs[:, i] for i, c in enumerate(CLASSES)},
            }
        ).to_csv(out / "predictions.csv", index=False)
        plot_confusion(metrics, out / "confusion_matrix.png")
        plot_roc(labels, probs, out / "roc.png")
        plot_reliability(labels, probs, out / "reliability.png")
    return metrics


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(metrics: dict, path: Path) -> None:
    plt = _plt()
    cm = np.asarray(metrics["confusion_matrix"], dtype=float)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(CLASSES)), CLASSES)
    ax.set_yticks(range(len(CLASSES)), CLASSES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(CLASSES)):
        for j in range(len(CLASSES)):
            ax.text(
                j,
                i,
                f"{int(cm[i, j])}",
                ha="center",
                va="center",
                color="white" if norm[i, j] > 0.5 else "black",
                fontsize=8,
            )
    ax.set_title(f"Confusion (row-normalised colour), bal. acc {metrics['balanced_accuracy']:.3f}")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_roc(labels: np.ndarray, probs: np.ndarray, path: Path) -> None:
    from sklearn.metrics import auc, roc_curve

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for i, c in enumerate(CLASSES):
        pos = labels == i
        if pos.any() and not pos.all():
            fpr, tpr, _ = roc_curve(pos, probs[:, i])
            ax.plot(fpr, tpr, label=f"{c} (AUC {auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("One-vs-rest ROC")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_reliability(labels: np.ndarray, probs: np.ndarray, path: Path) -> None:
    plt = _plt()
    bins = reliability_bins(probs, labels)
    width = 1.0 / len(bins["bin_lower"])
    acc = [a if a is not None else 0 for a in bins["accuracy"]]
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.bar(bins["bin_lower"], acc, width=width, align="edge", edgecolor="black", label="accuracy")
    ax.plot([0, 1], [0, 1], "r--", label="perfect calibration")
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability diagram")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
