"""recipe='authors' against WeAgentAI/SFR as read from their code (train/fm/trainer.py,
train/fm_head.py), one point of departure at a time, each on a case small enough to check by
hand; then an oracle: their compute_loss re-implemented here, in our own words and without
transformers, on one batch with the same noise, against sfr's loss.

CPU only, offline; the MiniLM encoder only for the pooling test.
"""
import copy
import math
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sfr
import sfr_authors
import sfr_encoder
import train

IGNORE = -100


class HashEncoder:
    """Deterministic unit 'embeddings' of texts (a seeded draw per text), for target tests."""
    dim = 6

    def encode(self, texts):
        rows = [F.normalize(torch.randn(self.dim, generator=torch.Generator().manual_seed(zlib.crc32(t.encode()))),
                            dim=0) for t in texts]
        return torch.stack(rows) if rows else torch.zeros(0, self.dim)


# ----------------------------------------------------------------------------- the preset


def test_preset_and_explicit_fields():
    a = train.RunConfig(recipe="authors", segment_len=8)
    assert a.segment_len == 8 and a.stride == 32 and a.min_suffix == 16  # explicit segment_len wins, the rest is the template
    assert (a.positions, a.suffix_count, a.fill, a.pooling, a.head_arch, a.lam_phases) == \
        ("labels", "authors", "authors", "mean", "authors", "authors")
    assert (a.head_width, a.head_layers, a.gate, a.gate_on, a.gate_decay, a.ema, a.ema_teacher, a.warmup_freeze,
            a.fm_positions, a.lam, a.lam_schedule, a.lam_ramp) == \
        (1024, 3, 1.5, "previous", 0.99, 0.999, True, True, 0, 1.0, "constant", 0)
    assert train.parse_config(["--recipe=authors", "--segment_len=8"]) == a
    assert train.parse_config(["--segment_len=8", "--recipe", "authors", "--gate=0"]) == train.RunConfig(recipe="authors", segment_len=8, gate=0)
    assert train.RunConfig(recipe="ours") == train.RunConfig()
    with pytest.raises(ValueError, match="Config.recipe"):
        train.RunConfig(recipe="theirs")


# ----------------------------------------------------------------------------- 1-3: positions, targets, weights


def their_targets(labels, k, stride, min_suffix, decode, encode, d):
    """Their encode_suffix_tokens, re-derived: anchors every stride-th label position; a suffix is
    the non-ignored labels in [t + 1, t + 1 + k); skipped if shorter than min_suffix or blank; at
    stride > 1 every response position copies its nearest kept anchor (argmin, ties earlier)."""
    B, L = labels.shape
    z1 = torch.zeros(B, L, d)
    for b in range(B):
        resp = [t for t in range(L) if labels[b, t] != IGNORE]
        kept = []
        for t in resp[::stride]:
            ids = [int(x) for x in labels[b, t + 1:min(t + 1 + k, L)] if x != IGNORE]
            text = decode(ids)
            if len(ids) >= min_suffix and text.strip():
                z1[b, t] = encode([text])[0]
                kept.append(t)
        if stride > 1 and kept:
            for t in resp:
                if t not in kept:
                    dist = torch.tensor([abs(a - t) for a in kept])
                    z1[b, t] = z1[b, kept[int(dist.argmin())]]
    return z1


def batch_of(pairs, cfg, enc=HashEncoder()):
    tok = train.Tokenizer.from_texts([t for p in pairs for t in p])
    exs = sfr.prepare(pairs, tok, cfg, enc)
    return tok, exs, sfr.collate(exs, list(range(len(exs))), tok.pad_id, tok.eos_id, enc.dim)


def their_labels(batch, exs):
    """LLaMA-Factory's labels: unshifted, IGNORE on prompt and padding, eos included."""
    labels = torch.full(batch.idx.shape, IGNORE)
    for b, ex in enumerate(exs):
        P, N = len(ex.prompt), len(ex.response)
        labels[b, P:P + N + 1] = batch.idx[b, P:P + N + 1]
    return labels


PAIRS = [("q one :", "a b c d e f g h i"), ("q two three :", "b c d e"), ("q :", "x y z w v u t s r p o n")]


