"""LoRA training speed and memory: wren on a dense base, wren on a TurboQuant 4-bit base, and Hugging Face
PEFT on `transformers`, on the same model, the same token batches and the same LoRA settings.

    python bench/finetune.py                       # default model, 1 thread, 4 timed steps of 2 x 256 tokens
    python bench/finetune.py --threads 2 --steps 8 --batch 4 --seq 512 --rank 16
    python bench/finetune.py --engines wren-tq4,peft --json
    python bench/finetune.py --make-data DIR       # the chats as DIR/train.jsonl + DIR/eval.jsonl (held out)
    python bench/finetune.py --score MODEL --data DIR/eval.jsonl    # greedy replies vs the answers

The data: chats built from Pride and Prejudice (a paragraph with a line of dialogue -> who said it),
packed into rows of --seq tokens; the loss is on the replies only (PEFT gets -100 labels elsewhere).
The PEFT peer is `Gemma3ForCausalLM` built from wren's dense weights of the same GGUF (logit parity is
checked first), fp32, SDPA attention, `peft.get_peft_model` with the same rank, alpha, targets and init
seed, AdamW at the same learning rate. Each engine runs in its own child process, so its peak RSS is its
own (VmHWM; "(loaded)" is the peak once the model is loaded and wrapped); one warm-up step is not
timed. tokens/s counts every token of the batch (prompt and reply).
Gradient checkpointing is on for every engine (PEFT: `gradient_checkpointing_enable`), as QLoRA-style
training on a small machine runs; --no-grad-checkpointing compares without it.
Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _peak import peak_rss_mb  # noqa: E402

TEXT = REPO.parent / "shared" / "data" / "prideprejudice.txt"
CACHE = Path(os.environ.get("WREN_CACHE", Path.home() / ".cache" / "wren")) / "bench" / "finetune"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SAID = re.compile(r'[,!?]" (?:said|cried|replied) '
                  r'((?:Mr\.|Mrs\.|Miss|Lady|Sir|Colonel|Captain) [A-Z][a-z]+|[A-Z][a-z]+)\b')
NOT_NAMES = {"Then", "She", "He", "It", "They", "Her", "His"}


def speaker_chats(text: str) -> list[dict]:
    """Paragraphs with `"...," said Name` -> a chat asking who speaks, answered with the name alone."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(para.split())
        m = SAID.search(para)
        if m and 60 <= len(para) <= 600 and m.group(1) not in NOT_NAMES:
            out.append({"messages": [{"role": "user", "content": f"Who is speaking in this passage?\n\n{para}"},
                                     {"role": "assistant", "content": m.group(1)}]})
    return out


def token_rows(seq: int, n_rows: int) -> list[tuple[list[int], list[bool]]]:
    import wren
    from wren.finetune import data as D

    model = wren.load()
    template = D.training_template(model)
    examples = [D.encode(c, model.tokenizer, template, "bench") for c in speaker_chats(TEXT.read_text())]
    rows = [r for r in D.pack(examples, seq) if len(r.ids) >= seq * 3 // 4]
    rows = [(r.ids + [0] * (seq - len(r.ids)), r.mask + [False] * (seq - len(r.mask))) for r in rows[:n_rows]]
    if len(rows) < n_rows:
        raise SystemExit(f"only {len(rows)} rows of {seq} tokens in the data")
    return rows


def prepare_tq4() -> Path:
    folder = CACHE / "tq4"
    if not (folder / "model.safetensors").exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "wren", "quantize", "--bits", "4", "-o", str(folder), "--quiet"],
                       check=True, cwd=REPO)
    return folder


def hf_config(cfg):
    from transformers import Gemma3TextConfig

    n, every = cfg.num_hidden_layers, cfg.sliding_window_pattern
    types = ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n)]
    return Gemma3TextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=n, num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim, query_pre_attn_scalar=cfg.query_pre_attn_scalar, sliding_window=cfg.sliding_window,
        layer_types=types, rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.max_position_embeddings,
        final_logit_softcapping=cfg.final_logit_softcapping, attn_logit_softcapping=cfg.attn_logit_softcapping,
        tie_word_embeddings=True, attn_implementation="sdpa",
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_local_base_freq},
                         "full_attention": {"rope_type": "default", "rope_theta": cfg.rope_theta}})


