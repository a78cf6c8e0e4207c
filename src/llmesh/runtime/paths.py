"""Path confinement: a file a client names is read only if it lies inside a root folder.

A security check shared by every service that reads files named in a request (today the
trainer's ImportDataset), so that each one refuses the same tricks the same way.
"""

from __future__ import annotations

import os
from pathlib import Path

from llmesh.runtime.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied

# Longest piece of the client's path echoed back in an error message.
MAX_SHOWN = 200


def resolve_within(root: Path, user_path: str, *, what: str, field: str = "path") -> Path:
    """The real path of a regular file a client names, which must lie inside ``root``.

    ``what`` names the kind of file in messages ("dataset" → "dataset path '…'", NOT_FOUND
    "dataset file"); ``field`` is the request field the path came from. Checked on the fully
    resolved path, so a symlink anywhere in it (file or directory) that leads outside is
    refused. Containment is checked before existence, so a client cannot probe which files
    exist outside the root. Messages quote only the client's own input, never the root or
    where a link points.
    """
    if not user_path or "\x00" in user_path:
        raise InvalidArgument(field, "must be a non-empty path without NUL characters")
    shown = user_path if len(user_path) <= MAX_SHOWN else user_path[: MAX_SHOWN - 3] + "..."
    try:
        real_root = Path(root).resolve(strict=True)
    except OSError:
        raise FailedPrecondition(f"the {what} root is not available on the server") from None
    given = Path(user_path)
    # '..' is never needed to name a file under the root; refusing it outright leaves no
    # lexical trick to reason about.
    if ".." in given.parts:
        raise PermissionDenied(f"{what} path '{shown}' must not contain '..'")
    candidate = given if given.is_absolute() else real_root / given
    try:
        real = candidate.resolve(strict=False)
    except (OSError, RuntimeError):  # a symlink loop
        raise PermissionDenied(f"{what} path '{shown}' cannot be resolved") from None
    if real != real_root and not real.is_relative_to(real_root):
        raise PermissionDenied(f"{what} path '{shown}' is outside the allowed {what} root")
    if not real.exists():
        raise NotFound(f"{what} file", user_path)
    if not real.is_file():
        raise InvalidArgument(field, f"'{shown}' is not a regular file")
    if not os.access(real, os.R_OK):
        raise PermissionDenied(f"{what} path '{shown}' is not readable by the server")
    return real
