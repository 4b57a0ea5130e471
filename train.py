"""train.py: train a causal LM with Semantic Flow Regularization (sfr.py) from the command line.

    python train.py                    the built-in tiny GPT on the built-in demo set (300 steps)
    python train.py --data=my.jsonl    your own {"prompt": ..., "response": ...} lines
    python train.py --help             every RunConfig field, with its help line

sfr.py is the method and its training loop, a library that imports nothing of this project;
this file is what turns it into a program: the built-in tokenizers and demo set, the jsonl data
file, the run on disk (RunOnDisk: sfr.train's run hook with an atomic checksummed checkpoint,
a bit-exact resume, history.jsonl, --report_to and the progress bar), the exported model (the
backbone alone: the head and the encoder are thrown away after training, so the deployed model
costs nothing extra), the loss plot, and --field=value flags for every RunConfig field. A
Hugging Face folder as the backbone trains through sfr_hf.py, several processes through
sfr_dist.py; both run this command line.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import sfr
import sfr_authors  # noqa: F401  (registers recipe='authors' and its switches)
import sfr_encoder
import sfr_gpt

# ----------------------------------------------------------------------------- the run's config


@dataclass
class RunConfig(sfr.Config):
    """sfr.Config and the fields that only the modules around sfr.py read: this file's data and
    run files, sfr_hf.py's backbone, sfr_dist.py's sharding, sfr_ladder.py's rungs. (nanoGPT
    keeps its run settings in train.py, apart from the model's config, the same way.)"""
    # --- data (train.py) ---
    data: str = sfr.arg("", 'jsonl of {"prompt": ..., "response": ...}; "" = the built-in demo set')
    tokenizer: str = sfr.arg("word", "the built-in GPT's tokenizer: 'word', 'char' or 'byte'")
    eval_frac: float = sfr.arg(0.1, "share of examples held out for eval, in [0, 1) (at least one)")
    # --- the run on disk (RunOnDisk) ---
    out_dir: str = sfr.arg("out", "train.py's ckpt.pt, history.jsonl, export/, loss.png")
    progress: bool = sfr.arg(True, "the progress bar; false: a redirected log gets no bar redraws")
    report_to: str = sfr.arg("", "'tensorboard' (out_dir/tensorboard) or 'wandb': all of history")
    # --- a Hugging Face backbone (sfr_hf.py) ---
    hf_from_config: bool = sfr.arg(False, "a randomly initialised model from the folder's config")
    lora_r: int = sfr.arg(0, "LoRA adapters of rank r (peft), the base frozen; 0 = off")
    lora_alpha: int = sfr.arg(32, "LoRA alpha: the update is scaled by alpha / r")
    lora_dropout: float = sfr.arg(0.05, "LoRA dropout")
    lora_targets: str = sfr.arg("all-linear", "modules LoRA adapts: 'all-linear' or a comma list")
    # --- several processes (sfr_dist.py) ---
    shard: bool = sfr.arg(False, "FSDP: 1/N of the weights, grads and optimiser state each")
    # --- the rungs from MTP to SFR (sfr_ladder.py) ---
    ladder_source: str = sfr.arg("point", "source: 'point' (mass at pi; MTP) or 'gaussian' (SFR)")
    ladder_field: str = sfr.arg("constant", "field: 'constant' (E_q[x1] - E[x0]; MTP) or 'flow'")
    ladder_target: str = sfr.arg("onehot", "target: 'onehot' (tokens 2..K; MTP) or 'embedding'")
    ladder_path: str = sfr.arg("straight", "path: 'straight' or 'kl' (KL geodesic, one-hot)")
    ladder_divergence: str = sfr.arg("kl", "D: 'kl' (KL; MTP) or 'sq' (mean (v - u)^2)")
    kl_beta: float = sfr.arg(4.0, "ladder_path='kl': logit scale of the target")
    CHOICES = {**sfr.Config.CHOICES, "tokenizer": ("word", "char", "byte"),
               "report_to": ("", "tensorboard", "wandb")}
    MINIMUM = {**sfr.Config.MINIMUM, "lora_r": 0, "lora_dropout": 0}
    FRACTIONS = sfr.Config.FRACTIONS + ("eval_frac",)

    def validate(self):
        super().validate()
        if self.lora_r and self.backbone == "gpt":
            raise sfr.UsageError(f"Config.lora_r={self.lora_r}: LoRA adapts a Hugging Face "
                                 "backbone (Config.backbone=FOLDER)")
        return self


