"""What does SFR cost inside transformers.Trainer? Step time of SFRTrainer over the same Trainer
without SFR, on a tiny random Llama (sfr_hf.tiny_llama_folder) and the built-in demo pairs.

Variants, timed step by step in turn (A B C, B C A, ...), so that load on a shared machine
hits each alike:
  trainer         transformers.Trainer, plain next-token loss
  sfr             SFRTrainer, h read by a hook on the backbone (the default, hidden_layer=-1)
  sfr_hidden      SFRTrainer reading the same h from output_hidden_states (hidden_layer=n_layer)
A step is the Trainer's own training_step (forward, loss, backward) + gradient clipping + AdamW,
on the next batch of its own dataloader; the first WARMUP steps are not timed. Targets are
computed once before timing (SFRTrainer.precompute_targets, as sfr.py's prepare does), so a
step pays only their lookup; the one-off encoding time is reported apart. Then one cProfile of
an SFR trainer.train() says where its extra time goes.

Grid (declared before running): two tiny Llamas, d x n_layer = 64 x 2 (85k parameters, a fifth
of the 0.4M-parameter head) and 256 x 4 (3.2M, about sfr.py's built-in GPT).
Hypotheses: sfr / trainer <= 1.25 at 256 x 4; above it at 64 x 2, where the head outweighs the
backbone (its optimiser update and gradient clipping alone then cost more than the backbone's);
hook and hidden_states cost the same within noise.

Run:  python toy/hf_step_ratio.py            (writes results/hf_step_ratio.json)
"""
import argparse
import cProfile
import json
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,  # noqa: E402
                          TrainingArguments)
from transformers.utils import logging as hf_logging  # noqa: E402

import sfr  # noqa: E402
import sfr_encoder  # noqa: E402  (the frozen sentence encoder of the targets)
import train  # noqa: E402
import sfr_hf  # noqa: E402


def make(variant, folder, tok, rows, encoder, a, out):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder)
    args = TrainingArguments(output_dir=out, max_steps=a.steps, per_device_train_batch_size=a.batch_size,
                             learning_rate=1e-3, logging_steps=10**9, save_strategy="no", report_to=[],
                             use_cpu=True, seed=0, disable_tqdm=True)
    kw = dict(model=model, args=args, train_dataset=rows, processing_class=tok,
              data_collator=DataCollatorForSeq2Seq(tok, label_pad_token_id=-100))
    if variant == "trainer":
        return Trainer(**kw)
    cfg = sfr.Config(segment_len=a.segment_len, hidden_layer=-1 if variant == "sfr" else a.n_layer)
    trainer = sfr_hf.SFRTrainer(**kw, sfr_config=cfg, encoder=encoder)
    trainer.precompute_targets()  # encoder time once, outside the timed steps
    return trainer


def stepper(trainer, steps):
    """A function that runs one optimiser step of `trainer` and returns its seconds."""
    trainer.create_optimizer_and_scheduler(num_training_steps=steps)
    trainer.current_gradient_accumulation_steps = 1  # set by train() otherwise
    model = trainer.model.train()
    batches = iter(list(trainer.get_train_dataloader()) * steps)

    def step():
        batch = next(batches)
        n_items = (batch["labels"][:, 1:] != -100).sum()  # what train() passes: the tokens with a loss
        t0 = time.perf_counter()
        trainer.training_step(model, batch, num_items_in_batch=n_items)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        model.zero_grad(set_to_none=True)
        trainer.state.global_step += 1
        return time.perf_counter() - t0
    return step


def profile_sfr(setup, top=12):
    """cProfile of one SFR run: the functions that take the most time (tottime), and sfr's own parts."""
    trainer = make("sfr", *setup)
    prof = cProfile.Profile()
    prof.enable()
    trainer.train()
    prof.disable()
    stats = pstats.Stats(prof)
    rows = []
    for (file, line, fn), (cc, nc, tt, ct, callers) in stats.stats.items():
        rows.append({"function": f"{Path(file).name}:{fn}", "calls": nc,
                     "tottime_s": round(tt, 4), "cumtime_s": round(ct, 4)})
    by_total = sorted(rows, key=lambda r: -r["tottime_s"])[:top]
    ours = [r for r in rows if r["function"].split(":")[0] in ("sfr.py", "sfr_hf.py")]
    return by_total, sorted(ours, key=lambda r: -r["cumtime_s"])[:top]


