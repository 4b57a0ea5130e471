"""SFRTrainer / SFRSFTTrainer (sfr_hf.py) on a tiny random Llama with a word tokenizer built here."""
import dataclasses
import os

import pytest
import torch

import sfr
import train
import sfr_hf

STEPS, SAVE_AT = 5, 3
SFR_CFG = sfr.Config(segment_len=4, fm_positions=4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, tokenizer, pairs): a 2-layer Llama with tied embeddings, saved with its tokenizer."""
    from transformers import AutoTokenizer
    pairs = train.demo_pairs()
    folder = sfr_hf.tiny_llama_folder(tmp_path_factory.mktemp("hf") / "tiny-llama", [p + " " + r for p, r in pairs])
    return folder, AutoTokenizer.from_pretrained(folder), pairs


def make_trainer(kind, tiny, encoder, out, cfg=SFR_CFG, **args):
    """An SFR trainer ('trainer': transformers.Trainer, 'sft': trl.SFTTrainer) on the demo pairs."""
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq
    folder, tok, pairs = tiny
    model = AutoModelForCausalLM.from_pretrained(folder)
    common = dict(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=3e-3,
                  logging_steps=1, save_steps=SAVE_AT, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                  bf16=False)  # fp32 (SFTConfig defaults to bf16 autocast), so exported logits compare exactly
    common.update(args)
    if kind == "trainer":
        from transformers import TrainingArguments
        return sfr_hf.SFRTrainer(model=model, args=TrainingArguments(**common),
                                 train_dataset=sfr_hf.tokenize_pairs(pairs, tok),
                                 data_collator=DataCollatorForSeq2Seq(tok, label_pad_token_id=-100),
                                 processing_class=tok, sfr_config=cfg, encoder=encoder)
    pytest.importorskip("trl", reason="SFRSFTTrainer needs TRL (pip install trl)")
    from datasets import Dataset
    from trl import SFTConfig
    ds = Dataset.from_list([{"prompt": p, "completion": " " + r} for p, r in pairs])
    return sfr_hf.SFRSFTTrainer(model=model, args=SFTConfig(max_length=64, **common), train_dataset=ds,
                                processing_class=tok, sfr_config=cfg, encoder=encoder)


def train_logs(trainer, **kw):
    trainer.train(**kw)
    return {r["step"]: r for r in trainer.state.log_history if "loss" in r}


@pytest.mark.parametrize("kind", ["trainer", "sft"])
def test_resume_matches_an_uninterrupted_run_and_export_is_the_plain_lm(kind, tiny, encoder, tmp_path):
    from transformers import AutoModelForCausalLM
    full = make_trainer(kind, tiny, encoder, tmp_path / "full")
    logs = train_logs(full)
    for r in logs.values():  # the terms are logged apart, and add up to the loss the trainer logs
        assert r["loss"] == pytest.approx(r["ar_loss"] + r["lam"] * r["fm_loss"], rel=1e-5)
    assert full.model.sfr_head.out.weight.abs().sum() > 0  # zero at init: the head has been trained
    ckpt = tmp_path / "full" / f"checkpoint-{SAVE_AT}"
    assert (ckpt / sfr_hf.HEAD_FILE).exists()
    head_params = {id(p) for p in full.model.sfr_head.parameters()}
    assert head_params <= {id(p) for g in full.optimizer.param_groups for p in g["params"]}  # trained by the optimiser

    resumed = make_trainer(kind, tiny, encoder, tmp_path / "resumed")
    logs2 = train_logs(resumed, resume_from_checkpoint=str(ckpt))
    assert sorted(logs2) == list(range(1, STEPS + 1))  # steps 1..SAVE_AT come from the checkpoint's state
    for step in range(SAVE_AT + 1, STEPS + 1):
        for key in ("loss", "ar_loss", "fm_loss", "grad_norm"):
            assert logs2[step][key] == pytest.approx(logs[step][key], rel=1e-6, abs=1e-7), (step, key)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert any(k.startswith("sfr_head.") for k in a) and a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7)

    export = tmp_path / "export"
    full.save_model(str(export))
    from safetensors import safe_open
    with safe_open(export / "model.safetensors", "pt") as f:
        assert f.keys() and not any("sfr_head" in k for k in f.keys())  # the file, not only what loads from it
    assert not (export / sfr_hf.HEAD_FILE).exists()
    plain = AutoModelForCausalLM.from_pretrained(export).eval()
    assert not any("sfr_head" in k for k in plain.state_dict())
    assert plain.lm_head.weight.data_ptr() == plain.model.embed_tokens.weight.data_ptr()  # still tied
    trained = {k: v for k, v in a.items() if not k.startswith("sfr_head.")}
    assert all(torch.equal(v, trained[k]) for k, v in plain.state_dict().items())
    idx = torch.tensor([sfr_hf.tokenize_pairs(tiny[2][:1], tiny[1])[0]["input_ids"]])
    full.model.eval()
    with torch.no_grad():
        assert torch.equal(plain(idx).logits, full.model(idx).logits)
    assert hasattr(full.model, "sfr_head")  # exporting leaves the trainer's model whole


def test_loss_equals_sfr_py_on_the_same_batch(tiny, encoder, tmp_path, monkeypatch):
    """Reference equivalence: on one batch, SFRTrainer's L_AR + L_FM is sfr.SFRModel's, computed by
    sfr.py's own pipeline (prepare, collate, HFBackbone, segment_loss) with the same weights, head
    and noise. This pins the targets (text, anchor, position), w_p, the reduction and which h is read."""
    folder, tok, pairs = tiny
    trainer = make_trainer("trainer", tiny, encoder, tmp_path)
    torch.manual_seed(3)
    torch.nn.init.normal_(trainer.model.sfr_head.out.weight, std=0.5)  # a head whose output depends on h
    batch_pairs, ids = pairs[:4], torch.arange(4)
    monkeypatch.setattr(sfr_hf, "row_ids", lambda input_ids, attention_mask=None: ids)  # sfr.py's example ids
    inputs = trainer.data_collator(sfr_hf.tokenize_pairs(batch_pairs, tok))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, inputs)

    cfg = dataclasses.replace(SFR_CFG, backbone=str(folder))
    ref_tok = sfr_hf.HFTokenizer(str(folder))
    examples = sfr.prepare(batch_pairs, ref_tok, cfg, encoder)
    ref = sfr.SFRModel(cfg, sfr_hf.HFBackbone(str(folder)), encoder.dim).train()
    ref.head.load_state_dict(trainer.model.sfr_head.state_dict())
    batch = sfr.collate(examples, ids, ref_tok.pad_id, ref_tok.eos_id, encoder.dim)
    out = ref(batch, step=0)
    ref_loss = out["ar_sum"] / out["ar_n"] + out["aux_sum"] / out["aux_n"].clamp_min(1)
    assert out["aux_n"] > 0
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)


def test_hidden_layer_reads_that_hidden_state(tiny, encoder, tmp_path):
    trainer = make_trainer("trainer", tiny, encoder, tmp_path, cfg=dataclasses.replace(SFR_CFG, hidden_layer=1))
    inputs = trainer.data_collator(sfr_hf.tokenize_pairs(tiny[2][:2], tiny[1]))
    seen = []
    real = trainer.fm_loss
    trainer.fm_loss = lambda model, h, *a: seen.append(h) or real(model, h, *a)
    trainer.compute_loss(trainer.model, inputs)
    with torch.no_grad():
        ref = trainer.model(input_ids=inputs["input_ids"], output_hidden_states=True).hidden_states
    assert torch.equal(seen[0], ref[1]) and not torch.equal(seen[0], ref[-1])


def test_options_it_does_not_implement_are_refused(tiny, encoder, tmp_path):
    for field, value in (("gate", 1.5), ("ema", 0.999), ("target_scale", "std"), ("lr", 1e-4)):
        with pytest.raises(ValueError, match=f"Config.{field}={value!r} has no effect in SFRTrainer"):
            make_trainer("trainer", tiny, encoder, tmp_path, cfg=dataclasses.replace(SFR_CFG, **{field: value}))
    with pytest.raises(ValueError, match="Config.out_dir=.elsewhere. has no effect in SFRTrainer"):  # RunConfig
        make_trainer("trainer", tiny, encoder, tmp_path, cfg=train.RunConfig(**{**vars(SFR_CFG), "out_dir": "elsewhere"}))
    with pytest.raises(ValueError, match="Config.aux='mtp'"):
        make_trainer("trainer", tiny, encoder, tmp_path, cfg=dataclasses.replace(SFR_CFG, aux="mtp"))


def test_resuming_a_checkpoint_without_the_head_is_an_error(tiny, encoder, tmp_path):
    trainer = make_trainer("trainer", tiny, encoder, tmp_path / "a", max_steps=1, save_steps=1)
    trainer.train()
    ckpt = tmp_path / "a" / "checkpoint-1"
    os.remove(ckpt / sfr_hf.HEAD_FILE)
    with pytest.raises(FileNotFoundError, match="restart the flow head from scratch"):
        make_trainer("trainer", tiny, encoder, tmp_path / "b", max_steps=2).train(resume_from_checkpoint=str(ckpt))


def test_gradient_accumulation_scales_each_term_once(tiny, encoder, tmp_path, monkeypatch):
    """4 sequences as 2 x 2 accumulated equal 1 x 4 in L_AR (the Trainer's own normalisation over the
    accumulated batch), and a constant L_FM = 1 enters the step's loss once, not once per micro-batch."""
    monkeypatch.setattr(sfr_hf.SFRMixin, "fm_loss", lambda self, model, h, *a: h.sum() * 0 + 1.0)
    one = train_logs(make_trainer("trainer", tiny, encoder, tmp_path / "a", max_steps=1))[1]
    acc = train_logs(make_trainer("trainer", tiny, encoder, tmp_path / "b", max_steps=1,
                                  per_device_train_batch_size=2, gradient_accumulation_steps=2))[1]
    assert acc["ar_loss"] == pytest.approx(one["ar_loss"], rel=1e-6)
    for r in (one, acc):
        assert r["fm_loss"] == pytest.approx(1.0) and r["loss"] == pytest.approx(r["ar_loss"] + 1.0, rel=1e-6)


