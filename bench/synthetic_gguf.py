"""A Gemma-3-1B-shaped GGUF with random weights, quantized by llama.cpp: a model larger than the default one,
to measure what `--low-memory` changes where the linear layers, not the LM head, hold most of the weights.

    python bench/synthetic_gguf.py                   # prints the path of the Q4_K_M file (made once, cached)
    python bench/decode.py --model "$(python bench/synthetic_gguf.py)" --wren gguf,gguf-blocks --kv f16 \
        --llama Q4_K_M --prompt-tokens 32,512 --decode-tokens 64 --repeat 1
    python bench/synthetic_gguf.py --shape e2b-width --type Q3_K_M    # Q3_K where Q4_K_M has Q4_K
    python bench/synthetic_gguf.py --shape e2b-width --vocab 262144   # Gemma's vocabulary, its tied head Q6_K

The shape gemma3-1b is Gemma 3 1B's (26 layers, hidden 1152, MLP 6912, 4 heads of 256, one KV head) but for
the vocabulary: the test suite's 384-token one (tests/gguf_writer.py), so the tied embedding is small and the
~700M weights are the layers'. llama.cpp's Q4_K_M gives them Q4_K/Q6_K where their width is a multiple of
256 (the MLP's down projection) and Q5_0/Q8_0 where it is not (1152 wide), as for the real model.
e2b-width is Gemma 4 E2B's width (hidden 1536, MLP 6144, 8 heads of 256, one KV head) in 18 Gemma 3 layers
(~640M weights): every row a multiple of 256, so each K-quant type (Q2_K ... Q6_K) takes what its name says.
--vocab N gives the model Gemma's own vocabulary size (262144) or another: a tied embedding, the LM head,
written as token_embd only, as real Gemma files have it (the 384-token files keep the writer's separate head).
Written to $WREN_CACHE/bench (default ~/.cache/wren/bench): ~2.8 GB of F32 on the way, the quantized file kept.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _llama_requant  # noqa: E402


SHAPES = {
    "gemma3-1b": dict(hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4),
    "e2b-width": dict(hidden_size=1536, intermediate_size=6144, num_hidden_layers=18, num_attention_heads=8),
}


def main() -> None:
    import argparse
    import os

    from gguf_writer import write_gguf  # noqa: E402  (tests/: the suite's GGUF writer)
    from tiny_models import randomize_  # noqa: E402
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="gemma3-1b")
    ap.add_argument("--type", default="Q4_K_M", help="llama.cpp's type for the file (Q4_K_M, Q3_K_M, Q2_K, ...)")
    ap.add_argument("--vocab", type=int, default=384, help="vocabulary size (other than 384: a tied head)")
    args = ap.parse_args()
    folder = f"synthetic-{args.shape}" + (f"-vocab{args.vocab}" if args.vocab != 384 else "")
    root = Path(os.environ.get("WREN_CACHE", Path.home() / ".cache" / "wren")) / "bench" / folder
    f32 = root / "reference-F32.gguf"
    if not f32.exists():
        print("writing the F32 model (once)", file=sys.stderr)
        cfg = Gemma3TextConfig(vocab_size=args.vocab, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                               sliding_window=512, max_position_embeddings=32768, attn_implementation="eager",
                               **SHAPES[args.shape])
        model = Gemma3ForCausalLM(cfg).eval()
        randomize_(model, seed=0)
        root.mkdir(parents=True, exist_ok=True)
        tmp = f32.with_suffix(".tmp")
        write_gguf(model, tmp, "gemma3", tied=args.vocab != 384)
        os.replace(tmp, f32)
    path, why = _llama_requant.requantized(f32, args.type, 2, lambda msg: print(msg, file=sys.stderr))
    if path is None:
        raise SystemExit(f"llama.cpp could not quantize it: {why}")
    print(path)


if __name__ == "__main__":
    main()