@pytest.mark.parametrize("k,stride,min_suffix", [(4, 1, 1), (4, 1, 3), (4, 3, 3), (6, 4, 5), (5, 2, 5)])
def test_positions_targets_weights_are_theirs(k, stride, min_suffix):
    cfg = sfr.Config(recipe="authors", segment_len=k, stride=stride, min_suffix=min_suffix)
    tok, exs, batch = batch_of(PAIRS, cfg)
    labels = their_labels(batch, exs)
    mask = labels != IGNORE
    assert torch.equal(batch.idx[mask], labels[mask]) and mask[:, -1].any()  # the eos position is an input
    assert torch.equal(batch.valid, mask)  # every response position counts, zero targets too
    z1 = their_targets(labels, k, stride, min_suffix, tok.decode, HashEncoder().encode, HashEncoder.dim)
    assert torch.allclose(batch.z1, z1, atol=0, rtol=0)
    pos = mask.float().cumsum(1) * mask
    n = mask.sum(1, keepdim=True)
    assert torch.allclose(batch.w, (n - pos + 1) / n * mask)
    # the AR loss is untouched: the eos input predicts nothing
    assert (batch.resp.sum(1) == torch.tensor([len(ex.response) + 1 for ex in exs])).all()


def test_template_case_every_position_gets_a_target():
    """The template's k = 256, s = 32, min 16 on a response of 100 label positions (99 tokens +
    eos): their anchors 0, 32, 64 are kept and 96 (3 tokens left) skipped; positions nearest 96
    copy 64. Ours masks those 19 positions."""
    theirs = sfr_authors.future_segments(99, 256, 32, 16, "labels", "authors", "authors")
    assert None not in theirs and len(theirs) == 100
    assert theirs[16] == 1 and theirs[48] == 33 and theirs[80:] == [65] * 20  # ties to the earlier anchor
    ours = sfr.future_segments(100, 32, 16)
    assert ours.count(None) == 19


def test_min_suffix_counts_eos_and_caps_at_k():
    fs = sfr_authors.future_segments
    # N = 4 at j = 0 (segment r1 r2 r3 + eos): 4 label tokens >= 4 for them, 3 response tokens for us
    assert fs(4, 8, 1, 4, "labels", "authors", "authors")[0] == 1
    assert fs(4, 8, 1, 4, "labels", "ours", "authors")[0] is None
    # min_suffix > k: no window of k label tokens is long enough: no target at all for them
    assert fs(10, 3, 1, 4, "labels", "authors", "authors") == [None] * 11
    assert sfr.future_segments(10, 1, 4) == [0, 1, 2, 3, 4, 5, 6, None, None, None]


def test_blank_segments_are_skipped():
    """Byte tokens 'abc   ': position j holds token j and its segment starts at j + 1: 'bc ',
    'c  ', then blank ones, skipped by theirs (z1 = 0, counted); ours encodes all six."""
    cfg = train.RunConfig(recipe="authors", segment_len=3, stride=1, min_suffix=1, tokenizer="byte")
    tok = train.Tokenizer("byte")
    ex = sfr.prepare([("p", "abc   ")], tok, cfg, HashEncoder())[0]
    assert ex.valid.all() and ex.z1.size(0) == 7
    assert (ex.z1.norm(dim=1) > 0).tolist() == [True, True] + [False] * 5
    ours = sfr.prepare([("p", "abc   ")], tok, train.RunConfig(segment_len=3, tokenizer="byte"), HashEncoder())[0]
    assert ours.valid.tolist() == [True] * 6


def test_stride_one_zero_targets_count_in_the_loss():
    cfg = sfr.Config(recipe="authors", segment_len=4, stride=1, min_suffix=3)
    _, exs, batch = batch_of(PAIRS[:1], cfg)
    zero = batch.z1.norm(dim=-1) == 0
    assert (zero & batch.valid).sum() == 3  # j = N-2, N-1 (2 and 1 label tokens) and the eos position
    assert (batch.w[zero & batch.valid] > 0).all()


# ----------------------------------------------------------------------------- 4-5, 7: training dynamics