# ------------------------------------------------------------ the built-in tokenizers and demo set


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
        return cls(level, sorted({p for t in texts for p in cls._split(t, level)}))

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
            raise ValueError(f"Tokenizer({self.level}): {unknown[:5]} not in the vocabulary "
                             "built from the data")
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


def build_tokenizer(cfg: RunConfig, texts):
    """The backbone folder's own tokenizer (sfr_hf.py) if it has one, else the built-in one."""
    tok = sfr.HF["tokenizer"](cfg) if cfg.backbone != "gpt" else None
    return tok or Tokenizer.from_texts(texts, cfg.tokenizer)


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


# ----------------------------------------------------------------------------- files


def load_pairs(path: str, chat=None) -> list[tuple[str, str]]:
    """Read a jsonl of {"prompt": str, "response": str}, or of {"messages": [...]} when chat (an
    sfr.HF["chat"] function) renders them; errors name the file, line and field."""
    if not path:
        return demo_pairs()
    try:
        raw = Path(path).read_bytes().splitlines()
    except OSError as e:
        raise sfr.UsageError(f"Config.data={path!r}: cannot read it ({e.strerror})") from None
    pairs = []
    for lineno, line in enumerate(raw, 1):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise sfr.UsageError(f"{path}:{lineno}: not UTF-8 (byte {e.start + 1})") from None
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise sfr.UsageError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise sfr.UsageError(f'{path}:{lineno}: expected a JSON object with "prompt" and '
                                 f'"response", got {type(rec).__name__}')
        if "messages" in rec:  # a conversation: one (history, reply) pair per assistant turn
            if chat is None:
                raise sfr.UsageError(f'{path}:{lineno}: "messages" needs a Hugging Face backbone '
                                     "whose tokenizer has a chat template (python sfr_hf.py "
                                     "--backbone=FOLDER)")
            pairs.extend(chat(rec["messages"], f"{path}:{lineno}"))
            continue
        for key in ("prompt", "response"):
            if not isinstance(rec.get(key), str):
                raise sfr.UsageError(f"{path}:{lineno}: field {key!r} missing or not a string")
        pairs.append((rec["prompt"], rec["response"]))
    if not pairs:
        raise sfr.UsageError(f"{path}: no examples")
    return pairs


def plot_history(history, path):
    """Every term of the history against the step, a panel each (eval terms at eval steps),
    to a PNG. matplotlib is imported here only, and pyplot not at all (no backend is set)."""
    from matplotlib.figure import Figure
    keys = [k for k in dict.fromkeys(k for r in history for k in r) if k != "step"]
    fig = Figure(figsize=(7, 1.6 * len(keys)))
    for ax, k in zip(fig.subplots(len(keys), 1, sharex=True, squeeze=False)[:, 0], keys):
        ax.plot(*zip(*[(r["step"], r[k]) for r in history if k in r]), ".-", ms=3)
        ax.set_ylabel(k)
    ax.set_xlabel("step")
    fig.savefig(path, dpi=80, bbox_inches="tight")


