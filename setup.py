"""The optional compiled parts: the CPU kernels (wren/_native.c) and the BPE merge loop (wren/_bpe.c);
everything else is in pyproject.toml.

`optional=True`: without a C compiler the build warns and goes on, and wren runs on PyTorch's kernels and the
`tokenizers` library."""

import sys

from setuptools import Extension, setup

openmp = [] if sys.platform in ("win32", "darwin") else ["-fopenmp"]  # MSVC and Apple clang spell it otherwise
setup(ext_modules=[Extension("wren._native", ["wren/_native.c"], depends=["wren/_gguf_blocks.h"], optional=True,
                             extra_compile_args=["-O3", *openmp], extra_link_args=openmp),
                   Extension("wren._bpe", ["wren/_bpe.c"], optional=True, extra_compile_args=["-O2"])])