def hf_peer():
    """transformers' Gemma 3 holding wren's dense weights of the default GGUF."""
    import torch
    from transformers import Gemma3ForCausalLM

    import wren

    dense = wren.load()
    with torch.device("meta"):
        hf = Gemma3ForCausalLM(hf_config(dense.config))
    state = {f"model.{k}": v for k, v in dense.state_dict().items()}
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    hf.load_state_dict(state, strict=False, assign=True)
    hf.model.rotary_emb.__init__(hf.config)  # RoPE buffers and the embedding scale were on the meta device
    hf.model.embed_tokens.embed_scale = torch.tensor(hf.config.hidden_size ** 0.5)
    for name, buf in hf.named_buffers():
        if buf.is_meta:
            raise SystemExit(f"HF peer buffer {name} was not initialised")
    hf.tie_weights()
    return hf.eval(), dense


# --- children -------------------------------------------------------------------------------------------


def child(engine: str, rows_file: str, args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    rows = json.loads(Path(rows_file).read_text())
    ids = torch.tensor([r[0] for r in rows])
    mask = torch.tensor([r[1] for r in rows])
    targets = torch.roll(ids, -1, 1)
    tmask = torch.roll(mask, -1, 1)
    tmask[:, -1] = False
    t_load = time.perf_counter()
    if engine == "peft":
        step, params = peft_step(args, ids, targets, tmask)
    else:
        step, params = wren_step(engine, args, ids, targets, tmask)
    load_s = time.perf_counter() - t_load
    load_peak = peak_rss_mb()
    opt = torch.optim.AdamW(params, lr=1e-4)
    b = args.batch
    batches = [slice(i, i + b) for i in range(0, len(rows), b)]
    losses, times = [], []
    for k, sl in enumerate(batches):
        t0 = time.perf_counter()
        loss = step(sl)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss)
    timed = times[1:]  # the first step warms up
    tokens = b * ids.shape[1] * len(timed)
    out = {"engine": engine, "tokens_per_s": tokens / sum(timed), "step_s": sum(timed) / len(timed),
           "first_loss": losses[0], "last_loss": losses[-1], "load_s": load_s,
           "peak_rss_mb": peak_rss_mb(), "load_peak_rss_mb": load_peak}
    print(json.dumps(out), flush=True)


def wren_step(engine: str, args, ids, targets, tmask):
    import torch

    import wren
    from wren.finetune import lora
    from wren.finetune.loss import causal_lm_loss, checkpoint_layers

    model = wren.load(CACHE / "tq4" if engine == "wren-tq4" else None)
    torch.manual_seed(0)
    lora.inject(model, args.rank, 2 * args.rank, 0.0, TARGETS)
    checkpoint_layers(model, args.grad_checkpointing)
    model.train()

    def step(sl):
        n = int(tmask[sl].sum())
        loss, _ = causal_lm_loss(model, ids[sl], targets[sl], tmask[sl])
        (loss / n).backward()
        return loss.item() / n

    return step, list(lora.lora_state(model).values())


def peft_step(args, ids, targets, tmask):
    import torch
    from peft import LoraConfig, get_peft_model

    hf, _ = hf_peer()
    torch.manual_seed(0)
    model = get_peft_model(hf, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                          target_modules=TARGETS))
    if args.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    labels = torch.where(torch.roll(tmask, 1, 1), ids, torch.full_like(ids, -100))

    def step(sl):
        loss = model(input_ids=ids[sl], labels=labels[sl]).loss  # mean over the reply tokens
        loss.backward()
        return loss.item()

    return step, [p for p in model.parameters() if p.requires_grad]


def parity() -> float:
    """Max |logit difference| of the HF peer and wren's dense model on a few tokens (sanity check)."""
    import torch

    hf, dense = hf_peer()
    ids = torch.tensor([[2, 818, 5279, 529, 1926, 563, 496, 9043, 236761]])
    with torch.no_grad():
        return (hf(ids).logits - dense(ids)).abs().max().item()


# --- the real-data fine-tune demo ---------------------------------------------------------------------


def make_data(folder: Path, held_out: int = 40) -> None:
    """Every 5th chat (up to `held_out`) goes to eval.jsonl, the rest to train.jsonl."""
    chats = speaker_chats(TEXT.read_text())
    held = [c for i, c in enumerate(chats) if i % 5 == 0][:held_out]
    train = [c for c in chats if c not in held]
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("eval.jsonl", held)):
        (folder / name).write_text("".join(json.dumps(c) + "\n" for c in rows))
    print(f"{len(train)} training and {len(held)} held-out chats in {folder}")


