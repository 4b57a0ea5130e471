"""sfr.py: Semantic Flow Regularization (SFR, arXiv 2605.27971) in one file.

SFR adds a training-only loss to a causal LM: a small flow-matching head must model the
*distribution* of a frozen sentence encoder's embedding of the next k response tokens, given the
backbone's hidden state h_t: L = L_AR + lambda * L_FM. The head and the encoder are dropped after
training; the exported model is a plain causal LM.

It imports no module of the project; those beside it that use it import it (README, "What is in
the repository"): train.py is its command line, sfr_authors.py the authors' recipe.

Flow convention (the linear path): tau = 0 is noise, tau = 1 is data; z0 ~ N(0, I), z1 = the
target embedding, z_tau = tau z1 + (1 - tau) z0, velocity target u = z1 - z0; the sampler
integrates dz/dtau = v(z, tau, h) from tau = 0 to tau = 1.

Run: python train.py --steps=300 (the built-in tiny GPT on a built-in demo set); --help lists
every config field with its help line.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# ----------------------------------------------------------------------------- config


class UsageError(ValueError):
    """Bad input (a field, a file, a line): train.py prints it on one line and exits 2."""


UNSET = object()  # every field's default: __post_init__ replaces it by the recipe's value, or ours


def arg(default, help):
    """A Config field: its --help line and our default (a recipe may preset it; explicit wins)."""
    return field(default=UNSET, metadata={"help": help, "ours": default})


@dataclass
class Config:
    """The method, its loop, the built-in GPT and the targets' encoder. train.RunConfig adds what
    only the modules around sfr.py read: data, run files, HF backbone and LoRA, FSDP, the ladder."""
    # --- backbone ---
    backbone: str = arg("gpt", "'gpt' (sfr_gpt.py), or (sfr_hf.py) an HF folder or 'smollm2-135m'")
    hidden_layer: int = arg(-1, "hidden state the aux head reads; -1 = the last (the LM head's)")
    n_layer: int = arg(6, "built-in GPT: transformer blocks (6 x 192: 2.7M parameters)")
    n_head: int = arg(6, "built-in GPT: attention heads")
    n_embd: int = arg(192, "built-in GPT: width, a multiple of n_head")
    block_size: int = arg(64, "max input tokens: prompt + response (+ eos for 'labels'); cut")
    dropout: float = arg(0.0, "built-in GPT: dropout")
    grad_checkpointing: bool = arg(False, "recompute blocks in backward: less memory, more time")
    # --- the recipe: 'ours' (these defaults) or 'authors' (sfr_authors.py: their code) ---
    recipe: str = arg("ours", "preset of the fields in RECIPES[recipe]; explicit fields win")
    # --- future-segment targets (paper Sec. 3) ---
    encoder: str = arg("minilm", "'minilm' (all-MiniLM-L6-v2, offline), or a local / cached model")
    segment_len: int = arg(8, "k of the paper: tokens per future segment (authors' template: 256)")
    stride: int = arg(1, "encode every s-th position, the others copy the nearest (authors: 32)")
    min_suffix: int = arg(1, "anchors whose segment is shorter are skipped (authors' code: 16)")
    positions: str = arg("ar", "head inputs: 'ar' (P-1 .. P+N-2) or 'labels' (P .. P+N; authors)")
    suffix_count: str = arg("ours", "min_suffix counts tokens left ('ours'), windowed ('authors')")
    fill: str = arg("mask", "skipped positions: 'mask' (no target) or 'authors' (filled)")
    pooling: str = arg("model", "encoder pooling: 'model' (its own) or 'mean' (authors)")
    cache: str = arg("", 'on-disk embedding cache file (.pt); "" = in memory only')
    target_scale: str = arg("unit", "'unit' (L2-normalised; authors) or 'std' (standardised)")
    null_targets: bool = arg(False, "control: targets shuffled across the training set")
    # --- auxiliary loss ---
    aux: str = arg("sfr", "'none', 'sfr', 'mse', 'cosine', 'mtp'; 'ladder' (sfr_ladder.py)")
    lam: float = arg(1.0, "weight lambda of the auxiliary loss (authors: 1.0); 0 disables it")
    lam_schedule: str = arg("constant", "'constant', 'ramp', 'linear_decay' or 'cosine_decay'")
    lam_ramp: int = arg(100, "steps of the lambda ramp")
    head_width: int = arg(256, "flow head hidden width (authors' template: 1024)")
    head_layers: int = arg(3, "layers in the head body, input layer included (authors: 3)")
    head_arch: str = arg("ours", "'ours' or 'authors' (their layout; see FlowHead)")
    lam_phases: str = arg("ours", "'ours' (one schedule) or 'authors' (warm-up, ramp, schedule)")
    fm_positions: int = arg(4, "at most this many positions per sequence feed the head; 0 = all")
    head_warmup: int = arg(0, "steps in which only the head learns from L_FM (h detached)")
    warmup_freeze: bool = arg(False, "head_warmup without L_AR, the backbone frozen (authors)")
    gate: float = arg(0.0, "detach h where L_FM < running mean / gate (authors: 1.5); 0 = off")
    gate_on: str = arg("current", "the gate reads this step's L_FM, or the 'previous' (authors)")
    gate_mode: str = arg("dynamic", "'dynamic' (L_FM < mean / gate) or 'static' (L_FM < gate)")
    gate_decay: float = arg(0.99, "decay of the gate's running mean of L_FM")
    ema: float = arg(0.0, "EMA decay of the head, evaluated in its place (authors: 0.999); 0 = off")
    ema_teacher: bool = arg(False, "the EMA goes into the head before each step (authors)")
    # --- training ---
    steps: int = arg(300, "optimiser steps")
    batch_size: int = arg(16, "sequences per step (global, summed over processes)")
    grad_accum: int = arg(1, "micro-batches per step (less memory, the same update); 1 = off")
    dtype: str = arg("float32", "'bf16' / 'fp16': autocast forward, float32 weights (fp16: scaled)")
    lr: float = arg(3e-3, "AdamW peak learning rate")
    lr_schedule: str = arg("cosine", "'constant' or 'cosine' (to 10% of lr), after lr_warmup")
    lr_warmup: int = arg(20, "linear learning-rate warm-up steps")
    weight_decay: float = arg(0.01, "AdamW weight decay")
    grad_clip: float = arg(1.0, "clip the global gradient norm; 0 disables")
    eval_every: int = arg(100, "eval (and diagnostics) every N steps; 0 = only at the end")
    ckpt_every: int = arg(100, "train.RunOnDisk's checkpoint every N steps; 0 = at the end")
    resume: bool = arg(False, "continue from out_dir/ckpt.pt (a line says so if there is none)")
    seed: int = arg(0, "seeds the init, the data order and the flow noise")
    init: str = arg("", 'backbone state_dict .pt to start from; "" = random init')
    device: str = arg("cpu", "'cpu', 'cuda', 'cuda:1', ...")
    # --- the MTP reduction (paper App. A) ---
    mtp_k: int = arg(4, "K tokens predicted per position (head 1 = the next-token head)")
    head_by_head: bool = arg(True, "aux='mtp': one head's (N, V) logits alive at a time")
    # not fields (no annotation): the values validate allows; train.RunConfig adds its own
    CHOICES = {"target_scale": ("unit", "std"),
               "lam_schedule": ("constant", "ramp", "linear_decay", "cosine_decay"),
               "lr_schedule": ("constant", "cosine"), "positions": ("ar", "labels"),
               "suffix_count": ("ours", "authors"), "fill": ("mask", "authors"),
               "pooling": ("model", "mean"), "head_arch": ("ours", "authors"),
               "lam_phases": ("ours", "authors"), "gate_on": ("current", "previous"),
               "gate_mode": ("dynamic", "static"), "dtype": ("float32", "bf16", "fp16")}
    MINIMUM = {"segment_len": 1, "stride": 1, "min_suffix": 1, "fm_positions": 0, "mtp_k": 1,
               "head_layers": 1, "head_width": 1, "head_warmup": 0, "lam_ramp": 0, "dropout": 0,
               "n_layer": 0, "n_head": 1, "n_embd": 1, "block_size": 2, "batch_size": 1, "steps": 1,
               "grad_accum": 1, "lr_warmup": 0, "grad_clip": 0, "eval_every": 0, "ckpt_every": 0}
    FRACTIONS = ("ema",)  # in [0, 1)

    def __post_init__(self):
        recipe = "ours" if self.recipe is UNSET else self.recipe
        if recipe not in RECIPES:
            where = " (import sfr_authors, as train.py does)" if recipe == "authors" else ""
            raise UsageError(f"Config.recipe={recipe!r}: must be one of {tuple(RECIPES)}{where}")
        for f in dataclasses.fields(self):  # fields not given explicitly: the recipe's, or ours
            if getattr(self, f.name) is UNSET:
                setattr(self, f.name, RECIPES[recipe].get(f.name, f.metadata["ours"]))

    def validate(self):
        """Raise a UsageError naming the field for values the code would otherwise misuse."""
        for name, allowed in {**self.CHOICES, "aux": AUX_KINDS + tuple(AUX)}.items():
            value = getattr(self, name)
            if value not in allowed:
                where = " (import sfr_ladder, or run sfr_ladder.py)" if value == "ladder" else ""
                raise UsageError(f"Config.{name}={value!r}: must be one of {allowed}{where}")
        for name, low in self.MINIMUM.items():
            if getattr(self, name) < low:
                raise UsageError(f"Config.{name}={getattr(self, name)}: must be >= {low}")
        for name in self.FRACTIONS:
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UsageError(f"Config.{name}={getattr(self, name)}: must be in [0, 1)")
        if self.backbone != "gpt" and not HF:
            raise UsageError(f"Config.backbone={self.backbone!r}: a Hugging Face folder trains "
                             "through sfr_hf.py (python sfr_hf.py --backbone=..., import sfr_hf)")
        theirs = [name for name, ours in OURS.items() if getattr(self, name) != ours]
        if theirs and not AUTHORS:
            raise UsageError(f"Config.{theirs[0]}={getattr(self, theirs[0])!r} runs the authors' "
                             "code path of sfr_authors.py: import sfr_authors (train.py does)")
        if theirs:  # their switches' own checks
            AUTHORS["validate"](self)
        if self.aux == "mtp" and self.hidden_layer != -1:
            raise UsageError(f"Config.hidden_layer={self.hidden_layer}: MTP heads share the "
                             "unembedding, which reads the last hidden state; use -1")
        if self.aux == "mtp" and (self.head_warmup or self.gate):
            raise UsageError("Config.head_warmup / Config.gate detach h from a flow head, and "
                             "aux='mtp' has none")
        if self.backbone in BACKBONES:  # the built-in GPT, once imported, checks its own fields
            BACKBONES[self.backbone].validate(self)
        if self.aux in AUX:
            AUX[self.aux].validate(self)
        return self


SEGMENT_AUX = ("sfr", "mse", "cosine")  # the aux kinds of a head on future-segment targets
AUX_KINDS = ("none", *SEGMENT_AUX, "mtp")

AUX = {}  # more aux kinds, each a module that registers itself on import: sfr_ladder.py

RECIPES = {"ours": {}}  # presets of Config fields; sfr_authors.py adds 'authors' when imported

# recipe='authors' and its switches run code of sfr_authors.py, which fills this when imported:
# "FlowHead", "anchors", "lam_at", "gate", "teacher_blend" (head_arch, suffix_count / fill,
# lam_phases, gate, ema_teacher) and "validate", their checks. The ours value of each switch is
# the one sfr.py runs itself.
AUTHORS = {}
OURS = {f.name: f.metadata["ours"] for f in dataclasses.fields(Config) if f.name in
        ("head_arch", "suffix_count", "fill", "lam_phases", "gate", "ema_teacher")}

# ----------------------------------------------------------------------------- flow head


def timestep_embedding(tau, dim):
    """Sinusoidal embedding of tau in [0, 1], (N,) -> (N, dim): 1000 tau (as in diffusion models),
    [cos, sin], frequencies 10000^(-i / half)."""
    freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, device=tau.device) / (dim // 2))
    args = 1000.0 * tau[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.lin, self.ln = nn.Linear(width, width), nn.LayerNorm(width)

    def forward(self, x):
        return x + F.silu(self.ln(self.lin(x)))


class FlowHead(nn.Module):
    """The velocity field v_phi([z_tau, temb(tau), h]): a time embedding, Linear-LayerNorm-SiLU,
    n_layers - 1 residual blocks, a zero-initialised output Linear (at step 0 v = 0, which leaves
    the backbone undisturbed). sfr_authors.FlowHead is the authors' layout."""
    embed_time = staticmethod(timestep_embedding)

    def __init__(self, d_z, d_h, width=256, n_layers=3, d_t=64):
        super().__init__()
        self.d_t = d_t
        self.temb = nn.Sequential(nn.Linear(d_t, 4 * d_t), nn.SiLU(), nn.Linear(4 * d_t, d_t))
        self.inp = nn.Sequential(nn.Linear(d_z + d_t + d_h, width), nn.LayerNorm(width), nn.SiLU())
        self.blocks = nn.Sequential(*(ResBlock(width) for _ in range(n_layers - 1)))
        self.out = nn.Linear(width, d_z)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, z_tau, tau, h):  # (N, d_z), (N,), (N, d_h) -> (N, d_z)
        x = torch.cat([z_tau, self.temb(self.embed_time(tau, self.d_t)), h], dim=-1)
        return self.out(self.blocks(self.inp(x)))


