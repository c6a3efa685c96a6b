"""Adapt a trained model to a clinic's own images: a short fine-tune on its labelled cases.

Measured in this project: the one change that moved melanoma detection on another source was
training on that source's own images. A clinic holds such images, but not the hours of CPU a full
training takes, so adapting is kept to minutes on 2 CPU cores:

* **What is tuned.** Each network of the model (every member of an ensemble, or one with
  ``FOLDER#K``) keeps its early backbone stages frozen; only the last ``train_blocks`` stages, the
  final 1x1 convolution, the metadata MLP and the classifier learn (BatchNorm statistics stay
  frozen: a few dozen local images must not redefine them). The frozen start runs **once** per
  image and its activations are cached (:class:`Cache`), so every epoch, every draw of the
  learning curve and every measurement runs only the cheap end of the network (:class:`Tail`).
  The price: no augmentation (each image is seen as it is), which few epochs at a small learning
  rate and selection on validation keep in check.
* **Which images.** ``DIR``'s own ``split`` column when it has one; else a lesion- and
  patient-grouped split (:func:`split_parts`), saved as ``RUN/splits.csv``. An explicit test
  folder (``test_dir``) replaces the test part and is never trained on.
* **Selection and calibration** follow the project's rule (:mod:`model.scoring`): the epoch with
  the best validation selection score is kept (epoch 0, the parent itself, included, so adapting
  can never ship a model worse on the clinic's validation images than it started), then the
  temperature and the unreliable-input check are refitted on the new validation part by
  :func:`model.scoring.calibrate_and_score`, as training and ensembling do.
* **What it changed** is measured on ``DIR``'s test part and on the HAM10000 test split (what
  adapting forgot): before, after and the paired gain with 95 % bootstrap intervals
  (:mod:`model.bootstrap`, :mod:`model.compare`), stored in ``config.json`` → ``metrics.adapt``.
* **How many labels are worth it** (``budgets``): the learning curve repeats the adaptation on
  class-stratified random draws of 25, 50, ... training images and plots the gain on the test
  part against the number of labelled images (``RUN/label_budget.{csv,json,png}``). The
  validation part stays whole for every draw (it selects the epoch), so a clinic needs those
  labels too.

Everything is written to a temporary folder renamed to ``RUN`` at the end: a failed run leaves
no half-written checkpoint. The result is an ordinary checkpoint: every CLI and the app take it
with ``--checkpoint RUN``.
"""

from __future__ import annotations

import copy
import os
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from common.errors import DataError, DermError
from common.plotting import pyplot
from data_pipeline.dataset import class_counts, make_weighted_sampler
from data_pipeline.ham10000 import find_metadata_csv, load_metadata
from data_pipeline.schema import HAM7, ClassSet
from data_pipeline.sources import source_name
from data_pipeline.splits import REPO_ROOT, SPLITS, file_sha256, make_splits, save_splits
from data_pipeline.transforms import Preprocessing
from model.bootstrap import LEVEL, check_n_boot, reported_metrics, set_intervals
from model.calibration import fit_temperature, softmax
from model.checkpoint import (
    SHIPPED_DIR,
    CheckpointConfig,
    load_checkpoint,
    resolve_dir,
    round_weights,
    save_checkpoint,
)
from model.compare import compare_predictions
from model.engine import collect_outputs, eval_loader
from model.ensemble import _split_member
from model.evaluate import select_rows
from model.losses import class_weights, source_aware_ce
from model.metrics import compute_metrics, headline
from model.network import FusionEnsemble, FusionNet, Network
from model.onnx_runtime import export_onnx
from model.ood import flag_rates
from model.scoring import EvalSets, calibrate_and_score, selection_rule, selection_score
from model.train import lr_lambda, repo_relative, seed_everything

#: Figures printed and plotted before / after (keys of model.bootstrap.reported_metrics).
SHOWN = ("balanced_accuracy", "mel_auc", "mel_recall", "macro_auc", "malignant_auc")
#: Where the HAM10000 copy is looked for when ``ham_dir`` is not given (as the tests do).
DATA_ENV = "DERMFUSION_DATA_DIR"
HAM_SOURCE = "ham10000-test"


class AdaptError(DermError):
    """Input that adapting cannot use (a bad budget, a model it cannot tune, a tiny dataset)."""


@dataclass
class AdaptConfig:
    data_dir: str
    out: str
    parent: str = ""
    test_dir: str = ""
    #: HAM10000 folder for the forgetting check; "" looks in $DERMFUSION_DATA_DIR and
    #: ../shared/ham10000 (skipped with a note when absent); "none" skips it.
    ham_dir: str = ""
    train_blocks: int = 1
    epochs: int = 4
    epoch_samples: int = 512
    batch_size: int = 32
    lr: float = 3e-4
    backbone_lr_mult: float = 0.3
    weight_decay: float = 1e-4
    sampler_power: float = 0.5
    loss_power: float = 0.5
    label_smoothing: float = 0.05
    #: Renormalise the loss over the classes the local training part shows (a clinic sample
    #: without vasc is no evidence that vasc does not exist: see model.losses).
    mask_absent: bool = True
    budgets: tuple[int, ...] = ()
    draws: int = 3
    seed: int = 42
    threads: int = 0
    n_boot: int = 1000
    batch_eval: int = 64
    device: str = "cpu"
    name: str = ""
    command: str = field(default="", metadata={"help": "the command line, recorded in config"})


