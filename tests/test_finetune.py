"""LoRA fine-tuning: data and loss masks, the loss without full logits, the frozen TurboQuant base, real
learning on a tiny model, PEFT interop both ways, exact resume, Ctrl-C, and the CLI (finetune, store, merge)."""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import zlib

import pytest
import torch

import wren
from gguf_writer import save_hf
from tiny_models import gemma3_hf, gemma4_hf
from wren.errors import BadOptionError, ModelFormatError, ModelNotFoundError
from wren.finetune import data as D
from wren.finetune import lora, peft_io
from wren.finetune import loss as L
from wren.finetune import train as T
from wren.quant import folder as quant_folder
from wren.quant.linear import reference_path

TOL = 1e-4
HF = {"gemma3": lambda: gemma3_hf(), "gemma4-e2b": lambda: gemma4_hf("e2b")}

# A key -> value mapping behind random filler words: the reply depends on the prompt's last word.
KEYS = ["cat", "dog", "sun", "map", "pen", "box", "cup", "hat"]
VALUES = ["red", "blue", "green", "gold", "pink", "gray", "tan", "jade"]
MAPPING = dict(zip(KEYS, VALUES))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    out = {}
    for name, make in HF.items():
        save_hf(make(), root / name)
        out[name] = root / name
    return out


@pytest.fixture(autouse=True)
def one_thread_and_store(tmp_path, monkeypatch):
    monkeypatch.setenv("WREN_MODELS", str(tmp_path / "models"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def kv_prompts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    filler = lambda: "".join(rng.choice("bcdfghjklmnprstvwxyz") for _ in range(rng.randint(1, 2)))  # noqa: E731
    return [" ".join(filler() for _ in range(rng.randint(2, 4))) + " " + rng.choice(KEYS) for _ in range(n)]


def kv_examples(model, prompts) -> list[D.Example]:
    return [D.encode({"prompt": p, "completion": MAPPING[p.split()[-1]]}, model.tokenizer,
                     D.training_template(model), "test") for p in prompts]


def exact_match(model, prompts) -> float:
    hits = sum(wren.generate(model, [{"role": "user", "content": p}], temperature=0, num_predict=6).strip()
               == MAPPING[p.split()[-1]] for p in prompts)
    return hits / len(prompts)


def randomize_lora(model, seed: int = 0, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.lora_state(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def batch(seed: int, b: int = 2, t: int = 24, vocab: int = 384):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, vocab, (b, t), generator=g)
    mask = torch.rand(b, t, generator=g) > 0.4
    mask[:, -1] = False
    return ids, torch.roll(ids, -1, 1), mask


# --- data -----------------------------------------------------------------------------------------------


def test_formats_render_with_the_chat_template_and_mask_only_replies(folders, tmp_path):
    model = wren.load(folders["gemma3"])
    tok, template = model.tokenizer, D.training_template(model)
    chat = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"},
                         {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and"},
                         {"role": "assistant", "content": "bye"}]}
    ex = D.encode(chat, tok, template, "x")
    from wren.chat import render
    assert (ex.ids, ex.mask) == tuple(render(chat["messages"], tok, template, add_generation_prompt=False))
    learned = tok.decode([i for i, m in zip(ex.ids, ex.mask) if m])
    assert learned == "hello<end_of_turn>bye<end_of_turn>"  # replies and their end marks; no prompt token
    # The served prompt is exactly the training prefix up to the reply.
    served, _ = render(chat["messages"][:3 - 1], tok, template)
    assert ex.ids[:len(served)] == served
    pc = D.encode({"prompt": "hi there", "completion": "hello"}, tok, template, "x")
    assert tok.decode([i for i, m in zip(pc.ids, pc.mask) if m]) == "hello<end_of_turn>"
    text = D.encode({"text": "the sea"}, tok, template, "x")
    assert text.ids[0] == tok.bos_id and text.ids[-1] == tok.eos_id
    assert text.mask == [False] + [True] * (len(text.ids) - 1)

    path = tmp_path / "train.jsonl"
    path.write_text("\n".join([json.dumps(chat), "{not json", json.dumps({"prompt": 1, "completion": "x"}),
                               json.dumps({"messages": [{"role": "user", "content": "no reply"}]}),
                               json.dumps({"foo": 1}), json.dumps({"text": "the sea"})]) + "\n")
    with pytest.raises(BadOptionError, match=r"train.jsonl:2: not valid JSON.*--skip-bad"):
        D.load_jsonl(path, tok, model, 512)
    data = D.load_jsonl(path, tok, model, 512, skip_bad=True)
    assert (len(data.examples), data.skipped) == (2, 4)
    with pytest.raises(ModelNotFoundError, match="no data file"):
        D.load_jsonl(tmp_path / "missing.jsonl", tok, model, 512)
    cut = D.load_jsonl(path, tok, model, 12, skip_bad=True)
    assert all(len(e.ids) <= 12 for e in cut.examples)


def test_a_checkpoint_jinja_template_is_used_and_its_replies_found(folders):
    model = wren.load(folders["gemma3"])
    model.chat_template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                           "{% if add_generation_prompt %}[assistant] {% endif %}")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "more"}, {"role": "assistant", "content": "bye now"}]
    ex = D.encode({"messages": messages}, model.tokenizer, D.training_template(model), "x")
    tok = model.tokenizer
    assert tok.decode(ex.ids) == "<bos>[user] hi\n[assistant] hello\n[user] more\n[assistant] bye now\n"
    assert tok.decode([i for i, m in zip(ex.ids, ex.mask) if m]) == "hellobye now"


