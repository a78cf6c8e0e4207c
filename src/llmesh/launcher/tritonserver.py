"""Locate and launch the real Triton Inference Server shipped in the ``nvidia-pytriton`` wheel.

The wheel (``nvidia-pytriton==0.7.0``) contains a complete ``tritonserver`` 2.51 binary,
its shared libraries, the Python backend and one backend stub per Python version. This
module only computes paths, prepares a backend directory and builds the command line;
starting, supervising and stopping the process is the caller's job.

Traps handled here (see ``docs``/platform facts):

* the server binds every interface by default: every address is pinned to ``127.0.0.1``;
* the Python backend stub finds ``python3`` through ``PATH`` and must load the same
  ``libpython`` as the running interpreter: ``PATH`` starts with ``sys.executable``'s bin
  directory and ``LD_LIBRARY_PATH`` holds the interpreter's ``LIBDIR``;
* the stub ignores ``PYTHONPATH`` (models must be self-contained);
* a folder named ``triton`` in the server's working directory shadows OpenAI Triton and
  breaks ``import torch`` inside the stub: **never start the server from such a cwd**.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TritonInstall", "TritonNotInstalled", "locate", "prepare_backends", "server_command"]


class TritonNotInstalled(RuntimeError):
    """The ``nvidia-pytriton`` wheel (or a part of it) is missing."""


@dataclass(frozen=True)
class TritonInstall:
    """Paths inside the installed ``nvidia-pytriton`` wheel.

    Attributes:
        root: ``<site-packages>/pytriton/tritonserver``.
        binary: the ``tritonserver`` executable.
        libs_dir: ``<site-packages>/nvidia_pytriton.libs`` (bundled shared libraries).
        python_backend_dir: folder with ``libtriton_python.so`` and
            ``triton_python_backend_utils.py``.
        stub: ``triton_python_backend_stub`` built for the running Python version.
        caches_dir: the ``--cache-directory`` (holds ``local/libtritoncache_local.so``).
        python_version: ``"3.X"`` of the running interpreter.
    """

    root: Path
    binary: Path
    libs_dir: Path
    python_backend_dir: Path
    stub: Path
    caches_dir: Path
    python_version: str


def _find_package_root() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonNotInstalled("package 'pytriton' (nvidia-pytriton) is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def locate() -> TritonInstall:
    """Find the Triton server files inside the installed ``nvidia-pytriton`` wheel.

    Does not import ``pytriton`` (only looks up where it is installed).

    Raises:
        TritonNotInstalled: the wheel, the binary or the stub for this Python is missing.
    """
    pkg = _find_package_root()
    root = pkg / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    install = TritonInstall(
        root=root,
        binary=root / "bin" / "tritonserver",
        libs_dir=pkg.parent / "nvidia_pytriton.libs",
        python_backend_dir=root / "backends" / "python",
        stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
        caches_dir=root / "caches",
        python_version=version,
    )
    for path in (
        install.binary,
        install.stub,
        install.python_backend_dir / "libtriton_python.so",
        install.python_backend_dir / "triton_python_backend_utils.py",
    ):
        if not path.is_file():
            raise TritonNotInstalled(f"missing {path} (nvidia-pytriton==0.7.0 expected)")
    if not install.libs_dir.is_dir():
        raise TritonNotInstalled(f"missing {install.libs_dir}")
    return install


def prepare_backends(dest: Path) -> Path:
    """Create ``dest/python/`` with the Python backend and the stub for this Python.

    Copies ``libtriton_python.so``, ``triton_python_backend_utils.py`` and
    ``triton_python_backend_stub`` (kept executable). Idempotent: files whose size and
    mtime already match are left alone. Returns ``dest`` (the ``--backend-directory``).
    """
    install = locate()
    dest = Path(dest)
    target = dest / "python"
    target.mkdir(parents=True, exist_ok=True)
    sources = [
        install.python_backend_dir / "libtriton_python.so",
        install.python_backend_dir / "triton_python_backend_utils.py",
        install.stub,
    ]
    for src in sources:
        dst = target / src.name
        st = src.stat()
        if dst.is_file():
            dt = dst.stat()
            if dt.st_size == st.st_size and int(dt.st_mtime) == int(st.st_mtime):
                continue
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.copy2(src, tmp)
        os.chmod(tmp, 0o755 if src.name == "triton_python_backend_stub" else 0o644)
        os.replace(tmp, dst)
    return dest


def _python_libdir() -> str:
    libdir = sysconfig.get_config_var("LIBDIR")
    return str(libdir) if libdir else ""


def server_command(
    *,
    repo: Path,
    backends: Path,
    grpc_port: int,
    http_port: int,
    metrics_port: int,
    models: list[str],
    env_extra: dict[str, str],
) -> tuple[list[str], dict[str, str]]:
    """Build the ``tritonserver`` argv and the full environment to run it with.

    Args:
        repo: the model repository (``--model-repository``).
        backends: a folder prepared by :func:`prepare_backends` (``--backend-directory``).
        grpc_port / http_port / metrics_port: ports, all bound on ``127.0.0.1``.
        models: model names loaded at start (explicit model control, one
            ``--load-model`` each); others can be loaded later through the API.
        env_extra: extra variables (e.g. ``LLMESH_LLM_PATH``, ``LLMESH_HOME``) added last,
            so they override inherited ones.

    Returns:
        ``(argv, env)``: pass both to ``subprocess.Popen``. ``env`` is a complete
        environment (a copy of ``os.environ``) with ``LD_LIBRARY_PATH`` starting with the
        wheel's libraries and the running interpreter's ``LIBDIR``, and ``PATH`` starting
        with ``sys.executable``'s bin directory (so the stub runs this venv's Python).

    The caller chooses the working directory: it must **not** contain a folder named
    ``triton`` (it would shadow OpenAI Triton inside the stub and break ``import torch``);
    a dedicated empty/runtime folder such as ``$LLMESH_HOME`` is a good choice.
    """
    install = locate()
    argv = [
        str(install.binary),
        f"--model-repository={Path(repo)}",
        f"--backend-directory={Path(backends)}",
        f"--cache-directory={install.caches_dir}",
        "--model-control-mode=explicit",
        *[f"--load-model={name}" for name in models],
        "--disable-auto-complete-config",
        "--grpc-address=127.0.0.1",
        f"--grpc-port={int(grpc_port)}",
        "--http-address=127.0.0.1",
        f"--http-port={int(http_port)}",
        "--metrics-address=127.0.0.1",
        f"--metrics-port={int(metrics_port)}",
        "--allow-gpu-metrics=false",
        "--backend-config=python,shm-default-byte-size=16777216",
        "--exit-timeout-secs=10",
        "--log-verbose=0",
    ]
    env = dict(os.environ)
    lib_parts = [str(install.libs_dir), _python_libdir()]
    if env.get("LD_LIBRARY_PATH"):
        lib_parts.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in lib_parts if p)
    bin_dir = str(Path(sys.executable).parent)
    path_parts = [bin_dir] + [p for p in env.get("PATH", "").split(os.pathsep) if p and p != bin_dir]
    env["PATH"] = os.pathsep.join(path_parts)
    env.pop("PYTHONHOME", None)
    env.update({str(k): str(v) for k, v in env_extra.items()})
    return argv, env