def export(model: sfr.SFRModel, path: str, tok=None):
    """Write the deployable model: the backbone alone, without aux heads or encoder.
    Built-in GPT: a plain state_dict (+ config and tokenizer); a Hugging Face backbone:
    its own export (sfr_hf.HFBackbone.export: save_pretrained, LoRA merged first)."""
    os.makedirs(path, exist_ok=True)
    bb = model.backbone
    if not isinstance(bb, sfr_gpt.GPT):
        return bb.export(path, tok)  # sfr_hf.HFBackbone: save_pretrained
    torch.save(bb.state_dict(), os.path.join(path, "model.pt"))
    arch = {k: getattr(model.cfg, k)
            for k in ("n_layer", "n_head", "n_embd", "block_size", "dropout")}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"arch": arch, "vocab_size": bb.wte.num_embeddings,
                   "tokenizer": tok.state_dict() if isinstance(tok, Tokenizer) else None}, f)
    return path


def load_exported(path: str):
    """Load an export: (backbone, tokenizer). Hugging Face folders load with plain transformers."""
    with open(os.path.join(path, "config.json")) as f:
        meta = json.load(f)
    if "arch" not in meta:
        from transformers import AutoModelForCausalLM
        return AutoModelForCausalLM.from_pretrained(path), None
    gpt = sfr_gpt.GPT(sfr.Config(**meta["arch"]), meta["vocab_size"])
    gpt.load_state_dict(torch.load(os.path.join(path, "model.pt")))
    tok = Tokenizer.from_state_dict(meta["tokenizer"]) if meta["tokenizer"] else None
    return gpt.eval(), tok  # ready for inference, like from_pretrained: dropout off

# ----------------------------------------------------------------------------- the run on disk
# sfr.train(..., run=RunOnDisk()): out_dir/ckpt.pt (atomic, checksummed, an exact resume),
# history.jsonl, Config.report_to and the progress bar.


def check_writable(out_dir):
    """Fail before any work if out_dir cannot hold the checkpoint."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = Path(out_dir) / f".write_test_{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise sfr.UsageError(f"Config.out_dir={out_dir!r}: cannot write there "
                             f"({e.strerror})") from None


def save_checkpoint(path, state):
    """Atomic: write a temp file, flush it to disk, then rename it over the old checkpoint.
    A crash at any point leaves either the old or the new checkpoint, never a torn one."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path):
    """A checkpoint RunOnDisk wrote, refused with its path if unreadable or its checksum fails."""
    try:  # weights_only=False: the RNG states and history are plain Python objects
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a torn zip, a truncated pickle: all one case for the user
        raise sfr.UsageError(f"{path}: not a readable checkpoint ({type(e).__name__}); "
                             "move it away to start over") from None
    if not isinstance(ck, dict) or ck.get("sha256") != checksum(ck):
        raise sfr.UsageError(f"{path}: checksum mismatch, the file is corrupted; move it away "
                             "to start over")
    return ck


def checksum(state):
    """sha256 of a checkpoint's content (every tensor's bytes, every other value's repr),
    without its own 'sha256' entry: the same before saving and after loading."""
    h = hashlib.sha256()

    def add(x):
        if isinstance(x, dict):
            for k, v in x.items():
                h.update(repr(k).encode())
                add(v)
        elif isinstance(x, (list, tuple)):
            h.update(f"{type(x).__name__}{len(x)}".encode())
            for v in x:
                add(v)
        elif torch.is_tensor(x):
            t = x.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(x).encode())
    add({k: v for k, v in state.items() if k != "sha256"})
    return h.hexdigest()


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


def full_state(module, opt=None):
    """The whole state_dict of a module (of module and optimiser, with opt), sharded or not, on
    the CPU: keyed by parameter name, so a checkpoint resumes under any number of processes."""
    from torch.distributed.checkpoint import state_dict as dcp
    opts = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)  # FSDP: to rank 0 only
    return dcp.get_model_state_dict(module, options=opts) if opt is None else \
        dcp.get_optimizer_state_dict(module, opt, options=opts)


