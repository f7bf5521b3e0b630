"""A throw-away copy of the repository, for tests and benchmarks that run dvc (never the workspace)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

__all__ = ["scratch_env", "scratch_repository"]


def scratch_env() -> dict[str, str]:
    """This interpreter's scripts first on PATH, DVC analytics off, a git identity."""
    return os.environ | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "true",
        "GIT_AUTHOR_NAME": "hemaflow",
        "GIT_AUTHOR_EMAIL": "hemaflow@example.org",
        "GIT_COMMITTER_NAME": "hemaflow",
        "GIT_COMMITTER_EMAIL": "hemaflow@example.org",
    }


def scratch_repository(
    source: Path, target: Path, skip: Callable[[str], bool] = lambda name: False, files: dict[str, str] | None = None
) -> None:
    """Copy the files git would commit from ``source`` into a new git repo and commit them.

    ``skip`` leaves files out; ``files`` replaces (or adds) files by content before the commit.
    """
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=source,
        check=True,
        capture_output=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        if (source / name).is_file() and not skip(name):
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, target / name)
    for name, text in (files or {}).items():
        (target / name).write_text(text)
    env = scratch_env()
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "scratch copy"]):
        subprocess.run(command, cwd=target, env=env, check=True, capture_output=True)
