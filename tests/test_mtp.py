"""MTP as SFR with five restrictions (paper App. A): the lemma, the ladder's two ends, the
head-by-head backward, and Sevriugov & Oseledets' Prop. 3.2. CPU, float64 where tight."""
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import sfr
import train
import sfr_ladder

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "toy"))
from mtp_equivalence import marginal_velocity_by_enumeration, random_problem, path_points, train_denoiser  # noqa: E402

D64 = torch.float64


@pytest.mark.parametrize("seed", range(6))
def test_fdfm_equals_mtp_loss_and_gradients(seed):
    """Lemma: the F_Delta-FM loss (point source, straight path, constant field, induced KL)
    equals the MTP cross-entropy at every tau, and so do the gradients in W, b and h."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(3):
        dims, params, heads, y, valid, tau, pi = random_problem(g, D64)
        mtp = sfr.mtp_loss(params[2], heads, y, valid, head_by_head=False)
        fm = sfr.fdfm_loss(params[2], heads, y, valid, tau, pi, "kl")
        assert mtp.shape == fm.shape == (dims["K"],)
        torch.testing.assert_close(fm, mtp, rtol=1e-12, atol=1e-10)
        for a, b in zip(torch.autograd.grad(mtp.sum(), params), torch.autograd.grad(fm.sum(), params)):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("gap", [46.0, 200.0, 700.0])
def test_fdfm_equals_cross_entropy_for_a_confidently_wrong_head(gap):
    """Float64, V = 100, the head puts logit `gap` on a wrong token: -log q(y) ~ gap. Forming
    pi + (q - pi) literally cancels to 0 there (708.4 with zero gradient at gap 46); through log q
    the loss and its gradient are the cross-entropy's to ~1e-12."""
    V, N = 100, 6
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(N, V, generator=g, dtype=torch.float64)
    y = torch.randint(1, V, (N, 1), generator=g)
    logits[:, 0] += gap  # all the mass on token 0, never the target
    pi = torch.full((V,), 1.0 / V, dtype=torch.float64)
    tau = torch.rand(N, generator=g, dtype=torch.float64)
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    fd = sfr.fdfm_loss(torch.eye(N, dtype=torch.float64), [lambda h: h @ a], y, torch.ones(N, 1, dtype=torch.bool),
                       tau, pi)[0]
    ce = F.cross_entropy(b, y[:, 0], reduction="sum")
    assert ce.item() > gap * N * 0.9
    assert abs(fd.item() - ce.item()) <= 1e-12 * ce.item()
    ga, gb = torch.autograd.grad(fd, a)[0], torch.autograd.grad(ce, b)[0]
    assert (ga - gb).abs().max() <= 1e-12 * gb.abs().max()


def test_fdfm_loss_does_not_depend_on_tau_but_does_on_targets():
    g = torch.Generator().manual_seed(0)
    _, params, heads, y, valid, tau, pi = random_problem(g, D64)
    base = sfr.fdfm_loss(params[2], heads, y, valid, tau, pi)
    for t in (0.0, 0.37, 1.0):
        torch.testing.assert_close(sfr.fdfm_loss(params[2], heads, y, valid, torch.full_like(tau, t), pi), base)
    V = pi.numel()
    assert not torch.allclose(sfr.fdfm_loss(params[2], heads, (y + 1) % V, valid, tau, pi), base)


def test_brier_variant_by_hand():
    """divergence='sq': mean over the V dims of (q - e(y))^2 per head, i.e. Brier / V."""
    q = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]], dtype=D64)
    h = torch.zeros(1, 1, dtype=D64)
    heads = [lambda x, r=r: q[r].log().expand(x.size(0), 3) for r in range(2)]  # softmax(log q) = q
    y = torch.tensor([[0, 2]])
    out = sfr.fdfm_loss(h, heads, y, torch.ones(1, 2, dtype=torch.bool), torch.tensor([0.6], dtype=D64),
                        torch.full((3,), 1 / 3, dtype=D64), "sq")
    brier = torch.tensor([0.5 ** 2 + 0.3 ** 2 + 0.2 ** 2, 0.1 ** 2 + 0.1 ** 2 + 0.2 ** 2], dtype=D64)  # 0.38, 0.06
    torch.testing.assert_close(out, brier / 3, rtol=0, atol=1e-15)


def _tiny(aux, **kw):
    return train.RunConfig(aux=aux, n_layer=1, n_embd=16, n_head=2, head_width=16, seed=3, **kw).validate()


def _batch(V, d_z=None, B=3, seed=0):
    """A collated batch of random examples; with d_z, random unit targets on every position."""
    g = torch.Generator().manual_seed(seed)
    exs = []
    for _ in range(B):
        P, N = (int(torch.randint(1, 6, (1,), generator=g)) for _ in range(2))
        ex = sfr.Example(torch.randint(2, V, (P,), generator=g).tolist(), torch.randint(2, V, (N,), generator=g).tolist())
        if d_z:
            ex.z1, ex.valid = F.normalize(torch.randn(N, d_z, generator=g), dim=-1), torch.ones(N, dtype=torch.bool)
        exs.append(ex)
    return sfr.collate(exs, list(range(B)), 0, 1, d_z or 1)


