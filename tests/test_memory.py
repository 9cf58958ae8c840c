"""Freed memory kept in the heap while a pipeline stage runs (backends/cpu/memory.py).

What a user depends on: inside a stage, a large buffer freed and allocated again costs no fresh page
faults (the stages' temporaries are reused, not mapped anew); after the stage, the process behaves as
before; a user's own MALLOC_* settings are left alone. Each case runs in a child process, whose page
faults are its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mobileo_mlx.backends.cpu import memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux only")

CHILD = r"""
import ctypes, json, resource, sys
import mobileo_mlx
from mobileo_mlx import backends

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
SIZE = 64 << 20

def faults_of_a_fresh_buffer():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(SIZE)
    libc.memset(p, 1, SIZE)
    libc.free(p)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

result = {"available": __import__("mobileo_mlx.backends.cpu.memory", fromlist=["x"]).available()}
with backends.stage():
    faults_of_a_fresh_buffer()
    result["inside"] = faults_of_a_fresh_buffer()
faults_of_a_fresh_buffer()
result["after"] = faults_of_a_fresh_buffer()
with backends.stage(0, keep_heap=False):  # as with --low-memory: nothing kept
    faults_of_a_fresh_buffer()
    result["low_memory"] = faults_of_a_fresh_buffer()
with backends.session():  # a picture's stages: what one frees, the next one reuses
    with backends.stage():
        faults_of_a_fresh_buffer()
    with backends.stage():
        result["next_stage"] = faults_of_a_fresh_buffer()
faults_of_a_fresh_buffer()
result["after_session"] = faults_of_a_fresh_buffer()
with backends.session(keep_heap=False):  # --low-memory: each stage gives its memory back
    with backends.stage():
        faults_of_a_fresh_buffer()
    faults_of_a_fresh_buffer()
    result["between_low_memory_stages"] = faults_of_a_fresh_buffer()
print(json.dumps(result))
"""

PAGES = (64 << 20) // 4096


def run_child(**env) -> dict:
    environment = {k: v for k, v in os.environ.items() if k not in memory.USER_SETTINGS}
    environment.update(env)
    out = subprocess.run([sys.executable, "-c", CHILD], env=environment, capture_output=True, text=True,
                         timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_stage_reuses_freed_memory_without_fresh_page_faults():
    result = run_child()
    if not result["available"]:
        pytest.skip("not glibc: malloc's thresholds cannot be set here")
    assert result["inside"] < PAGES // 10  # the freed buffer came back from the heap
    assert result["after"] > PAGES // 2  # afterwards: mapped afresh, as glibc does by default
    assert result["low_memory"] > PAGES // 2


def test_a_pictures_stages_in_one_session_reuse_each_others_freed_memory():
    result = run_child()
    if not result["available"]:
        pytest.skip("not glibc: malloc's thresholds cannot be set here")
    assert result["next_stage"] < PAGES // 10  # not given back at the first stage's end
    assert result["after_session"] > PAGES // 2  # given back when the session ends
    assert result["between_low_memory_stages"] > PAGES // 2


def test_the_users_own_malloc_settings_win():
    result = run_child(MALLOC_TRIM_THRESHOLD_="131072")
    assert result["available"] is False
    assert result["inside"] > PAGES // 2  # untouched: the user's glibc settings decide
