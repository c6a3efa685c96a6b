"""Shared fixtures: a synthetic HAM10000-format folder (real JPEGs written by the test), a tiny
untrained checkpoint, and the real data copy (skipped with a reason when absent)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from data_pipeline.schema import CLASSES, SITES

REPO = Path(__file__).resolve().parent.parent
REAL_DATA_ENV = "DERMFUSION_DATA_DIR"


def real_data_dir() -> Path | None:
    path = Path(os.environ.get(REAL_DATA_ENV, REPO.parent / "shared" / "ham10000"))
    return path if (path / "HAM10000_metadata.csv").is_file() else None


@pytest.fixture(scope="session")
def real_data() -> Path:
    path = real_data_dir()
    if path is None:
        pytest.skip(
            f"real HAM10000 copy not found: set {REAL_DATA_ENV} or place it at ../shared/ham10000"
        )
    return path


def class_colour(label: int) -> tuple[int, int, int]:
    """A distinct mean colour per class so a tiny model can learn the synthetic task."""
    rng = np.random.default_rng(label)
    return tuple(int(v) for v in rng.integers(40, 220, size=3))


def write_synthetic_ham(
    root: Path,
    per_class: int = 6,
    layout: str = "flat",
    size: tuple[int, int] = (200, 150),
    seed: int = 0,
) -> Path:
    """Write a HAM10000-format folder: CSV + JPEG images (``flat`` or ``parts`` layout).

    Two images share each lesion id, so grouped splitting is exercised.
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    n = 0
    for label, dx in enumerate(CLASSES):
        for j in range(per_class):
            image_id = f"ISIC_{9000000 + n:07d}"
            lesion_id = f"HAM_{9000000 + (n // 2):07d}"
            if layout == "flat":
                folder = root / "images"
            else:
                folder = root / (
                    "HAM10000_images_part_1" if n % 2 == 0 else "HAM10000_images_part_2"
                )
            folder.mkdir(exist_ok=True)
            w, h = size
            img = np.empty((h, w, 3), dtype=np.uint8)
            img[:] = class_colour(label)
            noise = rng.integers(-20, 20, size=img.shape)
            img = np.clip(img.astype(int) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(img).save(folder / f"{image_id}.jpg", quality=90)
            rows.append(
                {
                    "lesion_id": lesion_id,
                    "image_id": image_id,
                    "dx": dx,
                    "dx_type": "histo",
                    "age": None if j == 0 else float(20 + 5 * j),
                    "sex": ["male", "female", "unknown"][j % 3],
                    "localization": SITES[(n * 7) % len(SITES)],
                }
            )
            n += 1
    pd.DataFrame(rows).to_csv(root / "HAM10000_metadata.csv", index=False)
    return root


@pytest.fixture
def synthetic_ham(tmp_path: Path) -> Path:
    return write_synthetic_ham(tmp_path / "ham")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """An untrained fusion checkpoint at 64×64 input (fast on CPU), with OOD statistics."""
    from data_pipeline.transforms import Preprocessing
    from model.checkpoint import CheckpointConfig, save_checkpoint
    from model.network import FusionNet, ModelConfig
    from model.ood import FeatureDistance

    torch.manual_seed(0)
    mcfg = ModelConfig(use_metadata=True)
    model = FusionNet(mcfg, pretrained=False).eval()
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    cfg = CheckpointConfig(
        name="tiny-untrained",
        model=mcfg,
        preprocessing=Preprocessing(height=64, width=64),
        temperature=1.0,
        ood={"threshold": 1e9, "method": "test", "percentile": 99.0},
    )
    save_checkpoint(model, cfg, out)
    feat = int(model.backbone.num_features)
    FeatureDistance(torch.randn(16, feat), 1e9).save(out)
    return out


# --- history databases: SQLite and PostgreSQL ---------------------------------------------------


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """Admin URL of a PostgreSQL server for the whole session (see :mod:`tests.pg`): a throw-away
    one, or ``$DERMFUSION_POSTGRES_URL``. Skipped with the reason where neither is possible,
    failed instead when ``DERMFUSION_REQUIRE_POSTGRES=1`` (CI)."""
    from tests import pg

    reason = pg.unavailable_reason()
    if reason is not None:
        if os.environ.get(pg.REQUIRE_ENV) == "1":
            pytest.fail(f"PostgreSQL tests required ({pg.REQUIRE_ENV}=1) but {reason}")
        pytest.skip(reason)
    with pg.server() as url:
        yield url


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """URL of a fresh, empty PostgreSQL database, dropped after the test."""
    from tests import pg

    url = pg.create_database(postgres_server)
    yield url
    pg.drop_database(postgres_server, url)


#: The engines every database test runs against; ``-m "not postgres"`` keeps SQLite only.
DB_BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


@pytest.fixture(params=DB_BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """URL of a fresh, empty history database on each backend (one test per backend)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db' / 'history.db'}"
    return str(request.getfixturevalue("postgres_url"))
