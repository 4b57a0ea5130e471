"""toy/bimodal_head.py: why the flow's source must be random (issue 5).

One question, at the level of the head alone (no backbone): a context h whose future
embedding z1 is multi-modal, with unequal weights (default 0.7 / 0.3), is fed to each
head `sfr.py` offers, trained with the same optimiser and steps on the same (h, z1) pairs:

    mse       sfr.regression_token_loss(kind='mse')     one point: E[z1 | h]
    cosine    sfr.regression_token_loss(kind='cosine')  one direction: that of E[z1 | h]
    point     sfr.fm_token_loss with z0 = 0              flow from a point mass (MTP's source,
                                                         paper App. A: the point source)
    gaussian  sfr.fm_token_loss with z0 ~ N(0, I)        SFR's flow (Proposition A.2)
    authors   gaussian as the authors run it: recipe='authors' (their head, 1024 x 3, unit-norm
              targets, the EMA teacher 0.999 blended into the head before each optimiser step);
              the gate and the warm-up act on a backbone, which this toy has not

Flow convention (sfr.py's): tau = 0 is the source, tau = 1 is data, z_tau = tau z1 +
(1 - tau) z0, u = z1 - z0, and the Euler sampler integrates dz/dtau = v from 0 to 1.
With a point source every sample starts at the same z and the velocity field is a
function of (z, tau, h) only, so the ODE is deterministic: one output per context,
whatever the training data. Worse, z_tau = tau z1 names the target for every tau > 0,
so the field can learn to copy it (v = z / tau; its training loss goes to ~0) and the
only thing it learns at the start, z = 0, is E[z1 | h]: the sampler lands on the mean,
like mse. (sfr_ladder.validate refuses this rung for that reason; here it is the point.)
A Gaussian source gives the ODE a different start per sample.

The task: n_ctx contexts, h_c ~ N(0, I) in d_h dims; each context has K modes in z-space
(unit vectors, like sentence embeddings). Below the encoder's 384 dims the modes are
synthetic: random unit vectors whose pairwise cosine is --mode_cos (0.3, the cosine
MiniLM gives two styles of one topic). At d = 384 (--modes minilm) they are real
all-MiniLM-L6-v2 embeddings of one topic written in K different styles, what SFR faces.
Targets are a mode, drawn with the weights, plus isotropic noise of norm ~ noise * D
(D the context's smallest inter-mode distance), renormalised to unit length.

Evaluation, per context: n_eval samples from the head; each goes to its nearest mode if
it lies within radius * D of it, else to 'none'. 'covered' = every mode gets at least
cover * its true weight of the samples; mass per mode against the weights; energy
distance (Szekely) between the samples and as many fresh true samples, divided by D.

Declared before the first run with the 'authors' row: with the teacher's 0.999 blend the head
moves ~1000x slower, so in the same 600 steps it stays near its zero-initialised output and
covers fewer modes than 'gaussian' (its samples stay close to the N(0, I) source).

Run:  python toy/bimodal_head.py            (~1 min on a 2-core CPU: d = 2, 16, 2 seeds)
      python toy/bimodal_head.py --full     (d = 2, 16, 384, 3 seeds, + what the Gaussian head needs at 384-d; ~15 min)
      python toy/bimodal_head.py --help
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sfr  # noqa: E402  (the method; nothing of it is re-implemented here)
import sfr_authors  # noqa: E402  (recipe='authors': their head layout and EMA teacher)
import sfr_encoder  # noqa: E402  (the frozen sentence encoder of the targets)

HEADS = ("mse", "cosine", "point", "gaussian", "authors")
ENCODER_DIM = 384  # all-MiniLM-L6-v2

# ----------------------------------------------------------------------------- the task

TOPICS = ["the sea", "coffee", "trains", "winter", "the desert", "rain", "books", "music",
          "bread", "cats", "the river", "autumn", "computers", "gardens", "the sun", "bicycles",
          "snow", "the market", "clocks", "bridges", "islands", "storms", "libraries", "tea",
          "horses", "the night sky", "volcanoes", "old houses", "the forest", "the moon",
          "mountains", "the city"]
STYLES = ["{t} sings softly under silver light, and the calm wind carries its old song.",
          "Arr, {t} be full of gold and danger, matey, so keep yer cutlass close!",
          "{t} can be described as a system of measurable forces, cycles and energy flows.",
          "I like {t} because it is big and fun and I want to go there with my mom!",
          "Buy now! {t} is on sale today with a money-back guarantee and free shipping.",
          "Pursuant to section 4(b), all matters concerning {t} shall be filed in triplicate."]

_MINILM = {}  # the encoder is loaded once per process (it takes seconds)


def minilm_modes(n_ctx, K, g):
    """(n_ctx, K, 384): context c is a topic; its K modes are MiniLM embeddings of that
    topic written in K styles drawn at random. Real sentence-encoder geometry."""
    if n_ctx > len(TOPICS) or K > len(STYLES):
        raise ValueError(f"--modes minilm has {len(TOPICS)} topics and {len(STYLES)} styles: "
                         f"n_ctx={n_ctx}, K={K} is too many")
    if "enc" not in _MINILM:
        _MINILM["enc"] = sfr_encoder.SegmentEncoder("minilm")
    styles = [torch.randperm(len(STYLES), generator=g)[:K].tolist() for _ in range(n_ctx)]
    texts = [STYLES[s].format(t=TOPICS[c]) for c in range(n_ctx) for s in styles[c]]
    return _MINILM["enc"].encode(texts).view(n_ctx, K, ENCODER_DIM)


def synthetic_modes(n_ctx, K, d, cos, g):
    """(n_ctx, K, d): m_1 uniform on the unit sphere, each other mode at cosine `cos` to it,
    m_k = cos m_1 + sin u_k with u_k a random unit vector orthogonal to m_1. In 2-D the
    only such u are +-(the perpendicular), so a third mode mirrors the second."""
    m1 = torch.nn.functional.normalize(torch.randn(n_ctx, d, generator=g), dim=-1)
    modes = [m1]
    for k in range(1, K):
        u = torch.randn(n_ctx, d, generator=g)
        u = u - (u * m1).sum(-1, keepdim=True) * m1
        if d == 2:  # the only unit vectors orthogonal to m1 are +-perp(m1): alternate the side
            u = torch.stack([-m1[:, 1], m1[:, 0]], -1) * (1 if k % 2 else -1)
        u = torch.nn.functional.normalize(u, dim=-1)
        modes.append(cos * m1 + math.sqrt(1 - cos ** 2) * u)
    return torch.stack(modes, 1)


def mode_gap(modes):
    """(n_ctx,) D: the smallest distance between two modes of a context, the unit of
    noise, radius and energy distance."""
    dist = torch.cdist(modes, modes)  # (C, K, K)
    dist = dist + torch.eye(modes.size(1)) * 1e9
    return dist.flatten(1).min(1).values


def draw_targets(task, ctx, g):
    """z1 for contexts `ctx` (N,): a mode drawn with the weights, plus isotropic noise of
    expected norm noise * D, renormalised to unit length (encoder outputs are unit norm).
    Returns z1 (N, d) and the mode index k (N,)."""
    k = torch.multinomial(task["weights"], len(ctx), replacement=True, generator=g)
    m = task["modes"][ctx, k]  # (N, d)
    d = m.size(1)
    eps = torch.randn(m.shape, generator=g) * (task["noise"] * task["gap"][ctx, None] / math.sqrt(d))
    return torch.nn.functional.normalize(m + eps, dim=-1), k


def make_task(d, a, seed):
    """Contexts h (C, d_h), modes (C, K, d), weights (K,), gap (C,) and a fixed training set."""
    g = torch.Generator().manual_seed(10_000 + seed)
    weights = torch.tensor(a.weights)
    K = len(weights)
    h = torch.randn(a.n_ctx, a.d_h, generator=g)
    if d == ENCODER_DIM and a.modes == "minilm":
        modes = minilm_modes(a.n_ctx, K, g)
    else:
        modes = synthetic_modes(a.n_ctx, K, d, a.mode_cos, g)
    task = {"d": d, "h": h, "modes": modes, "weights": weights, "gap": mode_gap(modes), "noise": a.noise}
    ctx = torch.arange(a.n_ctx).repeat_interleave(a.n_train)  # n_train samples per context
    task["train_ctx"] = ctx
    task["train_z1"], _ = draw_targets(task, ctx, g)
    return task


# ----------------------------------------------------------------------------- the heads (all from sfr.py)


def head_loss(kind, head, h, z1, g):
    """Per-sample loss of one head kind, straight from sfr.py; mean over the batch."""
    if kind in ("mse", "cosine"):
        return sfr.regression_token_loss(head, h, z1, kind).mean()
    tau = torch.rand(h.size(0), generator=g)  # one tau per sample (per sequence in sfr.py)
    # the only difference between the two flows: the source z0 (point mass at 0 vs N(0, I))
    z0 = torch.randn(z1.shape, generator=g) if kind in ("gaussian", "authors") else torch.zeros_like(z1)
    return sfr.fm_token_loss(head, h, z1, tau, z0).mean()


def train_head(kind, task, cfg):
    """Train one head on the task's fixed training set with sfr's optimiser and schedule.
    Same seed -> same init, same batches for every kind; flow noise has its own stream."""
    torch.manual_seed(cfg.seed)
    h_all, z1_all = task["h"][task["train_ctx"]], task["train_z1"]
    mean, std = sfr.target_stats(z1_all, cfg.target_scale)
    z1_all = (z1_all - mean) / std
    head = sfr.flow_head(cfg, task["d"], h_all.size(1))
    opt, sched = sfr.make_optimizer(cfg, head)
    teacher = copy.deepcopy(head).requires_grad_(False) if cfg.ema_teacher else None
    g_batch = torch.Generator().manual_seed(cfg.seed)
    g_flow = torch.Generator().manual_seed(cfg.seed + 1)
    losses = []
    for step in range(cfg.steps):
        idx = torch.randint(len(z1_all), (cfg.batch_size,), generator=g_batch)
        loss = head_loss(kind, head, h_all[idx], z1_all[idx], g_flow)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if teacher is not None:  # their order: blend into the head after backward, before the optimiser
            sfr_authors.teacher_blend(teacher, head, cfg.ema)
        torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.grad_clip or float("inf"))
        opt.step()
        sched.step()
        losses.append(loss.item())
    head.eval()
    return head, (mean, std, z1_all.norm(dim=-1).mean()), sum(losses[-20:]) / len(losses[-20:])


@torch.no_grad()
def sample(kind, head, scale, h, steps, g):
    """(N, d) samples in the original (unit-norm) space, one per row of h (steps: Euler steps)."""
    mean, std, target_norm = scale
    if kind in ("gaussian", "authors"):
        z = sfr.sample_head(head, h, steps, generator=g)
    elif kind == "point":
        z = sfr.sample_head(head, h, steps, z0=torch.zeros(h.size(0), head.out.out_features))  # point source
    else:  # the regression heads are read where they were trained: z = 0, tau = 0
        z = head(torch.zeros(h.size(0), head.out.out_features), torch.zeros(h.size(0)), h)
        if kind == "cosine":  # a direction only: put it at the targets' mean norm
            z = torch.nn.functional.normalize(z, dim=-1) * target_norm
    return z * std + mean


# ----------------------------------------------------------------------------- evaluation


def energy_distance(x, y):
    """Szekely's energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'| (>= 0, 0 iff same law),
    within-set means over distinct pairs. Homogeneous of degree 1 in the scale."""
    n, m = len(x), len(y)
    xy = torch.cdist(x, y).mean()
    xx = torch.cdist(x, x).sum() / (n * (n - 1))
    yy = torch.cdist(y, y).sum() / (m * (m - 1))
    return (2 * xy - xx - yy).item()


def score(task, z, ctx, a, g):
    """Mode coverage, mass per mode and energy distance of samples z (N, d) drawn for
    contexts ctx (N,). Returns per-run means over contexts."""
    K = len(task["weights"])
    gap = task["gap"][ctx]
    dist = (z[:, None, :] - task["modes"][ctx]).norm(dim=-1)  # (N, K)
    near, k = dist.min(1)
    k = torch.where(near <= a.radius * gap, k, torch.full_like(k, K))  # K = 'none'
    C = task["modes"].size(0)
    mass = torch.zeros(C, K + 1).index_put_((ctx, k), torch.ones(len(k)), accumulate=True)
    mass = mass / mass.sum(1, keepdim=True)  # (C, K + 1)
    covered = (mass[:, :K] >= a.cover * task["weights"]).all(1).float()
    truth, _ = draw_targets(task, ctx, g)
    ed = [energy_distance(z[ctx == c], truth[ctx == c]) / task["gap"][c].item() for c in range(C)]
    res = {"covered": covered.mean().item(), "ed": sum(ed) / C, "none": mass[:, K].mean().item()}
    res.update({f"mass{j}": mass[:, j].mean().item() for j in range(K)})
    return res


def run_one(kind, d, a, seed, **over):
    """Train and evaluate one head on one task. `over` overrides head/training options
    (width, steps, target_scale, sample_steps) for the sweep. Returns (metrics, samples)."""
    task = make_task(d, a, seed)
    opts = dict(head_width=a.width, head_layers=a.layers, steps=a.steps, target_scale=a.target_scale,
                sample_steps=a.sample_steps, batch_size=a.batch_size, lr=a.lr, seed=seed)
    if kind == "authors":  # the preset's head, targets and teacher; the toy's steps, batch and lr
        opts = dict(recipe="authors", steps=a.steps, sample_steps=a.sample_steps, batch_size=a.batch_size,
                    lr=a.lr, seed=seed, **a.authors_over)
    opts.update(over)
    sample_steps = opts.pop("sample_steps")  # the samplers' option, not a training one
    cfg = sfr.Config(**opts).validate()
    t0 = time.time()
    head, scale, loss = train_head(kind, task, cfg)
    g = torch.Generator().manual_seed(20_000 + seed)
    ctx = torch.arange(a.n_ctx).repeat_interleave(a.n_eval)
    z = sample(kind, head, scale, task["h"][ctx], sample_steps, g)
    res = score(task, z, ctx, a, g)
    res.update(head=kind, d=d, seed=seed, loss=loss, seconds=time.time() - t0, sample_steps=sample_steps,
               **{k: getattr(cfg, k) for k in ("head_width", "steps", "target_scale")})
    return res, (task, z, ctx)


def run_truth(d, a, seed):
    """The floor: fresh true samples scored like a head's (energy distance ~ 0 up to sampling noise)."""
    task = make_task(d, a, seed)
    g = torch.Generator().manual_seed(30_000 + seed)
    ctx = torch.arange(a.n_ctx).repeat_interleave(a.n_eval)
    z, _ = draw_targets(task, ctx, g)
    res = score(task, z, ctx, a, g)
    res.update(head="truth", d=d, seed=seed)
    return res, (task, z, ctx)


