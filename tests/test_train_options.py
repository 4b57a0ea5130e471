"""The options researchers expect of a training run: fp16 with a loss scaler, activation
checkpointing, --report_to (TensorBoard, W&B), a bf16 folder trained on fp32 master weights,
chat data through a tokenizer's chat template, and the Hugging Face backbone living in sfr_hf.py."""
import copy
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import sfr
import train
import sfr_hf

ROOT = Path(__file__).resolve().parents[1]
PAIRS = train.demo_pairs()
TOK = train.Tokenizer.from_texts([t for pair in PAIRS for t in pair])


def tiny(tmp_path, **kw):
    """A built-in GPT run of a few steps on the demo pairs (segment_len=4: MiniLM targets)."""
    base = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, head_width=32, segment_len=4, steps=4,
                batch_size=8, lr_warmup=1, eval_every=0, ckpt_every=0, progress=False,
                out_dir=str(tmp_path / "out"))
    return train.RunConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def examples(encoder):
    return sfr.prepare(PAIRS, TOK, sfr.Config(segment_len=4, block_size=32), encoder)


def run(cfg, examples):
    import copy
    return sfr.train(cfg, copy.deepcopy(examples), TOK, log=lambda *a: None, run=train.RunOnDisk(progress=False))


# ----------------------------------------------------------------------------- fp16 and its loss scaler


def test_fp16_trains_near_float32_and_resumes_exactly_with_its_scaler(examples, tmp_path):
    _, h32 = run(tiny(tmp_path / "a"), examples)
    model, h16 = run(tiny(tmp_path / "b", dtype="fp16"), examples)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    for a, b in zip(h32, h16):  # the same run, the forward in half precision
        assert abs(a["ar"] - b["ar"]) < 2e-2 and abs(a["aux"] - b["aux"]) < 2e-2
    assert h32 != h16  # autocast did run in fp16
    ck = torch.load(tmp_path / "b" / "out" / "ckpt.pt", weights_only=False)
    assert ck["scaler"]["scale"] > 0  # the scaler's state is in the checkpoint
    for dtype, whole in (("fp16", h16), ("float32", h32)):  # 2 steps, then a resume to 4 = 4 in one go
        run(tiny(tmp_path / dtype, dtype=dtype, steps=2), examples)
        _, resumed = run(tiny(tmp_path / dtype, dtype=dtype, resume=True), examples)
        assert resumed == whole  # bit for bit: fp16's scaler state too, and the cosine lr of steps=4
        # from the first resumed step (the optimiser's saved lr was steps=2's)


def test_an_fp16_overflow_skips_the_step_instead_of_stopping(tmp_path):
    """An inf gradient is a diverged run in fp32 (TrainingDiverged), a skipped step under the scaler."""
    cfg = tiny(tmp_path, dtype="fp16", steps=1, aux="none")
    model = sfr.SFRModel(cfg, sfr.build_backbone(cfg, TOK.vocab_size), 1)
    opt, sched = sfr.make_optimizer(cfg, model)
    scaler = torch.amp.GradScaler("cpu")
    for p in model.parameters():  # an overflow in backward
        p.register_hook(lambda g: g * float("inf"))
    before = [p.detach().clone() for p in model.parameters()]
    batch = sfr.collate([sfr.Example(TOK.encode("tell me about the sea :"), TOK.encode("arr the sea"))],
                        [0], TOK.pad_id, TOK.eos_id, 1)
    sfr.train_step(model, opt, sched, batch, 0, cfg, scaler=scaler)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # skipped
    assert scaler.get_scale() == 2.0 ** 15  # and the scale halved (from 2 ** 16)
    with pytest.raises(sfr.TrainingDiverged, match="gradient norm is"):  # fp32: no scaler to blame
        sfr.train_step(model, opt, sched, batch, 0, tiny(tmp_path, steps=1, aux="none"))


def test_a_diverged_step_changes_no_weight_under_ema_teacher(tmp_path, examples):
    """ema_teacher's blend writes the head (head = EMA): it runs after the divergence check, so a
    non-finite gradient stops the run with every weight as it was."""
    cfg = tiny(tmp_path, steps=1, ema=0.9, ema_teacher=True)
    model = sfr.SFRModel(cfg, sfr.build_backbone(cfg, TOK.vocab_size), examples[0].z1.size(1))
    opt, sched = sfr.make_optimizer(cfg, model)
    teacher = copy.deepcopy(model.head).requires_grad_(False)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(1.0)  # else blending it in would change nothing
    for p in model.parameters():
        p.register_hook(lambda g: g * float("inf"))
    before = [p.detach().clone() for p in model.parameters()]
    batch = sfr.collate(examples[:4], list(range(4)), TOK.pad_id, TOK.eos_id, model.d_z)
    with pytest.raises(sfr.TrainingDiverged, match="gradient norm is"):
        sfr.train_step(model, opt, sched, batch, 0, cfg, teacher=teacher)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


# ----------------------------------------------------------------------------- activation checkpointing