def flow_head(cfg, d_z, d_h):
    """The aux head cfg asks for: FlowHead, or sfr_authors.FlowHead (head_arch='authors')."""
    make = FlowHead if cfg.head_arch == "ours" else AUTHORS["FlowHead"]
    return make(d_z, d_h, cfg.head_width, cfg.head_layers)

# ----------------------------------------------------------------------------- the SFR loss


def fm_token_loss(head, h, z1, tau, z0):
    """Per-token SFR loss (paper Sec. 3, authors' code): mean over dims of (v - u)^2 on the
    linear path. h, z1, z0: (N, .); tau: (N,)."""
    z_tau = tau[:, None] * z1 + (1 - tau[:, None]) * z0
    u = z1 - z0
    v_pred = head(z_tau, tau, h)
    return ((v_pred - u) ** 2).mean(-1)  # (N,)


def regression_token_loss(head, h, z1, kind):
    """The authors' deterministic ablations: the head at z = 0, tau = 0 regressed onto z1 ('mse',
    or 'cosine': 1 - cos). Either learns one point per context, E[z1 | h] or its direction."""
    pred = head(torch.zeros_like(z1), torch.zeros(h.size(0), device=h.device), h)
    if kind == "mse":
        return ((pred - z1) ** 2).mean(-1)
    # the eps keeps the gradient finite at the zero-initialised output (Adam rescales it anyway)
    return 1 - (pred * z1).sum(-1) / (pred.norm(dim=-1) * z1.norm(dim=-1)).clamp_min(1e-8)


