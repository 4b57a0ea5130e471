"""A training process for tests/test_train.py: sfr.train on the built-in demo set, run as
its own process so a test can SIGKILL it, resume it, or launch it under torchrun.

    python tests/_train_worker.py '{"steps": 12, "out_dir": "..."}' [--slow=0.1] [--spy] [--no-target-rank=1]

Targets come from a stand-in encoder (a fixed random unit vector per segment text), so no
process loads MiniLM: these tests are about the training loop, not the targets.
--slow=S      sleep S seconds after each checkpoint, so a test can kill the run part-way
--spy         save the gradients of the first step (after DDP's all-reduce, or FSDP's
              reduce-scatter, gathered whole) to out_dir/grads.pt
--no-target-rank=R  empty the targets of the examples rank R gets at step 0 of a 2-process run
"""
import json
import os
import sys
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sfr  # noqa: E402
import train  # noqa: E402
import sfr_dist  # noqa: E402


class StandInEncoder:
    dim = 384

    def encode(self, texts):
        gens = (torch.Generator().manual_seed(zlib.crc32(t.encode())) for t in texts)
        return torch.stack([torch.nn.functional.normalize(torch.randn(self.dim, generator=g), dim=0) for g in gens])


def demo_data(cfg, no_target_rank=None):
    # responses cut to different lengths, so a batch's padding depends on who else is in it
    pairs = [(q, " ".join(r.split()[:4 + i % 7])) for i, (q, r) in enumerate(train.demo_pairs())]
    tok = train.Tokenizer.from_texts([t for p in pairs for t in p], cfg.tokenizer)
    examples = sfr.prepare(pairs, tok, cfg, StandInEncoder())
    if no_target_rank is not None:
        for i in sfr.batch_ids(0, len(examples), cfg.batch_size, cfg.seed, no_target_rank, 2).tolist():
            examples[i].valid[:] = False
    return examples, tok


def main():
    cfg = train.RunConfig(**json.loads(sys.argv[1]))
    dist = sfr_dist.setup(cfg)  # under torchrun / accelerate: DDP or FSDP
    opts = dict(a.lstrip("-").split("=") if "=" in a else (a.lstrip("-"), "1") for a in sys.argv[2:])
    examples, tok = demo_data(cfg, int(opts["no-target-rank"]) if "no-target-rank" in opts else None)
    if "slow" in opts:
        save = train.save_checkpoint
        train.save_checkpoint = lambda path, state: (save(path, state), time.sleep(float(opts["slow"])))
    if "spy" in opts:
        clip, seen = torch.nn.utils.clip_grad_norm_, []

        def spy(params, *a, **k):
            params = list(params)
            if not seen:
                seen.append([None if p.grad is None else sfr.full(p.grad).clone() for p in params])
            return clip(params, *a, **k)
        torch.nn.utils.clip_grad_norm_ = spy
    sfr.train(cfg, examples, tok, examples[:4], log=print, run=train.RunOnDisk(progress=False), dist=dist)
    if "spy" in opts and int(os.environ.get("RANK", "0")) == 0:
        torch.save(seen[0], os.path.join(cfg.out_dir, "grads.pt"))
    print("done", flush=True)


if __name__ == "__main__":
    main()
