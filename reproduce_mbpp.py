"""MBPP for the SFR code experiment: data, prompts, pass@k, and the next-token / MTP / SFR run.

The paper compares next-token SFT, multi-token prediction (MTP) and SFR on MBPP.
This file holds that comparison and everything around it:

1. Data: load and validate ``mbpp.jsonl``, the standard splits by task_id, an
   optional download checked against a recorded sha256.
2. Prompt format: one fixed prompt and response format, and ``extract_code`` to
   get the program back out of a model's completion.
3. Training: the methods compared (none / mtp / sfr / ablations / ladder rungs), the
   built-in model's pretraining, then one fine-tuning per method from the same weights.
4. Sampling: n completions per test problem, and the loss of the reference solutions.
5. Scoring: ``sandbox.py`` (a module of its own) runs an untrusted program against
   its asserts in a fresh, resource-limited interpreter (inside bubblewrap where it
   works) and decides pass or fail in the parent; pass@k (Chen et al. 2021);
   ``evaluate_samples`` scores samples per problem, ``ResultStore`` keeps them on disk.
6. The run: the ``run`` subcommand, sections 3-5 for every method, resumable.
7. The report: JSON, a markdown table and a figure.
8. ``check_references``: every reference solution through the sandbox, a test of
   the sandbox against 974 known-good programs.
9. Command line.

torch and sfr are imported inside functions (sections 3, 4, 6 and the report's record), so that
scoring, ``check_references`` and ``--help`` stay light.

Commands (the data file is never part of the repository; pass its path)::

    python reproduce_mbpp.py download --dest data/mbpp.jsonl
    python reproduce_mbpp.py check_references --mbpp data/mbpp.jsonl
    python reproduce_mbpp.py evaluate --mbpp data/mbpp.jsonl --samples samples.jsonl
    python reproduce_mbpp.py run --mbpp data/mbpp.jsonl --threads 1          # CPU default, ~20 min
    python reproduce_mbpp.py run --mbpp data/mbpp.jsonl --smoke              # seconds
    python reproduce_mbpp.py run --mbpp data/mbpp.jsonl --model PATH [--lora] # HF model, GPU if any
    python reproduce_mbpp.py run --mbpp data/mbpp.jsonl --model PATH --lora --methods base,none,mtp,sfr
                                      # + the model untrained; --chat auto: chat-template prompts

MBPP: Austin et al. 2021, "Program Synthesis with Large Language Models",
https://github.com/google-research/google-research/tree/master/mbpp, released
under CC BY 4.0; keep that attribution next to any number computed on it.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import platform
import re
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import sandbox
from sandbox import CheckResult, Limits, run_checks

# ---------------------------------------------------------------------------
# 1. Data
# ---------------------------------------------------------------------------

MBPP_URL = ("https://raw.githubusercontent.com/google-research/google-research/"
            "master/mbpp/mbpp.jsonl")
# sha256 of the copy this project was built against (974 problems, with the later
# corrections of tasks 341, 596 and 642; an older revision differs in those three).
MBPP_SHA256 = "ccf64ceae9c5403bf50a044cb6d505bfd2a2963ee58338ba268fd65beab92a9f"
# Standard splits by task_id, inclusive (Austin et al. 2021, section 2.1).
SPLITS = {"prompt": (1, 10), "test": (11, 510), "validation": (511, 600), "train": (601, 974)}
# field -> (check, what the error message says it should be)
_FIELDS = {
    "task_id": (lambda v: type(v) is int, "an int"),
    "text": (lambda v: isinstance(v, str), "a str"),
    "code": (lambda v: isinstance(v, str), "a str"),
    "test_list": (lambda v: isinstance(v, list) and v and all(isinstance(t, str) for t in v),
                  "a non-empty list of str"),
    "test_setup_code": (lambda v: isinstance(v, str), "a str"),
    "challenge_test_list": (lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v),
                            "a list of str"),
}


class UsageError(ValueError):
    """A bad flag or input file: main() prints the message on one line and exits 2."""


class MBPPFormatError(UsageError):
    """A line of an MBPP file that is not a valid record; the message names file, line and field."""


class ChecksumMismatchError(UsageError):
    """A downloaded file whose sha256 is not the expected one."""


def _jsonl_objects(path, error, label=""):
    """(where, lineno, record) for every non-blank line of a jsonl file that is a JSON object; a file
    that cannot be read, a line that is not UTF-8, not JSON or not an object raises
    error(message) naming the file and the 1-based line."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise error(f"{label}{path}: {e.strerror or e}") from None
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise error(f"{where}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})") from None
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise error(f"{where}: expected a JSON object, got {type(rec).__name__}")
        yield where, lineno, rec


def load_mbpp(path: str | os.PathLike) -> list[dict]:
    """Read an MBPP jsonl file, one problem a line, and validate every record.

    Each record must have the fields of ``_FIELDS`` with their types, and task_ids
    must be unique; anything else raises ``MBPPFormatError`` naming the file, the
    1-based line number and the field.
    """
    records, seen = [], {}
    for where, lineno, rec in _jsonl_objects(path, MBPPFormatError):
        for field, (ok, expected) in _FIELDS.items():
            if field not in rec:
                raise MBPPFormatError(f"{where}: missing field '{field}'")
            if not ok(rec[field]):
                raise MBPPFormatError(f"{where}: field '{field}' must be {expected}, "
                                      f"got {type(rec[field]).__name__}")
        if rec["task_id"] in seen:
            raise MBPPFormatError(f"{where}: field 'task_id' repeats task {rec['task_id']} "
                                  f"(first on line {seen[rec['task_id']]})")
        seen[rec["task_id"]] = lineno
        records.append(rec)
    return records


def split_mbpp(records: list[dict]) -> dict[str, list[dict]]:
    """Group records into the standard splits of ``SPLITS`` (prompt/test/validation/train).

    A task_id outside every split is an error rather than being dropped.
    """
    splits = {name: [] for name in SPLITS}
    for rec in records:
        for name, (lo, hi) in SPLITS.items():
            if lo <= rec["task_id"] <= hi:
                splits[name].append(rec)
                break
        else:
            raise ValueError(f"task_id {rec['task_id']} is in no MBPP split {SPLITS}")
    return splits


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_mbpp(url: str = MBPP_URL, dest: str | os.PathLike = "mbpp.jsonl",
                  sha256: str = MBPP_SHA256, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` only if its sha256 is ``sha256``.

    The bytes go to a temporary file next to ``dest`` and are hashed on the way;
    a copy with another checksum is deleted and refused with
    ``ChecksumMismatchError`` (``dest`` is left as it was), a good one is moved
    into place with ``os.replace``, so ``dest`` is never a partial file.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            for block in iter(lambda: resp.read(1 << 16), b""):
                h.update(block)
                out.write(block)
            out.flush()
            os.fsync(out.fileno())
        if h.hexdigest() != sha256:
            raise ChecksumMismatchError(
                f"{url}: sha256 {h.hexdigest()} is not the expected {sha256}; "
                f"refusing this copy ({dest} left untouched)")
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return dest


# ---------------------------------------------------------------------------
# 2. Prompt format
# ---------------------------------------------------------------------------

# The problem text plus the first test as the hint for the function's name and
# signature, as in the MBPP paper (which shows all three tests; we show one so the
# other two stay unseen). Matches the paper's instruction data in spirit: "an expert
# Python programmer" asked for a complete solution in a fenced python block.
PROMPT_TEMPLATE = ("You are an expert Python programmer, and here is your task: {text} "
                   "Your code should pass these tests:\n\n{test}\n")
RESPONSE_TEMPLATE = "```python\n{code}\n```\n"
_FENCE = re.compile(r"^```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:^```|\Z)", re.S | re.M)
# A line that starts with one of these ends an unfenced completion: prose after the
# code, or the model starting the next few-shot example.
_PROSE = re.compile(r"^(```|Explanation|Note:|Output:|Example|Here is|Here's|This (code|function|solution)"
                    r"|The (code|function|solution)|You are an expert Python programmer)")


def _clean(code: str) -> str:
    return code.replace("\r\n", "\n").replace("\r", "\n").strip("\n").rstrip()


def format_prompt(rec: dict) -> str:
    """The prompt for one problem: ``PROMPT_TEMPLATE`` with its text and first test."""
    return PROMPT_TEMPLATE.format(text=rec["text"].strip(), test=rec["test_list"][0].strip())


def chat_prompt(tok, text: str) -> str:
    """``text`` as the user turn of a Hugging Face tokenizer's chat template, up to the start of
    the assistant's reply (add_generation_prompt): what an instruct model was trained to answer.
    ``tok`` is an ``sfr_hf.HFTokenizer`` or a transformers tokenizer."""
    hf = getattr(tok, "tok", tok)
    return hf.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                  tokenize=False)


def has_chat_template(tok) -> bool:
    """Whether ``tok`` (an ``sfr_hf.HFTokenizer``, a transformers tokenizer, or sfr's built-in one) has one."""
    return bool(getattr(getattr(tok, "tok", tok), "chat_template", None))


def prompt_of(rec: dict, tok=None, chat: bool = False) -> str:
    """The prompt a model sees for one problem, in fine-tuning, sampling and the reference loss:
    ``format_prompt``, as the user turn of ``tok``'s chat template when ``chat``. The response
    (``format_response``, then the tokenizer's eos) is then the assistant's turn."""
    text = format_prompt(rec)
    return chat_prompt(tok, text) if chat else text


def format_response(rec: dict) -> str:
    """The target response: the reference solution in a ```python fenced block."""
    return RESPONSE_TEMPLATE.format(code=_clean(rec["code"]))


