"""What ``setup.py`` builds besides pure Python: the ``ramda_kernels._C`` extension.

``extensions()`` describes ``ramda_kernels._C`` (C++ always, CUDA when nvcc and
a CUDA build of torch are present); ``cmdclass()`` supplies a ``build_ext`` that
compiles it with ninja and never fails the install: if the CUDA build fails
it retries CPU-only, and if that fails too it warns and installs the pure
Python package (the ``cpu``/``cuda`` backends then report why they are
unavailable). The outcome is written to ``ramda_kernels/_build_info.json``.

Knobs (environment variables, shared with CMakeLists.txt):

``RAMDA_SKIP_CUDA_BUILD=1``  build the CPU extension only.
``RAMDA_CUDA_ARCHS``         CUDA architectures, ``;`` or ``,`` separated
                             (default ``80;90``: sm_80 and sm_90 code plus
                             compute_90 PTX for newer GPUs).
``RAMDA_SKIP_BUILD=1``       compile nothing (pure-Python install).
``MAX_JOBS``                 parallel compile jobs (read by torch's ninja build).

``CUDA_HOME`` defaults to ``/usr/local/cuda`` when it holds nvcc, and the CUDA
headers/libraries that pip's ``nvidia-*-cu13`` wheels install next to torch
(``site-packages/nvidia/cu13``) are added to the compiler's paths when present.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys
import sysconfig
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
BUILD_INFO = os.path.join(ROOT, "ramda_kernels", "_build_info.json")
DEFAULT_CUDA_ARCHS = "80;90"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _nvidia_wheel_dirs():
    """include/lib of the nvidia/cu13 (or cu12) wheels installed beside torch, if any."""
    purelib = sysconfig.get_paths()["purelib"]
    for sub in ("cu13", "cu12"):
        base = os.path.join(purelib, "nvidia", sub)
        inc, lib = os.path.join(base, "include"), os.path.join(base, "lib")
        if os.path.isdir(inc):
            return inc, (lib if os.path.isdir(lib) else None)
    return None, None


def _setup_cuda_env() -> None:
    """Point torch's extension builder at a CUDA toolkit before it is imported."""
    if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"


def _cuda_archs():
    raw = os.environ.get("RAMDA_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
    archs = [a.strip().replace(".", "") for a in raw.replace(",", ";").split(";") if a.strip()]
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    if archs:
        top = max(archs, key=lambda a: int("".join(ch for ch in a if ch.isdigit())))
        flags.append(f"-gencode=arch=compute_{top},code=compute_{top}")
    return flags


def _sources(with_cuda: bool):
    srcs = [os.path.join("csrc", "bindings.cpp")] + sorted(
        os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    if with_cuda:
        srcs += sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
        srcs += sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(CSRC, "cuda", "*.cpp")))
    return srcs


# -ffp-contract=off: round every product like the reference's eager torch ops
# do, so the CPU path's rounding errors track the reference's.
CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math",
             "-ffp-contract=off"]
# No --use_fast_math: the solver needs IEEE-rounded division and square root
# and no flush-to-zero (docs/math.md section 9); these are nvcc's defaults,
# spelled out so that no later flag turns them off. Same as CMakeLists.txt.
NVCC_FLAGS = ["-O3", "-lineinfo", "--ftz=false", "--prec-div=true", "--prec-sqrt=true"]


def _openmp_flags():
    """-fopenmp where torch's own thread pool is OpenMP (Linux wheels).

    at::parallel_for is a header template: compiled without -fopenmp, its
    `#pragma omp parallel` is dropped and the CPU kernels run on one thread
    whatever torch.set_num_threads says. Linking -fopenmp resolves to the
    libgomp.so.1 torch has already loaded (same soname), so there is one
    OpenMP runtime and one thread pool in the process.
    """
    import torch

    if not sys.platform.startswith("linux"):
        return []
    if "OpenMP" not in torch.__config__.parallel_info().split("ATen parallel backend:")[-1].splitlines()[0]:
        return []
    return ["-fopenmp"]