# ----------------------------------------------------------------------------- report


def mean_std(rows, key):
    v = torch.tensor([r[key] for r in rows], dtype=torch.float64)
    return v.mean().item(), (v.std().item() if len(v) > 1 else 0.0)


def summarise(rows, group):
    """Mean and std over seeds of every metric, per group of `group` keys."""
    out = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in group), []).append(r)
    summary = []
    for key, rs in out.items():
        s = dict(zip(group, key), n_seeds=len(rs))
        for m in ("covered", "ed", "none") + tuple(k for k in rs[0] if k.startswith("mass")):
            s[m], s[m + "_std"] = mean_std(rs, m)
        summary.append(s)
    return summary


def table(summary, weights, extra=()):
    K = len(weights)
    cols = list(extra) + ["head", "covered %"] + [f"mass {j + 1} (truth {w:.2f})" for j, w in enumerate(weights)] \
        + ["none", "energy dist / D"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    pm = lambda s, m, f=1.0, p=2: f"{s[m] * f:.{p}f} ± {s[m + '_std'] * f:.{p}f}"
    for s in summary:
        cells = [str(s[e]) for e in extra] + [s["head"], pm(s, "covered", 100, 0)] \
            + [pm(s, f"mass{j}") for j in range(K)] + [pm(s, "none"), pm(s, "ed", p=3)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plane(task, c):
    """Orthonormal basis (2, d) of the plane spanned by the first two modes of context c:
    e1 along mode 1, e2 the part of mode 2 orthogonal to it."""
    m1, m2 = task["modes"][c, 0], task["modes"][c, 1]
    e1 = m1 / m1.norm()
    e2 = m2 - (m2 @ e1) * e1
    return torch.stack([e1, e2 / e2.norm()])


def figure(path, panels, summary, sweep, a, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = ["truth"] + [h for h in HEADS if h in a.heads]
    dims = sorted(panels)
    n_rows = len(dims) + 1
    fig = plt.figure(figsize=(3.0 * len(names), 2.9 * n_rows), constrained_layout=True)
    gs = fig.add_gridspec(n_rows, len(names))
    K = len(a.weights)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:purple"][:K] + ["lightgrey"]
    for i, d in enumerate(dims):
        for j, name in enumerate(names):
            ax = fig.add_subplot(gs[i, j])
            task, z, ctx = panels[d][name]
            c = 0
            B = plane(task, c)
            zc = z[ctx == c]
            dist = (zc[:, None] - task["modes"][c]).norm(dim=-1)
            near, k = dist.min(1)
            k = torch.where(near <= a.radius * task["gap"][c], k, torch.full_like(k, K))
            p = zc @ B.T
            off = (zc - p @ B).norm(dim=-1).median().item()
            size = 60 if zc.std(0).max() < 1e-6 else 8  # a deterministic head: all samples on one dot
            for kk in range(K + 1):
                sel = k == kk
                ax.scatter(p[sel, 0], p[sel, 1], s=size, alpha=0.5, color=colors[kk],
                           label=(f"mode {kk + 1}" if kk < K else "near no mode") if j == 0 else None)
            mp = task["modes"][c] @ B.T
            ax.scatter(mp[:, 0], mp[:, 1], marker="x", s=60, color="black", zorder=3)
            circ = torch.linspace(0, 2 * math.pi, 200)
            ax.plot(torch.cos(circ), torch.sin(circ), lw=0.5, color="grey")
            ax.set_xlim(-1.6, 1.6)
            ax.set_ylim(-1.6, 1.6)
            ax.set_aspect("equal")
            ax.tick_params(labelsize=6)
            if i == 0:
                ax.set_title(name, fontsize=10)
            if (i, j) == (0, 0):
                ax.legend(fontsize=6, loc="lower left", markerscale=1.5)
            if j == 0:
                src = "MiniLM" if d == ENCODER_DIM and a.modes == "minilm" else "synthetic"
                ax.set_ylabel(f"d = {d} ({src} modes)", fontsize=9)
            if d > 2:
                ax.text(0.02, 0.02, f"median off-plane dist {off:.2f}", transform=ax.transAxes, fontsize=6)
    ax = fig.add_subplot(gs[n_rows - 1, : len(names) // 2 + (1 if sweep else 3)])
    for name in HEADS:
        ss = sorted((s for s in summary if s["head"] == name), key=lambda s: s["d"])
        ax.errorbar([str(s["d"]) for s in ss], [100 * s["covered"] for s in ss],
                    [100 * s["covered_std"] for s in ss], marker="o", capsize=3, label=name)
    ax.set_xlabel("dimension d")
    ax.set_ylabel("contexts with every mode covered (%)")
    ax.set_ylim(-5, 105)
    ax.legend(fontsize=7)
    ax.set_title(f"main grid: width {a.width}, {a.steps} steps, '{a.target_scale}' targets", fontsize=9)
    if sweep:
        ax = fig.add_subplot(gs[n_rows - 1, len(names) // 2 + 1:])
        labels = [f"w{s['head_width']} s{s['steps']}\n{s['target_scale']} e{s['sample_steps']}" for s in sweep]
        x = torch.arange(len(sweep)).float()
        ax.bar(x - 0.2, [100 * s["covered"] for s in sweep], 0.4, yerr=[100 * s["covered_std"] for s in sweep],
               label="covered %", color="tab:red")
        ax2 = ax.twinx()
        ax2.bar(x + 0.2, [s["ed"] for s in sweep], 0.4, yerr=[s["ed_std"] for s in sweep],
                label="energy dist / D", color="tab:grey")
        ax2.set_yscale("log")
        ax.set_xticks(x, labels, fontsize=6)
        ax.set_ylim(0, 105)
        ax.set_ylabel("covered %", color="tab:red")
        ax2.set_ylabel("energy distance / D (log)", color="tab:grey")
        ax.set_title(f"gaussian head at d = {ENCODER_DIM}: width w, train steps s, targets, Euler steps e",
                     fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- command line


def overrides(text):
    """'a=1,b=x' -> {'a': 1, 'b': 'x'}, each value parsed as its sfr.Config field's type."""
    types = {f.name: type(getattr(sfr.Config(), f.name)) for f in sfr.dataclasses.fields(sfr.Config)}
    out = {}
    for item in filter(None, text.split(",")):
        k, _, v = item.partition("=")
        if k not in types:
            raise argparse.ArgumentTypeError(f"{k!r} is not an sfr.Config field")
        out[k] = v.lower() in ("1", "true", "yes") if types[k] is bool else types[k](v)
    return out


def parse_args(argv=None):
    ints = lambda s: [int(x) for x in s.split(",") if x]
    floats = lambda s: [float(x) for x in s.split(",") if x]
    words = lambda s: [x for x in s.split(",") if x]
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--full", action="store_true",
                   help="add the d=384 sweep of the gaussian head over --sweep_widths x --sweep_steps x "
                        "--sweep_scales x --sweep_sample_steps (~15 min on a shared 2-core CPU)")
    p.add_argument("--dims", type=ints, default=None,
                   help="dimensions d of z (comma list); default 2,16 (about a minute), with --full 2,16,384")
    p.add_argument("--heads", type=words, default=list(HEADS), help=f"head kinds to train, from {HEADS}")
    p.add_argument("--seeds", type=int, default=None, help="seeds per (d, head) in the main grid; default 2, "
                   "with --full 3")
    p.add_argument("--width", type=int, default=256, help="head hidden width, sfr Config.head_width (authors: 1024)")
    p.add_argument("--layers", type=int, default=3, help="head layers, sfr Config.head_layers (authors: 3)")
    p.add_argument("--steps", type=int, default=600, help="optimiser steps per head (AdamW, sfr's schedule)")
    p.add_argument("--batch_size", type=int, default=128, help="(h, z1) pairs per step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (sfr Config.lr)")
    p.add_argument("--target_scale", choices=("unit", "std"), default="std",
                   help="'unit': unit-norm targets as the encoder gives them (authors' choice and sfr's "
                        "default); 'std': each dim standardised over the training targets (sfr "
                        "Config.target_scale). 'std' by default here so that the main grid isolates the "
                        "source: with 'unit' the gaussian head already fails at d=16 (see the sweep)")
    p.add_argument("--sample_steps", type=int, default=32, help="Euler steps of the flow samplers")
    p.add_argument("--authors_over", type=overrides, default={},
                   help="sfr.Config fields for the 'authors' row, to take one difference away: "
                        "e.g. ema_teacher=false or ema_teacher=false,target_scale=std")
    p.add_argument("--n_ctx", type=int, default=16, help="contexts (each its own h and modes; <= 32 with minilm)")
    p.add_argument("--d_h", type=int, default=64, help="dimension of the context feature h ~ N(0, I)")
    p.add_argument("--weights", type=floats, default=[0.7, 0.3],
                   help="mode weights, one per mode (their number is K; <= 6 with minilm)")
    p.add_argument("--modes", choices=("minilm", "synthetic"), default="minilm",
                   help="at d=384: 'minilm' = real MiniLM embeddings of one topic in K styles, 'synthetic' = "
                        "random unit vectors; any other d is always synthetic")
    p.add_argument("--mode_cos", type=float, default=0.3,
                   help="synthetic modes: cosine between mode 1 and each other mode (MiniLM styles: ~0.3)")
    p.add_argument("--noise", type=float, default=0.05, help="within-mode noise norm, relative to the mode gap D")
    p.add_argument("--n_train", type=int, default=64, help="training pairs per context (a fixed set)")
    p.add_argument("--n_eval", type=int, default=128, help="samples per context drawn from each head")
    p.add_argument("--radius", type=float, default=0.2,
                   help="a sample counts for its nearest mode within radius * D, else 'none' "
                        "(0.2 < 0.3: the 0.7/0.3 mean is 0.3 D from mode 1 and must not count)")
    p.add_argument("--cover", type=float, default=0.5,
                   help="a mode is covered when it gets >= cover * its true weight of the samples")
    p.add_argument("--sweep_widths", type=ints, default=[256, 1024], help="--full sweep: head widths")
    p.add_argument("--sweep_steps", type=ints, default=[600, 1800], help="--full sweep: training steps")
    p.add_argument("--sweep_scales", type=words, default=["unit", "std"], help="--full sweep: target scalings")
    p.add_argument("--sweep_sample_steps", type=ints, default=[32], help="--full sweep: Euler steps")
    p.add_argument("--sweep_seeds", type=int, default=1, help="--full sweep: seeds per setting")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 1 because these matrices are small and extra threads only "
                        "contend (on a shared 2-core machine 2 threads ran 10-40x slower)")
    p.add_argument("--out", default=str(ROOT / "results"), help="folder for bimodal_head.json and bimodal_head.png (--full: bimodal_head_full.png)")
    a = p.parse_args(argv)
    a.dims = a.dims or ([2, 16, 384] if a.full else [2, 16])
    a.seeds = a.seeds or (3 if a.full else 2)
    bad = [h for h in a.heads if h not in HEADS]
    if bad or abs(sum(a.weights) - 1) > 1e-6 or len(a.weights) < 2 or a.seeds < 1 or min(a.dims) < 2:
        p.error(f"need heads in {HEADS} (got {bad}), >= 2 weights summing to 1, seeds >= 1, dims >= 2")
    if min([a.sample_steps] + a.sweep_sample_steps) < 1:
        p.error("--sample_steps / --sweep_sample_steps: the samplers need >= 1 Euler step")
    return a


def main(argv=None):
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    t_start = time.time()
    rows, panels = [], {}
    for d in a.dims:
        panels[d] = {}
        for seed in range(a.seeds):
            res, data = run_truth(d, a, seed)
            rows.append(res)
            if seed == 0:
                panels[d]["truth"] = data
            for kind in a.heads:
                res, data = run_one(kind, d, a, seed)
                rows.append(res)
                if seed == 0:
                    panels[d][kind] = data
                print(f"d={d:4d} {kind:8s} seed {seed}: covered {res['covered']:.2f} ed/D {res['ed']:.3f} "
                      f"loss {res['loss']:.4f} ({res['seconds']:.1f}s)", file=sys.stderr)
    summary = summarise(rows, ("d", "head"))
    sweep_rows, sweep = [], []
    if a.full:
        for w in a.sweep_widths:
            for st in a.sweep_steps:
                for sc in a.sweep_scales:
                    for es in a.sweep_sample_steps:
                        for seed in range(a.sweep_seeds):
                            res, _ = run_one("gaussian", ENCODER_DIM, a, seed, head_width=w, steps=st,
                                             target_scale=sc, sample_steps=es)
                            sweep_rows.append(res)
                            print(f"sweep w{w} s{st} {sc} e{es} seed {seed}: covered {res['covered']:.2f} "
                                  f"ed/D {res['ed']:.3f} ({res['seconds']:.1f}s)", file=sys.stderr)
        sweep = summarise(sweep_rows, ("head", "head_width", "steps", "target_scale", "sample_steps"))
    wall = time.time() - t_start
    command = "python toy/bimodal_head.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"\n### Heads on a {len(a.weights)}-mode p(z1 | h) (weights {a.weights}), mean ± std over "
          f"{a.seeds} seeds; width {a.width}, {a.steps} steps, '{a.target_scale}' targets\n")
    print(table(summary, a.weights, extra=("d",)))
    if sweep:
        print(f"\n### Gaussian head at d = {ENCODER_DIM}: what it takes (mean ± std over {a.sweep_seeds} seeds)\n")
        print(table(sweep, a.weights, extra=("head_width", "steps", "target_scale", "sample_steps")))
    print(f"\n{command}: {wall:.0f} s on {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}")
    os.makedirs(a.out, exist_ok=True)
    json_path = Path(a.out) / "bimodal_head.json"
    saved = json.loads(json_path.read_text()) if json_path.exists() else {}
    saved["full" if a.full else "default"] = {  # each run keeps its own entry; the other one stays
        "command": command, "wall_s": round(wall, 1), "hardware": f"{platform.machine()}, "
        f"{os.cpu_count()} CPUs (shared), torch {torch.__version__}",
        "args": vars(a), "summary": summary, "sweep": sweep, "runs": rows + sweep_rows}
    json_path.write_text(json.dumps(saved, indent=1))
    figure(Path(a.out) / ("bimodal_head_full.png" if a.full else "bimodal_head.png"), panels, summary, sweep, a,
           f"{command}\nscatter: context 0, seed 0, samples projected on the plane of its two modes "
           f"('x'); colour = nearest mode within {a.radius} D, grey = near no mode")
    return summary, sweep


if __name__ == "__main__":
    main()