def test_collate_targets_and_packing():
    a, b = D.Example([2, 10, 11, 12], [False, False, True, True]), D.Example([2, 20, 21], [False, True, True])
    ids, targets, mask = D.collate([a, b], pad_id=0)
    assert ids.tolist() == [[2, 10, 11, 12], [2, 20, 21, 0]]
    # position t is trained to predict token t+1 when token t+1 is a target
    assert targets[0, :3].tolist() == [10, 11, 12] and mask.tolist() == [[False, True, True, False],
                                                                          [True, True, False, False]]
    packed = D.pack([a, b, a], max_len=8)
    assert [len(r.ids) for r in packed] == [7, 4] and packed[0].mask == a.mask + b.mask
    assert D.epoch_order(10, 3, 1) == D.epoch_order(10, 3, 1) != D.epoch_order(10, 3, 2)


# --- the loss ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(HF))
def test_chunked_head_loss_and_gradients_equal_full_logits(folders, name):
    model = wren.load(folders[name])
    lora.inject(model, rank=4, alpha=8)
    randomize_lora(model)
    ids, targets, mask = batch(1)

    def grads(fn):
        for p in lora.lora_state(model).values():
            p.grad = None
        loss = fn()
        loss.backward()
        return loss.item(), {k: p.grad.clone() for k, p in lora.lora_state(model).items()}

    ref, g_ref = grads(lambda: L.reference_loss(model, ids, targets, mask))
    ours, g = grads(lambda: L.causal_lm_loss(model, ids, targets, mask)[0])
    L.checkpoint_layers(model)
    ckpt, g_ckpt = grads(lambda: L.causal_lm_loss(model, ids, targets, mask)[0])
    assert abs(ours - ref) <= 1e-5 * abs(ref) and ckpt == ours
    for k in g_ref:
        assert g_ref[k].abs().max() > 0
        assert (g[k] - g_ref[k]).abs().max() <= 1e-4 * g_ref[k].abs().max()
        assert torch.equal(g_ckpt[k], g[k])  # recomputing layers changes nothing
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_turboquant_base_stays_codes_and_its_gradient_is_exact(folders, tmp_path):
    model = wren.load(folders["gemma3"])
    quant_folder.quantize_model(model, 4, 32, 8)
    quant_folder.save(model, tmp_path / "tq4")
    tq = wren.load(tmp_path / "tq4")
    lora.inject(tq, rank=4, alpha=8)
    randomize_lora(tq)
    ids, targets, mask = batch(2)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with reference_path(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = L.causal_lm_loss(tq, ids, targets, mask)
    loss.backward()
    got = {k: p.grad.clone() for k, p in lora.lora_state(tq).items()}
    # No autograd buffer is a weight matrix: the codes are multiplied on the fly in both directions.
    weights = {(m.base.out_features, m.base.in_features) for m in lora.lora_modules(tq).values()}
    assert not weights & set(saved) and (384, 64) not in saved
    assert all(isinstance(m.base, quant_folder.TQLinear) for m in lora.lora_modules(tq).values())
    # The same model with every code dequantized into dense layers, through plain autograd and full logits.
    from wren.finetune.merge import densify
    for m in lora.lora_modules(tq).values():
        w = m.base.dense()
        m.base = torch.nn.Linear(w.shape[1], w.shape[0], bias=False).requires_grad_(False)
        m.base.weight.data = w
    densify(tq)
    for p in lora.lora_state(tq).values():
        p.grad = None
    L.reference_loss(tq, ids, targets, mask).backward()
    for k, p in lora.lora_state(tq).items():
        assert (got[k] - p.grad).norm() <= 1e-4 * p.grad.norm()


# --- learning ----------------------------------------------------------------------------------------------


def test_learns_a_key_value_task_on_held_out_prompts(folders, tmp_path):
    model = wren.load(folders["gemma3"])
    train_prompts = kv_prompts(0, 200)
    held_out = [p for p in kv_prompts(1, 40) if p not in train_prompts][:30]
    assert exact_match(model, held_out) == 0.0
    cfg = T.TrainConfig(rank=16, alpha=32, lr=3e-3, batch_size=8, epochs=6, warmup=0.1)
    T.prepare(model, cfg)
    result = T.train(model, kv_examples(model, train_prompts), cfg, tmp_path)
    assert result.history[-1][1] < 0.01 * result.history[0][1]
    assert exact_match(model, held_out) >= 0.9


def test_turboquant_base_learns_too(folders, tmp_path):
    model = wren.load(folders["gemma3"])
    quant_folder.quantize_model(model, 4, 32, 8)
    # 400 prompts, not 200: on 200 the held-out score swung from 0.73 to 1.0 with the shuffle's seed and with
    # the CPU's float rounding (0.8 on an Intel Xeon where an AMD EPYC gave >= 0.9); on 400 it was 1.0 for
    # seeds 0-2 on that Xeon
    prompts = kv_prompts(0, 400)
    cfg = T.TrainConfig(rank=16, alpha=32, lr=3e-3, batch_size=8, epochs=4, warmup=0.1)
    T.prepare(model, cfg)
    result = T.train(model, kv_examples(model, prompts), cfg, tmp_path)
    assert result.history[-1][1] < 0.01 * result.history[0][1]
    assert exact_match(model, [p for p in kv_prompts(1, 40) if p not in prompts][:30]) >= 0.9


# --- PEFT interop -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(HF))
def test_wren_adapter_loads_in_peft_with_the_same_logits(folders, tmp_path, name):
    from peft import PeftModel

    model = wren.load(folders[name])
    cfg = T.TrainConfig(rank=4, alpha=8, lr=1e-2, batch_size=4, steps=3, warmup=0)
    names = T.prepare(model, cfg)
    T.train(model, kv_examples(model, kv_prompts(0, 12)), cfg, tmp_path / "work")
    assert all(m.lora_B.abs().max() > 0 for m in lora.lora_modules(model).values())
    config = peft_io.adapter_config(4, 8, 0.0, {n.rsplit(".", 1)[-1] for n in names})
    peft_io.save_adapter(model, tmp_path / "adapter", config)
    ids = batch(3)[0]
    peft = PeftModel.from_pretrained(HF[name](), tmp_path / "adapter").eval()
    with torch.no_grad():
        ref = peft(ids).logits
        ours = model(ids)
    assert (ours - ref).abs().max().item() <= TOL
    assert (ref - HF[name]()(ids).logits).abs().max() > 1e-2  # the adapter does change the logits


@pytest.mark.parametrize("name", list(HF))
def test_peft_adapter_loads_in_wren_with_the_same_logits(folders, tmp_path, name):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft = get_peft_model(HF[name](), LoraConfig(r=4, lora_alpha=12, target_modules=list(lora.DEFAULT_TARGETS),
                                                  init_lora_weights=False)).eval()
    peft.save_pretrained(tmp_path / "peft")
    ids = batch(4)[0]
    model = wren.load(folders[name])
    n = peft_io.apply_adapter(model, tmp_path / "peft")
    with torch.no_grad():
        ref = peft(ids).logits
        assert (model(ids) - ref).abs().max().item() <= TOL
        lora.merge_dense(model)  # folded into the weights, as the loader serves it
        assert not lora.lora_modules(model) and (model(ids) - ref).abs().max().item() <= TOL
    assert n == len(lora.target_names(wren.load(folders[name])))


def test_bad_adapters_are_refused(folders, tmp_path):
    model = wren.load(folders["gemma3"])
    with pytest.raises(ModelNotFoundError):
        peft_io.apply_adapter(model, tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / peft_io.CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    from safetensors.torch import save_file
    save_file({peft_io.peft_key("layers.0.self_attn.q_proj", "lora_A"): torch.zeros(2, 32),
               peft_io.peft_key("layers.0.self_attn.q_proj", "lora_B"): torch.zeros(64, 2)}, bad / peft_io.WEIGHTS)
    with pytest.raises(ModelFormatError, match="another base model"):
        peft_io.apply_adapter(model, bad)


# --- resume and Ctrl-C -----------------------------------------------------------------------------------


def _run(folder, work, stop_after=None, resume=False, progress=None):
    model = wren.load(folder)
    cfg = T.TrainConfig(rank=4, alpha=8, dropout=0.1, lr=5e-3, batch_size=3, grad_accum=2, epochs=3, seed=7)
    T.prepare(model, cfg)
    examples = kv_examples(model, kv_prompts(0, 14))
    result = T.train(model, examples, cfg, work, stop_after=stop_after, resume=resume, progress=progress)
    return result, {k: v.detach().clone() for k, v in lora.lora_state(model).items()}


def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(folders, tmp_path):
    full, want = _run(folders["gemma3"], tmp_path / "a")
    assert full.steps == 9 and not full.interrupted
    part, _ = _run(folders["gemma3"], tmp_path / "b", stop_after=4)  # stops mid-epoch (3 steps an epoch)
    assert part.interrupted and part.steps == 4
    done, got = _run(folders["gemma3"], tmp_path / "b", resume=True)
    assert done.steps == 9 and [h[1] for h in done.history] == [h[1] for h in full.history]
    for k in want:
        assert torch.equal(got[k], want[k]), k
    with pytest.raises(BadOptionError, match="no checkpoint"):
        _run(folders["gemma3"], tmp_path / "c", resume=True)


def test_ctrl_c_saves_a_resumable_checkpoint(folders, tmp_path):
    def interrupt(info):
        if info["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends; training stops after this step

    result, _ = _run(folders["gemma3"], tmp_path / "w", progress=interrupt)
    assert result.interrupted and result.steps == 2
    assert (tmp_path / "w" / "checkpoint" / "state.safetensors").is_file()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    done, got = _run(folders["gemma3"], tmp_path / "w", resume=True)
    _, want = _run(folders["gemma3"], tmp_path / "x")
    assert done.steps == 9 and all(torch.equal(got[k], want[k]) for k in want)


# --- the commands ---------------------------------------------------------------------------------------


def _write_jsonl(path, prompts):
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": p},
                                                     {"role": "assistant", "content": MAPPING[p.split()[-1]]}]})
                            + "\n" for p in prompts))
    return path


