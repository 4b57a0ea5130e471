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
    L_fm, L_ar = float(fm_sum / max(1.0, w_sum)), float(ce_sum / n_ce)
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
