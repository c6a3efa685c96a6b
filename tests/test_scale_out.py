"""Several app servers, one PostgreSQL history: two real ``python -m app`` processes on two ports,
25 concurrent predictions sent to each through ``gradio_client``, every row stored exactly once
and visible from both servers' History endpoint."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from gradio_client import Client, handle_file

from app.frontend import EXAMPLES_DIR
from db.queries import count_predictions, query_predictions
from db.session import DB_URL_ENV, Database
from tests.conftest import REPO
from tests.pg import free_port

EXAMPLE = EXAMPLES_DIR / "ISIC_0029281.jpg"
PER_SERVER = 25


def start_app(port: int, db_url: str, checkpoint: Path, log: Path) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop(DB_URL_ENV, None)
    env.update({"OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"})
    cmd = [sys.executable, "-m", "app", "--port", str(port), "--db", db_url]
    cmd += ["--checkpoint", str(checkpoint)]
    with log.open("w") as fh:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)


def wait_until_serving(proc: subprocess.Popen, url: str, log: Path) -> None:
    """Poll until the app answers (a safety limit against a hung start, not a speed check)."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"app exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    pytest.fail(f"app at {url} did not start:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
@pytest.mark.postgres
def test_two_app_servers_share_one_postgres_history(postgres_url, tiny_checkpoint, tmp_path):
    ports = [free_port(), free_port()]
    urls = [f"http://127.0.0.1:{p}/" for p in ports]
    logs = [tmp_path / f"app{i}.log" for i in range(2)]
    # Both start on the same empty database at once: one migrates it, the other waits.
    procs = [
        start_app(p, postgres_url, tiny_checkpoint, log) for p, log in zip(ports, logs, strict=True)
    ]
    try:
        for proc, url, log in zip(procs, urls, logs, strict=True):
            wait_until_serving(proc, url, log)
        clients = [Client(url, verbose=False) for url in urls]
        # one client per worker thread and server, as ten users would have: a Client shared by
        # threads multiplexes their events over one SSE stream, and once (CI, 2 loaded cores)
        # the stream was closed as idle just as another thread's event joined it
        # (gradio_client raised CancelledError)
        users = threading.local()

        def predict(i: int) -> dict:
            mine = getattr(users, "clients", None)
            if mine is None:
                mine = users.clients = [Client(url, verbose=False) for url in urls]
            client = mine[i % 2]
            *_, result = client.predict(
                handle_file(str(EXAMPLE)), str(20 + i), "female", "back", api_name="/predict"
            )
            return result

        with ThreadPoolExecutor(max_workers=10) as pool:
            results = list(pool.map(predict, range(2 * PER_SERVER)))

        assert all(r["stored"] is True for r in results), [r for r in results if not r["stored"]]
        ids = {r["prediction_id"] for r in results}
        assert len(ids) == 2 * PER_SERVER

        db = Database(postgres_url)
        try:
            with db.session() as s:
                assert count_predictions(s) == 2 * PER_SERVER
                rows = query_predictions(s, limit=1000, images=False)
                assert {r.id for r in rows} == ids
                assert sorted(r.age for r in rows) == [float(20 + i) for i in range(50)]
        finally:
            db.dispose()

        # Each server's History endpoint sees every row, whichever server stored it.
        for client in clients:
            _, summary, csv_path = client.predict("", "", [], 0, "any", "any", api_name="/history")
            assert f"**{2 * PER_SERVER} matching predictions**" in summary
            with open(csv_path, newline="") as fh:
                assert {int(r["id"]) for r in csv.DictReader(fh)} == ids
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
