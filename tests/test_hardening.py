"""Records you can trust (issue 24, database / service / CLI side): ids never reused, concurrent
writers wait, a deleted record's bytes are gone from the database files, zips are streamed within
a memory bound, formula cells are neutralised in every CSV, user text in the PDF is literal, a
batch has an id and can be resumed, and every CLI error is one line, exit code 2, nothing stored.

Tests taking ``db_url`` run on SQLite and on a real PostgreSQL server (``tests/pg.py``).
"""

from __future__ import annotations

import csv
import io
import json
import re
import struct
import threading
import uuid
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import text

from common.cli import run_cli
from common.csv_cells import safe_cell, safe_frame
from common.errors import DermError, MetadataError
from data_pipeline.request import PredictionRequest
from data_pipeline.schema import CLASSES, normalize_age
from db import migrations
from db.models import PredictionRecord
from db.queries import HistoryFilter, count_predictions
from db.session import Database
from model.predictor import Predictor
from scripts import predict, query_history
from service import batch
from service.history import CSV_COLUMNS, write_csv, write_csv_rows
from service.prediction import PredictionService
from service.report import case_report, case_report_pdf

T0 = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
#: Columns added by migration 4 (absent from a version-2 database).
V4_COLUMNS = ("file_name", "batch_id", "output_files")


