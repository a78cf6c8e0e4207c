"""Path confinement (llmesh.runtime.paths): a client-named file is read only inside its root,
whatever '..', absolute paths or symlinks it tries; messages never reveal the server's paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llmesh.runtime.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from llmesh.runtime.paths import resolve_within


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "datasets"
    (root / "team").mkdir(parents=True)
    (root / "team" / "faq.json").write_text("[]")
    (root / "top.csv").write_text("q,a\n")
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "passwd.txt").write_text("nope")
    return root, outside


@pytest.mark.parametrize("user_path", ["team/faq.json", "./team/faq.json", "top.csv", "team//faq.json"])
def test_resolve_allowed_relative(tree: tuple[Path, Path], user_path: str) -> None:
    root, _ = tree
    assert resolve_within(root, user_path, what="dataset") == (root / user_path).resolve()


def test_resolve_allowed_absolute_inside(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    assert resolve_within(root, str(root / "top.csv"), what="dataset") == (root / "top.csv").resolve()


def test_resolve_symlink_inside_root_is_allowed(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    os.symlink(root / "team" / "faq.json", root / "alias.json")
    assert resolve_within(root, "alias.json", what="dataset") == (root / "team" / "faq.json").resolve()


def test_resolve_root_given_through_a_symlink(tree: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = tree
    os.symlink(root, tmp_path / "link-to-root")
    assert resolve_within(tmp_path / "link-to-root", "top.csv", what="dataset") == (root / "top.csv").resolve()


@pytest.mark.parametrize("user_path", ["../secret/passwd.txt", "team/../../secret/passwd.txt", "..", "team/../top.csv"])
def test_resolve_refuses_dotdot(tree: tuple[Path, Path], user_path: str) -> None:
    root, _ = tree
    with pytest.raises(PermissionDenied) as info:
        resolve_within(root, user_path, what="dataset")
    assert "'..'" in info.value.message and str(root) not in info.value.message


def test_resolve_refuses_absolute_outside(tree: tuple[Path, Path]) -> None:
    root, outside = tree
    with pytest.raises(PermissionDenied, match="outside the allowed dataset root"):
        resolve_within(root, str(outside / "passwd.txt"), what="dataset")
    with pytest.raises(PermissionDenied):
        resolve_within(root, "/etc/passwd", what="dataset")


def test_resolve_refuses_missing_file_outside_as_denied_not_missing(tree: tuple[Path, Path]) -> None:
    # no existence oracle for paths outside the root
    root, outside = tree
    with pytest.raises(PermissionDenied):
        resolve_within(root, str(outside / "does-not-exist"), what="dataset")


def test_resolve_refuses_file_symlink_pointing_outside(tree: tuple[Path, Path]) -> None:
    root, outside = tree
    os.symlink(outside / "passwd.txt", root / "team" / "innocent.json")
    with pytest.raises(PermissionDenied) as info:
        resolve_within(root, "team/innocent.json", what="dataset")
    msg = info.value.message
    assert "team/innocent.json" in msg and str(outside) not in msg and str(root) not in msg


def test_resolve_refuses_symlinked_directory_pointing_outside(tree: tuple[Path, Path]) -> None:
    root, outside = tree
    os.symlink(outside, root / "shared")
    with pytest.raises(PermissionDenied):
        resolve_within(root, "shared/passwd.txt", what="dataset")
    with pytest.raises(PermissionDenied):
        resolve_within(root, str(root / "shared" / "passwd.txt"), what="dataset")


def test_resolve_refuses_symlink_loop(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    os.symlink(root / "b", root / "a")
    os.symlink(root / "a", root / "b")
    with pytest.raises((PermissionDenied, NotFound)):
        resolve_within(root, "a", what="dataset")


def test_resolve_missing_file_is_not_found(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    with pytest.raises(NotFound) as info:
        resolve_within(root, "team/nope.json", what="dataset")
    assert info.value.kind == "dataset file" and info.value.name == "team/nope.json"


@pytest.mark.parametrize("user_path", ["", "team", ".", "a\x00b"])
def test_resolve_refuses_empty_directory_and_nul(tree: tuple[Path, Path], user_path: str) -> None:
    root, _ = tree
    with pytest.raises(InvalidArgument):
        resolve_within(root, user_path, what="dataset")


def test_resolve_missing_root_is_failed_precondition(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition) as info:
        resolve_within(tmp_path / "absent", "x.json", what="dataset")
    assert str(tmp_path) not in info.value.message


def test_messages_name_what_the_caller_confines(tree: tuple[Path, Path]) -> None:
    root, outside = tree
    with pytest.raises(PermissionDenied, match="^model path '.*' is outside the allowed model root$"):
        resolve_within(root, str(outside / "passwd.txt"), what="model")
    with pytest.raises(InvalidArgument) as info:
        resolve_within(root, "", what="model", field="source.path")
    assert info.value.field == "source.path"
