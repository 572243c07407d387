"""The block cache (``native/block_cache.c``): large blocks are reused after free without new page
faults, everything else is glibc's, and programs compute the same with it preloaded."""

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from pyconv_jax import host
from pyconv_jax.native import build

on_glibc = pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc",
                              reason="the block cache wraps glibc's allocator (Linux only)")

MIB = 1 << 20


def _run(code: str, **env) -> dict:
    """Runs ``code`` with the block cache preloaded; returns the JSON object it printed last."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PYCONV_BLOCK_CACHE")}
    environ.update(LD_PRELOAD=str(host.BLOCK_CACHE), **env)
    out = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], env=environ,
                         check=True, capture_output=True, text=True, timeout=120).stdout
    return json.loads(out.splitlines()[-1])


PRELUDE = f"""
import ctypes, json, resource
libc = ctypes.CDLL(None)  # the global namespace: the preloaded library's malloc comes first
for name, res, args in [("malloc", ctypes.c_void_p, [ctypes.c_size_t]),
                        ("free", None, [ctypes.c_void_p]),
                        ("realloc", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t]),
                        ("malloc_usable_size", ctypes.c_size_t, [ctypes.c_void_p]),
                        ("posix_memalign", ctypes.c_int,
                         [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_size_t])]:
    getattr(libc, name).restype = res
    getattr(libc, name).argtypes = args
cache = ctypes.CDLL({str(host.BLOCK_CACHE)!r})

def stats():
    out = (ctypes.c_uint64 * 3)()
    cache.PyconvBlockCacheStats(out)
    return dict(zip(("reused", "mapped", "unmapped"), map(int, out)))

def faults_touching(address, size):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ctypes.memset(address, 1, size)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
"""


def test_the_library_is_built_here():
    """On Linux with glibc `make` builds it; if it is missing the scripts lose it silently."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("not Linux with glibc")
    assert host.BLOCK_CACHE.is_file(), "run `python -m pyconv_jax.native.build`"
    assert host.BLOCK_CACHE == build.BLOCK_CACHE


@on_glibc
def test_a_freed_block_is_handed_out_again_without_page_faults():
    result = _run(f"""
        a = libc.malloc({64 * MIB})
        first = faults_touching(a, {64 * MIB})
        libc.free(a)
        b = libc.malloc({60 * MIB})  # within 4/5 of the block: the same one again
        again = faults_touching(b, {60 * MIB})
        print(json.dumps(dict(same=a == b, first=first, again=again, **stats())))
    """)
    assert result["same"] and result["again"] == 0 and result["first"] > 0
    assert (result["reused"], result["mapped"], result["unmapped"]) == (1, 1, 0)


@on_glibc
def test_small_requests_and_much_smaller_blocks_are_not_served_from_a_big_block():
    result = _run(f"""
        a = libc.malloc({64 * MIB}); libc.free(a)
        small = libc.malloc(4096); libc.free(small)  # glibc's
        b = libc.malloc({40 * MIB})  # under 4/5 of 64 MiB: a block of its own
        print(json.dumps(dict(same=a == b, **stats())))
    """)
    assert not result["same"] and (result["reused"], result["mapped"]) == (0, 2)


@on_glibc
def test_realloc_usable_size_and_alignment():
    result = _run(f"""
        p = libc.malloc(100)
        ctypes.memmove(p, b"0123456789", 10)
        big = libc.realloc(p, {48 * MIB})  # glibc's chunk moves into a block, contents kept
        kept = ctypes.string_at(big, 10) == b"0123456789"
        usable = libc.malloc_usable_size(big)
        same = libc.realloc(big, {40 * MIB}) == big  # shrinking within 4/5 stays in place
        small = libc.realloc(big, 10)  # back to glibc, contents kept
        back = ctypes.string_at(small, 10) == b"0123456789"
        libc.free(small)
        out = ctypes.c_void_p()
        rc = libc.posix_memalign(ctypes.byref(out), 64, {40 * MIB})
        aligned = out.value % 4096 == 0
        libc.free(out)
        print(json.dumps(dict(kept=kept, usable=usable, same=same, back=back, rc=rc,
                              aligned=aligned, **stats())))
    """)
    assert result["kept"] and result["back"] and result["same"]
    assert result["usable"] >= 48 * MIB and result["rc"] == 0 and result["aligned"]
    # The posix_memalign request reused the block freed by the shrinking realloc.
    assert (result["mapped"], result["reused"]) == (1, 1)


@on_glibc
def test_free_blocks_beyond_the_limit_are_unmapped():
    result = _run(f"""
        a = libc.malloc({64 * MIB}); libc.free(a)
        b = libc.malloc({64 * MIB})
        print(json.dumps(stats()))
    """, PYCONV_BLOCK_CACHE_MAX_FREE="0")
    assert (result["reused"], result["mapped"], result["unmapped"]) == (0, 2, 1)


@on_glibc
def test_jax_computes_the_same_with_the_cache(tmp_path):
    """A jitted computation whose temporary buffer the cache serves (> 32 MiB), run three times:
    the results equal those computed without the cache."""
    code = """
        import jax, jax.numpy as jnp, numpy as np
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.normal(size=(16, 128, 128, 64)), jnp.float32)
        w = jnp.asarray(rng.normal(size=(64, 64)) / 8, jnp.float32)

        def f(x, w):
            h = jnp.maximum(x @ w, 0)  # 64 MiB, written out: both sums below read it
            return jnp.sum(h @ w, axis=(1, 2)) + jnp.sum(h, axis=(1, 2))

        f = jax.jit(f)
        out = [np.asarray(f(x, w)).tolist() for _ in range(3)]
        temp = f.lower(x, w).compile().memory_analysis().temp_size_in_bytes
        print(json.dumps(dict(out=out, temp=temp, **stats())))
    """
    cached = _run(code)
    plain = _run(code, PYCONV_BLOCK_CACHE_MIN=str(1 << 62))  # the library loaded, never used
    assert cached["temp"] > 32 * MIB and cached["mapped"] >= 1 and cached["reused"] >= 2
    assert plain["mapped"] == 0
    assert cached["out"][0] == cached["out"][1] == cached["out"][2] == plain["out"][0]


@on_glibc
def test_fork_while_other_threads_allocate():
    """A child forked while other threads hold the cache's lock can still allocate: the lock is
    taken around fork() and released on both sides."""
    result = _run("""
        import os, threading
        stop = False

        def churn():
            while not stop:
                libc.free(libc.malloc(40 << 20))

        threads = [threading.Thread(target=churn) for _ in range(2)]
        for t in threads:
            t.start()
        codes = []
        for _ in range(50):
            pid = os.fork()
            if pid == 0:
                p = libc.malloc(40 << 20)
                ctypes.memset(p, 1, 40 << 20)
                os._exit(0)
            codes.append(os.waitpid(pid, 0)[1])
        stop = True
        for t in threads:
            t.join()
        print(json.dumps(dict(codes=sorted(set(codes)))))
    """)
    assert result["codes"] == [0]
