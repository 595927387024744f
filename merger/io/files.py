"""Reading a user's text file (a recipe, a text to score) safely: a regular file only (never a pipe or
device that would block), of bounded size, UTF-8; each failure one line of the caller's error class."""
from __future__ import annotations

import os
import stat
from pathlib import Path

from merger.errors import MergerError


def read_user_text(path: str | Path, what: str, limit: int, error: type[MergerError]) -> str:
    """The UTF-8 text of `path` (a leading BOM dropped), at most `limit` bytes."""
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise error(f"{path}: {what} file not found") from None
    except OSError as e:
        raise error(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{path}: is a folder; give the {what} file")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path}: not a regular file (a pipe or device); save the {what} to a file first")
    if st.st_size > limit:
        raise error(f"{path}: {st.st_size / 1e6:.1f} MB is too large for a {what} (limit {limit // 2**20} MiB); "
                    f"is it the right file?")
    try:
        with open(p, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise error(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start}); save the {what} as UTF-8") from None