def target_stats(z1, target_scale):
    """(mean, std) that the targets (N, d_z) are standardised with: identity for 'unit' (the
    authors' L2-normalised targets), per-dim population statistics for 'std'."""
    if target_scale == "unit":
        return torch.zeros(z1.size(1)), torch.ones(z1.size(1))
    return z1.mean(0), z1.std(0, correction=0).clamp_min(1e-6)  # population std: no NaN for one


def draw_noise(ids, step, T, d_z, seed, lengths=None, valid=None, max_positions=0):
    """One step's draws per sequence, seeded by (seed, step, example id): the same in any process,
    batch or resumed run. tau ~ U(0, 1); sel, the positions that feed the head: the valid (B, T)
    ones (None: all) of the first lengths[b] (None: T), at most max_positions at random (0: all);
    z0 ~ N(0, I) there. Returns tau (B,), z0 (B, T, d_z), sel (B, T) bool."""
    B = len(ids)
    lengths = [T] * B if lengths is None else lengths.tolist()
    valid = None if valid is None else valid.cpu()
    tau, z0, sel = torch.zeros(B), torch.zeros(B, T, d_z), torch.zeros(B, T, dtype=torch.bool)
    for b, (i, n) in enumerate(zip(ids.tolist(), lengths)):
        g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_000_033 + i)
        tau[b] = torch.rand((), generator=g)  # one tau per sequence (authors' code)
        cols = torch.arange(n) if valid is None else valid[b, :n].nonzero()[:, 0]
        if max_positions and len(cols) > max_positions:
            cols = cols[torch.randperm(len(cols), generator=g)[:max_positions]].sort().values
        sel[b, cols] = True
        z0[b, cols] = torch.randn(len(cols), d_z, generator=g)
    return tau, z0, sel

# ----------------------------------------------------------------------------- the model


class SFRModel(nn.Module):
    """The backbone plus its training-only heads; forward returns loss *sums* and their counts,
    which the training step normalises over the global batch."""

    def __init__(self, cfg: Config, backbone: nn.Module, d_z: int):
        super().__init__()
        cfg.validate()  # e.g. an unknown aux would train a plain LM without a word
        self.cfg, self.backbone, self.d_z = cfg, backbone, d_z
        self.head = flow_head(cfg, d_z, backbone.d_h) if cfg.aux in SEGMENT_AUX else None
        self.mtp = MTPHeads(backbone.d_h, cfg.mtp_k) if cfg.aux == "mtp" else None  # heads 2..K
        if cfg.aux in AUX:
            self.mtp, self.head = AUX[cfg.aux].modules(cfg, backbone, d_z)
        self.register_buffer("z_mean", torch.zeros(d_z))  # target scaling (identity for 'unit')
        self.register_buffer("z_std", torch.ones(d_z))
        # L_FM's gradient to the backbone: its scale (warm-up, gate), or cut off (warmup_freeze)
        self.grad_box = {"scale": 1.0, "frozen": False}

    def fit_target_scale(self, examples):
        """'std': per-dim mean and std of the training targets: unit variance per dim, like the
        N(0, I) source (a unit-norm target is ~1/sqrt(d) the noise's size: u is mostly noise)."""
        if self.cfg.target_scale == "std":
            mean, std = target_stats(torch.cat([ex.z1[ex.valid] for ex in examples]), "std")
            self.z_mean.copy_(mean)
            self.z_std.copy_(std)

    def forward(self, batch: Batch, step: int, head=None, shuffle_h=False):
        logits, h = self.backbone(batch.idx)  # (B, T, V), (B, T, C)
        if self.cfg.aux == "mtp":
            del logits  # every head, the next-token one too, is recomputed from h (mtp_sums)
            return mtp_sums(self, h, batch)
        m = batch.resp
        ar_sum = F.cross_entropy(logits[m], batch.y[m], reduction="sum")
        out = {"ar_sum": ar_sum, "ar_n": m.sum().float()}
        if self.cfg.aux != "none":
            # warmup_freeze: no gradient at all, rather than a zero one
            h_aux = h.detach() if self.grad_box.get("frozen") else h
            aux_sum, aux_n = self.segment_loss(h_aux, batch, step, head or self.head, shuffle_h)
            out.update(aux_sum=aux_sum, aux_n=aux_n)
        return out

    def head_input(self, h, sel, step, shuffle_h=False):
        """h at the positions sel (B, T) -> (N, C), its gradient scaled by grad_box['scale'] as read
        in backward (warm-up, gate); shuffle_h permutes the rows (the shuffle-gap diagnostic)."""
        h_sel = h[sel]
        if h_sel.requires_grad:
            h_sel.register_hook(lambda g: g * self.grad_box["scale"])
        if shuffle_h:
            g = torch.Generator().manual_seed(step)
            h_sel = h_sel[torch.randperm(h_sel.size(0), generator=g)]
        return h_sel

    def segment_loss(self, h, batch, step, head, shuffle_h=False):
        """Weighted sum of the per-token aux loss over valid positions, and sum(w)."""
        aux = AUX.get(self.cfg.aux)
        if aux is not None and not aux.needs_encoder(self.cfg):  # targets that are not segments
            return aux.segment_sum(self, h, batch, step, head, shuffle_h)
        T = h.size(1)
        lengths = (batch.resp | batch.valid).int().cumsum(1).argmax(1) + 1  # unpadded lengths
        # the position subset saves compute in training; eval scores every valid position
        n_pos = self.cfg.fm_positions if self.training else 0
        noise = draw_noise(batch.ids, step, T, self.d_z, self.cfg.seed, lengths, batch.valid, n_pos)
        tau, z0, sel = (t.to(h.device) for t in noise)
        if not sel.any():
            # no valid target anywhere in this batch: run the head on a dummy input so every
            # parameter still joins the backward pass (no DDP rank waits on a missing grad)
            dummy = head(z0[0, :1], tau[:1], h[0, :1])
            return 0.0 * dummy.sum() + 0.0 * h[0, :1].sum(), torch.zeros((), device=h.device)
        b_idx = sel.nonzero()[:, 0]
        h_sel = self.head_input(h, sel, step, shuffle_h)  # (N, C)
        z1 = (batch.z1[sel] - self.z_mean) / self.z_std  # (N, d_z)
        if self.cfg.aux == "sfr":
            loss = fm_token_loss(head, h_sel, z1, tau[b_idx], z0[sel])
        elif aux is not None:
            loss = aux.token_loss(self.cfg, head, h_sel, z1, tau[b_idx], z0[sel])
        else:
            loss = regression_token_loss(head, h_sel, z1, self.cfg.aux)
        w = batch.w[sel]
        return (w * loss).sum(), w.sum()  # L_FM = sum(w * loss) / max(1, sum(w)) over the batch

