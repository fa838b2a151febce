"""YinDian installs as a package: a wheel built from the tracked files alone (a
clean clone: no generated yindian/v1 in it) carries the protobuf code and the
three console scripts, and each answers --help from a fresh venv outside the
checkout. The package's pins are requirements.txt's, no more and no fewer."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {"yindian-mis-adapter": "mis_adapter", "yindian-bridge": "bridge", "yindian-bank-sim": "bank_sim",
           "yindian-ivr": "ivr"}
BUILD_TIMEOUT_S = 120


def _requirements() -> set[str]:
    lines = (REPO / "requirements.txt").read_text().splitlines()
    return {line.strip() for line in lines if line.strip() and not line.startswith("#")}


def test_package_pins_are_exactly_requirements_txt() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime, dev = project["dependencies"], project["optional-dependencies"]["dev"]
    assert len(runtime) + len(dev) == len(set(runtime) | set(dev)), "a pin is listed twice"
    assert set(runtime) | set(dev) == _requirements()
    assert "grpcio-tools==1.85.1" in tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
    assert "grpcio-tools==1.85.1" in _requirements()


def _clean_clone(dest: Path) -> Path:
    """The tracked files (as they are in the work tree) without anything generated or ignored."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True).stdout
    for name in filter(None, files.decode().split("\0")):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    assert not (dest / "yindian").exists()
    return dest


@pytest.mark.slow
@pytest.mark.e2e
def test_wheel_from_clean_clone_installs_three_console_scripts(tmp_path: Path) -> None:
    src = _clean_clone(tmp_path / "clone")
    wheels = tmp_path / "wheels"
    # The build needs setuptools and grpc_tools, both in this interpreter's environment.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(wheels), str(src)], check=True, timeout=BUILD_TIMEOUT_S, cwd=tmp_path)
    (wheel,) = wheels.glob("yindian-*.whl")

    fresh = tmp_path / "venv"
    venv.create(fresh, with_pip=False)
    fresh_py = fresh / "bin" / "python"
    purelib = subprocess.run([str(fresh_py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # The pinned dependencies come from this environment's site-packages as a plain path (its .pth
    # files, such as the editable install of the checkout, are not processed); YinDian from the wheel.
    Path(purelib, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(fresh_py), "install", "--quiet", "--no-deps",
                    str(wheel)], check=True, timeout=BUILD_TIMEOUT_S, cwd=tmp_path)

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    where = subprocess.run([str(fresh_py), "-c", "import yindian.v1.billing_pb2_grpc as g, mis_adapter as m; "
                            "print(g.__file__); print(m.__file__)"],
                           check=True, capture_output=True, text=True, cwd=tmp_path, env=env).stdout.split()
    assert all(p.startswith(purelib) for p in where), where  # generated code and our code from the wheel
    migrations = Path(purelib, "mis_adapter", "migrations")
    assert (migrations / "env.py").is_file() and list((migrations / "versions").glob("0001*.py"))
    assert (Path(purelib, "bridge", "migrations", "env.py")).is_file()

    for script, package in SCRIPTS.items():
        out = subprocess.run([str(fresh / "bin" / script), "--help"], capture_output=True, text=True,
                             cwd=tmp_path, env=env, timeout=60)
        assert out.returncode == 0, out.stderr
        assert f"usage: python -m {package} <command>" in out.stdout
        assert "serve" in out.stdout or "demo-day" in out.stdout
    serve = subprocess.run([str(fresh / "bin" / "yindian-mis-adapter"), "serve", "--help"], capture_output=True,
                           text=True, cwd=tmp_path, env=env, timeout=60)
    assert serve.returncode == 0 and "--listen" in serve.stdout, serve.stderr
