"""Every file a run writes goes through here (``etils.epath``), so a workdir may be local or remote.

Local paths are made absolute (orbax / tensorstore want that); ``gs://``, ``s3://``, ... go to
epath's fsspec backends (``pip install 'etils[epath-gcs]'`` for ``gs://``, ``etils[epath-s3]`` for
``s3://``). Object stores cannot append, so :class:`AppendFile` keeps the file's text and rewrites it
on each flush (metrics are small). TensorBoard event files for remote workdirs go through the same
class, registered with tensorboardX.
"""

from __future__ import annotations

import os

from etils import epath

REMOTE_SCHEMES = ("gs", "s3", "az", "hf")


def is_remote(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def path(p: str | os.PathLike) -> epath.Path:
    """``p`` as an epath.Path: absolute when local, untouched when remote."""
    return epath.Path(p if is_remote(p) else os.path.abspath(p))


def join(base: str | os.PathLike, *parts: str) -> str:
    """``base/parts...`` as a string, without ``os.path`` touching a ``gs://`` prefix."""
    return os.fspath(path(base).joinpath(*parts))


class AppendFile:
    """Append-only text or bytes file: appends in place on local disks; on object stores it holds the
    whole content (read once at open, so a resumed run keeps its earlier lines) and rewrites it on
    :meth:`flush`."""

    def __init__(self, p: str | os.PathLike, binary: bool = False):
        self.path = path(p)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._remote = is_remote(p)
        self._binary = binary
        if self._remote:
            old = self.path.read_bytes() if self.path.exists() else b""
            self._content = [old if binary else old.decode("utf-8")]
        else:
            self._file = self.path.open("ab" if binary else "a")

    def write(self, data: str | bytes) -> None:
        if self._remote:
            self._content.append(data)
        else:
            self._file.write(data)

    def flush(self) -> None:
        if not self._remote:
            self._file.flush()
            return
        joined = (b"" if self._binary else "").join(self._content)
        self._content = [joined]
        if self._binary:
            self.path.write_bytes(joined)
        else:
            self.path.write_text(joined)

    def close(self) -> None:
        self.flush()
        if not self._remote:
            self._file.close()


class _TensorBoardFactory:
    """tensorboardX writer factory (``open`` / ``directory_check``) for remote schemes."""

    def open(self, p: str) -> AppendFile:
        return AppendFile(p, binary=True)

    def directory_check(self, p: str) -> None:
        path(p).mkdir(parents=True, exist_ok=True)


def register_tensorboard() -> None:
    """Routes tensorboardX's remote event files through :class:`AppendFile` (idempotent)."""
    from tensorboardX import record_writer

    for scheme in REMOTE_SCHEMES:
        record_writer.register_writer_factory(scheme, _TensorBoardFactory())
