"""PEP 517 build backend: setuptools' own, plus the llmc C++/CUDA extension as ``llmcompress.kernels._C``.

pyproject.toml names this module (``backend-path = ["llmcompress/kernels"]``) so the project needs no
top-level setup.py. The extension is built with torch's BuildExtension against the torch already installed
(``pip install --no-build-isolation``); CUDA sources join when torch has CUDA and nvcc is found
(TORCH_CUDA_ARCH_LIST picks the architectures). Without an importable torch, or with LLMC_NO_EXT=1, the
package installs without it and the kernels JIT-build on first use (see build.py).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (every PEP 517 hook; the ones below replace theirs)

_HERE = Path(__file__).resolve().parent


def _build_module():
    # build.py shares the source lists and flags with the JIT path; load it by file so that importing it does
    # not import the llmcompress package (whose import would itself try to load the extension).
    spec = importlib.util.spec_from_file_location("_llmc_kernels_build", _HERE / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def extension_kwargs() -> dict:
    if os.environ.get("LLMC_NO_EXT"):
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("llmcompress: torch is not importable at build time (use --no-build-isolation); "
              "the kernels will be JIT-built on first use", file=sys.stderr)
        return {}
    build = _build_module()
    root = Path.cwd()
    rel = lambda paths: [os.path.relpath(p, root) for p in paths]  # noqa: E731  (setuptools wants relative)
    if build.want_cuda():
        ext = CUDAExtension("llmcompress.kernels._C", rel(build.cpu_sources() + build.cuda_sources()),
                            extra_compile_args={"cxx": build.CXX_FLAGS, "nvcc": build.nvcc_flags()},
                            extra_link_args=build.LD_FLAGS)
    else:
        ext = CppExtension("llmcompress.kernels._C", rel(build.cpu_sources()),
                           extra_compile_args={"cxx": build.CXX_FLAGS}, extra_link_args=build.LD_FLAGS)
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


class _Backend(_setuptools._BuildMetaBackend):
    def run_setup(self, setup_script: str = "setup.py") -> None:
        from setuptools import setup

        setup(**extension_kwargs())


_BACKEND = _Backend()
get_requires_for_build_wheel = _BACKEND.get_requires_for_build_wheel
get_requires_for_build_sdist = _BACKEND.get_requires_for_build_sdist
prepare_metadata_for_build_wheel = _BACKEND.prepare_metadata_for_build_wheel
build_wheel = _BACKEND.build_wheel
build_sdist = _BACKEND.build_sdist
get_requires_for_build_editable = _BACKEND.get_requires_for_build_editable
prepare_metadata_for_build_editable = _BACKEND.prepare_metadata_for_build_editable
build_editable = _BACKEND.build_editable