def parse_budgets(text: str) -> tuple[int, ...]:
    """``"25,50,100,all"`` → ``(25, 50, 100, 0)``; 0 stands for the whole training part."""
    out: list[int] = []
    for item in (t.strip().lower() for t in text.split(",")):
        if item == "all":
            out.append(0)
            continue
        if not item.isdigit() or int(item) < 1:
            raise AdaptError(f"--label-budget: {item!r} is not a positive number of images or all.")
        out.append(int(item))
    if not out:
        raise AdaptError("--label-budget: give at least one budget, e.g. 25,50,100,all.")
    return tuple(dict.fromkeys(out))


# --- which images ---------------------------------------------------------------------------


def _groups(df: pd.DataFrame) -> pd.Series:
    """The unit a split must not cut: the patient where known, else the lesion."""
    lesion = df["lesion_id"].astype(str)
    if "patient_id" not in df:
        return lesion
    patient = df["patient_id"].where(df["patient_id"].notna() & (df["patient_id"] != ""))
    return ("patient:" + patient.astype(str)).where(patient.notna(), "lesion:" + lesion)


def _carve(df: pd.DataFrame, part: str, seed: int) -> pd.DataFrame:
    """Move about 15 % of the training rows (whole patients / lesions, class-stratified) to
    ``part``; uses :func:`data_pipeline.splits.make_splits`' grouped fold."""
    train = df.index[df["split"] == "train"]
    rows = df.loc[train].assign(lesion_id=_groups(df.loc[train]).to_numpy())
    try:
        with warnings.catch_warnings():  # small classes: sklearn warns that it cannot stratify
            warnings.filterwarnings("ignore", "The least populated class", UserWarning)
            carved = make_splits(rows, seed=seed)
    except DataError as exc:
        raise AdaptError(f"cannot hold out a {part} part: {exc}") from None
    df = df.copy()
    df.loc[train[(carved["split"] == "val").to_numpy()], "split"] = part
    return df


def split_parts(df: pd.DataFrame, has_test_dir: bool, seed: int) -> tuple[pd.DataFrame, str]:
    """``df`` with a ``split`` column of train / val / test and where it came from.

    A folder's own ``split`` column (a publisher's official split) is kept; a part it lacks is
    carved from its training rows, grouped by patient and lesion. With an explicit test folder the
    folder's own test rows are left out (neither trained on nor scored)."""
    official = "split" in df and df["split"].notna().all()
    if official:
        split = df["split"].astype(str).str.strip().str.lower()
        split = split.replace({"valid": "val", "validation": "val"})
        bad = ~split.isin(SPLITS)
        if bad.any():
            raise AdaptError(
                f"unknown split value {df['split'][bad].iloc[0]!r} in the folder's split column "
                f"(expected {', '.join(SPLITS)})."
            )
        df = df.assign(split=split.to_numpy())
        origin = "the folder's own split column"
    else:
        df = df.assign(split="train")
        origin = "a patient- and lesion-grouped split made by scripts.adapt"
    if has_test_dir:
        df = df[df["split"] != "test"]
    for part in ("val", *(() if has_test_dir else ("test",))):
        if not (df["split"] == part).any():
            df = _carve(df, part, seed + len(part))
            origin += f" ({part} carved from its train rows)" if official else ""
    return df.reset_index(drop=True), origin


