"""The one error model: every entry point turns an expected failure into one clear sentence.

Each case of the issue has a test here: read-only / unopenable SQLite, a missing database driver,
a database that is down or locked during a History search, the last representable day as a
filter, non-finite ages, huge echoed values, unescaped stored values, exposing the app without a
login, and export folders left behind by a killed app.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest
from sqlalchemy.exc import OperationalError

from app import frontend
from app.__main__ import exposure_warnings, launch
from app.__main__ import main as app_main
from common.cli import run_cli
from common.errors import DatabaseError, DermError, MetadataError
from common.text import ECHO_LIMIT, echo
from data_pipeline.request import PredictionRequest
from data_pipeline.schema import Metadata, normalize_age
from db.models import PredictionRecord
from db.queries import HistoryFilter
from db.session import Database
from scripts import predict, query_history
from service.history import detail_markdown
from service.prediction import PredictionService

POSTGRES_URL = "postgresql+psycopg://user@127.0.0.1:9/history"
HAS_PSYCOPG = importlib.util.find_spec("psycopg") is not None


def run(main, argv, capsys) -> tuple[int, str, str]:
    code = run_cli(main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_clear_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and "Unexpected error" not in err, err
    assert lines and lines[-1].startswith("error: "), err
    return lines[-1]


def errors_at_every_entry_point(url: str, checkpoint: Path, tmp_path: Path, capsys) -> list[str]:
    """The error line of query_history, predict --db and the app, each started with ``url``."""
    lines = []
    for main, argv in [
        (query_history.main, ["--db", url]),
        (predict.main, [tmp_path / "x.jpg", "--db", url]),
        (app_main, ["--checkpoint", checkpoint, "--db", url]),
    ]:
        code, _, err = run(main, argv, capsys)
        assert code == 2, err
        lines.append(one_clear_line(err))
    return lines


def row(**overrides) -> PredictionRecord:
    values = {
        "id": 7,
        "image_sha256": "ab" * 32,
        "image_width": 200,
        "image_height": 150,
        "age": 40.0,
        "sex": "female",
        "site": "back",
        "predicted_class": "nv",
        "predicted_probability": 0.8,
        "probabilities": {"nv": 0.8, "mel": 0.2},
        "warnings": [],
        "model_name": "m",
        "model_version": "m@123",
        "checkpoint_sha256": "cd" * 32,
        "latency_ms": 12.0,
    }
    values.update(overrides)
    return PredictionRecord(**values)


@pytest.fixture
def history_db(tmp_path: Path) -> Path:
    """A history database with one stored row, written with the normal (read-write) URL."""
    path = tmp_path / "h.db"
    db = Database(f"sqlite:///{path}")
    with db.session() as s:
        s.add(row(id=None))
    db.dispose()
    return path


def read_only_url(path: Path) -> str:
    """SQLite's own read-only mode (a chmod would not stop root, which runs CI)."""
    return f"sqlite:///file:{path}?mode=ro&uri=true"


# --- read-only or unopenable SQLite --------------------------------------------------------------


def test_history_can_be_read_from_a_read_only_database(history_db, capsys):
    code, out, err = run(query_history.main, ["--db", read_only_url(history_db)], capsys)
    assert code == 0, err
    assert "rows 1-1 of 1 matching" in out
    code, out, err = run(
        query_history.main, ["--db", read_only_url(history_db), "--id", "1"], capsys
    )
    assert code == 0 and "prediction 1" in out


def test_app_starts_and_shows_history_on_a_read_only_database(
    history_db, tiny_checkpoint, tmp_path
):
    service = PredictionService.create(tiny_checkpoint, read_only_url(history_db))
    try:
        values = frontend.search_history(service, tmp_path, "", "", [], 0, "any", "any")
        assert "**1 matching prediction**" in values["summary"]
        assert "prediction" in frontend.show_record(service, "1")["detail"].lower()
    finally:
        service.close()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_history_can_be_read_from_a_read_only_file(history_db, capsys):
    history_db.chmod(0o444)
    code, out, err = run(query_history.main, ["--db", f"sqlite:///{history_db}"], capsys)
    assert code == 0, err
    assert "of 1 matching" in out


def test_storing_into_a_read_only_database_is_one_clear_line(
    history_db, tiny_checkpoint, synthetic_ham, capsys
):
    image = next((synthetic_ham / "images").glob("*.jpg"))
    url = read_only_url(history_db)
    code, _, err = run(predict.main, [image, "--db", url, "--checkpoint", tiny_checkpoint], capsys)
    assert code == 2
    assert "could not be stored: attempt to write a readonly database" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("kind", ["directory", "not a database"])
