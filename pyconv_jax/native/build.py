"""Compiles the native libraries: oneDNN convolutions for the ``onednn`` lowering, and the block
cache that the scripts preload (:mod:`pyconv_jax.host`).

``make`` runs ``python -m pyconv_jax.native.build`` after installing the Python packages. The
convolutions need a C++17 compiler (``$CXX``, default ``g++``), JAX's FFI headers (shipped with
jaxlib) and oneDNN's headers and library, which the ``onednn`` extra installs into the
environment's prefix (Linux x86-64 only). The block cache needs a C compiler (``$CC``, default
``cc``) and Linux with glibc. Each library is written to a temporary file and renamed into place,
so an interrupted build never leaves a broken one behind.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCES = [Path(__file__).with_name(name)
           for name in ("onednn_conv.cc", "narrow_conv.cc", "paired_conv.cc", "norm_grad.cc")]
LIBRARY = Path(__file__).with_name("libpyconv_onednn.so")
BLOCK_CACHE_SOURCE = Path(__file__).with_name("block_cache.c")
BLOCK_CACHE = Path(__file__).with_name("libpyconv_block_cache.so")


class BuildError(RuntimeError):
    """The library cannot be built here; the message says why and what to do."""


def supported_platform() -> bool:
    """oneDNN's pip packages exist for Linux x86-64 only."""
    return sys.platform == "linux" and platform.machine() in ("x86_64", "AMD64")


def onednn_prefix() -> Path:
    """Where ``onednn-devel-cpu-gomp`` put ``include/dnnl.hpp`` and ``lib/libdnnl.so``."""
    prefix = Path(sys.prefix)
    if not (prefix / "include" / "dnnl.hpp").is_file() or not (prefix / "lib" / "libdnnl.so").exists():
        raise BuildError(
            f"oneDNN's headers or library are missing under {prefix}; install them with "
            "`pip install -c constraints.txt -e '.[onednn]'`.")
    return prefix


def compile_command(output: Path) -> list[str]:
    """The compiler invocation that builds ``output`` from :data:`SOURCES`."""
    import jax.ffi  # deferred: the build is the only part of this module that needs jax

    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise BuildError(f"C++ compiler {compiler!r} not found; install g++ or set $CXX.")
    lib = onednn_prefix() / "lib"
    return [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-w",
            f"-I{lib.parent / 'include'}", f"-I{jax.ffi.include_dir()}", *map(str, SOURCES),
            f"-L{lib}", "-ldnnl", f"-Wl,-rpath,{lib}", "-o", str(output)]


def block_cache_command(output: Path) -> list[str]:
    """The compiler invocation that builds the block cache ``output``."""
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        raise BuildError(f"C compiler {compiler!r} not found; install gcc or set $CC.")
    return [compiler, "-O2", "-std=gnu11", "-shared", "-fPIC", "-Wall", str(BLOCK_CACHE_SOURCE),
            "-ldl", "-lpthread", "-o", str(output)]


def _compile(command, sources: list[Path], output: Path) -> Path:
    """Runs ``command(tmp)`` and renames ``tmp`` to ``output`` only if it succeeded."""
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=output.parent)
    os.close(fd)
    try:
        result = subprocess.run(command(Path(tmp)), capture_output=True, text=True)
        if result.returncode != 0:
            names = ", ".join(source.name for source in sources)
            raise BuildError(f"compiling {names} failed:\n{result.stderr.strip()}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return output


def build(output: Path = LIBRARY) -> Path:
    """Compiles the oneDNN library into ``output``; raises :class:`BuildError` when it cannot."""
    if not supported_platform():
        raise BuildError(f"oneDNN's pip packages are for Linux x86-64, not {sys.platform} "
                         f"{platform.machine()}; CPU convs use the 'split' lowering instead.")
    return _compile(compile_command, SOURCES, output)


def build_block_cache(output: Path = BLOCK_CACHE) -> Path:
    """Compiles the block cache into ``output``; raises :class:`BuildError` when it cannot."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        raise BuildError(f"the block cache wraps glibc's allocator, which {sys.platform} "
                         "does not use; the scripts run without it.")
    return _compile(block_cache_command, [BLOCK_CACHE_SOURCE], output)


def main() -> int:
    failed = 0
    for step in (build, build_block_cache):
        try:
            print(f"built {step()}")
        except BuildError as error:
            print(f"pyconv_jax.native.build: {error}", file=sys.stderr)
            failed = 1
    return failed


if __name__ == "__main__":
    sys.exit(main())