def extract_code(completion: str) -> str:
    """The program inside a model completion.

    The first ```python (or ```py / ```python3) block wins; else the first bare
    ``` block; else, with no fence at all, the text up to the first line that
    starts like prose (``_PROSE``). An unterminated fence (sampling stopped inside
    it) runs to the end of the text.
    """
    text = completion.replace("\r\n", "\n")
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(text)]
    for wanted in (("python", "py", "python3"), ("",)):
        for lang, body in blocks:
            if lang in wanted:
                return _clean(body)
    if blocks:  # fences, but none python or bare (```text, ```bash...): nothing to run
        return ""
    lines = []
    for line in text.split("\n"):
        if _PROSE.match(line):
            break
        lines.append(line)
    return _clean("\n".join(lines))


# ---------------------------------------------------------------------------
# 3. Training: pretraining (built-in model), then fine-tuning once per method
# ---------------------------------------------------------------------------
# The controlled comparison: one model, one data set, one seed,
# one data order and one number of steps for every method; only the auxiliary loss of
# sfr.Config changes.
#
#   built-in model  a byte-level GPT, first pretrained on this interpreter's standard
#                   library sources (cached under --cache_dir), then fine-tuned on the
#                   MBPP train split once per method, each time from those same weights
#   --model PATH    a local Hugging Face causal LM fine-tuned per method, optionally
#                   through LoRA adapters (merged into the weights before export)
#
# Then per method: the per-token loss of the test problems' reference solutions, n
# samples per test problem at each temperature (section 4), run through the sandbox and
# scored (section 5: pass@k, parse rate, diversity). Every stage writes what it finishes to
# --out as it goes (exports, ResultStores), so a rerun with the same --out continues
# where the last one stopped. torch and sfr are imported inside the functions, so that
# scoring, check_references and the command line stay torch-free.

METHODS = {  # name -> train.RunConfig overrides; every other field is shared by all methods
    "none": dict(aux="none"),  # next-token SFT
    "mtp": dict(aux="mtp", mtp_k=4),  # Gloeckle et al. 2024: heads for tokens 2..4 on the shared trunk
    # SFR as the authors run it (WeAgentAI/SFR and their template): see method_overrides
    "sfr": dict(recipe="authors", aux="sfr"),
    "sfr_ours": dict(aux="sfr"),  # this project's defaults (positions, masking, head, no stabilisers)
    "sfr_std": dict(aux="sfr", target_scale="std"),  # SFR, targets standardised per dimension
    "sfr_null": dict(aux="sfr", null_targets=True),  # control: SFR with targets shuffled across examples
    "mse": dict(aux="mse"),  # the authors' deterministic ablations: one point per context
    "cosine": dict(aux="cosine"),
    # the ladder from MTP to SFR, restrictions lifted one at a time
    "ladder_mtp": dict(aux="ladder"),
    "ladder_brier": dict(aux="ladder", ladder_divergence="sq"),
    "ladder_gauss": dict(aux="ladder", ladder_divergence="sq", ladder_source="gaussian"),
    "ladder_flow": dict(aux="ladder", ladder_divergence="sq", ladder_source="gaussian", ladder_field="flow"),
    "ladder_kl": dict(aux="ladder", ladder_divergence="sq", ladder_source="gaussian", ladder_field="flow",
                      ladder_path="kl"),
    "ladder_sfr": dict(aux="ladder", ladder_divergence="sq", ladder_source="gaussian", ladder_field="flow",
                       ladder_target="embedding"),
}

BASE = "base"  # not a fine-tuning: the --model weights as they are, evaluated like every method
DATA_FIELDS = ("segment_len", "stride", "min_suffix")  # set by the run for its tokens, whatever the recipe


def method_overrides(name: str) -> dict:
    """METHODS[name] with its recipe's preset written out. The base config names every field, so
    a bare recipe='authors' would change nothing (explicit fields win over a preset): every field
    of sfr.RECIPES[recipe] but the data-dependent ones is set here, then the method's own."""
    import sfr
    import sfr_ladder  # noqa: F401  (registers aux='ladder', the ladder_* methods)
    over = METHODS[name]
    preset = {f: v for f, v in sfr.RECIPES.get(over.get("recipe", "ours"), {}).items() if f not in DATA_FIELDS}
    return {**preset, **over}


# The built-in model, sized so that the default run (pretraining, three methods, 100
# problems x 10 samples, execution) takes about 20 minutes on a shared 2-core CPU.
# Byte tokens: an SFR target is the MiniLM embedding of the next 64 bytes (about a line of
# code), anchored every 16 bytes; every response position feeds the head, as the authors'.
BUILTIN = dict(backbone="gpt", tokenizer="byte", n_layer=4, n_head=4, n_embd=128, block_size=512,
               segment_len=64, stride=16, min_suffix=16, fm_positions=0, lam=1.0, head_width=256, head_layers=3,
               steps=150, batch_size=8, lr=1e-3, lr_warmup=10, eval_every=0, ckpt_every=50)
PRETRAIN = dict(aux="none", steps=150, batch_size=16, lr=3e-3, lr_warmup=20)
# A Hugging Face model: sub-word tokens, so a shorter window in tokens (the authors use
# k = 256, s = 32 on responses far longer than MBPP's ~50 tokens).
HF_MODEL = dict(tokenizer="byte", block_size=1024, segment_len=32, stride=8, min_suffix=8, fm_positions=0, lam=1.0,
                head_width=1024, head_layers=3, steps=300, batch_size=8, lr=2e-5, lr_warmup=20, eval_every=0,
                ckpt_every=100)
SMOKE = dict(n_layer=1, n_head=2, n_embd=32, head_width=32, steps=2, batch_size=2, ckpt_every=0)
ARCH = ("n_layer", "n_head", "n_embd", "block_size", "dropout")  # pretraining and fine-tuning share these
PROMPT_RESERVE = 128  # a prompt longer than block_size - this is cut on the left (its end names the function)
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _barrier() -> None:
    import torch
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _write_json(path: str | os.PathLike, obj) -> None:
    """Atomic: a reader (or a crash) sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")  # insertion order: methods as run
    os.replace(tmp, path)


def _config_key(cfg) -> dict:
    """The fields that decide what a training run computes (not where or how often it writes)."""
    import dataclasses
    import train
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in train.RESUME_FREE}


def _same_run(folder: Path, meta: dict) -> None:
    """Refuse to resume into a folder that holds a different run."""
    path = folder / "meta.json"
    if path.exists():
        old = json.loads(path.read_text())
        if "config" in old:  # a folder written before 2026-12-02 used two older names
            import train
            old["config"] = train.with_current_names(old["config"])
        changed = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
        if changed:
            raise UsageError(f"{folder} holds a run with other settings ({', '.join(changed)}); "
                             "pass another --out or delete that folder")
    elif _rank() == 0:
        _write_json(path, meta)


# --- 3a. pretraining the built-in model on the standard library --------------

def stdlib_sources() -> list[Path]:
    """The pretraining corpus: this interpreter's standard library sources, real Python
    that every machine has (nothing to download), test suites and installed packages left out."""
    import sysconfig
    files = []
    for folder, dirs, names in os.walk(sysconfig.get_paths()["stdlib"]):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        files += [Path(folder) / n for n in sorted(names) if n.endswith(".py")]
    return files


def corpus_windows(files: list[Path], n: int, length: int, seed: int) -> list[str]:
    """n windows of `length` characters of the concatenated files, each starting at the
    beginning of a line picked uniformly at random (seeded)."""
    import random
    text = "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    rng = random.Random(seed)
    starts = [text.find("\n", rng.randrange(max(1, len(text) - 2 * length))) + 1 for _ in range(n)]
    return [text[s:s + length] for s in starts]


def _pretrain_key(cfg, corpus) -> str:
    """The cache name of the pretrained weights: a hash of what decides them. Hashed under the
    field's name before 2026-12-02 (k, now segment_len), so that weights cached and run folders
    started before the rename keep their pretrain-<key>."""
    import train
    former = {new: old for old, new in train.RENAMED.items()}
    config = {former.get(name, name): v for name, v in _config_key(cfg).items()}
    return hashlib.sha256(json.dumps({"config": config, "corpus": corpus, "python": platform.python_version()},
                                     sort_keys=True).encode()).hexdigest()[:16]


def pretrain(cfg, cache_dir: Path, log=print, progress=True) -> tuple[str, dict]:
    """Pretrain the built-in GPT (cfg: aux='none') on stdlib_sources() and cache the
    backbone's state_dict in cache_dir, keyed by a hash of cfg, the corpus file list and
    the Python version; a later run with the same key loads it instead. Every 20th file
    is held out for the eval loss. Returns (path of the .pt file, its record)."""
    import dataclasses
    import shutil as _shutil
    import sysconfig
    import sfr
    import sfr_dist
    import train
    files = stdlib_sources()
    root = Path(sysconfig.get_paths()["stdlib"])
    corpus = [(str(f.relative_to(root)), f.stat().st_size) for f in files]
    key = _pretrain_key(cfg, corpus)
    path, meta_path = cache_dir / f"pretrain-{key}.pt", cache_dir / f"pretrain-{key}.json"
    if path.exists() and meta_path.exists():
        return str(path), {**json.loads(meta_path.read_text()), "cached": True}
    held_out = set(files[::20])
    n_train = cfg.steps * cfg.batch_size  # every window is seen once
    # Empty prompts: sfr.prepare gives each window a lone <eos> to be predicted from, and
    # collate ends each with <eos> too; at 1 target in block_size, a harmless artefact.
    windows = corpus_windows([f for f in files if f not in held_out], n_train, cfg.block_size - 1, cfg.seed)
    eval_windows = corpus_windows(sorted(held_out), 64, cfg.block_size - 1, cfg.seed)
    tok = train.Tokenizer("byte")
    train_set = sfr.prepare([("", w) for w in windows], tok, cfg)
    eval_set = sfr.prepare([("", w) for w in eval_windows], tok, cfg)
    work = cache_dir / f"pretrain-{key}"
    cfg = dataclasses.replace(cfg, out_dir=str(work), resume=True)
    t0 = time.time()
    model, history = sfr.train(cfg, train_set, tok, eval_set, log=log, run=train.RunOnDisk(progress),
                               dist=sfr_dist.setup(cfg))  # DDP / FSDP under torchrun
    record = {"key": key, "files": len(files), "held_out_files": len(held_out),
              "corpus_bytes": sum(size for _, size in corpus), "windows": n_train,
              "seconds": time.time() - t0, "train_ar_last": history[-1]["ar"],
              "eval_ar": history[-1].get("eval_ar"), "config": _config_key(cfg), "corpus_root": str(root)}
    if _rank() == 0:
        train.save_checkpoint(str(path), model.backbone.state_dict())
        _write_json(meta_path, record)
        _shutil.rmtree(work, ignore_errors=True)  # the resumable checkpoint is not needed any more
    _barrier()
    return str(path), {**record, "cached": False}


# --- 3b. fine-tuning, once per method ----------------------------------------

def encoder_cache(cache: str, pooling: str) -> str:
    """The target cache of one pooling: sfr_encoder.SegmentEncoder keeps one encoder's table per
    file (tagged with it), so the 'model' and 'mean' poolings each get their own file; sharing
    one, each would overwrite the other's and never hit."""
    return cache if pooling == "model" or not cache else str(Path(cache).with_suffix(f".{pooling}.pt"))


