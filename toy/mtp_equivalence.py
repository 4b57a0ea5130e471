"""Is multi-token prediction SFR under restrictions that can be lifted one at a time? (paper App. A)

1. Over random shapes (K, V, hidden size, batch), tau and pi, the F_Delta-FM loss computed
   the flow-matching way (sfr.fdfm_loss) against the MTP cross-entropy (sfr.mtp_loss), and
   their gradients with respect to W, b and h, in float32 and float64.
2. Two training runs of the built-in model, same seed and data order: aux='mtp' and
   aux='ladder' at the MTP end (F_Delta-FM); the largest parameter difference after N steps.
3. One short training run per rung of the ladder from MTP to SFR.
4. Sevriugov & Oseledets Prop. 3.2 on a small discrete problem: the velocity from the exact
   posterior against the marginal velocity by brute force, and a cross-entropy denoiser.

Run:  python toy/mtp_equivalence.py      (CPU; writes results/mtp_equivalence.{json,png})
      python toy/mtp_equivalence.py --help  (the options; runs nothing)
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sfr  # noqa: E402
import sfr_encoder  # noqa: E402  (the frozen sentence encoder of the targets)
import train  # noqa: E402
import sfr_ladder  # noqa: E402  (registers aux='ladder')

TRIALS, STEPS = 40, 50  # random shapes per dtype; training steps per run
RUNGS = [  # lifted cumulatively, one restriction at a time (sfr_ladder.py)
    ("MTP", dict()),
    ("Brier", dict(ladder_divergence="sq")),
    ("+ Gaussian source", dict(ladder_divergence="sq", ladder_source="gaussian")),
    ("+ flow field", dict(ladder_divergence="sq", ladder_source="gaussian", ladder_field="flow")),
    ("+ KL path", dict(ladder_divergence="sq", ladder_source="gaussian", ladder_field="flow", ladder_path="kl")),
    ("+ embedding = SFR", dict(ladder_divergence="sq", ladder_source="gaussian", ladder_field="flow",
                               ladder_target="embedding")),
]


# ----------------------------------------------------------------------------- 1. the lemma, numerically


def random_problem(g, dtype):
    """Random K linear heads q_k = softmax(W_k h + b_k), targets, masks, tau and pi."""
    K, V, C, N = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((1, 7), (2, 600), (1, 65), (1, 48)))
    W = (torch.randn(K, V, C, generator=g, dtype=dtype) * 2 / math.sqrt(C)).requires_grad_()
    b = torch.randn(K, V, generator=g, dtype=dtype).requires_grad_()
    h = torch.randn(N, C, generator=g, dtype=dtype).requires_grad_()
    y = torch.randint(0, V, (N, K), generator=g)
    valid = torch.rand(N, K, generator=g) < 0.8
    tau = torch.rand(N, generator=g, dtype=dtype)
    tau[: N // 4] = torch.tensor([0.0, 1.0], dtype=dtype)[torch.arange(N // 4) % 2]  # the endpoints too
    pi = -torch.rand(V, generator=g, dtype=dtype).log()  # normalised Exp(1) draws: pi ~ Dirichlet(1, ..., 1),
    pi = pi / pi.sum()  # any fixed point of the simplex
    heads = [lambda x, k=k: x @ W[k].T + b[k] for k in range(K)]
    return dict(K=K, V=V, C=C, N=N), (W, b, h), heads, y, valid, tau, pi


def lemma_sweep(trials=40, seed=0):
    """Max |loss diff| and |grad diff| (W, b, h) between F_Delta-FM and MTP, per dtype; also
    head-by-head against plain MTP."""
    res = {}
    for dtype, name in ((torch.float32, "f32"), (torch.float64, "f64")):
        g = torch.Generator().manual_seed(seed)
        loss_d = grad_d = hbh_d = rel_d = 0.0
        for _ in range(trials):
            dims, params, heads, y, valid, tau, pi = random_problem(g, dtype)
            n = dims["N"]  # normalised as trained: sum over heads, mean over positions (Gloeckle et al.)
            mtp = sfr.mtp_loss(params[2], heads, y, valid, head_by_head=False).sum() / n
            fm = sfr.fdfm_loss(params[2], heads, y, valid, tau, pi, "kl").sum() / n
            g_mtp = torch.autograd.grad(mtp, params)
            g_fm = torch.autograd.grad(fm, params)
            hbh = sfr.mtp_loss(params[2], heads, y, valid, head_by_head=True).sum() / n
            g_hbh = torch.autograd.grad(hbh, params)
            loss_d = max(loss_d, (mtp - fm).abs().item())
            rel_d = max(rel_d, (mtp - fm).abs().item() / max(1e-30, mtp.abs().item()))
            grad_d = max(grad_d, max((a - c).abs().max().item() for a, c in zip(g_mtp, g_fm)))
            hbh_d = max(hbh_d, max((a - c).abs().max().item() for a, c in zip(g_mtp, g_hbh)))
        res[name] = dict(loss=loss_d, loss_rel=rel_d, grad=grad_d, head_by_head_grad=hbh_d)
    return res


# ----------------------------------------------------------------------------- 2, 3. training runs


def demo_data(cfg):
    pairs = train.demo_pairs()
    tok = train.Tokenizer.from_texts([t for p in pairs for t in p], cfg.tokenizer)
    return pairs, tok


def run(steps, encoder=None, **kw):
    """Train the built-in model on the demo set; returns (model, history)."""
    cfg = train.RunConfig(steps=steps, eval_every=0, ckpt_every=0, out_dir="/tmp/mtp_equivalence", **kw).validate()
    pairs, tok = demo_data(cfg)
    train_set = sfr.prepare(pairs, tok, cfg, encoder)
    return sfr.train(cfg, train_set, tok, None, log=lambda s: None)


def max_param_diff(m1, m2):
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    return max((s1[k].double() - s2[k].double()).abs().max().item() for k in s1)


def training_equivalence(steps):
    res, curves = {}, {}
    for dtype, name in ((torch.float32, "f32"), (torch.float64, "f64")):
        torch.set_default_dtype(dtype)
        try:
            m1, h1 = run(steps, aux="mtp")
            m2, h2 = run(steps, aux="ladder")  # every ladder value at the MTP end: F_Delta-FM
        finally:
            torch.set_default_dtype(torch.float32)
        res[name] = dict(max_param_diff=max_param_diff(m1, m2),
                         max_loss_diff=max(abs(a["ar"] + a["aux"] - b["ar"] - b["aux"]) for a, b in zip(h1, h2)))
        curves[name] = ([r["ar"] + r["aux"] for r in h1], [r["ar"] + r["aux"] for r in h2])
    return res, curves


def ladder_runs(steps):
    """One run per rung (same seed, data order and backbone init), and the SFR end against aux='sfr'."""
    encoder = sfr_encoder.SegmentEncoder("minilm")
    out = {}
    for name, kw in RUNGS:
        t0 = time.time()
        model, hist = run(steps, encoder=encoder, aux="ladder", **kw)
        tail = hist[-10:]
        out[name] = dict(config=kw, first_ar=hist[0]["ar"], first_aux=hist[0]["aux"],
                         final_ar=sum(r["ar"] for r in tail) / len(tail), final_aux=sum(r["aux"] for r in tail) / len(tail),
                         ar=[r["ar"] for r in hist], aux=[r["aux"] for r in hist], seconds=time.time() - t0)
        if name.endswith("SFR"):
            sfr_model, sfr_hist = run(steps, encoder=encoder, aux="sfr")
            out[name]["max_param_diff_vs_aux_sfr"] = max_param_diff(model, sfr_model)
            out[name]["max_loss_diff_vs_aux_sfr"] = max(abs(a["aux"] - b["aux"]) for a, b in zip(hist, sfr_hist))
    t0 = time.time()
    model, hist = run(steps, aux="none")
    out["no aux (next-token only)"] = dict(config={"aux": "none"}, first_ar=hist[0]["ar"], final_ar=sum(
        r["ar"] for r in hist[-10:]) / 10, ar=[r["ar"] for r in hist], seconds=time.time() - t0)
    return out


# ----------------------------------------------------------------------------- 4. Prop. 3.2 on a small problem


def marginal_velocity_by_enumeration(log_p1, l_tau, tau, beta):
    """E[u | l_tau] from its definition, sum_x1 int u p(l0) p(x1) delta(l_tau - path) dl0 over
    the same without u: given x1 the delta fixes l0 = (l_tau - tau beta e(x1)) / (1 - tau), so
    each integral is a sum over x1 of u(l0, x1) p(x1) N(l0; 0, I) (the Jacobian cancels).
    Uses neither the posterior formula nor Prop. 3.2. l_tau: (N, V); tau: (N,)."""
    V = log_p1.numel()
    e = torch.eye(V, dtype=l_tau.dtype)  # (V, V): row x1 = e(x1)
    t = tau[:, None, None]
    l0 = (l_tau[:, None, :] - t * beta * e) / (1 - t)  # (N, x1, V)
    u = beta * e - l0  # conditional velocity l1 - l0
    log_w = log_p1 - 0.5 * (l0 ** 2).sum(-1)  # (N, x1): log p(x1) + log N(l0; 0, I) + const
    return (log_w.softmax(-1)[..., None] * u).sum(1)


def marginal_velocity_by_kernel(log_p1, l_tau, tau, beta, n=2_000_000, bw=0.08, seed=0):
    """A cruder, fully sampled estimate: draw (l0, x1) and tau on a grid point, keep the
    samples whose l_tau lands near the query (Gaussian kernel), average their u."""
    g = torch.Generator().manual_seed(seed)
    V = log_p1.numel()
    out = []
    for q, t in zip(l_tau, tau):
        x1 = torch.multinomial(log_p1.exp(), n, replacement=True, generator=g)
        l0 = torch.randn(n, V, generator=g, dtype=l_tau.dtype)
        l1 = beta * F.one_hot(x1, V).to(l_tau.dtype)
        lt = (1 - t) * l0 + t * l1
        w = torch.exp(-0.5 * ((lt - q) ** 2).sum(-1) / bw ** 2)
        out.append((w[:, None] * (l1 - l0)).sum(0) / w.sum())
    return torch.stack(out)


def path_points(log_p1, beta, n, seed, dtype=torch.float64):
    """Points (l_tau, tau) drawn from the path itself, tau in [0.1, 0.8]."""
    g = torch.Generator().manual_seed(seed)
    V = log_p1.numel()
    tau = 0.1 + 0.7 * torch.rand(n, generator=g, dtype=dtype)
    x1 = torch.multinomial(log_p1.exp().float(), n, replacement=True, generator=g)
    l0 = torch.randn(n, V, generator=g, dtype=dtype)
    return (1 - tau[:, None]) * l0 + tau[:, None] * beta * F.one_hot(x1, V).to(dtype), tau


def train_denoiser(log_p1, beta, steps=1500, batch=512, width=128, seed=0):
    """An MLP P_theta(x1 | l_tau, tau) trained by cross-entropy only (Sevriugov & Oseledets)."""
    torch.manual_seed(seed)
    V = log_p1.numel()
    net = nn.Sequential(nn.Linear(V + 1, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, V))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    p1 = log_p1.exp().float()
    for _ in range(steps):
        x1 = torch.multinomial(p1, batch, replacement=True)
        tau = torch.rand(batch) * 0.9
        l_tau = (1 - tau[:, None]) * torch.randn(batch, V) + tau[:, None] * beta * F.one_hot(x1, V).float()
        loss = F.cross_entropy(net(torch.cat([l_tau, tau[:, None]], -1)), x1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return lambda l_tau, tau: net(torch.cat([l_tau, tau[:, None]], -1).float()).softmax(-1).to(l_tau.dtype)


def prop32(V=5, beta=3.0, seed=0, denoiser_steps=1000, kernel=False):
    g = torch.Generator().manual_seed(seed)
    log_p1 = torch.randn(V, generator=g, dtype=torch.float64).log_softmax(-1)
    l_tau, tau = path_points(log_p1, beta, 64, seed + 1)
    v_exact = sfr_ladder.kl_geodesic_velocity(sfr_ladder.kl_path_posterior(log_p1, l_tau, tau, beta), l_tau, tau, beta)
    v_enum = marginal_velocity_by_enumeration(log_p1, l_tau, tau, beta)
    scale = v_exact.norm(dim=-1).mean().item()
    res = dict(V=V, beta=beta, n_points=len(tau), mean_velocity_norm=scale,
               posterior_vs_enumeration_max_abs=(v_exact - v_enum).abs().max().item())
    if kernel:
        v_ker = marginal_velocity_by_kernel(log_p1, l_tau[:8], tau[:8], beta)
        res["posterior_vs_kernel_mc_rel"] = ((v_exact[:8] - v_ker).norm(dim=-1) / v_exact[:8].norm(dim=-1)).mean().item()
    q_theta = train_denoiser(log_p1, beta, steps=denoiser_steps, seed=seed)
    with torch.no_grad():
        v_theta = sfr_ladder.kl_geodesic_velocity(q_theta(l_tau, tau), l_tau, tau, beta)
    prior = sfr_ladder.kl_geodesic_velocity(log_p1.exp().expand_as(l_tau), l_tau, tau, beta)  # the posterior ignored
    rel = lambda v: ((v - v_exact).norm(dim=-1) / v_exact.norm(dim=-1)).mean().item()  # noqa: E731
    res.update(denoiser_rel_err=rel(v_theta), prior_only_rel_err=rel(prior))
    return res


# ----------------------------------------------------------------------------- report


def parse_args(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=TRIALS, help="random shapes per dtype (lemma)")
    p.add_argument("--steps", type=int, default=STEPS, help="training steps per run")
    p.add_argument("--out", default=str(ROOT / "results"), help="folder of the .json and .png")
    a = p.parse_args(argv)
    for name in ("trials", "steps"):
        if getattr(a, name) < 1:
            p.error(f"--{name}={getattr(a, name)}: must be >= 1")
    return a


def main(argv=None):
    a = parse_args(argv)
    t_start = time.time()
    torch.set_num_threads(1)
    TRIALS, STEPS = a.trials, a.steps
    lemma = lemma_sweep(TRIALS)
    train_eq, curves = training_equivalence(STEPS)
    rungs = ladder_runs(STEPS)
    p32 = prop32()
    result = {
        "max_loss_diff_f32": lemma["f32"]["loss"], "max_loss_diff_f64": lemma["f64"]["loss"],
        "max_rel_loss_diff_f32": lemma["f32"]["loss_rel"], "max_rel_loss_diff_f64": lemma["f64"]["loss_rel"],
        "max_grad_diff_f32": lemma["f32"]["grad"], "max_grad_diff_f64": lemma["f64"]["grad"],
        "max_head_by_head_grad_diff_f32": lemma["f32"]["head_by_head_grad"],
        "max_head_by_head_grad_diff_f64": lemma["f64"]["head_by_head_grad"],
        "max_param_diff_after_training": train_eq["f64"]["max_param_diff"],  # float64 runs
        "max_param_diff_after_training_f32": train_eq["f32"]["max_param_diff"],
        "max_train_loss_diff_f32": train_eq["f32"]["max_loss_diff"],
        "max_train_loss_diff_f64": train_eq["f64"]["max_loss_diff"],
        "training_steps": STEPS, "lemma_trials_per_dtype": TRIALS,
        "rungs": {k: {kk: vv for kk, vv in v.items() if kk not in ("ar", "aux")} for k, v in rungs.items()},
        "prop32": p32, "seconds": None,
    }
    result["seconds"] = time.time() - t_start
    print(f"\n## F_Delta-FM vs MTP ({TRIALS} random shapes per dtype, K 1-6, V 2-599, C 1-64, N 1-47, tau in [0, 1])\n")
    print("| dtype | max abs loss diff | max rel loss diff | max abs grad diff (W, b, h) | head-by-head vs plain grad |")
    print("|---|---|---|---|---|")
    for d in ("f32", "f64"):
        r = lemma[d]
        print(f"| {d} | {r['loss']:.2e} | {r['loss_rel']:.2e} | {r['grad']:.2e} | {r['head_by_head_grad']:.2e} |")
    print(f"\n## Training, aux='mtp' vs aux='ladder' at the MTP end ({STEPS} steps, same seed and data order)\n")
    print("| dtype | max param diff | max loss diff over the run |\n|---|---|---|")
    for d in ("f32", "f64"):
        print(f"| {d} | {train_eq[d]['max_param_diff']:.2e} | {train_eq[d]['max_loss_diff']:.2e} |")
    print(f"\n## The ladder ({STEPS} steps each, lam = 1; aux is on each rung's own scale)\n")
    print("| rung | L_AR first | L_AR last 10 | L_aux first | L_aux last 10 | s |\n|---|---|---|---|---|---|")
    for name, r in rungs.items():
        aux = (f"{r['first_aux']:.4f} | {r['final_aux']:.4f}") if "final_aux" in r else "- | -"
        print(f"| {name} | {r['first_ar']:.4f} | {r['final_ar']:.4f} | {aux} | {r.get('seconds', 0):.1f} |")
    sfr_end = rungs["+ embedding = SFR"]
    print(f"\nSFR end vs aux='sfr': max param diff {sfr_end['max_param_diff_vs_aux_sfr']:.2e}, "
          f"max aux loss diff {sfr_end['max_loss_diff_vs_aux_sfr']:.2e}")
    print(f"\n## Prop. 3.2 (Sevriugov & Oseledets), V={p32['V']}, beta={p32['beta']}, {p32['n_points']} points\n")
    print("| check | error |\n|---|---|")
    print(f"| posterior velocity vs enumeration, max abs | {p32['posterior_vs_enumeration_max_abs']:.2e} |")
    if "posterior_vs_kernel_mc_rel" in p32:
        print(f"| posterior velocity vs kernel Monte-Carlo (8 points), mean rel | {p32['posterior_vs_kernel_mc_rel']:.3f} |")
    print(f"| cross-entropy denoiser velocity, mean rel | {p32['denoiser_rel_err']:.3f} |")
    print(f"| prior-only velocity (no learning), mean rel | {p32['prior_only_rel_err']:.3f} |")
    out = Path(a.out)
    out.mkdir(exist_ok=True)
    (out / "mtp_equivalence.json").write_text(json.dumps(result, indent=1))
    print("\n" + json.dumps({k: v for k, v in result.items() if k not in ("rungs", "prop32")}, indent=1))
    plot(curves, rungs, out / "mtp_equivalence.png")
    print(f"\nwrote {out}/mtp_equivalence.json and .png in {time.time() - t_start:.1f}s")


def plot(curves, rungs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    mtp, fm = curves["f32"]
    ax[0].plot(mtp, lw=4, alpha=0.4, label="MTP cross-entropy (aux='mtp')")
    ax[0].plot(fm, "k--", lw=1, label="F_Delta-FM (aux='ladder', MTP end)")
    ax[0].set(title="same seed, same data: the curves coincide", xlabel="step", ylabel="L_AR + L_aux")
    ax[0].legend()
    for name, r in rungs.items():
        ax[1].plot(r["ar"], label=name)
        if "aux" in r:
            ax[2].plot(r["aux"], label=name)
    ax[1].set(title="L_AR on each rung", xlabel="step", ylabel="next-token cross-entropy")
    ax[2].set(title="L_aux on each rung (own scale)", xlabel="step", yscale="log")
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
