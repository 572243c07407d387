"""The restart with transparent huge pages: when it applies, and that it takes effect."""

import os
import subprocess
import sys

import pytest

from pyconv_jax import host

GLIBC = ("glibc", "2.36")


def test_sets_the_tunable_on_linux_with_glibc():
    env = host.huge_page_environment({"PATH": "/bin"}, "linux", GLIBC)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


def test_keeps_other_tunables():
    env = host.huge_page_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "linux",
                                     GLIBC)
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


@pytest.mark.parametrize("environ,system,libc", [
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "linux", GLIBC),  # the user's choice stands
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, "linux", GLIBC),  # already restarted
    ({host.OPT_OUT: "1"}, "linux", GLIBC),
    ({}, "darwin", ("", "")),
    ({}, "linux", ("glibc", "2.34")),  # before the tunable existed
    ({}, "linux", ("", "")),  # musl
])
def test_nothing_to_change(environ, system, libc):
    assert host.huge_page_environment(environ, system, libc) is None


PROBE = """
import os, resource
from pyconv_jax import host
print("started", flush=True)
host.reexec_with_huge_pages()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
buffer = bytearray(256 << 20)  # 256 MiB from malloc, zeroed page by page
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(os.getpid(), os.environ.get("GLIBC_TUNABLES"), faults)
"""


def _run_probe(**env):
    """``(lines printed, the child's pid, its GLIBC_TUNABLES, page faults of 256 MiB)``."""
    environ = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host.OPT_OUT)}
    child = subprocess.Popen([sys.executable, "-c", PROBE], env={**environ, **env},
                             stdout=subprocess.PIPE, text=True)
    lines = child.communicate()[0].splitlines()
    assert child.returncode == 0
    pid, tunables, faults = lines[-1].split()
    return lines, int(pid) == child.pid, tunables, int(faults)


def _huge_pages_available():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


needs_glibc = pytest.mark.skipif(host.huge_page_environment({}) is None,
                                 reason="needs Linux with glibc 2.35 or later")


@needs_glibc
def test_restart_happens_once_in_the_same_process():
    lines, same_process, tunables, _ = _run_probe()
    assert tunables == "glibc.malloc.hugetlb=1"
    # Started twice (before and after the restart), in the process its parent started.
    assert lines[:2] == ["started", "started"] and same_process
    lines, same_process, tunables, _ = _run_probe(**{host.OPT_OUT: "1"})
    assert tunables == "None" and lines[:1] == ["started"] and lines[1] != "started"


@needs_glibc
@pytest.mark.skipif(not _huge_pages_available(),
                    reason="transparent huge pages are off in this kernel ([never])")
def test_restart_cuts_page_faults():
    faults = _run_probe()[3]
    plain_faults = _run_probe(**{host.OPT_OUT: "1"})[3]
    assert plain_faults > 60_000 and faults < plain_faults // 10  # 65,536 4 KiB pages, or 128 2 MiB


def test_the_restart_comes_before_jax_is_imported():
    """``pyconv_jax`` loads its public names lazily, so the restart does not import JAX twice."""
    code = "import sys, pyconv_jax.host; print(sorted({'jax', 'flax'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout
    assert out.strip() == "[]"
    code = "from pyconv_jax import list_models; print(len(list_models()) > 0)"
    assert subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                          text=True).stdout.strip() == "True"
