"""Generates the Python code for every proto under ``protos/`` into one package, ``llmesh.pb``.

One generator for both places the code is needed: the development tree
(``scripts/gen_protos.sh`` → ``src/llmesh/pb/``, git-ignored) and a wheel (``setup.py``'s
build step → the build folder). Nothing in ``llmesh.pb`` is written by hand: protoc emits
``llmesh.<service>.v1`` modules (the proto file layout), and the import lines are rewritten
to ``llmesh.pb.<service>.v1`` so the generated tree lives in a package that says what it is.
Protobuf package names (``llmesh.inference.v1``) and the wire are unchanged.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

PACKAGE = "pb"
_DOC = '"""Generated from protos/ by scripts/protogen.py. Do not edit; never committed."""\n'


def _plugin(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found (install mypy-protobuf)")
    return found


def generate(protos: Path, out: Path) -> list[Path]:
    """Generate ``out/llmesh/pb/<service>/v1/*`` from ``protos/llmesh/<service>/v1/*.proto``."""
    import grpc_tools
    from grpc_tools import protoc

    files = sorted(str(p.relative_to(protos)) for p in protos.rglob("*.proto"))
    services = sorted({Path(f).parts[1] for f in files})
    wkt = Path(grpc_tools.__file__).parent / "_proto"
    target = out / "llmesh" / PACKAGE
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc", f"-I{protos}", f"-I{wkt}",
            f"--python_out={tmp}", f"--grpc_python_out={tmp}",
            f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}", f"--mypy_out={tmp}",
            f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}", f"--mypy_grpc_out={tmp}",
            *files,
        ]  # fmt: skip
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed")
        # Clear stale output so a deleted proto does not leave modules behind.
        shutil.rmtree(target, ignore_errors=True)
        # Module references only (``llmesh.x.v1 import`` / ``llmesh.x.v1.y_pb2``), never the
        # proto names inside the serialized descriptors (``.llmesh.x.v1.Type``).
        imports = re.compile(
            rf"\bllmesh\.({'|'.join(map(re.escape, services))})\.v1(?=\.\w+_pb2\b|\.\w+_pb2_grpc\b| import)"
        )
        written = []
        for src in sorted(Path(tmp, "llmesh").rglob("*.py*")):
            dst = target / src.relative_to(Path(tmp, "llmesh"))
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(imports.sub(rf"llmesh.{PACKAGE}.\1.v1", src.read_text()))
            written.append(dst)
    for d in [target, *sorted({p.parent for p in written}), *sorted({p.parent.parent for p in written})]:
        init = d / "__init__.py"
        if not init.exists():
            init.write_text(_DOC)
    (target / "py.typed").touch()
    return written


if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else root / "src"
    n = len(generate(root / "protos", out))
    print(f"generated {n} files into {out / 'llmesh' / PACKAGE}")
