"""toy/cost.py: what does SFR cost? (issue 3)

One run measures, on this machine, and writes results/cost.json:

    step_ratio       SFR / SFT time of one training step (batch, forward, backward, update)
                     with the default config and built-in model, targets cached: the encoder
                     is not in the loop, as in sfr.train, which attaches targets beforehand
    generate_ratio   time of sfr.generate with the exported model (export, load_exported)
                     / the in-memory backbone: the deployed model is a plain LM
    flop_ratio       head / backbone FLOPs of one training step, counted by
                     torch.utils.flop_counter (matmuls and attention; elementwise ops are
                     not counted), plus an analytic count per token to check it
    encoder          segments per second the real MiniLM encodes (distinct MBPP windows)
    cache            the target cache's hit rate preparing the demo set, and again
    quality          (--quality) what the cheaper default head costs: eval losses and the
                     shuffle gap of the default head vs the authors'-style wide, all-positions one

Timings interleave SFT and SFR steps (SFT, SFR, SFT, ...) in one process after a warm-up
and report medians, so drifts in machine load hit both alike. --threads sets torch's
threads (default 1: the numbers then do not depend on what else the machine runs).

--hf_layers etc. build a randomly initialised Qwen2-architecture model from a config (no
download; default ~0.5B parameters) and time SFR / SFT steps on synthetic long sequences:
run it with --device=cuda where a GPU is at hand.

Run:  python toy/cost.py                   (~2 min on a 2-core CPU)
      python toy/cost.py --hf --device=cuda
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sfr  # noqa: E402
import sfr_gpt  # noqa: E402  (the built-in GPT)
import sfr_encoder  # noqa: E402  (the frozen sentence encoder of the targets)
import train  # noqa: E402

MBPP = ROOT.parent / "shared" / "data" / "mbpp.jsonl"


# ----------------------------------------------------------------------------- training step


def demo_setup(cfg, encoder):
    """Tokenizer and examples of the built-in demo set, targets attached (cached) when needed."""
    pairs = train.demo_pairs()
    tok = train.build_tokenizer(cfg, [t for p in pairs for t in p])
    return tok, sfr.prepare(pairs, tok, cfg, encoder)


def stepper(cfg, tok, examples, d_z):
    """A closure running one training step of sfr.train (batch, forward, loss, backward, update)."""
    torch.manual_seed(cfg.seed)
    model = sfr.SFRModel(cfg, sfr.build_backbone(cfg, tok.vocab_size), d_z).to(cfg.device)
    opt, sched = sfr.make_optimizer(cfg, model)
    state = {"step": 0, "gate": None}

    def step():
        s = state["step"]
        ids = sfr.batch_ids(s, len(examples), cfg.batch_size, cfg.seed)
        batch = sfr.collate([examples[i] for i in ids], ids, tok.pad_id, tok.eos_id, d_z).to(cfg.device)
        _, _, state["gate"] = sfr.train_step(model, opt, sched, batch, s, cfg, state["gate"])
        state["step"] += 1
    return step, model


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(fns, repeats, warmup, device="cpu"):
    """Median seconds per call of each fn, calling them in turn (a, b, a, b, ...)."""
    times = [[] for _ in fns]
    for r in range(warmup + repeats):
        for fn, ts in zip(fns, times):
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            if r >= warmup:
                ts.append(time.perf_counter() - t)
    return [statistics.median(ts) for ts in times]


def step_cost(base, encoder, repeats):
    sft_cfg = sfr.Config(**{**vars(base), "aux": "none"})
    tok, sft_examples = demo_setup(sft_cfg, None)
    _, sfr_examples = demo_setup(base, encoder)
    sft, _ = stepper(sft_cfg, tok, sft_examples, 1)
    flow, _ = stepper(base, tok, sfr_examples, encoder.dim)
    t_sft, t_sfr = interleaved([sft, flow], repeats, warmup=20)
    return {"sft_step_ms": 1e3 * t_sft, "sfr_step_ms": 1e3 * t_sfr, "step_ratio": t_sfr / t_sft}


def size_sweep(base, encoder, sizes, repeats):
    """step_ratio as the backbone grows, head and positions fixed: SFR adds a roughly fixed
    cost per step (the head's ops, the noise draws, the head's optimiser state), so the
    ratio says as much about the backbone's size as about SFR."""
    rows = []
    for n_layer, n_embd in sizes:
        cfg = sfr.Config(**{**vars(base), "n_layer": n_layer, "n_embd": n_embd, "n_head": max(1, n_embd // 32)})
        r = step_cost(cfg, encoder, repeats)
        params = sum(p.numel() for p in sfr_gpt.GPT(cfg, 100).parameters())
        rows.append({"n_layer": n_layer, "n_embd": n_embd, "backbone_params": params, **r})
    return rows


# ----------------------------------------------------------------------------- FLOPs


def counted_flops(cfg, tok, examples, d_z):
    """FLOPs of one training step's forward + backward, backbone only and in all."""
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(cfg.seed)
    model = sfr.SFRModel(cfg, sfr.build_backbone(cfg, tok.vocab_size), d_z)
    ids = sfr.batch_ids(0, len(examples), cfg.batch_size, cfg.seed)
    batch = sfr.collate([examples[i] for i in ids], ids, tok.pad_id, tok.eos_id, d_z)
    counts = []
    for part in ("backbone", "all"):
        with FlopCounterMode(display=False) as fc:
            if part == "backbone":
                logits, _ = model.backbone(batch.idx)
                logits.sum().backward()
            else:
                sfr.total_loss(model(batch, 0), 1.0)[0].backward()
        counts.append(fc.get_total_flops())
    positions = int(batch.valid.sum()) if not cfg.fm_positions else \
        int(batch.valid.sum(1).clamp_max(cfg.fm_positions).sum())
    return counts[0], counts[1] - counts[0], positions, batch.idx.numel()


def analytic_flops(cfg, d_z, vocab, T, d_t=64):
    """Forward FLOPs (2 per multiply-add) per token of the built-in GPT, and per position
    the flow head sees (sfr.FlowHead: temb MLP, input layer, residual blocks, output)."""
    d = cfg.n_embd
    backbone = 2 * (cfg.n_layer * (12 * d * d + 2 * T * d) + d * vocab)  # qkv+proj+mlp, attention, lm_head
    W = cfg.head_width
    head = 2 * (8 * d_t * d_t + (d_z + d_t + d) * W + (cfg.head_layers - 1) * W * W + W * d_z)
    return backbone, head


# ----------------------------------------------------------------------------- generation


def generate_cost(cfg, encoder, repeats):
    """Exported model vs the in-memory backbone: same prompts, greedy, fixed length. Then the
    built-in GPT's KV cache: tokens / s sampled (temperature 1) with and without it, in the same
    run, interleaved, from the same generator seed, and whether they drew the same tokens."""
    tok, examples = demo_setup(cfg, encoder)
    _, model = stepper(cfg, tok, examples, encoder.dim)
    with tempfile.TemporaryDirectory() as d:
        exported, _ = train.load_exported(train.export(model, d, tok))
    live = model.backbone.eval()
    exported.eval()
    prompts = torch.tensor([ex.prompt for ex in examples[:8]])
    n_new = cfg.block_size - prompts.size(1)
    def gen(m, kv_cache=True, temperature=0):
        g = torch.Generator().manual_seed(0)
        return sfr.generate(m, prompts, n_new, temperature=temperature, generator=g, kv_cache=kv_cache)
    same = torch.equal(gen(live), gen(exported))
    t_live, t_exp = interleaved([lambda: gen(live), lambda: gen(exported)], repeats, warmup=3)
    cached_same = torch.equal(gen(live, True, 1.0), gen(live, False, 1.0))
    t_cached, t_full = interleaved([lambda: gen(live, True, 1.0), lambda: gen(live, False, 1.0)], repeats,
                                   warmup=3)
    n_tok = prompts.size(0) * n_new
    return {"generate_ms_backbone": 1e3 * t_live, "generate_ms_exported": 1e3 * t_exp,
            "generate_ratio": t_exp / t_live, "generate_same_tokens": same, "generate_new_tokens": n_new,
            "generate_tokens_per_s_kv_cache": n_tok / t_cached, "generate_tokens_per_s_no_cache": n_tok / t_full,
            "kv_cache_same_tokens": cached_same}


# ----------------------------------------------------------------------------- encoder and cache


def mbpp_segments(n, k):
    """n distinct k-word windows of MBPP problem texts and solutions."""
    segs, seen = [], set()
    for line in MBPP.read_text().splitlines():
        rec = json.loads(line)
        words = (rec["text"] + " " + rec["code"]).split()
        for a in range(0, max(1, len(words) - k), k):
            s = " ".join(words[a:a + k])
            if s not in seen:
                seen.add(s)
                segs.append(s)
        if len(segs) >= n:
            return segs[:n]
    return segs


def encoder_cost(cfg, n_segments):
    t = time.perf_counter()
    encoder = sfr_encoder.SegmentEncoder(cfg.encoder)
    res = {"encoder_load_s": time.perf_counter() - t}
    if MBPP.exists():
        segs = mbpp_segments(n_segments, 32)
        encoder.encode(segs[:8])  # warm-up
        t = time.perf_counter()
        encoder.encode(segs[8:])
        res["encoder_segments_per_s"] = (len(segs) - 8) / (time.perf_counter() - t)
        res["encoder_segment_words"] = 32
    for attempt in ("first", "second"):  # the demo set's segments are new to the encoder, then cached
        hits, misses, t = encoder.hits, encoder.misses, time.perf_counter()
        demo_setup(cfg, encoder)
        res[f"prepare_s_{attempt}"] = time.perf_counter() - t
        h, m = encoder.hits - hits, encoder.misses - misses
        res[f"cache_hit_rate_{attempt}_prepare"] = h / max(1, h + m)
    return res, encoder


# ----------------------------------------------------------------------------- quality


def quality(base, encoder, variants, seeds, steps):
    """Per variant, mean over seeds after `steps` on the demo set (4 held-out examples): eval
    AR loss, the head's eval loss and the shuffle gap, both over *every* valid position
    whatever fm_positions the head saw in training, so the variants compare like for like."""
    rows, pairs = {}, train.demo_pairs()
    for name, over in variants.items():
        runs = []
        for seed in range(seeds):
            cfg = sfr.Config(**{**vars(base), **over, "seed": seed, "steps": steps, "eval_every": 0,
                                "ckpt_every": 0, "out_dir": tempfile.mkdtemp()})
            tok = train.build_tokenizer(cfg, [t for p in pairs for t in p])
            shuffled = list(pairs)
            random.Random(seed).shuffle(shuffled)
            train_set = sfr.prepare(shuffled[4:], tok, cfg, encoder)
            eval_set = sfr.prepare(shuffled[:4], tok, cfg, encoder)
            model, _ = sfr.train(cfg, train_set, tok, eval_set, log=lambda s: None)
            rec = sfr.evaluate(model, eval_set, cfg, tok, steps, head=model.ema_head)
            ev = sfr.collate(eval_set, list(range(4)), tok.pad_id, tok.eos_id, model.d_z)
            rec.update(sfr.diagnostics(model, ev, cfg, steps, head=model.ema_head))
            runs.append(rec)
        rows[name] = {k: statistics.mean(r[k] for r in runs) for k in ("eval_ar", "eval_aux", "shuffle_gap")
                      if k in runs[0]}
        rows[name].update(over, seeds=seeds, steps=steps)
    return rows


# ----------------------------------------------------------------------------- a ~0.5B HF model


HF_SIZES = {  # Qwen2-0.5B's shape (~494M parameters with tied embeddings), and a smoke-test size
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=1000),
}


def hf_step_cost(size, device, seq, batch_size, repeats, d_z=384):
    """SFR / SFT step time of a randomly initialised Qwen2-architecture model built from a
    config, on synthetic sequences (64 prompt tokens, the rest response, every position with
    a random unit target): the encoder is not in the loop, as with cached targets."""
    from types import SimpleNamespace
    from transformers import Qwen2Config
    import sfr_hf  # noqa: F401  (registers the Hugging Face backbone with sfr)
    g = torch.Generator().manual_seed(0)
    shape = HF_SIZES[size]
    with tempfile.TemporaryDirectory() as folder:
        Qwen2Config(**shape, tie_word_embeddings=True, max_position_embeddings=seq).save_pretrained(folder)
        V = shape["vocab_size"]
        examples = []
        for _ in range(4 * batch_size):
            ids = torch.randint(2, V, (seq,), generator=g).tolist()
            z1 = torch.nn.functional.normalize(torch.randn(seq - 64, d_z, generator=g), dim=-1)
            examples.append(sfr.Example(ids[:64], ids[64:-1], z1[:-1], torch.ones(seq - 65, dtype=torch.bool)))
        tok = SimpleNamespace(pad_id=0, eos_id=1, vocab_size=V)
        base = train.RunConfig(backbone=folder, hf_from_config=True, device=device, batch_size=batch_size,
                               block_size=seq, steps=10**6)
        plain = [sfr.Example(ex.prompt, ex.response) for ex in examples]  # SFT: no targets
        sft, sft_model = stepper(train.RunConfig(**{**vars(base), "aux": "none"}), tok, plain, 1)
        n_params = sum(p.numel() for p in sft_model.backbone.parameters())
        flow, _ = stepper(base, tok, examples, d_z)
        t_sft, t_sfr = interleaved([sft, flow], repeats, warmup=3, device=device)
    return {"hf_size": size, "hf_params": n_params, "hf_seq": seq, "hf_batch": batch_size, "hf_device": device,
            "hf_sft_step_ms": 1e3 * t_sft, "hf_sfr_step_ms": 1e3 * t_sfr, "hf_step_ratio": t_sfr / t_sft}


# ----------------------------------------------------------------------------- main


def main(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=200, help="timed steps of each kind")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--segments", type=int, default=512, help="distinct segments for the encoder speed")
    p.add_argument("--quality_seeds", type=int, default=3, help="seeds per head variant; 0 skips quality")
    p.add_argument("--quality_steps", type=int, default=300, help="training steps per quality run")
    p.add_argument("--sweep", default="2x64,4x128,6x192,8x256",
                   help="backbone sizes n_layerxn_embd for the step-ratio sweep, 32-dim attention heads ('' skips it)")
    p.add_argument("--out", default=str(ROOT / "results" / "cost.json"), help="json of every measure")
    p.add_argument("--hf", default="", choices=["", "0.5b", "tiny"], help="only time a Qwen2-shaped HF model")
    p.add_argument("--device", default="cpu", help="device of the --hf timing")
    p.add_argument("--hf_seq", type=int, default=1024, help="--hf: tokens per sequence")
    p.add_argument("--hf_batch", type=int, default=4, help="--hf: sequences per step")
    args = p.parse_args(argv)
    for name in ("repeats", "threads", "segments", "hf_seq", "hf_batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name}={getattr(args, name)}: must be >= 1")
    for name in ("quality_seeds", "quality_steps"):
        if getattr(args, name) < 0:
            p.error(f"--{name}={getattr(args, name)}: must be >= 0")
    try:
        args.sizes = [tuple(int(x) for x in s.split("x")) for s in args.sweep.split(",")] if args.sweep else []
    except ValueError:
        p.error(f"--sweep={args.sweep!r}: expected n_layerxn_embd pairs, e.g. 2x64,4x128")
    if any(len(s) != 2 or min(s) < 1 or s[1] % 32 for s in args.sizes):
        p.error(f"--sweep={args.sweep!r}: each size is n_layerxn_embd, both >= 1, n_embd a multiple of 32")
    torch.set_num_threads(args.threads)
    if args.hf:
        res = hf_step_cost(args.hf, args.device, args.hf_seq, args.hf_batch, max(5, args.repeats // 10))
        print(json.dumps(res, indent=1))
        return res
    t0 = time.time()
    base = sfr.Config()
    res = {"config": {k: getattr(base, k) for k in ("n_layer", "n_embd", "batch_size", "head_width",
                                                      "head_layers", "fm_positions", "segment_len")},
           "threads": args.threads, "torch": torch.__version__}
    enc, encoder = encoder_cost(base, args.segments)
    res.update(enc)
    res.update(step_cost(base, encoder, args.repeats))
    if args.sizes:
        res["size_sweep"] = size_sweep(base, encoder, args.sizes, max(20, args.repeats // 4))
    tok, examples = demo_setup(base, encoder)
    bb, head, positions, tokens = counted_flops(base, tok, examples, encoder.dim)
    T = tokens // base.batch_size
    a_bb, a_head = analytic_flops(base, encoder.dim, tok.vocab_size, T)
    res.update(flop_ratio=head / bb, flops_backbone_step=bb, flops_head_step=head,
               head_positions_per_step=positions, tokens_per_step=tokens,
               analytic_flop_ratio=a_head * positions / (a_bb * tokens),
               analytic_head_over_backbone_per_position=a_head / a_bb)
    res.update(generate_cost(base, encoder, max(10, args.repeats // 10)))
    if args.quality_seeds:
        variants = {"default": {}, "all_positions": {"fm_positions": 0},
                    "narrow_head": {"head_width": 64}, "sft": {"aux": "none"}}
        res["quality"] = quality(base, encoder, variants, args.quality_seeds, args.quality_steps)
    res["wall_s"] = time.time() - t0
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print_table(res)
    return res


def print_table(res):
    rows = [("step_ratio (SFR / SFT step)", f"{res['step_ratio']:.3f}",
             f"{res['sfr_step_ms']:.2f} / {res['sft_step_ms']:.2f} ms"),
            ("generate_ratio (export / backbone)", f"{res['generate_ratio']:.3f}",
             f"{res['generate_ms_exported']:.1f} / {res['generate_ms_backbone']:.1f} ms, "
             f"same tokens: {res['generate_same_tokens']}"),
            ("generation tokens / s, KV cache vs none", f"{res['generate_tokens_per_s_kv_cache']:.0f} / "
             f"{res['generate_tokens_per_s_no_cache']:.0f}",
             f"sampled at temperature 1, same tokens: {res['kv_cache_same_tokens']}"),
            ("flop_ratio (head / backbone, counted)", f"{res['flop_ratio']:.3f}",
             f"analytic {res['analytic_flop_ratio']:.3f}; one head position = "
             f"{res['analytic_head_over_backbone_per_position']:.2f} backbone tokens"),
            ("encoder segments / s", f"{res.get('encoder_segments_per_s', float('nan')):.0f}",
             f"MiniLM, {res.get('encoder_segment_words', '?')}-word MBPP windows"),
            ("cache hit rate", f"{res['cache_hit_rate_first_prepare']:.2f} -> "
             f"{res['cache_hit_rate_second_prepare']:.2f}",
             f"prepare {res['prepare_s_first']:.2f} s -> {res['prepare_s_second']:.3f} s")]
    print("| measure | value | detail |\n|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    for name, q in res.get("quality", {}).items():
        aux = f"eval_aux {q['eval_aux']:.4f}, shuffle_gap {q['shuffle_gap']:.4f}" if "eval_aux" in q else ""
        print(f"| quality: {name} | eval_ar {q['eval_ar']:.3f} | {aux} |")
    if res.get("size_sweep"):
        print("\n| backbone | params | SFT step ms | SFR step ms | step_ratio |\n|---|---|---|---|---|")
        for r in res["size_sweep"]:
            print(f"| {r['n_layer']}x{r['n_embd']} | {r['backbone_params'] / 1e6:.2f}M | {r['sft_step_ms']:.1f} "
                  f"| {r['sfr_step_ms']:.1f} | {r['step_ratio']:.3f} |")
    print(f"\n{res['threads']} thread(s), torch {res['torch']}, {res['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
