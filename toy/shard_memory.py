"""How much memory does sharding save? Per-process memory of SFR training, DDP vs FSDP.

N processes (gloo on the CPU, started with the environment torchrun gives its workers) train
the same built-in GPT with its flow head for a few steps, once wrapped in DDP (each process
holds everything) and once sharded with FSDP (train.RunConfig.shard, what `accelerate launch
--use_fsdp` turns on). Each process reports:

  state  bytes of the parameters, gradients and AdamW state it holds after the last step,
         read off the tensors (under FSDP: its shards; the model's buffers are not counted);
  peak   its peak resident memory during the steps (VmHWM, reset before the model is built)
         above its resident memory before the model was built: state plus activations, DDP's
         gradient buckets, FSDP's gathered weights (one transformer block at a time, the
         root unit's embeddings whole) and the allocator's slack.

FSDP's state should be ~1/N of DDP's; its peak saves less, since activations and the
gathered units are not sharded. The steps run exactly as in sfr.train (sfr.train_step).

Run:  python toy/shard_memory.py              (CPU, 2 processes, ~1-2 min; writes results/shard_memory.json)
      python toy/shard_memory.py --help
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("ddp", "fsdp")


def kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])


def child(args):
    """One process of an N-process run: build, wrap or shard, train args.steps steps, report."""
    import torch
    sys.path.insert(0, str(ROOT))
    import sfr
    import sfr_dist
    import train
    torch.set_num_threads(1)
    cfg = train.RunConfig(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, block_size=args.seq_len + 1,
                          head_width=args.head_width, batch_size=args.batch_size, steps=args.steps, lr_warmup=1,
                          shard=args.child == "fsdp", fm_positions=0).validate()
    dist = sfr_dist.setup(cfg)  # DDP, or FSDP with cfg.shard
    rank, world = dist.rank, dist.world
    d_z = 384
    g = torch.Generator().manual_seed(0)  # the same data set in every process
    examples = [sfr.Example([2], torch.randint(2, args.vocab, (args.seq_len - 1,), generator=g).tolist(),
                            torch.nn.functional.normalize(torch.randn(args.seq_len - 1, d_z, generator=g), dim=1),
                            torch.ones(args.seq_len - 1, dtype=torch.bool)) for _ in range(args.batch_size)]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set (VmHWM) to the current one
    base = kib("VmRSS")
    torch.manual_seed(0)
    model = sfr.SFRModel(cfg, sfr.build_backbone(cfg, args.vocab), d_z)
    wrapped = dist.wrap(model, None, log=lambda s: None)
    opt, sched = sfr.make_optimizer(cfg, model)
    t0 = time.time()
    for step in range(args.steps):
        ids = sfr.batch_ids(step, len(examples), cfg.batch_size, cfg.seed, rank, world)
        batch = sfr.collate([examples[i] for i in ids], ids, 0, 1, d_z)
        terms, _, _ = sfr.train_step(model, opt, sched, batch, step, cfg, world=world, ddp=wrapped)
    seconds = (time.time() - t0) / args.steps

    def nbytes(ts):  # this process's part of each tensor (a DTensor's local shard)
        return sum((t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size() for t in ts)
    params = list(model.parameters())
    state = {"params": nbytes(params), "grads": nbytes(p.grad for p in params if p.grad is not None),
             "optimizer": nbytes(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())}
    rec = {"rank": rank, "n_params": sum(p.numel() for p in params),  # a DTensor's numel is the whole tensor's
           "state_MiB": sum(state.values()) / 2 ** 20, **{f"{k}_MiB": v / 2 ** 20 for k, v in state.items()},
           "peak_MiB": (kib("VmHWM") - base) / 1024, "step_seconds": seconds, "loss": terms}
    with open(os.path.join(args.out, f"{args.child}_{rank}.json"), "w") as f:
        json.dump(rec, f)
    torch.distributed.destroy_process_group()


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cmd, env, nproc, mode, timeout=600):
    """Run cmd as ranks 0 .. nproc-1 of one process group on this machine: the environment
    torchrun --standalone gives its workers (env:// rendezvous), without the launcher's own
    interpreter and agent, which cost more than the tiny runs the test makes."""
    env = dict(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(nproc),
               LOCAL_WORLD_SIZE=str(nproc))
    procs = [subprocess.Popen(cmd, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(nproc)]
    outs, deadline = [], time.time() + timeout
    try:
        for p in procs:
            outs.append(p.communicate(timeout=max(1.0, deadline - time.time()))[0])
    except subprocess.TimeoutExpired:
        outs.append(f"timed out after {timeout} s (a rank waiting on a collective?)")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(p.returncode for p in procs):
        raise RuntimeError(f"{mode} run failed:\n" + "\n".join(o[-3000:] for o in outs))


def main(args):
    t0 = time.time()
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")  # freed tensors leave the RSS
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in MODES:
            print(f"{mode}: {args.nproc} processes, {args.steps} steps ...", flush=True)
            cmd = [sys.executable, __file__, f"--child={mode}", f"--out={tmp}"] + \
                [f"--{k}={getattr(args, k)}" for k in SHAPE_ARGS]
            launch(cmd, env, args.nproc, mode)
            res[mode] = [json.loads((Path(tmp) / f"{mode}_{r}.json").read_text()) for r in range(args.nproc)]
    n_params = res["ddp"][0]["n_params"]
    mean = lambda mode, key: sum(r[key] for r in res[mode]) / len(res[mode])  # noqa: E731
    print(f"\n## Per-process memory, {args.nproc} processes: built-in GPT {args.n_layer} x {args.n_embd}, vocabulary "
          f"{args.vocab}, flow head {args.head_width} wide ({n_params / 1e6:.1f}M parameters in all), "
          f"global batch {args.batch_size} x {args.seq_len}\n")
    print("| | params MiB | grads MiB | AdamW MiB | state MiB | peak MiB | s / step |\n|---|---|---|---|---|---|---|")
    for mode in MODES:
        print(f"| {mode} | " + " | ".join(f"{mean(mode, k):.0f}" for k in
                                          ("params_MiB", "grads_MiB", "optimizer_MiB", "state_MiB", "peak_MiB"))
              + f" | {mean(mode, 'step_seconds'):.2f} |")
    result = {"args": vars(args), "per_rank": res, "n_params": n_params,
              "state_ratio": mean("fsdp", "state_MiB") / mean("ddp", "state_MiB"),
              "peak_ratio": mean("fsdp", "peak_MiB") / mean("ddp", "peak_MiB"),
              "loss_ddp": res["ddp"][0]["loss"], "loss_fsdp": res["fsdp"][0]["loss"], "seconds": time.time() - t0}
    print(f"\nFSDP / DDP per process: state {result['state_ratio']:.3f} (1/N = {1 / args.nproc:.3f}), "
          f"peak {result['peak_ratio']:.3f}; last-step loss DDP {result['loss_ddp']}, FSDP {result['loss_fsdp']}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json} in {result['seconds']:.0f} s")


SHAPE_ARGS = ("n_layer", "n_embd", "n_head", "vocab", "head_width", "batch_size", "seq_len", "steps")

if __name__ == "__main__":
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2, help="processes (default: %(default)s)")
    p.add_argument("--n_layer", type=int, default=8, help="built-in GPT blocks (default: %(default)s)")
    p.add_argument("--n_embd", type=int, default=512, help="built-in GPT width (default: %(default)s)")
    p.add_argument("--n_head", type=int, default=8, help="attention heads (default: %(default)s)")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size (default: %(default)s)")
    p.add_argument("--head_width", type=int, default=1024, help="flow head width, the authors' (default: %(default)s)")
    p.add_argument("--batch_size", type=int, default=8, help="global batch, sequences (default: %(default)s)")
    p.add_argument("--seq_len", type=int, default=64, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--steps", type=int, default=3, help="training steps (default: %(default)s)")
    p.add_argument("--json", default=str(ROOT / "results" / "shard_memory.json"), help="where the results go "
                   "(default: results/shard_memory.json)")
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    child(a) if a.child else main(a)
