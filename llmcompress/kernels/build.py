"""Find the compiled llmc extension, or build it just in time, or fall back to the reference.

Order: the extension built ahead of time by ``pip install -e .`` (``llmcompress.kernels._C``); else a JIT
build with ``torch.utils.cpp_extension.load`` cached under ``$LLMC_CACHE`` (default
``~/.cache/llmcompress``); else, when no compiler or ninja is found or the build fails, the pure-torch
reference with one warning. ``LLMC_KERNELS=reference`` skips the extension altogether.

The same source lists and flags serve the ahead-of-time build (``build_backend.py``), so both builds agree.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import torch

CSRC = Path(__file__).parent / "csrc"
# -fopenmp: at::parallel_for is a header template that only runs threads when compiled with OpenMP.
CXX_FLAGS = ["-O3", "-fopenmp"]
LD_FLAGS = ["-fopenmp"]
# Division and rounding must stay IEEE-exact (the quantizer matches torch bit for bit), so no fast math.
NVCC_FLAGS = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]


def cpu_sources() -> list[str]:
    return sorted(str(p) for p in (CSRC / "cpu").glob("*.cpp"))


def cuda_sources() -> list[str]:
    return sorted(str(p) for p in (CSRC / "cuda").glob("*.cu"))


def want_cuda() -> bool:
    """Build the CUDA part when torch has CUDA and nvcc is found (``LLMC_NO_CUDA=1`` opts out)."""
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None and not os.environ.get("LLMC_NO_CUDA")


def cutlass_include() -> str | None:
    """CUTLASS headers for the Hopper W8A8 GEMM ($LLMC_CUTLASS_DIR, else <checkout>/.cutlass/include, e.g. from
    the nvidia-cutlass wheel's cutlass_library/source/include); used only when building for sm_90a."""
    path = os.environ.get("LLMC_CUTLASS_DIR") or str(Path(__file__).resolve().parents[2] / ".cutlass" / "include")
    wants_sm90a = "9.0a" in os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    return path if wants_sm90a and (Path(path) / "cutlass" / "cutlass.h").exists() else None


def default_hopper_arch() -> None:
    """With TORCH_CUDA_ARCH_LIST unset, torch builds for the visible GPUs as plain sm_90, which lacks wgmma: on a
    Hopper machine ask for 9.0a instead, so the CUTLASS W8A8 and the wgmma W4A16 kernels are built."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST") is not None:
        return
    try:
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    except Exception:  # no driver at build time: leave torch's default
        return
    if (9, 0) in caps:
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(sorted(f"{a}.{b}" for a, b in caps if (a, b) != (9, 0)) + ["9.0a"])


def nvcc_flags() -> list[str]:
    """LLMC_SM90A: the build has sm_90a code, so the host may launch the wgmma kernels (on a 9.x device)."""
    default_hopper_arch()
    include = cutlass_include()
    sm90a = ["-DLLMC_SM90A"] if "9.0a" in os.environ.get("TORCH_CUDA_ARCH_LIST", "") else []
    if not include:
        return NVCC_FLAGS + sm90a
    # cutlass/util/*.hpp (packed_stride) live in tools/util/include beside include/ in a CUTLASS source tree and
    # in the nvidia-cutlass wheel's cutlass_library/source
    util = Path(include).parent / "tools" / "util" / "include"
    return NVCC_FLAGS + sm90a + ["-DLLMC_WITH_CUTLASS", f"-I{include}"] + ([f"-I{util}"] if util.is_dir() else [])


def cache_dir() -> Path:
    root = Path(os.environ.get("LLMC_CACHE", Path.home() / ".cache" / "llmcompress"))
    tag = f"torch{torch.__version__.replace('+', '_')}-cuda{torch.version.cuda or 'none'}"
    path = root / "kernels" / tag
    path.mkdir(parents=True, exist_ok=True)
    return path


def _served() -> frozenset[str]:
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return frozenset(d for d, key in (("cpu", "CPU"), ("cuda", "CUDA")) if has("llmc::w8a8_mm", key))


def _fallback(reason: str) -> frozenset[str]:
    warnings.warn(f"llmcompress: compiled int8/int4 kernels unavailable ({reason}); using the slow pure-torch "
                  "reference. Install a C++ compiler and ninja, or `pip install --no-build-isolation -e .`.",
                  RuntimeWarning, stacklevel=3)
    return frozenset()


def load_extension() -> frozenset[str]:
    """Load the llmc ops; return the device types ("cpu", "cuda") that compiled kernels serve."""
    if os.environ.get("LLMC_KERNELS") == "reference":
        return frozenset()
    try:
        from llmcompress.kernels import _C  # noqa: F401  (registers torch.ops.llmc.*)

        return _served()
    except ImportError:
        pass
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return _fallback("no C++ compiler found")
    if shutil.which("ninja") is None:
        return _fallback("ninja not found")
    from torch.utils.cpp_extension import load

    cuda = want_cuda()
    try:
        load(name="llmc_kernels", sources=cpu_sources() + (cuda_sources() if cuda else []),
             extra_cflags=CXX_FLAGS, extra_cuda_cflags=nvcc_flags(), extra_ldflags=LD_FLAGS, build_directory=str(cache_dir()),
             with_cuda=cuda, is_python_module=False, verbose=bool(os.environ.get("LLMC_VERBOSE_BUILD")))
    except Exception as e:  # a broken toolchain must not break the package: the reference still works
        return _fallback(f"JIT build failed: {str(e).strip().splitlines()[-1] if str(e).strip() else e!r}")
    return _served()
