"""Kernel sources compiled for the host: a CUDA kernel's per-thread C++ (its ``FASTSIAM_DEVICE``
functions) built with the host's C++ compiler into a shared library the tests call through
ctypes, so the GPU's arithmetic is checked on the CPU."""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import pytest


def host_library(tmp_path_factory: pytest.TempPathFactory, name: str, source: str) -> ctypes.CDLL:
    """``source`` (host loops around the kernel functions) compiled with -O2 and loaded; the
    test is skipped on a machine without a C++ compiler."""
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler on this machine (scripts/setup.sh installs g++)")
    d = tmp_path_factory.mktemp(name)
    src, lib = d / f"{name}.cpp", d / f"{name}.so"
    src.write_text(source)
    subprocess.run([cxx, "-O2", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True,
                   capture_output=True, text=True)
    return ctypes.CDLL(str(lib))