def jpeg(seed: int = 0, size: tuple[int, int] = (64, 48)) -> bytes:
    rng = np.random.default_rng(seed)
    img = rng.integers(60, 200, size=(size[1], size[0], 3)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_row(**over) -> PredictionRecord:
    values = {
        "created_at": T0,
        "image_sha256": "ab" * 32,
        "image_width": 64,
        "image_height": 48,
        "thumbnail": None,
        "age": 50.0,
        "sex": "female",
        "site": "back",
        "predicted_class": "nv",
        "predicted_probability": 0.6,
        "probabilities": {c: (0.6 if c == "nv" else 0.4 / 6) for c in CLASSES},
        "heatmap_png": None,
        "attribution_target": "nv",
        "metadata_contributions": {"age": 0.01, "sex": -0.02, "site": 0.0},
        "warnings": [],
        "model_name": "fusion",
        "model_version": "fusion@111111111111",
        "checkpoint_sha256": "11" * 32,
        "latency_ms": 12.5,
    }
    values.update(over)
    return PredictionRecord(**values)


def insert(db: Database, *rows: PredictionRecord) -> list[int]:
    with db.session(write=True) as s:
        s.add_all(rows)
        s.flush()
        return [int(r.id) for r in rows]


def run(main, argv: list, capsys) -> tuple[int, str, str]:
    code = run_cli(main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint: Path) -> Predictor:
    return Predictor.from_checkpoint(tiny_checkpoint)


@pytest.fixture
def service(predictor: Predictor, db_url: str):
    svc = PredictionService(predictor, Database(db_url))
    yield svc
    svc.close()


@pytest.fixture
def sqlite_service(predictor: Predictor, tmp_path: Path):
    svc = PredictionService(predictor, Database(f"sqlite:///{tmp_path / 'h.db'}"))
    yield svc
    svc.close()


# --- 1. ids are never reused ---------------------------------------------------------------------


def test_the_id_of_a_deleted_newest_record_is_not_handed_out_again(service: PredictionService):
    first = service.predict_and_store(PredictionRequest.build(jpeg(1), age=40)).id
    newest = service.predict_and_store(PredictionRequest.build(jpeg(2), age=41)).id
    assert first is not None and newest is not None and newest > first
    assert service.delete(newest) is True and service.get(newest) is None
    after = service.predict_and_store(PredictionRequest.build(jpeg(3), age=42)).id
    assert after is not None and after > newest


def test_a_version_2_sqlite_database_migrates_keeping_rows_and_ids(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    old = Database(url, migrate=False)
    assert migrations.migrate(old.engine, migrations.MIGRATIONS[:2]) == [1, 2]
    # Rows as version-2 code wrote them (the ORM of today has more columns).
    columns = [c.name for c in PredictionRecord.__table__.columns if c.name not in V4_COLUMNS]
    with old.engine.begin() as conn:
        for values in ({"id": 1, "age": 30.0}, {"id": 2, "site": "face"}, {"id": 5, "age": None}):
            row = make_row(**values)
            params = {c: getattr(row, c) for c in columns}
            params["created_at"] = T0.replace(tzinfo=None)
            for c in ("probabilities", "metadata_contributions", "warnings"):
                params[c] = json.dumps(params[c])
            names = ", ".join(columns)
            conn.execute(
                text(f"INSERT INTO predictions ({names}) VALUES (:{', :'.join(columns)})"), params
            )
        conn.execute(text("UPDATE predictions SET confirmed_dx = 'mel' WHERE id = 2"))
    old.dispose()

    new = Database(url)
    assert migrations.current_version(new.engine) == migrations.latest_version()
    with new.engine.connect() as conn:
        table_sql = conn.execute(
            text("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'predictions'")
        ).scalar_one()
        rows = conn.execute(
            text("SELECT id, age, site, confirmed_dx, batch_id, file_name FROM predictions")
        ).all()
    assert "AUTOINCREMENT" in table_sql
    assert [tuple(r) for r in rows] == [
        (1, 30.0, "back", None, None, None),
        (2, 50.0, "face", "mel", None, None),
        (5, None, "back", None, None, None),
    ]
    from service.history import delete_record

    assert delete_record(new, 5)
    (next_id,) = insert(new, make_row())
    assert next_id == 6  # not 5 again, although 5 was the largest id
    new.dispose()


# --- 2. concurrent writers wait instead of failing ----------------------------------------------


def test_20_concurrent_confirms_on_20_records_all_succeed(db_url: str):
    # Two engines (the app and a CLI at once), 20 threads released together.
    dbs = [Database(db_url), Database(db_url)]
    ids = insert(dbs[0], *[make_row(age=float(i)) for i in range(20)])
    services = [PredictionService(None, d) for d in dbs]  # type: ignore[arg-type]
    start = threading.Barrier(20)

    def confirm(i: int) -> str:
        start.wait()
        services[i % 2].confirm(ids[i], "mel", "histopathology", f"note {i}")
        return "ok"

    with ThreadPoolExecutor(max_workers=20) as pool:
        outcomes = list(pool.map(confirm, range(20)))
    assert outcomes == ["ok"] * 20
    rows = services[0].history(limit=100)
    assert sorted((r.id, r.confirmed_dx, r.confirmed_note) for r in rows) == [
        (rid, "mel", f"note {i}") for i, rid in enumerate(ids)
    ]
    for d in dbs:
        d.dispose()


# --- 3. delete means gone ------------------------------------------------------------------------


def _files_bytes(db_path: Path) -> bytes:
    """The raw bytes of the database file and its -wal (and -journal) as they are on disk."""
    out = b""
    for suffix in ("", "-wal", "-journal"):
        f = db_path.with_name(db_path.name + suffix)
        if f.exists():
            out += f.read_bytes()
    return out


def _planted(db: Database, marker: str) -> int:
    """A record whose image, heatmap, note, file name and hash all carry ``marker``."""
    hexmark = marker.encode().hex()[:64].ljust(64, "0")
    (rid,) = insert(
        db,
        make_row(
            thumbnail=b"\xff\xd8" + marker.encode() * 50,
            heatmap_png=b"\x89PNG" + marker.encode() * 50,
            image_sha256=hexmark,
            file_name=f"{marker}.jpg",
        ),
    )
    insert(db, make_row())  # a neighbour that stays, so the page is not simply freed whole
    with db.session(write=True) as s:
        from db.queries import confirm_prediction

        confirm_prediction(s, rid, "mel", "clinician", f"note {marker} end")
    return rid


@pytest.mark.parametrize("how", ["service", "cli"])
def test_deleted_record_bytes_are_not_in_the_sqlite_files(tmp_path: Path, how: str, capsys):
    path = tmp_path / "h.db"
    db = Database(f"sqlite:///{path}")
    marker = f"MARK{uuid.uuid4().hex}"
    rid = _planted(db, marker)
    hexmark = marker.encode().hex()[:64].ljust(64, "0").encode()
    before = _files_bytes(path)
    assert marker.encode() in before and hexmark in before  # the test can see the bytes
    if how == "service":
        assert PredictionService(None, db).delete(rid) is True  # type: ignore[arg-type]
    else:
        code, out, err = run(
            query_history.main, ["--db", f"sqlite:///{path}", "--delete", rid], capsys
        )
        assert code == 0 and f"prediction {rid} deleted." in out, err
    after = _files_bytes(path)
    assert marker.encode() not in after and hexmark not in after
    assert path.with_name("h.db-wal").stat().st_size == 0  # checkpointed and truncated
    with db.session() as s:
        assert count_predictions(s) == 1  # the neighbour is still there
    db.dispose()


def test_delete_removes_the_files_the_cli_wrote_for_the_record(
    tiny_checkpoint: Path, tmp_path: Path, capsys
):
    image = tmp_path / "lesion.jpg"
    image.write_bytes(jpeg(5))
    maps = tmp_path / "maps"
    url = f"sqlite:///{tmp_path / 'h.db'}"
    argv = [image, "--db", url, "--heatmap-dir", maps, "--checkpoint", tiny_checkpoint, "--json"]
    code, out, err = run(predict.main, argv, capsys)
    assert code == 0, err
    (result,) = json.loads(out)
    files = [Path(f) for f in result["files"]]
    assert files and all(f.is_file() for f in files)
    # A second run into the same folder writes new names, never over the first row's files.
    code, out2, err = run(predict.main, argv, capsys)
    (second,) = json.loads(out2)
    assert code == 0 and not set(second["files"]) & set(result["files"]), err
    code, out, err = run(query_history.main, ["--db", url, "--delete", result["id"]], capsys)
    assert code == 0, err
    assert not any(f.exists() for f in files)
    assert all(Path(f).is_file() for f in second["files"])


# --- 4. zips are streamed within a memory bound; a corrupt member is one row's error -----------


def _zip_of_zeros(path: Path, members: int, size: int, extra: dict[str, bytes]) -> None:
    """A zip of ``members`` deflated members of ``size`` zero bytes (one deflate stream reused,
    written with raw headers: compressing gigabytes for every member would take minutes), plus
    ``extra`` members written by :mod:`zipfile`."""
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk, crc, data = bytes(1 << 20), 0, []
    date = (2026 - 1980) << 9 | 1 << 5 | 1
    for start in range(0, size, len(chunk)):
        part = chunk[: min(len(chunk), size - start)]
        crc = zlib.crc32(part, crc)
        data.append(comp.compress(part))
    data.append(comp.flush())
    blob = b"".join(data)
    central, offset = [], 0
    with path.open("wb") as fh:
        for i in range(members):
            name = f"zeros/{i:03d}.png".encode()
            head = struct.pack(
                "<4s5H3L2H", b"PK\x03\x04", 20, 0, 8, 0, date, crc, len(blob), size, len(name), 0
            )
            fh.write(head + name + blob)
            central.append(
                struct.pack(
                    "<4s6H3L5H2L",
                    b"PK\x01\x02",
                    20,
                    20,
                    0,
                    8,
                    0,
                    date,
                    crc,
                    len(blob),
                    size,
                    len(name),
                    0,
                    0,
                    0,
                    0,
                    0,
                    offset,
                )
                + name
            )
            offset += len(head) + len(name) + len(blob)
        cd = b"".join(central)
        fh.write(
            cd + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, members, members, len(cd), offset, 0)
        )
    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as zf:
        for member, payload in extra.items():
            zf.writestr(member, payload)


def _corrupt(path: Path, member: str, how: str) -> None:
    """Flip bytes inside one member's data: ``crc`` (stored member: data read, CRC wrong) or
    ``deflate`` (deflated member: the stream itself is broken)."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack(
        "<2H", raw[info.header_offset + 26 : info.header_offset + 30]
    )
    start = info.header_offset + 30 + name_len + extra_len
    if how == "crc":
        raw[start + info.compress_size // 2] ^= 0xFF
    else:
        raw[start : start + 16] = b"\xff" * 16
    path.write_bytes(bytes(raw))


def _peak_rss_reset() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS (Linux >= 4.0)
    except OSError as exc:
        pytest.skip(f"cannot reset the peak RSS here ({exc}); the memory bound needs Linux")


def _kib(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.M).group(1))


@pytest.mark.parametrize(
    ("members", "size"),
    [(120, 49 * 2**20), (41, 49 * 2**20)],  # 5.9 GB in a ~6 MB zip; 2 GB
    ids=["120x49MB", "2GB"],
)
def test_zip_bomb_batch_stays_within_500_mb(
    sqlite_service: PredictionService, tmp_path: Path, members: int, size: int
):
    archive = tmp_path / "bomb.zip"
    good = {"good/a.jpg": jpeg(1), "good/b.jpg": jpeg(2)}
    _zip_of_zeros(archive, members, size, good)
    assert archive.stat().st_size < 10 * 2**20
    sqlite_service.predict_and_store(PredictionRequest.build(jpeg(9)))  # warm the model up
    _peak_rss_reset()
    base = _kib("VmRSS")
    items = batch.collect_items([archive])
    rows = batch.run_batch(sqlite_service, items)
    grown_mb = (_kib("VmHWM") - base) / 1024
    assert grown_mb < 500, f"peak memory grew by {grown_mb:.0f} MB"
    by_name = {r.name: r for r in rows}
    assert len(rows) == members + 2
    over = [r for r in rows if r.error and "was not read" in r.error]
    assert over and all("1024 MB together" in r.error for r in over)
    assert by_name["bomb.zip/good/a.jpg"].ok and by_name["bomb.zip/good/b.jpg"].ok
    assert sqlite_service.count() == 3  # the warm-up and the two good images, nothing else


def test_member_and_budget_limits_hold_before_and_while_reading(tmp_path: Path):
    archive = tmp_path / "three.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in ("a.png", "b.png"):
            zf.writestr(name, bytes(3 * 2**20))
    with zipfile.ZipFile(archive) as zf:
        a, b = zf.getinfo("a.png"), zf.getinfo("b.png")
        with pytest.raises(DermError, match=r"three\.zip/a\.png is over 1 MB"):
            batch.read_member(zf, a, "three.zip/a.png", limit=2**20)
        budget = batch.InflateBudget(5 * 2**20)
        assert len(batch.read_member(zf, a, "three.zip/a.png", budget=budget)) == 3 * 2**20
        assert budget.left == 2 * 2**20  # every inflated byte counts
        with pytest.raises(DermError, match="inflate to more than 5 MB together"):
            batch.read_member(zf, b, "three.zip/b.png", budget=budget)
        assert budget.left == 2 * 2**20  # refused from its header, nothing inflated


@pytest.mark.parametrize("how", ["crc", "deflate"])
def test_a_corrupt_member_fails_only_its_row(sqlite_service: PredictionService, tmp_path, how):
    archive = tmp_path / "set.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a.jpg", jpeg(1), zipfile.ZIP_DEFLATED)
        method = zipfile.ZIP_STORED if how == "crc" else zipfile.ZIP_DEFLATED
        zf.writestr("broken.jpg", jpeg(2, size=(120, 90)), method)
        zf.writestr("c.jpg", jpeg(3), zipfile.ZIP_DEFLATED)
    _corrupt(archive, "broken.jpg", how)
    rows = batch.run_batch(sqlite_service, batch.collect_items([archive]))
    assert [r.ok for r in rows] == [True, False, True]
    assert rows[1].name == "set.zip/broken.jpg" and "is corrupt inside its .zip" in rows[1].error
    assert sqlite_service.count() == 2


# --- 5. CSV formula neutralisation -------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "written"),
    [
        ('=HYPERLINK("http://x","click")', '\'=HYPERLINK("http://x","click")'),
        ("+1+2", "'+1+2"),
        ("-1+2", "'-1+2"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\tx", "'\tx"),
        ("\rx", "'\rx"),
        ("plain = fine", "plain = fine"),
        ("-0.25", "-0.25"),
        ("+1e-3", "+1e-3"),
        (-0.25, -0.25),
        (3, 3),
        (None, None),
        (True, True),
    ],
)
def test_safe_cell(value, written):
    assert safe_cell(value) == written


def test_safe_frame_keeps_numbers():
    import pandas as pd

    df = pd.DataFrame({"image_id": ["=cmd", "ok"], "p": [-0.5, 0.5]})
    out = safe_frame(df)
    assert out["image_id"].tolist() == ["'=cmd", "ok"] and out["p"].tolist() == [-0.5, 0.5]


FORMULA = '=HYPERLINK("http://x","click")'


def _cells(csv_text: str) -> list[str]:
    return [c for row in csv.reader(io.StringIO(csv_text)) for c in row]


def test_history_csv_and_cli_csv_neutralise_formulas(tmp_path: Path, capsys):
    url = f"sqlite:///{tmp_path / 'h.db'}"
    db = Database(url)
    (rid,) = insert(db, make_row(file_name=f"{FORMULA}.jpg", metadata_contributions={"age": -0.02}))
    PredictionService(None, db).confirm(rid, "mel", "clinician", FORMULA)  # type: ignore[arg-type]
    out = write_csv(PredictionService(None, db).history(), tmp_path / "h.csv")  # type: ignore[arg-type]
    download = _cells(out.read_text())
    code, printed, err = run(query_history.main, ["--db", url, "--format", "csv"], capsys)
    assert code == 0, err
    for cells in (download, _cells(printed)):
        assert "'" + FORMULA in cells and f"'{FORMULA}.jpg" in cells
        assert FORMULA not in cells and not any(c.startswith(("=", "@")) for c in cells)
        assert "-0.02" in cells  # a negative number stays a number
    header = next(csv.reader(io.StringIO(printed)))
    assert header == CSV_COLUMNS
    db.dispose()


def test_batch_csv_neutralises_a_formula_file_name(sqlite_service: PredictionService, tmp_path):
    image = tmp_path / f"{FORMULA.replace('/', '_')}.jpg"
    image.write_bytes(jpeg(4))
    rows = batch.run_batch(sqlite_service, batch.collect_items([image]))
    buf = io.StringIO()
    write_csv_rows(buf, batch.CSV_COLUMNS, (batch.csv_row(r) for r in rows))
    cells = _cells(buf.getvalue())
    assert "'" + image.name in cells and image.name not in cells


# --- 6. user text in the PDF is literal; probabilities highest first ---------------------------


def test_dollars_and_backslashes_in_a_note_reach_the_report_as_typed():
    probs = {
        "akiec": 0.05,
        "bcc": 0.3,
        "bkl": 0.02,
        "df": 0.01,
        "mel": 0.5,
        "nv": 0.1,
        "vasc": 0.02,
    }
    record = make_row(
        id=7,
        probabilities=probs,
        predicted_class="mel",
        predicted_probability=0.5,
        confirmed_dx="mel",
        confirmed_source="clinician",
        confirmed_note=r"paid $5 then $10 total; see $\foo$",
        confirmed_at=T0,
    )
    assert case_report_pdf(record).startswith(b"%PDF")  # "$\foo$" no longer breaks it
    svg = case_report(record, fmt="svg").decode()
    assert r"paid $5 then $10 total; see $\foo$" in svg
    names = [
        "Melanoma (mel)",
        "Basal cell carcinoma (bcc)",
        "Nevus (nv)",
        "Actinic keratosis (akiec)",
    ]
    # barh draws its labels bottom-up: highest probability last in the file, at the top.
    positions = [svg.rindex(n) for n in names]  # the tick labels come after the text
    assert positions == sorted(positions, reverse=True)


# --- 7. batch id: listed, resumed without duplicates, file names stored ------------------------


def test_batch_rows_carry_an_id_and_resume_skips_what_was_stored(
    sqlite_service: PredictionService, tmp_path: Path
):
    files = []
    for i in range(4):
        f = tmp_path / f"img_{i}.jpg"
        f.write_bytes(jpeg(10 + i))
        files.append(f)
    # "Interrupted" after two images: the first run only got that far.
    first = batch.run_batch(sqlite_service, batch.collect_items(files[:2]))
    bid = first[0].batch_id
    assert bid and all(r.batch_id == bid and r.ok for r in first)
    resumed = batch.run_batch(sqlite_service, batch.collect_items(files), batch_id=bid)
    assert [r.resumed for r in resumed] == [True, True, False, False]
    assert [r.prediction_id for r in resumed[:2]] == [r.prediction_id for r in first]
    assert resumed[0].top_class == first[0].top_class
    assert resumed[0].malignant_flag == first[0].malignant_flag
    assert sqlite_service.count() == 4 and sqlite_service.count({"batch_id": bid}) == 4
    listed = sqlite_service.history(HistoryFilter(batch_id=bid))
    assert sorted(r.file_name for r in listed) == [f.name for f in files]
    other = batch.run_batch(sqlite_service, batch.collect_items(files[:1]))
    assert other[0].batch_id != bid and sqlite_service.count({"batch_id": bid}) == 4
    with pytest.raises(DermError, match="Batch id"):
        HistoryFilter(batch_id="x'; DROP TABLE predictions; --")


def test_cli_batch_is_printed_listed_and_resumed(tiny_checkpoint: Path, tmp_path: Path, capsys):
    files = []
    for i in range(3):
        f = tmp_path / f"lesion_{i}.jpg"
        f.write_bytes(jpeg(20 + i))
        files.append(f)
    url = f"sqlite:///{tmp_path / 'h.db'}"
    common = ["--db", url, "--checkpoint", tiny_checkpoint]
    code, _out, err = run(predict.main, [*files[:2], *common], capsys)
    assert code == 0, err
    bid = re.search(r"batch (\w+) \(resume with --batch-id \1\)", err).group(1)
    code, out, err = run(predict.main, [*files, *common, "--batch-id", bid], capsys)
    assert code == 0, err
    assert err.count("skipped, already stored") == 2 and out.count("stored as prediction id") == 1
    code, out, err = run(
        query_history.main, ["--db", url, "--batch-id", bid, "--format", "csv"], capsys
    )
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 3 and {r["batch_id"] for r in rows} == {bid}
    assert sorted(r["file_name"] for r in rows) == sorted(str(f) for f in files)


# --- 8. CLI errors: one line, exit 2, nothing stored ---------------------------------------------

BIG_ID = "12345678901234567890123"


def _one_error_line(code: int, err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_predict_with_an_unknown_database_type(tmp_path: Path, capsys):
    image = tmp_path / "a.jpg"
    image.write_bytes(jpeg(1))
    code, _, err = run(predict.main, [image, "--db", "nosuch://x"], capsys)
    assert "Unknown database type 'nosuch'" in _one_error_line(code, err)


@pytest.mark.parametrize("flag", ["--id", "--delete", "--confirm"])
def test_query_history_with_a_23_digit_id(db_url: str, flag: str, capsys):
    db = Database(db_url)
    insert(db, make_row())
    extra = ["--dx", "mel", "--confirm-source", "clinician"] if flag == "--confirm" else []
    code, _, err = run(query_history.main, ["--db", db_url, flag, BIG_ID, *extra], capsys)
    assert "is out of range" in _one_error_line(code, err)
    with db.session() as s:
        assert count_predictions(s) == 1
        assert s.scalar(text("SELECT confirmed_dx FROM predictions")) is None
    db.dispose()


def test_service_refuses_unusable_ids_with_a_clean_error(service: PredictionService):
    for call in (service.get, service.delete, lambda i: service.confirm(i, "mel", "clinician")):
        for bad in (int(BIG_ID), BIG_ID, "abc", 0, -3, 1.5):
            with pytest.raises(DermError):
                call(bad)
    # Within SQLite's range but past PostgreSQL's INTEGER: simply not found on both.
    assert service.get(2**40) is None and service.delete(2**40) is False


def test_predict_heatmap_dir_that_is_a_file_fails_before_storing(
    tiny_checkpoint: Path, tmp_path: Path, capsys
):
    image = tmp_path / "a.jpg"
    image.write_bytes(jpeg(1))
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    db_file = tmp_path / "h.db"
    argv = [
        image,
        "--db",
        f"sqlite:///{db_file}",
        "--heatmap-dir",
        blocker,
        "--checkpoint",
        tiny_checkpoint,
    ]
    code, _, err = run(predict.main, argv, capsys)
    assert "is a file, not a folder" in _one_error_line(code, err)
    assert not db_file.exists()


def test_nul_in_a_note_is_refused_on_every_backend(service: PredictionService, capsys):
    (rid,) = insert(service.db, make_row())
    with pytest.raises(DermError, match="NUL character"):
        service.confirm(rid, "mel", "clinician", "before\x00after")
    assert service.get(rid).confirmed_dx is None
    argv = [
        "--db",
        service.db.url,
        "--confirm",
        rid,
        "--dx",
        "mel",
        "--confirm-source",
        "clinician",
    ]
    code, _, err = run(query_history.main, [*argv, "--note", "a\x00b"], capsys)
    assert "NUL character" in _one_error_line(code, err)


@pytest.mark.parametrize(
    ("given", "shown"), [(120.0001, "120.0001"), ("120.0001", "120.0001"), (150.0, "150")]
)
def test_age_just_outside_the_range_is_said_as_given(given, shown):
    with pytest.raises(MetadataError, match=re.escape(f"Age {shown} is outside 0-120")):
        normalize_age(given)


def test_history_download_keeps_the_classes_of_a_model_with_another_class_set(
    sqlite_service: PredictionService, tmp_path: Path
):
    """A row stored by a model trained on another class set (here a clinic's scc/other) keeps
    its probabilities in the app's History CSV, though that model is not the one loaded."""
    from app.ui.history import search_history

    insert(
        sqlite_service.db,
        make_row(),
        make_row(
            predicted_class="scc",
            probabilities={"scc": 0.7, "other": 0.3},
            attribution_target="scc",
            model_version="clinic@222222222222",
        ),
    )
    out = search_history(sqlite_service, tmp_path, None, None, None, None, None, None)
    rows = list(csv.DictReader(io.StringIO(Path(out["download"]).read_text())))
    assert len(rows) == 2
    clinic = next(r for r in rows if r["model_version"] == "clinic@222222222222")
    assert (clinic["p_scc"], clinic["p_other"], clinic["p_nv"]) == ("0.7", "0.3", "")
    ham = next(r for r in rows if r["model_version"] != "clinic@222222222222")
    assert float(ham["p_nv"]) == 0.6 and ham["p_scc"] == ""