def test_cli_finetune_registers_a_model_that_run_and_merge_use(folders, tmp_path, capsys):
    from wren.cli import main

    data = _write_jsonl(tmp_path / "train.jsonl", kv_prompts(0, 24))
    evals = _write_jsonl(tmp_path / "eval.jsonl", kv_prompts(1, 6))
    work = tmp_path / "work"
    rc = main(["finetune", str(folders["gemma3"]), "--data", str(data), "--eval", str(evals), "-o", "mine/kv",
               "--dir", str(work), "--steps", "4", "--batch-size", "4", "--lr", "1e-2", "--rank", "4",
               "--eval-every", "2", "--grad-checkpointing"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "eval" in out.err and "tok/s" in out.err and "wren run mine/kv:latest" in out.out
    png = (work / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", png[16:24])
    idat = png[png.index(b"IDAT") + 4:png.index(b"IEND") - 8]
    assert len(zlib.decompress(idat)) == h * (1 + 3 * w)
    cfg = json.loads((work / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["peft_type"] == "LORA" and cfg["base_model_name_or_path"] == str(folders["gemma3"])

    ids = batch(5)[0]
    served = wren.load("mine/kv")  # the store entry: base + ADAPTER, folded into the dense weights
    by_hand = wren.load(folders["gemma3"])
    peft_io.apply_adapter(by_hand, work / "adapter")
    base = wren.load(folders["gemma3"])
    with torch.no_grad():
        assert (served(ids) - by_hand(ids)).abs().max() <= TOL
        assert (served(ids) - base(ids)).abs().max() > 1e-2

    assert main(["merge", "mine/kv", "-o", "mine/kv-merged"]) == 0
    assert main(["merge", "mine/kv", "-o", "mine/kv-tq4", "--bits", "4", "--group-size", "32"]) == 0
    merged, tq4 = wren.load("mine/kv-merged"), wren.load("mine/kv-tq4")
    assert not getattr(merged, "adapters", None) and tq4.quant_recipe is not None
    assert tq4.quant_recipe["modules"]["layers.0.self_attn.v_proj"]["bits"] == 6, "quantize's default recipe"
    with torch.no_grad():
        assert (merged(ids) - by_hand(ids)).abs().max() <= TOL
        agree = (tq4(ids).argmax(-1) == by_hand(ids).argmax(-1)).float().mean()
    assert agree >= 0.8

    # A fine-tune of the quantized model keeps its adapter beside the codes when served.
    rc = main(["finetune", "mine/kv-tq4", "--data", str(data), "-o", "mine/kv-tq4-ft", "--steps", "2",
               "--quiet", "--rank", "2"])
    assert rc == 0
    served = wren.load("mine/kv-tq4-ft")
    assert lora.lora_modules(served) and all(isinstance(m.base, quant_folder.TQLinear)
                                             for m in lora.lora_modules(served).values())


def test_cli_errors_are_one_line(folders, tmp_path, capsys):
    from wren.cli import main

    data = _write_jsonl(tmp_path / "train.jsonl", kv_prompts(0, 4))
    assert main(["finetune", "no-such-model:1b", "--data", str(data), "-o", "x"]) == 1
    assert "no model 'no-such-model:1b'" in capsys.readouterr().err
    assert main(["finetune", str(folders["gemma3"]), "--data", str(tmp_path / "nope.jsonl"), "-o", "x"]) == 1
    assert "no data file" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text(data.read_text() + "[1, 2]\n")
    assert main(["finetune", str(folders["gemma3"]), "--data", str(tmp_path / "bad.jsonl"), "-o", "x"]) == 1
    assert "bad.jsonl:5: expected a JSON object" in capsys.readouterr().err
    assert main(["finetune", str(folders["gemma3"]), "--data", str(data), "-o", "x", "--rank", "0"]) == 1
    assert main(["merge", str(folders["gemma3"]), "-o", "y"]) == 1
    assert "no adapter" in capsys.readouterr().err