# ----------------------------------------------------------------------------- training loop
# train() first, then what it calls.


def train(cfg: Config, train_set, tok, eval_set=None, log=print, dist=None, run=None):
    """Train backbone + aux head; returns (model, history). Data order, flow noise and lambda are
    functions of (seed, step): the step is all their state. run: what is kept (RunInMemory if
    None; train.RunOnDisk: checkpoints, exact resume, logs); dist: the processes that share
    cfg.batch_size, the global batch (OneProcess if None; sfr_dist.py)."""
    cfg.validate()
    dist, run = dist or OneProcess(), run or RunInMemory()
    if cfg.batch_size < dist.world * cfg.grad_accum:  # >= 1 sequence per process and micro-batch
        raise UsageError(f"Config.batch_size={cfg.batch_size} is the global batch: it needs "
                         f">= {dist.world * cfg.grad_accum} sequences, one per process and "
                         f"micro-batch (Config.grad_accum={cfg.grad_accum})")
    if cfg.null_targets:  # the control trains on a copy whose targets are shuffled across the set
        train_set = [dataclasses.replace(ex, z1=ex.z1.clone()) for ex in train_set]
        shuffle_targets(train_set, cfg.seed)
    model, ema, d_z = build(cfg, train_set, tok)
    step_model = dist.wrap(model, ema, log)
    opt, sched = make_optimizer(cfg, model)
    scaler = torch.amp.GradScaler(torch.device(cfg.device).type, enabled=cfg.dtype == "fp16")
    step, history, gate_avg = run.start(cfg, dist, log, model=model, opt=opt, sched=sched,
                                        ema=ema, scaler=scaler)
    while step < cfg.steps:
        ids = batch_ids(step, len(train_set), cfg.batch_size, cfg.seed, dist.rank, dist.world)
        batch = collate([train_set[i] for i in ids], ids, tok.pad_id, tok.eos_id, d_z)
        try:
            terms, gnorm, gate_avg = train_step(model, opt, sched, batch.to(cfg.device), step, cfg,
                                                gate_avg, dist.world, step_model,
                                                ema if cfg.ema_teacher else None, scaler)
        except TrainingDiverged as e:
            raise TrainingDiverged(f"{e}; training stopped, {run.kept()}") from None
        if ema is not None and not cfg.ema_teacher:
            update_ema(ema, model.head, step, cfg)
        rec = {"step": step + 1, "lam": lam_at(cfg, step), "grad_norm": gnorm, **terms}
        step += 1
        at_eval = (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps
        if at_eval and eval_set:
            rec.update(eval_now(model, eval_set, cfg, tok, step, ema))
        history.append(rec)
        run.add(rec, dashboard=at_eval)
        if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.steps:
            run.save(step=step, history=history, gate_avg=gate_avg)
    run.close()
    model, ema = dist.finish(model, ema, lambda: new_model(cfg, tok, d_z).to(cfg.device))
    model.ema_head = ema
    return model, history


def train_step(model, opt, sched, batch, step, cfg, gate_avg=None, world=1, ddp=None, teacher=None,
               scaler=None):
    """One optimiser step on this process's share of the global batch (through `ddp`, if given).
    Returns (terms: global-batch means, grad_norm, gate_avg: the gate's state); raises
    TrainingDiverged on a non-finite loss or gradient before the weights change (fp16: the scaler
    skips the step). teacher: the head of ema_teacher; scaler: fp16's GradScaler (None: off)."""
    # warmup_freeze (authors' phase A): lambda L_FM alone, h detached: no backbone gradient
    frozen = cfg.warmup_freeze and step < cfg.head_warmup
    model.grad_box["frozen"] = frozen
    lam = lam_at(cfg, step)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.dtype)
    device = torch.device(cfg.device).type
    amp = torch.autocast(device, half or torch.bfloat16, enabled=half is not None)
    scaler = scaler or torch.amp.GradScaler(device, enabled=False)
    if cfg.grad_accum == 1:
        with amp:
            out = (ddp or model)(batch, step)
    else:  # micro-batches (B / grad_accum, T): a no-grad forward of all (same draws) gives the
        # whole batch's counts, which normalise each micro-batch's backward below
        micro = [Batch(*m) for m in zip(*(getattr(batch, f.name).tensor_split(cfg.grad_accum)
                                          for f in dataclasses.fields(Batch)))]
        with torch.no_grad(), torch.random.fork_rng(), amp:
            outs = [model(m, step) for m in micro]
            out = {k: sum(o[k] for o in outs) for k in outs[0]}
        reshard(model)
    loss, terms = total_loss(out, lam, world, with_ar=not frozen)
    bad = [f"loss term {k!r} is {v}" for k, v in terms.items() if not math.isfinite(v)]
    if bad:
        raise TrainingDiverged(f"step {step + 1}: " + ", ".join(bad))
    # how much of L_FM's gradient reaches the backbone: 0 during head warm-up and on gated
    # steps. Every rank takes the same decision (terms are global), and no requires_grad flips.
    scale = 0.0 if step < cfg.head_warmup else 1.0
    if cfg.gate and "aux" in terms:
        scale, gate_avg = AUTHORS["gate"](cfg, terms["aux"], gate_avg, scale)
    model.grad_box["scale"] = scale
    opt.zero_grad(set_to_none=True)
    if cfg.grad_accum == 1:  # fp16: the loss scaled up, so that small gradients do not underflow
        scaler.scale(loss).backward()
    else:  # each micro-batch's share of the loss, normalised by the whole batch's counts
        counts = {k: v for k, v in out.items() if k.endswith("_n")}
        for m in micro:
            with amp:
                out_m = {**(ddp or model)(m, step), **counts}
            scaler.scale(total_loss(out_m, lam, world, not frozen)[0]).backward()
    scaler.unscale_(opt)  # the clip and the norm see the true gradient
    clip = cfg.grad_clip or float("inf")
    gnorm = full(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)).item()
    if not math.isfinite(gnorm) and not scaler.is_enabled():  # fp16: the scaler skips the step
        raise TrainingDiverged(f"step {step + 1}: the gradient norm is {gnorm}; loss terms {terms}")
    if teacher is not None and step >= cfg.head_warmup:  # after the check: it writes weights
        AUTHORS["teacher_blend"](teacher, model.head, cfg.ema)
    scaler.step(opt)  # opt.step(), unless fp16's gradient overflowed
    scaler.update()
    sched.step()
    return terms, gnorm, gate_avg


