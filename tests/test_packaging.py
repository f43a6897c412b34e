"""The built wheel ships every module: an editable install would hide a subpackage missing
from pyproject's package list, a normal install (the Docker image's) would not."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
LAYOUT = {"statehost": "statehost", "client": "statehost/client", "server": "statehost/server"}


def test_the_wheel_contains_every_module_of_the_three_packages(tmp_path):
    # Build from a copy: setuptools reuses a stale build/ folder in the tree, which would
    # ship modules the package list no longer names.
    source = tmp_path / "src"
    source.mkdir()
    for name in ["pyproject.toml", "README.md", *LAYOUT]:
        copy = shutil.copytree if (REPO_ROOT / name).is_dir() else shutil.copy
        copy(REPO_ROOT / name, source / name)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"),
         str(source)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "dist").glob("statehost-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"{target}/{path.relative_to(REPO_ROOT / folder).as_posix()}"
        for folder, target in LAYOUT.items()
        for path in (REPO_ROOT / folder).rglob("*.py")
    }
    assert expected - shipped == set(), "add the missing subpackages to pyproject.toml"
    pages = {f"statehost/server/dashboard_static/{path.name}"
             for path in (REPO_ROOT / "server" / "dashboard_static").iterdir()}
    assert pages - shipped == set(), "the dashboard's files: see package-data in pyproject"
    metadata = next(n for n in shipped if n.endswith(".dist-info/entry_points.txt"))
    assert "statehost = statehost._cli:main" in zipfile.ZipFile(wheel).read(
        metadata).decode()
