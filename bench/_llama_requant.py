"""The llama.cpp side of bench/quant_quality.py: an F32 copy of a GGUF, its llama.cpp requantizations, and
what each file stores, all cached under ~/.cache/wren/bench/ by the source file's size and mtime.

    python bench/_llama_requant.py quantize IN.gguf OUT.gguf Q4_K_M 2   # one requantization, 2 threads

The F32 copy keeps every metadata key of the source with its GGUF value type (general.file_type becomes
ALL_F32) and decodes every tensor with `gguf.quants.dequantize`, so it holds what the source holds,
stored the way llama.cpp expects (Gemma 3's norms as 1 + w): wren's in-model tensors are never written.
Each requantization runs in a child process, so a type that llama.cpp rejects (or aborts on) becomes an
error message in its row instead of the end of the benchmark.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

LLAMA_TYPES = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "IQ4_XS", "Q3_K_M", "Q2_K"]
EMBEDDINGS = ("token_embd.weight", "per_layer_token_embd.weight")
# llama.cpp's AMX matmul (ggml_backend_amx_mul_mat) dies with a segmentation fault on prompts of a few hundred
# tokens on an AMX Xeon (seen on this project's machines; upstream: ggml-org/llama.cpp#20824). A native
# build compiles it in wherever the CPU has AMX; undefining the compiler's __AMX_INT8__ leaves it out and
# keeps every other instruction set (.ci/run and the README build the peer so).
NO_AMX_CMAKE_ARGS = "-DCMAKE_C_FLAGS=-U__AMX_INT8__ -DCMAKE_CXX_FLAGS=-U__AMX_INT8__"


def unusable_build() -> str | None:
    """Why the installed llama-cpp-python cannot be run as the peer here, or None."""
    import llama_cpp

    if b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info():
        return ("this llama-cpp-python was built with llama.cpp's AMX matmul, which crashes on batched prompts: "
                f'rebuild it with CMAKE_ARGS="{NO_AMX_CMAKE_ARGS}" pip install --no-cache-dir --force-reinstall '
                "--no-deps llama-cpp-python")
    return None


def check_build() -> None:
    why = unusable_build()
    if why:
        raise RuntimeError(why)


def cache_dir(source: Path) -> Path:
    st = source.stat()
    root = Path(os.environ.get("WREN_CACHE", Path.home() / ".cache" / "wren")) / "bench"
    return root / f"{source.stem}-{st.st_size}-{st.st_mtime_ns}"


def f32_gguf(source: Path, log) -> Path:
    """The F32 copy of `source`, written once."""
    out = cache_dir(source) / "reference-F32.gguf"
    if out.exists():
        return out
    import gguf
    import numpy as np

    out.parent.mkdir(parents=True, exist_ok=True)
    log(f"writing the F32 reference GGUF {out} (once)")
    reader = gguf.GGUFReader(str(source))
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    tmp = out.with_suffix(".partial")
    writer = gguf.GGUFWriter(str(tmp), arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue  # the header counts and the architecture are the writer's own
        vtype = field.types[0]
        if name == "general.file_type":
            writer.add_key_value(name, int(gguf.LlamaFileType.ALL_F32), vtype)
        elif vtype == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(name, field.contents(), vtype, sub_type=field.types[-1])
        else:
            writer.add_key_value(name, field.contents(), vtype)
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        want = tuple(int(d) for d in reversed(t.shape))  # GGUF lists ne0 (the contiguous dim) first
        if data.shape != want:
            data = data.reshape(want)
        writer.add_tensor(t.name, np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out)
    return out


def requantized(f32: Path, qtype: str, threads: int, log) -> tuple[Path | None, str | None]:
    """(path, None) for llama.cpp's `qtype` requantization of the F32 file, or (None, why it failed)."""
    out = f32.parent / f"{qtype}.gguf"
    failed = out.with_suffix(".failed")
    if out.exists():
        return out, None
    if failed.exists():
        return None, failed.read_text()
    log(f"llama.cpp quantize -> {qtype} (once)")
    tmp = out.with_suffix(".partial")
    proc = subprocess.run([sys.executable, __file__, "quantize", str(f32), str(tmp), qtype, str(threads)],
                          capture_output=True, text=True)
    if proc.returncode == 0 and tmp.exists():
        os.replace(tmp, out)
        return out, None
    tmp.unlink(missing_ok=True)
    lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
    why = next((ln for ln in reversed(lines) if "error" in ln.lower() or "fail" in ln.lower()),
               lines[-1] if lines else f"exit status {proc.returncode}")
    why = f"{why[:200]} (exit status {proc.returncode})"
    failed.write_text(why)  # a rerun reports it again without retrying; delete the file to retry
    return None, why


def stats(path: Path) -> dict:
    """Tensor types, bytes and parameter counts of a GGUF (gguf's reader is slow on a 262k vocabulary, so
    the answer is kept next to the file)."""
    side = path.with_name(path.name + ".stats.json")
    st = path.stat()
    key = f"{st.st_size}:{st.st_mtime_ns}"
    if side.exists():
        cached = json.loads(side.read_text())
        if cached.get("key") == key:
            return cached
    import gguf

    reader = gguf.GGUFReader(str(path))
    types: dict[str, int] = {}
    linear_bytes = linear_params = params = 0
    for t in reader.tensors:
        n = math.prod(int(d) for d in t.shape)
        params += n
        name = t.tensor_type.name
        if len(t.shape) == 2 and t.name not in EMBEDDINGS:
            linear_bytes += int(t.n_bytes)
            linear_params += n
            types[name] = types.get(name, 0) + 1
    embed = next((t.tensor_type.name for t in reader.tensors if t.name == "token_embd.weight"), None)
    out = {"key": key, "params": params, "file_bytes": st.st_size, "linear_params": linear_params,
           "linear_bits": 8 * linear_bytes / max(1, linear_params), "linear_types": types, "embed_type": embed}
    side.write_text(json.dumps(out))
    return out


def _quantize_child(src: str, dst: str, qtype: str, threads: int) -> int:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}")
    params.nthread = threads
    if hasattr(params, "token_embedding_type"):  # the token embedding (= the tied LM head) at Q8_0, like wren's
        params.token_embedding_type = llama_cpp.GGML_TYPE_Q8_0
    return llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "quantize":
        rc = _quantize_child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
        if rc:
            print(f"error: llama_model_quantize returned {rc}", file=sys.stderr)
        sys.exit(1 if rc else 0)
    sys.exit(__doc__)
