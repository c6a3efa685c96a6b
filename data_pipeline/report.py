"""Dataset summaries used by ``scripts.inspect_data`` (and by tests, which check the numbers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from common.plotting import pyplot
from data_pipeline.images import load_rgb
from data_pipeline.schema import HAM7, UNKNOWN, ClassSet
from data_pipeline.splits import SPLITS


def class_split_table(df: pd.DataFrame, classes: ClassSet = HAM7) -> pd.DataFrame:
    """Images and lesions per class of ``classes`` (rows) and split (columns), with totals."""
    cols = {}
    for split in [*SPLITS, "all"]:
        part = df if split == "all" else df[df["split"] == split]
        cols[(split, "images")] = part.groupby("dx").size()
        cols[(split, "lesions")] = part.groupby("dx")["lesion_id"].nunique()
    table = pd.DataFrame(cols).reindex(list(classes)).fillna(0).astype(int)
    table.loc["total"] = [
        len(df if s == "all" else df[df["split"] == s])
        if kind == "images"
        else (df if s == "all" else df[df["split"] == s])["lesion_id"].nunique()
        for s, kind in table.columns
    ]
    return table


def metadata_summary(df: pd.DataFrame) -> dict[str, Any]:
    ages = df["age"].dropna()
    return {
        "images": len(df),
        "lesions": int(df["lesion_id"].nunique()),
        "age_missing": int(df["age"].isna().sum()),
        "sex_unknown": int((df["sex"] == UNKNOWN).sum()),
        "site_unknown": int((df["localization"] == UNKNOWN).sum()),
        "age_min": float(ages.min()) if len(ages) else None,
        "age_max": float(ages.max()) if len(ages) else None,
        "age_median": float(ages.median()) if len(ages) else None,
        "sex_counts": df["sex"].value_counts().to_dict(),
        "site_counts": df["localization"].value_counts().to_dict(),
    }


def sample_grid(
    df: pd.DataFrame, path: Path, per_class: int = 6, seed: int = 0, classes: ClassSet = HAM7
) -> Path:
    """A PNG grid: one row per class of ``classes``, ``per_class`` random images each."""
    plt = pyplot()
    rng = np.random.default_rng(seed)
    fig, axes = plt.subplots(
        len(classes), per_class, figsize=(per_class * 1.8, len(classes) * 1.5), squeeze=False
    )
    for r, dx in enumerate(classes):
        paths = df.loc[df["dx"] == dx, "path"].tolist()
        chosen: Any = (
            rng.choice(paths, size=min(per_class, len(paths)), replace=False) if paths else []
        )
        for c in range(per_class):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(chosen):
                ax.imshow(load_rgb(Path(chosen[c])))
        axes[r][0].set_title(f"{dx}: {classes.name(dx)}", fontsize=8, loc="left")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
