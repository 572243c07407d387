"""Compiles the oneDNN convolution library that the ``onednn`` lowering calls.

``make`` runs ``python -m pyconv_jax.native.build`` after installing the Python packages. It
needs a C++17 compiler (``$CXX``, default ``g++``), JAX's FFI headers (shipped with jaxlib) and
oneDNN's headers and library, which the ``onednn`` extra installs into the environment's prefix
(Linux x86-64 only). The library is written to a temporary file and renamed into place, so an
interrupted build never leaves a broken one behind.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCES = [Path(__file__).with_name(name) for name in ("onednn_conv.cc", "narrow_conv.cc")]
LIBRARY = Path(__file__).with_name("libpyconv_onednn.so")


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


def build(output: Path = LIBRARY) -> Path:
    """Compiles the library into ``output``; raises :class:`BuildError` when it cannot."""
    if not supported_platform():
        raise BuildError(f"oneDNN's pip packages are for Linux x86-64, not {sys.platform} "
                         f"{platform.machine()}; CPU convs use the 'split' lowering instead.")
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=output.parent)
    os.close(fd)
    try:
        result = subprocess.run(compile_command(Path(tmp)), capture_output=True, text=True)
        if result.returncode != 0:
            names = ", ".join(source.name for source in SOURCES)
            raise BuildError(f"compiling {names} failed:\n{result.stderr.strip()}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return output


def main() -> int:
    try:
        print(f"built {build()}")
    except BuildError as error:
        print(f"pyconv_jax.native.build: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
