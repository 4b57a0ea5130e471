"""What does an MTP step cost in memory, with and without head-by-head backward?

Peak memory of one training step (forward + backward) of the built-in GPT at a 32k
vocabulary: next-token only (aux='none'), MTP with K = 4 heads computed plainly, and MTP
with K = 4 head by head (Gloeckle et al. 2024 Sec. 2, sfr.mtp_loss). Each variant runs in a
fresh process; the peak is the process's peak resident memory during the step over its
resident memory before it (VmHWM, reset just before the step; glibc's mmap threshold is
fixed so every large tensor is mapped on allocation and unmapped when freed, and the
resident memory follows the live tensors).

Run:  python toy/mtp_memory.py        (CPU, ~30 s; writes results/mtp_memory.json)
      python toy/mtp_memory.py --help (the options; runs nothing)
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(vocab=32000, n_layer=2, n_embd=128, n_head=4, batch=8, T=64)
VARIANTS = {"next-token": dict(aux="none"),
            "MTP K=4, plain": dict(aux="mtp", mtp_k=4, head_by_head=False),
            "MTP K=4, head by head": dict(aux="mtp", mtp_k=4, head_by_head=True)}


def rss_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])


def measure(variant):
    """Runs in the child: one warm-up step, then the measured step."""
    import torch
    sys.path.insert(0, str(ROOT))
    import sfr
    import sfr_gpt  # noqa: F401  (registers the built-in GPT)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    s = SHAPE
    cfg = sfr.Config(n_layer=s["n_layer"], n_embd=s["n_embd"], n_head=s["n_head"], block_size=s["T"] + 1,
                     **VARIANTS[variant]).validate()
    model = sfr.SFRModel(cfg, sfr.build_backbone(cfg, s["vocab"]), 1)
    g = torch.Generator().manual_seed(0)
    exs = [sfr.Example([2], torch.randint(2, s["vocab"], (s["T"] - 1,), generator=g).tolist()) for _ in range(s["batch"])]
    batch = sfr.collate(exs, list(range(s["batch"])), 0, 1, 1)

    def step():
        model.zero_grad(set_to_none=True)
        loss, _ = sfr.total_loss(model(batch, 0), lam=1.0)
        loss.backward()

    step()  # warm-up: gradients, thread pools and kernels allocated once
    model.zero_grad(set_to_none=True)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set (VmHWM) to the current one
    base = rss_kib("VmRSS")
    t0 = time.time()
    step()
    seconds = time.time() - t0
    return {"peak_MiB": (rss_kib("VmHWM") - base) / 1024, "step_seconds": seconds}


def parse_args(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "results" / "mtp_memory.json"), help="json of the result")
    p.add_argument("--child", default=None, choices=list(VARIANTS), help=argparse.SUPPRESS)  # internal
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.child:  # one variant, in its own process
        print(json.dumps(measure(args.child)))
        return
    t0 = time.time()
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    res = {}
    for variant in VARIANTS:
        out = subprocess.run([sys.executable, __file__, f"--child={variant}"], env=env, capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(out.stderr)
        res[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    nt = res["next-token"]
    logits_mib = SHAPE["batch"] * SHAPE["T"] * SHAPE["vocab"] * 4 / 2 ** 20
    print(f"\n## Peak memory of one training step, V={SHAPE['vocab']}, batch {SHAPE['batch']} x T {SHAPE['T']}, "
          f"GPT {SHAPE['n_layer']} layers x {SHAPE['n_embd']} (one (B, T, V) float32 logits tensor = {logits_mib:.0f} MiB)\n")
    print("| step | peak MiB above the resident model | x next-token | step s |\n|---|---|---|---|")
    for variant, r in res.items():
        r["ratio"] = r["peak_MiB"] / nt["peak_MiB"]
        print(f"| {variant} | {r['peak_MiB']:.0f} | {r['ratio']:.2f} | {r['step_seconds']:.2f} |")
    result = {"shape": SHAPE, "logits_MiB": logits_mib, "variants": res, "target_ratio": 1.25,
              "head_by_head_ratio": res["MTP K=4, head by head"]["ratio"],
              "plain_ratio": res["MTP K=4, plain"]["ratio"], "seconds": time.time() - t0}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out} in {result['seconds']:.1f}s")


if __name__ == "__main__":
    main()