class RunInMemory:
    """What train() keeps of a run by default: nothing on disk, a dashboard line per eval (rank
    0). start returns (step, history, gate state) to start from; train.RunOnDisk overrides all."""

    def start(self, cfg, dist, log, **parts):  # parts: model, opt, sched, ema, scaler
        if cfg.resume:
            raise UsageError("Config.resume=True: this run keeps nothing on disk to resume from; "
                             "train.RunOnDisk does (python train.py --resume=true)")
        self.log, self.t0 = (log if dist.rank == 0 else None), time.time()
        return 0, [], None

    def add(self, rec, dashboard):
        if dashboard and self.log:
            self.log(format_log(rec, time.time() - self.t0))

    def save(self, **loop_state):
        pass

    def kept(self):
        return "nothing was saved (the run was kept in memory)"

    def close(self):
        pass


def build(cfg, train_set, tok):
    """(model, EMA head or None, d_z), seeded, on cfg.device."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    d_z = train_set[0].z1.size(1) if train_set[0].z1 is not None else 1
    model = new_model(cfg, tok, d_z)
    if cfg.init:  # e.g. reproduce_mbpp.py fine-tunes every method from the same weights
        try:
            model.backbone.load_state_dict(torch.load(cfg.init, map_location="cpu"))
        except (OSError, RuntimeError, EOFError) as e:
            raise UsageError(f"Config.init={cfg.init!r}: cannot load it into the backbone "
                             f"({str(e).splitlines()[0]})") from None
    model.fit_target_scale(train_set)
    model.to(cfg.device)
    ema = None
    if cfg.ema and model.head is not None:  # the EMA of the head, evaluated in its place
        ema = copy.deepcopy(model.head).requires_grad_(False)
    return model, ema, d_z


def new_model(cfg, tok, d_z):
    return SFRModel(cfg, build_backbone(cfg, tok.vocab_size), d_z)


def make_optimizer(cfg, model):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    # fused: one kernel for all parameters, where the default loops over them in Python
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95), fused=True)

    def lr_lambda(step):
        if step < cfg.lr_warmup:
            return (step + 1) / cfg.lr_warmup
        if cfg.lr_schedule == "constant":
            return 1.0
        frac = (step - cfg.lr_warmup) / max(1, cfg.steps - cfg.lr_warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)


def lam_at(cfg: Config, step: int) -> float:
    """lambda at `step`: a ramp over lam_ramp steps, else decayed over the run (or constant)."""
    if cfg.lam_phases == "authors":
        return AUTHORS["lam_at"](cfg, step)
    if cfg.lam_schedule == "ramp":
        return cfg.lam * min(1.0, step / max(1, cfg.lam_ramp))
    return decayed(cfg, step / max(1, cfg.steps))


def decayed(cfg, frac):
    """lambda after a fraction frac of the schedule: linear or cosine decay, else constant."""
    if cfg.lam_schedule == "linear_decay":
        return cfg.lam * (1 - frac)
    if cfg.lam_schedule == "cosine_decay":
        return cfg.lam * 0.5 * (1 + math.cos(math.pi * frac))
    return cfg.lam


def batch_ids(step, n, batch_size, seed, rank=0, world=1):
    """This process's share of the step's global batch of example ids: a fixed permutation per
    epoch, so the data position is a function of the step."""
    per_epoch = max(1, n // batch_size)
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    ids = perm[i * batch_size:(i + 1) * batch_size] if n >= batch_size else perm
    return ids[rank::world]


def total_loss(out, lam, world=1, with_ar=True):
    """Normalise the sums over the global batch; each process's share times `world`, as DDP
    averages gradients. with_ar=False: lambda * L_aux alone (the authors' frozen warm-up)."""
    ar_n = all_sum(out["ar_n"].detach()).clamp_min(1)
    terms = {"ar": out["ar_sum"] / ar_n * world}
    if "aux_sum" in out:
        aux_n = all_sum(out["aux_n"].detach()).clamp_min(1)  # max(1, sum(w)), as the authors
        terms["aux"] = out["aux_sum"] / aux_n * world
    loss = (terms["ar"] if with_ar else 0.0) + lam * terms.get("aux", 0.0)
    return loss, {k: all_sum(v.detach()).item() / world for k, v in terms.items()}


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum a detached tensor over processes (identity for one process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        x = x.clone()
        torch.distributed.all_reduce(x)
    return x


class TrainingDiverged(RuntimeError):
    pass


def update_ema(ema, head, step, cfg):
    """EMA of the head's weights, for eval only (training is unchanged by it), from a copy of
    the head at step head_warmup (after its warm-up: ema_teacher, their order, erases it)."""
    if step == cfg.head_warmup:
        ema.load_state_dict(head.state_dict())
    elif step > cfg.head_warmup:
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), head.parameters()):
                pe.lerp_(p, 1 - cfg.ema)


def eval_now(model, eval_set, cfg, tok, step, ema):
    """Held-out losses and the diagnostics on the first eval batch, with the head eval reads:
    the EMA head, or under ema_teacher the student (the head their loss reads)."""
    head = None if cfg.ema_teacher else ema
    res = evaluate(model, eval_set, cfg, tok, step, head=head)
    ids = list(range(min(cfg.batch_size, len(eval_set))))
    batch = collate([eval_set[i] for i in ids], ids, tok.pad_id, tok.eos_id, model.d_z)
    return {**res, **diagnostics(model, batch.to(cfg.device), cfg, step, head=head)}


