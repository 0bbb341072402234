"""Read GGUF files: a bounds-checked parser of our own (gguf's reader takes 18 s on a 262k vocabulary and
trusts every count), llama.cpp tensor names mapped to wren's, and metadata turned into a config dict.

Every count, length and offset is checked against the bytes left in the file before it is used, so a hostile
file raises ModelFormatError instead of allocating gigabytes or reading past the end.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import reprlib
import struct
from pathlib import Path

import numpy as np

from ..errors import ModelFormatError, ModelNotFoundError, UnsupportedModelError
from .gguf_quants import dequantize, tensor_nbytes

MAGIC = b"GGUF"
# value type id -> (struct format, size) for scalars; 8 = string, 9 = array
SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
           7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
         12: "<f8"}
MAX_DIMS = 8


class GGUFTensorInfo:
    __slots__ = ("name", "shape", "ggml_type", "offset", "nbytes")

    def __init__(self, name, shape, ggml_type, offset, nbytes):
        self.name, self.shape, self.ggml_type, self.offset, self.nbytes = name, shape, ggml_type, offset, nbytes


class _Cursor:
    def __init__(self, buf, path):
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)

    def need(self, n: int, what: str):
        if n < 0 or self.pos + n > self.size:
            raise ModelFormatError(f"{self.path}: file ends inside {what} (truncated or corrupt)")

    def scalar(self, fmt: str, size: int, what: str):
        self.need(size, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def u64(self, what: str) -> int:
        return self.scalar("<Q", 8, what)

    def string(self, what: str) -> str:
        n = self.u64(what)
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, what: str):
        if vtype in SCALARS:
            return self.scalar(*SCALARS[vtype], what)
        if vtype == 8:
            return self.string(what)
        if vtype == 9:
            etype = self.scalar("<I", 4, what)
            count = self.u64(what)
            if etype in NUMPY:
                width = np.dtype(NUMPY[etype]).itemsize
                self.need(count * width, what)
                arr = np.frombuffer(self.buf, dtype=NUMPY[etype], count=count, offset=self.pos).copy()
                self.pos += count * width
                return arr.astype(bool) if etype == 7 else arr
            if etype == 8:
                # Each string needs at least its 8-byte length: bounds the count before any allocation.
                self.need(count * 8, what)
                return [self.string(what) for _ in range(count)]
            raise ModelFormatError(f"{self.path}: {what} is an array of unsupported type {etype}")
        raise ModelFormatError(f"{self.path}: {what} has unknown value type {vtype}")


class GGUFFile:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                if os.fstat(f.fileno()).st_size < 24:
                    raise ModelFormatError(f"{self.path} is too short to be a GGUF file (truncated?)")
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise ModelNotFoundError(f"{self.path} does not exist") from None
        except IsADirectoryError:
            raise ModelFormatError(f"{self.path} is a directory, not a GGUF file") from None
        except OSError as exc:
            raise ModelNotFoundError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        cur = _Cursor(self._map, self.path)
        if self._map[:4] != MAGIC:
            raise ModelFormatError(f"{self.path} is not a GGUF file (bad magic bytes)")
        cur.pos = 4
        version = cur.scalar("<I", 4, "the header")
        if version not in (2, 3):
            raise UnsupportedModelError(f"{self.path}: GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_kv = cur.u64("the header"), cur.u64("the header")
        # Each key/value takes >= 12 bytes and each tensor info >= 24: bounds the counts by the file size.
        if n_kv * 12 > cur.size or n_tensors * 24 > cur.size:
            raise ModelFormatError(f"{self.path}: header declares {n_kv} keys and {n_tensors} tensors, "
                                   "more than the file can hold (corrupt)")
        self.metadata: dict = {}
        for _ in range(n_kv):
            key = cur.string("a metadata key")
            vtype = cur.scalar("<I", 4, f"metadata {key!r}")
            self.metadata[key] = cur.value(vtype, f"metadata {key!r}")
        infos = []
        for _ in range(n_tensors):
            name = cur.string("a tensor name")
            n_dims = cur.scalar("<I", 4, f"tensor {name!r}")
            if not 0 < n_dims <= MAX_DIMS:
                raise ModelFormatError(f"{self.path}: tensor {name!r} has {n_dims} dimensions")
            dims = [cur.u64(f"tensor {name!r}") for _ in range(n_dims)]
            ggml_type = cur.scalar("<I", 4, f"tensor {name!r}")
            offset = cur.u64(f"tensor {name!r}")
            if any(d <= 0 or d > 1 << 40 for d in dims) or math.prod(dims) > 1 << 40:
                raise ModelFormatError(f"{self.path}: tensor {name!r} has an absurd shape {dims}")
            infos.append((name, tuple(reversed(dims)), ggml_type, offset))
        alignment = self.metadata.get("general.alignment", 32)
        if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
            raise ModelFormatError(f"{self.path}: general.alignment {alignment!r} is not a power of two")
        self.data_start = -(-cur.pos // alignment) * alignment
        self.tensors: dict[str, GGUFTensorInfo] = {}
        for name, shape, ggml_type, offset in infos:
            nbytes = tensor_nbytes(ggml_type, shape)
            if self.data_start + offset + nbytes > cur.size:
                raise ModelFormatError(f"{self.path}: tensor {name!r} lies past the end of the file "
                                       "(truncated or corrupt)")
            if name in self.tensors:
                raise ModelFormatError(f"{self.path}: tensor {name!r} is listed twice (corrupt)")
            self.tensors[name] = GGUFTensorInfo(name, shape, ggml_type, self.data_start + offset, nbytes)
        # Tensors sharing bytes would let a small file pose as a huge model (every layer dequantized from
        # the same bytes); with no overlap, what is decoded stays proportional to the file's size.
        spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in self.tensors.values())
        for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
            if start < end:
                raise ModelFormatError(f"{self.path}: tensors {a!r} and {b!r} overlap (corrupt)")

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 view of the mapped file."""
        info = self.tensors[name]
        return np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=info.offset)

    def release(self, name: str) -> None:
        """Take the tensor's pages out of this process's resident memory once its bytes have been read into
        a copy (dequantized, converted): they stay in the page cache, and a later read maps them again."""
        info = self.tensors[name]
        start = info.offset - info.offset % mmap.PAGESIZE
        try:
            self._map.madvise(mmap.MADV_DONTNEED, start, info.offset + info.nbytes - start)
        except (AttributeError, OSError, ValueError):  # no madvise here: the pages just stay
            pass

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise ModelFormatError(f"{self.path}: metadata has no general.architecture")
        return arch