def finetune(cfg, tok, train_pairs, eval_pairs, encoder=None, log=print, progress=True) -> Path:
    """Fine-tune one method (cfg) on (prompt, response) pairs and export the deployable
    model (no heads, no encoder) to cfg.out_dir/export. An export that is there already is
    reused; a run that stopped mid-training resumes from its checkpoint (cfg.resume). LoRA
    (cfg.lora_r) is sfr's: train.export merges the adapters into the weights."""
    import sfr
    import train
    import sfr_dist
    out, export_dir = Path(cfg.out_dir), Path(cfg.out_dir) / "export"
    if (export_dir / "DONE").exists():
        return export_dir
    train_set = sfr.prepare(train_pairs, tok, cfg, encoder)
    eval_set = sfr.prepare(eval_pairs, tok, cfg, encoder)  # cfg.null_targets: sfr.train shuffles
    if encoder is not None and _rank() == 0:
        encoder.save()
    t0 = time.time()
    model, history = sfr.train(cfg, train_set, tok, eval_set, log=log, run=train.RunOnDisk(progress),
                               dist=sfr_dist.setup(cfg))  # DDP / FSDP under torchrun
    if _rank() == 0:
        train.export(model, str(export_dir), tok)
        _write_json(out / "train.json", {"seconds": time.time() - t0, "history": history})
        (export_dir / "DONE").write_text("")
    _barrier()
    return export_dir


def load_for_sampling(export_dir: Path, device: str):
    """The exported model, as a deployed user would load it (train.load_exported)."""
    import train
    model, _ = train.load_exported(str(export_dir))
    return model.to(device).eval()


# ---------------------------------------------------------------------------
# 4. Sampling, and the loss of the reference solutions
# ---------------------------------------------------------------------------


def _crop_prompt(prompt: list[int], block: int) -> list[int]:
    """Keep room for the response: a prompt longer than block - PROMPT_RESERVE loses its start."""
    return prompt[-(block - PROMPT_RESERVE):] if len(prompt) > block - PROMPT_RESERVE else prompt


def sample_gpt(gpt, prompt: list[int], n: int, max_new_tokens: int, temperature: float, eos_id: int,
               generator=None) -> list[list[int]]:
    """n completions of one prompt from the built-in GPT, through sfr.generate (its KV cache;
    temperature 0 = greedy); each completion stops at eos_id, which it does not include."""
    import torch
    import sfr
    if len(prompt) + max_new_tokens > gpt.block_size:
        raise ValueError(f"{len(prompt)} prompt + {max_new_tokens} new tokens > block_size={gpt.block_size}")
    idx = torch.tensor([prompt], device=gpt.wte.weight.device).expand(n, -1)
    out = sfr.generate(gpt, idx, max_new_tokens, temperature, eos_id=eos_id, generator=generator)
    rows = out[:, len(prompt):].tolist()
    return [row[:row.index(eos_id)] if eos_id in row else row for row in rows]


def sample_hf(model, prompts: list[list[int]], n: int, max_new_tokens: int, temperature: float,
              eos_id: int, pad_id: int, seed: int) -> list[list[list[int]]]:
    """n completions of each prompt from a Hugging Face model, all prompts in one
    left-padded batch through model.generate (its own key-value cache). Plain sampling:
    the model's generation_config (top-k, top-p, repetition penalty) is overridden."""
    import torch
    from transformers import GenerationConfig
    rows = [p for p in prompts for _ in range(n)]
    L = max(len(p) for p in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for i, p in enumerate(rows):
        ids[i, L - len(p):], mask[i, L - len(p):] = torch.tensor(p), 1
    gen = GenerationConfig(do_sample=temperature > 0, temperature=temperature or None, top_k=0, top_p=1.0,
                           repetition_penalty=1.0, max_new_tokens=max_new_tokens, eos_token_id=eos_id,
                           pad_token_id=pad_id)
    torch.manual_seed(seed)
    dev = next(model.parameters()).device
    with torch.no_grad():
        out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), generation_config=gen)
    new = [row[L:] for row in out.tolist()]
    new = [row[:row.index(eos_id)] if eos_id in row else row for row in new]
    return [new[i * n:(i + 1) * n] for i in range(len(prompts))]


def reference_loss(model, tok, rec: dict, block: int, chat: bool = False) -> dict:
    """Cross-entropy of the reference solution (format_response) given prompt_of(rec, tok, chat),
    summed over its tokens (eos not counted), with how many tokens and bytes that covers; a
    response running past the block is scored up to the block's end."""
    import torch
    import torch.nn.functional as F
    import sfr
    p = _crop_prompt(tok.encode(prompt_of(rec, tok, chat)), block)
    r = tok.encode(format_response(rec))
    scored = r[:block + 1 - len(p)]
    seq = torch.tensor([p + scored], device=next(model.parameters()).device)
    with torch.no_grad():
        logits = sfr.logits_of(model, seq[:, :-1])[0, len(p) - 1:].float()  # (len(scored), V)
    nats = F.cross_entropy(logits, seq[0, len(p):], reduction="sum").item()
    return {"nats": nats, "tokens": len(scored), "bytes": len(tok.decode(scored).encode()),
            "truncated": len(scored) < len(r)}


def sample_stats(codes: list[str], entry_point: str, encoder=None) -> dict:
    """What one problem's samples look like beyond pass/fail. Partial credit for a small
    model: the share that is non-empty and parses (an empty program parses too, so the
    sandbox's parse_rate counts it) and the share that defines the function the tests call.
    Diversity: distinct-1/2 over whitespace tokens, the number of different programs, and
    the Vendi score of their MiniLM embeddings (the effective number of distinct samples, 1..n)."""
    from sfr_metrics import distinct_n, vendi_score
    trees = [_parse(c) for c in codes]
    out = {"parses_nonempty": sum(t is not None and bool(c.strip()) for t, c in zip(trees, codes)) / len(codes),
           "defines_entry_point": sum(t is not None and any(
               isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == entry_point
               for node in ast.walk(t)) for t in trees) / len(codes),
           "distinct_1": distinct_n(codes, 1), "distinct_2": distinct_n(codes, 2),
           "distinct_samples": len(set(codes))}
    if encoder is not None and len(codes) > 1:
        out["vendi"] = vendi_score(encoder.encode(codes))
    return out


def _parse(code: str):
    try:
        return ast.parse(code)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None


def entry_point(rec: dict) -> str:
    """The function the first test calls: the first called name that is not a builtin (or
    the first called name, for the one task whose solution shadows `sum`)."""
    import builtins
    tree = _parse(rec["test_list"][0])
    names = [n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)] \
        if tree else []
    return next((n for n in names if not hasattr(builtins, n)), names[0] if names else "")


# ---------------------------------------------------------------------------
# 5. Scoring: the sandbox (sandbox.py, a module of its own, with its own tests)
# ---------------------------------------------------------------------------

# run_program / check_program run one untrusted program against assert-tests and
# return a verdict that the program cannot forge; run_checks runs many in parallel.
# Its module docstring says how, and what it does not stop.


# --- 5a. pass@k ---------------------------------------------------------------

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass (Chen et al. 2021, eq. 1).

    ``1 - C(n-c, k) / C(n, k)``, computed as ``1 - prod_{i=n-c+1..n} (1 - k/i)``
    to avoid huge binomials. 0 when c == 0, 1 when fewer than k samples fail.
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


# --- 5b. scoring samples, and the store that resumes it ------------------------