def grads(model, batch):
    model.zero_grad()
    out = model(batch, 0)
    (out["ar_sum"] / out["ar_n"] + out["aux_sum"] / out["aux_n"]).backward()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_gpt_activation_checkpointing_gives_the_same_gradients_and_recomputes(examples, tmp_path):
    batch = sfr.collate(examples[:8], list(range(8)), TOK.pad_id, TOK.eos_id, 384)
    ref = sfr.SFRModel(tiny(tmp_path), sfr.build_backbone(tiny(tmp_path), TOK.vocab_size), 384)
    cfg = tiny(tmp_path, grad_checkpointing=True)
    ckpt = sfr.SFRModel(cfg, sfr.build_backbone(cfg, TOK.vocab_size), 384)
    ckpt.load_state_dict(ref.state_dict())
    calls = []
    ckpt.backbone.blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))  # (recompute stops early)
    g_ref, g_ck = grads(ref, batch), grads(ckpt, batch)
    assert len(calls) == 2  # the block ran again in backward: its activations were not kept
    for a, b in zip(g_ref, g_ck):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama folder with a word tokenizer and a chat template whose turns end with eos."""
    from transformers import AutoTokenizer
    texts = [p + " " + r for p, r in PAIRS] + ["<s> user assistant system be brief"]
    folder = sfr_hf.tiny_llama_folder(tmp_path_factory.mktemp("hf") / "llama", texts)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }}[EOS] {% endfor %}"
                         "{% if add_generation_prompt %}<s> assistant {% endif %}")
    tok.save_pretrained(folder)
    return folder


def test_hf_activation_checkpointing_gives_the_same_gradients(llama, examples, tmp_path):
    cfg = tiny(tmp_path, backbone=str(llama), aux="none")
    tok = train.build_tokenizer(cfg, [])
    exs = sfr.prepare(PAIRS[:4], tok, cfg)
    batch = sfr.collate(exs, list(range(4)), tok.pad_id, tok.eos_id, 1)
    ref = sfr.SFRModel(cfg, sfr_hf.hf_backbone(cfg, tok.vocab_size), 1).train()
    ckpt = sfr.SFRModel(cfg, sfr_hf.hf_backbone(tiny(tmp_path, backbone=str(llama), aux="none",
                                                     grad_checkpointing=True), tok.vocab_size), 1).train()
    on = [getattr(m.backbone.hf, "is_activation_checkpointing", None) for m in (ckpt, ref)]
    on = on if on[0] is not None else [m.backbone.hf.is_gradient_checkpointing for m in (ckpt, ref)]
    assert on == [True, False]

    def g(model):
        model.zero_grad()
        out = model(batch, 0)
        (out["ar_sum"] / out["ar_n"]).backward()
        return [p.grad for p in model.parameters() if p.grad is not None]
    for a, b in zip(g(ref), g(ckpt)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_a_bf16_folder_trains_on_fp32_master_weights(tmp_path):
    from transformers import AutoModelForCausalLM
    folder = sfr_hf.tiny_llama_folder(tmp_path / "llama", [p + " " + r for p, r in PAIRS])
    AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).save_pretrained(folder)  # a bf16 release
    assert AutoModelForCausalLM.from_pretrained(folder, dtype="auto").dtype == torch.bfloat16
    bb = sfr_hf.hf_backbone(tiny(tmp_path, backbone=str(folder)), None)
    assert {p.dtype for p in bb.parameters()} == {torch.float32}  # AdamW updates fp32, never bf16


# ----------------------------------------------------------------------------- --report_to


def test_report_to_tensorboard_writes_every_term_of_the_history(examples, tmp_path):
    pytest.importorskip("tensorboard", reason="report_to='tensorboard' needs it: pip install tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    _, history = run(tiny(tmp_path, report_to="tensorboard"), examples)
    acc = EventAccumulator(str(tmp_path / "out" / "tensorboard"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {k for r in history for k in r} - {"step"}
    for key in ("ar", "aux", "grad_norm"):
        logged = [(e.step, e.value) for e in acc.Scalars(key)]
        assert logged == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in history]


def test_report_to_wandb_logs_each_step_and_finishes(examples, tmp_path, monkeypatch):
    """W&B is not installed here: a stand-in module records what sfr.train calls."""
    calls = []
    fake_run = types.SimpleNamespace(log=lambda rec, step: calls.append(("log", step, dict(rec))),
                                     finish=lambda: calls.append(("finish",)))
    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw["project"], kw["config"]["lam"])) or fake_run)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    _, history = run(tiny(tmp_path, report_to="wandb"), examples)
    assert calls[0] == ("init", "sfr", 1.0) and calls[-1] == ("finish",)
    assert [c[1:] for c in calls[1:-1]] == [(r["step"], r) for r in history]


def test_report_to_without_the_package_is_one_line_naming_the_field(examples, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(sfr.UsageError, match=r"Config.report_to='wandb': .*pip install wandb"):
        run(tiny(tmp_path, report_to="wandb"), examples)
    with pytest.raises(sfr.UsageError, match="Config.report_to='mlflow'"):
        tiny(tmp_path, report_to="mlflow").validate()


def test_no_tracker_is_imported_unless_asked(tmp_path):
    code = ("import sys, sfr, train; cfg = train.RunConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, aux='none', "
            f"steps=1, eval_every=0, out_dir={str(tmp_path)!r}); "
            "pairs = train.demo_pairs(); tok = train.Tokenizer.from_texts([t for p in pairs for t in p]); "
            "sfr.train(cfg, sfr.prepare(pairs, tok, cfg), tok, log=lambda *a: None); "
            "print(sorted(m for m in ('wandb', 'tensorboard', 'torch.utils.tensorboard') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


# ----------------------------------------------------------------------------- chat data


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_messages_become_one_pair_per_assistant_turn_in_the_template(llama, encoder, tmp_path):
    from transformers import AutoTokenizer
    conv = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "tell me about the sea :"},
            {"role": "assistant", "content": "arr the sea be full of gold"},
            {"role": "user", "content": "tell me about the moon :"},
            {"role": "assistant", "content": "i like the moon"}]
    cfg = tiny(tmp_path, backbone=str(llama))
    pairs = train.load_pairs(write_jsonl(tmp_path / "chat.jsonl", [{"messages": conv}]), sfr.HF["chat"](cfg))
    hf_tok = AutoTokenizer.from_pretrained(llama)
    assert [r for _, r in pairs] == ["arr the sea be full of gold", "i like the moon"]
    for (prompt, reply), n in zip(pairs, (3, 5)):  # prompt + reply + eos is the template's own text
        assert prompt == hf_tok.apply_chat_template(conv[:n - 1], add_generation_prompt=True, tokenize=False)
        assert hf_tok.apply_chat_template(conv[:n], tokenize=False).startswith(prompt + reply + "[EOS]")
    tok = train.build_tokenizer(cfg, [])
    ex = sfr.prepare(pairs[1:], tok, train.RunConfig(segment_len=2, block_size=64, backbone=str(llama)), encoder)[0]
    batch = sfr.collate([ex], [0], tok.pad_id, tok.eos_id, ex.z1.size(1))
    assert hf_tok.decode(batch.y[batch.resp]) == "i like the moon [EOS]"  # L_AR: the assistant turn only
    assert ex.valid.any() and len(ex.z1) == len(tok.encode("i like the moon"))  # targets: its text


def test_bad_chat_data_is_one_line_naming_the_file_and_line(llama, tmp_path):
    cfg = tiny(tmp_path, backbone=str(llama))
    chat = sfr.HF["chat"](cfg)
    user = {"role": "user", "content": "tell me about the sea :"}
    cases = [([user], "no \"assistant\" message"), ([{"role": "user"}], '"messages" must be a list of'),
             ("hello", '"messages" must be a list of')]
    for messages, message in cases:
        path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "response": "b"}, {"messages": messages}])
        with pytest.raises(sfr.UsageError, match=f"bad.jsonl:2: {message}"):
            train.load_pairs(path, chat)
    conv = write_jsonl(tmp_path / "conv.jsonl", [{"messages": [user, {"role": "assistant", "content": "arr"}]}])
    with pytest.raises(sfr.UsageError, match="conv.jsonl:1: \"messages\" needs a Hugging Face backbone"):
        train.load_pairs(conv)  # the built-in tokenizer has no template
    from transformers import AutoTokenizer
    other = tmp_path / "other"
    sfr_hf.tiny_llama_folder(other, ["<s> user assistant tell me about the sea : arr"])
    tok = AutoTokenizer.from_pretrained(other)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"  # no eos after a turn
    tok.save_pretrained(other)
    with pytest.raises(sfr.UsageError, match="does not end an assistant turn with eos"):
        train.load_pairs(conv, sfr.HF["chat"](tiny(tmp_path, backbone=str(other))))


def test_sfr_hf_command_line_trains_on_chat_data(llama, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": p},
                                                               {"role": "assistant", "content": r}]}
                                                 for p, r in PAIRS])
    model, history = sfr_hf.main([f"--backbone={llama}", f"--data={data}", "--steps=2", "--aux=none", "--batch_size=4",
                                  "--eval_every=0", "--progress=false", f"--out_dir={tmp_path / 'out'}",
                                  "--grad_checkpointing=true"])
    assert len(history) == 2 and (tmp_path / "out" / "export" / "config.json").exists()


def test_sfr_py_alone_refuses_a_folder_backbone_in_one_line(llama, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sfr, "HF", {})  # as in a process that never imported sfr_hf
    with pytest.raises(SystemExit) as e:
        train.main([f"--backbone={llama}", f"--out_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert "a Hugging Face folder trains through sfr_hf.py" in err


def test_sfr_hf_help_lists_every_field_and_the_smollm2_command(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        sfr_hf.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("usage: sfr_hf.py")
    assert all(f"--{f.name}" in out for f in sfr.dataclasses.fields(train.RunConfig))
    assert "python sfr_hf.py smollm2" in out and list(tmp_path.iterdir()) == []  # ran nothing
    with pytest.raises(SystemExit) as e:
        sfr_hf.main(["--grad_checkpointing=maybe"])
    assert e.value.code == 2