# llama.cpp tensor names -> wren's (= Hugging Face's without the `model.` prefix).
_GLOBAL = {
    "token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight", "output.weight": "lm_head.weight",
    "per_layer_token_embd.weight": "embed_tokens_per_layer",
    "per_layer_model_proj.weight": "per_layer_model_projection.weight",
    "per_layer_proj_norm.weight": "per_layer_projection_norm.weight",
}
_BLOCK = {
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_norm.weight": "input_layernorm.weight", "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight", "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "pre_ffw_norm_2.weight": "pre_feedforward_layernorm_2.weight",
    "post_ffw_norm_1.weight": "post_feedforward_layernorm_1.weight",
    "post_ffw_norm_2.weight": "post_feedforward_layernorm_2.weight",
    "layer_output_scale.weight": "layer_scalar",
    "inp_gate.weight": "per_layer_input_gate.weight", "proj.weight": "per_layer_projection.weight",
    "post_norm.weight": "post_per_layer_input_norm.weight",
    "ffn_gate_inp.weight": "router.proj.weight", "ffn_gate_inp.scale": "router.scale",
    "ffn_down_exps.scale": "router.per_expert_scale",
    "ffn_gate_up_exps.weight": "experts.gate_up_proj", "ffn_down_exps.weight": "experts.down_proj",
}
_BLK = re.compile(r"blk\.(\d+)\.(.+)")