def main(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=150, help="timed optimiser steps per variant")
    p.add_argument("--warmup", type=int, default=5, help="first steps of each variant not timed")
    p.add_argument("--batch_size", type=int, default=8, help="sequences per step")
    p.add_argument("--sizes", nargs="+", default=["64x2", "256x4"], help="tiny Llama sizes, width x layers")
    p.add_argument("--segment_len", type=int, default=8, help="future segment length")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: less noise on a shared machine)")
    p.add_argument("--out", default=str(ROOT / "results" / "hf_step_ratio.json"), help="json path of the timings")
    a = p.parse_args(argv)
    hf_logging.set_verbosity_error()
    torch.set_num_threads(a.threads)
    t_start = time.time()
    cells = [measure(a, *map(int, size.split("x"))) for size in a.sizes]
    res = {"command": "python toy/hf_step_ratio.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "hardware": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), torch {torch.__version__}, "
                       f"{torch.get_num_threads()} threads",
           "setup": f"batch {a.batch_size}, demo pairs, {a.steps} timed steps per variant after {a.warmup}, "
                    f"interleaved step by step; SFR: segment_len={a.segment_len}, head 256 x 3, fm_positions 4",
           "cells": cells, "wall_s": round(time.time() - t_start, 1)}
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print("| model | params | trainer (ms) | sfr (ms) | sfr_hidden (ms) | sfr / trainer | sfr_hidden / trainer |")
    print("|---|---|---|---|---|---|---|")
    for c in cells:
        m = c["median_step_ms"]
        print(f"| {c['model']} | {c['params']:,} | {m['trainer']:.2f} | {m['sfr']:.2f} | {m['sfr_hidden']:.2f} | "
              f"{c['ratio_sfr_over_trainer']:.3f} | {c['ratio_sfr_hidden_over_trainer']:.3f} |")
    for c in cells:
        print(f"\n{c['model']}: target encoding, once, before training: {c['target_encoding_once_s']:.2f} s; "
              "SFR run, cProfile, sfr.py / sfr_hf.py functions by cumulative time:")
        for r in c["profile_sfr_own_functions"][:6]:
            print(f"  {r['function']:32s} {r['calls']:6d} calls  {r['cumtime_s']:.3f} s")
    print(f"\nwall {res['wall_s']} s; wrote {a.out}")


def measure(a, d, n_layer):
    """One cell: median step times of the three variants, interleaved, and a profile of SFR."""
    a.n_layer = n_layer  # sfr_hidden reads hidden_states[n_layer], the last (normalised) one
    pairs = train.demo_pairs()
    tmp = tempfile.mkdtemp()
    folder = sfr_hf.tiny_llama_folder(Path(tmp) / "tiny", [q + " " + r for q, r in pairs], d=d, n_layer=n_layer)
    tok = AutoTokenizer.from_pretrained(folder)
    rows = sfr_hf.tokenize_pairs(pairs, tok)
    encoder = sfr_encoder.SegmentEncoder("minilm")
    t0 = time.time()
    sfr_hf.LabelTargets(tok, encoder, sfr.Config(segment_len=a.segment_len))(DataCollatorForSeq2Seq(tok)(rows)["labels"])
    encode_s = time.time() - t0  # the one-off target encoding of the whole set (cold encoder cache)
    setup = (folder, tok, rows, encoder, a, tmp)
    variants = ["trainer", "sfr", "sfr_hidden"]
    steppers = {v: stepper(make(v, *setup), a.steps + a.warmup) for v in variants}
    times = {v: [] for v in variants}
    for i in range(a.warmup + a.steps):
        for v in variants[i % 3:] + variants[:i % 3]:
            t = steppers[v]()
            if i >= a.warmup:
                times[v].append(t)
    med = {v: statistics.median(t) for v, t in times.items()}
    by_total, ours = profile_sfr(setup)
    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(folder).parameters())
    return {"model": f"Llama {d} x {n_layer}", "params": n_params, "vocab": len(tok),
            "steps_timed_per_variant": {v: len(t) for v, t in times.items()},
            "median_step_ms": {v: round(1000 * m, 3) for v, m in med.items()},
            "ratio_sfr_over_trainer": round(med["sfr"] / med["trainer"], 3),
            "ratio_sfr_hidden_over_trainer": round(med["sfr_hidden"] / med["trainer"], 3),
            "target_encoding_once_s": round(encode_s, 2),
            "profile_sfr_top_tottime": by_total, "profile_sfr_own_functions": ours}

if __name__ == "__main__":
    main()
