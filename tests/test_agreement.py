"""Confirmed diagnoses, agreement and deletion below the UI: the migration that adds them (an old
database keeps its rows), the queries, the one agreement computation and the CLI.

The database is a plain SQLite URL fixture (``db_url``) so these tests can later be parametrised
over other engines."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import MetaData, create_engine, inspect, text

from common.cli import run_cli
from common.errors import DermError
from db import migrations
from db.models import PredictionRecord
from db.queries import HistoryFilter, confirm_prediction, delete_prediction, get_prediction
from db.session import Database
from scripts import query_history
from service.agreement import agreement_for, compute_agreement

T0 = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'history.db'}"


def row(predicted: str = "nv", version: str = "m@1", **over: object) -> PredictionRecord:
    values: dict[str, object] = {
        "created_at": T0,
        "image_sha256": "ab" * 32,
        "image_width": 600,
        "image_height": 450,
        "age": 50.0,
        "sex": "female",
        "site": "back",
        "predicted_class": predicted,
        "predicted_probability": 0.6,
        "probabilities": {predicted: 0.6},
        "warnings": [],
        "model_name": "m",
        "model_version": version,
        "checkpoint_sha256": "11" * 32,
        "latency_ms": 10.0,
    }
    values.update(over)
    return PredictionRecord(**values)


def add(db: Database, *rows: PredictionRecord) -> list[int]:
    with db.session() as s:
        s.add_all(rows)
        s.flush()
        return [int(r.id) for r in rows]


# --- migration ----------------------------------------------------------------------------------


def test_version_1_database_upgrades_with_rows_intact(db_url: str):
    """A database written by the code before migration 2 (only the frozen v1 schema) gains the
    confirmation columns and keeps every row and value."""
    engine = create_engine(db_url)
    assert migrations.migrate(engine, migrations.MIGRATIONS[:1]) == [1]
    md = MetaData()
    migrations._v1_tables(md)
    predictions = md.tables["predictions"]
    with engine.begin() as conn:
        for i, (cls, age) in enumerate([("mel", 61.0), ("nv", None)]):
            conn.execute(
                predictions.insert().values(
                    created_at=datetime(2025, 1, 1 + i),
                    image_sha256="cd" * 32,
                    image_width=10,
                    image_height=8,
                    age=age,
                    sex="male",
                    site="face",
                    predicted_class=cls,
                    predicted_probability=0.7,
                    probabilities={cls: 0.7},
                    warnings=["w"],
                    model_name="old",
                    model_version="old@1",
                    checkpoint_sha256="22" * 32,
                    latency_ms=5.0,
                )
            )
    engine.dispose()

    db = Database(db_url)  # migrates to the latest version
    assert migrations.current_version(db.engine) == migrations.latest_version()
    cols = {c["name"] for c in inspect(db.engine).get_columns("predictions")}
    assert {"confirmed_dx", "confirmed_source", "confirmed_note", "confirmed_at"} <= cols
    with db.engine.connect() as conn:
        rows = conn.execute(
            text("SELECT predicted_class, age, warnings, confirmed_dx FROM predictions ORDER BY id")
        ).all()
    assert [(r[0], r[1], json.loads(r[2]), r[3]) for r in rows] == [
        ("mel", 61.0, ["w"], None),
        ("nv", None, ["w"], None),
    ]
    with db.session() as s:
        confirm_prediction(s, 1, "mel", "histopathology", "excised")
    with db.session() as s:
        r = get_prediction(s, 1)
        assert (r.confirmed_dx, r.confirmed_source, r.confirmed_note) == (
            "mel",
            "histopathology",
            "excised",
        )
        assert r.confirmed_at is not None and r.confirmed_at.tzinfo is not None
    db.dispose()


# --- queries ------------------------------------------------------------------------------------


def test_confirm_validates_and_replaces(db_url: str):
    db = Database(db_url)
    (rid,) = add(db, row("bcc"))
    with db.session() as s:
        confirm_prediction(s, rid, "OTHER", "follow up")
    with db.session() as s:
        r = get_prediction(s, rid)
        assert (r.confirmed_dx, r.confirmed_source, r.confirmed_note) == (
            "other",
            "follow-up",
            None,
        )
    with db.session() as s:
        confirm_prediction(s, rid, "bcc", "expert consensus", "  board review ")
    with db.session() as s:
        r = get_prediction(s, rid)
        assert (r.confirmed_dx, r.confirmed_source, r.confirmed_note) == (
            "bcc",
            "expert consensus",
            "board review",
        )
    for args, message in [
        ((rid, "melanoma", "histopathology"), "Unknown confirmed diagnosis 'melanoma'"),
        ((rid, "mel", "gut feeling"), "Unknown confirmation source 'gut feeling'"),
        ((rid, "mel", "clinician", "x" * 1001), "keep it to 1000"),
        ((999, "mel", "clinician"), "No stored prediction has id 999"),
    ]:
        with pytest.raises(DermError, match=message), db.session() as s:
            confirm_prediction(s, *args)
    with db.session() as s:  # the failed attempts changed nothing
        assert get_prediction(s, rid).confirmed_dx == "bcc"
    db.dispose()


def test_delete_removes_only_that_row(db_url: str):
    db = Database(db_url)
    a, b = add(db, row("mel"), row("nv"))
    with db.session() as s:
        assert delete_prediction(s, a) is True
    with db.session() as s:
        assert delete_prediction(s, a) is False
        assert get_prediction(s, a) is None and get_prediction(s, b) is not None
    db.dispose()


# --- agreement ----------------------------------------------------------------------------------


def test_agreement_numbers_on_a_hand_made_slice():
    # confirmed mel: 3 (model: mel, mel, nv); confirmed nv: 2 (nv, mel); other: 1 (predicted bkl)
    pairs = [("mel", "mel"), ("mel", "mel"), ("nv", "mel"), ("nv", "nv"), ("mel", "nv")]
    pairs.append(("bkl", "other"))
    a = compute_agreement(pairs, n_predictions=10)
    assert (a.n_predictions, a.n_confirmed) == (10, 6)
    assert a.sensitivity["mel"] == pytest.approx(2 / 3)
    assert a.sensitivity["nv"] == pytest.approx(1 / 2)
    assert a.sensitivity["bcc"] is None  # no confirmed bcc
    assert a.ppv["mel"] == pytest.approx(2 / 3)  # predicted mel 3 times, right twice
    assert a.ppv["bkl"] == pytest.approx(0.0)  # predicted bkl once, confirmed other
    assert a.balanced_accuracy == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert a.melanoma_sensitivity == pytest.approx(2 / 3)
    assert a.accuracy == pytest.approx(3 / 6)
    assert a.support["other"] == 1
    other = a.confusion[-1]
    assert other[2] == 1 and sum(other) == 1  # row "other", column bkl
    assert sum(map(sum, a.confusion)) == 6


def test_agreement_empty_slice_has_no_numbers():
    a = compute_agreement([], n_predictions=3)
    assert (a.n_confirmed, a.balanced_accuracy, a.melanoma_sensitivity) == (0, None, None)
    assert json.dumps(a.to_dict())


def test_agreement_over_a_filtered_slice_and_by_version(db_url: str):
    db = Database(db_url)
    ids = add(
        db,
        row("mel", "m@1", sex="male"),
        row("nv", "m@1", sex="male"),
        row("mel", "m@2", sex="female"),
        row("nv", "m@2", sex="female"),  # never confirmed
    )
    with db.session() as s:
        for rid, dx in zip(ids[:3], ["mel", "mel", "nv"], strict=True):
            confirm_prediction(s, rid, dx, "histopathology")
    a = agreement_for(db)
    assert (a.n_predictions, a.n_confirmed) == (4, 3)
    assert set(a.by_model_version) == {"m@1", "m@2"}
    assert a.by_model_version["m@1"].melanoma_sensitivity == pytest.approx(0.5)
    assert a.by_model_version["m@2"].n_predictions == 2
    assert a.by_model_version["m@2"].n_confirmed == 1
    males = agreement_for(db, HistoryFilter(sex="male"))
    assert (males.n_predictions, males.n_confirmed) == (2, 2)
    assert males.melanoma_sensitivity == pytest.approx(0.5)
    assert HistoryFilter(confirmed=True).conditions()  # the filter exists for listings too
    db.dispose()


# --- CLI ----------------------------------------------------------------------------------------


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = run_cli(query_history.main, argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_confirm_agreement_delete(db_url: str, capsys):
    db = Database(db_url)
    a, b = add(db, row("mel"), row("nv"))
    db.dispose()
    code, out, _ = cli(
        ["--db", db_url, "--confirm", str(a), "--dx", "mel", "--confirm-source", "histopathology"],
        capsys,
    )
    assert code == 0 and "confirmed Melanoma (mel)" in out
    code, out, _ = cli(
        ["--db", db_url, "--confirm", str(b), "--dx", "other", "--confirm-source", "clinician",
         "--note", "seborrhoeic wart?"],
        capsys,
    )  # fmt: skip
    assert code == 0
    code, out, _ = cli(["--db", db_url, "--agreement", "--format", "json"], capsys)
    data = json.loads(out)
    assert (data["n_predictions"], data["n_confirmed"]) == (2, 2)
    assert data["melanoma_sensitivity"] == 1.0 and data["support"]["other"] == 1
    code, out, _ = cli(["--db", db_url, "--agreement"], capsys)
    assert code == 0 and "2 of 2 predictions have a confirmed diagnosis" in out
    assert "Melanoma sensitivity: 100.0 %" in out

    code, _, err = cli(["--db", db_url, "--confirm", str(a), "--dx", "mel"], capsys)
    assert code == 2 and "No confirmation source: say who confirmed it" in err
    code, _, err = cli(["--db", db_url, "--confirm", str(a), "--dx", "mel", "nv"], capsys)
    assert code == 2 and "exactly one --dx" in err

    code, out, _ = cli(["--db", db_url, "--delete", str(a)], capsys)
    assert code == 0 and f"prediction {a} deleted" in out
    code, _, err = cli(["--db", db_url, "--delete", str(a)], capsys)
    assert code == 2 and f"No prediction with id {a}" in err
    code, out, _ = cli(["--db", db_url, "--agreement", "--format", "json"], capsys)
    assert json.loads(out)["n_predictions"] == 1
