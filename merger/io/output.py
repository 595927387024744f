"""The output folder's life, so that nothing is lost and nothing is half-written.

1. `check_output` (before any download or tensor read): OUT_DIR is not an input, the recipe's folder,
   the working folder or a parent of any of them, nor inside an input; `--force` replaces only a
   previous model output (or an empty folder), never a folder of other files.
2. `StagedOutput`: everything is written into `.NAME.merger-tmp-*` beside OUT_DIR, a folder this build
   holds an exclusive lock on for its whole life. Starting a build removes the temp folders of dead
   builds (their lock is free) and refuses to start while a live build writes the same OUT_DIR.
3. `publish()`: under a lock on the parent folder, the staged folder becomes OUT_DIR in one atomic
   rename; with --force it is swapped with the old output in one atomic exchange (Linux renameat2), so
   a crash leaves the old output or the new one, never neither. Where the exchange is unavailable the
   old output is parked as `.NAME.merger-old-*` and put back by the next build if the crash came
   between the two renames.
"""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
import tempfile
from pathlib import Path

from merger.errors import OutputError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the rename is still atomic
    fcntl = None  # type: ignore[assignment]

TMP_TAG, OLD_TAG = ".merger-tmp-", ".merger-old-"
MODEL_MARKERS = ("config.json", "merger_config.yml", "model.safetensors", "model.safetensors.index.json")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _forms(path: Path) -> set[Path]:
    """A path as written (absolute, `..` folded) and as the filesystem resolves it (links followed)."""
    return {Path(os.path.abspath(path)), path.resolve()}


def _inside(child: Path, parent: Path) -> bool:
    """True when `child` is `parent` or lies under it, in either form of either path."""
    return any(c == p or p in c.parents for c in _forms(child) for p in _forms(parent))


def check_output(out_dir: str | Path, force: bool, inputs: dict[str, Path] | None = None,
                 files: dict[str, Path] | None = None) -> Path:
    """Refuse an OUT_DIR whose replacement could lose something. `inputs` are model folders (OUT_DIR may
    not be one, hold one, or sit inside one); `files` are the recipe and plugin files (OUT_DIR may not be
    or hold them). Returns OUT_DIR as an absolute path."""
    out = Path(out_dir).absolute()
    guarded = {"the working folder": Path.cwd(), "your home folder": Path.home()}
    for what, path in guarded.items():
        if _inside(path, out):
            raise OutputError(f"output {out_dir} is {what} or holds it; choose a new folder for the output")
    for what, path in (files or {}).items():
        if _inside(path, out):
            raise OutputError(f"output {out_dir} holds {what} ({path}); choose another folder for the output")
    for ref, path in (inputs or {}).items():
        if _inside(path, out):
            raise OutputError(f"output {out_dir} is or holds input model {ref!r}; choose another folder, "
                              f"or nothing of the input would survive")
        if _inside(out, path):
            raise OutputError(f"output {out_dir} is inside input model {ref!r}; choose a folder outside it")
    if out.is_symlink():
        raise OutputError(f"output {out_dir} is a symbolic link; give the real folder")
    if out.exists():
        if not out.is_dir():
            raise OutputError(f"output {out_dir} exists and is not a folder; remove it first or choose another name")
        if not force:
            raise OutputError(f"output {out_dir} already exists; choose another folder or pass --force")
        check_replaceable(out, out_dir)
    return out


def check_replaceable(out: Path, shown: str | Path) -> None:
    """--force replaces a previous output or an empty folder, never a folder of other files."""
    try:
        names = [p.name for p in out.iterdir()]
    except OSError as e:
        raise OutputError(f"output {shown}: cannot read it ({e.strerror}); check its permissions") from None
    if names and not any(m in names for m in MODEL_MARKERS):
        raise OutputError(f"output {shown} holds files that are not a model output (e.g. {sorted(names)[0]!r}); "
                          f"--force replaces only a previous output; choose another folder")


