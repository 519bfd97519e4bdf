"""The local tritonserver install: find the binary in the nvidia-pytriton wheel, build the python
backend directory for this Python, and the environment its stubs need (see serving.server)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from serving.server.common import TritonServerError

logger = logging.getLogger(__name__)

STUB_NAME = "triton_python_backend_stub"


@dataclass(frozen=True)
class TritonInstall:
    """Where the nvidia-pytriton wheel keeps tritonserver and its python backend."""

    binary: Path
    libs_dir: Path
    python_backend_dir: Path
    stub: Path
    version: str


def python_version_tag() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def find_tritonserver() -> TritonInstall:
    """Locate tritonserver in the installed nvidia-pytriton wheel (without importing pytriton)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonServerError(
            "tritonserver not found: the nvidia-pytriton wheel is not installed "
            "(pip install 'gptpipe[server]'), or use --docker"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    server_dir = package_dir / "tritonserver"
    py = python_version_tag()
    install = TritonInstall(
        binary=server_dir / "bin" / "tritonserver",
        libs_dir=package_dir.parent / "nvidia_pytriton.libs",
        python_backend_dir=server_dir / "backends" / "python",
        stub=server_dir / "python_backend_stubs" / py / STUB_NAME,
        version=importlib.metadata.version("nvidia-pytriton"),
    )
    if not install.stub.is_file():
        shipped = sorted(p.name for p in (server_dir / "python_backend_stubs").glob("*"))
        raise TritonServerError(
            f"nvidia-pytriton {install.version} has no python backend stub for Python {py} "
            f"(it ships {', '.join(shipped)})"
        )
    for path in (install.binary, install.libs_dir, install.python_backend_dir / "libtriton_python.so"):
        if not path.exists():
            raise TritonServerError(f"incomplete nvidia-pytriton install: {path} is missing")
    return install


def default_backend_root(install: TritonInstall) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "gptpipe" / "triton-backends" / f"pytriton-{install.version}-py{python_version_tag()}"


def _backend_sources(install: TritonInstall) -> dict[str, Path]:
    """File name in <backends>/python/ -> the wheel file it is copied from."""
    sources = {p.name: p for p in install.python_backend_dir.iterdir() if p.is_file()}
    sources[STUB_NAME] = install.stub
    return sources


def _is_current_copy(target: Path, sources: Mapping[str, Path]) -> bool:
    for name, source in sources.items():
        copy = target / name
        if not copy.is_file():
            return False
        a, b = copy.stat(), source.stat()
        # copy2 keeps mtimes, so size + mtime tell a stale copy from a current one.
        if (a.st_size, a.st_mtime_ns) != (b.st_size, b.st_mtime_ns):
            return False
    return True


def prepare_backend_directory(install: TritonInstall, root: Path | None = None) -> Path:
    """Build ``<root>/python/`` (the python backend + this Python's stub); return ``root``.

    The result is what ``--backend-directory`` wants. It is reused while it matches the
    wheel; concurrent callers are safe (built in a temporary directory, then renamed).
    """
    root = Path(root) if root is not None else default_backend_root(install)
    target = root / "python"
    sources = _backend_sources(install)
    if _is_current_copy(target, sources):
        return root
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".python-", dir=root))
    for name, source in sources.items():
        shutil.copy2(source, staging / name)  # keeps the stub's exec bit and the mtime
    if target.exists():
        logger.info("replacing stale python backend copy in %s", target)
        shutil.rmtree(target, ignore_errors=True)
    try:
        staging.rename(target)
    except OSError:
        # Another process won the race; its copy is as good as ours.
        shutil.rmtree(staging, ignore_errors=True)
        if not _is_current_copy(target, sources):
            raise
    logger.info("python backend for Python %s prepared in %s", python_version_tag(), target)
    return root


def _python_libdir() -> Path | None:
    """Directory holding this interpreter's libpython, if it is a shared build."""
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return None
    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if libdir and soname and (Path(libdir) / soname).exists():
        return Path(libdir)
    return None


def _prepend(paths: Sequence[Path | str], current: str | None) -> str:
    parts = [str(p) for p in paths] + ([current] if current else [])
    return os.pathsep.join(parts)


def server_env(install: TritonInstall, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for tritonserver so its python stubs run this very Python environment."""
    env = dict(os.environ if base is None else base)
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "python3").exists():
        logger.warning(
            "%s has no python3: python-backend models may not see this environment's packages",
            bin_dir,
        )
    env["PATH"] = _prepend([bin_dir], env.get("PATH"))
    libdir = _python_libdir()
    if libdir is None:
        logger.warning(
            "this Python is not a shared build: the python backend stub will load the "
            "system libpython%s", python_version_tag(),
        )
    lib_paths = [install.libs_dir] + ([libdir] if libdir else [])
    env["LD_LIBRARY_PATH"] = _prepend(lib_paths, env.get("LD_LIBRARY_PATH"))
    return env