def load_full_state(module, state, opt=None):
    """Inverse of full_state: every process passes the whole state and keeps its shard of it."""
    from torch.distributed.checkpoint import state_dict as dcp
    opts = dcp.StateDictOptions(full_state_dict=True)
    if opt is None:
        dcp.set_model_state_dict(module, state, options=opts)
    else:
        dcp.set_optimizer_state_dict(module, opt, state, options=opts)


# Resuming with changed fields: these are applied (they change where and how often things are
# written, or, for steps, the length the lr and lambda schedules read at every step); a change to
# any other field is refused, since the checkpoint's state was made under the old value.
RESUME_FREE = ("resume", "out_dir", "device", "eval_every", "ckpt_every", "shard", "cache",
               "report_to", "progress")

RESUME_APPLIED = RESUME_FREE + ("steps",)


RENAMED = {"k": "segment_len"}  # field names of a config saved before 2026-12-02 -> today's


def with_current_names(config: dict) -> dict:
    """A saved config (a checkpoint's, a reproduce_mbpp run folder's) under today's names: until
    2026-12-02 segment_len was k (RENAMED), and aux='sfr' was 'flow'."""
    config = {RENAMED.get(name, name): v for name, v in config.items()}
    return {**config, "aux": "sfr"} if config.get("aux") == "flow" else config


