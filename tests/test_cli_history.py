"""CLIs: ``scripts.predict`` (with and without --db) and ``scripts.query_history``.

Tests taking ``db_url`` run on SQLite and on a real PostgreSQL server (see ``tests/pg.py``)."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.cli import run_cli
from common.text import DISCLAIMER
from data_pipeline.schema import CLASS_NAMES, CLASSES
from db.session import DB_URL_ENV
from scripts import predict, query_history

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def jpgs(synthetic_ham: Path) -> list[Path]:
    return sorted((synthetic_ham / "images").glob("*.jpg"))


def run(main, argv: list[str], capsys) -> tuple[int, str, str]:
    code = run_cli(main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop(DB_URL_ENV, None)
    return env


def test_acceptance_flow_in_process(jpgs, tiny_checkpoint, db_url, capsys):
    url = db_url
    code, out, err = run(
        predict.main,
        [
            jpgs[0],
            "--age",
            "60",
            "--sex",
            "male",
            "--site",
            "back",
            "--db",
            url,
            "--checkpoint",
            tiny_checkpoint,
        ],
        capsys,
    )
    assert code == 0, err
    assert "stored as prediction id 1" in out
    assert DISCLAIMER in out
    for name in CLASS_NAMES.values():
        assert name in out
    assert "metadata: age 60, sex male, site back" in out

    code, out, err = run(query_history.main, ["--db", url, "--format", "json"], capsys)
    assert code == 0, err
    (row,) = json.loads(out)
    assert row["id"] == 1
    assert (row["age"], row["sex"], row["site"]) == (60.0, "male", "back")
    assert list(row["probabilities"]) == list(CLASSES)
    assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert set(row["metadata_contributions"]) == {"age", "sex", "site"}
    heat = Image.open(io.BytesIO(base64.b64decode(row["heatmap_png_base64"])))
    assert heat.mode == "L" and heat.size == (200, 150)
    assert row["model_name"] == "tiny-untrained"

    code, out, _ = run(query_history.main, ["--db", url], capsys)
    assert code == 0
    assert "rows 1-1 of 1 matching" in out
    assert row["predicted_class"] in out.splitlines()[2]

    code, out, _ = run(query_history.main, ["--db", url, "--id", "1"], capsys)
    assert code == 0 and "prediction 1" in out and "heatmap: stored" in out


def test_predict_without_db_stores_nothing_json(
    jpgs, tiny_checkpoint, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(DB_URL_ENV, raising=False)
    code, out, err = run(
        predict.main,
        [jpgs[0], jpgs[1], "--json", "--site", "face", "--checkpoint", tiny_checkpoint],
        capsys,
    )
    assert code == 0, err
    results = json.loads(out)
    assert [r["image"] for r in results] == [str(jpgs[0]), str(jpgs[1])]
    for r in results:
        assert "id" not in r
        assert r["metadata"] == {"age": None, "sex": "unknown", "site": "face"}
        assert r["top_class"] == next(iter(r["probabilities"]))  # top class first
        assert r["top_class_name"] == CLASS_NAMES[r["top_class"]]
        probs = list(r["probabilities"].values())
        assert probs == sorted(probs, reverse=True)
    assert not list(tmp_path.glob("*.db"))  # nothing stored anywhere


def test_predict_bad_image_among_several(jpgs, tiny_checkpoint, tmp_path, db_url, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    url = db_url
    code, out, err = run(
        predict.main,
        [jpgs[0], bad, jpgs[1], "--db", url, "--checkpoint", tiny_checkpoint, "--json"],
        capsys,
    )
    assert code == 2
    assert f"{bad}: not an image file" in err
    assert "1 of 3 image(s) could not be processed" in err
    results = json.loads(out)
    assert [r["image"] for r in results] == [str(jpgs[0]), str(jpgs[1])]
    assert [r["id"] for r in results] == [1, 2]
    code, out, _ = run(query_history.main, ["--db", url, "--format", "json"], capsys)
    assert [r["id"] for r in json.loads(out)] == [2, 1]


def test_predict_bad_metadata_fails_fast(jpgs, tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'h.db'}"
    # No --checkpoint: the metadata is refused before any model is loaded.
    code, _, err = run(predict.main, [jpgs[0], "--age", "abc", "--db", url], capsys)
    assert code == 2 and "error: Age 'abc' is not a number of years." in err
    code, _, err = run(predict.main, [jpgs[0], "--site", "moon"], capsys)
    assert code == 2 and "Unknown body site 'moon'" in err
    code, _, err = run(predict.main, [jpgs[0], "--target", "cancer"], capsys)
    assert code == 2 and "Unknown explanation target" in err
    assert not (tmp_path / "h.db").exists()


def test_predict_heatmap_dir(jpgs, tiny_checkpoint, tmp_path, capsys):
    out_dir = tmp_path / "maps"
    code, out, err = run(
        predict.main,
        [
            jpgs[0],
            "--heatmap-dir",
            out_dir,
            "--age",
            "45",
            "--target",
            "mel",
            "--checkpoint",
            tiny_checkpoint,
        ],
        capsys,
    )
    assert code == 0, err
    stem = jpgs[0].stem
    overlay = np.asarray(Image.open(out_dir / f"{stem}_overlay.png"))
    assert overlay.shape == (150, 200, 3)
    chart = Image.open(out_dir / f"{stem}_contributions.png")
    assert chart.size[0] > 100 and chart.mode in ("RGB", "RGBA")
    assert "metadata effect on P(mel)" in out


def test_query_filters_csv_stats_and_env_default(
    jpgs, tiny_checkpoint, db_url, capsys, monkeypatch
):
    url = db_url
    monkeypatch.setenv(DB_URL_ENV, url)  # used when --db is not given
    code, _, err = run(
        predict.main,
        [jpgs[0], jpgs[1], "--sex", "female", "--db", url, "--checkpoint", tiny_checkpoint],
        capsys,
    )
    assert code == 0, err
    code, _, err = run(
        predict.main,
        [
            jpgs[2],
            "--sex",
            "male",
            "--age",
            "70",
            "--no-store-images",
            "--db",
            url,
            "--checkpoint",
            tiny_checkpoint,
        ],
        capsys,
    )
    assert code == 0, err

    code, out, _ = run(query_history.main, ["--format", "csv"], capsys)
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["id"] for r in rows] == ["3", "2", "1"]
    assert [r["sex"] for r in rows] == ["male", "female", "female"]
    assert float(rows[0]["age"]) == 70.0 and rows[1]["age"] == ""
    for r in rows:
        assert sum(float(r[f"p_{c}"]) for c in CLASSES) == pytest.approx(1.0, abs=1e-5)

    code, out, _ = run(query_history.main, ["--sex", "male", "--format", "json"], capsys)
    (only,) = json.loads(out)
    assert only["id"] == 3 and only["has_thumbnail"] is False and only["heatmap_png_base64"]
    code, out, _ = run(query_history.main, ["--age-min", "50", "--format", "json"], capsys)
    assert [r["id"] for r in json.loads(out)] == [3]
    code, out, err = run(
        query_history.main, ["--limit", "1", "--offset", "1", "--format", "json"], capsys
    )
    assert [r["id"] for r in json.loads(out)] == [2]
    assert "note: rows 2-2 of 3 matching" in err  # a cut export says so, beside stdout
    code, out, err = run(query_history.main, ["--limit", "2", "--format", "csv"], capsys)
    assert len(list(csv.DictReader(io.StringIO(out)))) == 2 and "of 3 matching" in err
    code, out, err = run(query_history.main, ["--limit", "3", "--format", "csv"], capsys)
    assert err == ""  # everything exported: nothing to say
    code, out, _ = run(
        query_history.main, ["--since", "2000-01-01", "--until", "2000-12-31"], capsys
    )
    assert code == 0 and "of 0 matching" in out
    top = only["predicted_class"]
    code, out, _ = run(
        query_history.main,
        ["--dx", top, "--min-prob", "0", "--max-prob", "1", "--format", "json"],
        capsys,
    )
    assert 3 in [r["id"] for r in json.loads(out)]
    assert all(r["predicted_class"] == top for r in json.loads(out))

    code, out, _ = run(query_history.main, ["--stats", "--format", "json"], capsys)
    stats = json.loads(out)
    assert sum(s["count"] for s in stats) == 3
    assert all(set(s) == {"day", "class", "count"} for s in stats)
    code, out, _ = run(query_history.main, ["--format", "json"], capsys)
    days = {r["created_at"][:10] for r in json.loads(out)}  # UTC days, on every engine
    assert {s["day"] for s in stats} == days
    code, out, _ = run(query_history.main, ["--stats"], capsys)
    assert code == 0 and "3 prediction(s)" in out and out.startswith("day")
    code, out, _ = run(query_history.main, ["--stats", "--format", "csv"], capsys)
    assert out.splitlines()[0] == "day,class,count"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dx", "foo"], "Unknown diagnosis class 'foo'"),
        (["--since", "2026-13-45"], "Bad since date '2026-13-45': use YYYY-MM-DD"),
        (["--min-prob", "2"], "outside 0-1"),
        (["--site", "back'; DROP TABLE predictions;--"], "Unknown body site"),
        (["--age-min", "-5"], "outside 0-120"),
        (["--id", "42"], "No prediction with id 42"),
        (["--limit", "0"], "Limit 0"),
    ],
)
def test_query_bad_filters_exit_2(argv, message, db_url, capsys):
    url = db_url
    from db.session import Database

    Database(url).dispose()
    code, out, err = run(query_history.main, ["--db", url, *argv], capsys)
    assert code == 2
    assert err.startswith("error: ") and message in err
    assert out == ""


def test_query_missing_database_is_not_created(tmp_path, capsys):
    path = tmp_path / "typo.db"
    code, _, err = run(query_history.main, ["--db", f"sqlite:///{path}"], capsys)
    assert code == 2 and "No history database at" in err
    assert not path.exists()


def test_sql_text_in_model_version_filter_is_harmless(db_url, capsys):
    url = db_url
    from db.session import Database

    Database(url).dispose()
    code, out, _ = run(
        query_history.main,
        ["--db", url, "--model-version", "x'; DROP TABLE predictions;--", "--format", "json"],
        capsys,
    )
    assert code == 0 and json.loads(out) == []
    code, out, _ = run(query_history.main, ["--db", url, "--stats", "--format", "json"], capsys)
    assert code == 0 and json.loads(out) == []  # the table is still there


@pytest.mark.slow
def test_real_subprocess_acceptance_flow(jpgs, tiny_checkpoint, tmp_path):
    env = subprocess_env()
    db_url = "sqlite:///h.db"  # relative: the file lands in the working directory
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "scripts.predict",
            str(jpgs[0]),
            "--age",
            "60",
            "--sex",
            "male",
            "--site",
            "back",
            "--db",
            db_url,
            "--checkpoint",
            str(tiny_checkpoint),
        ],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "stored as prediction id 1" in proc.stdout and DISCLAIMER in proc.stdout
    assert (tmp_path / "h.db").is_file()

    proc = subprocess.run(
        [sys.executable, "-m", "scripts.query_history", "--db", db_url, "--format", "json"],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(proc.stdout)
    assert row["id"] == 1 and row["sex"] == "male" and row["site"] == "back" and row["age"] == 60
    assert len(row["probabilities"]) == len(CLASSES)
    assert set(row["metadata_contributions"]) == {"age", "sex", "site"}
    assert base64.b64decode(row["heatmap_png_base64"]).startswith(b"\x89PNG")

    proc = subprocess.run(
        [sys.executable, "-m", "scripts.query_history", "--db", db_url, "--dx", "foo"],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "error: Unknown diagnosis class 'foo'" in proc.stderr
    assert "Traceback" not in proc.stderr
