"""The optional compiled parts: the CPU kernels (wren/_native.c) and the BPE merge loop (wren/_bpe.c);
everything else is in pyproject.toml.

`optional=True`: without a C compiler the build warns and goes on, and wren runs on PyTorch's kernels and the
`tokenizers` library."""

import platform
import sys

from setuptools import Extension, setup

openmp = [] if sys.platform in ("win32", "darwin") else ["-fopenmp"]  # MSVC and Apple clang spell it otherwise


def avx2_kernels() -> list[Extension]:
    """The same kernels built for x86-64 CPUs with AVX2 but no AVX-512 (wren/_native_avx2.c), their AVX-512
    intrinsics through SIMDe's headers (the simde-py build requirement)."""
    if sys.platform == "win32" or platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    try:
        import simde_py
    except ImportError:
        return []
    return [Extension("wren._native_avx2", ["wren/_native_avx2.c"],
                      depends=["wren/_native.c", "wren/_gguf_blocks.h", "wren/_avx2_compat.h"], optional=True,
                      include_dirs=[simde_py.get_include()],
                      # (no FMA contraction of the plain C: it rounds as the default build does)
                      extra_compile_args=["-O3", "-mavx2", "-mfma", "-mf16c", "-mbmi2", "-ffp-contract=off",
                                          "-Wno-psabi", *openmp],
                      extra_link_args=openmp)]


setup(ext_modules=[Extension("wren._native", ["wren/_native.c"], depends=["wren/_gguf_blocks.h"], optional=True,
                             extra_compile_args=["-O3", *openmp], extra_link_args=openmp),
                   *avx2_kernels(),
                   Extension("wren._bpe", ["wren/_bpe.c"], optional=True, extra_compile_args=["-O2"])])
