"""The artifact store: one fsspec URI root for datasets, checkpoints and adapters."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import fsspec

# Written last into a directory stored on an object store, where a directory can't be renamed into place.
MARKER = ".tuneforge-complete"


class ArtifactStore:
    def __init__(self, root: str) -> None:
        if "://" not in root:
            root = str(Path(root).resolve())
        self.root = root.rstrip("/")
        self.fs, self._base = fsspec.core.url_to_fs(self.root)

    def uri(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def path_of(self, uri: str) -> str:
        """Filesystem path for a URI under this store (fsspec form)."""
        return fsspec.core.url_to_fs(uri)[1]

    def exists(self, uri: str) -> bool:
        return self.fs.exists(self.path_of(uri))

    def put_file_atomic(self, local_path: str, uri: str) -> None:
        """Write to a temporary name then rename, so a reader never sees half a file."""
        target = self.path_of(uri)
        self.fs.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = f"{target}.tmp-{uuid.uuid4().hex}"  # unique per write: concurrent writers never share one
        self.fs.put_file(local_path, tmp)
        self.fs.mv(tmp, target)

    @property
    def is_local(self) -> bool:
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        return "file" in protocols or "local" in protocols

    def scratch_dir(self) -> str:
        """Where to spool files that will be stored: inside a local store, so storing them is a rename."""
        path = os.path.join(self._base, ".tmp") if self.is_local else os.path.join(tempfile.gettempdir(), "tuneforge")
        os.makedirs(path, exist_ok=True)
        return path

    def adopt_file(self, local_path: str, uri: str) -> None:
        """Store a spooled file under uri, atomically; a local store renames it instead of copying."""
        if not self.is_local:
            self.put_file_atomic(local_path, uri)
            return
        target = self.path_of(uri)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            os.replace(local_path, target)  # same filesystem when spooled in scratch_dir()
        except OSError:
            self.put_file_atomic(local_path, uri)

    def put_dir(self, local_dir: str, uri: str) -> None:
        """Store a directory (a checkpoint, a job's output) so that uri holds all of it or what it held before.

        Local store: the files are copied, each fsynced, into a hidden sibling `.<name>.tmp-<hex>` in the same
        parent, which is renamed to its final name once complete (one rename, atomic on one filesystem), and
        the parent is fsynced. A failure (a full disk, a read-only mount, an unreadable source file) removes
        the temporary directory and raises; nothing under a final name is touched, so the checkpoints already
        stored stay intact. (On a store turned read-only mid-copy the removal itself can't happen: the hidden
        temporary is left, never under a final name.) A directory already at uri (the same step stored again
        by a later attempt) is moved aside, replaced by the new one, then removed.

        Object store: prefixes don't rename, so each file is uploaded under uri (one PUT per object, atomic
        per object) and a `MARKER` object is written last; a failure removes what this call wrote when uri
        held nothing before. Readers never depend on the marker alone: a checkpoint is only listed (and so
        resumed from) once the agent reported it, which it does after this returns.
        """
        if not os.path.isdir(local_dir):  # e.g. a checkpoint the runner rotated away: never stored empty
            raise FileNotFoundError(errno.ENOENT, "no such directory to store", local_dir)
        if self.is_local:
            _put_dir_local(local_dir, self.path_of(uri).rstrip("/"))
            return
        target = self.path_of(uri).rstrip("/")
        existed = self.fs.exists(target)
        try:
            if existed and self.fs.exists(f"{target}/{MARKER}"):
                self.fs.rm(f"{target}/{MARKER}")  # incomplete again until the new files are all in
            for path in sorted(Path(local_dir).rglob("*")):
                if path.is_file():
                    self.fs.put_file(str(path), f"{target}/{path.relative_to(local_dir).as_posix()}")
            self.fs.pipe_file(f"{target}/{MARKER}", b"")
        except BaseException:
            if not existed:
                with contextlib.suppress(Exception):
                    self.fs.rm(target, recursive=True)
            raise

    def get_file(self, uri: str, local_path: str) -> None:
        fs, path = fsspec.core.url_to_fs(uri)
        fs.get_file(path, local_path)

    def get_dir(self, uri: str, local_dir: str) -> None:
        fs, path = fsspec.core.url_to_fs(uri)
        fs.get(path.rstrip("/") + "/", local_dir.rstrip("/") + "/", recursive=True)


def _put_dir_local(local_dir: str, target: str) -> None:
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex}")  # hidden: never taken for a checkpoint-N
    try:
        os.mkdir(tmp)
        for path in sorted(Path(local_dir).rglob("*")):
            out = os.path.join(tmp, path.relative_to(local_dir))
            if path.is_dir():
                os.makedirs(out, exist_ok=True)
            elif path.is_file():
                os.makedirs(os.path.dirname(out), exist_ok=True)
                shutil.copyfile(path, out)
                _fsync(out)
        _fsync(tmp)
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(parent)


def _replace_dir(new: str, target: str) -> None:
    """Rename new to target; a directory already at target is moved aside first, then removed."""
    try:
        os.rename(new, target)  # atomic; onto an existing non-empty directory it fails
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    parent, name = os.path.split(target)
    old = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex}")
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)  # put the previous one back
        raise
    shutil.rmtree(old, ignore_errors=True)


def _fsync(path: str) -> None:
    """Flush a file's or a directory's contents to disk, so a rename never names data a crash loses."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
