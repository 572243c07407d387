"""Host process settings that XLA:CPU runs faster with, applied by the scripts before JAX starts.

XLA:CPU allocates an executable's temporary buffer afresh on every call and frees it at the end:
1.5 GB for a PyConvResNet-50 train step at batch 16, 224x224. glibc maps an allocation that
large straight from the kernel and unmaps it when freed, so every step faults in and zeroes its
whole working memory again, and in a VM that reports freed memory to its host those faults go to
the host as well (docs/benchmarks.md). Two settings deal with that:

- the block cache (``native/block_cache.c``, preloaded with ``LD_PRELOAD``) keeps freed blocks of
  32 MiB and more mapped and hands them out again, so a step reuses the last step's memory: on 2
  cores the train step took 1.75 s instead of 2.39 s (PyTorch's, in the same process, 2.06 s
  instead of 2.22 s);
- glibc's ``glibc.malloc.hugetlb=1`` tunable puts what glibc still maps on transparent huge pages,
  50 times fewer faults (the step took 3.25 s instead of 3.57 s before the block cache).

Both are read only when a process starts, so :func:`reexec_with_host_settings` restarts the
interpreter in place (same process id, same arguments) with them set. Processes started from it
inherit them.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path

from pyconv_jax.native import build  # the standard library only: safe before JAX starts

TUNABLE = "glibc.malloc.hugetlb"

#: Set this environment variable (to anything) to run without the huge-page tunable.
OPT_OUT = "PYCONV_JAX_NO_HUGE_PAGES"

#: Set this environment variable (to anything) to run without the block cache.
BLOCK_CACHE_OPT_OUT = "PYCONV_JAX_NO_BLOCK_CACHE"

#: The block cache library that ``python -m pyconv_jax.native.build`` compiles (``make`` does).
BLOCK_CACHE = build.BLOCK_CACHE

#: The first glibc with the ``glibc.malloc.hugetlb`` tunable.
MIN_GLIBC = (2, 35)

def _version(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(".")[:2])
    except ValueError:
        return ()


def _glibc(system: str, libc: tuple[str, str] | None) -> tuple[int, ...] | None:
    """glibc's version on Linux, else ``None``."""
    name, version = libc if libc is not None else platform.libc_ver()
    return _version(version) if system == "linux" and name == "glibc" else None


def huge_page_environment(environ: Mapping[str, str], system: str = sys.platform,
                          libc: tuple[str, str] | None = None) -> dict[str, str] | None:
    """The environment to restart with for huge pages, or ``None`` when there is nothing to change.

    Nothing changes off Linux and glibc 2.35+, when :data:`OPT_OUT` is set, or when
    ``GLIBC_TUNABLES`` already sets :data:`TUNABLE` (to any value: the user's choice stands, and
    a restarted process does not restart again). Other tunables are kept.
    """
    version = _glibc(system, libc)
    if version is None or version < MIN_GLIBC:
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if OPT_OUT in environ or any(t.split("=")[0] == TUNABLE for t in tunables.split(":")):
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, (tunables, f"{TUNABLE}=1")))}


def block_cache_environment(environ: Mapping[str, str], system: str = sys.platform,
                            libc: tuple[str, str] | None = None,
                            library: Path = BLOCK_CACHE) -> dict[str, str] | None:
    """The environment to restart with for the block cache, or ``None`` when there is nothing to
    change: off Linux with glibc, when the library is not built, when :data:`BLOCK_CACHE_OPT_OUT`
    is set, or when ``LD_PRELOAD`` is set already (another allocator, or this one: the user's
    choice stands, and a restarted process does not restart again)."""
    if (_glibc(system, libc) is None or not library.is_file() or BLOCK_CACHE_OPT_OUT in environ
            or environ.get("LD_PRELOAD")):
        return None
    return {**environ, "LD_PRELOAD": str(library)}


def host_environment(environ: Mapping[str, str], system: str = sys.platform,
                     libc: tuple[str, str] | None = None,
                     library: Path = BLOCK_CACHE) -> dict[str, str] | None:
    """``environ`` with every setting above that applies, or ``None`` when none changes it."""
    huge_pages = huge_page_environment(environ, system, libc)
    return block_cache_environment(huge_pages or environ, system, libc, library) or huge_pages


def reexec_with_host_settings() -> None:
    """Restarts this interpreter with the settings of :func:`host_environment`, unless it says
    there is nothing to change. Call it first thing in a script, before any output."""
    environ = host_environment(os.environ)
    if environ is None or not sys.executable:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, environ)