def wren_name(gguf_name: str) -> str | None:
    """The wren parameter name for a llama.cpp tensor name, or None for tensors wren derives itself."""
    if gguf_name in _GLOBAL:
        return _GLOBAL[gguf_name]
    m = _BLK.fullmatch(gguf_name)
    if m and m.group(2) in _BLOCK:
        return f"layers.{m.group(1)}.{_BLOCK[m.group(2)]}"
    return None


def _count(v) -> bool:
    return type(v) is int and v >= 0


# What a metadata value must be; config_dict's values reach model code that trusts their types.
COUNT, SIZE, COUNTS, NUMBER = "a count", "a positive count", "a count or a list of counts", "a number"
_KINDS = {
    COUNT: _count,
    SIZE: lambda v: _count(v) and v > 0,
    COUNTS: lambda v: _count(v) or (isinstance(v, list) and all(map(_count, v))),
    NUMBER: lambda v: type(v) in (int, float),
}


def _get(meta: dict, key: str, default=None, required: bool = False, kind: str | None = None):
    if key not in meta:
        if required:
            raise ModelFormatError(f"GGUF metadata lacks {key!r}")
        return default
    value = meta[key]
    value = value.tolist() if isinstance(value, np.ndarray) else value
    if kind and not _KINDS[kind](value):
        raise ModelFormatError(f"GGUF metadata {key} = {reprlib.repr(value)} is not {kind} (corrupt file?)")
    return value


