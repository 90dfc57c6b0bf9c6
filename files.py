"""Atomic writes and the data error: what every module that writes a file or rejects an input shares.

    with atomic_output("out/scene.tif", ".tif") as tmp:   # write tmp; it replaces out/scene.tif on success
        ...
    write_text_atomic("out/summary.json", text)
    raise DataError(f"{path}: expected 13 bands, found 4")   # the scripts print it as one line and exit 2

Standard library only, so the lowest layer can use it: the training and evaluation runtime writes checkpoints
with the same writer as the GeoTIFF layer without importing rasterio.
"""
import contextlib
import os
import tempfile
from pathlib import Path


class DataError(ValueError):
    """Bad input data: the message names the file (and line, for list files)."""

    def __init__(self, message=""):
        # A DataLoader worker's error comes back as DataError("Caught DataError in DataLoader worker process N.\n
        # Original Traceback ... DataError: <message>"); keep <message>, the part that tells a user what to fix.
        message = str(message)
        if message.startswith("Caught DataError in DataLoader worker") and "DataError: " in message:
            message = message.rsplit("DataError: ", 1)[1].rstrip("\n")
        super().__init__(message)


@contextlib.contextmanager
def atomic_output(path, suffix=".tmp"):
    """Yield a temp file path beside `path`; rename it over `path` when the block succeeds, delete it when it
    fails. A reader (or a run killed half-way) never sees a half-written file. Used for every output the
    project writes: lists, GeoTIFFs, checkpoints, CSV/JSON results, PNGs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder, so os.replace stays on one file system and is atomic.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    # mkstemp creates the file 0600; give the output the permissions a plain open() would (0666 & ~umask).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def outermost_new_folder(folder):
    """The outermost folder of `folder`'s path that does not exist yet (what mkdir(parents=True) would create), or
    None when it exists: what a run that fails before its first output removes again, so it leaves nothing behind."""
    folder, made = Path(folder), None
    while not folder.exists():
        made, folder = folder, folder.parent
    return made


def write_text_atomic(path, text):
    """Write a text file atomically (see atomic_output)."""
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as f:
        f.write(text)
    return Path(path)