class RunOnDisk(sfr.RunInMemory):
    """A run train() can resume bit for bit (rank 0 writes, every process reads):
    out_dir/ckpt.pt holds the model (heads included), optimiser, lr scheduler, EMA head, gate
    state, fp16 loss scaler, step, history, every process's RNG state and a checksum;
    out_dir/history.jsonl gets each step's record as it finishes (rewritten from a resumed run's
    history first: a run killed after its last checkpoint left lines past it, which would
    otherwise appear twice); the dashboard line at eval steps, Config.report_to (TensorBoard or
    W&B, imported here only, when asked for) and the progress bar (progress and cfg.progress)."""

    def __init__(self, progress=True):
        self.progress, self.saved = progress, None

    def start(self, cfg, dist, log, **parts):
        check_writable(cfg.out_dir)
        self.cfg, self.dist, self.parts = cfg, dist, parts
        self.path = os.path.join(cfg.out_dir, "ckpt.pt")
        step, history, gate_avg = (self.resume(log) if cfg.resume else None) or (0, [], None)
        self.saved = step if step else None
        rank0 = dist.rank == 0
        self.log, self.t0 = (log if rank0 else None), time.time()
        self.jsonl = open(os.path.join(cfg.out_dir, "history.jsonl") if rank0 else os.devnull, "w")
        append_history(self.jsonl, history)
        self.tracker = self.wandb = None
        try:
            if rank0 and cfg.report_to == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter
                self.tracker = SummaryWriter(os.path.join(cfg.out_dir, "tensorboard"))
            elif rank0 and cfg.report_to == "wandb":
                import wandb
                self.wandb = wandb.init(project="sfr", dir=cfg.out_dir,
                                        config=dataclasses.asdict(cfg))
        except ImportError as e:
            raise sfr.UsageError(f"Config.report_to={cfg.report_to!r}: {e}; pip install "
                                 f"{cfg.report_to}") from None
        from tqdm import tqdm
        self.bar = tqdm(total=cfg.steps, initial=step, desc=f"train aux={cfg.aux}",
                        dynamic_ncols=True, leave=False,
                        disable=not (self.progress and cfg.progress and rank0))
        return step, history, gate_avg

    def resume(self, log):
        """Load the checkpoint into the run's parts and restore the RNG state: (step, history,
        gate state), or None (with a line saying so) when there is no checkpoint yet."""
        cfg, path, rank, world = self.cfg, self.path, self.dist.rank, self.dist.world
        if not os.path.exists(path):
            if rank == 0:
                log(f"resume: no checkpoint at {path} yet, starting at step 0")
            return None
        ck = load_checkpoint(path)
        changed = {k: (v, getattr(cfg, k)) for k, v in with_current_names(ck["config"]).items()
                   if k not in RESUME_APPLIED and getattr(cfg, k, v) != v}
        if changed:
            diff = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise sfr.UsageError(f"{path}: resuming with changed Config fields ({diff}); only "
                                 f"{', '.join(RESUME_APPLIED)} may change: use a new out_dir")
        model, opt, sched, ema, scaler = self.modules()
        try:
            load_full_state(model, ck["model"])
        except RuntimeError as e:
            raise sfr.UsageError(f"{path}: its weights do not fit this model "
                                 f"({str(e).splitlines()[0]})") from None
        load_full_state(model, ck["opt"], opt)
        sched.load_state_dict(ck["sched"])
        for g, base, f in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas):
            g["lr"] = base * f(sched.last_epoch)  # a changed Config.steps: its schedule from now
        if ema is not None:
            load_full_state(ema, ck["ema"])
        if scaler.is_enabled():
            scaler.load_state_dict(ck["scaler"])
        set_rng_state(ck["rng"][rank] if len(ck["rng"]) == world else ck["rng"][0])
        if rank == 0:
            log(f"resumed from {path} at step {ck['step']}")
        return ck["step"], ck["history"], ck["gate_avg"]

    def modules(self):
        return (self.parts[k] for k in ("model", "opt", "sched", "ema", "scaler"))

    def add(self, rec, dashboard):
        if dashboard and self.log:
            with self.bar.external_write_mode():  # the line goes above the bar
                self.log(sfr.format_log(rec, time.time() - self.t0))
        append_history(self.jsonl, [rec])
        if self.tracker:
            for k, v in rec.items():
                if k != "step":
                    self.tracker.add_scalar(k, v, rec["step"])
            self.tracker.flush()
        if self.wandb:
            self.wandb.log(rec, step=rec["step"])
        self.bar.update(1)
        self.bar.set_postfix_str(" ".join(f"{k}={rec[k]:.3f}" for k in ("ar", "aux") if k in rec))

    def save(self, **loop_state):
        """Rank 0 writes the whole state, every process's RNG state and a checksum of it all."""
        dist, (model, opt, sched, ema, scaler) = self.dist, self.modules()
        rngs = dist.gather(rng_state())  # each process has its own RNG stream (dropout)
        if dist.rank == 0 or dist.sharded:  # gathering shards takes every process
            weights = {"model": full_state(model), "opt": full_state(model, opt),
                       "ema": full_state(ema) if ema is not None else None}
        if dist.rank == 0:
            ck = {**weights, "sched": sched.state_dict(), **loop_state,
                  "scaler": scaler.state_dict() if scaler.is_enabled() else None, "rng": rngs,
                  "config": dataclasses.asdict(self.cfg)}
            save_checkpoint(self.path, {**ck, "sha256": checksum(ck)})
        self.saved = loop_state["step"]

    def kept(self):
        return ("no checkpoint was written yet" if self.saved is None else
                f"the last good checkpoint is {self.path} (step {self.saved})")

    def close(self):
        self.bar.close()
        self.jsonl.close()
        if self.tracker:
            self.tracker.close()
        if self.wandb:
            self.wandb.finish()


def append_history(f, recs):
    """Step records as JSON lines, flushed at once, so `tail -f history.jsonl` follows a run."""
    f.writelines(json.dumps(r) + "\n" for r in recs)
    f.flush()


# ----------------------------------------------------------------------------- command line