class ResultStore:
    """Finished results on disk, one JSON object a line, so an interrupted run resumes.

    ``add`` appends one line with a single write and fsyncs it. A crash can only
    leave the last line incomplete (no newline at the end, or not valid JSON);
    opening the store drops that line and truncates the file back to the last
    complete record, so the file is always a list of whole records. A bad line
    anywhere else was not written by us: that raises ``ValueError``.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._results: dict[str, object] = {}
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = self.path.read_bytes() if self.path.exists() else b""
        good = 0  # bytes of complete, valid records
        for lineno, line in enumerate(data.split(b"\n"), 1):
            end = good + len(line) + 1
            if end > len(data):  # the last piece has no newline: an interrupted write
                break
            try:
                rec = json.loads(line)
                self._results[str(rec["key"])] = rec["value"]
            except (ValueError, KeyError, TypeError):
                if end < len(data):
                    raise UsageError(f"{self.path}:{lineno}: not a result record; "
                                     "the file was changed by something else") from None
                break  # the final line, cut short before its newline reached the disk
            good = end
        if good < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good)
                os.fsync(f.fileno())

    def __contains__(self, key) -> bool:
        return str(key) in self._results

    def __len__(self) -> int:
        return len(self._results)

    def get(self, key, default=None):
        return self._results.get(str(key), default)

    def items(self):
        return list(self._results.items())

    def add(self, key, value) -> None:
        """Record ``value`` (JSON-serialisable) under ``key``; durable when this returns."""
        line = (json.dumps({"key": str(key), "value": value}, sort_keys=True) + "\n").encode()
        with self._lock:
            self._append(line)
            self._results[str(key)] = value

    def _append(self, data: bytes) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)


def _normalise(code: str) -> str | None:
    """Layout- and comment-free form of a program (its AST dump); None if it does not parse."""
    try:
        return ast.dump(ast.parse(code))
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None


def _problem_summary(task_id: int, codes: list[str], results: list[CheckResult],
                     ks: tuple[int, ...]) -> dict:
    n, c = len(results), sum(r.passed for r in results)
    trees = [_normalise(code) for code in codes]
    summary = {
        "task_id": task_id, "n": n, "c": c,
        "parse_rate": sum(t is not None for t in trees) / n if n else 0.0,
        "distinct_passing": len({t for t, r in zip(trees, results) if r.passed}),
        "outcomes": [{"status": r.status, "detail": r.detail[:300], "boundary": r.boundary} for r in results],
    }
    for k in ks:
        if n >= k:
            summary[f"pass@{k}"] = pass_at_k(n, c, k)
    return summary


def evaluate_samples(records: list[dict], samples: dict[int, list[str]], timeout: float, *,
                     ks: tuple[int, ...] = (1, 5, 10), workers: int | None = None,
                     limits: Limits | None = None, store: ResultStore | None = None,
                     desc: str | None = None) -> dict:
    """Score model completions: ``samples[task_id]`` is a list of raw completions.

    Each completion goes through ``extract_code`` and the sandbox with its
    problem's tests. Per problem: n, c, pass@k for each k <= n, the fraction of
    samples whose code parses, the number of distinct passing programs (after
    ``ast.dump``, so layout and comments do not count) and every sample's outcome.
    With ``store``, problems already in it (with as many samples) are not run again
    and each problem is stored as soon as its last sample finishes. Returns ``{"problems": {task_id:
    ...}, "summary": ...}`` where summary averages over problems (pass@k over those
    with n >= k).
    """
    by_id = {rec["task_id"]: rec for rec in records}
    missing = sorted(set(samples) - set(by_id))
    if missing:
        raise KeyError(f"samples for task_ids not in the records: {missing[:10]}")
    # A stored problem counts as done only for the same number of samples; a store
    # belongs to one set of samples (one model, one method, one seed).
    problems = {tid: store.get(tid) for tid in samples
                if store is not None and tid in store and store.get(tid)["n"] == len(samples[tid])}
    todo = [tid for tid in samples if tid not in problems]
    jobs, owner = [], []
    for tid in todo:
        rec = by_id[tid]
        for completion in samples[tid]:
            jobs.append((extract_code(completion), rec["test_list"], rec["test_setup_code"]))
            owner.append(tid)
    left = {tid: len(samples[tid]) for tid in todo}
    done: dict[int, dict[int, CheckResult]] = {tid: {} for tid in todo}

    def finished(i, result):
        tid = owner[i]
        done[tid][i] = result
        left[tid] -= 1
        if left[tid] == 0:
            order = sorted(done[tid])
            problems[tid] = _problem_summary(tid, [jobs[j][0] for j in order],
                                             [done[tid][j] for j in order], ks)
            if store is not None:
                store.add(tid, problems[tid])

    for tid in todo:  # a problem with no samples is finished already
        if left[tid] == 0:
            problems[tid] = _problem_summary(tid, [], [], ks)
    run_checks(jobs, timeout, workers=workers, limits=limits, desc=desc, on_result=finished)
    return {"problems": {tid: problems[tid] for tid in samples}, "summary": _summarise(problems, ks)}


def _summarise(problems: dict, ks: tuple[int, ...]) -> dict:
    values = list(problems.values())
    summary = {"problems": len(values)}
    for k in ks:
        scored = [p[f"pass@{k}"] for p in values if f"pass@{k}" in p]
        summary[f"pass@{k}"] = sum(scored) / len(scored) if scored else None
        summary[f"problems_with_n>={k}"] = len(scored)
    for key in ("parse_rate", "distinct_passing"):
        summary[key] = sum(p[key] for p in values) / len(values) if values else None
    return summary


# ---------------------------------------------------------------------------
# 6. The run: train every method, then sample and score every method
# ---------------------------------------------------------------------------


def _sampling_seed(seed: int, task_id: int, temperature: float) -> int:
    """The same random draws for every method (common random numbers), fixed per problem."""
    return (seed * 1_000_003 + task_id) * 1_000_033 + round(temperature * 1000)


def _settings(args) -> dict:
    """The resolved settings of a run: model, per-method train.RunConfig fields, sampling."""
    builtin = not args.model
    if args.lora and builtin:
        raise UsageError("--lora needs --model (a Hugging Face model)")
    base = dict(BUILTIN if builtin else HF_MODEL)
    if not builtin:
        base["backbone"] = str(Path(args.model).resolve())
        if args.lora:  # train.RunConfig's LoRA fields; adapters take a larger step than full fine-tuning
            base.update(lr=2e-4, lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout)
    pre = {**base, **PRETRAIN}
    if args.smoke:
        base.update(SMOKE)
        pre.update(SMOKE)
    if args.steps is not None:
        base["steps"] = args.steps
    if args.pretrain_steps is not None:
        pre["steps"] = args.pretrain_steps
    base.update(_parse_sets(args.set))
    pre.update({k: base[k] for k in ARCH if k in base})
    smoke = args.smoke
    return {"builtin": builtin, "base": base, "pretrain": pre,
            "problems": args.problems if args.problems is not None else (2 if smoke else 100),
            "n": args.n if args.n is not None else (5 if smoke else 10),
            "max_new_tokens": args.max_new_tokens or (24 if smoke else 256),
            "train_limit": args.train_limit if args.train_limit is not None else (8 if smoke else 0),
            "val_problems": getattr(args, "val_problems", None),
            "temperatures": args.temperatures, "seed": args.seed}


def _resolve_chat(mode: str, tok, model: str) -> tuple[bool, str]:
    """--chat auto / on / off against the tokenizer: (whether prompts are chat turns, why)."""
    has = has_chat_template(tok)
    if mode == "on" and not has:
        raise UsageError(f"--chat on: {'the built-in model' if not model else model} has no tokenizer "
                         "chat template (tokenizer_config.json / chat_template.jinja)")
    if mode == "auto":
        return has, ("auto: the tokenizer has a chat template" if has else "auto: no chat template")
    return mode == "on", f"--chat {mode}"


def _parse_sets(items: list[str]) -> dict:
    """--set FIELD=VALUE for any train.RunConfig field, typed like the field's default."""
    import dataclasses
    import train
    defaults = train.RunConfig()
    fields = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(train.RunConfig)}
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in fields:
            raise UsageError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of train.RunConfig's fields")
        default = fields[name]
        try:
            out[name] = train._parse_bool(value) if isinstance(default, bool) else type(default)(value)
        except ValueError as e:
            raise UsageError(f"--set {item!r}: {e}") from None
    return out


def _pairs(records: list[dict], tok, block: int, limit: int = 0, chat: bool = False) -> tuple[list, int]:
    """(prompt, response) pairs of prompt_of / format_response, leaving out those whose
    prompt does not fit the block (sfr.prepare would refuse them); and how many were left out.
    The loss is on the response only (sfr.collate), with the tokenizer's eos after it: with
    ``chat``, one user turn and the assistant's answer."""
    pairs = [(prompt_of(r, tok, chat), format_response(r)) for r in records]
    kept = [(p, r) for p, r in pairs if len(tok.encode(p)) + 1 < block]
    return (kept[:limit] if limit else kept), len(pairs) - len(kept)


def _methods(names: str, builtin: bool) -> list[str]:
    """--methods as a list, refused with a reason if a name is unknown, repeated or impossible."""
    methods = names.split(",")
    unknown = [m for m in methods if m not in METHODS and m != BASE]
    if unknown:
        raise UsageError(f"--methods: unknown {unknown}; known: {BASE}, {', '.join(METHODS)}")
    if len(set(methods)) < len(methods):
        raise UsageError(f"--methods {names}: a method is named twice")
    if BASE in methods and builtin:
        raise UsageError(f"--methods: '{BASE}' (no fine-tuning) needs --model; the built-in GPT has no "
                         "released weights to evaluate as they are")
    return methods


class _Timings:
    """Seconds per stage: this invocation's (seconds), and summed over every invocation on this
    --out (all, kept in timings.json as each stage ends)."""

    def __init__(self, path: Path):
        self.path, self.seconds = path, {}
        self.all = json.loads(path.read_text()) if path.exists() else {"stages": {}, "invocations": []}

    def spent(self, stage, t0):
        self.seconds[stage] = time.time() - t0
        self.all["stages"][stage] = self.all["stages"].get(stage, 0.0) + self.seconds[stage]
        if _rank() == 0:
            _write_json(self.path, self.all)

    def done(self, doc, wall):
        self.all["invocations"].append({"command": doc["command"], "wall_seconds": wall,
                                        "finished": doc["finished"]})
        _write_json(self.path, self.all)