class _Lock:
    """An exclusive advisory lock (flock) on a folder, held while its file descriptor is open."""

    def __init__(self, folder: Path, wait: bool = True):
        self.fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        if fcntl is None:
            return
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError:
            os.close(self.fd)
            raise

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _held_by_live_build(folder: Path) -> bool:
    """True while another process holds `folder`'s lock (its build is running)."""
    try:
        lock = _Lock(folder, wait=False)
    except BlockingIOError:
        return True
    except OSError:
        return False  # gone meanwhile, or not ours to open
    lock.release()
    return False


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class StagedOutput:
    """`with StagedOutput(out, force) as tmp: ...write into tmp...; staged.publish()`. Leaving the
    block without publishing (an error, Ctrl-C) removes the staged folder; OUT_DIR is untouched."""

    def __init__(self, out_dir: str | Path, force: bool = False):
        self.shown = out_dir
        self.out = Path(out_dir).absolute()
        self.force = force
        self.tmp: Path | None = None
        self._lock: _Lock | None = None
        self.published = False

    # --- start ----------------------------------------------------------------------------
    def __enter__(self) -> Path:
        parent = self.out.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            guard = _Lock(parent)
        except OSError as e:
            raise OutputError(f"cannot create output next to {self.shown} ({e.strerror}); check the path and "
                              f"permissions") from None
        try:
            self._recover()
            if self.out.exists() and not self.force:
                raise OutputError(f"output {self.shown} was put back from a build that crashed while replacing it; "
                                  f"it is the previous complete output; pass --force to replace it")
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}{TMP_TAG}", dir=parent))
            os.chmod(self.tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result should not be
            self._lock = _Lock(self.tmp, wait=False)
        except OSError as e:
            self._discard()
            raise OutputError(f"cannot create output next to {self.shown} ({e.strerror}); check the path and "
                              f"permissions") from None
        except BaseException:
            self._discard()
            raise
        finally:
            guard.release()
        return self.tmp

    def _recover(self) -> None:
        """(Parent lock held.) Remove what dead builds into this OUT_DIR left; refuse a live one."""
        parent, name = self.out.parent, self.out.name
        for p in sorted(parent.glob(f".{name}{TMP_TAG}*")):
            if not p.is_dir() or p.is_symlink():
                continue
            if _held_by_live_build(p):
                raise OutputError(f"another merger build is writing {self.shown} right now (its temp folder is "
                                  f"{p.name}); wait for it to finish or choose another folder")
            shutil.rmtree(p, ignore_errors=True)
        for p in sorted(parent.glob(f".{name}{OLD_TAG}*")):
            if not p.is_dir() or p.is_symlink():
                continue
            if not self.out.exists():
                os.replace(p, self.out)  # a crash between the two renames of a --force replace: put it back
            else:
                shutil.rmtree(p, ignore_errors=True)

    # --- finish ---------------------------------------------------------------------------
    def publish(self) -> Path:
        """Make the staged folder OUT_DIR: atomic, and never over an output that appeared meanwhile
        unless --force."""
        assert self.tmp is not None and not self.published
        _fsync_dir(self.tmp)
        parent = self.out.parent
        guard = _Lock(parent)
        try:
            if self.out.exists() or self.out.is_symlink():
                if not self.force:
                    raise OutputError(f"output {self.shown} was created by someone else while this build ran; "
                                      f"nothing was replaced; choose another folder or pass --force")
                check_replaceable(self.out, self.shown)
                self._replace()
            else:
                os.rename(self.tmp, self.out)
            self.published = True
            _fsync_dir(parent)
        except OSError as e:
            raise OutputError(f"cannot move the finished output into {self.shown} ({e.strerror}); it was not "
                              f"changed") from None
        finally:
            guard.release()
        return self.out

    def _replace(self) -> None:
        assert self.tmp is not None
        if _exchange(self.tmp, self.out):
            old = self.tmp                       # the exchange left the old output at the temp path
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}{OLD_TAG}", dir=self.out.parent))
            os.rmdir(old)
            os.rename(self.out, old)
            os.rename(self.tmp, self.out)
        self.tmp = None
        shutil.rmtree(old, ignore_errors=True)

    def _discard(self) -> None:
        if self.tmp is not None and not self.published:
            shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp = None

    def __exit__(self, *exc: object) -> None:
        self._discard()
        if self._lock is not None:
            self._lock.release()
            self._lock = None