def config_dict(gf: GGUFFile) -> dict:
    """An HF-style config dict from GGUF metadata (and tensor shapes where the metadata is silent)."""
    arch = gf.architecture
    if arch not in ("gemma3", "gemma4"):
        raise UnsupportedModelError(f"{gf.path}: GGUF architecture {arch!r} is not supported; "
                                    "wren runs gemma3 and gemma4")
    m, a = gf.metadata, arch
    if "token_embd.weight" not in gf.tensors:
        raise ModelFormatError(f"{gf.path}: no token_embd.weight tensor")
    d = {
        "model_type": arch,
        "vocab_size": gf.tensors["token_embd.weight"].shape[0],
        "hidden_size": _get(m, f"{a}.embedding_length", required=True, kind=SIZE),
        "num_hidden_layers": _get(m, f"{a}.block_count", required=True, kind=SIZE),
        "num_attention_heads": _get(m, f"{a}.attention.head_count", required=True, kind=SIZE),
        "max_position_embeddings": _get(m, f"{a}.context_length", 8192, kind=SIZE),
        "rms_norm_eps": _get(m, f"{a}.attention.layer_norm_rms_epsilon", 1e-6, kind=NUMBER),
        "sliding_window": _get(m, f"{a}.attention.sliding_window", 512, kind=SIZE),
        "final_logit_softcapping": _get(m, f"{a}.final_logit_softcapping", kind=NUMBER),
        "tie_word_embeddings": "output.weight" not in gf.tensors,
        "bos_token_id": _get(m, "tokenizer.ggml.bos_token_id", 2, kind=COUNT),
        "eos_token_id": _get(m, "tokenizer.ggml.eos_token_id", 1, kind=COUNT),
        "pad_token_id": _get(m, "tokenizer.ggml.padding_token_id", 0, kind=COUNT),
    }
    per_layer = COUNT if arch == "gemma3" else COUNTS
    ff = _get(m, f"{a}.feed_forward_length", required=True, kind=per_layer)
    kv = _get(m, f"{a}.attention.head_count_kv", 1, kind=per_layer)
    n = d["num_hidden_layers"]
    if arch == "gemma3":
        head_dim = _get(m, f"{a}.attention.key_length", 256, kind=SIZE)
        d.update(intermediate_size=ff, num_key_value_heads=kv, head_dim=head_dim,
                 rope_theta=_get(m, f"{a}.rope.freq_base", 1e6, kind=NUMBER),
                 # llama.cpp hard-codes the local base, and the query scale except for the 62-layer 27B.
                 rope_local_base_freq=10_000.0,
                 query_pre_attn_scalar=d["hidden_size"] // d["num_attention_heads"] if n == 62 else head_dim)
        if _get(m, f"{a}.rope.scaling.type") == "linear":
            d["rope_scaling"] = {"factor": _get(m, f"{a}.rope.scaling.factor", 1.0, kind=NUMBER)}
        return d
    return _gemma4_dict(gf, d, ff, kv)


def _gemma4_dict(gf: GGUFFile, d: dict, ff, kv) -> dict:
    m, a, n = gf.metadata, "gemma4", d["num_hidden_layers"]
    swa = _get(m, f"{a}.attention.sliding_window_pattern", required=True)
    if not isinstance(swa, list) or len(swa) != n:
        raise ModelFormatError(f"{gf.path}: sliding_window_pattern must list one flag per layer")
    kinds = ["sliding_attention" if s else "full_attention" for s in swa]
    shared = _get(m, f"{a}.attention.shared_kv_layers", 0, kind=COUNT)
    ffs = ff if isinstance(ff, list) else [ff] * n
    kvs = kv if isinstance(kv, list) else [kv] * n
    if len(ffs) != n or len(kvs) != n:
        raise ModelFormatError(f"{gf.path}: per-layer arrays must have {n} entries")
    full = [i for i, k in enumerate(kinds) if k == "full_attention"]
    if not full:
        raise ModelFormatError(f"{gf.path}: sliding_window_pattern marks no layer as full attention (corrupt)")
    slide = [i for i, k in enumerate(kinds) if k == "sliding_attention"] or full
    global_dim = _get(m, f"{a}.attention.key_length", 512, kind=SIZE)
    # rope_freqs holds 1 for each rotated frequency of the full layers and 1e30 for the rest.
    factor = 1.0
    if "rope_freqs.weight" in gf.tensors:
        info = gf.tensors["rope_freqs.weight"]
        freqs = dequantize(gf.raw(info.name), info.ggml_type, info.shape).reshape(-1)
        if freqs.numel() > global_dim // 2:
            raise ModelFormatError(f"{gf.path}: rope_freqs has {freqs.numel()} entries, more than the "
                                   f"{global_dim // 2} frequencies of a {global_dim}-wide head")
        factor = float((freqs < 1e3).sum() * 2) / global_dim
    k_eq_v = any(f"blk.{i}.attn_v.weight" not in gf.tensors and f"blk.{i}.attn_k.weight" in gf.tensors
                 for i in full)
    d.update(
        layer_types=kinds, intermediate_size=ffs[0], use_double_wide_mlp=ffs[-1] == 2 * ffs[0] and shared > 0,
        num_key_value_heads=kvs[slide[0]], num_global_key_value_heads=kvs[full[0]],
        head_dim=_get(m, f"{a}.attention.key_length_swa", 256, kind=SIZE), global_head_dim=global_dim,
        num_kv_shared_layers=shared, attention_k_eq_v=k_eq_v,
        hidden_size_per_layer_input=_get(m, f"{a}.embedding_length_per_layer_input", 0, kind=COUNT),
        rope_parameters={
            "sliding_attention": {"rope_type": "default",
                                  "rope_theta": _get(m, f"{a}.rope.freq_base_swa", 1e4, kind=NUMBER)},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": factor,
                               "rope_theta": _get(m, f"{a}.rope.freq_base", 1e6, kind=NUMBER)}},
    )
    if not k_eq_v and kvs[full[0]] != kvs[slide[0]]:
        d["per_layer_config"] = {str(i): {"head_dim": global_dim, "num_key_value_heads": kvs[i]} for i in full}
    if "per_layer_token_embd.weight" in gf.tensors:
        d["vocab_size_per_layer_input"] = gf.tensors["per_layer_token_embd.weight"].shape[0]
    if _get(m, f"{a}.expert_count", kind=COUNT):
        d.update(enable_moe_block=True, num_experts=_get(m, f"{a}.expert_count"),
                 top_k_experts=_get(m, f"{a}.expert_used_count", required=True, kind=COUNT),
                 moe_intermediate_size=_get(m, f"{a}.expert_feed_forward_length", required=True, kind=COUNT))
    return d


def tokenizer_metadata(gf: GGUFFile) -> dict:
    return {k: v for k, v in gf.metadata.items() if k.startswith("tokenizer.")}
