"""Files the mesh writes: atomically, durably, and (for secrets) owner-only.

Every writer of state that another process or a later start reads (registries,
evaluation outputs, launcher state, spools, keys) goes through :func:`write_atomic`:
readers see the old file or the new one, never half of one, even after a crash; a
folder built in a staging sibling (a model, an adapter) goes into place with
:func:`publish_dir`. Secrets go through :func:`create_secret` / :func:`write_secret` /
:func:`read_secret` / :func:`load_or_create_secret`: 0600 with their full content from
the first byte, and refused when another user could read them. :func:`address` is the one way to build a
``host:port`` string (IPv6 hosts are bracketed).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "SecretFileError",
    "address",
    "create_secret",
    "fsync_dir",
    "load_or_create_secret",
    "publish_dir",
    "read_secret",
    "sync_tree",
    "write_atomic",
    "write_secret",
]

# A folder that holds secrets: owner only.
SECRET_DIR_MODE = 0o700
SECRET_MODE = 0o600


class SecretFileError(RuntimeError):
    """A secret file is unsafe (readable by others) or malformed; the message says how."""


def fsync_dir(folder: Path) -> None:
    """Makes a rename or a new entry in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(folder: Path, name: str, data: bytes, mode: int) -> Path:
    """A fully written, fsynced temporary file beside its destination (same filesystem,
    so the rename is atomic); unique per call, so concurrent writers never share one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, mode)  # mkstemp creates 0600; secrets stay so from the first byte
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return Path(tmp)


def write_atomic(path: Path, data: bytes | str, *, mode: int = 0o644, dir_mode: int = 0o755) -> None:
    """Replaces ``path`` with ``data`` (str is UTF-8): write a temporary file, fsync it,
    rename it over ``path``, fsync the folder. Missing folders are created with
    ``dir_mode``."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    path.parent.mkdir(mode=dir_mode, parents=True, exist_ok=True)
    tmp = _write_temp(path.parent, path.name, payload, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def sync_tree(root: Path) -> None:
    """fsyncs every file and folder under ``root`` (and ``root`` itself), deepest first."""
    for folder, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            path = os.path.join(folder, name)
            if os.path.isfile(path) and not os.path.islink(path):
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_dir(Path(folder))


def publish_dir(staged: Path, dest: Path, *, replace: bool = False) -> None:
    """Moves the finished folder ``staged`` to ``dest`` (same filesystem) durably: its
    content is fsynced first, so after a crash ``dest`` is complete or absent. An existing
    ``dest`` is an error unless ``replace`` (then it is moved aside and removed)."""
    sync_tree(staged)
    trash: Path | None = None
    if replace and dest.exists():
        trash = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(dest, trash)
    elif dest.exists():
        raise FileExistsError(f"{dest} already exists")
    try:
        os.rename(staged, dest)
    except BaseException:
        if trash is not None:
            os.rename(trash, dest)  # put the old one back
        raise
    fsync_dir(dest.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def write_secret(path: Path, data: bytes | str) -> None:
    """Replaces the secret file ``path`` atomically: 0600 from the first byte, folder 0700."""
    write_atomic(path, data, mode=SECRET_MODE, dir_mode=SECRET_DIR_MODE)


def create_secret(path: Path, data: bytes) -> bool:
    """Creates ``path`` (0600, folder 0700) holding ``data`` unless it exists already.

    The file appears with its whole content at once (a hard link of a written temporary
    file), so a concurrent reader never sees it empty or short. True when this call
    created it, False when another process got there first (its content stands)."""
    path.parent.mkdir(mode=SECRET_DIR_MODE, parents=True, exist_ok=True)
    tmp = _write_temp(path.parent, path.name, data, SECRET_MODE)
    try:
        os.link(tmp, path)  # fails if path exists: first writer wins, nobody overwrites
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return True


def read_secret(path: Path, *, size: int | None = None) -> bytes:
    """The content of a secret file, refused (:class:`SecretFileError`) when group or
    others may read or write it, or when it is not ``size`` bytes long."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)  # the file we read, not a re-lookup
        if mode & 0o077:
            raise SecretFileError(
                f"{path} has mode {mode:04o}: readable by group/others (want 0600); run `chmod 600 {path}`"
            )
        data = f.read()
    if size is not None and len(data) != size:
        raise SecretFileError(f"{path}: expected a {size}-byte secret, found {len(data)} bytes")
    return data


def load_or_create_secret(path: Path, make: Callable[[], bytes], *, size: int | None = None) -> bytes:
    """The secret at ``path``; the first process to need it creates it with ``make()``."""
    try:
        return read_secret(path, size=size)
    except FileNotFoundError:
        pass
    create_secret(path, make())
    return read_secret(path, size=size)  # ours, or the one a concurrent process created


def local_address(host: str, port: int) -> str:
    """Where this host reaches a server that binds ``host:port``: a wildcard bind (all
    IPv4 or IPv6 interfaces, or an empty host) is reached on loopback."""
    try:
        ip = ipaddress.ip_address(host.strip("[]")) if host else None
    except ValueError:
        return address(host, port)  # a host name
    if ip is None or ip.is_unspecified:
        host = "::1" if isinstance(ip, ipaddress.IPv6Address) else "127.0.0.1"
    return address(host, port)


def address(host: str, port: int) -> str:
    """``host:port`` for gRPC targets, URLs and messages: ``127.0.0.1:50061``,
    ``[::1]:50061`` (an IPv6 literal is bracketed, once)."""
    if ":" in host and not host.startswith("["):  # an IPv6 literal (a host name has no colon)
        return f"[{host}]:{port}"
    return f"{host}:{port}"
