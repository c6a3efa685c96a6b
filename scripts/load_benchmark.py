"""Load benchmark: the real app in a subprocess, N concurrent users of the web app or the REST API.

    python -m scripts.benchmark --clients 50                 # 50 users, one request each
    python -m scripts.benchmark --clients 8 --requests 200   # 200 requests, 8 at a time
    python -m scripts.load_benchmark --clients 50 --path rest            # POST /api/v1/predict
    python -m scripts.load_benchmark --clients 10 --requests 100 --path rest   # memory after 100
    python -m scripts.load_benchmark --clients 50 --upload-mb 300

Starts ``python -m app`` on a free localhost port with a temporary SQLite history (the serving
flags are passed through), waits for it, then sends ``--requests`` predictions (default: one per
client) from ``--clients`` threads: ``--path ui`` (default) each with its own
``gradio_client.Client`` through the web app's queue, ``--path rest`` each with its own HTTP
connection to ``POST /api/v1/predict``. Reports p50 / p95 / max latency as each user sees it
(upload + queue + prediction + download), throughput, requests refused as busy, rows stored in
the history, the server's CPU per request, its resident memory after the run (and peak), whether
PyTorch is loaded in it, and the machine's load average (the numbers depend on what else runs). With
``--upload-mb`` it also posts a file of that size to the upload route and reports how it was
refused (status, message, seconds, server memory). Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from common.cli import run_cli

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "app" / "examples").glob("*.jpg"))
READY_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_memory_mb(pid: int) -> dict[str, float]:
    """Current and peak resident memory of a process (Linux ``/proc``), in MB, and its private
    part (``private_mb``: pages no other process shares, e.g. not the libraries' code that a
    second replica on the same host maps too)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out["rss_mb" if key == "VmRSS" else "peak_rss_mb"] = int(value.split()[0]) / 1024
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    except OSError:
        return out
    private = [line.split()[1] for line in rollup if line.startswith("Private_")]
    if private:
        out["private_mb"] = sum(int(kb) for kb in private) / 1024
    return out


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds of this process (the client threads), user + system."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class AppProcess:
    """``python -m app`` on a free port with a temporary SQLite history, for the benchmark."""

    def __init__(
        self, extra_args: list[str], folder: Path, env: dict[str, str] | None = None
    ) -> None:
        self.port = free_port()
        self.db = folder / "load.db"
        cmd = [
            sys.executable,
            "-m",
            "app",
            "--port",
            str(self.port),
            "--db",
            f"sqlite:///{self.db}",
            *extra_args,
        ]
        env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        self.lines: list[str] = []
        self.url = self._wait_ready()
        threading.Thread(target=self._drain, daemon=True).start()

    def _wait_ready(self) -> str:
        deadline = time.monotonic() + READY_TIMEOUT_S
        assert self.proc.stdout is not None
        for line in self._lines():
            self.lines.append(line.rstrip())
            if "DermFusion app running at" in line:
                return f"http://127.0.0.1:{self.port}"
            if time.monotonic() > deadline:
                break
        self.stop()
        raise RuntimeError("the app did not start:\n" + "\n".join(self.lines[-20:]))

    def _lines(self) -> Iterator[str]:
        # readline, not ``yield from stdout``: abandoning that generator would close the pipe
        assert self.proc.stdout is not None
        while line := self.proc.stdout.readline():
            yield line

    def _drain(self) -> None:
        for line in self._lines():
            self.lines.append(line.rstrip())

    def memory(self) -> dict[str, float]:
        return proc_memory_mb(self.proc.pid)

    def rows(self) -> int:
        """Rows in the app's history database."""
        from db.queries import as_filter, count_predictions
        from db.session import Database

        db = Database(f"sqlite:///{self.db}")
        try:
            with db.session() as session:
                return count_predictions(session, as_filter(None))
        finally:
            db.dispose()

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (the app finishes what is in flight), then wait; the exit code."""
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def gradio_user(url: str) -> Any:
    """One web-app user: ``gradio_client`` through the queue, as a browser does (upload, join,
    stream the result, download the output files)."""
    from gradio_client import Client, handle_file

    # ssl_verify=False: the app is plain HTTP on localhost, so there is nothing to verify, and
    # gradio_client opens a new httpx client for every upload / call / download, each of which
    # would load the CA bundle (~175 ms of CPU per prediction, measured): with the load
    # generator on the same 2 cores as the app, that would measure the client, not the server.
    client = Client(url, verbose=False, ssl_verify=False)

    def predict(path: Path, age: str) -> None:
        client.predict(handle_file(str(path)), age, "female", "back", api_name="/predict")

    return predict


def rest_user(url: str) -> Any:
    """One pipeline user: ``POST /api/v1/predict`` (multipart), one kept-alive connection."""
    import httpx

    client = httpx.Client(base_url=url, timeout=300, verify=False)

    def predict(path: Path, age: str) -> None:
        with path.open("rb") as fh:
            r = client.post(
                "/api/v1/predict",
                files={"image": (path.name, fh, "image/jpeg")},
                data={"age": age, "sex": "female", "site": "back"},
            )
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")

    return predict


USERS = {"ui": gradio_user, "rest": rest_user}


def run_clients(url: str, clients: int, requests: int, path: str = "ui") -> dict[str, Any]:
    """``requests`` predictions from ``clients`` threads through the web app's queue
    (``path="ui"``) or the REST API (``"rest"``); latency as each user sees it."""
    pool = [USERS[path](url) for _ in range(clients)]
    lock = threading.Lock()
    counter = iter(range(requests))
    latencies: list[float] = []
    errors: list[str] = []
    start = threading.Barrier(clients)

    def user(predict: Any) -> None:
        start.wait()
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t0 = time.perf_counter()
            try:
                predict(EXAMPLES[i % len(EXAMPLES)], str(20 + i % 70))
            except Exception as exc:  # a refusal (busy) or an error: counted, not raised
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                continue
            with lock:
                latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as ex:
        list(ex.map(user, pool))
    wall = time.perf_counter() - t0
    a = np.asarray(latencies) if latencies else np.zeros(1)
    return {
        "path": path,
        "clients": clients,
        "requests": requests,
        "ok": len(latencies),
        "failed": len(errors),
        "busy_refusals": sum("queue is full" in e.lower() or "busy" in e.lower() for e in errors),
        "errors": sorted(set(errors))[:5],
        "p50_s": float(np.percentile(a, 50)),
        "p95_s": float(np.percentile(a, 95)),
        "max_s": float(a.max()),
        "wall_s": wall,
        "throughput_per_s": len(latencies) / wall,
    }


def upload_refusal(url: str, megabytes: int) -> dict[str, Any]:
    """Stream a ``megabytes`` MB file to the upload route; how it was answered."""
    import httpx

    chunk = b"\0" * (1 << 20)
    boundary = "dermfusionbenchmark"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def body() -> Iterator[bytes]:
        yield head
        for _ in range(megabytes):
            yield chunk
        yield tail

    t0 = time.perf_counter()
    try:
        r = httpx.post(
            f"{url}/gradio_api/upload",
            content=body(),
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
            timeout=120,
        )
        status, message = r.status_code, r.text.strip()[:200]
    except httpx.HTTPError as exc:  # the server may close the connection mid-upload
        status, message = 0, f"{type(exc).__name__}: {exc}"[:200]
    return {"mb": megabytes, "status": status, "message": message, "s": time.perf_counter() - t0}


def load_benchmark(
    clients: int,
    requests: int | None = None,
    app_args: list[str] | None = None,
    upload_mb: int = 0,
    path: str = "ui",
) -> dict[str, Any]:
    """Start the app, run the load through ``path`` (``ui`` / ``rest``), measure; the app is
    always stopped. Memory is the server's resident set after the run (and its peak)."""
    with tempfile.TemporaryDirectory(prefix="dermfusion-load-") as tmp:
        t0 = time.perf_counter()
        app = AppProcess(app_args or [], Path(tmp))
        started = time.perf_counter() - t0
        try:
            warm = run_clients(app.url, 1, 2, path)  # first requests pay one-off costs
            server0, client0 = proc_cpu_s(app.proc.pid), own_cpu_s()
            result = run_clients(app.url, clients, requests or clients, path)
            done = max(1, result["ok"])
            # where the 2 cores went: the app's CPU and the load generator's, per answered request
            result["server_cpu_ms_per_request"] = 1000 * (proc_cpu_s(app.proc.pid) - server0) / done
            result["client_cpu_ms_per_request"] = 1000 * (own_cpu_s() - client0) / done
            rows = app.rows() - warm["ok"]
            result.update({"rows_stored": rows, "app_start_s": started, **app.memory()})
            if upload_mb:
                result["upload"] = {**upload_refusal(app.url, upload_mb), **app.memory()}
            result["app_args"] = app_args or []
            result["app_log_tail"] = [line for line in app.lines if "model " in line][:2]
            result["torch_loaded"] = torch_loaded(app.proc.pid)
            result["load_average"] = os.getloadavg()
        finally:
            app.stop()
    return result