def test_unopenable_database_is_one_clear_line_everywhere(tmp_path, tiny_checkpoint, capsys, kind):
    path = tmp_path / "broken.db"
    if kind == "directory":
        path.mkdir()
    else:
        path.write_bytes(b"this is not SQLite" * 100)
    for line in errors_at_every_entry_point(f"sqlite:///{path}", tiny_checkpoint, tmp_path, capsys):
        assert "history database" in line and "cannot be opened" in line, line


# --- missing database driver ----------------------------------------------------------------------


def test_missing_driver_names_the_fix(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    if HAS_PSYCOPG:  # hide the installed driver: importing it now fails as if it were absent
        monkeypatch.setitem(sys.modules, "psycopg", None)
    for line in errors_at_every_entry_point(POSTGRES_URL, tiny_checkpoint, tmp_path, capsys):
        assert 'pip install -e ".[postgres]"' in line and "psycopg" in line, line


def test_pyproject_declares_the_postgres_extra():
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    extra = pyproject["project"]["optional-dependencies"]["postgres"]
    assert any(dep.startswith("psycopg[binary]") for dep in extra)


# --- database down or locked during a History search ----------------------------------------------


def _locked(*args, **kwargs):
    raise OperationalError("SELECT ...", {}, Exception("database is locked"))


@pytest.fixture
def app_service(tiny_checkpoint, tmp_path):
    service = PredictionService.create(tiny_checkpoint, f"sqlite:///{tmp_path / 'app.db'}")
    yield service
    service.close()


@pytest.mark.parametrize("failure", ["locked", "down"])
def test_history_search_with_the_database_unavailable_is_a_database_message(
    app_service, tmp_path, monkeypatch, failure
):
    if failure == "locked":
        monkeypatch.setattr(app_service.db, "Session", _locked)
    else:  # the database server went away: every new connection fails
        monkeypatch.setattr(app_service.db.engine, "connect", _locked)
        monkeypatch.setattr(app_service.db.engine, "raw_connection", _locked)
        app_service.db.engine.dispose()
    with pytest.raises(gr.Error) as info:
        frontend.search_history(app_service, tmp_path, "", "", [], 0, "any", "any")
    message = str(info.value)
    assert "history database" in message and "database is locked" in message
    assert "Unexpected error" not in message and "Nothing is wrong" not in message
    with pytest.raises(gr.Error, match="database is locked"):
        frontend.show_record(app_service, "1")


def test_database_session_errors_are_database_errors(tmp_path, monkeypatch):
    db = Database(f"sqlite:///{tmp_path / 'x.db'}")
    monkeypatch.setattr(db, "Session", _locked)
    with (
        pytest.raises(DatabaseError, match="cannot be used: database is locked") as info,
        db.session(),
    ):
        pass
    assert isinstance(info.value, DermError)


# --- the last day a date can hold -----------------------------------------------------------------


def test_until_the_last_representable_day(history_db, app_service, tmp_path, capsys):
    code, out, err = run(
        query_history.main, ["--db", f"sqlite:///{history_db}", "--until", "9999-12-31"], capsys
    )
    assert code == 0, err
    assert "of 1 matching" in out
    code, out, err = run(
        query_history.main, ["--db", f"sqlite:///{history_db}", "--since", "9999-12-31"], capsys
    )
    assert code == 0 and "of 0 matching" in out
    values = frontend.search_history(
        app_service, tmp_path, "2000-01-01", "9999-12-31", [], 0, "any", "any"
    )
    assert "No stored predictions match" in values["summary"]
    assert HistoryFilter(since="9999-12-31", until="9999-12-31").conditions()


# --- non-finite ages ------------------------------------------------------------------------------


@pytest.mark.parametrize("age", ["nan", "NaN", "inf", "-inf", "Infinity", float("inf")])
def test_non_finite_age_is_refused(age):
    with pytest.raises(MetadataError, match="not a finite number of years"):
        Metadata.parse(age=age)


def test_minus_zero_age_is_zero():
    age = normalize_age("-0")
    assert age == 0.0 and str(age) == "0.0"
    assert str(Metadata.parse(age=-0.0).age) == "0.0"


def test_missing_age_from_a_csv_is_still_unknown():
    assert normalize_age(float("nan")) is None  # pandas' missing value, not user text


def test_cli_refuses_nan_age(tmp_path, capsys):
    code, _, err = run(predict.main, [tmp_path / "x.jpg", "--age", "nan"], capsys)
    assert code == 2 and "Age 'nan' is not a finite number" in one_clear_line(err)


# --- echoed values are capped ---------------------------------------------------------------------


def test_echo_caps_long_values():
    huge = "x" * 2_000_000
    shown = echo(huge)
    assert len(shown) == ECHO_LIMIT and shown.endswith("…")
    assert echo("back") == "'back'"


@pytest.mark.parametrize(
    "call",
    [
        lambda big: Metadata.parse(sex=big),
        lambda big: Metadata.parse(site=big),
        lambda big: Metadata.parse(age=big),
        lambda big: PredictionRequest.build(b"", target=big),
        lambda big: HistoryFilter(classes=[big]),
        lambda big: HistoryFilter(since=big),
        lambda big: HistoryFilter(min_prob=big),
    ],
)
def test_errors_do_not_echo_a_2mb_field(call):
    with pytest.raises(DermError) as info:
        call("z" * 2_000_000)
    assert len(str(info.value)) < 400 and "…" in str(info.value)


def test_filter_summary_and_bad_id_are_capped(app_service):
    f = HistoryFilter(model_version="v" * 2_000_000)
    assert len(f.describe()) < 200
    with pytest.raises(gr.Error) as info:
        frontend.show_record(app_service, "9" * 5000 + "x")
    assert len(str(info.value)) < 400


# --- the History detail escapes every stored value ------------------------------------------------


def test_history_detail_escapes_stored_values():
    evil = "<img src=x onerror=alert(1)>"
    md = detail_markdown(
        row(sex=f"{evil}*", site=f"[site](javascript:x){evil}", model_version=evil, warnings=[evil])
    )
    assert "<img" not in md and "](javascript" not in md
    assert md.count("&lt;img") == 4


# --- exposing the app without a login -------------------------------------------------------------


def test_listening_on_all_interfaces_without_auth_warns(capsys):
    assert exposure_warnings("127.0.0.1", False, None) == []
    assert exposure_warnings("0.0.0.0", False, [("a", "b")]) == []
    (warning,) = exposure_warnings("0.0.0.0", False, None)
    assert "--host 0.0.0.0 without --auth" in warning
    assert len(exposure_warnings("0.0.0.0", True, None)) == 2

    demo = SimpleNamespace(launch=lambda **kw: None, local_url="http://0.0.0.0:1/")
    launch(demo, host="0.0.0.0", port=1, quiet=True)
    assert "--host 0.0.0.0 without --auth" in capsys.readouterr().out
    launch(demo, host="0.0.0.0", port=1, auth=[("a", "b")], quiet=True)
    assert "WARNING" not in capsys.readouterr().out


# --- export folders of a killed app ---------------------------------------------------------------


def test_stale_export_folders_are_removed_at_start(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone = tmp_path / f"{frontend.EXPORT_PREFIX}{dead.pid}-abc"
    alive = tmp_path / f"{frontend.EXPORT_PREFIX}{os.getppid()}-def"
    mine = tmp_path / f"{frontend.EXPORT_PREFIX}{os.getpid()}-ghi"
    old_unnamed, new_unnamed = (
        tmp_path / f"{frontend.EXPORT_PREFIX}x1",
        tmp_path / "dermfusion-history-x2",
    )
    for folder in (gone, alive, mine, old_unnamed, new_unnamed):
        folder.mkdir()
        (folder / "export.csv").write_text("id\n")
    an_hour_ago = time.time() - 2 * frontend.EXPORT_MAX_AGE_S
    os.utime(old_unnamed, (an_hour_ago, an_hour_ago))
    assert frontend.clean_stale_exports(tmp_path) == 2
    assert not gone.exists() and not old_unnamed.exists()
    assert alive.exists() and mine.exists() and new_unnamed.exists()


def test_make_frontend_tags_its_export_folder_with_its_pid(app_service, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    stale = tmp_path / f"{frontend.EXPORT_PREFIX}999999999-old"
    stale.mkdir()
    demo = frontend.make_frontend(app_service)
    try:
        (folder,) = tmp_path.glob(f"{frontend.EXPORT_PREFIX}*")
        assert folder.name.startswith(f"{frontend.EXPORT_PREFIX}{os.getpid()}-")
    finally:
        demo.close()