@torch.no_grad()
def evaluate(model, examples, cfg, tok, step, head=None, max_batches=8):
    """Mean AR and aux losses on held-out examples (same flow noise at every eval)."""
    model.eval()
    ar = aux = ar_n = aux_n = 0.0
    for i in range(0, min(len(examples), max_batches * cfg.batch_size), cfg.batch_size):
        ids = list(range(i, min(i + cfg.batch_size, len(examples))))
        batch = collate([examples[j] for j in ids], ids, tok.pad_id, tok.eos_id, model.d_z)
        out = model(batch.to(cfg.device), step=-1, head=head)
        ar, ar_n = ar + out["ar_sum"].item(), ar_n + out["ar_n"].item()
        if "aux_sum" in out:
            aux, aux_n = aux + out["aux_sum"].item(), aux_n + out["aux_n"].item()
    model.train()
    reshard(model)
    res = {"eval_ar": ar / max(1, ar_n)}
    if model.cfg.aux != "none" and aux_n:
        res["eval_aux"] = aux / max(1, aux_n)
    return res


def diagnostics(model, batch, cfg, step, head=None):
    """What the aux loss does to the backbone, on one batch:
    shuffle_gap: the head's loss with h permuted across the batch minus with the true h
        (same noise and tau); ~0 means the head ignores the backbone's state (flow heads);
    aux_grad_share: |g_aux| / (|g_ar| + |g_aux|) for the backbone's gradient, g_aux the
        gradient of lambda * L_aux (any aux kind, MTP included)."""
    head = head or model.head
    if model.cfg.aux == "none":
        return {}
    model.eval()
    res = {}
    if head is not None:  # through model(), not model.backbone(): FSDP gathers in model's hooks
        with torch.no_grad():
            true = model(batch, step, head=head)
            shuf = model(batch, step, head=head, shuffle_h=True)
        gap = (shuf["aux_sum"] - true["aux_sum"]).item()
        res["shuffle_gap"] = gap / max(1.0, true["aux_n"].item())
        reshard(model)
    params = [p for p in model.backbone.parameters() if p.requires_grad]

    def backbone_grad_norm(term):  # a forward and backward per term: FSDP gathers no other way
        model.zero_grad(set_to_none=True)
        term(model(batch, step, head=head)).backward()
        grads = [p.grad for p in params if p.grad is not None]
        return full(torch.nn.utils.get_total_norm(grads)).item()
    # measured with the aux gradient flowing, whatever the last step's warm-up or gate decided
    scale, frozen = model.grad_box["scale"], model.grad_box["frozen"]
    model.grad_box.update(scale=1.0, frozen=False)
    a = backbone_grad_norm(lambda out: out["ar_sum"] / out["ar_n"].clamp_min(1))
    lam = lam_at(cfg, step)
    b = backbone_grad_norm(lambda out: lam * out["aux_sum"] / out["aux_n"].clamp_min(1))
    model.zero_grad(set_to_none=True)
    model.grad_box.update(scale=scale, frozen=frozen)
    res["aux_grad_share"] = b / max(1e-12, a + b)
    model.train()
    return res


def format_log(rec, elapsed):
    """One dashboard line: every loss term shown on its own."""
    keys = ["ar", "aux", "eval_ar", "eval_aux", "shuffle_gap", "aux_grad_share", "lam", "grad_norm"]
    parts = [f"{k} {rec[k]:.4f}" for k in keys if k in rec]
    return f"step {rec['step']:5d} | " + " | ".join(parts) + f" | {elapsed:.1f}s"


class OneProcess:
    """What train() does differently under several processes, here for one (sfr_dist.py's DDP and
    FSDP override it). wrap: the module a step calls; gather: [obj of every process], e.g. RNG
    states to checkpoint; finish: the (model, ema) train() returns (FSDP: whole, on rank 0)."""
    rank, world, sharded = 0, 1, False

    def __init__(self):
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UsageError("WORLD_SIZE > 1: train.py trains one process; for several use "
                             "torchrun --nproc_per_node=N sfr_dist.py ... (DDP, or FSDP with "
                             "--shard=true)")

    def wrap(self, model, ema, log):
        return model

    def gather(self, obj):
        return [obj]

    def finish(self, model, ema, new_model):
        return model, ema


def full(x):
    """A DTensor (a sharded parameter, gradient or norm) as one whole tensor; others unchanged."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def reshard(model):
    """After a no-grad forward, FSDP keeps the root unit's weights gathered for a backward that
    does not come: free them (sfr_dist.py). A no-op for one process."""
    if hasattr(model, "reshard"):
        model.reshard()

# ------------------------------------------------------------------- future-segment targets
# What the loop above trains on: prepare() (next section) gives each example z1, the encoder's
# embedding of the next segment_len response tokens at each head position (paper Sec. 3).


def future_segments(N: int, stride: int, min_suffix: int, positions="ar"):
    """Per head position j, the start a of its target segment, response[a:a + segment_len], or
    None. positions='ar': j = 0 .. N-1 is input P-1+j, a = j; 'labels' (the authors'):
    j = 0 .. N is input P+j, a = j + 1. j takes its nearest anchor of 0, s, 2s, ... (s = stride;
    ties to the earlier one), None if that one has fewer than min_suffix tokens left."""
    n, off = (N, 0) if positions == "ar" else (N + 1, 1)
    last = stride * ((n - 1) // stride)  # the last anchor inside
    anchors = (min(stride * round(j / stride - 1e-9), last) for j in range(n))
    return [a + off if N - a - off >= min_suffix else None for a in anchors]


def attach_targets(examples, tok, encoder, cfg: Config):
    """Fill ex.z1 / ex.valid: the encoder's embedding of the next segment_len response tokens."""
    plans, texts = [], []
    for ex in examples:
        r = ex.response
        if (cfg.suffix_count, cfg.fill) == ("ours", "mask"):
            anchors = future_segments(len(r), cfg.stride, cfg.min_suffix, cfg.positions)
        else:  # the authors' counting or fill
            anchors = AUTHORS["anchors"](r, tok, cfg)
        segs = {a: tok.decode(r[a:a + cfg.segment_len]) for a in set(anchors) if a is not None}
        plans.append((anchors, segs))
        texts.extend(segs.values())
    if not texts:
        raise UsageError(f"no response is long enough for a target (segment_len={cfg.segment_len}"
                         f", min_suffix={cfg.min_suffix}): lower min_suffix or use longer responses"
                         " (recipe='authors' presets their segment_len=256, min_suffix=16)")
    table = dict(zip(texts, encoder.encode(texts)))
    for ex, (anchors, segs) in zip(examples, plans):
        ex.start = -1 if cfg.positions == "ar" else 0
        # fill='authors' counts a position without target, at z1 = 0, as their loss mask does
        ex.valid = torch.tensor([a is not None or cfg.fill == "authors" for a in anchors],
                                dtype=torch.bool)
        ex.z1 = torch.zeros(len(anchors), encoder.dim)
        for p, a in enumerate(anchors):
            if a is not None:
                ex.z1[p] = table[segs[a]]
    return examples


def needs_encoder(cfg):
    aux = AUX.get(cfg.aux)
    return cfg.aux in SEGMENT_AUX or (aux is not None and aux.needs_encoder(cfg))


def shuffle_targets(examples, seed):
    """Null-target control: the valid targets permuted across the set (marginal kept)."""
    rows = [(ex, p) for ex in examples for p in ex.valid.nonzero().flatten().tolist()]
    z = torch.stack([ex.z1[p] for ex, p in rows])
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
    for (ex, p), zz in zip(rows, z[perm]):
        ex.z1[p] = zz

# ----------------------------------------------------------------------------- batches


@dataclass
class Example:
    """One (prompt, response) pair as token ids, with its future-segment targets: z1[j] is the
    target of input position P + start + j (P = prompt length), valid[j] whether it counts."""
    prompt: list[int]
    response: list[int]  # response token ids, eos excluded
    z1: torch.Tensor | None = None  # (n, d): n = N ('ar') or N + 1 ('labels', with eos)
    valid: torch.Tensor | None = None  # (n,) bool
    start: int = -1  # the first head position, relative to P: -1 ('ar'), 0 ('labels')


@dataclass
class Batch:
    idx: torch.Tensor  # (B, T) input tokens
    y: torch.Tensor  # (B, T) next tokens
    resp: torch.Tensor  # (B, T) bool: y is a response token (or the final eos): L_AR's positions
    z1: torch.Tensor  # (B, T, d) future-segment targets
    valid: torch.Tensor  # (B, T) bool: this position has a target
    w: torch.Tensor  # (B, T) position-decay weight of the target
    ids: torch.Tensor  # (B,) example index in the dataset, seeds the per-sequence flow noise

    def to(self, device):
        return Batch(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))