def _make_extension(with_cuda: bool):
    from torch.utils import cpp_extension

    include_dirs = [CSRC]
    library_dirs = []
    omp = _openmp_flags()
    inc, lib = _nvidia_wheel_dirs()
    if with_cuda and inc:
        include_dirs.append(inc)
        if lib:
            library_dirs.append(lib)
    if with_cuda:
        nvcc = ["-std=c++20"] + NVCC_FLAGS + _cuda_archs()
        if inc:
            nvcc.append(f"-I{inc}")
        return cpp_extension.CUDAExtension(
            "ramda_kernels._C", _sources(True), include_dirs=include_dirs,
            library_dirs=library_dirs, define_macros=[("RAMDA_WITH_CUDA", None)],
            extra_compile_args={"cxx": CXX_FLAGS + omp, "nvcc": nvcc}, extra_link_args=omp)
    return cpp_extension.CppExtension(
        "ramda_kernels._C", _sources(False), include_dirs=include_dirs,
        extra_compile_args={"cxx": CXX_FLAGS + omp}, extra_link_args=omp)


def _want_cuda():
    """(build CUDA?, reason if not)."""
    if _flag("RAMDA_SKIP_CUDA_BUILD"):
        return False, "RAMDA_SKIP_CUDA_BUILD is set"
    import torch
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        return False, "torch is not a CUDA build"
    if cpp_extension.CUDA_HOME is None or not shutil.which(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")):
        return False, "nvcc not found (set CUDA_HOME)"
    return True, None


def extensions():
    """The extension modules for ``setup(ext_modules=...)`` (empty when torch is missing)."""
    if _flag("RAMDA_SKIP_BUILD"):
        return []
    _setup_cuda_env()
    try:
        with_cuda, _ = _want_cuda()
        return [_make_extension(with_cuda)]
    except ImportError as e:  # no torch at build time: pure-Python install
        print(f"warning: ramda_kernels._C is not built: {e}", file=sys.stderr)
        return []


def _write_info(info) -> None:
    try:
        with open(BUILD_INFO, "w") as f:
            json.dump(info, f, indent=2)
            f.write("\n")
    except OSError:
        pass


def cmdclass():
    """``build_ext`` that falls back to CPU-only, then to no extension, instead of failing."""
    if _flag("RAMDA_SKIP_BUILD"):
        return {}
    _setup_cuda_env()
    try:
        from torch.utils.cpp_extension import BuildExtension
    except ImportError:
        return {}

    class BuildRamdaExtension(BuildExtension):
        failed = ()

        def build_extensions(self):
            super().build_extensions()
            # An extension that could not be built is left out of the install
            # (and of the in-place copy of an editable install).
            self.extensions = [e for e in self.extensions if e.name not in self.failed]

        def build_extension(self, ext):
            if ext.name != "ramda_kernels._C":
                return super().build_extension(ext)
            with_cuda, why_not = _want_cuda()
            info = {"with_cuda": False, "cuda_skipped": why_not, "error": None}
            if with_cuda:
                try:
                    super().build_extension(ext)
                    _write_info({"with_cuda": True, "cuda_skipped": None, "error": None})
                    return
                except Exception:
                    err = traceback.format_exc(limit=3)
                    print("warning: building ramda_kernels._C with CUDA failed; retrying CPU-only:\n"
                          + err, file=sys.stderr)
                    info["cuda_skipped"] = "CUDA compile failed: " + err.strip().splitlines()[-1]
                # Same extension without the .cu sources, the CUDA macro and libraries
                # (the cxx flags keep what BuildExtension added, e.g. the module name).
                cpu = _make_extension(False)
                ext.sources = cpu.sources
                ext.extra_compile_args = {"cxx": ext.extra_compile_args["cxx"]}
                ext.define_macros = [m for m in ext.define_macros if m[0] != "RAMDA_WITH_CUDA"]
                ext.libraries = cpu.libraries
                ext.library_dirs = cpu.library_dirs
            try:
                super().build_extension(ext)
            except Exception:
                err = traceback.format_exc(limit=3)
                print("warning: ramda_kernels._C could not be built; installing without it "
                      "(backends 'cpu' and 'cuda' will be unavailable):\n" + err, file=sys.stderr)
                info["error"] = err.strip().splitlines()[-1]
                self.failed = (*self.failed, ext.name)
            _write_info(info)

    return {"build_ext": BuildRamdaExtension.with_options(use_ninja=True)}
