"""The core must run without Ray: importing every eva_ray module must not import ray."""

import pkgutil
import subprocess
import sys
from pathlib import Path

import eva_ray

REPO = Path(__file__).resolve().parents[2]


def test_importing_the_whole_core_does_not_import_ray():
    modules = [m.name for m in pkgutil.walk_packages(eva_ray.__path__, prefix="eva_ray.")]
    assert "eva_ray.buffer" in modules and "eva_ray.losses" in modules
    code = ("import importlib, sys\n"
            f"for name in {modules!r}: importlib.import_module(name)\n"
            "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.') or m == 'litellm')\n"
            "print(','.join(bad))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
