"""Host process settings that XLA:CPU runs faster with, applied by the scripts before JAX starts.

XLA:CPU allocates an executable's temporary buffer afresh on every call: 2.5 GB for a
PyConvResNet-50 train step at batch 16, 224x224. glibc maps an allocation that large straight
from the kernel and unmaps it when freed, so every step faults in 640,000 zeroed 4 KiB pages,
about a second of CPU time (docs/benchmarks.md). With glibc's ``glibc.malloc.hugetlb=1`` tunable
those mappings use transparent huge pages, 50 times fewer faults: on 2 cores the step took
3.25 s instead of 3.57 s (means of five runs). glibc reads its tunables only when a process
starts, so :func:`reexec_with_huge_pages` restarts the interpreter in place (same process id,
same arguments) with the tunable set.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb"

#: Set this environment variable (to anything) to run without the restart.
OPT_OUT = "PYCONV_JAX_NO_HUGE_PAGES"

#: The first glibc with the ``glibc.malloc.hugetlb`` tunable.
MIN_GLIBC = (2, 35)

def _version(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(".")[:2])
    except ValueError:
        return ()


def huge_page_environment(environ: Mapping[str, str], system: str = sys.platform,
                          libc: tuple[str, str] | None = None) -> dict[str, str] | None:
    """The environment to restart with, or ``None`` when there is nothing to change.

    Nothing changes off Linux and glibc 2.35+, when :data:`OPT_OUT` is set, or when
    ``GLIBC_TUNABLES`` already sets :data:`TUNABLE` (to any value: the user's choice stands, and
    a restarted process does not restart again). Other tunables are kept.
    """
    name, version = libc if libc is not None else platform.libc_ver()
    if system != "linux" or name != "glibc" or _version(version) < MIN_GLIBC:
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if OPT_OUT in environ or any(t.split("=")[0] == TUNABLE for t in tunables.split(":")):
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, (tunables, f"{TUNABLE}=1")))}


def reexec_with_huge_pages() -> None:
    """Restarts this interpreter with :data:`TUNABLE` set, unless :func:`huge_page_environment`
    says there is nothing to change. Call it first thing in a script, before any output."""
    environ = huge_page_environment(os.environ)
    if environ is None or not sys.executable:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, environ)
