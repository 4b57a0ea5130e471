"""sfr_metrics.py: diversity and quality metrics of samples, which the training loop does not
log: distinct-n, BLEU and Self-BLEU, and the Vendi score of embeddings. Pure Python / torch,
no project imports: toy/persona.py, toy/bimodal_head.py and reproduce_mbpp.py use them."""
import math

import torch
import torch.nn.functional as F


def ngrams(tokens, n):
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts, n=2):
    """Distinct n-grams / all n-grams over a set of whitespace-tokenised samples."""
    grams = [g for t in texts for g in ngrams(t.split(), n)]
    return len(set(grams)) / max(1, len(grams))


def bleu(hyp: list[str], refs: list[list[str]], max_n=4):
    """Sentence BLEU (Papineni et al. 2002) with clipped counts against several references
    and the brevity penalty of the closest reference length; no smoothing, so a
    precision of 0 gives 0."""
    if not hyp:
        return 0.0
    log_p = 0.0
    for n in range(1, max_n + 1):
        h = {}
        for g in ngrams(hyp, n):
            h[g] = h.get(g, 0) + 1
        max_ref = {}
        for r in refs:
            c = {}
            for g in ngrams(r, n):
                c[g] = c.get(g, 0) + 1
            for g, v in c.items():
                max_ref[g] = max(max_ref.get(g, 0), v)
        total = sum(h.values())
        clipped = sum(min(v, max_ref.get(g, 0)) for g, v in h.items())
        if total == 0 or clipped == 0:
            return 0.0
        log_p += math.log(clipped / total) / max_n
    r = min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
    bp = 1.0 if len(hyp) > r else math.exp(1 - r / len(hyp))
    return bp * math.exp(log_p)


def self_bleu(texts, max_n=4):
    """Mean BLEU of each sample against all the others (lower = more diverse).
    max_n=1 gives Self-BLEU-1, the paper's CS-SB1 when texts span personas."""
    toks = [t.split() for t in texts]
    if len(toks) < 2:
        return 0.0
    return sum(bleu(toks[i], toks[:i] + toks[i + 1:], max_n) for i in range(len(toks))) / len(toks)


def vendi_score(emb: torch.Tensor):
    """exp(entropy of the eigenvalues of K / n), K = cosine similarities of the rows of
    emb (unit diagonal): the effective number of distinct samples (Friedman & Dieng 2023)."""
    x = F.normalize(emb.double(), dim=-1)
    lam = torch.linalg.eigvalsh(x @ x.T / x.size(0)).clamp_min(0)
    lam = lam[lam > 1e-12]
    return math.exp(-(lam * lam.log()).sum().item())
