"""train.py: train a causal LM with Semantic Flow Regularization (sfr.py) from the command line.

    python train.py                    the built-in tiny GPT on the built-in demo set (300 steps)
    python train.py --data=my.jsonl    your own {"prompt": ..., "response": ...} lines
    python train.py --help             every Config field, with its help line

sfr.py is the method and its training loop, a library that imports nothing of this project;
this file is what turns it into a program: the built-in tokenizers and demo set, the jsonl data
file, the exported model (the backbone alone: the head and the encoder are thrown away after
training, so the deployed model costs nothing extra), the loss plot, and --field=value flags
for every sfr.Config field. A Hugging Face folder as the backbone trains through sfr_hf.py,
several processes through sfr_dist.py; both run this command line.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
from pathlib import Path

import torch

import sfr

# ----------------------------------------------------------------------------- the built-in tokenizers and demo set


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


def build_tokenizer(cfg: sfr.Config, texts):
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
                raise sfr.UsageError(f'{path}:{lineno}: "messages" needs a Hugging Face backbone whose '
                                 "tokenizer has a chat template (python sfr_hf.py --backbone=FOLDER)")
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
    if not isinstance(bb, sfr.GPT):
        return bb.export(path, tok)  # sfr_hf.HFBackbone: save_pretrained
    torch.save(bb.state_dict(), os.path.join(path, "model.pt"))
    arch = {k: getattr(model.cfg, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "dropout")}
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
    gpt = sfr.GPT(sfr.Config(**meta["arch"]), meta["vocab_size"])
    gpt.load_state_dict(torch.load(os.path.join(path, "model.pt")))
    tok = Tokenizer.from_state_dict(meta["tokenizer"]) if meta["tokenizer"] else None
    return gpt.eval(), tok  # ready for inference, like from_pretrained: dropout off

# ----------------------------------------------------------------------------- command line


def _parse_bool(s):
    """Strict: a typo such as --resume=ture is an error, not a silent False."""
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def parse_config(argv=None, base: sfr.Config | None = None, prog=None, epilog=None) -> sfr.Config:
    """--field=value (or --field value) for every sfr.Config field; --help lists them with each
    field's help line. --recipe first presets the defaults the other flags override."""
    base = base or sfr.Config()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe", default=base.recipe)
    recipe = pre.parse_known_args(argv)[0].recipe
    if recipe != base.recipe:  # the preset under the caller's own changes to the defaults
        own = {f.name: getattr(base, f.name) for f in dataclasses.fields(sfr.Config)
               if getattr(base, f.name) != getattr(sfr.Config(), f.name)}
        base = sfr.Config(**{**own, "recipe": recipe})
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], epilog=epilog,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(sfr.Config):
        default = getattr(base, f.name)
        kind = _parse_bool if isinstance(default, bool) else type(default)
        p.add_argument(f"--{f.name}", type=kind, default=default,
                       help=f.metadata["help"].replace("%", "%%"))
    return sfr.Config(**vars(p.parse_args(argv))).validate()


def run(cfg: sfr.Config, dist=None, rank0=True):
    """The command line's run: data, targets, sfr.train, then (rank 0) export and one sample."""
    sfr.check_writable(cfg.out_dir)
    pairs = load_pairs(cfg.data, sfr.HF["chat"](cfg) if cfg.backbone != "gpt" else None)
    random.Random(cfg.seed).shuffle(pairs)
    n_eval = max(1, int(len(pairs) * cfg.eval_frac))
    tok = build_tokenizer(cfg, [t for pair in pairs for t in pair])
    encoder = sfr.SegmentEncoder(cfg.encoder, cache=cfg.cache, pooling=cfg.pooling) \
        if sfr.needs_encoder(cfg) else None
    train_set = sfr.prepare(pairs[n_eval:], tok, cfg, encoder)
    eval_set = sfr.prepare(pairs[:n_eval], tok, cfg, encoder)
    if encoder is not None and rank0:
        print(f"encoder {cfg.encoder}: {encoder.misses} segments encoded, "
              f"cache hit rate {encoder.hit_rate:.2f}")
        encoder.save()
    model, history = sfr.train(cfg, train_set, tok, eval_set, dist=dist)
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
        dist = setup(cfg) if setup else sfr.one_process()
        return run(cfg, dist, dist.rank == 0)
    except sfr.UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
