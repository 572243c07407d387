"""The restart with the host settings (huge pages, the block cache): when each applies, and that
it takes effect."""

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


def test_preloads_the_block_cache(tmp_path):
    library = tmp_path / "libcache.so"
    library.write_bytes(b"")
    env = host.block_cache_environment({"PATH": "/bin"}, "linux", GLIBC, library)
    assert env == {"PATH": "/bin", "LD_PRELOAD": str(library)}
    both = host.host_environment({"PATH": "/bin"}, "linux", GLIBC, library)
    assert both == {"PATH": "/bin", "LD_PRELOAD": str(library),
                    "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    # Either alone when the other does not apply.
    assert host.host_environment({host.OPT_OUT: "1"}, "linux", GLIBC, library) == {
        host.OPT_OUT: "1", "LD_PRELOAD": str(library)}
    assert host.host_environment({}, "linux", GLIBC, tmp_path / "missing.so") == {
        "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


@pytest.mark.parametrize("environ,system,libc,exists", [
    ({"LD_PRELOAD": "/usr/lib/libjemalloc.so"}, "linux", GLIBC, True),  # the user's allocator
    ({host.BLOCK_CACHE_OPT_OUT: "1"}, "linux", GLIBC, True),
    ({}, "linux", GLIBC, False),  # not built
    ({}, "darwin", ("", ""), True),
    ({}, "linux", ("", ""), True),  # musl: it wraps glibc's allocator
])
def test_no_block_cache(tmp_path, environ, system, libc, exists):
    library = tmp_path / "libcache.so"
    if exists:
        library.write_bytes(b"")
    assert host.block_cache_environment(environ, system, libc, library) is None


PROBE = """
import os, resource
from pyconv_jax import host
print("started", flush=True)
host.reexec_with_host_settings()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
buffer = bytearray(256 << 20)  # 256 MiB from malloc, zeroed page by page
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(os.getpid(), os.environ.get("GLIBC_TUNABLES"), os.environ.get("LD_PRELOAD"), faults)
"""

SETTINGS = ("GLIBC_TUNABLES", "LD_PRELOAD", host.OPT_OUT, host.BLOCK_CACHE_OPT_OUT)


def _run_probe(**env):
    """``(lines printed, the child's pid, its GLIBC_TUNABLES, its LD_PRELOAD, page faults of
    256 MiB)``."""
    environ = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    child = subprocess.Popen([sys.executable, "-c", PROBE], env={**environ, **env},
                             stdout=subprocess.PIPE, text=True)
    lines = child.communicate()[0].splitlines()
    assert child.returncode == 0
    pid, tunables, preload, faults = lines[-1].split()
    return lines, int(pid) == child.pid, tunables, preload, int(faults)


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
    lines, same_process, tunables, preload, _ = _run_probe()
    assert tunables == "glibc.malloc.hugetlb=1"
    assert preload == (str(host.BLOCK_CACHE) if host.BLOCK_CACHE.is_file() else "None")
    # Started twice (before and after the restart), in the process its parent started.
    assert lines[:2] == ["started", "started"] and same_process
    opt_out = {host.OPT_OUT: "1", host.BLOCK_CACHE_OPT_OUT: "1"}
    lines, same_process, tunables, preload, _ = _run_probe(**opt_out)
    assert (tunables, preload) == ("None", "None")
    assert lines[:1] == ["started"] and lines[1] != "started"


@needs_glibc
@pytest.mark.skipif(not _huge_pages_available(),
                    reason="transparent huge pages are off in this kernel ([never])")
@pytest.mark.parametrize("setting", [host.BLOCK_CACHE_OPT_OUT, host.OPT_OUT])
def test_restart_cuts_page_faults(setting):
    """Either setting alone puts a 256 MiB allocation on huge pages: the tunable through glibc,
    the block cache (where built) through its own mappings."""
    if setting == host.OPT_OUT and not host.BLOCK_CACHE.is_file():
        pytest.skip("the block cache is not built")
    faults = _run_probe(**{setting: "1"})[4]
    plain_faults = _run_probe(**{host.OPT_OUT: "1", host.BLOCK_CACHE_OPT_OUT: "1"})[4]
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
