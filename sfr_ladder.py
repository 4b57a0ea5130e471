"""sfr_ladder.py: the ladder from multi-token prediction to SFR, one restriction at a time.

Paper, App. A: multi-token prediction (MTP, Gloeckle et al. 2024) is SFR with four
restrictions and one change of divergence; here each one is a field of train.RunConfig that
can be lifted on its own (the first value is the MTP end):
  ladder_source      'point' mass at pi                 -> 'gaussian' N(0, I)
  ladder_field       'constant' v = E_q[x1] - E[x0]     -> 'flow' v(z_tau, tau, h), SFR's FlowHead
  ladder_target      'onehot' e(y[t+k]), k = 2..K       -> 'embedding' (the sentence encoder's)
  ladder_path        'straight'                         -> 'kl' (KL geodesic, one-hot targets only)
  ladder_divergence  'kl' D(pi + u, pi + v), D = KL     -> 'sq' mean over dims of (v - u)^2
Every rung is one straight line in its own coordinates (the simplex, the logits for the KL
geodesic, or the embedding): z_tau = tau x1 + (1 - tau) x0, u = x1 - x0. With every value at
the MTP end aux='ladder' is aux='mtp'; with every value at the SFR end it is aux='sfr'.

Importing this module registers aux='ladder' with sfr.py (sfr.AUX). Run:
    python sfr_ladder.py --aux=ladder --ladder_divergence=sq --steps=300
"""
import sys

import torch
import torch.nn.functional as F

import sfr
import train

LADDER = {"ladder_source": ("point", "gaussian"), "ladder_field": ("constant", "flow"),
          "ladder_target": ("onehot", "embedding"), "ladder_path": ("straight", "kl"),
          "ladder_divergence": ("kl", "sq")}  # first value: the MTP end


def validate(cfg):
    """Refuse ladder settings whose loss is undefined or whose task is trivial."""
    if not isinstance(cfg, train.RunConfig):  # the ladder_* fields are RunConfig's
        raise sfr.UsageError("Config.aux='ladder' reads train.RunConfig's ladder_* fields: "
                             "pass a train.RunConfig")
    for name, allowed in LADDER.items():
        if getattr(cfg, name) not in allowed:
            raise sfr.UsageError(f"Config.{name}={getattr(cfg, name)!r}: must be one of {allowed}")
    onehot = cfg.ladder_target == "onehot"
    if onehot and cfg.mtp_k < 2:
        raise sfr.UsageError(f"Config.mtp_k={cfg.mtp_k}: one-hot rungs predict tokens 2..K "
                             "beyond L_AR's, so K >= 2")
    if onehot and cfg.hidden_layer != -1:
        raise sfr.UsageError(f"Config.hidden_layer={cfg.hidden_layer}: MTP heads share the "
                             "unembedding, which reads the last hidden state; use -1")
    if cfg.ladder_source == "point" and cfg.ladder_field == "flow":
        raise sfr.UsageError("Config.ladder_field='flow' with ladder_source='point': z_tau = "
                             "(1 - tau) pi + tau x1 names the target for every tau > 0, so the "
                             "field could copy it; lift ladder_source='gaussian' first")
    if cfg.ladder_target == "embedding" and cfg.ladder_path == "kl":
        raise sfr.UsageError("Config.ladder_path='kl' with ladder_target='embedding': the KL "
                             "geodesic runs on the simplex and an embedding is not a "
                             "distribution; use ladder_path='straight'")
    off = [f"{n}={getattr(cfg, n)!r}" for n in list(LADDER)[:4] if getattr(cfg, n) != LADDER[n][0]]
    if cfg.ladder_divergence == "kl" and off:
        raise sfr.UsageError(f"Config.ladder_divergence='kl' with {', '.join(off)}: KL(pi + u || "
                             "pi + v) needs both endpoints on the simplex, which only the point "
                             "source, constant field, one-hot target and straight path give; "
                             "take the Brier rung first (ladder_divergence='sq')")


def needs_encoder(cfg):
    return cfg.ladder_target == "embedding"


def modules(cfg, backbone, d_z):
    """The trainable aux modules: (MTPHeads or None, FlowHead or None). A flow field on one-hot
    targets reads the state of copies 2..K of the simplex, (K - 1) V dims."""
    onehot = cfg.ladder_target == "onehot"
    constant = onehot and cfg.ladder_field == "constant"
    mtp = sfr.MTPHeads(backbone.d_h, cfg.mtp_k) if constant else None
    d_state = (cfg.mtp_k - 1) * backbone.get_output_embeddings().weight.size(0) if onehot else d_z
    use_head = cfg.ladder_field == "flow" or not onehot
    return mtp, (sfr.flow_head(cfg, d_state, backbone.d_h) if use_head else None)


def ladder_token_loss(x1, x0, tau, field, divergence, log_r=None):
    """One rung's flow-matching loss per token and copy. x1, x0: (N, c, D) target and source in
    the path's coordinates; tau: (N,); field(z_tau, tau) -> v_pred (N, c, D); log_r: see
    sfr.induced_divergence. Returns (N, c)."""
    t = tau[:, None, None]
    z_tau = t * x1 + (1 - t) * x0  # the straight line in these coordinates (tau = 0 source, 1 data)
    u = x1 - x0
    return sfr.induced_divergence(u, field(z_tau, tau), x0, divergence, log_r)


