"""runtime.files: atomic writes, folder publishing, secret files, addresses."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from llmesh.runtime.files import (
    SecretFileError,
    address,
    create_secret,
    load_or_create_secret,
    local_address,
    publish_dir,
    read_secret,
    write_atomic,
    write_secret,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_write_atomic_replaces_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "state.json"
    write_atomic(path, "first")
    write_atomic(path, b"second", mode=0o600)
    assert path.read_bytes() == b"second" and _mode(path) == 0o600
    assert os.listdir(path.parent) == ["state.json"]


def test_write_atomic_failure_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_atomic(path, "old")
    with pytest.raises(TypeError):
        write_atomic(path, 42)  # type: ignore[arg-type]  # deliberately wrong: the write must fail cleanly
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["state.json"]


def test_publish_dir_moves_a_complete_folder(tmp_path: Path) -> None:
    staged = tmp_path / ".model.partial"
    (staged / "sub").mkdir(parents=True)
    (staged / "sub" / "w.bin").write_bytes(b"x")
    dest = tmp_path / "model"
    publish_dir(staged, dest)
    assert (dest / "sub" / "w.bin").read_bytes() == b"x" and not staged.exists()

    again = tmp_path / ".again"
    again.mkdir()
    with pytest.raises(FileExistsError):
        publish_dir(again, dest)
    (again / "new").write_text("n")
    publish_dir(again, dest, replace=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"] and os.listdir(dest) == ["new"]


def test_secret_is_created_once_whole_and_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "security" / "internal.key"
    assert create_secret(path, b"a" * 32) is True
    assert create_secret(path, b"b" * 32) is False  # the first writer wins
    assert read_secret(path, size=32) == b"a" * 32
    assert _mode(path) == 0o600 and _mode(path.parent) == 0o700
    assert os.listdir(path.parent) == ["internal.key"]


def test_concurrent_creators_agree_on_one_secret(tmp_path: Path) -> None:
    path = tmp_path / "k"
    seen: list[bytes] = []
    threads = [
        threading.Thread(target=lambda i=i: seen.append(load_or_create_secret(path, lambda: bytes([i]) * 32, size=32)))
        for i in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 8 and len(set(seen)) == 1 and os.listdir(tmp_path) == ["k"]


def test_read_secret_refuses_what_others_can_read(tmp_path: Path) -> None:
    path = tmp_path / "api-key.json"
    write_secret(path, '{"key_id": "k"}')
    assert _mode(path) == 0o600 and read_secret(path) == b'{"key_id": "k"}'
    os.chmod(path, 0o644)
    with pytest.raises(SecretFileError, match=r"mode 0644: readable by group/others \(want 0600\)"):
        read_secret(path)
    os.chmod(path, 0o600)
    with pytest.raises(SecretFileError, match="expected a 32-byte secret, found 15 bytes"):
        read_secret(path, size=32)
    with pytest.raises(FileNotFoundError):
        read_secret(tmp_path / "missing")


@pytest.mark.parametrize(
    ("host", "port", "want"),
    [
        ("127.0.0.1", 50061, "127.0.0.1:50061"),
        ("localhost", 1, "localhost:1"),
        ("::1", 50061, "[::1]:50061"),
        ("[::1]", 50061, "[::1]:50061"),
        ("fe80::1%eth0", 8, "[fe80::1%eth0]:8"),
    ],
)
def test_address_brackets_ipv6_once(host: str, port: int, want: str) -> None:
    assert address(host, port) == want


@pytest.mark.parametrize(
    ("host", "expected"),
    [("0.0.0.0", "127.0.0.1:7"), ("", "127.0.0.1:7"), ("::", "[::1]:7"), ("127.0.0.1", "127.0.0.1:7"),
     ("::1", "[::1]:7"), ("10.0.0.9", "10.0.0.9:7"), ("gw.example", "gw.example:7")],
)  # fmt: skip
def test_local_address_reaches_a_wildcard_bind_on_loopback(host: str, expected: str) -> None:
    assert local_address(host, 7) == expected