def tiny_model(cfg, exs, tok):
    torch.manual_seed(0)
    model = sfr.SFRModel(cfg, sfr.build_backbone(cfg, tok.vocab_size), HashEncoder.dim)
    opt, sched = sfr.make_optimizer(cfg, model)
    return model, opt, sched


def tiny_cfg(**kw):
    return sfr.Config(**{**dict(recipe="authors", segment_len=4, stride=1, min_suffix=1, n_layer=1, n_head=2, n_embd=16,
                                block_size=32, head_width=32, steps=20, lr=1e-2, lr_warmup=0), **kw})


def test_warmup_freeze_leaves_the_backbone_bit_for_bit():
    cfg = tiny_cfg(head_warmup=2, gate=0)
    tok, exs, batch = batch_of(PAIRS, cfg)
    model, opt, sched = tiny_model(cfg, exs, tok)
    nn.init.normal_(model.head.out.weight, std=0.1)  # so L_FM has a gradient for h at step 0
    before = copy.deepcopy(model.backbone.state_dict())
    head0 = copy.deepcopy(model.head.state_dict())
    for step in range(2):
        sfr.train_step(model, opt, sched, batch, step, cfg)
        assert all(p.grad is None for p in model.backbone.parameters())
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in before.items())
    assert not torch.equal(head0["out.weight"], model.head.out.weight)
    sfr.train_step(model, opt, sched, batch, 2, cfg)
    assert not torch.equal(before["wte.weight"], model.backbone.wte.weight)
    # ours: L_AR keeps training the backbone during the warm-up
    cfg_ours = dataclasses_replace(cfg, warmup_freeze=False)
    model, opt, sched = tiny_model(cfg_ours, exs, tok)
    sfr.train_step(model, opt, sched, batch, 0, cfg_ours)
    assert not torch.equal(before["wte.weight"], model.backbone.wte.weight)


def dataclasses_replace(cfg, **kw):
    import dataclasses
    return dataclasses.replace(cfg, **kw)


