"""Hosting: configuration by environment, the login (form and HTTP Basic) and its slowdown,
``/healthz``, the REST API on the real app (predict → list → item → files → delete, with and
without a login), and a clean SIGTERM of a real ``python -m app`` process."""

from __future__ import annotations

import json
import signal
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from app.__main__ import AppServer, build_parser, main
from app.auth import Credentials, LoginThrottle, basic_credentials
from app.config import ConfigError, Settings, read_auth_file, resolve
from app.health import Lifecycle
from app.ui.common import EXPORT_PREFIX
from app.ui.demo import BUSY_MESSAGE
from common.version import __version__
from scripts.load_benchmark import AppProcess, free_port
from service.prediction import PredictionService

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "app" / "examples").glob("*.jpg"))
USER, PASSWORD = "alice", "pa:ss:word"


def settings(argv: list[str], env: dict[str, str] | None = None) -> Settings:
    return resolve(build_parser().parse_args(argv), env or {})


# --- configuration -------------------------------------------------------------------------------


def test_environment_configures_and_flags_override(tmp_path):
    env = {
        "DERMFUSION_DB_URL": "sqlite:///env.db",
        "DERMFUSION_HOST": "0.0.0.0",
        "DERMFUSION_PORT": "8000",
        "DERMFUSION_SHARE": "true",
        "DERMFUSION_ROOT_PATH": "dermfusion/",
        "DERMFUSION_MAX_FILE_SIZE": "5mb",
        "DERMFUSION_CONCURRENCY": "3",
        "DERMFUSION_MAX_QUEUE": "9",
        "DERMFUSION_STORE_IMAGES": "0",
        "DERMFUSION_RUNTIME": "torch",
        "DERMFUSION_AUTH": "alice:pw-one-7,bob:pw-two-8",
        "DERMFUSION_LOGIN_DELAY": "0.5",
        "DERMFUSION_DRAIN_TIMEOUT": "7",
    }
    s = settings([], env)
    assert (s.db, s.host, s.port, s.share, s.root_path) == (
        "sqlite:///env.db",
        "0.0.0.0",
        8000,
        True,
        "/dermfusion",
    )
    assert (s.max_file_size, s.concurrency, s.max_queue, s.store_images) == (
        5 * 1024**2,
        3,
        9,
        False,
    )
    assert (s.runtime, s.login_delay, s.drain_timeout) == ("torch", 0.5, 7.0)
    assert s.auth == (("alice", "pw-one-7"), ("bob", "pw-two-8"))
    assert "pw-one" not in repr(s) and "pw-two" not in repr(s)  # never shown

    flags = settings(
        ["--db", "sqlite:///flag.db", "--port", "9000", "--no-share", "--concurrency", "1"], env
    )
    assert (flags.db, flags.port, flags.share, flags.concurrency) == (
        "sqlite:///flag.db",
        9000,
        False,
        1,
    )
    assert flags.max_queue == 9  # not given as a flag: the environment's

    secrets = tmp_path / "auth"
    secrets.write_text("# logins\nalice:with,comma\n\ncarol:c\n")
    from_file = settings(["--auth-file", str(secrets)], env)
    assert from_file.auth == (
        ("alice", "with,comma"),
        ("carol", "c"),
    )  # flags win over $DERMFUSION_AUTH
    both = settings([], {"DERMFUSION_AUTH": "dave:d", "DERMFUSION_AUTH_FILE": str(secrets)})
    assert both.users == ["dave", "alice", "carol"]

    pw = tmp_path / "pg_password"
    pw.write_text("p@ss/w:rd\n")
    pg = settings(
        [],
        {
            "DERMFUSION_DB_URL": "postgresql+psycopg://app@db:5432/dermfusion",
            "DERMFUSION_DB_PASSWORD_FILE": str(pw),
        },
    )
    from sqlalchemy.engine import make_url

    assert pg.db is not None and make_url(pg.db).password == "p@ss/w:rd"
    assert "p@ss" not in repr(pg)
    with pytest.raises(ConfigError, match="needs a database URL"):
        settings([], {"DERMFUSION_DB_PASSWORD_FILE": str(pw)})

    defaults = settings([])
    assert (defaults.host, defaults.port, defaults.auth, defaults.root_path) == (
        "127.0.0.1",
        7860,
        (),
        "",
    )
    assert defaults.max_file_size == 20 * 1024**2 and defaults.store_images


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DERMFUSION_PORT": "http"}, "$DERMFUSION_PORT: expected a whole number"),
        ({"DERMFUSION_CONCURRENCY": "0"}, "$DERMFUSION_CONCURRENCY"),
        ({"DERMFUSION_SHARE": "maybe"}, "$DERMFUSION_SHARE: expected 1 / 0"),
        ({"DERMFUSION_MAX_FILE_SIZE": "lots"}, "$DERMFUSION_MAX_FILE_SIZE"),
        ({"DERMFUSION_ROOT_PATH": "/a b"}, "$DERMFUSION_ROOT_PATH"),
        ({"DERMFUSION_AUTH": "alice:ok,s3cr3t-typed-alone"}, "$DERMFUSION_AUTH: expected"),
        ({"DERMFUSION_AUTH": "a:x,a:y"}, "given twice"),
    ],
)
def test_bad_environment_is_one_line_naming_the_variable(env, message):
    with pytest.raises(ConfigError) as info:
        settings([], env)
    text = str(info.value)
    assert message in text and "\n" not in text
    assert "s3cr3t" not in text  # a password typed in the wrong place is not repeated