def _model_loss_and_grads(cfg, V, batch, d_z=1, dtype=D64):
    torch.manual_seed(cfg.seed)
    model = sfr.SFRModel(cfg, sfr.build_backbone(cfg, V), d_z).to(dtype)
    batch = sfr.Batch(*(t.to(dtype) if t.is_floating_point() else t for t in vars(batch).values()))
    out = model(batch, step=5)
    loss = out["ar_sum"] / out["ar_n"] + out["aux_sum"] / out["aux_n"].clamp_min(1)
    loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_ladder_mtp_end_is_mtp():
    """aux='ladder' with every value at the MTP end: the same loss and gradients as aux='mtp'."""
    V, batch = 11, _batch(11)
    out_m, g_m = _model_loss_and_grads(_tiny("mtp", mtp_k=3), V, batch)
    out_l, g_l = _model_loss_and_grads(_tiny("ladder", mtp_k=3), V, batch)
    for k in ("ar_sum", "ar_n", "aux_sum", "aux_n"):
        torch.testing.assert_close(out_l[k], out_m[k], rtol=1e-12, atol=1e-12)
    assert out_m["aux_sum"] > 0 and g_m.keys() == g_l.keys()
    for n in g_m:
        torch.testing.assert_close(g_l[n], g_m[n], rtol=1e-10, atol=1e-12)


def test_ladder_sfr_end_is_sfr():
    """Every value at the SFR end: aux='sfr' exactly (same noise, weights, normaliser)."""
    V, d_z = 11, 6
    batch = _batch(V, d_z)
    sfr_end = dict(ladder_source="gaussian", ladder_field="flow", ladder_target="embedding", ladder_divergence="sq")
    out_f, g_f = _model_loss_and_grads(_tiny("sfr"), V, batch, d_z, torch.float32)
    out_l, g_l = _model_loss_and_grads(_tiny("ladder", **sfr_end), V, batch, d_z, torch.float32)
    assert torch.equal(out_l["aux_sum"], out_f["aux_sum"]) and torch.equal(out_l["aux_n"], out_f["aux_n"])
    assert g_f.keys() == g_l.keys()
    assert all(torch.equal(g_l[n], g_f[n]) for n in g_f)
    mse = _model_loss_and_grads(_tiny("mse"), V, batch, d_z, torch.float32)[0]  # point source + constant field
    point = _model_loss_and_grads(_tiny("ladder", ladder_target="embedding", ladder_divergence="sq"), V, batch, d_z,
                                  torch.float32)[0]
    assert torch.equal(point["aux_sum"], mse["aux_sum"])


def test_head_by_head_gives_the_plain_gradients():
    torch.manual_seed(0)
    C, V, K, N = 8, 50, 4, 20
    layers = [torch.nn.Linear(C, C).double() for _ in range(K - 1)]
    unembed = torch.nn.Linear(C, V, bias=False).double()
    heads = [unembed] + [lambda h, f=f: unembed(torch.tanh(f(h))) for f in layers]
    params = [unembed.weight] + [p for f in layers for p in f.parameters()]
    h = torch.randn(N, C, dtype=D64, requires_grad=True)
    y, valid = torch.randint(0, V, (N, K)), torch.rand(N, K) < 0.7
    grads = []
    for hbh in (False, True):
        loss = sfr.mtp_loss(h * 2, heads, y, valid, head_by_head=hbh)  # h * 2: the trunk's graph is traversed too
        grads.append(torch.autograd.grad(loss.sum(), [h] + params))
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)
    # and through the model: aux='mtp' with the option on and off
    batch = _batch(13)
    _, g_on = _model_loss_and_grads(_tiny("mtp", head_by_head=True), 13, batch)
    _, g_off = _model_loss_and_grads(_tiny("mtp", head_by_head=False), 13, batch)
    for n in g_off:
        torch.testing.assert_close(g_on[n], g_off[n], rtol=1e-12, atol=1e-14)


def test_future_tokens_shift():
    batch = _batch(20, B=2)
    y_k, valid_k = sfr.future_tokens(batch, 3)
    assert torch.equal(y_k[..., 0], batch.y) and torch.equal(valid_k[..., 0], batch.resp)
    T = batch.y.size(1)
    assert torch.equal(y_k[:, : T - 2, 2], batch.y[:, 2:]) and not valid_k[:, T - 2:, 2].any()