def stratified_draw(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of ``n`` rows drawn at random, each class keeping its share (largest remainder;
    every class present keeps at least one image when ``n`` allows)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    if n >= len(labels):
        return np.arange(len(labels))
    quota = counts * n / counts.sum()
    take = np.floor(quota).astype(int)
    if n >= len(classes):
        take = np.maximum(take, 1)
    order = np.argsort(-(quota - np.floor(quota)))
    i = 0
    while take.sum() < n:
        c = order[i % len(order)]
        if take[c] < counts[c]:
            take[c] += 1
        i += 1
    while take.sum() > n:  # the at-least-one rule overshot: trim the largest classes
        take[np.argmax(take)] -= 1
    picked = [
        rng.choice(np.flatnonzero(labels == c), size=k, replace=False)
        for c, k in zip(classes, take, strict=True)
    ]
    return np.sort(np.concatenate(picked))


# --- the frozen start and the tuned end of a network -----------------------------------------


def _networks(network: Network) -> list[FusionNet]:
    return network.nets if isinstance(network, FusionEnsemble) else [network]


def _check_tunable(net: FusionNet, train_blocks: int) -> None:
    bb = net.backbone
    needed = ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool")
    if not all(hasattr(bb, a) for a in needed):
        raise AdaptError(
            f"adapt tunes timm EfficientNet backbones; {net.cfg.backbone} has no "
            "blocks / conv_head stages."
        )
    n = len(cast(nn.Sequential, bb.blocks))
    if not 0 <= train_blocks <= n:
        raise AdaptError(f"--train-blocks {train_blocks}: the backbone has {n} stages (0..{n}).")


def frozen_start(net: FusionNet, images: torch.Tensor, train_blocks: int) -> torch.Tensor:
    """The backbone up to its last ``train_blocks`` stages (what the cache holds)."""
    bb = cast(Any, net.backbone)
    x = bb.bn1(bb.conv_stem(images.contiguous(memory_format=torch.channels_last)))
    blocks = list(bb.blocks)
    for block in blocks[: len(blocks) - train_blocks]:
        x = block(x)
    return x


def tuned_end(net: FusionNet, x: torch.Tensor, train_blocks: int) -> torch.Tensor:
    """The rest of the backbone: pooled features, exactly ``net.image_features`` of the image."""
    bb = cast(Any, net.backbone)
    x = x.float().contiguous(memory_format=torch.channels_last)
    blocks = list(bb.blocks)
    for block in blocks[len(blocks) - train_blocks :]:
        x = block(x)
    return bb.global_pool(bb.bn2(bb.conv_head(x)))


class Tail(nn.Module):
    """A network seen from its cached activations: :meth:`image_features` takes the frozen
    start's output (members' activations concatenated on channels) instead of an image, and
    :meth:`head` is the network's own. So :func:`model.engine.collect_outputs`,
    :func:`model.scoring.calibrate_and_score` and the training step all run on the cache."""

    def __init__(self, network: Network, train_blocks: int, widths: Sequence[int]) -> None:
        super().__init__()
        self.network = network
        self.train_blocks = train_blocks
        self.widths = list(widths)

    def image_features(self, acts: torch.Tensor) -> torch.Tensor:
        parts = torch.split(acts, self.widths, dim=1)
        nets = _networks(self.network)
        return torch.cat(
            [tuned_end(n, a, self.train_blocks) for n, a in zip(nets, parts, strict=True)], dim=1
        )

    def head(self, features: torch.Tensor, meta: torch.Tensor | None) -> torch.Tensor:
        return self.network.head(features, meta)

    def forward(self, acts: torch.Tensor, meta: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.image_features(acts), meta)

    def trainable(self, lr: float, backbone_lr_mult: float) -> list[dict]:
        """Parameter groups of the tuned end: its backbone stages slower than the head."""
        backbone, head = [], []
        for net in _networks(self.network):
            bb = cast(Any, net.backbone)
            blocks = list(bb.blocks)
            for module in [*blocks[len(blocks) - self.train_blocks :], bb.conv_head, bb.bn2]:
                backbone += list(module.parameters())
            head += list(net.classifier.parameters())
            if net.meta_mlp is not None:
                head += list(net.meta_mlp.parameters())
        return [
            {"params": backbone, "lr": lr * backbone_lr_mult, "name": "backbone"},
            {"params": head, "lr": lr, "name": "head"},
        ]


@dataclass
class Cache:
    """One part's frozen-start activations (per network), metadata, labels and ids, and the
    parent's own outputs on it (before adapting)."""

    acts: list[torch.Tensor]
    meta: torch.Tensor
    labels: np.ndarray
    image_ids: list[str]
    lesion_ids: list[str]
    before_logits: np.ndarray
    #: the parent model's classes, which the labels index
    classes: ClassSet = HAM7

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def widths(self) -> list[int]:
        return [int(a.shape[1]) for a in self.acts]

    def subset(self, index: np.ndarray) -> Cache:
        t = torch.as_tensor(index, dtype=torch.long)
        return Cache(
            [a[t] for a in self.acts],
            self.meta[t],
            self.labels[index],
            [self.image_ids[i] for i in index],
            [self.lesion_ids[i] for i in index],
            self.before_logits[index],
            self.classes,
        )

    def member(self, k: int) -> Cache:
        return Cache(
            [self.acts[k]],
            self.meta,
            self.labels,
            self.image_ids,
            self.lesion_ids,
            self.before_logits,
            self.classes,
        )


class CacheSet(Dataset):
    """Items ``(activations, meta, label)`` of a :class:`Cache`; ``lesion_ids`` as
    :class:`data_pipeline.dataset.LesionDataset` has them (bootstrap groups)."""

    def __init__(self, cache: Cache) -> None:
        self.cache = cache
        self.labels = cache.labels
        self.lesion_ids = cache.lesion_ids

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        acts = torch.cat([a[i] for a in self.cache.acts], dim=0)
        return acts, self.cache.meta[i], int(self.cache.labels[i])


def cache_loader(cache: Cache, batch_size: int = 128) -> DataLoader:
    return DataLoader(CacheSet(cache), batch_size=batch_size, shuffle=False)


@torch.no_grad()
def build_cache(
    network: Network,
    df: pd.DataFrame,
    pre: Preprocessing,
    train_blocks: int,
    device: str,
    batch_size: int = 64,
    label: str = "",
    classes: ClassSet = HAM7,
) -> Cache:
    """Run every image of ``df`` once through the frozen start of each network, keeping the
    activations and the parent's own logits."""
    network.eval()
    nets = _networks(network)
    acts: list[list[torch.Tensor]] = [[] for _ in nets]
    metas, labels, before = [], [], []
    t0, seen = time.time(), 0
    for images, meta, y in eval_loader(df, pre, batch_size=batch_size):
        images, meta = images.to(device), meta.to(device)
        feats = []
        for k, net in enumerate(nets):
            a = frozen_start(net, images, train_blocks)
            acts[k].append(a.float().cpu().contiguous())
            feats.append(tuned_end(net, a, train_blocks))
        before.append(network.head(torch.cat(feats, dim=1), meta).float().cpu().numpy())
        metas.append(meta.cpu())
        labels.append(np.asarray(y))
        seen += len(y)
    rate = seen / max(time.time() - t0, 1e-9)
    print(f"cached {label or 'images'}: {seen} images ({rate:.1f} images/s)", flush=True)
    return Cache(
        [torch.cat(a) for a in acts],
        torch.cat(metas),
        np.concatenate(labels),
        df["image_id"].astype(str).tolist(),
        df["lesion_id"].astype(str).tolist(),
        np.concatenate(before),
        classes,
    )


# --- tuning -----------------------------------------------------------------------------------


def _freeze_batchnorm(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _val_metrics(tail: Tail, cache: Cache, device: str) -> dict:
    logits, labels, _ = collect_outputs(cast(Network, tail), cache_loader(cache), device)
    return compute_metrics(labels, softmax(logits), cache.classes)


def tune_network(
    net: FusionNet, train: Cache, val: Cache, cfg: AdaptConfig, seed: int, label: str = ""
) -> dict[str, Any]:
    """Fine-tune ``net``'s end on ``train`` (its own cached activations), keep the epoch with the
    best validation selection score (epoch 0: unchanged); returns the history."""
    seed_everything(seed)
    tail = Tail(net, cfg.train_blocks, train.widths)
    counts = class_counts(train.labels, len(train.classes))
    weight = class_weights(counts, cfg.sampler_power, cfg.loss_power).to(cfg.device)
    allowed = torch.as_tensor(counts > 0) if cfg.mask_absent else None
    sampler = make_weighted_sampler(
        train.labels.tolist(),
        cfg.sampler_power,
        max(len(train), cfg.epoch_samples),
        seed=seed,
    )
    loader = DataLoader(
        CacheSet(train), batch_size=cfg.batch_size, sampler=sampler, drop_last=len(train) > 1
    )
    opt = torch.optim.AdamW(
        tail.trainable(cfg.lr, cfg.backbone_lr_mult), weight_decay=cfg.weight_decay
    )
    steps = len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.epochs * steps, steps // 2))
    first = _val_metrics(tail, val, cfg.device)
    best = {"epoch": 0, "score": selection_score({"val": first})}
    best_state = copy.deepcopy(net.state_dict())
    history = [{"epoch": 0, "train_loss": None, "val_selection_score": best["score"]}]
    for epoch in range(1, cfg.epochs + 1):
        tail.train()
        _freeze_batchnorm(tail)
        total, seen = 0.0, 0
        for acts, meta, y in loader:
            acts, meta, y = acts.to(cfg.device), meta.to(cfg.device), y.to(cfg.device)
            mask = None if allowed is None else allowed.to(cfg.device).expand(len(y), -1)
            loss = source_aware_ce(tail(acts, meta), y, mask, weight, cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total, seen = total + loss.item() * len(y), seen + len(y)
        m = _val_metrics(tail, val, cfg.device)
        score = selection_score({"val": m})
        history.append(
            {"epoch": epoch, "train_loss": total / max(seen, 1), "val_selection_score": score}
        )
        if label:
            print(
                f"  {label} epoch {epoch}: train_loss {total / max(seen, 1):.4f}  "
                f"val {headline(m)}  selection {score:.4f}",
                flush=True,
            )
        if score > best["score"]:
            best = {"epoch": epoch, "score": score}
            best_state = copy.deepcopy(net.state_dict())
    net.load_state_dict(best_state)
    net.eval()
    if label:
        print(f"  {label}: kept epoch {best['epoch']} (val selection {best['score']:.4f})")
    return {
        "best_epoch": best["epoch"],
        "best_val_selection_score": best["score"],
        "history": history,
    }


def tune_all(
    network: Network, train: Cache, val: Cache, cfg: AdaptConfig, seed: int, verbose: bool
) -> list[dict]:
    """Tune every network of the model on its own cached activations."""
    records = []
    nets = _networks(network)
    for k, net in enumerate(nets):
        label = (f"network {k}" if len(nets) > 1 else "network") if verbose else ""
        records.append(tune_network(net, train.member(k), val.member(k), cfg, seed + k, label))
    return records


# --- measuring --------------------------------------------------------------------------------


def _frame(cache: Cache, probs: np.ndarray, source: str) -> pd.DataFrame:
    """A ``predictions.csv``-shaped frame (what :func:`model.compare.compare_predictions` reads)."""
    frame = pd.DataFrame(
        {
            "source": source,
            "image_id": cache.image_ids,
            "lesion_id": cache.lesion_ids,
            "dx": [cache.classes.codes[i] for i in cache.labels],
            **{f"p_{c}": probs[:, i] for i, c in enumerate(cache.classes.codes)},
        }
    )
    frame.attrs["classes"] = cache.classes
    return frame


def before_after(
    sets: dict[str, tuple[Cache, np.ndarray, np.ndarray]], n_boot: int
) -> dict[str, dict]:
    """Per set: before / after figures with 95 % intervals and the paired gain (after − before)
    with its interval and how often after beat before over the bootstrap draws.
    ``sets``: name → (cache, probs before, probs after)."""
    out: dict[str, dict] = {}
    for name, (cache, before, after) in sets.items():
        lesions = np.asarray(cache.lesion_ids)
        b_int = set_intervals(cache.labels, before, lesions, n_boot, classes=cache.classes)
        a_int = set_intervals(cache.labels, after, lesions, n_boot, classes=cache.classes)
        rows = compare_predictions(
            _frame(cache, before, name), _frame(cache, after, name), n_boot=n_boot
        )
        gain = {
            r.metric: {
                "value": _finite(r.diff),
                "low": _finite(r.low),
                "high": _finite(r.high),
                "p_after_better": _finite(r.p_b_better),
            }
            for r in rows
            if r.metric in SHOWN
        }
        out[name] = {
            "n": len(cache),
            "before": b_int,
            "after": a_int,
            "gain": gain,
        }
    return out


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def _probs(tail: Tail, cache: Cache, temperature: float, device: str) -> np.ndarray:
    logits, _, _ = collect_outputs(cast(Network, tail), cache_loader(cache), device)
    return softmax(logits, temperature)


def _f(x: float | None) -> str:
    return "  n/a" if x is None else f"{x:.3f}"


def print_before_after(result: dict[str, dict]) -> None:
    pct = f"{100 * LEVEL:g} %"
    for name, block in result.items():
        print(f"[{name}] n={block['n']}  before → after, gain ({pct} intervals, paired)")
        for metric in SHOWN:
            b, a = block["before"][metric], block["after"][metric]
            g = block["gain"].get(metric)
            if b["value"] is None and a["value"] is None:
                continue
            gain = ""
            if g and g["value"] is not None:
                gain = f"  gain {g['value']:+.3f} [{_sgn(g['low'])}, {_sgn(g['high'])}]"
            print(
                f"  {metric:18s} {_f(b['value'])} [{_f(b['low'])}, {_f(b['high'])}] → "
                f"{_f(a['value'])} [{_f(a['low'])}, {_f(a['high'])}]{gain}"
            )


def _sgn(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.3f}"


# --- the command ------------------------------------------------------------------------------


@dataclass
class Parts:
    """The images adapting reads: DIR's train / val, the test part, HAM10000 test (or None)."""

    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame
    test_source: str
    ham_test: pd.DataFrame | None
    split_origin: str
    splits: pd.DataFrame
    inputs: dict[str, str]
    notes: list[str]


def _ham_dir(cfg: AdaptConfig) -> Path | None:
    if cfg.ham_dir.lower() == "none":
        return None
    if cfg.ham_dir:
        return Path(cfg.ham_dir)
    for candidate in (os.environ.get(DATA_ENV), str(REPO_ROOT.parent / "shared" / "ham10000")):
        if candidate and (Path(candidate) / "HAM10000_metadata.csv").is_file():
            return Path(candidate)
    return None


def load_parts(cfg: AdaptConfig, parent_cfg: CheckpointConfig) -> Parts:
    """Read and split the data, check budgets and leaks; no model is run yet."""
    classes = parent_cfg.classes
    df = load_metadata(cfg.data_dir, classes=classes)
    df, origin = split_parts(df, bool(cfg.test_dir), cfg.seed)
    inputs = {str(cfg.data_dir): file_sha256(find_metadata_csv(Path(cfg.data_dir)))}
    if cfg.test_dir:
        test = load_metadata(cfg.test_dir, classes=classes)
        test_source = source_name(cfg.test_dir)
        inputs[str(cfg.test_dir)] = file_sha256(find_metadata_csv(Path(cfg.test_dir)))
        leaked = set(test["image_id"]) & set(df["image_id"])
        if leaked:
            raise AdaptError(
                f"image {sorted(leaked)[0]!r} of the test folder is also in {cfg.data_dir}; "
                f"{len(leaked)} test image(s) would be trained or selected on."
            )
    else:
        test = df[df["split"] == "test"]
        test_source = f"{source_name(cfg.data_dir)}-test"
    train, val = df[df["split"] == "train"], df[df["split"] == "val"]
    for part, rows in (("train", train), ("val", val), ("test", test)):
        if rows.empty:
            raise AdaptError(f"the {part} part is empty: {cfg.data_dir} has too few images.")
    too_big = [b for b in cfg.budgets if b > len(train)]
    if too_big:
        raise AdaptError(
            f"--label-budget {too_big[0]} exceeds the {len(train)} images of the training part."
        )
    notes: list[str] = []
    ham_test = None
    ham = _ham_dir(cfg)
    if ham is None:
        if cfg.ham_dir.lower() != "none":
            notes.append(
                f"no HAM10000 copy found (pass --ham-dir or set {DATA_ENV}): what adapting "
                "forgot is not measured"
            )
    else:
        ham_df = load_metadata(ham, classes=classes)
        try:
            ham_test, info = select_rows(ham_df, parent_cfg, "test", None)
        except DataError as exc:
            raise AdaptError(
                f"HAM10000 test split of the parent: {exc} (or --ham-dir none)"
            ) from None
        if "warning" in info:
            notes.append(f"HAM10000 test: {info['warning']}")
        inputs[str(ham)] = file_sha256(find_metadata_csv(ham))
    splits = pd.concat([train, val, test.assign(split="test") if not cfg.test_dir else test[:0]])
    return Parts(train, val, test, test_source, ham_test, origin, splits, inputs, notes)


def _temporary_out(out: Path) -> Path:
    if out.exists():
        raise AdaptError(f"{out} already exists: choose a new --out folder.")
    if not out.parent.is_dir():
        raise AdaptError(f"{out.parent} does not exist.")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def adapt(cfg: AdaptConfig) -> tuple[Path, CheckpointConfig]:
    """Run the whole adaptation; returns the checkpoint folder and its config."""
    if cfg.n_boot:
        check_n_boot(cfg.n_boot)
    if cfg.epochs < 1 or cfg.draws < 1:
        raise AdaptError("--epochs and --draws must be at least 1.")
    out = Path(cfg.out)
    parent_folder, parent_cfg, network = load_parent(cfg.parent, cfg.device)
    for net in _networks(network):
        _check_tunable(net, cfg.train_blocks)
    parts = load_parts(cfg, parent_cfg)
    for note in parts.notes:
        print(f"note: {note}")
    tmp = _temporary_out(out)
    try:
        ck = _adapt_into(cfg, tmp, out, network, parent_folder, parent_cfg, parts)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out, ck


def load_parent(spec: str, device: str) -> tuple[Path, CheckpointConfig, Network]:
    """The model to adapt: a checkpoint folder ("" → shipped) as stored (an ensemble keeps its
    per-class member weights), or ``FOLDER#K``, network K of an ensemble (as scripts.ensemble)."""
    folder_spec, index = _split_member(spec or SHIPPED_DIR)
    folder = resolve_dir(folder_spec)
    network, parent_cfg = load_checkpoint(folder, device=device)
    if index is not None:
        nets = _networks(network)
        if index >= len(nets):
            raise AdaptError(
                f"{spec}: {folder} holds {len(nets)} network(s); pick one of 0..{len(nets) - 1}."
            )
        network = nets[index]
    return folder, parent_cfg, network


def _adapt_into(
    cfg: AdaptConfig,
    tmp: Path,
    out: Path,
    network: Network,
    parent_folder: Path,
    parent_cfg: CheckpointConfig,
    parts: Parts,
) -> CheckpointConfig:
    t_start = time.time()
    pre = parent_cfg.preprocessing
    split_hash = save_splits(parts.splits, tmp / "splits.csv")
    print(
        f"parent {parent_cfg.version}; {len(parts.train)} train / {len(parts.val)} val images "
        f"from {parts.split_origin}; test: {parts.test_source} ({len(parts.test)} images)",
        flush=True,
    )
    k = cfg.train_blocks

    def cache(df: pd.DataFrame, label: str) -> Cache:
        return build_cache(
            network, df, pre, k, cfg.device, cfg.batch_eval, label, parent_cfg.classes
        )

    train, val = cache(parts.train, "train"), cache(parts.val, "val")
    test = cache(parts.test, parts.test_source)
    ham = None if parts.ham_test is None else cache(parts.ham_test, HAM_SOURCE)
    t_cache = time.time() - t_start
    parent_state = copy.deepcopy(network.state_dict())
    dtype = torch.float16 if parent_cfg.training.get("weights_dtype") == "float16" else None

    def measure(temperature: float) -> dict[str, np.ndarray]:
        tail = Tail(network, k, train.widths)
        probs = {parts.test_source: _probs(tail, test, temperature, cfg.device)}
        if ham is not None:
            probs[HAM_SOURCE] = _probs(tail, ham, temperature, cfg.device)
        return probs

    # the adapted model: every training image
    print("tuning on every training image", flush=True)
    records = tune_all(network, train, val, cfg, cfg.seed, verbose=True)
    if dtype is not None:
        round_weights(network, dtype)  # measure exactly what is stored
    tail = Tail(network, k, train.widths)
    ck = _checkpoint_config(cfg, out, network, parent_folder, parent_cfg, parts, split_hash)
    ck.training["networks"] = records
    sets = EvalSets(val=cache_loader(val), test=cache_loader(test))
    detector = calibrate_and_score(cast(Network, tail), ck, sets, cfg.device, n_boot=cfg.n_boot)
    after = measure(ck.temperature)
    before = {
        parts.test_source: softmax(test.before_logits, parent_cfg.temperature),
        **(
            {HAM_SOURCE: softmax(ham.before_logits, parent_cfg.temperature)}
            if ham is not None
            else {}
        ),
    }
    caches = {parts.test_source: test, **({HAM_SOURCE: ham} if ham is not None else {})}
    n_boot = cfg.n_boot or 1000
    result = before_after(
        {name: (caches[name], before[name], after[name]) for name in caches}, n_boot
    )
    if ham is not None:
        _, _, feats = collect_outputs(cast(Network, tail), cache_loader(ham), cfg.device)
        dist = detector.distance(torch.from_numpy(feats)).numpy()
        result[HAM_SOURCE]["flagged_after"] = flag_rates(
            after[HAM_SOURCE].max(axis=1), dist, detector.threshold
        )
    ck.metrics["adapt"] = {
        "parent_version": parent_cfg.version,
        "n_boot": n_boot,
        "level": LEVEL,
        "sets": result,
    }
    print_before_after(result)
    t_tune = time.time() - t_start - t_cache
    ck.training["seconds"] = {"cache": round(t_cache, 1), "tune_and_score": round(t_tune, 1)}
    save_checkpoint(network, ck, tmp, dtype=dtype)
    detector.save(tmp)
    export_onnx(tmp, network, ck)
    if cfg.budgets:
        adapted_state = copy.deepcopy(network.state_dict())
        curve = label_budget_curve(
            cfg, network, parent_state, train, val, caches, measure, before, result
        )
        write_curve(curve, tmp, parent_cfg.version, parts.test_source)
        network.load_state_dict(adapted_state)
    print(f"adapting took {time.time() - t_start:.0f} s (caching {t_cache:.0f} s)", flush=True)
    return ck


def _checkpoint_config(
    cfg: AdaptConfig,
    out: Path,
    network: Network,
    parent_folder: Path,
    parent_cfg: CheckpointConfig,
    parts: Parts,
    split_hash: str,
) -> CheckpointConfig:
    """The adapted checkpoint's description: its parent, the command, the data and its hashes."""
    classes = parent_cfg.classes
    counts = dict(
        zip(
            classes.codes,
            class_counts(parts.train["label"].to_numpy(), len(classes)).tolist(),
            strict=True,
        )
    )
    name = cfg.name or f"{parent_cfg.name}-adapted-{source_name(cfg.data_dir)}"
    return CheckpointConfig(
        name=name,
        model=network.cfg,
        preprocessing=parent_cfg.preprocessing,
        classes=classes,
        vocabulary=parent_cfg.vocabulary,
        training={
            "command": cfg.command,
            "adapted_from": {
                "version": parent_cfg.version,
                "folder": repo_relative(parent_folder),
                "spec": cfg.parent or "shipped",
            },
            "init_from_version": parent_cfg.version,
            "config": asdict(cfg),
            "split_file": repo_relative(out / "splits.csv"),
            "split_sha256": split_hash,
            "split_origin": parts.split_origin,
            "data_sha256": parts.inputs,
            "sources": [
                {
                    "name": source_name(cfg.data_dir),
                    "role": "primary",
                    "path": str(cfg.data_dir),
                    "csv_sha256": parts.inputs[str(cfg.data_dir)],
                    "n_images": len(parts.train) + len(parts.val),
                    "class_counts": counts,
                },
                *parent_cfg.training.get("sources", []),
            ],
            "train_class_counts": counts,
            "test_source": parts.test_source,
            "selection_rule": selection_rule(classes) + " (the adapting folder's val part only)",
            "weights_dtype": parent_cfg.training.get("weights_dtype", "float32"),
            "device": cfg.device,
        },
    )


# --- the learning curve -------------------------------------------------------------------------


def label_budget_curve(
    cfg: AdaptConfig,
    network: Network,
    parent_state: dict,
    train: Cache,
    val: Cache,
    caches: dict[str, Cache],
    measure: Callable[[float], dict[str, np.ndarray]],
    before: dict[str, np.ndarray],
    full: dict[str, dict],
) -> dict[str, Any]:
    """Gain (after − before) on each measured set per budget and draw: the network is reset to
    the parent, tuned on a class-stratified draw of the training part, selected on the whole
    val part and measured; the budget "all" is the adapted model itself (``full``)."""
    base = {
        name: reported_metrics(caches[name].labels, before[name], caches[name].classes)
        for name in caches
    }
    first = next(iter(caches))
    rows: list[dict[str, Any]] = []
    for budget in cfg.budgets:
        n = budget or len(train)
        for draw in range(1 if n >= len(train) else cfg.draws):
            if n >= len(train):
                figures = {
                    name: {m: full[name]["after"][m]["value"] for m in SHOWN} for name in caches
                }
            else:
                t0 = time.time()
                network.load_state_dict(parent_state)
                index = stratified_draw(train.labels, n, cfg.seed + 1000 * draw + n)
                tune_all(network, train.subset(index), val, cfg, cfg.seed + draw, verbose=False)
                probs = measure(_val_temperature(network, val, cfg))
                figures = {
                    name: {
                        m: _finite(v)
                        for m, v in reported_metrics(
                            caches[name].labels, probs[name], caches[name].classes
                        ).items()
                    }
                    for name in caches
                }
                print(
                    f"budget {n} draw {draw}: {first} mel AUC {_f(figures[first]['mel_auc'])}  "
                    f"bal. acc. {_f(figures[first]['balanced_accuracy'])} "
                    f"({time.time() - t0:.0f} s)",
                    flush=True,
                )
            for name, values in figures.items():
                for metric in SHOWN:
                    b, a = _finite(base[name][metric]), values.get(metric)
                    rows.append(
                        {
                            "budget": "all" if budget == 0 else budget,
                            "n_labelled": n,
                            "draw": draw,
                            "set": name,
                            "metric": metric,
                            "before": b,
                            "after": a,
                            "gain": None if a is None or b is None else a - b,
                        }
                    )
    return {"rows": rows, "n_train": len(train), "n_val": len(val), "full": full}


def _val_temperature(network: Network, val: Cache, cfg: AdaptConfig) -> float:
    tail = Tail(network, cfg.train_blocks, val.widths)
    logits, labels, _ = collect_outputs(cast(Network, tail), cache_loader(val), cfg.device)
    return fit_temperature(logits, labels)


def summarise_curve(rows: list[dict]) -> list[dict]:
    """Mean, spread and range of the gain over draws, per set, metric and budget."""
    df = pd.DataFrame(rows).dropna(subset=["gain"])
    out = []
    for (name, metric, n), g in df.groupby(["set", "metric", "n_labelled"], sort=True):
        out.append(
            {
                "set": name,
                "metric": metric,
                "n_labelled": int(n),
                "draws": len(g),
                "before": float(g["before"].iloc[0]),
                "mean_after": float(g["after"].mean()),
                "mean_gain": float(g["gain"].mean()),
                "sd_gain": float(g["gain"].std(ddof=1)) if len(g) > 1 else 0.0,
                "min_gain": float(g["gain"].min()),
                "max_gain": float(g["gain"].max()),
            }
        )
    return out


def write_curve(curve: dict, folder: Path, parent_version: str, test_source: str) -> None:
    """``label_budget.csv`` (every draw), ``label_budget.json`` (summary) and the plot."""
    import json

    rows = curve["rows"]
    pd.DataFrame(rows).to_csv(folder / "label_budget.csv", index=False)
    summary = summarise_curve(rows)
    (folder / "label_budget.json").write_text(
        json.dumps(
            {
                "parent_version": parent_version,
                "test_source": test_source,
                "n_train": curve["n_train"],
                "n_val": curve["n_val"],
                "note": "the validation part (n_val images) is used whole by every draw",
                "summary": summary,
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    plot_curve(rows, curve["full"], folder / "label_budget.png", parent_version, test_source)
    for s in summary:
        if s["metric"] in ("mel_auc", "balanced_accuracy"):
            print(
                f"curve [{s['set']}] {s['metric']} n={s['n_labelled']}: gain "
                f"{s['mean_gain']:+.3f} (sd {s['sd_gain']:.3f}, {s['draws']} draws)",
                flush=True,
            )


def plot_curve(
    rows: list[dict], full: dict[str, dict], path: Path, parent_version: str, test_source: str
) -> None:
    plt = pyplot()
    df = pd.DataFrame(rows).dropna(subset=["gain"])
    names = list(dict.fromkeys(df["set"]))
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.2), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for metric, colour in (("mel_auc", "tab:red"), ("balanced_accuracy", "tab:blue")):
            d = df[(df["set"] == name) & (df["metric"] == metric)]
            if d.empty:
                continue
            ax.scatter(d["n_labelled"], d["gain"], s=14, color=colour, alpha=0.5)
            mean = d.groupby("n_labelled")["gain"].mean()
            ax.plot(mean.index, mean.to_numpy(), "o-", color=colour, label=metric.replace("_", " "))
            g = full.get(name, {}).get("gain", {}).get(metric)
            if g and g["low"] is not None and g["value"] is not None:
                x = int(d["n_labelled"].max())
                ax.errorbar(
                    [x],
                    [g["value"]],
                    yerr=[[g["value"] - g["low"]], [g["high"] - g["value"]]],
                    color=colour,
                    capsize=4,
                )
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("labelled local training images")
        ax.set_ylabel("gain over the parent model (after − before)")
        ax.set_title(f"{name}" + (" (what adapting forgot)" if name == HAM_SOURCE else ""))
        ax.legend(fontsize=8)
    fig.suptitle(f"Adapting {parent_version}: gain on {test_source} (95 % interval at all)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
