"""Tests for sfr.py: formulas recomputed by hand, outside oracles (Meta's flow_matching,
vendi-score, sacrebleu, transformers), samplers on ODEs with known answers, the
ablations' qualitative difference, determinism, export, and bad input.

CPU only, offline. The real MiniLM encoder is loaded once per session (conftest.py).
"""
import copy
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sfr

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
    base = dict(n_layer=1, n_head=2, n_embd=32, block_size=32, head_width=32, k=4, steps=6,
                batch_size=8, lr_warmup=2, eval_every=0, ckpt_every=0, out_dir=str(tmp_path / "out"))
    base.update(kw)
    return sfr.Config(**base)


@pytest.fixture(scope="module")
def demo(encoder):
    """The built-in demo set, tokenised, with real MiniLM targets (k=4, stride 1)."""
    pairs = sfr.demo_pairs()
    tok = sfr.Tokenizer.from_texts([t for pair in pairs for t in pair])
    examples = sfr.prepare(pairs, tok, sfr.Config(k=4, block_size=32), encoder)
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
    """L = L_AR + lam * L_FM from DESIGN Sec. 2, recomputed from the Examples with
    fixed noise: z_tau = tau z1 + (1 - tau) z0, u = z1 - z0, mean over dims,
    w_p = (N - p + 1) / N, L_FM = sum(w loss) / max(1, sum w), one tau per sequence."""
    d_z, V = 3, 10
    torch.manual_seed(0)
    cfg = sfr.Config(n_layer=1, n_head=2, n_embd=16, block_size=16, head_width=16, target_scale=target_scale)
    model = sfr.SFRModel(cfg, sfr.GPT(cfg, V), d_z)
    nn.init.normal_(model.head.out.weight)  # a head that predicts a non-zero velocity
    exs = hand_examples(d_z, case)
    model.fit_target_scale(exs)
    batch = sfr.collate(exs, list(range(len(exs))), pad_id=0, eos_id=1, d_z=d_z)
    B, T = batch.idx.shape
    g = torch.Generator().manual_seed(2)
    tau, z0 = torch.rand(B, generator=g), torch.randn(B, T, d_z, generator=g)
    monkeypatch.setattr(sfr, "draw_noise", lambda ids, step, T_, *a, **k: (tau, z0[:, :T_], torch.rand(B, T_)))
    out = model(batch, step=0)
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
    h = torch.ones(256, 3)
    heads = {}
    for kind in ("flow", "mse"):
        head = sfr.FlowHead(d_z=2, d_h=3, width=64, n_layers=3, d_t=16)
        opt = torch.optim.Adam(head.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(8)
        for _ in range(300):
            z1 = modes[torch.randint(0, 2, (256,), generator=g)]
            if kind == "flow":
                loss = sfr.fm_token_loss(head, h, z1, torch.rand(256, generator=g), torch.randn(256, 2, generator=g))
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
    bb = sfr.GPT(sfr.Config(**cfg), demo.tok.vocab_size)
    plain = sfr.SFRModel(sfr.Config(aux="none", **cfg), copy.deepcopy(bb), d_z)
    flow = sfr.SFRModel(sfr.Config(aux="flow", lam=0.0, **cfg), copy.deepcopy(bb), d_z)
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
    for aux in ("none", "flow"):
        model, hist = sfr.train(tiny(tmp_path / aux, aux=aux, lam=0.0), fresh(demo.examples), demo.tok, progress=False)
        runs[aux] = ([r["ar"] for r in hist], model.backbone.state_dict())
    assert runs["none"][0] == runs["flow"][0]
    assert all(torch.equal(v, runs["flow"][1][k]) for k, v in runs["none"][1].items())


def test_gated_or_warmup_step_sends_no_fm_gradient_to_backbone(demo):
    """grad_box scale 0 (head warm-up, or the gate) detaches h for L_FM: the backbone gets
    exactly the AR gradient while the head still learns."""
    d_z = demo.examples[0].z1.size(1)
    cfg = sfr.Config(n_layer=1, n_head=2, n_embd=32, block_size=32, head_width=32, grad_clip=0.0, gate=1.5)
    torch.manual_seed(0)
    model = sfr.SFRModel(cfg, sfr.GPT(cfg, demo.tok.vocab_size), d_z)
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
    plain, _ = sfr.train(tiny(tmp_path / "p", aux="none", **kw), fresh(demo.examples), demo.tok, progress=False)
    warm, hist = sfr.train(tiny(tmp_path / "w", aux="flow", head_warmup=4, **kw), fresh(demo.examples), demo.tok,
                           progress=False)
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


# ----------------------------------------------------------------------------- a batch with no target


def test_batch_without_any_target_still_trains(demo):
    d_z = demo.examples[0].z1.size(1)
    cfg = sfr.Config(n_layer=1, n_head=2, n_embd=32, block_size=32, head_width=32)
    torch.manual_seed(0)
    model = sfr.SFRModel(cfg, sfr.GPT(cfg, demo.tok.vocab_size), d_z)
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
    _, hist = sfr.train(cfg, fresh(demo.examples), demo.tok, progress=False)
    assert [r["lam"] for r in hist] == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_ema_starts_from_the_warmed_up_head(demo, tmp_path):
    """head_warmup = n, ema = 0.999: after n + 1 steps the EMA *is* the warmed-up head (the
    authors' order would leave it ~ the random init); one step later it is
    lerp(head_n+1, head_n+2, 0.001)."""
    kw = dict(aux="flow", head_warmup=3, ema=0.999, lr_schedule="constant", lr=1e-2)
    m4, _ = sfr.train(tiny(tmp_path / "a", steps=4, **kw), fresh(demo.examples), demo.tok, progress=False)
    for pe, p in zip(m4.ema_head.parameters(), m4.head.parameters()):
        assert torch.equal(pe, p)
    assert m4.head.out.weight.abs().max() > 1e-3  # the head did move away from its zero init
    m5, _ = sfr.train(tiny(tmp_path / "b", steps=5, **kw), fresh(demo.examples), demo.tok, progress=False)
    for pe, p4, p5 in zip(m5.ema_head.parameters(), m4.head.parameters(), m5.head.parameters()):
        torch.testing.assert_close(pe, p4 + 0.001 * (p5 - p4))
        assert not torch.equal(p4, p5)


def test_target_scale_std_gives_unit_variance_training_targets(demo):
    cfg = sfr.Config(target_scale="std", head_width=16, n_embd=32, n_head=2, n_layer=1)
    model = sfr.SFRModel(cfg, sfr.GPT(cfg, demo.tok.vocab_size), demo.examples[0].z1.size(1))
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
