"""What ``pip wheel .`` builds: the package and its type marker, one version, no developer tools."""

from __future__ import annotations

import email.parser
import os
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

import swr_cache

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of this checkout, built by pip with the installed hatchling (no download)."""
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [
            sys.executable, "-m", "pip", "wheel", str(ROOT),
            "--no-deps", "--no-build-isolation", "--no-index", "--quiet", "-w", str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (built,) = out.glob("swr_cache-*.whl")
    return built


def _names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


def test_wheel_ships_only_the_package(wheel: Path) -> None:
    """Only ``swr_cache/`` and its metadata: no devtools, devservers, demo, tests or examples."""
    names = _names(wheel)
    top = {name.split("/", 1)[0] for name in names}
    assert top == {"swr_cache", f"swr_cache-{swr_cache.__version__}.dist-info"}, sorted(top)
    for name in names:
        assert "devtools" not in name and "devservers" not in name and "demo" not in name, name
    assert "swr_cache/py.typed" in names
    assert "swr_cache/__init__.py" in names and "swr_cache/_engine.py" in names


def test_wheel_metadata_has_the_package_version(wheel: Path) -> None:
    """The wheel's ``Version`` is ``swr_cache.__version__`` (one source: ``swr_cache/__about__.py``)."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read(f"swr_cache-{swr_cache.__version__}.dist-info/METADATA")
    message = email.parser.BytesParser().parsebytes(metadata)
    assert message["Name"] == "swr-cache"
    assert message["Version"] == swr_cache.__version__


def test_installed_version_is_the_package_version() -> None:
    """The installed distribution and ``swr_cache.__version__`` agree (a stale venv: ``make venv``)."""
    assert version("swr-cache") == swr_cache.__version__


def test_cli_from_the_wheel_says_where_the_demo_is(wheel: Path, tmp_path: Path) -> None:
    """``swr-cache demo`` from an installed wheel (no devtools beside it) points at ``make demo``."""
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path / "site")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "swr_cache", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    where = run("--version")
    assert where.returncode == 0, where.stderr
    assert where.stdout.split() == ["swr-cache", swr_cache.__version__]
    demo = run("demo", "--help")
    assert demo.returncode == 1, demo.stdout + demo.stderr
    assert "make demo" in demo.stderr and "clone" in demo.stderr
    assert "Traceback" not in demo.stderr and demo.stdout == ""