def test_auth_file_errors_name_the_line_not_the_secret(tmp_path, capsys):
    secrets = tmp_path / "auth"
    secrets.write_text("alice:ok\nhunter2-without-user\n")
    with pytest.raises(ValueError, match="line 2: expected USER:PASSWORD") as info:
        read_auth_file(secrets)
    assert "hunter2" not in str(info.value)
    code = main(["--auth-file", str(secrets), "--port", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "line 2" in err and "hunter2" not in err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--auth", "hunter2"])
    assert "hunter2" not in capsys.readouterr().err


def test_help_lists_every_environment_variable(capsys):
    from app.config import VARIABLES

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    for v in VARIABLES:
        assert v.env in out and v.flag in out
    doc = (Path(__file__).resolve().parent.parent / "docs/deploy/configuration.md").read_text()
    for v in VARIABLES:
        assert v.env in doc, f"docs/deploy/configuration.md does not list {v.env}"


def test_version_is_one_number():
    import tomllib

    pyproject = tomllib.loads(
        (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    )
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"]["attr"] == (
        "common.version.__version__"
    )
    changelog = (Path(__file__).resolve().parent.parent / "CHANGELOG.md").read_text()
    assert f"## {__version__}" in changelog


def test_new_checkpoints_record_the_version(tiny_checkpoint):
    """A newly written checkpoint says which DermFusion wrote it; one from before says nothing."""
    from model.checkpoint import SHIPPED_DIR, load_config

    assert load_config(tiny_checkpoint).software_version == __version__
    shipped = load_config(SHIPPED_DIR)
    assert shipped.to_dict()["software_version"] == shipped.software_version


# --- the login and its slowdown ------------------------------------------------------------------


def test_credentials_check_exactly():
    creds = Credentials([(USER, PASSWORD)])
    assert creds(USER, PASSWORD)
    assert not creds(USER, "pa:ss") and not creds("bob", PASSWORD) and not creds(USER, "")
    assert PASSWORD not in repr(creds) and not Credentials([])
    assert basic_credentials("Basic YWxpY2U6cGE6c3M=") == ("alice", "pa:ss")
    assert basic_credentials("Bearer x") is None and basic_credentials("Basic %%%") is None


def test_route_path_with_and_without_the_proxy_prefix():
    from app.auth import route_path

    assert route_path({"path": "/login", "root_path": "/dermfusion"}) == "/login"
    assert route_path({"path": "/dermfusion/login", "root_path": "/dermfusion"}) == "/login"
    assert route_path({"path": "/dermfusionx/login", "root_path": "/dermfusion"}) == (
        "/dermfusionx/login"
    )
    assert route_path({"path": "/api/v1/predict"}) == "/api/v1/predict"


def test_login_throttle_doubles_per_failure_and_forgets():
    now = [1000.0]
    throttle = LoginThrottle(1.0, max_delay=5.0, clock=lambda: now[0])
    assert throttle.delay("a") == 0
    delays = []
    for _ in range(5):
        throttle.failure("a")
        delays.append(throttle.delay("a"))
    assert delays == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert throttle.delay("b") == 0  # per client
    throttle.success("a")
    assert throttle.delay("a") == 0
    throttle.failure("a")
    now[0] += 10_000  # long after: forgotten
    assert throttle.delay("a") == 0
    assert LoginThrottle(0).delay("a") == 0  # 0: off


def test_drain_waits_for_requests_in_flight():
    life = Lifecycle()
    done = threading.Event()

    def request() -> None:
        with life.request():
            done.wait(5)

    t = threading.Thread(target=request)
    t.start()
    while life.in_flight == 0:
        time.sleep(0.01)
    threading.Timer(0.2, done.set).start()
    assert life.drain(timeout=30) is True and life.draining and life.in_flight == 0
    t.join()
    assert Lifecycle().drain(busy=lambda: 1, timeout=0.1) is False


# --- the real app: REST, /healthz, the login form ------------------------------------------------


@pytest.fixture(scope="module")
def served(tiny_checkpoint, tmp_path_factory):
    """The real app (Gradio UI + REST + /healthz on one server) with one login."""
    folder = tmp_path_factory.mktemp("hosting")
    db_dir = folder / "db"
    service = PredictionService.create(tiny_checkpoint, db_url=f"sqlite:///{db_dir / 'h.db'}")
    s = settings(
        ["--port", str(free_port()), "--max-file-size", "300kb", "--login-delay", "0.3"],
        {"DERMFUSION_AUTH": f"{USER}:{PASSWORD}"},
    )
    server = AppServer(service, s)
    result = server.launch(quiet=True)
    yield result.local_url.rstrip("/"), server, db_dir
    server.close()


AUTH = (USER, PASSWORD)


def _predict(url: str, auth=AUTH, path: Path = EXAMPLES[0], **fields) -> httpx.Response:
    with path.open("rb") as fh:
        return httpx.post(
            f"{url}/api/v1/predict",
            files={"image": (path.name, fh, "image/jpeg")},
            data={"age": "52", "sex": "female", "site": "back", **fields},
            auth=auth,
            timeout=60,
        )


@pytest.mark.slow
def test_rest_predict_list_item_files_delete(served):
    url, server, _ = served
    before = server.service.count()
    r = _predict(url)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["stored"] is True and isinstance(body["id"], int)
    assert body["top_class"] in body["probabilities"] and len(body["probabilities"]) >= 2
    assert abs(sum(body["probabilities"].values()) - 1) < 1e-4
    assert set(body["metadata_contributions"]) == {"age", "sex", "site"}
    assert body["attribution_target"] == body["top_class"]
    assert isinstance(body["warnings"], list)
    assert server.service.count() == before + 1  # stored exactly once
    row_id = body["id"]

    listing = httpx.get(
        f"{url}/api/v1/predictions", params={"sex": "female", "limit": 5}, auth=AUTH
    ).json()
    assert listing["total"] >= 1 and listing["items"][0]["id"] == row_id
    assert listing["items"][0]["links"]["self"] == f"/api/v1/predictions/{row_id}"
    none = httpx.get(f"{url}/api/v1/predictions", params={"sex": "male"}, auth=AUTH).json()
    assert row_id not in [i["id"] for i in none["items"]]

    item = httpx.get(f"{url}/api/v1/predictions/{row_id}", auth=AUTH).json()
    assert item["id"] == row_id and item["age"] == 52 and item["has_heatmap"] is True
    png = httpx.get(f"{url}/api/v1/predictions/{row_id}/heatmap.png", auth=AUTH)
    assert png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"
    pdf = httpx.get(f"{url}/api/v1/predictions/{row_id}/report.pdf", auth=AUTH, timeout=60)
    assert pdf.status_code == 200 and pdf.content[:5] == b"%PDF-"
    csv = httpx.get(f"{url}/api/v1/predictions.csv", auth=AUTH)
    assert csv.text.splitlines()[0].startswith("id,created_at") and f"\n{row_id}," in csv.text

    assert httpx.delete(f"{url}/api/v1/predictions/{row_id}", auth=AUTH).status_code == 204
    gone = httpx.get(f"{url}/api/v1/predictions/{row_id}", auth=AUTH)
    assert gone.status_code == 404 and gone.json() == {
        "error": f"No stored prediction has id {row_id}."
    }
    assert httpx.delete(f"{url}/api/v1/predictions/{row_id}", auth=AUTH).status_code == 404
    assert server.service.count() == before


@pytest.mark.slow
def test_rest_errors_are_one_line_json(served, tmp_path):
    url, server, _ = served
    before = server.service.count()
    bad_age = _predict(url, age="200")
    assert bad_age.status_code == 400 and "Age 200" in bad_age.json()["error"]
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("not an image")
    assert _predict(url, path=not_image).status_code == 400
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + bytes(400 * 1024))
    too_big = _predict(url, path=big)
    assert too_big.status_code == 413 and "limit" in too_big.json()["error"]
    assert httpx.get(f"{url}/api/v1/predictions", params={"since": "soon"}, auth=AUTH).json() == {
        "error": "Bad since date 'soon': use YYYY-MM-DD."
    }
    bad_id = httpx.get(f"{url}/api/v1/predictions/abc", auth=AUTH)
    assert bad_id.status_code == 422 and "prediction_id" in bad_id.json()["error"]
    huge = httpx.get(f"{url}/api/v1/predictions/{'9' * 30}", auth=AUTH)
    assert huge.status_code == 422 and "\n" not in huge.json()["error"]
    missing = httpx.post(f"{url}/api/v1/predict", auth=AUTH, data={"age": "3"})
    assert missing.status_code == 422 and "image" in missing.json()["error"]
    # a misspelt filter or field is refused, never silently ignored (?dx= listed every row)
    for path in ("predictions", "predictions.csv"):
        typo = httpx.get(f"{url}/api/v1/{path}", params={"dx": "mel"}, auth=AUTH)
        assert typo.status_code == 422 and "Unknown query parameter 'dx'" in typo.json()["error"]
    extra = _predict(url, sexe="male")
    assert extra.status_code == 422 and "Unknown form field 'sexe'" in extra.json()["error"]
    assert server.service.count() == before  # nothing half-stored


@pytest.mark.slow
def test_rest_and_ui_need_the_login(served):
    url, _, _ = served
    for method, path in [
        ("GET", "/api/v1/predictions"),
        ("GET", "/api/v1/predictions/1"),
        ("DELETE", "/api/v1/predictions/1"),
        ("GET", "/api/v1/predictions.csv"),
    ]:
        r = httpx.request(method, f"{url}{path}")
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
    assert _predict(url, auth=None).status_code == 401
    assert httpx.get(f"{url}/gradio_api/info").status_code == 401  # the UI's API too
    # the OpenAPI schema and /healthz are public (no patient data)
    schema = httpx.get(f"{url}/api/v1/openapi.json").json()
    assert {"/predict", "/predictions", "/predictions/{prediction_id}"} <= set(schema["paths"])
    assert schema["info"]["version"] == __version__

    # a browser session from the login form works for the REST API too
    login = httpx.post(f"{url}/login", data={"username": AUTH[0], "password": AUTH[1]})
    assert login.status_code == 200
    assert httpx.get(f"{url}/api/v1/predictions", cookies=login.cookies).status_code == 200


@pytest.mark.slow
def test_about_tab_reports_the_version(served):
    url, _, _ = served
    login = httpx.post(f"{url}/login", data={"username": AUTH[0], "password": AUTH[1]})
    config = httpx.get(f"{url}/config", cookies=login.cookies).text
    assert f"DermFusion {__version__}" in config


@pytest.mark.slow
def test_failed_logins_slow_the_client_down(served):
    url, server, _ = served
    throttle = server.throttle
    throttle.success("127.0.0.1")
    wrong = {"username": AUTH[0], "password": "guess"}
    assert httpx.post(f"{url}/login", data=wrong).status_code == 400
    assert throttle.delay("127.0.0.1") == pytest.approx(0.3)
    t0 = time.monotonic()
    assert httpx.post(f"{url}/login", data=wrong).status_code == 400
    assert time.monotonic() - t0 >= 0.3  # waited out the delay (a lower bound, not a speed)
    assert throttle.delay("127.0.0.1") == pytest.approx(0.6)
    bad_basic = httpx.get(f"{url}/api/v1/predictions", auth=(AUTH[0], "guess"))
    assert bad_basic.status_code == 401 and throttle.delay("127.0.0.1") == pytest.approx(1.2)
    ok = httpx.post(f"{url}/login", data={"username": AUTH[0], "password": AUTH[1]}, timeout=30)
    assert ok.status_code == 200 and throttle.delay("127.0.0.1") == 0


@pytest.mark.slow
def test_healthz_reports_liveness_and_database_reachability(served):
    url, _, db_dir = served
    r = httpx.get(f"{url}/healthz")  # no login needed
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["version"] == __version__
    assert body["database"] == {"configured": True, "backend": "sqlite", "reachable": True}
    assert "h.db" not in r.text  # the database's location is not shown

    # the database becomes unreachable: 503, and back
    moved = db_dir.with_name("db-away")
    db_dir.rename(moved)
    db_dir.write_text("not a folder")
    try:
        down = httpx.get(f"{url}/healthz")
        assert down.status_code == 503
        assert down.json()["status"] == "unavailable"
        assert down.json()["database"]["reachable"] is False
    finally:
        db_dir.unlink()
        moved.rename(db_dir)
    assert httpx.get(f"{url}/healthz").status_code == 200


@pytest.mark.slow
def test_rest_refuses_when_busy(tiny_checkpoint, tmp_path):
    """concurrency 1, max_queue 1: a third simultaneous prediction is refused at once."""
    service = PredictionService.create(tiny_checkpoint, db_url=f"sqlite:///{tmp_path / 'b.db'}")
    release, started = threading.Event(), threading.Semaphore(0)
    real = service.predict_and_store

    def gated(request, **kw):
        started.release()
        release.wait(60)
        return real(request, **kw)

    service.predict_and_store = gated  # type: ignore[method-assign]
    server = AppServer(
        service, settings(["--port", str(free_port()), "--concurrency", "1", "--max-queue", "1"])
    )
    url = server.launch(quiet=True).local_url.rstrip("/")
    try:
        results: list[httpx.Response] = []
        threads = [threading.Thread(target=lambda: results.append(_predict(url, auth=None)))]
        threads[0].start()
        assert started.acquire(timeout=60)  # the first runs (held)
        threads.append(threading.Thread(target=lambda: results.append(_predict(url, auth=None))))
        threads[1].start()
        deadline = time.monotonic() + 30
        while server.rest._waiting < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        busy = _predict(url, auth=None)
        assert busy.status_code == 503 and busy.json()["error"] == BUSY_MESSAGE
        release.set()
        for t in threads:
            t.join(60)
        assert sorted(r.status_code for r in results) == [200, 200]
        assert service.count() == 2
    finally:
        release.set()
        server.close()


# --- lifecycle: SIGTERM on a real process --------------------------------------------------------


def _exports_of(pid: int) -> list[Path]:
    return list(Path(tempfile.gettempdir()).glob(f"{EXPORT_PREFIX}{pid}-*"))


@pytest.mark.slow
def test_sigterm_finishes_requests_in_flight_and_exits_cleanly(tiny_checkpoint, tmp_path):
    app = AppProcess(
        ["--checkpoint", str(tiny_checkpoint), "--concurrency", "1"],
        tmp_path,
        env={"DERMFUSION_AUTH": "", "DERMFUSION_AUTH_FILE": ""},
    )
    pid = app.proc.pid
    try:
        assert _exports_of(pid), "the app should have made its export folder"
        results: list[int] = []
        first_done = threading.Event()

        def one(i: int) -> None:
            r = _predict(app.url, auth=None, path=EXAMPLES[i % len(EXAMPLES)])
            results.append(r.status_code)
            first_done.set()

        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        assert first_done.wait(120)
        code = app.stop(timeout=120)  # SIGTERM while the others are queued or running
        for t in threads:
            t.join(60)
    finally:
        if app.proc.poll() is None:
            app.proc.kill()
    assert code == 0, "\n".join(app.lines[-20:])
    assert results == [200] * 4
    assert app.rows() == 4
    assert any("SIGTERM: finishing" in line for line in app.lines)
    assert not _exports_of(pid), "the export folder was left behind"
    assert not any("Traceback" in line for line in app.lines), "\n".join(app.lines[-30:])


def test_sigterm_handler_is_restored_after_serving(monkeypatch, tiny_checkpoint, tmp_path):
    """In-process (as the other app tests run it): serving installs its SIGTERM handler only
    while it serves."""
    before = signal.getsignal(signal.SIGTERM)
    service = PredictionService.create(tiny_checkpoint, db_url=f"sqlite:///{tmp_path / 'x.db'}")
    server = AppServer(service, settings(["--port", str(free_port())]))
    seen = {}
    monkeypatch.setattr(
        server.demo,
        "block_thread",
        lambda: seen.setdefault("handler", signal.getsignal(signal.SIGTERM)),
    )
    server.launch(quiet=True)
    server.serve_until_stopped()
    assert seen["handler"] not in (before, signal.SIG_DFL)
    assert signal.getsignal(signal.SIGTERM) == before


@pytest.mark.slow
def test_rest_load_benchmark_stores_every_request_once(tiny_checkpoint):
    """The load benchmark's REST path (not a timing test): 8 requests from 4 users, each
    answered and stored exactly once, with the server's CPU and memory reported."""
    from scripts.load_benchmark import load_benchmark

    result = load_benchmark(4, 8, ["--checkpoint", str(tiny_checkpoint)], path="rest")
    assert (result["ok"], result["failed"], result["rows_stored"]) == (8, 0, 8)
    assert result["server_cpu_ms_per_request"] > 0 and result["rss_mb"] > 0
    assert isinstance(result["torch_loaded"], bool)


@pytest.mark.postgres
def test_healthz_and_rest_on_postgresql(tiny_checkpoint, postgres_url):
    """The same server on a PostgreSQL history: /healthz probes it, REST stores into it."""
    service = PredictionService.create(tiny_checkpoint, db_url=postgres_url)
    server = AppServer(service, settings(["--port", str(free_port())]))
    url = server.launch(quiet=True).local_url.rstrip("/")
    try:
        health = httpx.get(f"{url}/healthz").json()
        assert health["database"] == {
            "configured": True,
            "backend": "postgresql",
            "reachable": True,
        }
        r = _predict(url, auth=None)
        assert r.status_code == 200 and r.json()["stored"] is True
        assert service.count() == 1
    finally:
        server.close()


def test_healthz_names_no_host_and_says_draining(capsys):
    from types import SimpleNamespace

    from app.health import DatabaseProbe, health

    service = SimpleNamespace(predictor=SimpleNamespace(version="m@1", runtime="onnx"))
    probe = DatabaseProbe("postgresql+psycopg://app@127.0.0.1:1/dermfusion")  # nothing listens
    try:
        status, body = health(service, probe)  # type: ignore[arg-type]
        assert status == 503 and body["database"]["reachable"] is False
        shown = json.dumps(body)
        assert "127.0.0.1" not in shown and ":1" not in shown and "port" not in shown
        assert "127.0.0.1" in capsys.readouterr().err  # the operator's log has the reason
        health(service, probe)  # type: ignore[arg-type]
        assert capsys.readouterr().err == ""  # logged once, not at every check
    finally:
        probe.dispose()
    status, body = health(service, None, draining=True)  # type: ignore[arg-type]
    assert status == 503 and body["status"] == "draining"


def test_start_up_line_shows_small_upload_limits():
    from app.__main__ import _size

    assert [_size(n) for n in (20 * 1024**2, 512_000, 900)] == ["20 MB", "500 kB", "900 bytes"]
