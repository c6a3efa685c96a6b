"""scripts.inspect_data: summaries on both layouts, named errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from common.cli import run_cli
from scripts.inspect_data import main
from tests.conftest import REPO, write_synthetic_ham


@pytest.mark.parametrize("layout", ["flat", "parts"])
def test_inspect_synthetic(tmp_path, capsys, layout):
    data = write_synthetic_ham(tmp_path / "ham", per_class=20, layout=layout)
    out = tmp_path / "out"
    assert main(["--data-dir", str(data), "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 140 and summary["lesions"] == 70
    assert summary["lesions_crossing_splits"] == 0
    assert summary["age_missing"] == 7
    assert summary["per_class_split"]["all/images"]["mel"] == 20
    assert summary["per_class_split"]["all/lesions"]["total"] == 70
    assert (out / "sample_grid.png").stat().st_size > 10_000


def test_inspect_text_report_and_written_splits(tmp_path, capsys):
    data = write_synthetic_ham(tmp_path / "ham", per_class=20)
    splits = tmp_path / "splits.csv"
    assert (
        main(["--data-dir", str(data), "--out", str(tmp_path), "--write-splits", str(splits)]) == 0
    )
    text = capsys.readouterr().out
    assert "140 images, 70 lesions" in text and "lesions shared between splits: 0" in text
    assert "Missing age: 7" in text
    assert set(pd.read_csv(splits)["split"]) == {"train", "val", "test"}


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("drop_column", "missing required column(s) lesion_id"),
        ("bad_dx", "unknown dx 'cancer'"),
        ("missing_image", "not found under"),
        ("corrupt_image", "corrupt or truncated"),
    ],
)
def test_inspect_bad_inputs(tmp_path, capsys, breakage, message):
    data = write_synthetic_ham(tmp_path / "ham", per_class=3)
    csv = data / "HAM10000_metadata.csv"
    df = pd.read_csv(csv)
    first = data / "images" / f"{df['image_id'].iloc[0]}.jpg"
    if breakage == "drop_column":
        df.drop(columns=["lesion_id"]).to_csv(csv, index=False)
    elif breakage == "bad_dx":
        df.loc[1, "dx"] = "cancer"
        df.to_csv(csv, index=False)
    elif breakage == "missing_image":
        first.unlink()
    else:
        first.write_bytes(first.read_bytes()[:200])
    code = run_cli(main, ["--data-dir", str(data), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_inspect_subprocess_error_is_one_line(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "scripts.inspect_data", "--data-dir", str(tmp_path / "absent")],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: Data folder {tmp_path / 'absent'} does not exist."


@pytest.mark.realdata
def test_inspect_real_data(real_data, tmp_path, capsys):
    assert (
        main(["--data-dir", str(real_data), "--out", str(tmp_path), "--json", "--no-verify"]) == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 9007 and summary["lesions"] == 6723
    assert summary["lesions_crossing_splits"] == 0
    assert "committed" in summary["split_source"]