def finetune_methods(methods, base, init, out, args, tok, chat, train_pairs, eval_pairs, device, log,
                     progress, timings):
    """One fine-tuning per method, all from the same weights (init), data and order; returns
    (configs, exports) by method. 'base' trains nothing: its export is the --model folder."""
    import dataclasses
    import sfr
    import sfr_encoder
    import train
    encoders = {}  # one per pooling: 'sfr' (recipe='authors') pools by the mean, 'sfr_ours' as the model
    configs, exports = {}, {}
    chat_meta = {"chat": True} if chat else {}  # (absent when off: folders of earlier runs still resume)
    for name in methods:
        if name == BASE:  # nothing to train: the --model folder is the model to evaluate
            configs[name] = dataclasses.replace(base, out_dir=str(out / name))
            exports[name] = Path(args.model).resolve()
            _same_run(out / name, {"method": BASE, "model": str(exports[name]), "block_size": base.block_size,
                                   **chat_meta})
            continue
        cfg = train.RunConfig(**{**dataclasses.asdict(base), **method_overrides(name), "init": init,
                                 "out_dir": str(out / name), "resume": True}).validate()
        configs[name] = cfg
        key = {**_config_key(cfg), "init": Path(init).name}  # the weights, wherever the cache is
        _same_run(out / name, {"config": key, "model": args.model, "train_examples": len(train_pairs),
                               "lora": [cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout] if cfg.lora_r else None,
                               **chat_meta})
        needed = sfr.needs_encoder(cfg) and not (out / name / "export" / "DONE").exists()
        if needed and cfg.pooling not in encoders:
            encoders[cfg.pooling] = sfr_encoder.SegmentEncoder(cfg.encoder, device,
                                                               encoder_cache(cfg.cache, cfg.pooling), cfg.pooling)
        encoder = encoders.get(cfg.pooling) if sfr.needs_encoder(cfg) else None
        t0 = time.time()
        log(f"fine-tuning '{name}' ({', '.join(f'{k}={v}' for k, v in METHODS[name].items())}): "
            f"{cfg.steps} steps of {cfg.batch_size} on {len(train_pairs)} train problems")
        exports[name] = finetune(cfg, tok, train_pairs, eval_pairs, encoder, log, progress)
        timings.spent(f"finetune/{name}", t0)
    return configs, exports