def test_ema_teacher_blends_before_the_optimizer_step():
    """Each step: ema = d ema + (1 - d) head; head = ema; then the optimiser steps from there with
    the gradient taken at the old head. Recomputed by hand on a copy of the model and optimiser."""
    cfg = tiny_cfg(gate=0, ema=0.9)
    tok, exs, batch = batch_of(PAIRS, cfg)
    model, opt, sched = tiny_model(cfg, exs, tok)
    ref, ref_opt, ref_sched = copy.deepcopy(model), None, None
    ref_opt, ref_sched = sfr.make_optimizer(cfg, ref)
    teacher, ref_ema = copy.deepcopy(model.head).requires_grad_(False), copy.deepcopy(model.head)
    for step in range(4):
        sfr.train_step(model, opt, sched, batch, step, cfg, teacher=teacher)
        ref_opt.zero_grad(set_to_none=True)
        out = ref(batch, step)
        (out["ar_sum"] / out["ar_n"] + out["aux_sum"] / out["aux_n"].clamp_min(1)).backward()
        with torch.no_grad():
            for e, p in zip(ref_ema.parameters(), ref.head.parameters()):
                e.copy_(0.9 * e + 0.1 * p)
                p.copy_(e)
        torch.nn.utils.clip_grad_norm_(ref.parameters(), cfg.grad_clip)
        ref_opt.step()
        ref_sched.step()
    for a, b in zip(model.head.parameters(), ref.head.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    for a, b in zip(teacher.parameters(), ref_ema.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    # the head stays one optimiser step from the EMA: much closer to its start than without the teacher
    free, fopt, fsched = tiny_model(cfg, exs, tok)
    start = copy.deepcopy(free.head.inp[0].weight)
    for step in range(4):
        sfr.train_step(free, fopt, fsched, batch, step, cfg)
    moved_free = (free.head.inp[0].weight - start).norm()
    moved_teacher = (model.head.inp[0].weight - start).norm()
    assert moved_teacher < 0.6 * moved_free


def test_ema_teacher_erases_the_warmed_up_head():
    """Their first blend after the warm-up uses the EMA of the initial head: with d = 0.999
    the head is 99.9% back to its initialisation (then one optimiser step)."""
    cfg = tiny_cfg(gate=0, ema=0.999, head_warmup=3, lr=1e-2)
    tok, exs, batch = batch_of(PAIRS, cfg)
    model, opt, sched = tiny_model(cfg, exs, tok)
    teacher = copy.deepcopy(model.head).requires_grad_(False)
    init = copy.deepcopy(model.head.inp[0].weight)
    for step in range(3):
        sfr.train_step(model, opt, sched, batch, step, cfg, teacher=teacher)
    warmed = copy.deepcopy(model.head.inp[0].weight)
    assert torch.equal(teacher.inp[0].weight, init)  # no blend in the warm-up
    model.grad_box["frozen"] = False
    opt.zero_grad(set_to_none=True)
    sfr_authors.teacher_blend(teacher, model.head, cfg.ema)
    expect = 0.999 * init + 0.001 * warmed
    assert torch.allclose(model.head.inp[0].weight, expect, atol=1e-7)
    assert (model.head.inp[0].weight - init).norm() < 0.01 * (warmed - init).norm()


def test_lambda_phases():
    cfg = sfr.Config(recipe="authors", lam=2.0, head_warmup=10, lam_ramp=5, steps=35, lam_schedule="cosine_decay")
    lam = [sfr.lam_at(cfg, s) for s in range(36)]
    assert lam[:10] == [2.0] * 10  # phase A: full lambda while the head warms up
    assert lam[10:15] == [0.0, 0.4, 0.8, 1.2, 1.6]  # phase B: ramp from 0
    assert lam[15] == 2.0 and abs(lam[25] - 1.0) < 1e-12 and lam[35] == 0.0  # phase C: cosine over 20 steps
    lin = sfr.Config(**{**cfg.__dict__, "lam_schedule": "linear_decay"})
    assert abs(sfr.lam_at(lin, 20) - 1.5) < 1e-12
    ours = sfr.Config(lam=2.0, head_warmup=10, lam_ramp=5, steps=35, lam_schedule="cosine_decay")
    assert sfr.lam_at(ours, 0) == 2.0 and sfr.lam_at(ours, 10) < 2.0  # ours: one schedule, blind to warm-up


def test_gate_reads_the_previous_loss():
    losses = [1.0, 0.5, 0.9, 0.2, 1.0]
    cfg = sfr.Config(recipe="authors", gate=1.5, gate_decay=0.5)
    state, closed = None, []
    for x in losses:
        scale, state = sfr_authors.gate(cfg, x, state, 1.0)
        closed.append(scale == 0.0)
    # by hand, decay 0.5: ema 1.0, 0.75, 0.825, 0.5125; decided on (last, ema) before each step
    # step 0 uninitialised; 1: 1.0 < 1.0/1.5 no; 2: 0.5 < 0.75/1.5 no; 3: 0.9 < .55 no; 4: 0.2 < 0.3417 yes
    assert closed == [False, False, False, False, True]
    assert state == (0.5 * 0.5125 + 0.5 * 1.0, 1.0)
    ours = sfr.Config(gate=1.5, gate_decay=0.5)  # this step's loss: 0.2 < 0.5125 / 1.5 closes at step 3
    state, closed = None, []
    for x in losses:
        scale, state = sfr_authors.gate(ours, x, state, 1.0)
        closed.append(scale == 0.0)
    assert closed == [False, False, False, True, False]
    static = sfr.Config(recipe="authors", gate=0.6, gate_mode="static")
    state, closed = None, []
    for x in losses:
        scale, state = sfr_authors.gate(static, x, state, 1.0)
        closed.append(scale == 0.0)
    assert closed == [False, False, True, False, True]  # last < 0.6


# ----------------------------------------------------------------------------- 6: the head


class TheirHead(nn.Module):
    """Their FlowMatchingHead, re-derived from its description (module order as theirs)."""

    def __init__(self, d_h, d_z, width=1024, n_layers=3):
        super().__init__()
        self.d_z = d_z
        self.time_mlp = nn.Sequential(nn.Linear(d_z, 4 * d_z), nn.SiLU(), nn.Linear(4 * d_z, d_z))
        self.inp = nn.Sequential(nn.Linear(2 * d_z + d_h, width), nn.LayerNorm(width), nn.SiLU())
        self.res = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width))
                                 for _ in range(max(n_layers - 2, 0)))
        self.out = nn.Linear(width, d_z)

    def temb(self, t):
        half = self.d_z // 2
        f = torch.exp(torch.arange(half, dtype=t.dtype) * -(math.log(10000.0) / max(half - 1, 1)))
        e = torch.cat([torch.sin(t[..., None] * f), torch.cos(t[..., None] * f)], -1)
        return F.pad(e, (0, self.d_z % 2))

    def forward(self, z_t, t, h):  # z_t, h: (B, L, .); t: (B,)
        te = self.time_mlp(self.temb(t))[:, None].expand_as(z_t)
        x = self.inp(torch.cat([z_t, te, h], -1))
        for blk in self.res:
            x = x + F.silu(blk(x))
        return self.out(x)


