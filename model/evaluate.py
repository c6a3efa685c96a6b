"""Evaluate a checkpoint on HAM10000-format folders: metrics.json, predictions.csv and confusion /
ROC / reliability PNGs.

``split="test"`` scores the stored test split of ``data_dir`` (the split file named in the
checkpoint, verified by its SHA-256); ``split="all"`` scores every row. ``external`` folders are
scored whole, each as its own source. With ``by_source`` every source (a folder, or the values of a
``source`` column in its CSV) gets its own metrics — a model that is good on HAM10000 and poor
elsewhere shows it here — including the share of images the unreliable-prediction warning flags.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from common.errors import DataError
from common.plotting import pyplot
from data_pipeline.ham10000 import load_metadata
from data_pipeline.schema import ClassSet
from data_pipeline.sources import source_name
from data_pipeline.splits import REPO_ROOT, select_split
from model.bootstrap import LEVEL, bootstrap_intervals, check_n_boot
from model.calibration import softmax
from model.checkpoint import CheckpointConfig, load_checkpoint, resolve_dir
from model.engine import collect_outputs, eval_loader
from model.metrics import compute_metrics, reliability_bins
from model.onnx_runtime import OnnxEngine
from model.ood import FeatureDistance, flag_rates
from model.subgroups import group_columns, parse_by, plot_subgroups, subgroup_report


def split_file_for(cfg: CheckpointConfig, override: Path | None = None) -> Path:
    """The split CSV a checkpoint was trained with (by stored path, else by name under splits/)."""
    if override is not None:
        return override
    stored = cfg.training.get("split_file")
    if not stored:
        raise DataError("The checkpoint records no split file; pass --splits or use --split all.")
    for candidate in (
        Path(stored),
        REPO_ROOT / Path(stored),
        REPO_ROOT / "splits" / Path(stored).name,
    ):
        if candidate.is_file():
            return candidate
    raise DataError(f"Split file {stored} recorded in the checkpoint was not found; pass --splits.")


def select_rows(
    df: pd.DataFrame, cfg: CheckpointConfig, split: str | None, splits_path: Path | None
) -> tuple[pd.DataFrame, dict]:
    """Rows of ``split`` (None: the test part when the folder has a split — its own ``split``
    column or the checkpoint's split file covering it — else the whole folder); see
    :func:`data_pipeline.splits.select_split`."""
    path = splits_path
    if path is None and split != "all" and "split" not in df.columns:
        try:
            path = split_file_for(cfg)
        except DataError:
            if split is not None:
                raise
    return select_split(
        df,
        split,
        path,
        explicit=splits_path is not None,
        expected_sha=cfg.training.get("split_sha256"),
    )


def _rows(
    data_dir: Path | str,
    cfg: CheckpointConfig,
    split: str | None,
    splits_path: Path | None,
    external: Sequence[Path | str],
) -> tuple[pd.DataFrame, dict]:
    """Every row to score, with a ``source`` column (a CSV's own ``source`` column wins)."""
    df, info = select_rows(load_metadata(data_dir, classes=cfg.classes), cfg, split, splits_path)
    frames = [_with_source(df, data_dir)]
    frames += [
        _with_source(load_metadata(folder, classes=cfg.classes), folder) for folder in external
    ]
    rows = pd.concat(frames, ignore_index=True)
    if rows.empty:
        raise DataError(f"No rows in split {info['split']!r} of {data_dir}.")
    return rows, info


def _with_source(df: pd.DataFrame, folder: Path | str) -> pd.DataFrame:
    """Rows tagged with their source: the CSV's own ``source`` column, else the folder's name."""
    return df if "source" in df else df.assign(source=source_name(folder))


def _score(
    labels: np.ndarray,
    probs: np.ndarray,
    distance: np.ndarray | None,
    thr: float,
    classes: ClassSet,
) -> dict:
    m = compute_metrics(labels, probs, classes)
    m["flagged"] = flag_rates(probs.max(axis=1), distance, thr)
    return m


def evaluate(
    data_dir: Path | str,
    checkpoint: Path | str | None = None,
    out: Path | str | None = None,
    split: str | None = None,
    tta: bool = False,
    splits_path: Path | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    progress: bool = False,
    external: Sequence[Path | str] = (),
    by_source: bool = False,
    geometry: str | None = None,
    runtime: str | None = None,
    bootstrap: int = 1000,
    by: Sequence[str] = (),
) -> dict:
    """Score ``checkpoint`` (None → shipped model); writes files to ``out`` when given.

    ``geometry`` overrides the checkpoint's framing policy (to measure squash / pad / crop).
    ``runtime``: auto (ONNX Runtime on a CPU when the checkpoint's export is valid), onnx or
    torch; None reads ``$DERMFUSION_RUNTIME``. ``bootstrap`` draws of whole lesions (0: none) give
    95 % intervals of the headline metrics per source under ``intervals``: on a
    test set of 15 dermatofibromas one image moves balanced accuracy by about 0.01, and a reader
    of the figures should see how far they can move by chance. ``by``: subgroup keys
    (:data:`model.subgroups.KEYS`) audited under ``subgroups`` (:mod:`model.subgroups`)."""
    check_out(out)
    by = parse_by(by) if by else ()
    if bootstrap:
        check_n_boot(bootstrap)
    folder = resolve_dir(checkpoint)
    model, cfg = load_checkpoint(folder, device=device)
    engine = None
    if torch.device(device).type == "cpu":
        engine = OnnxEngine.for_checkpoint(folder, cfg, runtime)
    pre = cfg.preprocessing if geometry is None else replace(cfg.preprocessing, geometry=geometry)
    df, info = _rows(data_dir, cfg, split, splits_path, external)
    loader = eval_loader(df, pre, batch_size=batch_size)
    logits, labels, feats = collect_outputs(
        model, loader, device, tta=tta, progress=progress, engine=engine
    )
    probs = softmax(logits, cfg.temperature)
    distance, threshold = None, float("inf")
    detector = FeatureDistance.from_checkpoint(folder, cfg.ood)
    if detector is not None:
        distance, threshold = detector.distance(torch.from_numpy(feats)).numpy(), detector.threshold
    metrics = _score(labels, probs, distance, threshold, cfg.classes)
    if by_source:
        src = df["source"].to_numpy()
        metrics["by_source"] = {
            name: _score(
                labels[src == name],
                probs[src == name],
                None if distance is None else distance[src == name],
                threshold,
                cfg.classes,
            )
            for name in dict.fromkeys(src)
        }
    predictions = _predictions_frame(df, labels, probs, distance, cfg.classes)
    if by:
        groups = group_columns(df, by, progress)
        new = [c for c in groups.columns if c not in predictions.columns]
        predictions = pd.concat([predictions, groups[new].reset_index(drop=True)], axis=1)
        metrics["subgroups"] = subgroup_report(predictions, by, bootstrap, classes=cfg.classes)
    if bootstrap:
        metrics["intervals"] = {
            "n_boot": bootstrap,
            "level": LEVEL,
            "resampled": "lesions within each source",
            "by_source": bootstrap_intervals(predictions, n_boot=bootstrap, classes=cfg.classes),
        }
    metrics.update(
        {
            "checkpoint": str(folder),
            "model_version": cfg.version,
            "class_set": cfg.classes.to_dict(),
            "data_dir": str(data_dir),
            "external": [str(e) for e in external],
            "tta": tta,
            "runtime": engine.name if engine is not None else "torch",
            "temperature": cfg.temperature,
            "preprocessing": pre.to_dict(),
            **info,
        }
    )
    if out is not None:
        _write(Path(out), metrics, predictions, labels, probs, cfg.classes)
    return metrics


def _predictions_frame(
    df: pd.DataFrame,
    labels: np.ndarray,
    probs: np.ndarray,
    distance: np.ndarray | None,
    classes: ClassSet,
) -> pd.DataFrame:
    """What ``predictions.csv`` holds (and what :mod:`model.compare` reads back)."""
    return pd.DataFrame(
        {
            "source": df["source"].to_numpy(),
            "image_id": df["image_id"].to_numpy(),
            "lesion_id": df["lesion_id"].to_numpy(),
            "dx": df["dx"].to_numpy(),
            **{f"p_{c}": probs[:, i] for i, c in enumerate(classes)},
            "ood_distance": distance if distance is not None else np.nan,
        }
    )


def _write(
    out: Path,
    metrics: dict,
    predictions: pd.DataFrame,
    labels: np.ndarray,
    probs: np.ndarray,
    classes: ClassSet,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    predictions.to_csv(out / "predictions.csv", index=False)
    plot_confusion(metrics, out / "confusion_matrix.png")
    plot_roc(labels, probs, out / "roc.png", classes)
    plot_reliability(labels, probs, out / "reliability.png")
    if "subgroups" in metrics:
        plot_subgroups(metrics["subgroups"], out / "subgroups.png")


def check_out(out: Path | str | None) -> None:
    """Refuse, before any work is done, an output path that cannot become a folder: an
    existing file, or one under a file or an unwritable folder (found only after a whole
    evaluation otherwise)."""
    if out is None:
        return
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise DataError(f"--out {out} is an existing file; give a folder for metrics.json.")
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise DataError(f"--out {out}: {existing} is a file, not a folder; give another --out.")
    if not os.access(existing, os.W_OK):
        raise DataError(f"--out {out}: cannot write into {existing}; give another --out.")


def plot_confusion(metrics: dict, path: Path) -> None:
    plt = pyplot()
    cm = np.asarray(metrics["confusion_matrix"], dtype=float)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    classes = metrics["classes"]
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(classes)):
        for j in range(len(classes)):
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


def plot_roc(labels: np.ndarray, probs: np.ndarray, path: Path, classes: ClassSet) -> None:
    from sklearn.metrics import auc, roc_curve

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for i, c in enumerate(classes):
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
    plt = pyplot()
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
