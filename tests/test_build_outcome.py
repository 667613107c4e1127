"""The installed extension is the one the machine can build.

``tools/build_extension.py`` never fails an install: a CUDA compile that
fails is retried CPU-only and only recorded in ``ramda_kernels/_build_info.json``.
That keeps installs working, but it also let a CUDA link error pass every
test run unnoticed (the CUDA kernels are tested through the CUDA-on-CPU
stand-in, which does not link the extension). A skip for a reason the build
names (no nvcc, ``RAMDA_SKIP_CUDA_BUILD``, a CPU-only torch) is fine; a
failed compile or link is a bug in the sources.
"""

import json
import os

import pytest

INFO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    "ramda_kernels", "_build_info.json")


def _info():
    if not os.path.exists(INFO):
        pytest.skip("no build record (the extension was not built by setup.py here)")
    with open(INFO) as f:
        return json.load(f)


def test_the_cuda_build_did_not_fail():
    info = _info()
    skipped = info.get("cuda_skipped") or ""
    assert not skipped.startswith("CUDA compile failed"), skipped[-2000:]
    assert info.get("error") is None, info["error"]


def test_the_record_matches_the_loaded_extension():
    info = _info()
    from ramda_kernels.backends import _ext
    if _ext.EXT is None:
        pytest.skip(f"extension not importable: {_ext.unavailable_reason()}")
    assert _ext.with_cuda() == bool(info.get("with_cuda")), info
