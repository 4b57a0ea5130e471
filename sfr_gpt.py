"""sfr_gpt.py: the built-in GPT, sfr.py's default backbone (Config.backbone='gpt').

A tiny GPT-2-style causal transformer for CPU work (nanoGPT's model.py, smaller), with a KV
cache for sampling (nanochat's). Like every backbone it returns (logits (B, T, V), h (B, T, C)),
h being the hidden state Config.hidden_layer that the aux heads read; sfr.py also asks it for
new_cache() (sampling) and get_output_embeddings() (MTP's shared unembedding). Importing this
module registers it as sfr.BACKBONES['gpt'] (train.py does).
"""
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import sfr


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout

    def forward(self, x, cache=None):
        B, T, C = x.size()
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:  # sampling: the keys and values of the tokens before these
            if cache:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
        # a whole sequence attends causally; one new token (T = 1) to every cached key
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T == k.size(2),
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(),
                                 nn.Linear(4 * cfg.n_embd, cfg.n_embd), nn.Dropout(cfg.dropout))

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln1(x), cache)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A tiny GPT-2-style causal transformer for CPU work. forward(idx, cache): cache, a list
    of one dict per block (empty at first), keeps every block's keys and values for sampling
    (nanochat's KV cache): the first call feeds the prompt, each later call one new token."""

    def __init__(self, cfg: sfr.Config, vocab_size: int):
        super().__init__()
        self.block_size, self.layer, self.d_h = cfg.block_size, cfg.hidden_layer, cfg.n_embd
        self.grad_checkpointing = cfg.grad_checkpointing
        self.wte = nn.Embedding(vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        self.apply(self._init)

    @staticmethod
    def validate(cfg):
        """Config.validate's checks of the fields the built-in GPT reads."""
        if cfg.n_embd % cfg.n_head:
            raise sfr.UsageError(f"Config.n_embd={cfg.n_embd} must be a multiple of "
                                 f"Config.n_head={cfg.n_head}")
        if not -cfg.n_layer - 1 <= cfg.hidden_layer <= cfg.n_layer:
            raise sfr.UsageError(f"Config.hidden_layer={cfg.hidden_layer}: the built-in GPT has "
                                 f"n_layer + 1 = {cfg.n_layer + 1} hidden states")

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def get_output_embeddings(self):  # the unembedding that MTP heads share (HF's name)
        return self.lm_head

    def new_cache(self):
        return [{} for _ in self.blocks]

    def forward(self, idx, cache=None):
        B, T = idx.size()
        t0 = cache[0]["k"].size(2) if cache and cache[0] else 0  # tokens already in the cache
        if t0 + T > self.block_size:
            raise ValueError(f"sequence of {t0 + T} tokens is longer than "
                             f"block_size={self.block_size}")
        x = self.wte(idx) + self.wpe(torch.arange(t0, t0 + T, device=idx.device))
        hidden = [x]
        for i, block in enumerate(self.blocks):
            if self.grad_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, None if cache is None else cache[i])
            hidden.append(x)
        hidden[-1] = self.ln_f(x)  # as in HF models, the last hidden state is the normalised one
        return self.lm_head(hidden[-1]), hidden[self.layer]


sfr.BACKBONES["gpt"] = GPT

if __name__ == "__main__":
    sys.exit("sfr_gpt.py is the built-in GPT, imported by train.py: python train.py --help")
