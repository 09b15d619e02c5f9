"""The artifact store: one fsspec URI root for datasets, checkpoints and adapters."""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

import fsspec


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
        target = self.path_of(uri)
        self.fs.makedirs(target, exist_ok=True)
        for path in sorted(Path(local_dir).rglob("*")):
            if path.is_file():
                self.put_file_atomic(str(path), f"{uri}/{path.relative_to(local_dir).as_posix()}")

    def get_file(self, uri: str, local_path: str) -> None:
        fs, path = fsspec.core.url_to_fs(uri)
        fs.get_file(path, local_path)

    def get_dir(self, uri: str, local_dir: str) -> None:
        fs, path = fsspec.core.url_to_fs(uri)
        fs.get(path.rstrip("/") + "/", local_dir.rstrip("/") + "/", recursive=True)