def test_a_lora_model_trains_saves_and_resumes_its_head(tiny, encoder, tmp_path):
    """With PEFT the checkpoint holds only the adapter; the head (attached after the LoRA wrapping,
    so not frozen by it) still trains, is saved beside the adapter and comes back on resume."""
    from peft import LoraConfig, get_peft_model

    def lora_trainer(out):  # the PeftModel goes into the trainer, as usual
        from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, TrainingArguments
        folder, tok, pairs = tiny
        torch.manual_seed(0)
        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(folder), lora)
        args = TrainingArguments(output_dir=str(out), max_steps=2, save_steps=1, per_device_train_batch_size=4,
                                 learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True)
        return sfr_hf.SFRTrainer(model=model, args=args, train_dataset=sfr_hf.tokenize_pairs(pairs, tok),
                                 data_collator=DataCollatorForSeq2Seq(tok, label_pad_token_id=-100),
                                 processing_class=tok, sfr_config=SFR_CFG, encoder=encoder)

    full = lora_trainer(tmp_path / "full")
    logs = train_logs(full)
    ckpt = tmp_path / "full" / "checkpoint-1"
    assert (ckpt / "adapter_model.safetensors").exists() and (ckpt / sfr_hf.HEAD_FILE).exists()
    assert full.model.sfr_head.out.weight.abs().sum() > 0  # trained, not frozen by PEFT
    resumed = lora_trainer(tmp_path / "resumed")
    logs2 = train_logs(resumed, resume_from_checkpoint=str(ckpt))
    assert logs2[2]["loss"] == pytest.approx(logs[2]["loss"], rel=1e-6)
    assert logs2[2]["fm_loss"] == pytest.approx(logs[2]["fm_loss"], rel=1e-6)
    torch.testing.assert_close(resumed.model.sfr_head.out.weight, full.model.sfr_head.out.weight)
