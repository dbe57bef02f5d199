"""A real small filesystem for storage-fault tests: a tmpfs mounted under the test's folder, unmounted after.

Mounting needs root (CAP_SYS_ADMIN); where it is refused the test is skipped with the reason.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def small_disk(where: Path, megabytes: int) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(where)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a {megabytes} MB tmpfs here (needs root): {out.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(path: Path, megabytes: float) -> Path:
    """A file of ``megabytes`` on the disk: the space a user frees later by deleting it."""
    with open(path, "wb") as fh:
        fh.write(b"\0" * int(megabytes * 1e6))
    return path