def onehot_rung_loss(cfg, y, tau, pi, log_q=None, flow=None, z0=None):
    """A rung with one-hot targets y (N, c), per token and copy (N, c). pi: (V,) the point
    source; log_q: (N, c, V) the heads' log-distributions (constant field); flow(z_tau, tau) ->
    v_pred (flow field); z0: (N, c, V) draw of the Gaussian source. On the KL path (Sevriugov
    & Oseledets Sec. 3) the coordinates are logits, l1 = kl_beta e(y), a finite stand-in for
    the vertex, and l0 = log pi or z0."""
    x1 = F.one_hot(y, pi.numel()).to(pi.dtype)  # the one-hot target: vertices of the simplex
    pi = pi.expand_as(x1)
    if cfg.ladder_path == "kl":
        x1, pi = cfg.kl_beta * x1, pi.log()
    x0, mean_x0 = (pi, pi) if cfg.ladder_source == "point" else (z0, torch.zeros_like(pi))
    log_r = None
    if cfg.ladder_field == "constant":  # v = E_q[x1] - E[x0], blind to (z_tau, tau)
        q = log_q.exp()
        v_pred = (q if cfg.ladder_path == "straight" else cfg.kl_beta * q) - mean_x0

        def flow(z_tau, tau):
            return v_pred
        log_r = log_q  # the KL rung's endpoint pi + v is q: its log straight from the logits
    return ladder_token_loss(x1, x0, tau, flow, cfg.ladder_divergence, log_r)


def segment_sum(model, h, batch, step, head, shuffle_h=False):
    """One-hot targets: the rung's loss summed over heads k = 2..K and valid positions, and
    its normaliser, the number of next-token positions (as aux='mtp')."""
    cfg, T = model.cfg, h.size(1)
    # (B, T, c): heads 2..K, since head 1 is L_AR itself
    y, valid = (t[..., 1:] for t in sfr.future_tokens(batch, cfg.mtp_k))
    unembed = model.backbone.get_output_embeddings()
    V, c = unembed.weight.size(0), cfg.mtp_k - 1
    lengths = batch.resp.int().cumsum(1).argmax(1) + 1
    d = c * V if cfg.ladder_source == "gaussian" else 0
    tau, z0, _ = (t.to(h) for t in sfr.draw_noise(batch.ids, step, T, d, cfg.seed, lengths))
    sel = valid.any(-1)  # (B, T): positions with at least one target
    h_sel = model.head_input(h, sel, step, shuffle_h)  # (N, C)
    log_q = None
    if cfg.ladder_field == "constant":
        heads = model.mtp.heads(unembed)[1:]
        log_q = torch.stack([f(h_sel).log_softmax(-1) for f in heads], 1)  # (N, c, V)

    def flow(z_tau, tau):
        return head(z_tau.flatten(1), tau, h_sel).view_as(z_tau)
    pi = h.new_full((V,), 1.0 / V)  # uniform; App. A holds for any fixed pi
    loss = onehot_rung_loss(cfg, y[sel], tau[sel.nonzero()[:, 0]], pi, log_q, flow,
                            z0[sel].view(-1, c, V) if d else None)
    return (loss * valid[sel]).sum(), batch.resp.sum().float()


def token_loss(cfg, head, h, z1, tau, z0):
    """A rung with the sentence-encoder target, per token (N,). At the SFR end this is
    sfr.fm_token_loss term for term. The point source sits at the Gaussian's mean 0, and the
    constant field is the head read at z = 0, tau = 0: with a point source, the authors' 'mse'."""
    x1 = z1[:, None]  # (N, 1, d): one copy
    x0 = torch.zeros_like(x1) if cfg.ladder_source == "point" else z0[:, None]
    if cfg.ladder_field == "constant":
        v_pred = head(torch.zeros_like(z1), torch.zeros_like(tau), h)[:, None]  # E[x0] = 0

        def field(z_tau, tau):
            return v_pred
    else:
        def field(z_tau, tau):
            return head(z_tau[:, 0], tau, h)[:, None]
    return ladder_token_loss(x1, x0, tau, field, cfg.ladder_divergence)[:, 0]


def kl_path_posterior(log_p1, l_tau, tau, beta):
    """Exact P(x1 | l_tau, tau) on the KL path with a N(0, I) logit source and prior log p(x1)
    (V,): l_tau | x1 ~ N(tau beta e(x1), (1 - tau)^2 I), so by Bayes the posterior is
    softmax(log p(x1) + tau beta l_tau[x1] / (1 - tau)^2). l_tau: (N, V); tau: (N,)."""
    return (log_p1 + (tau * beta / (1 - tau) ** 2)[:, None] * l_tau).softmax(-1)


def kl_geodesic_velocity(q, l_tau, tau, beta):
    """Sevriugov & Oseledets, Prop. 3.2: on l_tau = (1 - tau) l0 + tau beta e(x1),
    u = (beta e(x1) - l_tau) / (1 - tau), so the marginal velocity E[u | l_tau] is
    (beta q - l_tau) / (1 - tau) with q = P(x1 | l_tau, tau), the minimiser of the denoiser's
    cross-entropy: likelihood training gives the exact velocity. q, l_tau: (N, V); tau: (N,)."""
    return (beta * q - l_tau) / (1 - tau)[:, None]


sfr.AUX["ladder"] = sys.modules[__name__]

if __name__ == "__main__":
    train.main(prog="sfr_ladder.py")