def load_into(theirs, ours):
    for a, b in zip(theirs.parameters(), ours.parameters(), strict=True):
        assert a.shape == b.shape
        a.data.copy_(b.data)


def test_head_parameter_count_and_time_embedding():
    d_z, d_h = 384, 64
    head = sfr_authors.FlowHead(d_z, d_h, 1024, 3)
    n = sum(p.numel() for p in head.parameters())
    temb = d_z * 4 * d_z + 4 * d_z + 4 * d_z * d_z + d_z
    inp = (2 * d_z + d_h) * 1024 + 1024 + 2 * 1024
    block = 1024 * 1024 + 1024 + 2 * 1024  # one residual block: max(3 - 2, 0)
    out = 1024 * d_z + d_z
    assert n == temb + inp + block + out
    assert len(head.blocks) == 1 and len(sfr.FlowHead(d_z, d_h, 1024, 3).blocks) == 2
    e = sfr_authors.timestep_embedding(torch.tensor([0.3]), 5)  # half = 2: frequencies 1 and 1e-4
    expect = [math.sin(0.3), math.sin(3e-5), math.cos(0.3), math.cos(3e-5), 0.0]
    assert torch.allclose(e[0], torch.tensor(expect), atol=1e-7)
    torch.manual_seed(1)
    ours, theirs = sfr_authors.FlowHead(7, 5, 16, 3), TheirHead(5, 7, 16, 3)
    nn.init.normal_(ours.out.weight)
    load_into(theirs, ours)
    z, t, h = torch.randn(2, 3, 7), torch.rand(2), torch.randn(2, 3, 5)
    got = ours(z.flatten(0, 1), t.repeat_interleave(3), h.flatten(0, 1)).view(2, 3, 7)
    assert torch.allclose(got, theirs(z, t, h), atol=1e-6)


# ----------------------------------------------------------------------------- 8: pooling


def test_mean_pooling_whatever_the_model_pools(encoder):
    from sentence_transformers.models import Pooling
    texts = ["the sea sings softly", "arr matey"]
    mean = sfr_encoder.SegmentEncoder("minilm", pooling="mean")
    assert torch.allclose(mean.encode(texts), encoder.encode(texts), atol=1e-5)  # MiniLM pools by mean
    cls = sfr_encoder.SegmentEncoder("minilm")
    cls.model[1] = Pooling(cls.dim, pooling_mode="cls")  # a CLS-pooled model (as BGE is)
    mean.model[1] = Pooling(mean.dim, pooling_mode="cls")
    assert (cls.encode(texts) * encoder.encode(texts)).sum(-1).max() < 0.99  # its own pooling: CLS
    assert torch.allclose(mean.encode(texts), encoder.encode(texts), atol=1e-5)  # 'mean' ignores it


# ----------------------------------------------------------------------------- the oracle: their compute_loss


def their_fm_loss(head, h, labels, z1, z0, t):
    """Their compute_loss, FM part: per-token (v_hat - u)^2 over response positions, weighted by
    (resp_len - pos + 1) / resp_len, normalised by max(1, sum of weights)."""
    mask = (labels != IGNORE).float()
    z_t = t[:, None, None] * z1 + (1 - t[:, None, None]) * z0
    per_tok = (head(z_t, t, h) - (z1 - z0)).pow(2).mean(-1)
    pos = mask.cumsum(1) * mask
    n = mask.sum(1, keepdim=True).clamp(min=1)
    w = ((n - pos + 1) / n * mask).clamp(0, 1) * mask
    return (per_tok * w).sum() / w.sum().clamp(min=1.0)


