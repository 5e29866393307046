"""The repository layout: platform/ imports as hydraserve without shadowing the standard
library's platform module, and the wheel holds every package."""

from __future__ import annotations

import subprocess
import sys
import zipfile

from tests.conftest import REPO_ROOT


def test_platform_folder_is_not_a_package():
    # A platform/__init__.py would shadow the standard library module SQLAlchemy, Celery and
    # gunicorn import.
    assert not (REPO_ROOT / "platform" / "__init__.py").exists()


def test_stdlib_platform_still_works_from_repo_root():
    out = subprocess.run(
        [sys.executable, "-c", "import platform, hydraserve.api.app; print(platform.system())"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "Linux"


def test_wheel_contains_every_subpackage(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(REPO_ROOT)], check=True, timeout=300)
    (wheel,) = tmp_path.glob("hydraserve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = set()
    for init in (REPO_ROOT / "platform").rglob("__init__.py"):
        rel = init.relative_to(REPO_ROOT / "platform").as_posix()
        expected.add(f"hydraserve/{rel}")
    for init in (REPO_ROOT / "gpu_runtime").rglob("__init__.py"):
        expected.add(init.relative_to(REPO_ROOT).as_posix())
    assert expected, "found no packages to check"
    missing = sorted(expected - names)
    assert not missing, f"wheel lacks {missing}"
    assert "hydraserve/api/wsgi.py" in names
    console = REPO_ROOT / "platform" / "api" / "console"
    assets = {f"hydraserve/api/console/{p.relative_to(console).as_posix()}"
              for folder in ("templates", "static") for p in (console / folder).rglob("*")
              if p.is_file()}
    assert "hydraserve/api/console/templates/base.html" in assets
    assert sorted(assets - names) == [], "the wheel lacks console templates or static files"