def collate(examples, ids, pad_id, eos_id, d_z) -> Batch:
    """Right-pad Examples into a Batch (causal attention never looks right: no mask needed)."""
    seqs = [ex.prompt + ex.response + [eos_id] for ex in examples]
    # positions='labels' feeds the head at the eos position too: one input more than L_AR needs
    extra = [int(ex.z1 is not None and ex.start >= 0) for ex in examples]
    B, T = len(seqs), max(len(s) - 1 + e for s, e in zip(seqs, extra))
    idx, y = torch.full((B, T), pad_id), torch.full((B, T), pad_id)
    resp, valid = torch.zeros(B, T, dtype=torch.bool), torch.zeros(B, T, dtype=torch.bool)
    z1, w = torch.zeros(B, T, d_z), torch.zeros(B, T)
    for b, (ex, s, e) in enumerate(zip(examples, seqs, extra)):
        L, P, N = len(s) - 1, len(ex.prompt), len(ex.response)
        idx[b, :L + e], y[b, :L] = torch.tensor(s[:L + e]), torch.tensor(s[1:])
        resp[b, P - 1:L] = True  # input position P-1+p predicts response token p
        if ex.z1 is not None and N > 0:
            n, a = len(ex.z1), P + ex.start  # n head positions from a
            z1[b, a:a + n] = ex.z1
            valid[b, a:a + n] = ex.valid
            j = torch.arange(n, dtype=torch.float)
            w[b, a:a + n] = (n - j) / n  # w_j = (n - j + 1) / n, 1-based j (authors' code)
    return Batch(idx, y, resp, z1, valid, w, torch.as_tensor(ids))


def prepare(pairs, tok, cfg: Config, encoder=None):
    """Tokenise (prompt, response) pairs into Examples (responses cut to fit block_size), with
    targets from `encoder` (dim, encode(texts) -> (n, dim) unit-norm) if the aux loss needs them."""
    cfg.validate()  # segment_len, stride, min_suffix < 1: empty or misplaced segments
    if needs_encoder(cfg) and encoder is None:
        raise UsageError(f"Config.aux={cfg.aux!r} needs future-segment targets: pass an encoder "
                         "(sfr_encoder.SegmentEncoder.from_config(cfg), or anything with "
                         "encode(texts) -> (n, d) and dim)")
    examples = []
    eos_input = int(cfg.positions == "labels" and needs_encoder(cfg))  # the head reads eos too
    for prompt, response in pairs:
        p = list(tok.encode(prompt)) or [tok.eos_id]  # the first response token needs a position
        if len(p) + 1 >= cfg.block_size:
            raise UsageError(f"prompt of {len(p)} tokens leaves no room in "
                             f"Config.block_size={cfg.block_size}")
        r = tok.encode(response)[:cfg.block_size - len(p) - eos_input]  # + eos: block_size + 1
        examples.append(Example(p, r))
    return attach_targets(examples, tok, encoder, cfg) if needs_encoder(cfg) else examples

# ----------------------------------------------------------------------------- the MTP reduction
# Paper, App. A: multi-token prediction (MTP, Gloeckle et al. 2024) is a flow-matching loss, and
# SFR lifts its restrictions one at a time (sfr_ladder.py). aux='mtp' trains MTP; fdfm_loss
# computes the same loss the flow-matching way, and tests/test_mtp.py checks they agree.


class MTPHeads(nn.Module):
    """Heads 2..K of Gloeckle et al. (2024, Sec. 2) on the shared trunk: a residual MLP layer
    each (theirs: a transformer layer), then the shared unembedding; head 1 is the backbone's
    own next-token head. The layers' output Linear starts at zero: every head starts as head 1."""

    def __init__(self, d_h, K):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d_h), nn.Linear(d_h, 4 * d_h), nn.GELU(),
                          nn.Linear(4 * d_h, d_h)) for _ in range(K - 1))
        for f in self.layers:
            nn.init.zeros_(f[-1].weight)
            nn.init.zeros_(f[-1].bias)

    def heads(self, unembed):
        """[head_1, ..., head_K]: callables h (N, C) -> logits (N, V)."""
        return [unembed] + [lambda h, f=f: unembed(h + f(h)) for f in self.layers]


def future_tokens(batch, K):
    """Targets of heads k = 1..K: y_k[t] = y[t + k - 1], the token k steps after input t, valid
    where it is still a response token (past the end: 0). Returns views y_k, valid_k: (B, T, K)."""
    return tuple(F.pad(x, (0, K - 1)).unfold(1, K, 1) for x in (batch.y, batch.resp))


def mtp_loss(h, heads, y, valid, head_by_head=True):
    """MTP (Gloeckle et al. 2024, eq. 1): the cross-entropy of head k on the token k steps ahead,
    summed over valid positions. h: (N, C); y, valid: (N, K). Returns the K per-head sums (K,)."""
    def head_loss(h, k):
        m = valid[:, k]
        return F.cross_entropy(heads[k](h[m]), y[m, k], reduction="sum")
    if head_by_head and len(heads) > 1:  # one (N, V) logits alive at a time (their Sec. 2):
        # backward recomputes each head, for a second forward; the same gradients (test_mtp.py)
        return torch.stack([checkpoint(head_loss, h, k, use_reentrant=False)
                            for k in range(len(heads))])
    return torch.stack([head_loss(h, k) for k in range(len(heads))])