@pytest.mark.parametrize("k,stride,min_suffix", [(4, 1, 3), (4, 3, 3)])
def test_oracle_loss_on_one_batch(k, stride, min_suffix):
    cfg = tiny_cfg(segment_len=k, stride=stride, min_suffix=min_suffix, head_width=16, seed=3)
    tok, exs, batch = batch_of(PAIRS, cfg)
    model, _, _ = tiny_model(cfg, exs, tok)
    nn.init.normal_(model.head.out.weight, std=0.3)  # a zero output layer would hide the head
    theirs = TheirHead(cfg.n_embd, HashEncoder.dim, 16, 3)
    load_into(theirs, model.head)
    B, T = batch.idx.shape
    lengths = (batch.resp | batch.valid).int().cumsum(1).argmax(1) + 1
    tau, z0, sel = sfr.draw_noise(batch.ids, 0, T, HashEncoder.dim, cfg.seed, lengths, batch.valid, 0)
    out = model(batch, step=0)
    ours = out["aux_sum"] / out["aux_n"].clamp_min(1)
    _, h = model.backbone(batch.idx)
    labels = their_labels(batch, exs)
    z1 = their_targets(labels, k, stride, min_suffix, tok.decode, HashEncoder().encode, HashEncoder.dim)
    ref = their_fm_loss(theirs, h, labels, z1, z0, tau)
    assert torch.allclose(ours, ref, rtol=1e-5), (ours.item(), ref.item())
    # their AR term: HF's shifted cross-entropy over the unshifted labels
    logits, _ = model.backbone(batch.idx)
    ar = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE)
    assert torch.allclose(out["ar_sum"] / out["ar_n"], ar, rtol=1e-5)


def test_both_files_agree_on_our_anchor_rule():
    """sfr_authors.future_segments with our counting and fill is sfr.future_segments."""
    for N in range(0, 40, 3):
        for stride in (1, 2, 4, 32):
            for min_suffix in (1, 3, 16):
                for positions in ("ar", "labels"):
                    assert sfr_authors.future_segments(N, 8, stride, min_suffix, positions, "ours", "mask") == \
                        sfr.future_segments(N, stride, min_suffix, positions)


def test_the_authors_switches_ask_for_their_module():
    """sfr.py alone (sfr_authors not imported) names the module instead of running ours quietly;
    so does building the built-in GPT without sfr_gpt, though a Config that needs no backbone
    (toy/bimodal_head.py's) validates without it."""
    code = ("import sfr\n"
            "sfr.Config().validate()\n"
            "try:\n"
            "    sfr.build_backbone(sfr.Config(), 10)\n"
            "except sfr.UsageError as e:\n"
            "    assert 'import sfr_gpt' in str(e), e\n"
            "else:\n"
            "    raise SystemExit('the GPT ran unregistered')\n"
            "import sfr_gpt\n"
            "for kw in [dict(recipe='authors'), dict(gate=1.5), dict(head_arch='authors'), dict(fill='authors')]:\n"
            "    try:\n"
            "        sfr.Config(**kw).validate()\n"
            "    except sfr.UsageError as e:\n"
            "        assert 'import sfr_authors' in str(e), e\n"
            "    else:\n"
            "        raise SystemExit(f'{kw} accepted')\n"
            "sfr.Config().validate()\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(Path(sfr.__file__).parent))
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize("kw, says", [(dict(ema_teacher=True), "ema_teacher=True needs the teacher's decay"),
                                      (dict(gate=0.8), r"Config.gate=0.8: must be > 1 \(authors: 1.5\) or 0")])
def test_their_switches_refuse_what_their_code_cannot_run(kw, says):
    with pytest.raises(sfr.UsageError, match=says):
        sfr.Config(**kw).validate()
    sfr.Config(ema_teacher=True, ema=0.9).validate()  # the teacher with its decay
    sfr.Config(gate=0.8, gate_mode="static").validate()  # static: L_FM < gate, any positive gate
