"""The container's install steps, tested without building an image (no Docker on CI machines).

What is tested: the Dockerfile and compose.yaml say what the docs promise (uid 1000, port 7860,
``docker/install.sh``, a /healthz healthcheck, PostgreSQL with a volume and a healthcheck), and
``docker/install.sh`` itself runs for real into a temporary virtual environment: the project is
built and installed *not editable* (so the shipped model and the app's examples must come with
the package), the data folder is made, and the installed copy starts (``--version``, the shipped
model and its ONNX export found inside the installed package). What is not tested here: the
base image, the dependency download (the test's venv borrows this environment's packages, the
script runs with ``--no-deps``) and ``useradd`` (the test names the current user)."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from common.version import __version__

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "docker" / "install.sh"


def test_dockerfile_runs_the_install_script_as_uid_1000():
    text = (REPO / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines()]
    assert any(line.startswith("RUN bash docker/install.sh") for line in lines)
    assert "USER 1000" in lines
    assert "EXPOSE 7860" in lines
    assert 'CMD ["python", "-m", "app"]' in lines
    healthcheck = next(line for line in lines if line.startswith('CMD ["python", "-c"'))
    assert "/healthz" in healthcheck
    assert "DERMFUSION_HOST=0.0.0.0" in text and "DERMFUSION_DB_URL=" in text
    # every folder the package needs is copied into the build
    for package in ("common", "data_pipeline", "db", "model", "service", "app", "scripts"):
        assert f"COPY {package} ./{package}" in text


def test_compose_runs_the_app_with_postgresql():
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    db, app = compose["services"]["db"], compose["services"]["app"]
    assert db["image"].startswith("postgres:")
    assert any(v.endswith(":/var/lib/postgresql/data") for v in db["volumes"])
    assert "pg_isready" in " ".join(db["healthcheck"]["test"])
    assert app["depends_on"]["db"]["condition"] == "service_healthy"
    assert "/healthz" in " ".join(app["healthcheck"]["test"])
    env = app["environment"]
    assert env["DERMFUSION_DB_URL"].startswith("postgresql+psycopg://")
    assert (
        "@db:" in env["DERMFUSION_DB_URL"]
        and ":" not in env["DERMFUSION_DB_URL"].split("//", 1)[1].split("@")[0]
    )  # no password in the URL: it comes from the secret file
    assert env["DERMFUSION_DB_PASSWORD_FILE"].startswith("/run/secrets/")
    assert env["DERMFUSION_AUTH_FILE"].startswith("/run/secrets/")
    assert app["image"].endswith(__version__)
    from app.config import ENV

    assert set(env) <= set(ENV.values()), "compose.yaml sets a variable the app does not read"


def test_install_script_dry_run_lists_its_steps(tmp_path):
    out = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--venv", str(tmp_path / "v"), "--data", "/data"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"{tmp_path / 'v'}" in out and "-m venv" in out
    assert "pip install" in out and f"{REPO}\\[postgres\\]" in out and " -e " not in out
    assert "step 4: check the installed copy" in out
    bad = subprocess.run(["bash", str(SCRIPT), "--frobnicate"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown option --frobnicate" in bad.stderr


@pytest.mark.slow
def test_install_script_installs_a_working_copy(tmp_path):
    venv = tmp_path / "venv"
    # without its own pip / setuptools: those, like every dependency, come from this
    # environment's site-packages (a .pth line adds the folder only, so this checkout's editable
    # install is not seen: the copy under test is the one installed)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(
        subprocess.run(
            [
                str(venv / "bin" / "python"),
                "-c",
                "import sysconfig; print(sysconfig.get_paths()['purelib'])",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    (site / "borrowed-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    me = pwd.getpwuid(os.getuid()).pw_name
    # a copy of the sources, as the Dockerfile's COPY lines make (pip builds in the source tree)
    src = tmp_path / "src"
    shutil.copytree(
        REPO,
        src,
        ignore=shutil.ignore_patterns(
            ".*", "runs", "outputs", "splits", "docs", "tests", "build", "*.egg-info", "__pycache__"
        ),
    )
    result = subprocess.run(
        [
            "bash",
            str(SCRIPT),
            "--src",
            str(src),
            "--venv",
            str(venv),
            "--no-deps",
            "--data",
            str(tmp_path / "data"),
            "--user",
            f"{me}:{os.getuid()}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"DermFusion {__version__}" in result.stdout
    assert f"installed at {site}" in result.stdout  # not this checkout
    assert (tmp_path / "data").is_dir()
    installed = site / "model" / "shipped"
    assert (installed / "model.onnx").is_file() and (installed / "config.json").is_file()
    assert (site / "app" / "examples" / "examples.csv").is_file()
