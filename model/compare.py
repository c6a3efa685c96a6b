"""Is model B really better than model A on the same images? A paired bootstrap.

Validation sets are small (1287 HAM10000 val images, 150 ISIC 2017 val images), so a selection
score that rises by 0.004 may be noise. :func:`compare_predictions` takes two
``predictions.csv`` files written by ``scripts.evaluate`` on the *same* images, resamples the
images of each source with replacement (the same draw for both models, so the comparison is
paired; whole lesions where a ``lesion_id`` column says which images belong together), and
reports for every metric A, B, the difference B − A with a percentile interval, and how often B
beat A over the draws. The resampling is :mod:`model.bootstrap`'s, which also gives one model's
intervals (``scripts.evaluate --bootstrap N``).

Used by ``scripts.compare``; the metrics are the ones the selection rule and docs/results report
(:func:`model.scoring.set_score`), computed by the same functions as everywhere else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common.errors import DataError
from data_pipeline.schema import HAM7, ClassSet
from model.bootstrap import check_n_boot, draws, group_index, reported_metrics
from model.scoring import set_score

#: HAM10000's probability columns; another model's file has one ``p_<code>`` per class of its own.
PROB_COLUMNS = tuple(f"p_{c}" for c in HAM7)
KEY = ["source", "image_id"]


def file_classes(df: pd.DataFrame, folder: Path) -> ClassSet:
    """The class set of a ``predictions.csv``: the ``class_set`` that ``scripts.evaluate``
    recorded in ``metrics.json`` beside it, else its ``p_`` columns' codes (HAM10000's names and
    malignancy)."""
    metrics = folder / "metrics.json"
    if metrics.is_file():
        try:
            recorded = json.loads(metrics.read_text()).get("class_set")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            recorded = None
        if recorded:
            return ClassSet.from_dict(recorded)
    codes = [c[2:] for c in df.columns if c.startswith("p_")]
    if not codes or set(codes) <= set(HAM7.codes):
        return HAM7
    return ClassSet.build(codes, HAM7.names_by_code, HAM7.malignant & set(codes))


@dataclass(frozen=True)
class Row:
    """One metric of one comparison: values, paired difference and its bootstrap interval."""

    source: str
    metric: str
    a: float
    b: float
    low: float
    high: float
    p_b_better: float

    @property
    def diff(self) -> float:
        return self.b - self.a


def load_predictions(path: Path | str) -> pd.DataFrame:
    """A ``predictions.csv`` (or the ``scripts.evaluate --out`` folder holding one), checked."""
    path = Path(path)
    if path.is_dir():
        path = path / "predictions.csv"
    if not path.is_file():
        raise DataError(f"{path}: no such predictions file (write one with scripts.evaluate --out)")
    try:
        df = pd.read_csv(path, dtype={"source": str, "image_id": str, "dx": str})
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        reason = " ".join(str(exc).split())  # pandas' messages may span lines
        raise DataError(f"{path}: not a readable CSV ({reason})") from None
    classes = file_classes(df, path.parent)
    columns = [f"p_{c}" for c in classes]
    missing = [c for c in (*KEY, "dx", *columns) if c not in df]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}")
    unknown = sorted(set(df["dx"]) - set(classes))
    if unknown:
        raise DataError(f"{path}: unknown dx value(s) {', '.join(map(str, unknown[:5]))}")
    if df.duplicated(KEY).any():
        raise DataError(f"{path}: an image appears twice in one source")
    probs = df[columns].to_numpy(dtype=float)
    if not np.isfinite(probs).all():
        raise DataError(f"{path}: probabilities that are not finite numbers")
    df.attrs["classes"] = classes
    return df


def pair(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """Rows of both files on the same images (same source, image and label), or a clear error."""
    if len(a) != len(b):
        raise DataError(f"the two files score different image sets ({len(a)} vs {len(b)} rows)")
    both = a.merge(b, on=KEY, suffixes=("_a", "_b"), validate="one_to_one")
    if len(both) != len(a):
        raise DataError(
            f"the two files score different images ({len(a) - len(both)} rows of A not in B); "
            "evaluate both models with the same --split and --external"
        )
    if (both["dx_a"] != both["dx_b"]).any():
        raise DataError("the two files give different labels for the same image")
    lesion = [c for c in ("lesion_id_a", "lesion_id_b", "lesion_id") if c in both]
    both["group"] = both[lesion[0]] if lesion else both["image_id"]
    return both


def source_metrics(y: np.ndarray, probs: np.ndarray, classes: ClassSet = HAM7) -> dict[str, float]:
    """One source's reported figures (:func:`model.bootstrap.reported_metrics`, NaN where
    undefined) and its term of the selection rule (:func:`model.scoring.set_score`)."""
    out = reported_metrics(y, probs, classes)

    def known(x: float) -> float | None:
        return None if np.isnan(x) else x

    out["set_score"] = set_score(
        {
            "classes": list(classes),
            "balanced_accuracy": out["balanced_accuracy"],
            "melanoma": {"auc": known(out["mel_auc"])},
            "malignant": {"auc": known(out["malignant_auc"])},
            "macro_auc": known(out["macro_auc"]),
        }
    )
    return out


def _all_metrics(
    parts: list[tuple[str, np.ndarray, np.ndarray]], classes: ClassSet = HAM7
) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for source, y, probs in parts:
        for name, value in source_metrics(y, probs, classes).items():
            out[(source, name)] = value
    out[("all", "selection_score")] = float(np.mean([out[(s, "set_score")] for s, _, _ in parts]))
    return out


def compare_predictions(
    a: pd.DataFrame, b: pd.DataFrame, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> list[Row]:
    """Paired bootstrap of every metric of B against A, source by source (resampling groups —
    lesions where known — within each source) and of the selection score over the sources."""
    check_n_boot(n_boot)
    classes = a.attrs.get("classes", HAM7)
    if b.attrs.get("classes", HAM7).codes != classes.codes:
        raise DataError(
            f"the two files are of models of different classes ({', '.join(classes)} vs "
            f"{', '.join(b.attrs.get('classes', HAM7))}); compare models of one class set"
        )
    both = pair(a, b)
    y_all = both["dx_a"].map(classes.index).to_numpy()
    pa_all = both[[f"p_{c}_a" for c in classes]].to_numpy(dtype=float)
    pb_all = both[[f"p_{c}_b" for c in classes]].to_numpy(dtype=float)
    sources, groups = group_index(both["source"].to_numpy(), both["group"].to_numpy())

    def measure(index: list[np.ndarray]) -> tuple[dict, dict]:
        parts_a = [(s, y_all[i], pa_all[i]) for s, i in zip(sources, index, strict=True)]
        parts_b = [(s, y_all[i], pb_all[i]) for s, i in zip(sources, index, strict=True)]
        return _all_metrics(parts_a, classes), _all_metrics(parts_b, classes)

    full = [np.concatenate(g) for g in groups]
    base_a, base_b = measure(full)
    diffs: dict[tuple[str, str], list[float]] = {k: [] for k in base_a}
    for index in draws(groups, n_boot, seed):
        ma, mb = measure(index)
        for k in diffs:
            diffs[k].append(mb[k] - ma[k])
    tail = 100 * (1 - level) / 2
    rows: list[Row] = []
    for (source, metric), a_value in base_a.items():
        if metric == "set_score" and len(sources) == 1:
            continue  # equal to the selection score
        d = np.asarray(diffs[(source, metric)])
        d = d[np.isfinite(d)]
        low, high = np.percentile(d, [tail, 100 - tail]) if d.size else (np.nan, np.nan)
        rows.append(
            Row(
                source,
                metric,
                a_value,
                base_b[(source, metric)],
                float(low),
                float(high),
                float((d > 0).mean()) if d.size else np.nan,
            )
        )
    return rows


def format_table(rows: list[Row], name_a: str, name_b: str, level: float = 0.95) -> str:
    """A Markdown table of the comparison (what ``scripts.compare`` prints)."""
    pct = f"{100 * level:g} %"
    lines = [
        f"| source | metric | A: {name_a} | B: {name_b} | B − A | {pct} interval | B better in |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if np.isnan(r.a) and np.isnan(r.b):
            continue
        lines.append(
            f"| {r.source} | {r.metric} | {r.a:.4f} | {r.b:.4f} | {r.diff:+.4f} "
            f"| [{r.low:+.4f}, {r.high:+.4f}] | {100 * r.p_b_better:.0f} % |"
        )
    return "\n".join(lines)