def _cmd_run(args) -> int:
    """The experiment: pretraining (built-in model), one fine-tuning per method, then the reference
    loss, samples, sandbox and diversity of every method, and the report."""
    import sysconfig
    import torch
    import sfr_encoder
    import sfr_hf  # noqa: F401  (registers --model's Hugging Face backbone with sfr)
    import train
    t_start, load_start = time.time(), _load_average()
    _limits_from(args)  # a sandbox that cannot run is refused before any training
    s = _settings(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    tag = "builtin" if s["builtin"] else Path(args.model).name
    out = Path(args.out or f"out/mbpp-{'smoke-' if args.smoke else ''}{tag}")
    report = args.report or (str(out / "mbpp") if args.smoke else
                             "results/mbpp" if s["builtin"] else f"results/mbpp-{tag}")
    cache_dir = Path(args.cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    methods = _methods(args.methods, s["builtin"])
    records = _load_or_explain(args.mbpp)
    splits = split_mbpp(records)
    test = splits["test"][:s["problems"] or None]
    try:
        base = train.RunConfig(**s["base"], device=device, seed=args.seed,
                               cache=str(cache_dir / "minilm-targets.pt")).validate()
    except ValueError as e:  # a --set value RunConfig refuses; the message names the field
        raise UsageError(f"--set: {e}") from None
    tok = train.build_tokenizer(base, [])  # the model's own tokenizer, or bytes for the built-in one
    chat, chat_why = _resolve_chat(args.chat, tok, args.model)
    s["chat"], s["chat_source"] = chat, chat_why
    log = print if _rank() == 0 else (lambda *a: None)
    progress = not args.no_progress
    timings = _Timings(out / "timings.json")

    # 1. pretraining (built-in model only), cached across runs
    init, pre_record = "", None
    if s["builtin"]:
        t0 = time.time()
        pre = train.RunConfig(**s["pretrain"], device=device, seed=args.seed)
        log(f"pretraining the built-in GPT on {sysconfig.get_paths()['stdlib']} ({pre.steps} steps of {pre.batch_size})")
        init, pre_record = pretrain(pre, cache_dir, log, progress)
        log(f"pretrained weights: {init} ({'cached' if pre_record['cached'] else 'trained now'})")
        timings.spent("pretrain", t0)

    # 2. fine-tuning, one export per method, all from the same weights, data and order
    train_pairs, dropped = _pairs(splits["train"], tok, base.block_size, s["train_limit"], chat)
    val = s["val_problems"] if s["val_problems"] is not None else s["train_limit"] // 2  # 0: all 90
    eval_pairs, _ = _pairs(splits["validation"], tok, base.block_size, val, chat)
    log(f"prompts: {'the user turn of the chat template' if chat else 'plain text'} ({chat_why})")
    configs, exports = finetune_methods(methods, base, init, out, args, tok, chat, train_pairs, eval_pairs,
                                        device, log, progress, timings)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # training was the parallel part
    if _rank() != 0:
        return 0

    # 3. evaluation: reference loss, samples, sandbox, diversity; each problem stored as done
    div_encoder = sfr_encoder.SegmentEncoder(base.encoder, device, encoder_cache(base.cache, "model"))  # as the model pools
    results = {}
    for name in methods:
        t0 = time.time()
        results[name] = evaluate_method(name, exports[name], configs[name], tok, test, s, out / name, args,
                                        div_encoder, progress)
        timings.spent(f"evaluate/{name}", t0)
    div_encoder.save()
    wall = time.time() - t_start
    doc = _report_record(args, s, device, methods, configs, results, pre_record, test, dropped,
                         len(train_pairs), timings.seconds, wall, load_start, tok, len(eval_pairs))
    timings.done(doc, wall)
    doc["stage_seconds_all_invocations"], doc["invocations"] = timings.all["stages"], timings.all["invocations"]
    _write_report(doc, report)
    print(markdown_table(doc))
    print(f"\nwrote {report}.json, {report}.md, {report}.png in {wall:.0f} s")
    return 0


def _load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def evaluate_method(name, export_dir, cfg, tok, test, s, folder: Path, args, encoder, progress) -> dict:
    """Everything measured on one method's exported model, each piece stored per problem as it
    finishes (ResultStores in `folder`), so a rerun only does what is missing."""
    import torch
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    model = None

    def loaded():
        nonlocal model
        if model is None:
            model = load_for_sampling(export_dir, cfg.device)
        return model

    def bar(items, desc):
        return tqdm(items, desc=desc, dynamic_ncols=True, leave=False) if (progress and tqdm) else items

    block = cfg.block_size
    loss_store = ResultStore(folder / "reference_loss.jsonl")
    chat = s.get("chat", False)
    for rec in bar([r for r in test if r["task_id"] not in loss_store], f"{name}: reference loss"):
        loss_store.add(rec["task_id"], reference_loss(loaded(), tok, rec, block, chat))
    per_temp = {}
    for temp in s["temperatures"]:
        tag = f"T{temp:g}-n{s['n']}-new{s['max_new_tokens']}-seed{s['seed']}"
        samples = ResultStore(folder / f"samples-{tag}.jsonl")
        todo = [r for r in test if r["task_id"] not in samples]
        if cfg.backbone == "gpt":
            for rec in bar(todo, f"{name}: sampling T={temp:g}"):
                t0 = time.time()
                p = _crop_prompt(tok.encode(prompt_of(rec, tok, chat)), block)
                g = torch.Generator().manual_seed(_sampling_seed(s["seed"], rec["task_id"], temp))
                rows = sample_gpt(loaded(), p, s["n"], min(s["max_new_tokens"], block - len(p)), temp,
                                  tok.eos_id, g)
                samples.add(rec["task_id"], {"completions": [tok.decode(r) for r in rows],
                                             "seconds": time.time() - t0})
        else:
            chunks = [todo[i:i + args.gen_batch] for i in range(0, len(todo), args.gen_batch)]
            for chunk in bar(chunks, f"{name}: sampling T={temp:g} ({args.gen_batch} problems a batch)"):
                t0 = time.time()
                prompts = [_crop_prompt(tok.encode(prompt_of(r, tok, chat)), block) for r in chunk]
                new = min(s["max_new_tokens"], block - max(len(p) for p in prompts))
                outs = sample_hf(loaded(), prompts, s["n"], new, temp, tok.eos_id, tok.pad_id,
                                 _sampling_seed(s["seed"], chunk[0]["task_id"], temp))
                for rec, rows in zip(chunk, outs):
                    samples.add(rec["task_id"], {"completions": [tok.decode(r) for r in rows],
                                                 "seconds": (time.time() - t0) / len(chunk)})
        completions = {r["task_id"]: samples.get(r["task_id"])["completions"] for r in test}
        checks = ResultStore(folder / f"checks-{tag}.jsonl")
        scored = evaluate_samples(test, completions, args.timeout, workers=args.workers,
                                  limits=_limits_from(args), store=checks,
                                  desc=f"{name}: running T={temp:g}" if progress else None)
        div_store = ResultStore(folder / f"sample-stats-{tag}.jsonl")
        for rec in bar([r for r in test if r["task_id"] not in div_store], f"{name}: diversity T={temp:g}"):
            codes = [extract_code(c) for c in completions[rec["task_id"]]]
            div_store.add(rec["task_id"], sample_stats(codes, entry_point(rec), encoder))
        per_temp[f"{temp:g}"] = {"scored": scored, "diversity": {r["task_id"]: div_store.get(r["task_id"])
                                                                 for r in test},
                                 "sample_seconds": sum(samples.get(r["task_id"])["seconds"] for r in test),
                                 "first_completion": {r["task_id"]: completions[r["task_id"]][0]
                                                      for r in test[:3]}}
    train = ({"seconds": 0.0, "history": [{}]} if name == BASE  # not trained
             else json.loads((folder / "train.json").read_text()))
    params = sum(p.numel() for p in loaded().parameters())
    return {"parameters": params, "loss": {r["task_id"]: loss_store.get(r["task_id"]) for r in test}, "temperatures": per_temp,
            "train": train}


# ---------------------------------------------------------------------------
# 7. The report: JSON, markdown table, figure
# ---------------------------------------------------------------------------


def _loss_summary(loss: dict) -> dict:
    import math
    nats = sum(v["nats"] for v in loss.values())
    return {"nats_per_token": nats / max(1, sum(v["tokens"] for v in loss.values())),
            "bits_per_byte": nats / max(1, sum(v["bytes"] for v in loss.values())) / math.log(2),
            "problems": len(loss), "truncated": sum(v["truncated"] for v in loss.values())}


def _paired_difference(loss: dict, base: dict) -> dict:
    """Mean over problems of (this method's - the baseline's) per-token loss, with its
    standard error: the same problems under both, so most of the problem-to-problem
    spread cancels."""
    import statistics
    d = [loss[t]["nats"] / max(1, loss[t]["tokens"]) - base[t]["nats"] / max(1, base[t]["tokens"]) for t in loss]
    se = statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else float("nan")
    return {"mean": statistics.fmean(d), "se": se, "problems": len(d)}


def _version(pkg: str) -> str | None:
    """pkg's version: the imported module's, or else its installed metadata's, which is the
    same string without the import (sentence_transformers and peft take seconds to import,
    and a run whose targets are all cached needs neither); None if it is not installed."""
    if pkg in sys.modules:
        return getattr(sys.modules[pkg], "__version__", None)
    import importlib.metadata
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        try:
            return __import__(pkg).__version__
        except ImportError:
            return None


def _report_record(args, s, device, methods, configs, results, pre_record, test, dropped, n_train,
                   seconds, wall, load_start, tok=None, n_val=None) -> dict:
    import torch
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("transformers", "sentence_transformers", "peft", "numpy"):
        versions[pkg] = _version(pkg)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    hardware = {"cpu": cpu, "cpus": os.cpu_count(), "machine": platform.machine(), "system": platform.system(),
                "device": device, "torch_threads": torch.get_num_threads(),
                "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
                "load_average_start": load_start, "load_average_end": _load_average()}
    # the paired loss differences are against the first fine-tuned method (base, if asked for, is
    # not a fine-tuning: it is reported against that baseline too)
    base_name = next((m for m in methods if m != BASE), methods[0])
    doc = {"command": "python reproduce_mbpp.py " + " ".join(args.argv), "wall_seconds": wall,
           "stage_seconds_this_invocation": seconds, "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
           "hardware": hardware, "versions": versions, "seed": args.seed,
           "sandbox": {"boundary": sandbox.choose_boundary(args.boundary), "bwrap": sandbox.bwrap_status()[1] or "works",
                       "cpu_seconds": args.timeout, "memory_mb": args.memory_mb},
           "sampling": {"n": s["n"], "temperatures": s["temperatures"], "max_new_tokens": s["max_new_tokens"],
                        "seeds": "per problem: (seed * 1000003 + task_id) * 1000033 + round(1000 T), "
                                 "the same for every method"},
           "data": {"mbpp": str(args.mbpp), "sha256": sha256_file(args.mbpp), "license": "CC BY 4.0, Austin et al. 2021",
                    "train_problems": n_train, "train_left_out_prompt_too_long": dropped,
                    "validation_problems_for_the_last_step_eval": n_val,
                    "test_task_ids": [r["task_id"] for r in test]},
           "model": args.model or "built-in GPT", "lora": {"r": args.lora_r, "alpha": args.lora_alpha,
                                                           "dropout": args.lora_dropout} if args.lora else None,
           "pretrain": pre_record, "baseline": base_name,
           "prompt": {"chat": s.get("chat", False), "chat_source": s.get("chat_source", ""),
                      "example": prompt_of(test[0], tok, s.get("chat", False)) if test else None,
                      "response_example": (format_response(test[0]) if test else None)},
           "methods": {}}
    for name in methods:
        res = results[name]
        hist = res["train"]["history"]
        trained = name != BASE
        entry = {"overrides": method_overrides(name) if trained else None,
                 "config": _config_key(configs[name]) if trained else None,
                 "trained": trained, "weights": str(Path(args.model).resolve()) if not trained else None,
                 "parameters": res["parameters"],
                 "train": {"seconds": res["train"]["seconds"], "last_step": hist[-1]},
                 "reference_loss": {**_loss_summary(res["loss"]),
                                    "vs_baseline": _paired_difference(res["loss"], results[base_name]["loss"])},
                 "temperatures": {}, "problems": {}}
        for temp, t in res["temperatures"].items():
            div = list(t["diversity"].values())
            entry["temperatures"][temp] = {
                **t["scored"]["summary"], "sample_seconds": t["sample_seconds"],
                **{k: sum(d.get(k, 0.0) for d in div) / len(div) for k in ("parses_nonempty", "defines_entry_point",
                                                                           "distinct_1", "distinct_2",
                                                                           "distinct_samples", "vendi")},
                "example_completions": t["first_completion"]}
        for rec in test:
            tid = rec["task_id"]
            prob = {"reference_loss": res["loss"][tid]}
            for temp, t in res["temperatures"].items():
                p = dict(t["scored"]["problems"][tid])
                p["outcomes"] = [f"{o['status']}: {o['detail'][:100]}" if o["detail"] else o["status"]
                                 for o in p["outcomes"]]
                prob[f"T={temp}"] = {**p, **t["diversity"][tid]}
            entry["problems"][str(tid)] = prob
        doc["methods"][name] = entry
    return doc


def _fmt(v, pct=False, digits=3) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}%" if pct else f"{v:.{digits}f}"


def markdown_table(doc: dict) -> str:
    """One row per method and temperature. 'defines f': the share of samples whose code
    parses and defines the function the tests call."""
    head = ("| method | T | loss (nats/token) | vs " + doc["baseline"] + " (paired, ±s.e.) | bits/byte "
            "| parses, non-empty | defines f | pass@1 | pass@5 | pass@10 | distinct-2 | Vendi | distinct samples "
            "| distinct passing | train s |\n|" + "---|" * 15)
    rows = [head]
    for name, m in doc["methods"].items():
        loss, vs = m["reference_loss"], m["reference_loss"]["vs_baseline"]
        diff = "-" if name == doc["baseline"] else f"{vs['mean']:+.4f} ± {vs['se']:.4f}"
        for temp, t in m["temperatures"].items():
            rows.append(f"| {name} | {temp} | {loss['nats_per_token']:.4f} | {diff} | {loss['bits_per_byte']:.3f} "
                        f"| {_fmt(t['parses_nonempty'], True)} | {_fmt(t['defines_entry_point'], True)} | {_fmt(t['pass@1'], True)} | {_fmt(t['pass@5'], True)} "
                        f"| {_fmt(t['pass@10'], True)} | {t['distinct_2']:.3f} | {t['vendi']:.2f} "
                        f"| {t['distinct_samples']:.2f} | {t['distinct_passing']:.2f} "
                        f"| {m['train']['seconds']:.0f} |")
    return "\n".join(rows)


def _markdown(doc: dict) -> str:
    hw, s = doc["hardware"], doc["sampling"]
    first = next((m for m in doc["methods"].values() if m.get("config")), None)
    cfg = first["config"] if first else {}
    any_method = next(iter(doc["methods"].values()))
    ids = doc["data"]["test_task_ids"]
    if doc["model"] == "built-in GPT":
        pre = doc["pretrain"]
        model = (f"the built-in byte-level GPT ({cfg['n_layer']} layers, width {cfg['n_embd']}, "
                 f"{first['parameters'] / 1e6:.2f}M parameters, block {cfg['block_size']} bytes), pretrained "
                 f"{pre['config']['steps']} steps of {pre['config']['batch_size']} windows on {pre['files']} "
                 f"standard-library files ({pre['corpus_bytes'] / 1e6:.1f} MB; held-out loss "
                 f"{pre['eval_ar']:.3f} nats/byte)")
    else:
        model = f"{doc['model']} ({any_method['parameters'] / 1e6:.0f}M parameters{', LoRA' if doc['lora'] else ''})"
    load = hw["load_average_start"]
    lines = [
        "# MBPP: next-token SFT vs MTP vs SFR, same model, data, seed and steps",
        "",
        f"Model: {model}; "
        + (f"then fine-tuned {cfg['steps']} steps of {cfg['batch_size']} per method on "
           f"{doc['data']['train_problems']} MBPP train problems, from the same weights, in the same order"
           if cfg else "not fine-tuned")
        + (f"; '{BASE}' is those weights as they are, not fine-tuned" if BASE in doc["methods"] and cfg else "")
        + ". "
        + ("Prompts: the task as the user turn of the tokenizer's chat template, the solution as the "
           "assistant's turn. " if doc.get("prompt", {}).get("chat") else "")
        + f"Evaluated on {len(ids)} test problems (task_ids {ids[0]}-{ids[-1]}), n = {s['n']} samples each, "
        f"at most {s['max_new_tokens']} new tokens. Loss: of the reference solutions of those problems, "
        f"given the prompt; 'vs {doc['baseline']}' is the paired per-problem difference.",
        "",
        markdown_table(doc),
        "",
        f"Command: `{doc['command']}`  ",
        f"Hardware: {hw['cpu']}, {hw['cpus']} CPUs ({hw['device']}, {hw['torch_threads']} torch threads"
        f"{', GPU ' + hw['gpu'] if hw['gpu'] else ''}), load average {load[0]:.1f} at the start "
        "(the machine was shared)  " if load else "",
        f"Wall time: {doc['wall_seconds'] / 60:.1f} min"
        + (f" for this invocation; {len(doc['invocations'])} invocations worked on this output folder, "
           f"{sum(i['wall_seconds'] for i in doc['invocations']) / 60:.1f} min in all" if len(doc["invocations"]) > 1
           else "")
        + f" (per stage: {', '.join(f'{k} {v:.0f} s' for k, v in doc['stage_seconds_all_invocations'].items())})  ",
        f"Versions: {', '.join(f'{k} {v}' for k, v in doc['versions'].items() if v)}",
        "",
        "MBPP: Austin et al. 2021, \"Program Synthesis with Large Language Models\", CC BY 4.0.",
        "",
        "## Reading these numbers",
        "",
        *_reading(doc),
    ]
    return "\n".join(line for line in lines if line is not None) + "\n"


def _reading(doc: dict) -> list[str]:
    """What the table does and does not show, from the numbers themselves."""
    base, ms = doc["baseline"], doc["methods"]
    temps = list(ms[base]["temperatures"])
    solved = any((t.get("pass@1") or 0) > 0 for m in ms.values() for t in m["temperatures"].values())
    out = []
    if doc["model"] == "built-in GPT":
        out.append("- The built-in model is tiny (under 1M parameters, minutes of pretraining on one CPU). What it can "
                   "learn is the surface of Python and of the response format (the fence, `def`, indentation, the "
                   "function name from the test; 'parses' and 'defines f' measure how far it got); it cannot be "
                   "expected to solve MBPP problems, and pass@k near 0 says nothing about the methods. The loss of "
                   "the reference solutions, those two rates and the diversity measures are what can differ.")
    if not solved:
        out.append("- No method solves a single problem here: pass@k cannot separate them.")
    if max(t["parses_nonempty"] for m in ms.values() for t in m["temperatures"].values()) < 0.05:
        out.append("- Fewer than 5% of the samples are non-empty code that parses, for every method and "
                   "temperature: the samples are not programs yet (see `example_completions` in the JSON), so "
                   "the sampling columns (parses, defines f, pass@k, distinct-n, Vendi) describe the model's "
                   "noise, not its programs. Only the reference loss compares the methods here.")
    for name, m in ms.items():
        if name == base:
            continue
        vs = m["reference_loss"]["vs_baseline"]
        sig = abs(vs["mean"]) > 2 * vs["se"]
        out.append(f"- {name} vs {base}: reference loss {vs['mean']:+.4f} nats/token "
                   f"(paired s.e. {vs['se']:.4f} over {vs['problems']} problems): "
                   + ("more than 2 s.e. from zero" if sig else "within 2 s.e. of zero, no measurable difference")
                   + " (the s.e. covers which problems were drawn, not training noise)"
                   + "; " + ", ".join(f"T={t}: Vendi {m['temperatures'][t]['vendi']:.2f} vs "
                                      f"{ms[base]['temperatures'][t]['vendi']:.2f}, parses {100 * m['temperatures'][t]['parses_nonempty']:.1f}% vs "
                                      f"{100 * ms[base]['temperatures'][t]['parses_nonempty']:.1f}%" for t in temps) + ".")
    out.append("- One seed, one training run per method: differences between methods include the run-to-run "
               "spread of training, which this table does not measure (rerun with --seed to see it).")
    return out


def plot(doc: dict, path: str) -> None:
    """Three panels: reference loss, correctness (parse rate, pass@k), diversity."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(doc["methods"])
    temp = next(iter(doc["methods"][names[0]]["temperatures"]))
    ms = [doc["methods"][n] for n in names]
    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    # the paired difference, not the raw losses: the problem-to-problem spread cancels in it
    vs = [m["reference_loss"]["vs_baseline"] for m in ms]
    ax[0].bar(names, [v["mean"] for v in vs], yerr=[2 * v["se"] for v in vs], capsize=4, color="tab:blue")
    ax[0].axhline(0, color="black", lw=0.8)
    ax[0].set_xticks(range(len(names)), [f"{n}\n{m['reference_loss']['bits_per_byte']:.3f} bits/byte"
                                         for n, m in zip(names, ms)])
    ax[0].set(title=f"reference-solution loss minus {doc['baseline']}'s (±2 s.e.)", ylabel="nats per token")
    keys = ["parses_nonempty", "defines_entry_point", "pass@1", "pass@10"]
    width = 0.8 / len(keys)
    for i, k in enumerate(keys):
        vals = [m["temperatures"][temp].get(k) or 0.0 for m in ms]
        ax[1].bar([j + i * width for j in range(len(names))], vals, width, label=k)
    ax[1].set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names)
    ax[1].set(title=f"correctness at T={temp}", ylabel="fraction", ylim=(0, 1))
    ax[1].legend(fontsize=8)
    ax[2].bar(names, [m["temperatures"][temp]["vendi"] for m in ms], color="tab:green")
    ax[2].set(title=f"diversity at T={temp}: Vendi of MiniLM embeddings", ylabel=f"effective samples (of {doc['sampling']['n']})")
    fig.suptitle(f"MBPP, {doc['model']}: only the auxiliary loss differs")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _write_report(doc: dict, prefix: str) -> None:
    _write_json(prefix + ".json", doc)
    md = Path(prefix + ".md")
    tmp = md.with_name(md.name + ".tmp")
    tmp.write_text(_markdown(doc))
    os.replace(tmp, md)
    plot(doc, prefix + ".png")


# ---------------------------------------------------------------------------
# 8. check_references: the sandbox against 974 known-good programs
# ---------------------------------------------------------------------------

def check_references(records: list[dict], timeout: float, *, workers: int | None = None,
                     limits: Limits | None = None, progress: bool = True) -> dict:
    """Run every record's reference ``code`` with its ``test_setup_code`` and ``test_list``.

    No task is special-cased: a reference that fails is reported as failing.
    Returns per-split pass counts, the failures (task_id -> status and detail),
    the wall time and the throughput in checks per second.
    """
    jobs = [(rec["code"], rec["test_list"], rec["test_setup_code"]) for rec in records]
    start, cpu_start = time.monotonic(), _cpu_seconds()
    results = run_checks(jobs, timeout, workers=workers, limits=limits,
                         desc="references" if progress else None)
    wall, cpu = time.monotonic() - start, _cpu_seconds() - cpu_start
    split_of = {rec["task_id"]: name for name, recs in split_mbpp(records).items() for rec in recs}
    per_split = {name: {"passed": 0, "total": 0} for name in SPLITS}
    failures = {}
    for rec, result in zip(records, results):
        counts = per_split[split_of[rec["task_id"]]]
        counts["total"] += 1
        counts["passed"] += result.passed
        if not result.passed:
            failures[rec["task_id"]] = {"status": result.status, "detail": result.detail}
    return {"per_split": per_split, "passed": sum(r.passed for r in results), "total": len(results),
            "failures": failures, "wall_time": wall, "checks_per_second": len(results) / wall,
            "cpu_seconds": cpu, "workers": workers or os.cpu_count() or 1,
            "boundaries": {b: sum(r.boundary == b for r in results) for b in {r.boundary for r in results}},
            **_check_cpu(records, results)}


def _check_cpu(records: list[dict], results: list[CheckResult]) -> dict:
    """CPU seconds of the checks themselves (their cgroups), the measure the time limit uses."""
    timed = [(r.cpu_time, rec["task_id"]) for rec, r in zip(records, results) if r.cpu_time is not None]
    if not timed or len(timed) < len(results):
        return {"check_cpu_seconds": None, "max_check_cpu_seconds": None, "slowest_task": None}
    slowest = max(timed)
    return {"check_cpu_seconds": sum(t for t, _ in timed), "max_check_cpu_seconds": slowest[0],
            "slowest_task": slowest[1]}


def _cpu_seconds() -> float:
    """CPU time of this process and its reaped children (bwrap's children are not
    among them: see the checks' own cpu_time)."""
    import resource
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


# ---------------------------------------------------------------------------
# 9. Command line
# ---------------------------------------------------------------------------

def _load_or_explain(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise UsageError(f"--mbpp {path}: no such file; get it with "
                         f"`python reproduce_mbpp.py download --dest {path}`")
    digest = sha256_file(path)
    if digest != MBPP_SHA256:
        print(f"note: {path} has sha256 {digest}, not the recorded {MBPP_SHA256}; "
              "numbers may differ from ours", file=sys.stderr)
    return load_mbpp(path)


def load_samples(path: str) -> dict[int, list[str]]:
    """Read a samples file: one ``{"task_id": int, "completion": str}`` a line, several
    lines per task for pass@k. Anything else raises ``UsageError`` naming file and line."""
    samples: dict[int, list[str]] = {}
    for where, _, rec in _jsonl_objects(path, UsageError, label="--samples "):
        for field, kind in (("task_id", int), ("completion", str)):
            if field not in rec:
                raise UsageError(f"{where}: missing field '{field}'")
            if type(rec[field]) is not kind:
                raise UsageError(f"{where}: field '{field}' must be {kind.__name__}, got {type(rec[field]).__name__}")
        samples.setdefault(rec["task_id"], []).append(rec["completion"])
    return samples


def _limits_from(args) -> Limits:
    if args.boundary == "bwrap" and not sandbox.bwrap_status()[0]:
        raise UsageError(f"--boundary bwrap: {sandbox.bwrap_status()[1]}")
    return Limits(memory_bytes=args.memory_mb << 20, boundary=args.boundary)


def _cmd_download(args) -> int:
    try:
        dest = download_mbpp(args.url, args.dest, args.sha256)
    except (OSError, ValueError) as e:  # no network, a bad URL, an unwritable --dest
        if isinstance(e, UsageError):
            raise
        raise UsageError(f"--url {args.url} to --dest {args.dest}: {e}") from None
    print(f"{dest}: sha256 {args.sha256} verified")
    return 0


def _cmd_check_references(args) -> int:
    records = _load_or_explain(args.mbpp)
    wanted = set(args.splits)
    records = [r for name, recs in split_mbpp(records).items() if name in wanted for r in recs]
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    report = check_references(records, args.timeout, workers=args.workers,
                              limits=_limits_from(args), progress=not args.no_progress)
    print("\n| split | passed | total |\n|---|---|---|")
    for name, counts in report["per_split"].items():
        if counts["total"]:
            print(f"| {name} | {counts['passed']} | {counts['total']} |")
    print(f"| all | {report['passed']} | {report['total']} |\n")
    failing = sorted(report["failures"])
    print(f"failing task_ids ({len(failing)}): {failing}")
    for tid in failing:
        f = report["failures"][tid]
        print(f"  {tid}: {f['status']}: {f['detail'][:160]}")
    layers = ", ".join(f"{n} {name or 'none'}" for name, n in sorted(report["boundaries"].items()))
    print(f"\n{report['total']} checks in {report['wall_time']:.1f} s = "
          f"{report['checks_per_second']:.1f} checks/s with {report['workers']} workers "
          f"on {os.cpu_count()} CPUs ({platform.machine()}; boundary: {layers}; "
          f"{'cgroup' if sandbox._Cgroup.bases() else '/proc sweep'} containment)")
    # Wall-clock throughput depends on what else runs; CPU per check does not.
    load = " ".join(f"{x:.1f}" for x in os.getloadavg()) if load_before is not None else "?"
    if report["check_cpu_seconds"] is not None:
        print(f"CPU per check {1000 * report['check_cpu_seconds'] / max(1, report['total']):.1f} ms "
              f"(the checks' cgroups; slowest {report['max_check_cpu_seconds']:.2f} s, task "
              f"{report['slowest_task']}); harness {1000 * report['cpu_seconds'] / max(1, report['total']):.1f} ms")
    print(f"load average at the end of the run {load}")
    return 0


def _cmd_evaluate(args) -> int:
    records = _load_or_explain(args.mbpp)
    samples = load_samples(args.samples)
    missing = sorted(set(samples) - {rec["task_id"] for rec in records})
    if missing:
        raise UsageError(f"--samples {args.samples}: task_ids not in {args.mbpp}: {missing[:10]}")
    store = ResultStore(args.results) if args.results else None
    report = evaluate_samples(records, samples, args.timeout, workers=args.workers,
                              limits=_limits_from(args), store=store,
                              desc=None if args.no_progress else "samples")
    print(json.dumps(report["summary"], indent=2))
    return 0


# Argument types: each refuses a value that would weaken the sandbox or waste a run,
# before any work, with the flag's name (argparse adds it).

def _number(kind, lowest, inclusive, what):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an int' if kind is int else 'a number'}") from None
        if not math.isfinite(value) or value < lowest or (value == lowest and not inclusive):
            raise argparse.ArgumentTypeError(f"{text!r}: must be {what}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


POSITIVE_INT = _number(int, 1, True, "an int >= 1")
COUNT = _number(int, 0, True, "an int >= 0")
SECONDS = _number(float, 0.0, False, "a finite number of seconds > 0")
TEMPERATURE = _number(float, 0.0, True, "a finite number >= 0 (0 = greedy)")


def _probability(text):
    value = _number(float, 0.0, True, "in [0, 1)")(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be in [0, 1)")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the full usage is in --help)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        allow_abbrev=False, prog="reproduce_mbpp.py", description=__doc__.split("\n\n")[0],
        epilog="MBPP (Austin et al. 2021) is CC BY 4.0; keep the attribution with any result.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("download", allow_abbrev=False, help="download mbpp.jsonl and verify its sha256",
                       description="Download mbpp.jsonl and verify its sha256.")
    p.add_argument("--dest", default="mbpp.jsonl", help="where to put the file (default: %(default)s)")
    p.add_argument("--url", default=MBPP_URL, help="where to get it (default: the google-research copy)")
    p.add_argument("--sha256", default=MBPP_SHA256,
                   help="refuse a copy with any other checksum (default: the copy this project uses)")
    p.set_defaults(func=_cmd_download)

    def common(p):
        p.add_argument("--mbpp", required=True, help="path to mbpp.jsonl (see the download command)")
        p.add_argument("--timeout", type=SECONDS, default=5.0,
                       help="CPU seconds per program (RLIMIT_CPU, whole seconds; the wall clock only caps "
                            "sleeping programs, at 10x this + 10 s) (default: %(default)s)")
        p.add_argument("--workers", type=POSITIVE_INT, default=None,
                       help="programs run at once (default: the number of CPUs)")
        p.add_argument("--memory_mb", type=POSITIVE_INT, default=1024,
                       help="address-space limit per program in MiB (default: %(default)s)")
        p.add_argument("--boundary", choices=("auto", "bwrap", "hook"), default="auto",
                       help="outer layer of the sandbox: bwrap (bubblewrap) if it works, else the audit-hook "
                            "fallback; 'bwrap' refuses to run without it (default: %(default)s)")
        p.add_argument("--no_progress", action="store_true", help="no progress bar")

    p = sub.add_parser("check_references", allow_abbrev=False,
                       help="run every reference solution through the sandbox; print pass counts and checks/s",
                       description="Run every reference solution with its tests through the sandbox: a "
                                   "test of the sandbox against 974 known-good programs.")
    common(p)
    p.add_argument("--splits", nargs="+", choices=list(SPLITS), default=list(SPLITS),
                   help="which splits to run (default: all)")
    p.set_defaults(func=_cmd_check_references)

    p = sub.add_parser("evaluate", allow_abbrev=False,
                       help="score model samples: pass@k, parse rate, distinct passing programs",
                       description="Score model samples: pass@k, parse rate, distinct passing programs.")
    common(p)
    p.add_argument("--samples", required=True,
                   help='jsonl, one {"task_id": int, "completion": str} a line, several per task for pass@k')
    p.add_argument("--results", default=None,
                   help="jsonl store of finished problems; a rerun skips them (default: none)")
    p.set_defaults(func=_cmd_evaluate)

    _add_run_parser(sub, common)  # section 9a
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # recorded with the results
    try:
        return args.func(args)
    except UsageError as e:  # bad flags and input files: the message names them; no traceback
        print(f"reproduce_mbpp.py {args.command}: error: {e}", file=sys.stderr)
        return 2


# --- 9a. the run subcommand's flags -------------------------------------------

RUN_HELP = """Train the same model once per method and compare them on MBPP.

Methods (--methods, comma-separated) are train.RunConfig overrides; everything else is shared:
  base          no fine-tuning: the --model weights as they are, sampled and scored like the others
""" + "\n".join(f"  {name:13s} {', '.join(f'{k}={v!r}' for k, v in kw.items())}" for name, kw in METHODS.items()) + """

Built-in model (default): a byte-level GPT (4 layers, width 128, ~0.9M parameters),
pretrained on this interpreter's standard library sources (cached in --cache_dir), then
fine-tuned per method. --model PATH: a local Hugging Face causal LM (GPU if there is one;
--lora for adapters; multi-GPU training: torchrun --nproc_per_node=N reproduce_mbpp.py run ...).
--chat (auto by default): with an instruct model, the prompt of fine-tuning, sampling and the
reference loss is the task as the user turn of the tokenizer's chat template, and the solution
the assistant's turn (the loss stays on the solution); recorded in the report as "prompt".
--smoke: the whole pipeline on a 1-layer model, 2 problems, in well under a minute.
Rerun with the same --out to resume: finished trainings, samples and checks are reused."""


def _add_run_parser(sub, common) -> None:
    p = sub.add_parser("run", allow_abbrev=False, help="train per method (none / mtp / sfr / ...), sample, run, report",
                       description=RUN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    common(p)
    p.add_argument("--methods", default="none,mtp,sfr",
                   help="comma-separated names above; 'base' (needs --model) is the model as it is, without "
                        "fine-tuning, with the same sampling seeds (default: %(default)s)")
    p.add_argument("--chat", choices=("auto", "on", "off"), default="auto",
                   help="prompts as the user turn of the tokenizer's chat template: auto = when --model's "
                        "tokenizer has one; on refuses a tokenizer without (default: %(default)s)")
    p.add_argument("--model", default="", help="local Hugging Face causal-LM folder (default: the built-in GPT)")
    p.add_argument("--lora", action="store_true", help="--model: train LoRA adapters, merged before export")
    p.add_argument("--lora_r", type=POSITIVE_INT, default=16, help="LoRA rank (default: %(default)s)")
    p.add_argument("--lora_alpha", type=POSITIVE_INT, default=32, help="LoRA alpha (default: %(default)s)")
    p.add_argument("--lora_dropout", type=_probability, default=0.05, help="LoRA dropout (default: %(default)s)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1... (default: cuda if there is one)")
    p.add_argument("--threads", type=COUNT, default=0,
                   help="torch CPU threads; 0 = torch's default. On a machine shared with other jobs, 1 is "
                        "often several times faster than 2 (threads spin waiting for each other)")
    p.add_argument("--steps", type=POSITIVE_INT, default=None, help="fine-tuning steps per method (default: 150 built-in, "
                                                           "300 --model)")
    p.add_argument("--pretrain_steps", type=POSITIVE_INT, default=None, help="built-in model (default: 150 of 16 windows)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any train.RunConfig field for every method's fine-tuning, e.g. --set lr=5e-4 --set segment_len=32 "
                        "(architecture fields apply to pretraining too); repeatable")
    p.add_argument("--problems", type=COUNT, default=None,
                   help="evaluate the first N test problems (task_ids 11..); 0 = all 500 (default: 100)")
    p.add_argument("--n", type=POSITIVE_INT, default=None, help="samples per problem (default: 10)")
    p.add_argument("--temperatures", type=TEMPERATURE, nargs="+", default=[0.8], help="(default: 0.8)")
    p.add_argument("--max_new_tokens", type=POSITIVE_INT, default=None, help="per sample (default: 256)")
    p.add_argument("--gen_batch", type=POSITIVE_INT, default=16, help="--model: problems per generate call (default: 16)")
    p.add_argument("--train_limit", type=COUNT, default=None, help="use only the first N train problems (0 = all)")
    p.add_argument("--val_problems", type=COUNT, default=None,
                   help="validation problems for the held-out loss and diagnostics at the last training step "
                        "(0 = all 90; default: half of --train_limit, all when that is 0)")
    p.add_argument("--seed", type=int, default=0, help="one seed for init, data order, flow noise and sampling")
    p.add_argument("--out", default=None, help="work folder: checkpoints, exports, per-problem stores "
                                               "(default: out/mbpp-builtin, out/mbpp-<model>, out/mbpp-smoke-...)")
    p.add_argument("--report", default=None, help="writes REPORT.json, .md, .png (default: results/mbpp for the "
                                                  "built-in model, results/mbpp-<model>, or OUT/mbpp with --smoke)")
    p.add_argument("--cache_dir", default=str(Path(__file__).resolve().parent / ".cache"),
                   help="pretrained weights and MiniLM targets, shared across runs (default: .cache/ here)")
    p.add_argument("--smoke", action="store_true", help="tiny everything: the whole pipeline in seconds")
    p.set_defaults(func=_cmd_run)


if __name__ == "__main__":
    sys.exit(main())