def torch_loaded(pid: int) -> bool:
    """Whether the server process has PyTorch's library mapped (Linux ``/proc``)."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def report(r: dict[str, Any]) -> None:
    print(
        f"[{r['path']}] {r['clients']} clients, {r['requests']} requests: {r['ok']} ok, "
        f"{r['failed']} failed "
        f"({r['busy_refusals']} busy), {r['rows_stored']} rows stored"
    )
    print(
        f"latency p50 {r['p50_s']:.2f} s  p95 {r['p95_s']:.2f} s  max {r['max_s']:.2f} s   "
        f"throughput {r['throughput_per_s']:.1f}/s   server RSS {r['rss_mb']:.0f} MB "
        f"(peak {r['peak_rss_mb']:.0f} MB, private {r.get('private_mb', float('nan')):.0f} MB; "
        f"PyTorch {'loaded' if r['torch_loaded'] else 'not loaded'})"
    )
    print(
        f"CPU per answered request: app {r['server_cpu_ms_per_request']:.0f} ms, "
        f"load generator {r['client_cpu_ms_per_request']:.0f} ms; load average "
        + " ".join(f"{x:.1f}" for x in r["load_average"])
    )
    for e in r["errors"]:
        print(f"  error: {e}")
    if "upload" in r:
        u = r["upload"]
        print(
            f"{u['mb']} MB upload: HTTP {u['status']} in {u['s']:.1f} s — {u['message']} "
            f"(server peak RSS {u['peak_rss_mb']:.0f} MB)"
        )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m scripts.load_benchmark",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    add_load_arguments(p)
    p.add_argument("--json", type=Path, default=None, help="write results here")
    return p


def add_load_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clients", type=int, default=None, help="concurrent gradio_client users")
    p.add_argument("--requests", type=int, default=None, help="total requests (default: clients)")
    p.add_argument(
        "--app-args",
        default="",
        help='flags for python -m app, e.g. "--concurrency 2 --max-queue 64"',
    )
    p.add_argument("--upload-mb", type=int, default=0, help="also try an upload this large")
    p.add_argument(
        "--path",
        choices=sorted(USERS),
        default="ui",
        help="ui: gradio_client through the web app's queue (default); rest: POST /api/v1/predict",
    )


def run_load(args: argparse.Namespace) -> dict[str, Any]:
    import shlex

    result = load_benchmark(
        args.clients, args.requests, shlex.split(args.app_args), args.upload_mb, args.path
    )
    report(result)
    if getattr(args, "json", None):
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.clients:
        args.clients = 8
    run_load(args)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
