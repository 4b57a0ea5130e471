"""toy/persona.py: does SFR counter cross-style collapse? A persona task whose true
distribution is known exactly.

Each of P personas answers Q queries. A response is

    about <topic> | <G shared generic words> | <2 content words of mode m> | <2 style words of the persona>

and persona i picks mode m with probability p_i(m) = base[(m - i) mod M], base ∝ (M, ..., 1)
(0.4/0.3/0.2/0.1 for M = 4). The generic words are the same for every persona, mode and
query: the hidden state crossing them has to carry the persona to the point where the
mode and the style are chosen, which is where cross-style collapse happens.

Because the legal responses can be enumerated (M modes x P styles per query), the
model's probability of each one under temperature-T sampling is computed exactly: the
product over tokens of softmax(logits / T), the distribution `sfr.generate` samples from.
Mode coverage, KL to the true mode distribution, entropy ratio, style fidelity and
well-formedness come from those exact probabilities; distinct-2, Vendi, cross-style
Self-BLEU-1 and sampled coverage come from samples. The mechanism (does the flow head
use h at all, and how much of the backbone's gradient comes from it) is
`sfr.diagnostics`, read from the eval records `sfr.train` writes.

Every method trains from the same backbone initialisation, on the same data in the
same order, for the same steps (checked at start-up; see `check_same_init`):
    sft      cross-entropy only (aux='none')
    mtp      multi-token prediction, K = 4 heads, lambda = 1 (when sfr.py has aux='mtp')
    sfr      SFR as the authors run it: recipe='authors' (their code's positions, targets, head
             1024 x 3, gate 1.5 and EMA teacher 0.999 of their template), at the toy's segment_len = 8
             words with stride 1 and min_suffix 1 (their s = k / 8 and min = k / 16 at k = 256)
    sfr_ours SFR with recipe='ours' (aux='sfr', unit-norm MiniLM targets, head 256, no stabilisers)
    sfr_std  sfr_ours with per-dim standardised targets (target_scale='std')
    mse      the deterministic ablation (aux='mse', recipe='ours')
    null     sfr on targets shuffled across the training set (sfr.shuffle_targets)
    null_ours, null_std  the same controls for sfr_ours and sfr_std
    anchor   annotation-anchored: "<modeM>" precedes each response; at inference the
             annotation is sampled first, and the metrics strip it (aux='none')

Declared before the recipe='authors' rerun of the grid: (H1) sfr (authors) moves mode KL and
entropy ratio no more than its null control (sfr - null CIs include 0), as sfr_ours did;
(H2) with the EMA teacher holding the head near its zero-initialised output, sfr's aux share
of the backbone gradient is no larger than sfr_ours'.

Run:  python toy/persona.py            quick look, ~1-2 min on a 2-core CPU, labelled quick
      python toy/persona.py --full     the declared grid (GRID below), every cell reported
      python toy/persona.py --help     every flag (personas, modes, data size, model, lambda, seeds)
Writes results/persona.json and results/persona.png (quick runs: results/persona_quick.*).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sfr  # noqa: E402
import sfr_encoder  # noqa: E402  (the frozen sentence encoder of the targets)
import train  # noqa: E402
import sfr_metrics  # noqa: E402  (the method; nothing of it is re-implemented here)

# ----------------------------------------------------------------------------- the declared grid
# Every cell of methods x seeds x temperatures is trained / evaluated and written to the JSON.

TEMPS = [0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6]
ALL_METHODS = ["sft", "mtp", "sfr", "sfr_ours", "sfr_std", "mse", "null", "null_ours", "null_std", "anchor"]
GRID = dict(methods=ALL_METHODS, seeds=5, temps=TEMPS, steps=800)  # --full
QUICK = dict(methods=["sft", "sfr", "sfr_std"], seeds=2, temps=[0.6, 1.0, 1.4], steps=200)

# recipe='authors' with their template's stabilisers and head; segment_len is the toy's (--segment_len), and stride and
# min_suffix scale their s = k / 8, min = k / 16 (k = 256) down to k = 8 words: 1 and 1.
# lambda is --lam for every method (default 1, their template's).
AUTHORS = {**{k: v for k, v in sfr.RECIPES["authors"].items() if k not in ("segment_len", "lam")}, "recipe": "authors",
           "stride": 1, "min_suffix": 1}
# Config overrides per method, on top of the shared Config (see make_config); they win over it.
METHODS = {
    "sft": dict(aux="none"),
    "mtp": dict(aux="mtp", mtp_k=4),
    "sfr": dict(AUTHORS, aux="sfr"),
    "sfr_ours": dict(aux="sfr", target_scale="unit"),
    "sfr_std": dict(aux="sfr", target_scale="std"),
    "mse": dict(aux="mse"),
    "null": dict(AUTHORS, aux="sfr"),  # + shuffled targets
    "null_ours": dict(aux="sfr", target_scale="unit"),  # + shuffled targets: the control for sfr_ours
    "null_std": dict(aux="sfr", target_scale="std"),  # + shuffled targets: the control for sfr_std
    "anchor": dict(aux="none"),  # + annotation before each response
}
# which training set; default plain (recipe='ours' targets)
DATASET = {"anchor": "anchor", "sfr": "authors", "null": "null_authors", "null_ours": "null", "null_std": "null"}
EXACT = ["well_formed", "fidelity", "kl_mode", "entropy_ratio", "coverage", "kl_data", "kl_data_persona"]
SAMPLED = ["coverage_sampled", "distinct2", "vendi", "cs_self_bleu1"]
MECH = ["shuffle_gap", "aux_grad_share"]

# ----------------------------------------------------------------------------- the task

PERSONAS = [("pirate", "arr matey"), ("poet", "sweetly sung"), ("robot", "beep boop"),
            ("knight", "my liege"), ("chef", "bon appetit"), ("monk", "peace brother"),
            ("child", "yay wow"), ("sailor", "ahoy shipmate"), ("wizard", "abracadabra indeed"),
            ("farmer", "howdy folks"), ("doctor", "stay healthy"), ("queen", "we decree")]
MODES = [("calm", "waves"), ("wild", "storms"), ("golden", "sunsets"), ("ancient", "secrets"),
         ("tiny", "creatures"), ("endless", "roads"), ("bright", "stars"), ("hidden", "caves")]
TOPICS = ["sea", "city", "forest", "moon", "mountain", "desert", "river", "sky"]
FILLER = ["well", "you", "know", "i", "think", "that", "it", "is", "really", "quite", "often", "said"]


@dataclass
class PersonaTask:
    """The true distribution: prompts, responses, mode probabilities, a parser, the legal set."""
    n_personas: int = 9
    n_modes: int = 4
    n_queries: int = 4
    prefix_len: int = 4  # shared generic words before the persona-specific part

    def __post_init__(self):
        P, M, Q, G = self.n_personas, self.n_modes, self.n_queries, self.prefix_len
        if P < 1 or M < 1 or Q < 1 or not 0 <= G <= len(FILLER):
            raise ValueError(f"need personas, modes, queries >= 1 and 0 <= prefix_len <= {len(FILLER)}")
        # beyond the built-in word lists, made-up words keep every slot unambiguous
        self.names = [PERSONAS[i][0] if i < len(PERSONAS) else f"persona{i}" for i in range(P)]
        self.styles = [PERSONAS[i][1].split() if i < len(PERSONAS) else [f"sty{i}a", f"sty{i}b"] for i in range(P)]
        self.contents = [list(MODES[m]) if m < len(MODES) else [f"adj{m}", f"noun{m}"] for m in range(M)]
        self.topics = [TOPICS[q] if q < len(TOPICS) else f"topic{q}" for q in range(Q)]
        base = np.arange(M, 0, -1, dtype=float)
        base /= base.sum()
        self.probs = np.stack([np.roll(base, i) for i in range(P)])  # (P, M): p_i(m) = base[(m - i) mod M]
        self.legal = {}  # (q, tuple of words) -> (mode, style persona)
        for q in range(Q):
            for m in range(M):
                for j in range(P):
                    self.legal[(q, tuple(self.response(j, q, m).split()))] = (m, j)

    def prompt(self, i, q):
        return f"persona {self.names[i]} topic {self.topics[q]} :"

    def response(self, i, q, m):
        return " ".join(["about", self.topics[q]] + FILLER[:self.prefix_len] + self.contents[m] + self.styles[i])

    @staticmethod
    def annotation(m):
        return f"<mode{m}>"

    def parse(self, q, text):
        """(mode, style persona) of a response to query q, or None if it is not legal.
        A leading annotation word (anchor method) is stripped first."""
        words = text.split()
        if words and words[0].startswith("<mode"):
            words = words[1:]
        return self.legal.get((q, tuple(words)))

    def sample(self, n_per_persona, rng, anchor=False):
        """(prompt, response, (i, q, m)) triples; queries cycle, modes are drawn from p_i."""
        out = []
        for i in range(self.n_personas):
            for r in range(n_per_persona):
                q = r % self.n_queries
                m = int(rng.choice(self.n_modes, p=self.probs[i]))
                resp = self.response(i, q, m)
                out.append((self.prompt(i, q), f"{self.annotation(m)} {resp}" if anchor else resp, (i, q, m)))
        return out

    def all_texts(self):
        """Every word the model may see, annotations included, so all methods share one vocabulary
        (and therefore one embedding shape and one initialisation)."""
        texts = [self.prompt(i, q) for i in range(self.n_personas) for q in range(self.n_queries)]
        texts += [" ".join(w) for (_, w) in self.legal]
        return texts + [self.annotation(m) for m in range(self.n_modes)]


# ----------------------------------------------------------------------------- exact probabilities


@torch.no_grad()
def tempered_logprobs(backbone, prompts, responses, eos_id, temps, chunk=512):
    """log P_T(response + eos | prompt) for every pair and temperature: the sum over the
    response tokens and the final eos of log softmax(logits / T), exactly what
    temperature-T ancestral sampling (sfr.generate) assigns. Returns (n, len(temps))."""
    out = []
    for s in range(0, len(prompts), chunk):
        ps, rs = prompts[s:s + chunk], responses[s:s + chunk]
        seqs = [p + r + [eos_id] for p, r in zip(ps, rs)]
        L = max(map(len, seqs))
        idx = torch.full((len(seqs), L), eos_id, dtype=torch.long)
        mask = torch.zeros(len(seqs), L - 1)
        for b, (p, seq) in enumerate(zip(ps, seqs)):
            idx[b, :len(seq)] = torch.tensor(seq)
            mask[b, len(p) - 1:len(seq) - 1] = 1.0  # positions that predict response tokens and eos
        logits = sfr.logits_of(backbone, idx[:, :-1]).float()  # (B, L-1, V)
        y = idx[:, 1:, None]
        out.append(torch.stack([(torch.log_softmax(logits / T, -1).gather(-1, y)[..., 0] * mask).sum(1)
                                for T in temps], dim=1))
    return torch.cat(out)


def exact_metrics(task, backbone, tok, temps, counts, anchor=False):
    """Per prompt (persona i, query q), from the exact probability of every legal response
    (and, for anchor, of every annotation before it):
      well_formed   P(legal)
      fidelity      P(legal, persona i's style) / P(legal)
      mode dist r   r_m = P(legal, mode m) / P(legal); the true one is p_i
      kl_mode       KL(p_i || r)
      entropy_ratio H(r) / H(p_i)
      coverage      share of modes with r_m >= half the smallest true mode probability
      kl_data       KL(f || r), f the mode frequencies of this prompt in the training set
                    (counts (P, Q, M)): how closely the model reproduces its own data
      kl_data_persona  the same with f pooled over the persona's queries: small when the
                    model shares what it saw across queries instead of memorising each prompt
    Returns {metric: array (P, Q, n_temps)} and the joint masses (P, Q, n_temps, M, P)."""
    P, Q, M = task.n_personas, task.n_queries, task.n_modes
    heads = [task.annotation(a) + " " for a in range(M)] if anchor else [""]
    rows, prompts, resps = [], [], []
    for i in range(P):
        for q in range(Q):
            pid = tok.encode(task.prompt(i, q))
            for m in range(M):
                for j in range(P):
                    for hd in heads:
                        rows.append((i, q, m, j))
                        prompts.append(pid)
                        resps.append(tok.encode(hd + task.response(j, q, m)))
    lp = tempered_logprobs(backbone, prompts, resps, tok.eos_id, temps)  # (n, nT)
    mass = torch.zeros(P, Q, len(temps), M, P, dtype=torch.float64)
    for (i, q, m, j), l in zip(rows, lp.double().exp()):
        mass[i, q, :, m, j] += l  # anchor: summed over the annotation sampled first
    wf = mass.sum((-1, -2))  # (P, Q, nT)
    own = torch.stack([mass[i, :, :, :, i].sum(-1) for i in range(P)])  # (P, Q, nT)
    r = mass.sum(-1) / wf[..., None].clamp_min(1e-300)  # (P, Q, nT, M)
    p = torch.as_tensor(task.probs)[:, None, None, :]  # (P, 1, 1, M)
    H = lambda x: -(x * x.clamp_min(1e-300).log()).sum(-1)
    kl = (p * (p.log() - r.clamp_min(1e-300).log())).sum(-1)
    f = torch.as_tensor(counts / np.maximum(counts.sum(-1, keepdims=True), 1))[:, :, None, :]  # (P, Q, 1, M)
    kl_data = (f * (f.clamp_min(1e-300).log() - r.clamp_min(1e-300).log())).sum(-1)
    c = counts.sum(1, keepdims=True)  # (P, 1, M)
    g = torch.as_tensor(c / np.maximum(c.sum(-1, keepdims=True), 1))[:, :, None, :]
    kl_pooled = (g * (g.clamp_min(1e-300).log() - r.clamp_min(1e-300).log())).sum(-1)
    out = {"kl_data": kl_data, "kl_data_persona": kl_pooled, "well_formed": wf, "fidelity": own / wf.clamp_min(1e-300), "kl_mode": kl,
           "entropy_ratio": H(r) / H(p), "coverage": (r >= 0.5 * task.probs.min()).double().mean(-1)}
    return {k: v.numpy() for k, v in out.items()}, mass.numpy()


# ----------------------------------------------------------------------------- sampled metrics


def sampled_metrics(task, texts, encoder):
    """texts[i][q]: the n sampled responses of persona i to query q. Per prompt, averaged:
      coverage_sampled  share of the persona's modes that appear among its n legal samples
      distinct2         sfr_metrics.distinct_n(n=2) of the n samples
      vendi             sfr_metrics.vendi_score of their MiniLM embeddings
    and per query and sample index, averaged:
      cs_self_bleu1     sfr_metrics.self_bleu(max_n=1) across the P personas' answers (lower = more diverse)."""
    P, Q, M = task.n_personas, task.n_queries, task.n_modes
    encoder.encode([_strip(t) or "<empty>" for row in texts for ts in row for t in ts])  # one batched call
    cov, d2, ven, csb = [], [], [], []
    for i in range(P):
        for q in range(Q):
            ts = [_strip(t) for t in texts[i][q]]
            modes = {pr[0] for pr in (task.parse(q, t) for t in ts) if pr is not None}
            cov.append(len(modes) / M)
            d2.append(sfr_metrics.distinct_n(ts, 2))
            ven.append(sfr_metrics.vendi_score(encoder.encode([t or "<empty>" for t in ts])))  # cached now
    n = len(texts[0][0])
    for q in range(Q):
        for s in range(n):
            csb.append(sfr_metrics.self_bleu([_strip(texts[i][q][s]) for i in range(P)], max_n=1))
    return {"coverage_sampled": np.mean(cov), "distinct2": np.mean(d2), "vendi": np.mean(ven),
            "cs_self_bleu1": np.mean(csb)}


def _strip(text):
    words = text.split()
    return " ".join(words[1:] if words and words[0].startswith("<mode") else words)


@torch.no_grad()
def sample_texts(task, backbone, tok, T, n, seed, max_new):
    """n samples per prompt at temperature T with sfr.generate; a sample that does not end
    with eos within max_new tokens is marked illegal ('<unfinished>' appended)."""
    P, Q = task.n_personas, task.n_queries
    prompts = [tok.encode(task.prompt(i, q)) for i in range(P) for q in range(Q)]
    idx = torch.tensor(prompts).repeat_interleave(n, 0)  # all prompts have the same length
    out = sfr.generate(backbone, idx, max_new, temperature=T, eos_id=tok.eos_id,
                       generator=torch.Generator().manual_seed(seed))[:, idx.size(1):]
    texts = [[[] for _ in range(Q)] for _ in range(P)]
    for r, row in enumerate(out.tolist()):
        i, q = divmod(r // n, Q)
        ended = tok.eos_id in row
        text = tok.decode(row[:row.index(tok.eos_id)] if ended else row)
        texts[i][q].append(text if ended else text + " <unfinished>")
    return texts


def true_texts(task, n, rng):
    """n samples per prompt from the true distribution (the reference row of the tables)."""
    return [[[task.response(i, q, int(rng.choice(task.n_modes, p=task.probs[i]))) for _ in range(n)]
             for q in range(task.n_queries)] for i in range(task.n_personas)]


# ----------------------------------------------------------------------------- training one cell


def make_config(args, method, seed, out_dir):
    over = dict(METHODS[method])
    if method == "mtp":
        over = {k: v for k, v in over.items() if k != "mtp_k" or hasattr(sfr.Config, "mtp_k")}
    shared = dict(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, steps=args.steps,
                  lam=args.lam, segment_len=args.segment_len, head_width=args.head_width, fm_positions=args.fm_positions,
                  batch_size=args.batch_size, lr=args.lr, eval_every=max(1, args.steps // 4), ckpt_every=0,
                  seed=seed, out_dir=out_dir)
    return train.RunConfig(**{**shared, **over})


def available_methods(methods):
    """'mtp' needs aux='mtp' in sfr.py; it is dropped (and said so) when missing."""
    kinds = sfr.AUX_KINDS
    keep = [m for m in methods if METHODS[m]["aux"] in kinds]
    return keep, [m for m in methods if m not in keep]


def datasets(task, args, seed, encoder):
    """Train / eval Examples for one seed: the plain set with MiniLM targets (recipe='ours'),
    the same with the authors' targets and positions, their target-shuffled copies, and the
    annotated set."""
    rng = np.random.default_rng(seed)
    train = task.sample(args.n_per_persona, rng)
    evals = task.sample(max(1, args.n_eval // task.n_personas), rng)
    random.Random(seed).shuffle(evals)  # diagnostics read the first batch: let it span personas
    cfg = sfr.Config(segment_len=args.segment_len, aux="sfr")
    pair = lambda xs, anchor=False: [(p, f"{task.annotation(m)} {r}" if anchor else r) for p, r, (_, _, m) in xs]
    plain = sfr.prepare(pair(train), args.tok, cfg, encoder)
    ev = sfr.prepare(pair(evals), args.tok, cfg, encoder)
    null = copy.deepcopy(plain)
    sfr.shuffle_targets(null, seed)
    cfg_a = sfr.Config(**{**AUTHORS, "segment_len": args.segment_len, "aux": "sfr"})
    authors, authors_ev = (sfr.prepare(pair(xs), args.tok, cfg_a, encoder) for xs in (train, evals))
    null_a = copy.deepcopy(authors)
    sfr.shuffle_targets(null_a, seed)
    cfg_none = sfr.Config(aux="none")
    anch = sfr.prepare(pair(train, True), args.tok, cfg_none)
    anch_ev = sfr.prepare(pair(evals, True), args.tok, cfg_none)
    counts = np.zeros((task.n_personas, task.n_queries, task.n_modes))
    for _, _, (i, q, m) in train:
        counts[i, q, m] += 1
    return {"plain": (plain, ev), "null": (null, ev), "authors": (authors, authors_ev),
            "null_authors": (null_a, authors_ev), "anchor": (anch, anch_ev), "counts": counts}


def run_cell(task, args, method, seed, data, encoder):
    """Train one (method, seed) and evaluate it at every temperature."""
    train_set, eval_set = data[DATASET.get(method, "plain")]
    with tempfile.TemporaryDirectory() as d:
        cfg = make_config(args, method, seed, d)
        t0 = time.time()
        model, history = sfr.train(cfg, train_set, args.tok, eval_set, log=lambda s: None)
        train_s = time.time() - t0
    bb = model.backbone.eval()
    anchor = method == "anchor"
    ex, _ = exact_metrics(task, bb, args.tok, args.temps, data["counts"], anchor)
    max_new = len(task.response(0, 0, 0).split()) + 1 + int(anchor) + 4
    cells = []
    for t, T in enumerate(args.temps):
        texts = sample_texts(task, bb, args.tok, T, args.n_samples, seed * 1000 + t, max_new)
        cell = {"method": method, "seed": seed, "T": T, **{k: float(v[..., t].mean()) for k, v in ex.items()}}
        cell.update({k: float(v) for k, v in sampled_metrics(task, texts, encoder).items()})
        cell["example"] = texts[0][0][0]
        cells.append(cell)
    last = history[-1]
    ev_ids = list(range(min(cfg.batch_size, len(eval_set))))  # the batch sfr.train's diagnostics read
    ev = sfr.collate([eval_set[i] for i in ev_ids], ev_ids, args.tok.pad_id, args.tok.eos_id, model.d_z)
    mech = {"method": method, "seed": seed, "train_s": train_s, "final_ar": last["ar"],
            "eval_ar": last.get("eval_ar"), "aux": last.get("aux"),
            "shuffle_gap": last.get("shuffle_gap"),  # sfr.diagnostics: flow / mse heads only
            "aux_grad_share": grad_share(model, ev, cfg, cfg.steps),  # every aux kind, mtp included
            "aux_grad_share_sfr": last.get("aux_grad_share"),  # sfr.diagnostics' value, a cross-check
            "trajectory": [{k: r[k] for k in ("step", "eval_ar", *MECH) if k in r}
                           for r in history if "eval_ar" in r]}
    return cells, mech


def grad_share(model, batch, cfg, step):
    """|g_aux| / (|g_ar| + |g_aux|) for the backbone's gradient on one batch, g_aux the gradient of
    lambda * L_aux, both losses from the model's own forward (sfr.SFRModel): the quantity of
    sfr.diagnostics' aux_grad_share, computed a second way (torch.autograd.grad, cfg.lam) as a
    check of it; the eval records' value is kept beside it as aux_grad_share_sfr."""
    model.eval()
    out = model(batch, step)
    if "aux_sum" not in out:
        return 0.0
    ar = out["ar_sum"] / out["ar_n"].clamp_min(1)
    aux = cfg.lam * out["aux_sum"] / out["aux_n"].clamp_min(1)
    params = [p for p in model.backbone.parameters() if p.requires_grad]

    def norm(gs):
        return math.sqrt(sum(float((g ** 2).sum()) for g in gs if g is not None))
    a = norm(torch.autograd.grad(ar, params, retain_graph=True, allow_unused=True))
    b = norm(torch.autograd.grad(aux, params, allow_unused=True))
    return b / max(1e-12, a + b)


def target_signal(examples):
    """How big the data-dependent part of the flow's velocity target u = z1 - z0 is: the per-dim
    variance of z1 over the training targets (the source z0 has 1 per dim). Unit-norm 384-d
    targets carry <= 1/d of it; target_scale='std' makes it 1 per (live) dim."""
    z = torch.cat([ex.z1[ex.valid] for ex in examples])  # (N, d)
    return {"d": z.size(1), "var_per_dim_unit": float(z.var(0).mean()),
            "mean_norm2_unit": float(z.mean(0).pow(2).sum()), "n_targets": z.size(0)}


def check_same_init(args, methods, data):
    """Does every method start from the same backbone? Train each for one step at lr = 0
    (which leaves the weights at their initial values) and compare the backbones."""
    ref = None
    for method in methods:
        train_set, eval_set = data[DATASET.get(method, "plain")]
        with tempfile.TemporaryDirectory() as d:
            cfg = make_config(args, method, 0, d)
            cfg.steps, cfg.lr, cfg.lr_warmup = 1, 0.0, 1
            model, _ = sfr.train(cfg, train_set, args.tok, None, log=lambda s: None)
        sd = model.backbone.state_dict()
        if ref is None:
            ref = sd
        elif any(not torch.equal(ref[k], sd[k]) for k in ref):
            return False
    return True


# ----------------------------------------------------------------------------- aggregation


# the same loss on targets that carry no information
CONTROLS = {"sfr": "null", "sfr_ours": "null_ours", "sfr_std": "null_std"}


def summarise(cells, mechs, methods, temps, seeds):
    """mean / std over seeds per (method, T); paired differences per seed against sft, and of
    each SFR variant against its null control (what the targets' information adds)."""
    by = {(c["method"], c["seed"], c["T"]): c for c in cells}
    pairs = [(m, "sft") for m in methods if m != "sft" and "sft" in methods]
    pairs += [(m, n) for m, n in CONTROLS.items() if m in methods and n in methods]
    summary = {}
    for m in methods:
        summary[m] = {str(T): {k: _ms([by[m, s, T][k] for s in seeds]) for k in EXACT + SAMPLED} for T in temps}
        ms = [x for x in mechs if x["method"] == m]
        summary[m]["mechanism"] = {k: _ms([x[k] for x in ms if x[k] is not None]) for k in MECH}
    paired = {f"{a} - {b}": {str(T): {k: _ms([by[a, s, T][k] - by[b, s, T][k] for s in seeds], ci=True)
                                      for k in EXACT + SAMPLED} for T in temps} for a, b in pairs}
    for a, _ in pairs[:len(methods) - 1]:  # against sft at the same quality instead of the same T
        paired[f"{a} - sft at matched well-formedness"] = {str(T): {k: _ms(
            [d for d in (matched_quality(by, a, s, T, temps, k) for s in seeds) if d is not None], ci=True)
            for k in MATCHED} for T in temps}
    return summary, paired


MATCHED = ["entropy_ratio", "kl_mode", "coverage"]


def matched_quality(by, m, seed, T, temps, key, flat=0.9995):
    """m's `key` at temperature T minus what sft (same seed) reaches at the same well-formedness,
    sft's temperature curve interpolated: does m beat just sampling sft hotter? None outside the
    range of sft's curve, and where sft's well-formedness is flat (> `flat`, T well below 1)."""
    pts = sorted((by["sft", seed, t]["well_formed"], by["sft", seed, t][key]) for t in temps)
    pts = [p for p in pts if p[0] <= flat]
    x = by[m, seed, T]["well_formed"]
    if len(pts) < 2 or not pts[0][0] <= x <= pts[-1][0]:
        return None
    xs, ys = zip(*pts)
    return by[m, seed, T][key] - float(np.interp(x, xs, ys))


def _ms(xs, ci=False):
    xs = np.asarray(xs, dtype=float)
    if xs.size == 0:
        return None
    out = {"mean": float(xs.mean()), "std": float(xs.std(ddof=1)) if xs.size > 1 else 0.0, "n": int(xs.size)}
    if ci and xs.size > 1:
        from scipy import stats
        half = stats.t.ppf(0.975, xs.size - 1) * out["std"] / math.sqrt(xs.size)
        out.update(ci95=[out["mean"] - half, out["mean"] + half], n_pos=int((xs > 0).sum()))
    return out


def markdown(summary, paired, true_ref, data_ref, methods, T):
    cols = EXACT + SAMPLED
    lines = [f"T = {T} (mean ± std over seeds)", "", "| method | " + " | ".join(cols + MECH) + " |",
             "|---" * (1 + len(cols) + len(MECH)) + "|"]
    lines.append("| true | " + " | ".join("–" if true_ref.get(k) is None else f"{true_ref[k]:.3f}" for k in cols)
                 + " | – | – |")
    for name, sfx in (("per persona", ""), ("per prompt", "_per_prompt")):  # a perfect fit of the training set
        row = {k: f"{data_ref[k + sfx]:.3f}" for k in ("entropy_ratio", "coverage")}
        lines.append(f"| data ({name}) | " + " | ".join(row.get(k, "–") for k in cols + MECH) + " |")
    fmt = lambda d: "–" if d is None else f"{d['mean']:.3f} ± {d['std']:.3f}"
    for m in methods:
        s = summary[m][str(T)]
        lines.append(f"| {m} | " + " | ".join(fmt(s[k]) for k in cols) + " | "
                     + " | ".join(fmt(summary[m]["mechanism"][k]) for k in MECH) + " |")
    lines += ["", f"Paired differences at T = {T}, per seed: mean [95% CI] (seeds with diff > 0)", "",
              "| comparison | " + " | ".join(cols) + " |", "|---" * (1 + len(cols)) + "|"]
    for name, p in paired.items():
        p = p[str(T)]
        if "matched" in name:
            continue
        lines.append(f"| {name} | " + " | ".join(
            f"{p[k]['mean']:+.3f} [{p[k]['ci95'][0]:+.3f}, {p[k]['ci95'][1]:+.3f}] ({p[k]['n_pos']}/{p[k]['n']})"
            if "ci95" in p[k] else f"{p[k]['mean']:+.3f}" for k in cols) + " |")
    lines += ["", f"Against sft sampled at the same well-formedness (sft's T-curve interpolated; T = {T} for the "
              "method): mean [95% CI] (seeds with diff > 0; n = seeds inside sft's range)", "",
              "| comparison | " + " | ".join(MATCHED) + " |", "|---" * (1 + len(MATCHED)) + "|"]
    fmt = lambda d: "–" if d is None else (f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] "
                                           f"({d['n_pos']}/{d['n']})" if "ci95" in d else f"{d['mean']:+.3f} (n={d['n']})")
    for name, p in paired.items():
        if "matched" in name:
            lines.append(f"| {name.split(' at ')[0]} | " + " | ".join(fmt(p[str(T)][k]) for k in MATCHED) + " |")
    return "\n".join(lines)


def sweep_table(summary, methods, temps, keys=("fidelity", "well_formed", "entropy_ratio", "kl_mode")):
    lines = ["Temperature sweep (mean over seeds): " + ", ".join(keys), "",
             "| method | metric | " + " | ".join(f"T={T}" for T in temps) + " |", "|---" * (2 + len(temps)) + "|"]
    for m in methods:
        for k in keys:
            lines.append(f"| {m} | {k} | " + " | ".join(f"{summary[m][str(T)][k]['mean']:.3f}" for T in temps) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- figure


def plot(summary, methods, temps, true_ref, data_ref, path, title):
    """Top: fidelity vs quality over T (the paper's Fig. 2), mode diversity vs T and vs quality.
    Bottom: cross-style Self-BLEU-1 vs T, and the mechanism at the end of training."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(2, 3, figsize=(16, 9))
    ax = ax.flatten()
    colors = dict(zip(ALL_METHODS, plt.cm.tab10.colors))
    get = lambda m, k: np.array([summary[m][str(T)][k]["mean"] for T in temps])  # noqa: E731
    err = lambda m, k: np.array([summary[m][str(T)][k]["std"] for T in temps])  # noqa: E731
    for m in methods:
        c = colors[m]
        bad = np.clip(1 - get(m, "well_formed"), 1e-6, None)  # ill-formed mass, on a log axis
        ax[0].plot(bad, get(m, "fidelity"), "-o", color=c, label=m, ms=3)
        for T, x, y in zip(temps, bad, get(m, "fidelity")):
            if T in (temps[0], 1.0, temps[-1]):
                ax[0].annotate(f"T={T:g}", (x, y), fontsize=7, color=c, xytext=(3, -8), textcoords="offset points")
        ax[2].plot(bad, get(m, "entropy_ratio"), "-o", color=c, label=m, ms=3)
        for a, k in ((ax[1], "entropy_ratio"), (ax[3], "cs_self_bleu1")):
            a.plot(temps, get(m, k), "-o", color=c, label=m, ms=3)
            a.fill_between(temps, get(m, k) - err(m, k), get(m, k) + err(m, k), color=c, alpha=0.12)
    for a in (ax[0], ax[2]):  # quality grows to the right: 1 - P(legal) on a reversed log axis
        a.set_xscale("log")
        a.invert_xaxis()
        a.set_xlabel("P(illegal) = 1 - well-formedness (log, clipped at 1e-6); quality ->")
    ax[0].set(ylabel="style fidelity P(own style | legal)", title="fidelity vs quality, one point per T")
    ax[1].axhline(1.0, color="k", ls="--", lw=0.8, label="true")
    ax[1].plot([1.0], [data_ref["entropy_ratio"]], "k^", label="data, per persona (T=1)")
    ax[1].plot([1.0], [data_ref["entropy_ratio_per_prompt"]], "kv", label="data, per prompt (T=1)")
    ax[1].set(xlabel="temperature T", ylabel="H(model modes) / H(true modes)", title="mode diversity (exact)")
    ax[2].set(ylabel="H(model modes) / H(true modes)", title="diversity vs quality, one point per T (up-right better)")
    ax[3].axhline(true_ref["cs_self_bleu1"], color="k", ls="--", lw=0.8, label="true")
    ax[3].set(xlabel="temperature T", ylabel="Self-BLEU-1 across personas (lower = more diverse)",
              title="cross-style similarity (sampled)")
    ax[1].legend(fontsize=8)
    # mechanism: how much of the backbone's gradient comes from the aux loss, and whether the
    # head's loss depends on h at all (its loss with h shuffled across the batch minus with the true h)
    aux = [m for m in methods if summary[m]["mechanism"]["aux_grad_share"]
           and summary[m]["mechanism"]["aux_grad_share"]["mean"] > 0]
    for a, k, ylabel, log in ((ax[4], "aux_grad_share", "|g_aux| / (|g_ar| + |g_aux|), backbone", False),
                              (ax[5], "shuffle_gap", "head loss(h shuffled) - loss(true h)", True)):
        ms = [m for m in aux if summary[m]["mechanism"][k] is not None]
        vals = [summary[m]["mechanism"][k] for m in ms]
        a.bar(range(len(ms)), [v["mean"] for v in vals], yerr=[v["std"] for v in vals],
              color=[colors[m] for m in ms], capsize=3)
        for x, v in enumerate(vals):
            a.annotate(f"{v['mean']:.3g}", (x, v["mean"]), ha="center", fontsize=8,
                       xytext=(0, 3), textcoords="offset points")
        a.set_xticks(range(len(ms)), ms)
        if log:  # the gap can be ~0 or slightly negative (null controls): linear within +-1e-3
            a.set_yscale("symlog", linthresh=1e-3)
            a.axhline(0, color="k", lw=0.6)
        a.set_ylabel(ylabel)
    ax[4].set_title("mechanism: aux share of the backbone gradient (end)")
    ax[5].set_title("mechanism: does the head use h? (shuffle gap)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--full", action="store_true", help="run the declared GRID instead of the quick look")
    p.add_argument("--methods", default="", help=f"comma list from {ALL_METHODS}; '' = the grid's")
    p.add_argument("--seeds", type=int, default=0, help="seeds 0..n-1; 0 = the grid's (quick 2, full 5)")
    p.add_argument("--temps", default="", help="comma list of temperatures; '' = the grid's")
    p.add_argument("--steps", type=int, default=0, help="training steps; 0 = the grid's (quick 300, full 800)")
    p.add_argument("--personas", type=int, default=9, help="personas of the task")
    p.add_argument("--modes", type=int, default=4, help="answer modes per persona")
    p.add_argument("--queries", type=int, default=4, help="queries (topics) per persona")
    p.add_argument("--prefix_len", type=int, default=4, help="shared generic words before the persona part")
    p.add_argument("--n_per_persona", type=int, default=16, help="training examples per persona")
    p.add_argument("--n_eval", type=int, default=64, help="held-out examples for sfr.train's eval / diagnostics")
    p.add_argument("--n_layer", type=int, default=2, help="built-in GPT blocks")
    p.add_argument("--n_embd", type=int, default=64, help="built-in GPT width")
    p.add_argument("--n_head", type=int, default=4, help="built-in GPT attention heads")
    p.add_argument("--batch_size", type=int, default=16, help="sequences per step")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW peak learning rate")
    p.add_argument("--lam", type=float, default=1.0, help="lambda of every auxiliary loss")
    p.add_argument("--segment_len", type=int, default=8, help="future segment length (words) of the MiniLM targets")
    p.add_argument("--head_width", type=int, default=256, help="flow head width of the recipe='ours' rows "
                   "(sfr: the authors' 1024)")
    p.add_argument("--fm_positions", type=int, default=0,
                   help="positions per sequence the flow head sees each step (sfr Config.fm_positions); "
                        "0 = every valid position, as the authors run it")
    p.add_argument("--n_samples", type=int, default=16, help="samples per prompt and temperature")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (the machine is shared)")
    p.add_argument("--workers", type=int, default=1, help="processes, one seed each at a time")
    p.add_argument("--out", default="", help="json path; '' = results/persona.json (--full) or persona_quick.json")
    p.add_argument("--no_fig", action="store_true", help="write no figure")
    p.add_argument("--replot", default="", help="redraw the table and figure from a saved json, train nothing")
    args = p.parse_args(argv)
    grid = GRID if args.full else QUICK
    args.methods = args.methods.split(",") if args.methods else list(grid["methods"])
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        p.error(f"unknown methods {bad}; choose from {ALL_METHODS}")
    for name in ("seeds", "steps"):  # 0 = the grid's
        if getattr(args, name) < 0:
            p.error(f"--{name}={getattr(args, name)}: must be >= 0 (0 = the grid's)")
    for name in ("personas", "modes", "queries", "n_per_persona", "n_eval", "n_layer", "n_embd", "n_head",
                 "batch_size", "segment_len", "head_width", "n_samples", "threads", "workers"):
        if getattr(args, name) < 1:
            p.error(f"--{name}={getattr(args, name)}: must be >= 1")
    args.seeds = list(range(args.seeds or grid["seeds"]))
    try:
        args.temps = [float(t) for t in args.temps.split(",")] if args.temps else list(grid["temps"])
    except ValueError:
        p.error(f"--temps={args.temps!r}: expected a comma list of numbers, e.g. 0.7,1.0")
    if not all(t >= 0 and math.isfinite(t) for t in args.temps):
        p.error(f"--temps={args.temps}: temperatures must be finite and >= 0")
    args.steps = args.steps or grid["steps"]
    args.out = args.out or str(ROOT / "results" / ("persona.json" if args.full else "persona_quick.json"))
    return args


def derive(res):
    """Everything derived from the raw cells: summaries, paired differences, the table."""
    g = res["meta"]["grid"]
    res.pop("paired_vs_sft", None)  # the name before the null-control comparisons joined it
    res["true"] = {k: None if v is None or v != v else v for k, v in res["true"].items()}  # NaN is not JSON
    summary, paired = summarise(res["cells"], res["mechanism"], g["methods"], g["temps"], g["seeds"])
    T_main = 1.0 if 1.0 in g["temps"] else g["temps"][len(g["temps"]) // 2]
    table = markdown(summary, paired, res["true"], res["data_baseline"]["mean"], g["methods"], T_main)
    res.update(summary=summary, paired=paired, table=table + "\n\n" + sweep_table(summary, g["methods"], g["temps"]))
    return res


def replot(path, figure=True):
    """Recompute the summaries, table and figure of a saved json from its raw cells, rewrite it."""
    res = derive(json.loads(Path(path).read_text()))
    Path(path).write_text(json.dumps(res, indent=1))
    g, t = res["meta"]["grid"], res["meta"]["task"]
    if figure:
        plot(res["summary"], g["methods"], g["temps"], res["true"], res["data_baseline"]["mean"],
             os.path.splitext(path)[0] + ".png",
             f"persona toy ({res['meta']['label']}): {t['personas']} personas, {t['modes']} modes, "
             f"{t['n_per_persona']} ex/persona, {g['steps']} steps, {len(g['seeds'])} seeds; bands = ±1 std")
    return res


def main(argv=None, encoder=None):
    t_start = time.time()
    args = parse_args(argv)
    if args.replot:
        res = replot(args.replot)
        print(res["table"])
        return res
    torch.set_num_threads(args.threads)
    task = PersonaTask(args.personas, args.modes, args.queries, args.prefix_len)
    methods, missing = available_methods(args.methods)
    if missing:
        print(f"skipped (sfr.py has no aux for them yet): {missing}")
    if "sft" in methods:  # sft first: it is the reference of every paired difference
        methods = ["sft"] + [m for m in methods if m != "sft"]
    args.tok = train.Tokenizer.from_texts(task.all_texts(), "word")
    encoder = encoder or sfr_encoder.SegmentEncoder("minilm")
    label = "full grid" if args.full else "QUICK look (not the reported grid; run --full)"
    print(f"persona task: {task.n_personas} personas x {task.n_modes} modes x {task.n_queries} queries, "
          f"prefix {task.prefix_len}, {args.n_per_persona} examples/persona; {label}")
    print(f"grid: methods {methods} x seeds {args.seeds} x T {args.temps}, {args.steps} steps")
    data0 = datasets(task, args, 0, encoder)
    same_init = check_same_init(args, methods, data0)
    print(f"same backbone init across methods: {same_init}")
    signal = target_signal(data0["plain"][0])
    print(f"MiniLM targets, seed 0: per-dim variance {signal['var_per_dim_unit']:.5f} unit-norm "
          f"(1/d = {1 / signal['d']:.5f}) vs 1 for the N(0, I) source and for target_scale='std'")
    jobs = [(task, args, methods, seed) for seed in args.seeds]
    if args.workers > 1:  # one process per seed at a time, each with its own encoder
        import multiprocessing as mp
        with mp.get_context("spawn").Pool(args.workers, initializer=_init_worker, initargs=(args.threads,)) as pool:
            per_seed = pool.starmap(run_seed, jobs)
    else:
        per_seed = [run_seed(*job, encoder=encoder) for job in jobs]
    cells = [c for cs, _, _ in per_seed for c in cs]
    mechs = [m for _, ms, _ in per_seed for m in ms]
    data_refs = [d for _, _, d in per_seed]
    true_ref = sampled_metrics(task, true_texts(task, args.n_samples, np.random.default_rng(12345)), encoder)
    true_ref.update(well_formed=1.0, fidelity=1.0, kl_mode=0.0, entropy_ratio=1.0, coverage=1.0,
                    kl_data=None, kl_data_persona=None)  # no training set behind the true distribution
    data_ref = {k: float(np.mean([d[k] for d in data_refs])) for k in data_refs[0]}
    wall = time.time() - t_start
    meta = {"command": "python toy/persona.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "label": label, "wall_s": wall, "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "sfr_py_sha256": hashlib.sha256(Path(sfr.__file__).read_bytes()).hexdigest(),
            "threads": args.threads, "workers": args.workers, "skipped_methods": missing, "same_backbone_init": same_init, "target_signal": signal,
            "grid": {"methods": methods, "seeds": args.seeds, "temps": args.temps, "steps": args.steps},
            "task": {"personas": task.n_personas, "modes": task.n_modes, "queries": task.n_queries,
                     "prefix_len": task.prefix_len, "n_per_persona": args.n_per_persona,
                     "mode_probs": task.probs.tolist(), "example": [task.prompt(0, 0), task.response(0, 0, 0)]},
            "args": {k: v for k, v in vars(args).items() if k != "tok"}}
    res = {"meta": meta, "true": true_ref, "data_baseline": {"mean": data_ref, "per_seed": data_refs},
           "cells": cells, "mechanism": mechs}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    Path(args.out).write_text(json.dumps(res))
    res = replot(args.out, figure=not args.no_fig)
    print("\n" + res["table"])
    print(f"\nwall time {wall:.0f}s on {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
          f"torch {torch.__version__}, {args.threads} thread(s) x {args.workers} process(es)")
    print(f"wrote {args.out}")
    return res


_ENCODER = None


def _init_worker(threads):
    global _ENCODER
    torch.set_num_threads(threads)
    _ENCODER = sfr_encoder.SegmentEncoder("minilm")


def run_seed(task, args, methods, seed, encoder=None):
    """Every method for one seed: the same data, init and order. Returns (cells, mechanisms, data baseline)."""
    encoder = encoder or _ENCODER
    t0 = time.time()
    data = datasets(task, args, seed, encoder)
    cells, mechs = [], []
    for method in methods:
        c, mch = run_cell(task, args, method, seed, data, encoder)
        cells += c
        mechs.append(mch)
        t1 = next((x for x in c if x["T"] == 1.0), c[-1])
        gap = mch["shuffle_gap"] if mch["shuffle_gap"] is not None else float("nan")
        print(f"seed {seed} {method:8s} train {mch['train_s']:5.1f}s | T={t1['T']}: fid {t1['fidelity']:.3f} "
              f"wf {t1['well_formed']:.3f} H-ratio {t1['entropy_ratio']:.3f} KL {t1['kl_mode']:.3f} "
              f"cov {t1['coverage']:.2f} | gap {gap:.4f} share {mch['aux_grad_share']:.3f} | "
              f"{time.time() - t0:.0f}s", flush=True)
    return cells, mechs, data_baseline(task, data["counts"])


def data_baseline(task, counts):
    """What a perfect fit of the training set's own mode frequencies would score (T = 1):
    per persona pooled over queries, and per prompt (persona, query). counts: (P, Q, M)."""
    H = lambda x: -(x * np.log(np.where(x > 0, x, 1))).sum(-1)
    Htrue = H(task.probs)
    out = {}
    for name, c in (("", counts.sum(1)), ("_per_prompt", counts)):
        r = c / np.maximum(c.sum(-1, keepdims=True), 1)
        Ht = Htrue if name == "" else Htrue[:, None]
        out["entropy_ratio" + name] = float((H(r) / Ht).mean())
        out["coverage" + name] = float((r >= 0.5 * task.probs.min()).mean())
    return out


if __name__ == "__main__":
    main()