def score(model_name: str, data: Path, show: int = 5) -> None:
    """Greedy replies to the held-out prompts: exact match with the answer, and how often the answer
    appears in the reply at all."""
    import wren

    model = wren.load(model_name if model_name != "default" else None)
    chats = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    exact = contains = 0
    for i, c in enumerate(chats):
        want = c["messages"][-1]["content"]
        got = wren.generate(model, c["messages"][:-1], temperature=0, num_predict=16).strip()
        exact += got == want
        contains += want in got
        if i < show:
            print(f"  want {want!r:<18} got {got[:70]!r}")
    print(f"{model_name}: exact match {exact}/{len(chats)} = {exact / len(chats):.0%}, "
          f"answer in reply {contains}/{len(chats)} = {contains / len(chats):.0%}")


# --- main -----------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=4, help="timed optimizer steps (plus one warm-up)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--no-grad-checkpointing", dest="grad_checkpointing", action="store_false",
                   help="keep every activation (all engines)")
    p.add_argument("--engines", default="wren-dense,wren-tq4,peft")
    p.add_argument("--json", action="store_true")
    p.add_argument("--make-data", default=None, metavar="DIR")
    p.add_argument("--score", default=None, metavar="MODEL")
    p.add_argument("--data", default=None)
    p.add_argument("--child", default=None)
    p.add_argument("--rows-file", default=None)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.rows_file, args)
    if args.make_data:
        return make_data(Path(args.make_data))
    if args.score:
        return score(args.score, Path(args.data))
    import torch

    torch.set_num_threads(args.threads)
    engines = args.engines.split(",")
    if "wren-tq4" in engines:
        prepare_tq4()
    rows = token_rows(args.seq, args.batch * (args.steps + 1))
    diff = parity() if "peft" in engines else None
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        rows_file = Path(tmp) / "rows.json"
        rows_file.write_text(json.dumps(rows))
        for engine in engines:
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            cmd = [sys.executable, __file__, "--child", engine, "--rows-file", str(rows_file),
                   "--threads", str(args.threads), "--batch", str(args.batch), "--rank", str(args.rank)]
            cmd += [] if args.grad_checkpointing else ["--no-grad-checkpointing"]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode or not lines:
                results.append({"engine": engine, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1]})
            else:
                results.append(json.loads(lines[-1]))
    report = {"machine": platform.processor() or platform.machine(), "threads": args.threads, "seq": args.seq,
              "batch": args.batch, "steps": args.steps, "rank": args.rank,
              "grad_checkpointing": args.grad_checkpointing,
              "hf_parity_max_abs_logit_diff": diff, "results": results}
    if args.json:
        print(json.dumps(report))
        return
    print(f"LoRA r={args.rank} alpha={2 * args.rank} on {', '.join(TARGETS)}; batch {args.batch} x {args.seq} tokens, "
          f"{args.steps} timed steps, {args.threads} thread(s), grad checkpointing "
          f"{'on' if args.grad_checkpointing else 'off'}")
    if diff is not None:
        print(f"HF peer vs wren dense: max |logit diff| {diff:.2e}")
    peft = next((r for r in results if r["engine"] == "peft" and "error" not in r), None)
    print(f"{'engine':<12}{'tokens/s':>10}{'step s':>9}{'peak RSS MiB':>14}{'(loaded)':>10}{'vs PEFT tok/s':>15}"
          f"{'vs PEFT mem':>13}{'loss first→last':>20}")
    for r in results:
        if "error" in r:
            print(f"{r['engine']:<12} error: {r['error']}")
            continue
        speed = f"{r['tokens_per_s'] / peft['tokens_per_s']:.2f}x" if peft else "-"
        mem = f"{r['peak_rss_mb'] / peft['peak_rss_mb']:.2f}x" if peft else "-"
        print(f"{r['engine']:<12}{r['tokens_per_s']:>10.1f}{r['step_s']:>9.2f}{r['peak_rss_mb']:>14.0f}"
              f"{r['load_peak_rss_mb']:>10.0f}{speed:>15}{mem:>13}{r['first_loss']:>11.3f}→{r['last_loss']:.3f}")


if __name__ == "__main__":
    main()
