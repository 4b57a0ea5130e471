"""sfr_dist.py: sfr.train on several processes: DDP, or FSDP (ZeRO-3) with --shard=true.

    torchrun --standalone --nproc_per_node=2 sfr_dist.py --steps=300               # DDP
    torchrun --standalone --nproc_per_node=2 sfr_dist.py --shard=true --steps=300  # FSDP
    accelerate launch --use_fsdp --num_processes=2 sfr_dist.py --steps=300         # FSDP

Every flag is train.py's. setup(cfg) joins the process group (gloo on CPU, NCCL on CUDA) and
returns what sfr.train(..., dist=) needs: the rank, the world size and the few operations
that differ from one process (wrap the model, gather RNG states, gather the whole model at
the end). cfg.batch_size is the global batch, split across processes; every process
evaluates (a sharded model runs only with all of them); rank 0 logs and writes. The
checkpoint holds whole tensors keyed by name, so it resumes under any number of processes.
"""
import copy
import os

import torch
import torch.distributed as dist

import sfr
import sfr_hf  # noqa: F401  (registers Hugging Face backbones: --backbone=FOLDER)
import train


def _on(flag):
    return os.environ.get(flag, "").lower() in ("1", "true")


def setup(cfg: train.RunConfig):
    """Under torchrun or accelerate (WORLD_SIZE > 1): join the process group, move cfg.device
    to this process's GPU, and return DDP or (cfg.shard, or accelerate's --use_fsdp) FSDP.
    With one process: sfr.OneProcess()."""
    if _on("ACCELERATE_USE_DEEPSPEED"):
        raise NotImplementedError("ACCELERATE_USE_DEEPSPEED is set, but sfr.train does not run "
                                  "DeepSpeed: shard with FSDP instead (accelerate launch "
                                  "--use_fsdp, or torchrun ... --shard=true)")
    if _on("ACCELERATE_USE_FSDP"):
        strategy = os.environ.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD")
        if strategy not in ("FULL_SHARD", "1"):
            raise NotImplementedError(f"FSDP_SHARDING_STRATEGY={strategy}: sfr.train shards "
                                      "fully (FULL_SHARD) only")
        cfg.shard = True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return sfr.OneProcess()
    cuda = cfg.device.startswith("cuda")
    if cuda:
        cfg.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(cfg.device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return FSDP(cfg) if cfg.shard else DDP(cfg)


class DDP(sfr.OneProcess):
    """Every process holds the whole model; DDP all-reduces (averages) the gradients, and
    sfr.total_loss multiplies each share by the world size to recover the global mean."""

    def __init__(self, cfg):
        self.rank, self.world, self.device = dist.get_rank(), dist.get_world_size(), cfg.device

    def wrap(self, model, ema, log):
        ids = [torch.device(self.device).index] if self.device.startswith("cuda") else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def gather(self, obj):
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


class FSDP(DDP):
    """ZeRO-3 with torch's fully_shard: a process holds 1/N of each parameter, its gradient and
    optimiser state, and gathers a unit's whole weights only while that unit runs."""
    sharded = True

    def wrap(self, model, ema, log):
        n_blocks = shard(model, ema)
        if self.rank == 0:
            log(f"FSDP: sharded over {self.world} processes, {n_blocks} transformer blocks "
                "gathered one at a time")
        return model

    def finish(self, model, ema, new_model):
        """Rank 0 gets the whole model (and EMA head) back, the others keep their shards."""
        weights = train.full_state(model)
        ema_weights = train.full_state(ema) if ema is not None else None
        if self.rank == 0:
            model = new_model()
            model.load_state_dict(weights)
            if ema is not None:
                ema = copy.deepcopy(model.head).requires_grad_(False)
                ema.load_state_dict(ema_weights)
        return model, ema


def shard(model, ema=None):
    """FSDP in place: every transformer block is one unit, the flow head and its EMA copy one
    each, the rest (embeddings, final norm, MTP heads) the root. A gradient is reduce-scattered
    (averaged) as DDP all-reduces it, so sfr.total_loss's normalisation carries over.
    Returns the number of blocks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(next(model.parameters()).device.type, (dist.get_world_size(),))
    bb = model.backbone
    hf = hasattr(bb, "hf")  # an sfr_hf.HFBackbone
    units = set(getattr(bb.hf, "_no_split_modules", None) or ()) if hf else {"Block"}
    blocks = [m for m in bb.modules() if type(m).__name__ in units]
    for m in blocks + [model.head, ema]:
        if m is not None:
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return len(blocks)


def main(argv=None):
    try:
        return train.main(argv, setup=setup, prog="sfr_dist.py")
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