@pytest.mark.parametrize("kw, words", [
    (dict(ladder_source="gaussian"), "ladder_divergence='sq'"),
    (dict(ladder_source="gaussian", ladder_field="flow", ladder_divergence="sq", ladder_target="embedding",
          ladder_path="kl"), "KL geodesic"),
    (dict(ladder_field="flow", ladder_divergence="sq"), "ladder_source='gaussian'"),
    (dict(ladder_path="kl"), "ladder_divergence='sq'"),
    (dict(mtp_k=1), "K >= 2"),
    (dict(ladder_field="sideways"), "must be one of"),
])
def test_refused_rungs_name_the_fix(kw, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(")):
        train.RunConfig(aux="ladder", **kw).validate()


@pytest.mark.parametrize("kw, words", [
    (dict(hidden_layer=2), "Config.hidden_layer=2: MTP heads share the unembedding"),
    (dict(head_warmup=3), "Config.head_warmup / Config.gate"),
    (dict(gate=1.5), "Config.head_warmup / Config.gate"),
])
def test_mtp_refuses_another_hidden_layer_and_the_flow_head_switches(kw, words):
    sfr.Config(aux="mtp").validate()  # the defaults pass
    with pytest.raises(sfr.UsageError, match=words):
        sfr.Config(aux="mtp", **kw).validate()


def test_kl_geodesic_prop32():
    """Sevriugov & Oseledets Prop. 3.2 on a 5-token problem: the velocity from the exact
    posterior equals the marginal velocity by enumeration, and a denoiser trained only with
    cross-entropy gets within 10% of it (measured 5.7%; the prior alone is > 100% off)."""
    beta = 3.0
    log_p1 = torch.tensor([2.0, 0.5, 0.0, -1.0, 1.0], dtype=D64).log_softmax(-1)
    l_tau, tau = path_points(log_p1, beta, 64, seed=1)
    v = sfr_ladder.kl_geodesic_velocity(sfr_ladder.kl_path_posterior(log_p1, l_tau, tau, beta), l_tau, tau, beta)
    v_enum = marginal_velocity_by_enumeration(log_p1, l_tau, tau, beta)
    torch.testing.assert_close(v, v_enum, rtol=1e-12, atol=1e-12)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny MLP: one thread is faster, and the run is reproducible
    try:
        q_theta = train_denoiser(log_p1, beta, steps=800, batch=256, width=64)
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        v_theta = sfr_ladder.kl_geodesic_velocity(q_theta(l_tau, tau), l_tau, tau, beta)
    rel = ((v_theta - v).norm(dim=-1) / v.norm(dim=-1)).mean().item()
    prior = sfr_ladder.kl_geodesic_velocity(log_p1.exp().expand_as(l_tau), l_tau, tau, beta)
    assert rel < 0.1 < 1.0 < ((prior - v).norm(dim=-1) / v.norm(dim=-1)).mean().item()
    assert math.isfinite(rel)


def test_diagnostics_report_the_aux_gradient_share_for_mtp():
    """sfr.diagnostics covers aux='mtp' (no flow head): the share is in (0, 1) at lam = 1 and
    exactly 0 at lam = 0, where the aux loss cannot move the backbone."""
    pairs = train.demo_pairs()
    tok = train.Tokenizer.from_texts([t for p in pairs for t in p], "word")
    shares = {}
    for lam in (1.0, 0.0):
        cfg = sfr.Config(aux="mtp", mtp_k=3, lam=lam, n_layer=1, n_embd=32, n_head=2, block_size=32)
        examples = sfr.prepare(pairs, tok, cfg)
        torch.manual_seed(0)
        model = sfr.SFRModel(cfg, sfr.build_backbone(cfg, tok.vocab_size), 1)
        batch = sfr.collate(examples[:8], list(range(8)), tok.pad_id, tok.eos_id, 1)
        res = sfr.diagnostics(model, batch, cfg, step=0)
        assert "shuffle_gap" not in res  # no flow head to shuffle h under
        shares[lam] = res["aux_grad_share"]
    assert 0.0 < shares[1.0] < 1.0
    assert shares[0.0] == 0.0


@pytest.mark.parametrize("argv, code", [(["--help"], 0), (["--bogus"], 2), (["--steps=0"], 2)])
def test_toy_command_lines_run_nothing_on_help_or_a_bad_flag(argv, code, capsys, monkeypatch):
    import mtp_equivalence
    import mtp_memory
    ran = []
    monkeypatch.setattr(mtp_equivalence, "lemma_sweep", lambda *a, **k: ran.append("lemma"))
    monkeypatch.setattr(mtp_memory, "measure", lambda *a, **k: ran.append("measure"))
    monkeypatch.setattr(mtp_memory.subprocess, "run", lambda *a, **k: ran.append("child"))
    for main, args in ((mtp_equivalence.main, argv), (mtp_memory.main, argv[:1] if code == 0 else ["--bogus"])):
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == code
    assert ran == []  # nothing measured, nothing written