def _parse_bool(s):
    """Strict: a typo such as --resume=ture is an error, not a silent False."""
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def parse_config(argv=None, base: RunConfig | None = None, prog=None, epilog=None) -> RunConfig:
    """--field=value (or --field value) for every RunConfig field; --help lists them with each
    field's help line. --recipe first presets the defaults the other flags override."""
    base = base or RunConfig()
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--recipe", default=base.recipe)
    recipe = pre.parse_known_args(argv)[0].recipe
    if recipe != base.recipe:  # the preset under the caller's own changes to the defaults
        ours = RunConfig()
        own = {f.name: getattr(base, f.name) for f in dataclasses.fields(RunConfig)
               if getattr(base, f.name) != getattr(ours, f.name)}
        base = RunConfig(**{**own, "recipe": recipe})
    # allow_abbrev=False: a prefix such as --k (the old name of --segment_len) is an error, not
    # another flag that starts with it
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], epilog=epilog,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                allow_abbrev=False)
    method = p.add_argument_group("sfr.Config: the method and its training loop")
    around = p.add_argument_group("train.RunConfig: data, run files and the modules around sfr.py")
    in_sfr = {f.name for f in dataclasses.fields(sfr.Config)}
    for f in dataclasses.fields(RunConfig):
        default = getattr(base, f.name)
        kind = _parse_bool if isinstance(default, bool) else type(default)
        group = method if f.name in in_sfr else around
        group.add_argument(f"--{f.name}", type=kind, default=default,
                           help=f.metadata["help"].replace("%", "%%"))
    return RunConfig(**vars(p.parse_args(argv))).validate()


def run(cfg: RunConfig, dist=None, rank0=True):
    """The command line's run: data, targets, sfr.train, then (rank 0) export and one sample.
    progress=false also turns off transformers' loading bars (the encoder's, an HF backbone's),
    for this run only."""
    if cfg.progress:  # (transformers imported only here: a built-in GPT run may not need it)
        return _run(cfg, dist, rank0)
    from transformers.utils import logging as hf_logging
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return _run(cfg, dist, rank0)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _run(cfg, dist, rank0):
    check_writable(cfg.out_dir)
    pairs = load_pairs(cfg.data, sfr.HF["chat"](cfg) if cfg.backbone != "gpt" else None)
    random.Random(cfg.seed).shuffle(pairs)
    n_eval = max(1, int(len(pairs) * cfg.eval_frac))
    tok = build_tokenizer(cfg, [t for pair in pairs for t in pair])
    encoder = sfr_encoder.SegmentEncoder.from_config(cfg) if sfr.needs_encoder(cfg) else None
    train_set = sfr.prepare(pairs[n_eval:], tok, cfg, encoder)
    eval_set = sfr.prepare(pairs[:n_eval], tok, cfg, encoder)
    if encoder is not None and rank0:
        print(f"encoder {cfg.encoder}: {encoder.misses} segments encoded, "
              f"cache hit rate {encoder.hit_rate:.2f}")
        encoder.save()
    model, history = sfr.train(cfg, train_set, tok, eval_set, dist=dist, run=RunOnDisk())
    if not rank0:
        return model, history
    path = export(model, os.path.join(cfg.out_dir, "export"), tok)
    print(f"exported the deployable model (no head, no encoder) to {path}")
    plot_history(history, os.path.join(cfg.out_dir, "loss.png"))
    print(f"loss plot: {os.path.join(cfg.out_dir, 'loss.png')}")
    prompt = torch.tensor([train_set[0].prompt])
    out = sfr.generate(model.backbone.eval(), prompt, 16, temperature=1.0, eos_id=tok.eos_id,
                       generator=torch.Generator().manual_seed(cfg.seed))
    new = out[0, prompt.size(1):].tolist()
    print("sample:", tok.decode(prompt[0].tolist()), "->", tok.decode(new))
    return model, history


def main(argv=None, setup=None, prog="train.py", epilog=None):
    """`python train.py --field=value ...`; setup(cfg) -> the dist object (sfr_dist.setup).
    A user error prints one line and exits 2, as argparse does."""
    try:
        cfg = parse_config(argv, prog=prog, epilog=epilog)
        dist = setup(cfg) if setup else sfr.OneProcess()
        return run(cfg, dist, dist.rank == 0)
    except sfr.UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
