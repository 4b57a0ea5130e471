"""toy/collapse.py: where does cross-entropy lose diversity *below its data*, and what does
SFR do there? Four regimes of one persona task whose true distribution is known exactly.

Persona i answers query q with

    about <topic q> | <span: G shared generic words> | <2 words of mode m> | <2 style words of persona i>

and picks mode m with probability p_i(m) = base[(m - i) mod M], base ∝ (M, ..., 1). The
legal responses can be enumerated (M modes x P styles per query), so every distribution
below is exact: the probability temperature-T sampling (sfr.generate) gives each legal
response, from persona.tempered_logprobs. toy/persona.py found that on the prompts it
trains on, SFT reproduces its own data (faithful memorisation). Collapse below the data can
only come from what the model does beyond them, which is what these regimes ask:

  pretrain   pretrain on every persona x query with the full mode distribution (plain
             cross-entropy; annotated for `anchor`), then fine-tune on a narrow set (a few
             personas, a few queries, few examples). Measured on the fine-tuning prompts, on the
             fine-tuned personas' other queries and on the other personas, against the truth
             and against the pretrained model.
  heldout    one response per prompt, as in a usual SFT set: each persona is trained on a
             window of its queries; on the persona x query pairs it never saw, the truth is
             p_i. Does SFT generalise p_i, collapse onto the majority mode, or blend?
  longrange  a long shared span (G words, more than the target's k) between the persona and
             the point where mode and style are chosen: does the model blend styles there?
  imbalance  one rare persona (few examples) among frequent ones: is its style or its mode
             distribution absorbed by the majority?

Methods (every one a config of sfr.py; see METHODS, the one place they are defined): sft,
mtp, sfr, sfr_std, null, null_std (sfr.Config.null_targets: sfr.train shuffles the targets),
mse, and anchor (annotation-anchored: "<modeM>" before each response, pretraining included;
at inference the annotation is sampled first and summed over). Per (regime, seed) every
method starts from the same backbone (the same pretrained weights, or the same seed's init)
and sees the same data in the same order.

Run:  python toy/collapse.py             quick look: the pretrain regime, sft vs sfr vs its null, 2 seeds
      python toy/collapse.py --full      the declared grid (GRID), every cell reported
      python toy/collapse.py --help      every knob (regime, counts, span, data, imbalance, seeds)
Writes results/collapse.json / .png (--full) or results/collapse_quick.json / .png.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "toy"))
import sfr  # noqa: E402  (the method; nothing of it is re-implemented here)
import sfr_encoder  # noqa: E402  (the frozen sentence encoder of the targets)
import train  # noqa: E402
import sfr_metrics  # noqa: E402  (self-BLEU)
from persona import FILLER, MODES, PERSONAS, TOPICS, _ms, tempered_logprobs  # noqa: E402

# ----------------------------------------------------------------------------- methods: the one place

# sfr is SFR as the authors run it: sfr.Config(recipe="authors") (their positions, targets, head, EMA
# teacher, loss gate; see README), with k / stride / min_suffix = 8 / 1 / 1 for these 10-word responses (their
# template's 256 / 32 / 16 suit responses of hundreds of tokens). sfr_ours is this repository's flow
# loss (unit-norm MiniLM targets, the head on every position); sfr_std the same with standardised
# targets, so sfr_ours vs sfr_std isolates the target scale. Each has its own null (shuffled targets).
HAS_RECIPE = "recipe" in {f.name for f in dataclasses.fields(sfr.Config)}  # False before the recipe landed
SFR = dict(recipe="authors", stride=1, min_suffix=1)  # segment_len comes from --segment_len (8), as for every method
SFR_OURS = dict(aux="sfr", target_scale="unit", fm_positions=0)
METHODS = {
    "sft": dict(aux="none"),
    "mtp": dict(aux="mtp", mtp_k=4),
    **({"sfr": SFR, "null": {**SFR, "null_targets": True}} if HAS_RECIPE else {}),
    "sfr_ours": SFR_OURS,
    "null_ours": {**SFR_OURS, "null_targets": True},  # the same loss on targets that carry no information
    "sfr_std": {**SFR_OURS, "target_scale": "std"},
    "null_std": {**SFR_OURS, "target_scale": "std", "null_targets": True},
    "mse": dict(aux="mse", fm_positions=0),
    "anchor": dict(aux="none"),  # + "<modeM>" before each response (see make_data)
}
CONTROLS = {"sfr": "null", "sfr_ours": "null_ours", "sfr_std": "null_std"}  # each SFR variant against its null
SFR_NAME = "sfr" if HAS_RECIPE else "sfr_ours"  # the quick look's SFR

# ----------------------------------------------------------------------------- the declared grid

TEMPS = [0.5, 0.7, 1.0, 1.3, 1.6]
ALL = ["sft", "mtp", "sfr", "null", "sfr_ours", "null_ours", "sfr_std", "null_std", "mse"]
GRID = {"pretrain": ALL + ["anchor"], "heldout": ALL, "longrange": ALL, "imbalance": ALL}  # --full: 5 seeds
QUICK = dict(regime="pretrain", methods=["sft", SFR_NAME, CONTROLS[SFR_NAME]], seeds=2, temps=[0.7, 1.0, 1.3])

# Each regime's defaults; every one is a flag (a flag given on the command line wins).
REGIMES = {
    "pretrain": dict(personas=12, modes=4, queries=8, span=4, n_per_pair=2, train_queries=2, ft_personas=3,
                     pre_per_pair=8, pre_steps=600, steps=150, rare=0),
    "heldout": dict(personas=8, modes=4, queries=16, span=4, n_per_pair=1, train_queries=8, ft_personas=0,
                    pre_per_pair=0, pre_steps=0, steps=600, rare=0),
    "longrange": dict(personas=8, modes=4, queries=4, span=16, n_per_pair=4, train_queries=0, ft_personas=0,
                      pre_per_pair=0, pre_steps=0, steps=600, rare=0),
    "imbalance": dict(personas=8, modes=4, queries=4, span=4, n_per_pair=8, train_queries=0, ft_personas=0,
                      pre_per_pair=0, pre_steps=0, steps=600, rare=2),
}
ANY_TOPIC_MAX = 256  # the any-topic read costs Q times the legal one: only where (headline prompts) x Q <= this
MODEL_KEYS = ("n_layer", "n_embd", "n_head", "batch_size", "lr", "lam", "segment_len", "n_samples")
KNOB_HELP = {
    "personas": "personas P", "modes": "modes M", "queries": "queries Q",
    "span": "shared generic words G between the prompt and the mode / style words",
    "n_per_pair": "training examples per trained persona x query pair",
    "train_queries": "queries each persona trains on (a rotated window; pretrain: queries 0..n-1 of the "
                     "fine-tuned personas; 0 = all); the rest are held out",
    "ft_personas": "pretrain: personas 0..n-1 are fine-tuned on", "pre_per_pair": "pretrain: examples per pair",
    "pre_steps": "pretrain: steps of cross-entropy pretraining", "steps": "(fine-tuning) steps of every method",
    "rare": "imbalance: examples of the rare persona 0, in all",
}
FOCUS = {"pretrain": "heldout", "heldout": "heldout", "longrange": "all", "imbalance": "rare"}  # headline group
KNOBS = list(REGIMES["pretrain"])

# ----------------------------------------------------------------------------- the task

SPAN_WORDS = FILLER + ["and", "so", "then", "we", "all", "can", "see", "how", "this", "one", "must", "be",
                       "told", "by", "someone", "who", "has", "seen", "a", "lot"]


class CollapseTask:
    """Prompts, responses, the true mode probabilities, the legal set and its parser.
    Beyond the built-in word lists, made-up words keep every slot unambiguous."""

    def __init__(self, n_personas=8, n_modes=4, n_queries=4, span=4):
        P, M, Q, G = n_personas, n_modes, n_queries, span
        self.n_personas, self.n_modes, self.n_queries, self.span = P, M, Q, G
        self.names = [PERSONAS[i][0] if i < len(PERSONAS) else f"persona{i}" for i in range(P)]
        self.styles = [PERSONAS[i][1].split() if i < len(PERSONAS) else [f"sty{i}a", f"sty{i}b"] for i in range(P)]
        self.contents = [list(MODES[m]) if m < len(MODES) else [f"adj{m}", f"noun{m}"] for m in range(M)]
        self.topics = [TOPICS[q] if q < len(TOPICS) else f"topic{q}" for q in range(Q)]
        self.span_words = [SPAN_WORDS[g] if g < len(SPAN_WORDS) else f"word{g}" for g in range(G)]
        base = np.arange(M, 0, -1, dtype=float)
        base /= base.sum()
        self.probs = np.stack([np.roll(base, i) for i in range(P)])  # (P, M): p_i(m) = base[(m - i) mod M]
        self.legal = {(q, tuple(self.response(j, q, m).split())): (m, j)
                      for q in range(Q) for m in range(M) for j in range(P)}

    def prompt(self, i, q):
        return f"persona {self.names[i]} topic {self.topics[q]} :"

    def response(self, i, q, m):
        return " ".join(["about", self.topics[q]] + self.span_words + self.contents[m] + self.styles[i])

    @staticmethod
    def annotation(m):
        return f"<mode{m}>"

    def parse(self, q, text):
        """(mode, style persona) of a response to query q, or None if it is not legal
        (a leading annotation, the anchor method's, is stripped first)."""
        words = text.split()
        if words and words[0].startswith("<mode"):
            words = words[1:]
        return self.legal.get((q, tuple(words)))

    def all_texts(self):
        """Every word any method sees, so all share one vocabulary (one embedding shape, one init)."""
        texts = [self.prompt(i, q) for i in range(self.n_personas) for q in range(self.n_queries)]
        return texts + [" ".join(w) for (_, w) in self.legal] + [self.annotation(m) for m in range(self.n_modes)]


def entropy(p, axis=-1):
    p = np.asarray(p, dtype=float)
    return -(p * np.log(np.where(p > 0, p, 1))).sum(axis)


# ----------------------------------------------------------------------------- the regimes


def plan(regime, a):
    """Which (persona, query) pairs train, how many examples each, and the evaluation groups.
    Returns {"pre": {(i, q): n} (pretrain only), "ft": {(i, q): n}, "groups": {name: [(i, q)]}}."""
    P, Q = a.personas, a.queries
    n_train = a.train_queries or Q
    window = lambda i: [(i + j) % Q for j in range(n_train)]  # noqa: E731  (rotated: every query seen)
    pairs = [(i, q) for i in range(P) for q in range(Q)]
    if regime == "pretrain":
        F = range(a.ft_personas)
        ft = {(i, q): a.n_per_pair for i in F for q in range(n_train)}
        groups = {"seen": list(ft), "heldout": [(i, q) for i in F for q in range(n_train, Q)],
                  "other": [(i, q) for i in range(a.ft_personas, P) for q in range(Q)]}
        return {"pre": {pq: a.pre_per_pair for pq in pairs}, "ft": ft, "groups": _nonempty(groups)}
    ft = {(i, q): a.n_per_pair for i in range(P) for q in window(i)}
    if regime == "imbalance":  # persona 0 is rare: a.rare examples in all, over its first queries
        for q in window(0):
            ft.pop((0, q))
        for r in range(a.rare):
            ft[(0, window(0)[r % len(window(0))])] = ft.get((0, window(0)[r % len(window(0))]), 0) + 1
        groups = {"rare": [(0, q) for q in range(Q)], "frequent": [(i, q) for i in range(1, P) for q in range(Q)]}
        return {"pre": None, "ft": ft, "groups": groups}
    groups = {"seen": list(ft), "heldout": [pq for pq in pairs if pq not in ft]}
    if regime == "longrange":
        groups = {"all": pairs, **groups}
    return {"pre": None, "ft": ft, "groups": _nonempty(groups)}


def _nonempty(groups):
    return {k: v for k, v in groups.items() if v}


def make_data(task, counts, rng):
    """(i, q, m) for every example of a plan {(i, q): n}; m ~ p_i, drawn independently."""
    return [(i, q, int(rng.choice(task.n_modes, p=task.probs[i]))) for (i, q), n in sorted(counts.items())
            for _ in range(n)]


def frequencies(task, data):
    """(P, Q, M) mode counts of a data set."""
    c = np.zeros((task.n_personas, task.n_queries, task.n_modes))
    for i, q, m in data:
        c[i, q, m] += 1
    return c


def to_pairs(task, data, anchor):
    return [(task.prompt(i, q), (f"{task.annotation(m)} " if anchor else "") + task.response(i, q, m))
            for i, q, m in data]


# ----------------------------------------------------------------------------- exact evaluation


def exact_mass(task, backbone, tok, temps, anchor=False, any_topic=False, pairs=None):
    """P_T(mode m, style j | prompt (i, q)) for every prompt, from the exact probability of
    every legal response (anchor: summed over the annotation sampled first). With any_topic,
    a response about another query's topic counts too (summed over the Q topics): the mode
    and style a model picks even when it answers the wrong topic (Q times the work). Only the
    prompts in `pairs` (default: all) are filled in. (P, Q, nT, M, P)."""
    P, Q, M = task.n_personas, task.n_queries, task.n_modes
    heads = [task.annotation(a) + " " for a in range(M)] if anchor else [""]
    rows, prompts, resps = [], [], []
    for i, q in pairs or [(i, q) for i in range(P) for q in range(Q)]:
        pid = tok.encode(task.prompt(i, q))
        for t in (range(Q) if any_topic else [q]):
            for m in range(M):
                for j in range(P):
                    for hd in heads:
                        rows.append((i, q, m, j))
                        prompts.append(pid)
                        resps.append(tok.encode(hd + task.response(j, t, m)))
    backbone.eval()
    lp = tempered_logprobs(backbone, prompts, resps, tok.eos_id, temps)  # (n, nT)
    mass = np.zeros((P, Q, len(temps), M, P))
    i, q, m, j = np.array(rows).T
    np.add.at(mass, (i, q, slice(None), m, j), lp.double().exp().numpy())  # anchor: sums the annotations
    return mass


def group_metrics(task, mass, pairs, data_counts):
    """Per temperature, averaged over the group's prompts (i, q):
      well_formed  P(legal)
      fidelity     P(persona i's style | legal)
      kl_mode      KL(p_i || r), r the model's mode distribution given legal
      entropy_ratio H(r) / H(p_i)
      top_mode     r at p_i's most likely mode (truth: its p_i, 0.4 for M = 4)
      kl_data      KL(d || r), d the training set's mode frequencies (see data_freqs; prompts
                   whose persona has no training data are skipped)
    Returns {metric: list over temperatures}."""
    idx_i, idx_q = np.array(pairs).T
    ms = mass[idx_i, idx_q]  # (n, nT, M, P)
    wf = ms.sum((-1, -2))  # (n, nT)
    own = ms[np.arange(len(pairs)), :, :, idx_i].sum(-1)  # (n, nT)
    r = ms.sum(-1) / np.maximum(wf[..., None], 1e-300)  # (n, nT, M)
    p = task.probs[idx_i][:, None, :]  # (n, 1, M)
    logr = np.log(np.maximum(r, 1e-300))
    out = {"well_formed": wf, "fidelity": own / np.maximum(wf, 1e-300),
           "kl_mode": (p * (np.log(p) - logr)).sum(-1), "entropy_ratio": entropy(r) / entropy(p),
           "top_mode": np.take_along_axis(r, task.probs[idx_i].argmax(-1)[:, None, None], -1)[..., 0]}
    d = data_freqs(data_counts, pairs)  # (n, M)
    has = d.sum(-1) > 0
    kld = (d[:, None] * (np.log(np.where(d > 0, d, 1))[:, None] - logr)).sum(-1)
    out = {k: v.mean(0).tolist() for k, v in out.items()}
    out["kl_data"] = kld[has].mean(0).tolist() if has.any() else [None] * mass.shape[2]
    return out


def data_freqs(data_counts, pairs):
    """The data a prompt (i, q) was fitted to: its own mode frequencies where it was trained
    on, persona i's frequencies pooled over its queries where not. (n, M); all-zero rows for a
    persona without training data."""
    c = np.array([data_counts[i, q] if data_counts[i, q].sum() else data_counts[i].sum(0) for i, q in pairs])
    return c / np.maximum(c.sum(-1, keepdims=True), 1)


def data_reference(task, pairs, data_counts):
    """What a perfect fit of the training data would give on the group (data_freqs as the
    model's mode distribution): the 'data' row. kl_mode is None when the data misses a mode
    (KL to the truth is then infinite)."""
    d = data_freqs(data_counts, pairs)
    keep = d.sum(-1) > 0
    if not keep.any():
        return None
    d, p = d[keep], task.probs[np.array(pairs)[keep, 0]]
    kl = None if (d == 0).any() else float((p * (np.log(p) - np.log(d))).sum(-1).mean())
    return {"entropy_ratio": float((entropy(d) / entropy(p)).mean()), "kl_mode": kl,
            "top_mode": float(np.take_along_axis(d, p.argmax(-1)[:, None], -1).mean())}


def profile(task, mass, pairs, t):
    """What the headline figure draws, at temperature index t:
      example  the mode distribution on the group's first prompt, modes in the truth's order
      sorted   the mode distribution sorted by the model's own probabilities, averaged over the
               group's prompts: how peaked it is, whichever mode it picks (truth: p_i sorted)
      styles   own style, then the other personas' styles largest first, averaged
    """
    modes, styles = [], []
    for i, q in pairs:
        ms = mass[i, q, t]  # (M, P)
        wf = max(ms.sum(), 1e-300)
        modes.append(np.sort(ms.sum(1))[::-1] / wf)
        s = ms.sum(0) / wf
        styles.append(np.concatenate([[s[i]], np.sort(np.delete(s, i))[::-1]]))
    i, q = pairs[0]
    ex = mass[i, q, t].sum(1)
    return {"example": (ex[np.argsort(-task.probs[i], kind="stable")] / max(ex.sum(), 1e-300)).tolist(),
            "sorted": np.mean(modes, 0).tolist(), "styles": np.mean(styles, 0).tolist()}


def data_profile(task, pairs, data_counts):
    """profile() for the training data itself (data_freqs); None where the persona has none."""
    d = data_freqs(data_counts, pairs)
    i = pairs[0][0]
    rows = [np.sort(f)[::-1] for f in d if f.sum() > 0]
    return None if not rows else {"example": d[0][np.argsort(-task.probs[i], kind="stable")].tolist(),
                                  "sorted": np.mean(rows, 0).tolist()}


@torch.no_grad()
def cross_style_self_bleu(task, backbone, tok, n, seed, anchor=False):
    """Sampled at T = 1: for each query and sample index, sfr_metrics.self_bleu(max_n=1) across the P
    personas' answers (the paper's CS-SB1; lower = more diverse across styles)."""
    prompts = [tok.encode(task.prompt(i, q)) for i in range(task.n_personas) for q in range(task.n_queries)]
    idx = torch.tensor(prompts).repeat_interleave(n, 0)  # every prompt has the same length
    max_new = len(task.response(0, 0, 0).split()) + 1 + int(anchor) + 2
    out = sfr.generate(backbone, idx, max_new, temperature=1.0, eos_id=tok.eos_id,
                       generator=torch.Generator().manual_seed(seed))[:, idx.size(1):].tolist()
    texts = {}
    for r, row in enumerate(out):
        i, q = divmod(r // n, task.n_queries)
        words = tok.decode(row[:row.index(tok.eos_id)] if tok.eos_id in row else row).split()
        texts[i, q, r % n] = " ".join(words[1:] if anchor and words and words[0].startswith("<mode") else words)
    return float(np.mean([sfr_metrics.self_bleu([texts[i, q, s] for i in range(task.n_personas)], max_n=1)
                          for q in range(task.n_queries) for s in range(n)]))


# ----------------------------------------------------------------------------- training


def make_config(a, method, seed, out_dir, steps, init=""):
    return train.RunConfig(n_layer=a.n_layer, n_embd=a.n_embd, n_head=a.n_head, steps=steps, lam=a.lam,
                           segment_len=a.segment_len, batch_size=a.batch_size, lr=a.lr, eval_every=0, ckpt_every=0,
                           seed=seed,
                           out_dir=out_dir, init=init, **METHODS[method])


def pretrain(task, a, seed, data, tok, anchor, path):
    """Cross-entropy pretraining on the broad set (annotated for anchor); saves the backbone."""
    with tempfile.TemporaryDirectory() as d:
        cfg = make_config(a, "sft", seed, d, a.pre_steps)
        train = sfr.prepare(to_pairs(task, data, anchor), tok, cfg)
        model, _ = sfr.train(cfg, train, tok, None, log=lambda s: None)
    torch.save(model.backbone.state_dict(), path)
    return model.backbone


def run_job(regime, a, methods, seed, encoder=None):
    """Every method of one (regime, seed): the same data, the same starting backbone, the same
    order. Returns a list of records, one per method (plus 'pretrained' when the regime pretrains)."""
    encoder = encoder or _ENCODER
    torch.manual_seed(seed)
    t0 = time.time()
    task = CollapseTask(a.personas, a.modes, a.queries, a.span)
    tok = train.Tokenizer.from_texts(task.all_texts(), "word")
    pl = plan(regime, a)
    rng = np.random.default_rng([seed, 7])
    ft = make_data(task, pl["ft"], rng)
    ev = make_data(task, {pq: 1 for pq in pl["ft"]}, rng)  # sfr.train's eval and diagnostics batch
    rng.shuffle(ev)
    counts = frequencies(task, ft)
    records = []

    def evaluate_model(method, bb, anchor, extra):
        mass = exact_mass(task, bb, tok, a.temps, anchor)
        focus = FOCUS[regime] if FOCUS[regime] in pl["groups"] else next(iter(pl["groups"]))
        any_topic = len(pl["groups"][focus]) * task.n_queries <= ANY_TOPIC_MAX
        mass_any = exact_mass(task, bb, tok, a.temps, anchor, any_topic=True, pairs=pl["groups"][focus]) \
            if any_topic else None
        t1 = a.temps.index(1.0) if 1.0 in a.temps else len(a.temps) // 2
        rec = {"regime": regime, "method": method, "seed": seed, **extra,
               "groups": {g: group_metrics(task, mass, prs, counts) for g, prs in pl["groups"].items()},
               # added after the grid was declared, on the headline group only (it costs Q times the
               # work): the quick look's well-formedness on held-out queries fell to ~0
               "groups_any_topic": {focus: group_metrics(task, mass_any, pl["groups"][focus], counts)} if any_topic else {},
               "profile": {g: profile(task, mass, prs, t1) for g, prs in pl["groups"].items()},
               "profile_any_topic": {focus: profile(task, mass_any, pl["groups"][focus], t1)} if any_topic else {},
               "cs_self_bleu1": cross_style_self_bleu(task, bb, tok, a.n_samples, 1000 + seed, anchor)}
        records.append(rec)
        g = rec["groups"][FOCUS[regime] if FOCUS[regime] in rec["groups"] else next(iter(rec["groups"]))]
        print(f"{regime:9s} seed {seed} {method:9s} | T={a.temps[t1]}: H-ratio {g['entropy_ratio'][t1]:.3f} "
              f"KL {g['kl_mode'][t1]:.3f} fid {g['fidelity'][t1]:.3f} wf {g['well_formed'][t1]:.3f} | "
              f"{time.time() - t0:.0f}s", flush=True)

    with tempfile.TemporaryDirectory() as d:
        init = {}
        if pl["pre"] is not None:  # one pretrained backbone per seed, plain (and annotated for anchor)
            pre = make_data(task, pl["pre"], rng)
            for anchor in sorted({m == "anchor" for m in methods}):
                init[anchor] = os.path.join(d, f"pre{int(anchor)}.pt")
                bb = pretrain(task, a, seed, pre, tok, anchor, init[anchor])
                evaluate_model("pretrained_anchor" if anchor else "pretrained", bb, anchor, {})
        cache = {}
        for method in methods:
            anchor = method == "anchor"
            cfg = make_config(a, method, seed, d, a.steps, init.get(anchor, ""))
            key = (anchor, sfr.needs_encoder(cfg), cfg.segment_len, cfg.stride, cfg.min_suffix)
            if key not in cache:  # targets depend only on these; the null shuffle happens inside sfr.train
                cache[key] = (sfr.prepare(to_pairs(task, ft, anchor), tok, cfg, encoder),
                              sfr.prepare(to_pairs(task, ev, anchor), tok, cfg, encoder))
            train_set, evs = cache[key]
            t1 = time.time()
            model, hist = sfr.train(cfg, train_set, tok, evs, log=lambda s: None)
            last = hist[-1]
            extra = {"train_s": time.time() - t1, "final_ar": last["ar"], "eval_ar": last.get("eval_ar"),
                     "shuffle_gap": last.get("shuffle_gap"), "aux_grad_share": last.get("aux_grad_share", 0.0),
                     "target_var": target_variance(train_set) if sfr.needs_encoder(cfg) else None,
                     "init": "pretrained" if init else "random"}
            evaluate_model(method, model.backbone, anchor, extra)
    return records, {"counts": counts.tolist(),
                     "data_ref": {g: data_reference(task, prs, counts) for g, prs in pl["groups"].items()},
                     "data_profile": {g: data_profile(task, prs, counts) for g, prs in pl["groups"].items()}}


def target_variance(examples):
    """Per-dim variance of the training targets z1 (the context-dependent part of the flow's
    velocity target u = z1 - z0; the N(0, I) source z0 has 1 per dim)."""
    z = torch.cat([ex.z1[ex.valid] for ex in examples])
    return float(z.var(0).mean())


_ENCODER = None


def _indexed_job(job):
    n, args = job
    return n, run_job(*args)


def _init_worker(threads):
    global _ENCODER
    torch.set_num_threads(threads)
    _ENCODER = sfr_encoder.SegmentEncoder("minilm")


# ----------------------------------------------------------------------------- aggregation


METRICS = ["entropy_ratio", "kl_mode", "top_mode", "fidelity", "well_formed", "kl_data"]


def summarise(records, regime, methods, temps, seeds, key="groups"):
    """mean / std over seeds per (method, group, T); paired differences per seed against sft,
    and of each SFR variant against its null; the same against sft at matched well-formedness."""
    by = {(r["method"], r["seed"]): r for r in records if r["regime"] == regime}
    names = [m for m in ("pretrained", "pretrained_anchor") if (m, seeds[0]) in by] + list(methods)
    groups = list(by[names[0], seeds[0]][key])
    val = lambda m, s, g, k, t: by[m, s][key][g][k][t]  # noqa: E731
    summ = {m: {g: {k: [_ms([val(m, s, g, k, t) for s in seeds if val(m, s, g, k, t) is not None])
                        for t in range(len(temps))] for k in METRICS} for g in groups} for m in names}
    for m in names:
        summ[m]["cs_self_bleu1"] = _ms([by[m, s]["cs_self_bleu1"] for s in seeds])
        summ[m]["mechanism"] = {k: _ms([by[m, s][k] for s in seeds if by[m, s].get(k) is not None])
                                for k in ("shuffle_gap", "aux_grad_share", "target_var")}
    pairs = [(m, "sft") for m in methods if m != "sft" and "sft" in methods]
    pairs += [(m, n) for m, n in CONTROLS.items() if m in methods and n in methods]
    if "pretrained" in names and "sft" in methods:
        pairs.append(("sft", "pretrained"))
    paired = {f"{x} - {y}": {g: {k: [_ms([val(x, s, g, k, t) - val(y, s, g, k, t) for s in seeds
                                          if val(x, s, g, k, t) is not None and val(y, s, g, k, t) is not None],
                                         ci=True) for t in range(len(temps))] for k in METRICS} for g in groups}
              for x, y in pairs}
    matched = {}
    for x in methods:
        if x == "sft" or "sft" not in methods:
            continue
        matched[f"{x} - sft at matched well-formedness"] = {g: {k: [_ms(
            [d for d in (matched_quality(by, x, s, g, k, t, temps, key) for s in seeds) if d is not None], ci=True)
            for t in range(len(temps))] for k in ("entropy_ratio", "kl_mode")} for g in groups}
    return {"summary": summ, "paired": paired, "matched": matched, "groups": groups, "names": names}


def matched_quality(by, m, seed, g, metric, t, temps, key="groups"):
    """m's `metric` at temperature index t minus sft's (same seed) at the same well-formedness,
    sft's temperature curve interpolated: does m beat sampling sft hotter or colder? None when
    m's well-formedness lies outside sft's range."""
    wf = by["sft", seed][key][g]["well_formed"]
    ys = by["sft", seed][key][g][metric]
    pts = sorted(zip(wf, ys))
    x = by[m, seed][key][g]["well_formed"][t]
    if len(pts) < 2 or not pts[0][0] <= x <= pts[-1][0] or pts[-1][0] - pts[0][0] < 1e-4:
        return None
    return by[m, seed][key][g][metric][t] - float(np.interp(x, *zip(*pts)))


def kl(ref):
    return "inf" if ref["kl_mode"] is None else f"{ref['kl_mode']:.3f}"


def fmt_ci(d, digits=3):
    if d is None:
        return "–"
    if "ci95" not in d:
        return f"{d['mean']:+.{digits}f}"
    return f"{d['mean']:+.{digits}f} [{d['ci95'][0]:+.{digits}f}, {d['ci95'][1]:+.{digits}f}] ({d['n_pos']}/{d['n']})"


def group_block(S, res, regime, g, t1, title):
    """One group's markdown at temperature index t1: the methods' means (with the truth and the
    data rows), the paired differences and the comparison at matched well-formedness."""
    meta, temps = res["meta"], res["meta"]["temps"]
    summ, ref = S["summary"], res["regimes"][regime]["data_ref"][g]
    ms = lambda d: "–" if d is None else f"{d['mean']:.3f} ± {d['std']:.3f}"  # noqa: E731
    out = ["", f"### {title}: group {g} ({len(meta['regimes'][regime]['groups'][g])} prompts), T = {temps[t1]}, "
               f"mean ± std over {len(meta['seeds'])} seeds", "",
           "| method | " + " | ".join(METRICS) + " |", "|---" * (1 + len(METRICS)) + "|",
           "| true | 1.000 | 0.000 | " + f"{res['regimes'][regime]['true_top']:.3f} | 1.000 | 1.000 | – |"]
    if ref:
        out.append(f"| data (fitted exactly) | {ref['entropy_ratio']:.3f} | {kl(ref)} | {ref['top_mode']:.3f} | – | – | 0 |")
    out += [f"| {m} | " + " | ".join(ms(summ[m][g][k][t1]) for k in METRICS) + " |" for m in S["names"]]
    out += ["", f"paired per seed, T = {temps[t1]}: mean [95% CI] (seeds > 0 / n)", "",
            "| comparison | entropy_ratio | kl_mode | fidelity | well_formed |", "|---|---|---|---|---|"]
    out += [f"| {p} | " + " | ".join(fmt_ci(S["paired"][p][g][k][t1])
                                     for k in ("entropy_ratio", "kl_mode", "fidelity", "well_formed")) + " |"
            for p in S["paired"]]
    out += ["", "against sft at matched well-formedness (sft's T-curve interpolated; n = seeds inside its range)", "",
            "| comparison | entropy_ratio | kl_mode |", "|---|---|---|"]
    out += [f"| {p.split(' at ')[0]} | " + " | ".join(fmt_ci(S["matched"][p][g][k][t1])
                                                     for k in ("entropy_ratio", "kl_mode")) + " |"
            for p in S["matched"]]
    return out


def tables(res, regime):
    """Markdown: per group at T = 1 (legal answers, then any topic) the methods' means, paired
    differences and matched quality; the temperature sweep of the focus group; the mechanism."""
    S, temps, meta = res["regimes"][regime], res["meta"]["temps"], res["meta"]
    t1 = temps.index(1.0) if 1.0 in temps else len(temps) // 2
    summ, names = S["summary"], S["names"]
    ms = lambda d: "–" if d is None else f"{d['mean']:.3f} ± {d['std']:.3f}"  # noqa: E731
    out = [f"## regime {regime}: {json.dumps(meta['regimes'][regime]['knobs'])}"]
    for g in S["groups"]:
        out += group_block(S, res, regime, g, t1, "given a legal answer (declared)")
    for g in (S["any_topic"] or {"groups": []})["groups"]:
        out += group_block(S["any_topic"], res, regime, g, t1, "any topic (added after the declaration)")
    g = S["focus"]
    out += ["", f"### temperature sweep, group {g} (mean over seeds): entropy_ratio / fidelity / well_formed; "
                "then entropy_ratio, any topic", "",
            "| method | " + " | ".join(f"T={T}" for T in temps) + " |", "|---" * (1 + len(temps)) + "|"]
    anyt = S["any_topic"]["summary"] if S["any_topic"] else None
    at = lambda m, t: f"{anyt[m][g]['entropy_ratio'][t]['mean']:.3f}" if anyt else "–"  # noqa: E731
    out += [f"| {m} | " + " | ".join(f"{summ[m][g]['entropy_ratio'][t]['mean']:.3f} / {summ[m][g]['fidelity'][t]['mean']:.3f}"
                                     f" / {summ[m][g]['well_formed'][t]['mean']:.3f}; {at(m, t)}"
                                     for t in range(len(temps))) + " |" for m in names]
    out += ["", "### mechanism (end of training) and cross-style Self-BLEU-1 (sampled, T = 1; truth "
                f"{res['regimes'][regime]['true_cs_sb1']:.3f})", "",
            "| method | shuffle_gap | aux_grad_share | target per-dim variance | cs_self_bleu1 |", "|---|---|---|---|---|"]
    out += [f"| {m} | " + " | ".join(ms(summ[m]["mechanism"][k]) for k in ("shuffle_gap", "aux_grad_share", "target_var"))
            + f" | {ms(summ[m]['cs_self_bleu1'])} |" for m in names]
    return "\n".join(out)


def headline(res, regime):
    """The quick table (5 columns) and the one-line verdict, both from the numbers."""
    S, temps = res["regimes"][regime], res["meta"]["temps"]
    t1 = temps.index(1.0) if 1.0 in temps else len(temps) // 2
    g, summ = S["focus"], S["summary"]
    anyt = S["any_topic"]["summary"] if S["any_topic"] else None
    at = lambda m, k: f"{anyt[m][g][k][t1]['mean']:.3f}" if anyt else "–"  # noqa: E731
    lines = [f"{regime} regime, group '{g}', T = {temps[t1]}, mean over {len(res['meta']['seeds'])} seeds",
             "", "| model | entropy ratio, legal answers | entropy ratio, any topic | mode KL, any topic | well-formed |",
             "|---" * 5 + "|", "| truth | 1.000 | 1.000 | 0.000 | 1.000 |"]
    ref = S["data_ref"][g]
    if ref:
        lines.append(f"| data | {ref['entropy_ratio']:.3f} | {ref['entropy_ratio']:.3f} | {kl(ref)} | 1.000 |")
    lines += [f"| {m} | {summ[m][g]['entropy_ratio'][t1]['mean']:.3f} | {at(m, 'entropy_ratio')} | "
              f"{at(m, 'kl_mode')} | {summ[m][g]['well_formed'][t1]['mean']:.3f} |" for m in S["names"]]
    return "\n".join(lines) + "\n\n" + verdict(res, regime)


def verdict(res, regime):
    """One line from the numbers: does SFT collapse below its data on the focus group, and does
    each SFR variant help by the declared rule (entropy ratio CI > 0 against sft and against its
    null, mode KL not worse than sft's on average)."""
    S, temps = res["regimes"][regime], res["meta"]["temps"]
    t1 = temps.index(1.0) if 1.0 in temps else len(temps) // 2
    g, summ = S["focus"], S["summary"]
    sft = summ["sft"][g]["entropy_ratio"][t1]["mean"]
    sft_any = S["any_topic"]["summary"]["sft"][g]["entropy_ratio"][t1]["mean"] if S["any_topic"] else sft
    ref = S["data_ref"][g]
    below = ref is not None and max(sft, sft_any) < ref["entropy_ratio"] - 0.02
    pre = summ["pretrained"][g]["entropy_ratio"][t1]["mean"] if "pretrained" in summ else None
    words = [f"SFT keeps {sft:.2f}" + (f" (any topic {sft_any:.2f})" if S["any_topic"] else "")
             + f" of the true mode entropy on '{g}'"
             + (f", the pretrained model {pre:.2f}" if pre is not None else "")
             + (f", its data {ref['entropy_ratio']:.2f}: {'collapse below the data' if below else 'no collapse below the data'}"
                if ref else "")]
    for m, n in CONTROLS.items():
        key = f"{m} - sft"
        if key in S["paired"]:
            d = S["paired"][key][g]["entropy_ratio"][t1]
            dkl = S["paired"][key][g]["kl_mode"][t1]
            dn = S["paired"].get(f"{m} - {n}", {}).get(g, {}).get("entropy_ratio", [None] * len(temps))[t1]
            helps = ("ci95" in d and d["ci95"][0] > 0 and dn is not None and "ci95" in dn and dn["ci95"][0] > 0
                     and dkl["mean"] <= 0)
            words.append(f"{m} - sft {fmt_ci(d)}" + (f", {m} - {n} {fmt_ci(dn)}" if dn else "")
                         + f": {'helps' if helps else 'does not help by the declared rule'}")
    return "verdict: " + "; ".join(words)


# ----------------------------------------------------------------------------- figure


def plot(res, regime, path):
    """The headline, on the focus group (prompts the model never trained on): (a) one prompt's
    mode distribution, truth next to the data and each model (first seed); (b) how peaked the
    mode distributions are, averaged over the group and the seeds; (c) the style. Models are
    read 'any topic' (exact_mass): the mode and style picked even in an answer about the wrong
    topic, since fine-tuning can make most answers to unseen queries ill-formed."""
    import textwrap

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    S, meta = res["regimes"][regime], res["meta"]
    g, M = S["focus"], meta["regimes"][regime]["knobs"]["modes"]
    seeds = meta["seeds"]
    recs = {(r["method"], r["seed"]): r for r in res["records"] if r["regime"] == regime}
    truth = np.sort(meta["regimes"][regime]["base"])[::-1]
    rows = [("truth", truth, truth, None, None)]
    data = [res["data"][regime][str(s)]["data_profile"][g] for s in seeds]
    if data[0] is not None:
        srt = np.array([d["sorted"] for d in data])
        rows.append(("data", np.array(data[0]["example"]), srt.mean(0), srt.std(0), None))
    for m in S["names"]:
        pr = [recs[m, s]["profile_any_topic"].get(g) or recs[m, s]["profile"][g] for s in seeds]  # any topic if read
        srt, st = np.array([p["sorted"] for p in pr]), np.array([p["styles"] for p in pr])
        rows.append((m, np.array(pr[0]["example"]), srt.mean(0), srt.std(0), st))
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.8), gridspec_kw={"width_ratios": [3, 3, 2]})
    w = 0.8 / len(rows)
    colors = plt.cm.tab10.colors
    for n, (name, ex, srt, std, st) in enumerate(rows):
        x = np.arange(M) + (n - (len(rows) - 1) / 2) * w
        color = {"truth": "k", "data": "grey"}.get(name, colors[n % 10])
        ax[0].bar(x, ex, w, color=color, label=name)
        ax[1].bar(x, srt, w, yerr=std, color=color, label=name, capsize=2)
        own = 1.0 if st is None else st[:, 0].mean()  # the truth and the data keep their own style
        ax[2].bar(n, own, 0.7, color=color)
        ax[2].bar(n, 1 - own, 0.7, bottom=own, color="lightgrey")
        ax[2].annotate(f"{own:.3f}", (n, own), ha="center", va="bottom", fontsize=8)
    i, q = meta["regimes"][regime]["groups"][g][0]
    ax[0].set_xticks(range(M), [f"true p = {p:.2f}" for p in truth])
    read = "any topic" if S["any_topic"] else "legal answers"
    ax[0].set(ylabel=f"P(mode | prompt), exact, T = 1, {read}",
              title=f"one '{g}' prompt (persona {i}, query {q}; seed {seeds[0]})")
    ax[0].legend(fontsize=8)
    ax[1].set_xticks(range(M), [f"its {r + 1}{'st' if r == 0 else 'nd' if r == 1 else 'rd' if r == 2 else 'th'} mode"
                                for r in range(M)])
    ax[1].set(ylabel="P(mode), each model's modes sorted", title=f"how peaked: all '{g}' prompts, all seeds")
    ax[2].set_xticks(range(len(rows)), [r[0] for r in rows], rotation=20)
    ax[2].set(ylabel="P(own style | legal); grey = other personas' styles", ylim=(0, 1.08),
              title=f"style on '{g}' prompts")
    fig.suptitle("\n".join(textwrap.wrap(f"{regime} regime ({meta['label']}, {len(seeds)} seeds; whiskers = std "
                                         f"over seeds). {verdict(res, regime)}", 180)), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- command line


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, before any work
        sys.stderr.write(f"collapse.py: error: {message}\n")
        sys.exit(2)


def parse_args(argv=None):
    p = _Parser(allow_abbrev=False, description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--full", action="store_true", help="run the declared GRID (every regime, 5 seeds)")
    p.add_argument("--regime", default="", help=f"comma list from {list(REGIMES)}; '' = quick: {QUICK['regime']}, "
                   "full: all")
    p.add_argument("--methods", default="", help=f"comma list from {list(METHODS)}; '' = the grid's")
    p.add_argument("--seeds", type=int, default=0, help="number of seeds n (quick 2, full 5)")
    p.add_argument("--s0", type=int, default=0, help="first seed: seeds are s0 .. s0+n-1")
    p.add_argument("--temps", default="", help="comma list of temperatures; '' = the grid's")
    for k in KNOBS:
        p.add_argument(f"--{k}", type=int, default=None, help=KNOB_HELP[k] + "; default per regime: "
                       + ", ".join(f"{r} {REGIMES[r][k]}" for r in REGIMES))
    p.add_argument("--n_layer", type=int, default=2, help="transformer blocks of the built-in GPT")
    p.add_argument("--n_embd", type=int, default=64, help="its width, a multiple of --n_head")
    p.add_argument("--n_head", type=int, default=4, help="its attention heads")
    p.add_argument("--batch_size", type=int, default=16, help="sequences per optimiser step")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW peak learning rate (pretraining and fine-tuning)")
    p.add_argument("--lam", type=float, default=1.0, help="lambda of every auxiliary loss")
    p.add_argument("--segment_len", type=int, default=8, help="future segment length (words) of the MiniLM targets")
    p.add_argument("--n_samples", type=int, default=8, help="samples per prompt for cross-style Self-BLEU")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (the machine is shared)")
    p.add_argument("--workers", type=int, default=1, help="processes, one (regime, seed) each at a time")
    p.add_argument("--out", default="", help="json path; '' = results/collapse.json (--full) or collapse_quick.json")
    p.add_argument("--no_fig", action="store_true", help="write the json only, no figure")
    p.add_argument("--replot", default="", help="redraw tables and figure from a saved json; trains nothing")
    p.add_argument("--merge", default="", help="with --add_to OLD: merge this saved json into OLD (same checks), "
                   "training nothing; the result goes to --out")
    p.add_argument("--from_jobs", default="", help="build the results of a stopped run (same flags) from its "
                   "<out>.jobs.jsonl, training nothing; regimes with unfinished seeds are left out")
    p.add_argument("--exclude", default="", help="comma list of methods to leave out of the grid's")
    p.add_argument("--add_to", default="", help="a saved json of the same grid (regimes, knobs, seeds, T, model): "
                   "train only --methods and merge them into it; a method run in both must give the same numbers")
    a = p.parse_args(argv)
    a.regimes = a.regime.split(",") if a.regime else (list(REGIMES) if a.full else [QUICK["regime"]])
    if any(r not in REGIMES for r in a.regimes):
        p.error(f"--regime {a.regime!r}: choose from {list(REGIMES)} (a comma list)")
    if a.merge and not a.add_to:
        p.error("--merge needs --add_to")
    methods = a.methods.split(",") if a.methods else None
    exclude = a.exclude.split(",") if a.exclude else []
    bad = [m for m in (methods or []) + exclude if m not in METHODS and m not in ("sfr", "null")]
    if bad:
        p.error(f"--methods / --exclude: unknown {bad}; choose from {list(METHODS)}")
    if any(m not in METHODS for m in methods or []):
        p.error("--methods sfr / null need sfr.Config(recipe='authors'), which this sfr.py does not have")
    a.methods = {r: [m for m in methods or (GRID[r] if a.full else QUICK["methods"]) if m in METHODS and m not in exclude]
                 for r in a.regimes}
    try:
        a.temps = [float(t) for t in a.temps.split(",")] if a.temps else (TEMPS if a.full else QUICK["temps"])
    except ValueError:
        p.error(f"--temps {a.temps!r}: a comma list of numbers")
    if any(not 0 < t <= 10 for t in a.temps):
        p.error(f"--temps {a.temps}: each must be in (0, 10]")
    a.seeds = list(range(a.s0, a.s0 + (a.seeds or (5 if a.full else QUICK["seeds"]))))
    if a.s0 < 0 or len(a.seeds) < 1:
        p.error("--s0 must be >= 0 and --seeds >= 1")
    for name in ("n_layer", "n_embd", "n_head", "batch_size", "segment_len", "n_samples", "threads", "workers"):
        if getattr(a, name) < 1:
            p.error(f"--{name} {getattr(a, name)}: must be >= 1")
    if a.n_embd % a.n_head:
        p.error(f"--n_embd {a.n_embd} must be a multiple of --n_head {a.n_head}")
    if not a.lr > 0 or a.lam < 0:
        p.error("--lr must be > 0 and --lam >= 0")
    a.knobs = {}
    for r in a.regimes:
        kn = {k: getattr(a, k) if getattr(a, k) is not None else REGIMES[r][k] for k in KNOBS}
        msg = check_knobs(r, kn)
        if msg:
            p.error(f"regime {r}: {msg}")
        a.knobs[r] = kn
    a.out = a.out or str(ROOT / "results" / ("collapse.json" if a.full else "collapse_quick.json"))
    if a.add_to:
        try:
            prev = json.loads(Path(a.add_to).read_text())["meta"]
        except (OSError, ValueError, KeyError) as e:
            p.error(f"--add_to {a.add_to}: not a saved collapse json ({e})")
        mine = {"seeds": a.seeds, "temps": a.temps, "model": {k: getattr(a, k) for k in MODEL_KEYS},
                "knobs": {r: kn for r, kn in a.knobs.items() if r in prev["regimes"]}}  # a new regime is fine
        theirs = {"seeds": prev["seeds"], "temps": prev["temps"], "model": train.with_current_names(prev["model"]),
                  "knobs": {r: prev["regimes"][r]["knobs"] for r in a.regimes if r in prev["regimes"]}}
        if mine != theirs:
            p.error(f"--add_to {a.add_to}: a different grid (seeds, temperatures, model or regime knobs)")
    return a


def check_knobs(regime, kn):
    """The first knob value the regime cannot use, as one line; None if all are fine."""
    for k in ("personas", "modes", "queries", "n_per_pair", "steps"):
        if kn[k] < 1:
            return f"--{k} {kn[k]}: must be >= 1"
    for k in ("span", "rare", "ft_personas", "pre_per_pair", "pre_steps", "train_queries"):
        if kn[k] < 0:
            return f"--{k} {kn[k]}: must be >= 0"
    if kn["train_queries"] > kn["queries"]:
        return f"--train_queries {kn['train_queries']} exceeds --queries {kn['queries']}"
    if kn["span"] + 7 + 6 > 64:
        return f"--span {kn['span']}: prompt + response must fit sfr's block_size 64 (span <= 51)"
    if regime == "pretrain":
        if not 1 <= kn["ft_personas"] <= kn["personas"]:
            return f"--ft_personas {kn['ft_personas']}: must be in 1 .. --personas {kn['personas']}"
        if kn["pre_per_pair"] < 1 or kn["pre_steps"] < 1:
            return "--pre_per_pair and --pre_steps must be >= 1 in the pretrain regime"
    if regime == "imbalance" and (kn["rare"] < 1 or kn["personas"] < 2):
        return f"--rare {kn['rare']} --personas {kn['personas']}: the imbalance regime needs rare >= 1, personas >= 2"
    return None


def derive(res):
    """Summaries, paired differences and tables from the raw records (used by --replot too)."""
    meta = res["meta"]
    for regime in meta["regimes"]:
        S = summarise(res["records"], regime, meta["regimes"][regime]["methods"], meta["temps"], meta["seeds"])
        has_any = all(r["groups_any_topic"] for r in res["records"] if r["regime"] == regime)
        S["any_topic"] = summarise(res["records"], regime, meta["regimes"][regime]["methods"], meta["temps"],
                                   meta["seeds"], key="groups_any_topic") if has_any else None
        groups = S["groups"]
        S["focus"] = FOCUS[regime] if FOCUS[regime] in groups else groups[0]
        S["data_ref"] = {}
        for g in groups:  # the data row averages the seeds' data sets
            refs = [res["data"][regime][str(s)]["data_ref"][g] for s in meta["seeds"]]
            S["data_ref"][g] = None if refs[0] is None else {k: None if any(r[k] is None for r in refs) else
                                                             float(np.mean([r[k] for r in refs])) for k in refs[0]}
        S["true_top"] = float(max(meta["regimes"][regime]["base"]))
        S["true_cs_sb1"] = meta["regimes"][regime]["true_cs_sb1"]
        res.setdefault("regimes", {})[regime] = S
        S["table"] = tables(res, regime)
    return res


def true_cs_self_bleu(task, n, seed):
    """Cross-style Self-BLEU-1 of samples from the truth (the reference)."""
    rng = np.random.default_rng(seed)
    return float(np.mean([sfr_metrics.self_bleu([task.response(i, q, int(rng.choice(task.n_modes, p=task.probs[i])))
                                         for i in range(task.n_personas)], max_n=1)
                          for q in range(task.n_queries) for _ in range(n)]))


def finish(res, path, figure=True):
    res = derive(res)
    Path(path).write_text(json.dumps(res, indent=1))
    if figure:
        for regime in res["meta"]["regimes"]:
            sfx = "" if len(res["meta"]["regimes"]) == 1 else f"_{regime}"
            plot(res, regime, os.path.splitext(path)[0] + sfx + ".png")
    return res


def merge(old, new):
    """new's records added to old's (--add_to). The data must be the same, and a (regime, method,
    seed) in both must give the same numbers: the two runs are then one grid."""
    if old["meta"]["seeds"] != new["meta"]["seeds"] or old["meta"]["temps"] != new["meta"]["temps"]:
        raise ValueError("--add_to: the two runs have other seeds or temperatures")
    for r, by_seed in new["data"].items():
        for s, d in by_seed.items():
            if r in old["data"] and old["data"][r].get(s, {}).get("counts") != d["counts"]:
                raise ValueError(f"--add_to: regime {r} seed {s} has other training data than the saved run")
    key = lambda x: (x["regime"], x["method"], x["seed"])  # noqa: E731
    olds = {key(x): x for x in old["records"]}
    for x in new["records"]:
        if key(x) in olds and olds[key(x)]["groups"] != x["groups"]:
            raise ValueError(f"--add_to: {key(x)} differs from the saved run: not the same code path")
    news = {key(x) for x in new["records"]}
    old["records"] = [x for x in old["records"] if key(x) not in news] + new["records"]
    for r, m in new["meta"]["regimes"].items():
        if r not in old["meta"]["regimes"]:  # a regime only the new part ran
            old["meta"]["regimes"][r], old["data"][r] = m, new["data"][r]
            continue
        both = set(old["meta"]["regimes"][r]["methods"]) | set(m["methods"])
        old["meta"]["regimes"][r]["methods"] = [x for x in METHODS if x in both]  # sft first, METHODS' order
    old["meta"]["parts"] = old["meta"].get("parts", []) + new["meta"]["parts"]
    old["meta"]["method_configs"] = {**old["meta"].get("method_configs", {}), **new["meta"]["method_configs"]}
    old["meta"]["wall_s"] = sum(p["wall_s"] for p in old["meta"]["parts"])
    return old


def main(argv=None, encoder=None):
    t_start = time.time()
    a = parse_args(argv)
    if a.merge:
        res = finish(merge(json.loads(Path(a.add_to).read_text()), json.loads(Path(a.merge).read_text())), a.out)
        print("\n\n".join(res["regimes"][r]["table"] for r in res["meta"]["regimes"]))
        return res
    if a.replot:
        res = finish(json.loads(Path(a.replot).read_text()), a.replot)
        for r in res["meta"]["regimes"]:
            print(res["regimes"][r]["table"] + "\n")
        return res
    torch.set_num_threads(a.threads)
    sfr_sha = hashlib.sha256(Path(sfr.__file__).read_bytes()).hexdigest()  # the code this run imported
    label = "full grid" if a.full else "QUICK look (not the declared grid; run --full)"
    print(f"collapse toy, {label}; seeds {a.seeds}; T {a.temps}; methods: "
          + "; ".join(f"{m} = {METHODS[m]}" for m in dict.fromkeys(x for r in a.regimes for x in a.methods[r])))
    jobs, metas = [], {}
    for r in a.regimes:
        ns = argparse.Namespace(**{**vars(a), **a.knobs[r]})
        task = CollapseTask(ns.personas, ns.modes, ns.queries, ns.span)
        pl = plan(r, ns)
        metas[r] = {"knobs": a.knobs[r], "methods": a.methods[r], "groups": {g: v for g, v in pl["groups"].items()},
                    "ft_examples": sum(pl["ft"].values()), "base": task.probs[0].tolist(),
                    "example": [task.prompt(0, 0), task.response(0, 0, 0)],
                    "true_cs_sb1": true_cs_self_bleu(task, a.n_samples, 12345)}
        print(f"{r}: {a.knobs[r]} -> {metas[r]['ft_examples']} fine-tuning examples; groups "
              + ", ".join(f"{g} {len(v)} prompts" for g, v in pl["groups"].items()))
        jobs += [(r, ns, a.methods[r], s) for s in a.seeds]
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    log = Path(a.out + ".jobs.jsonl")  # each finished (regime, seed) as it lands, kept if the run is stopped
    outs = [None] * len(jobs)
    if a.from_jobs:  # a stopped run: keep the regimes whose every seed finished, say which were dropped
        index = {(j[0], j[3]): n for n, j in enumerate(jobs)}  # by (regime, seed): --seeds may be fewer now
        for line in Path(a.from_jobs).read_text().splitlines():
            x = json.loads(line)
            if (x["regime"], x["seed"]) in index:
                outs[index[x["regime"], x["seed"]]] = x["out"]
        missing = {jobs[n][0] for n, o in enumerate(outs) if o is None}
        print(f"--from_jobs: regimes with unfinished seeds, left out: {sorted(missing) or 'none'}")
        keep = [n for n, j in enumerate(jobs) if j[0] not in missing]
        jobs, outs = [jobs[n] for n in keep], [outs[n] for n in keep]
        metas = {r: m for r, m in metas.items() if r not in missing}
        a.regimes = [r for r in a.regimes if r not in missing]
        done = iter(())
    elif a.workers > 1:
        import multiprocessing as mp
        pool = mp.get_context("spawn").Pool(a.workers, initializer=_init_worker, initargs=(a.threads,))
        done = pool.imap_unordered(_indexed_job, list(enumerate(jobs)))
    else:
        encoder = encoder or sfr_encoder.SegmentEncoder("minilm")
        done = ((n, run_job(*j, encoder=encoder)) for n, j in enumerate(jobs))
    if not a.from_jobs:
        log.write_text("")
    for n, out in done:
        outs[n] = out
        with log.open("a") as f:
            f.write(json.dumps({"job": n, "regime": jobs[n][0], "seed": jobs[n][3], "out": out}) + "\n")
    if a.workers > 1:
        pool.close()
        pool.join()
    records = [r for recs, _ in outs for r in recs]
    data = {}
    for (r, _, _, s), (_, d) in zip(jobs, outs):
        data.setdefault(r, {})[str(s)] = d
    wall = time.time() - t_start
    meta = {"command": "python toy/collapse.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "label": label, "wall_s": wall, "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "sfr_py_sha256": sfr_sha,
            "method_configs": {m: METHODS[m] for r in a.regimes for m in a.methods[r]},
            "threads": a.threads, "workers": a.workers,
            "seeds": a.seeds, "temps": a.temps, "regimes": metas,
            "model": {k: getattr(a, k) for k in MODEL_KEYS}}
    meta["parts"] = [{k: meta[k] for k in ("command", "sfr_py_sha256", "wall_s", "method_configs")}]
    res = {"meta": meta, "records": records, "data": data}
    if a.add_to:
        res = merge(json.loads(Path(a.add_to).read_text()), res)
    res = finish(res, a.out, figure=not a.no_fig)
    if not a.from_jobs:
        log.unlink()
    for r in a.regimes:
        print("\n" + (res["regimes"][r]["table"] if a.full else headline(res, r)))
    print(f"\nwall time {wall:.0f}s on {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
          f"torch {torch.__version__}, {a.threads} thread(s) x {a.workers} process(es); wrote {a.out}")
    return res


if __name__ == "__main__":
    main()