def mtp_sums(model, h, batch):
    """aux='mtp': every head, the next-token one included, from h. L_AR is head 1 and L_aux the
    sum of heads 2..K, both per next-token position, so L_AR + L_aux at lam = 1 is Gloeckle et
    al.'s summed loss (a head's positions past the response end count zero)."""
    y, valid = (t.flatten(0, 1) for t in future_tokens(batch, model.cfg.mtp_k))  # (B T, K)
    heads = model.mtp.heads(model.backbone.get_output_embeddings())  # shared (Gloeckle et al.)
    sums = mtp_loss(h.flatten(0, 1), heads, y, valid, model.cfg.head_by_head)  # (K,)
    n = batch.resp.sum().float()
    return {"ar_sum": sums[0], "ar_n": n, "aux_sum": sums[1:].sum(), "aux_n": n}


def induced_divergence(u, v_pred, x0, kind, log_r=None):
    """D_T(u, v) = D(x0 + u, x0 + v), the divergence on velocities induced by D on the simplex
    (paper App. A), per copy: (N, c, D) -> (N, c). 'kl': KL(p || r), p = x0 + u, r = x0 + v; at
    x0 = pi, p = e(y) and r = q: -log q(y). 'sq': mean over dims of (v - u)^2, SFR's loss (x0
    drops out; on a one-hot copy, the Brier score of q over V). log_r: log r, if known."""
    if kind == "sq":
        return ((v_pred - u) ** 2).mean(-1)
    p = x0 + u  # the target's endpoint e(y)
    if log_r is None:  # log_r from the logits is better: pi + (q - pi) rounds to 0 where
        # q(y) < eps pi(y), and the loss would saturate with a zero gradient
        r = x0 + v_pred
        log_r = r.clamp_min(torch.finfo(r.dtype).tiny).log()
    return (torch.xlogy(p, p) - torch.where(p > 0, p * log_r, 0.0)).sum(-1)  # 0 log 0 = 0


def fdfm_loss(h, heads, y, valid, tau, pi, divergence="kl"):
    """F_Delta-FM (paper App. A), computed the flow-matching way: K heads q_k = softmax(head_k(h))
    as a constant field v = q_k - pi, a point source at pi, the straight path z_tau =
    tau e(y[t+k]) + (1 - tau) pi, D_T at any tau (the field ignores z_tau and tau). h: (N, C);
    y, valid: (N, K); tau: (N,); pi: (V,). Returns (K,) sums; with 'kl' they are mtp_loss's."""
    log_q = torch.stack([head(h).log_softmax(-1) for head in heads], 1)  # (N, K, V)
    x1 = F.one_hot(y, pi.numel()).to(pi.dtype)  # vertices of the simplex
    x0 = pi.expand_as(x1)
    u = x1 - x0  # d z_tau / d tau
    v_pred = log_q.exp() - x0
    return (induced_divergence(u, v_pred, x0, divergence, log_r=log_q) * valid).sum(0)

# ----------------------------------------------------------------------------- backbones
# A backbone returns (logits (B, T, V), h (B, T, C)), h the state the aux heads read; one with
# new_cache() also takes forward(idx, cache), for sampling. Registered on import: 'gpt' by
# sfr_gpt.py (the built-in GPT), a Hugging Face folder by sfr_hf.py in HF, whose "backbone":
# (cfg, vocab_size) -> module; train.py reads the other two: "tokenizer": cfg -> the folder's
# tokenizer or None; "chat": cfg -> None (no chat template) or a function (messages,
# "file:line") -> [(prompt, response), ...].
BACKBONES, HF = {}, {}


def build_backbone(cfg: Config, vocab_size: int) -> nn.Module:
    if cfg.backbone != "gpt":
        return HF["backbone"](cfg, vocab_size)
    if "gpt" not in BACKBONES:
        raise UsageError("Config.backbone='gpt': the built-in GPT is sfr_gpt.py's: import sfr_gpt "
                         "(train.py does)")
    return BACKBONES["gpt"](cfg, vocab_size)

# ----------------------------------------------------------------------------- sampling
# sample_head draws embeddings from the flow head (the toys show its modes); the rest samples
# tokens from the LM.


@torch.no_grad()
def sample_head(head, h, steps=32, generator=None, z0=None):
    """One z1 per row of h, (N, d_h) -> (N, d_z): Euler steps of dz/dtau = v(z, tau, h) from
    tau = 0 (z0 ~ N(0, I), or the z0 given, e.g. zeros for a point source) to tau = 1."""
    d_z = head.out.out_features
    z = torch.randn(h.size(0), d_z, generator=generator).to(h) if z0 is None else z0.to(h)
    for i in range(steps):
        tau = torch.full((h.size(0),), i / steps, device=h.device)
        z = z + head(z, tau, h) / steps
    return z


def logits_of(model, idx):
    """Logits from a built-in GPT, an sfr_hf.HFBackbone, or a plain HF model."""
    out = model(idx)
    return out[0] if isinstance(out, tuple) else out.logits


def sample_next(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """One token per row of logits (B, V): temperature 0 = greedy, else top-k, then top-p
    (the smallest set of tokens with mass >= top_p), then a draw. Returns (B, 1)."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        p = sorted_logits.softmax(-1)
        drop = p.cumsum(-1) - p > top_p  # the mass before this token already reaches top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1).cpu(), 1, generator=generator).to(logits.device)


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, eos_id=None,
             generator=None, kv_cache=True):
    """Sample continuations of idx (B, T) (see sample_next), stopping once every row has made
    eos_id. A backbone with new_cache() (the built-in GPT) keeps a KV cache while the sequence
    fits block_size (kv_cache=False: the uncached reference), then reads the last block_size
    tokens at each step; a model without block_size (HF) reads all of them. Returns (B, T + new)."""
    block = getattr(model, "block_size", None) or 10**9
    cache = model.new_cache() if kv_cache and hasattr(model, "new_cache") else None
    done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        if cache is not None and idx.size(1) <= block:
            fed = cache[0]["k"].size(2) if cache[0] else 0  # tokens the cache holds
            logits = model(idx[:, fed:], cache)[0][:, -1, :].float()  # (B, V)
        else:
            logits = logits_of(model, idx[:, -block:])[:, -1, :].float()
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        if eos_id is not None:
            nxt = nxt.masked_fill(done[:, None], eos_id)
            done |= nxt[:, 0] == eos_id
        idx = torch.cat([idx, nxt], dim=1)
        if eos_id is not None and done.all():
            break
    return idx

if __name__ == "__main__":
    sys.exit("sfr.py is the library; its command line is train.py: python train.py --help")
