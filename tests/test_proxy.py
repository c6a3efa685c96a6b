"""Behind a real nginx at a sub-path: ``deploy/nginx.conf`` as shipped (only its ports changed) in
front of ``python -m app --root-path /dermfusion`` with a login. Through the proxy: the page, the
login, the Gradio API (a prediction with its heatmap, the History CSV, a case-report PDF), the
REST API (predict → list → item → heatmap / CSV / PDF → delete, Basic and session-cookie auth)
and ``/healthz``.

Needs Debian's nginx (``./setup.sh --dev`` installs it as root); skipped with the reason where it
is missing, failed instead when ``DERMFUSION_REQUIRE_NGINX=1`` (CI)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from scripts.load_benchmark import AppProcess, free_port

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "app" / "examples").glob("*.jpg"))
PREFIX = "/dermfusion"
LOGIN = ("alice", "pa:ss:word")
REQUIRE_ENV = "DERMFUSION_REQUIRE_NGINX"

pytestmark = pytest.mark.slow


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).is_file()), None
    )


def proxy_config(folder: Path, listen: int, upstream: int) -> Path:
    """The shipped example, ports changed, inside a minimal main config writing only to
    ``folder`` (pid, logs, temp files)."""
    server = (REPO / "deploy" / "nginx.conf").read_text()
    assert "listen 80;" in server and "127.0.0.1:7860" in server
    server = server.replace("listen 80;", f"listen 127.0.0.1:{listen};")
    server = server.replace("127.0.0.1:7860", f"127.0.0.1:{upstream}")
    temp = "\n".join(
        f"    {kind}_temp_path {folder / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    # as root the workers would drop to "nobody", who cannot write the test's temp folders
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf = folder / "nginx.conf"
    conf.write_text(
        f"{user}worker_processes 1;\ndaemon off;\npid {folder / 'nginx.pid'};\n"
        f"error_log {folder / 'error.log'} warn;\n"
        "events { worker_connections 256; }\n"
        f"http {{\n    access_log {folder / 'access.log'};\n{temp}\n{server}\n}}\n"
    )
    return conf


def _wait_port(port: int, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"nginx exited: {log.read_text() if log.exists() else ''}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    pytest.fail("nginx did not start listening")


@pytest.fixture(scope="module")
def proxied(tiny_checkpoint, tmp_path_factory) -> Iterator[str]:
    """The public base URL (``http://127.0.0.1:PORT/dermfusion``) of app + nginx."""
    nginx = nginx_binary()
    if nginx is None:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"nginx tests required ({REQUIRE_ENV}=1) but nginx is not installed")
        pytest.skip("nginx not installed (apt-get install nginx, or ./setup.sh --dev as root)")
    folder = tmp_path_factory.mktemp("proxy")
    app = AppProcess(
        ["--checkpoint", str(tiny_checkpoint), "--root-path", PREFIX],
        folder,
        env={"DERMFUSION_AUTH": ":".join(LOGIN), "DERMFUSION_LOGIN_DELAY": "0"},
    )
    listen = free_port()
    conf = proxy_config(folder, listen, app.port)
    proc = subprocess.Popen(
        [nginx, "-p", str(folder), "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_port(listen, proc, folder / "error.log")
        yield f"http://127.0.0.1:{listen}{PREFIX}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        app.stop()


def _files(value: Any, suffix: str) -> list[Path]:
    """Existing files with ``suffix`` anywhere in a gradio_client result."""
    found: list[Path] = []
    if isinstance(value, (list, tuple)):
        for v in value:
            found += _files(v, suffix)
    elif isinstance(value, dict):
        for v in value.values():
            found += _files(v, suffix)
    elif isinstance(value, str) and value.lower().endswith(suffix) and Path(value).is_file():
        found.append(Path(value))
    return found


def _ids(value: Any) -> list[int]:
    if isinstance(value, (list, tuple)):
        return [i for v in value for i in _ids(v)]
    if isinstance(value, dict):
        own = [v for k, v in value.items() if k in ("id", "prediction_id") and isinstance(v, int)]
        return own + [i for v in value.values() for i in _ids(v)]
    return []


def test_page_and_login_through_the_proxy(proxied):
    origin = proxied.removesuffix(PREFIX)
    bare = httpx.get(proxied)  # without the trailing slash: redirected
    assert bare.status_code == 301 and bare.headers["location"].endswith(f"{PREFIX}/")
    page = httpx.get(f"{proxied}/")
    assert page.status_code == 200 and "<html" in page.text.lower()
    assert httpx.get(f"{proxied}/config").status_code == 401  # the UI needs the login
    wrong = httpx.post(f"{proxied}/login", data={"username": LOGIN[0], "password": "guess"})
    assert wrong.status_code == 400
    ok = httpx.post(f"{proxied}/login", data={"username": LOGIN[0], "password": LOGIN[1]})
    assert ok.status_code == 200
    config = httpx.get(f"{proxied}/config", cookies=ok.cookies).json()
    # the app builds its URLs (files, API) under the public sub-path
    assert config["root"] == f"{origin}{PREFIX}"
    health = httpx.get(f"{proxied}/healthz")
    assert health.status_code == 200 and health.json()["database"]["reachable"] is True


def test_gradio_api_and_its_downloads_through_the_proxy(proxied):
    from gradio_client import Client, handle_file
    from PIL import Image

    client = Client(f"{proxied}/", auth=LOGIN, verbose=False, ssl_verify=False)
    result = client.predict(
        handle_file(str(EXAMPLES[0])), "40", "male", "back", api_name="/predict"
    )
    images = _files(result, ".png") + _files(result, ".jpg") + _files(result, ".webp")
    assert images, f"no image file in {result!r}"
    with Image.open(images[0]) as im:  # the heatmap panel, downloaded through nginx
        assert im.width > 0
    (row_id, *_) = _ids(result)

    history = client.predict(api_name="/history")
    (csv,) = _files(history, ".csv")
    assert csv.read_text().splitlines()[0].startswith("id,created_at")
    report = client.predict(row_id, api_name="/report")
    (pdf,) = _files(report, ".pdf")
    assert pdf.read_bytes()[:5] == b"%PDF-"


def test_rest_api_through_the_proxy(proxied):
    origin = proxied.removesuffix(PREFIX)
    api = f"{proxied}/api/v1"
    with EXAMPLES[1].open("rb") as fh:
        unauthorised = httpx.post(f"{api}/predict", files={"image": fh})
    assert unauthorised.status_code == 401
    with EXAMPLES[1].open("rb") as fh:
        r = httpx.post(
            f"{api}/predict",
            files={"image": (EXAMPLES[1].name, fh, "image/jpeg")},
            data={"age": "61", "sex": "female", "site": "face"},
            auth=LOGIN,
            timeout=60,
        )
    assert r.status_code == 200, r.text
    body = r.json()
    row_id, links = body["id"], body["links"]
    assert links["heatmap"] == f"{PREFIX}/api/v1/predictions/{row_id}/heatmap.png"

    listing = httpx.get(f"{api}/predictions", params={"site": "face"}, auth=LOGIN).json()
    assert row_id in [item["id"] for item in listing["items"]]
    assert httpx.get(f"{origin}{links['self']}", auth=LOGIN).json()["site"] == "face"
    png = httpx.get(f"{origin}{links['heatmap']}", auth=LOGIN)
    assert png.content[:4] == b"\x89PNG"
    pdf = httpx.get(f"{origin}{links['report']}", auth=LOGIN, timeout=60)
    assert pdf.content[:5] == b"%PDF-"
    csv = httpx.get(f"{api}/predictions.csv", auth=LOGIN)
    assert f"\n{row_id}," in csv.text

    # the browser session of the login page works for the REST API too
    login = httpx.post(f"{proxied}/login", data={"username": LOGIN[0], "password": LOGIN[1]})
    assert httpx.get(f"{api}/predictions/{row_id}", cookies=login.cookies).status_code == 200

    schema = httpx.get(f"{api}/openapi.json")
    assert schema.status_code == 200 and "/predict" in schema.json()["paths"]
    # the interactive page finds its schema at the public URL
    assert f"{PREFIX}/api/v1/openapi.json" in httpx.get(f"{api}/docs").text
    assert httpx.delete(f"{api}/predictions/{row_id}", auth=LOGIN).status_code == 204
    assert httpx.get(f"{api}/predictions/{row_id}", auth=LOGIN).status_code == 404
