"""sfr_authors.py: recipe='authors', SFR as the authors' code runs it, where it departs from sfr.py.

WeAgentAI/SFR (train/fm/trainer.py, train/fm_head.py, template train/llama3_lora_fm.yaml) trains
SFR with choices sfr.py does not make by default. Each one is here, as its own switch, so a fork
can flip one at a time (README, "recipe=authors"); the code is ours, the behaviour theirs, and
tests/test_authors.py checks each against their code re-derived. Importing this module registers
them: sfr.RECIPES['authors'] (the preset) and sfr.AUTHORS (the code paths sfr.py calls when a
switch is on). sfr.py refuses a switch when this module is not imported. Switches that stay in
sfr.py, being part of its batches (positions='labels') or a line or two of its loop
(warmup_freeze, ema): those three; pooling='mean' is sfr_encoder.py's.
"""
import bisect
import math
import sys

import torch
import torch.nn.functional as F

import sfr

# their template's values (segment_len, stride, head, lambda, gate, EMA teacher; min_suffix is
# their code's default). segment_len / stride / min_suffix suit responses of hundreds of tokens:
# short-response data passes its own, e.g. the toys' segment_len=8, stride=1, min_suffix=1.
PRESET = dict(positions="labels", suffix_count="authors", fill="authors", pooling="mean",
              head_arch="authors", head_width=1024, head_layers=3, lam_phases="authors", lam=1.0,
              lam_schedule="constant", lam_ramp=0, warmup_freeze=True, gate=1.5,
              gate_on="previous", gate_mode="dynamic", gate_decay=0.99, ema=0.999,
              ema_teacher=True, fm_positions=0, target_scale="unit", hidden_layer=-1,
              segment_len=256, stride=32, min_suffix=16)


def timestep_embedding(tau, dim):
    """Their TimestepEmbedding's sinusoid: raw tau (not 1000 tau), [sin, cos], frequencies
    10000^(-i / (half - 1)), zero-padded to an odd dim. (N,) -> (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=tau.device) / max(half - 1, 1))
    args = tau[:, None].float() * freqs[None]
    return F.pad(torch.cat([torch.sin(args), torch.cos(args)], dim=-1), (0, dim % 2))


class FlowHead(sfr.FlowHead):
    """head_arch='authors': the layout of their FlowMatchingHead. A time embedding d_z wide (their
    sinusoid, then Linear-SiLU-Linear) and max(n_layers - 2, 0) residual blocks (sfr.FlowHead:
    n_layers - 1). The same module names as sfr.FlowHead (temb, inp, blocks, out), other shapes."""
    embed_time = staticmethod(timestep_embedding)

    def __init__(self, d_z, d_h, width=1024, n_layers=3):
        super().__init__(d_z, d_h, width, max(n_layers - 1, 1), d_t=d_z)


def future_segments(N, segment_len, stride, min_suffix, positions="ar", suffix_count="authors",
                    fill="authors", blank=lambda a: False):
    """sfr.future_segments with their counting and their fill (either one may be ours).
    suffix_count: 'ours' counts the N - a response tokens left; 'authors' counts the label
    tokens in the window, eos included, min(segment_len, N - a + 1), and also skips a segment whose
    text is blank (blank(a): whitespace only). fill: 'mask' (ours) gives j its nearest anchor
    (ties to the earlier), None if that one was skipped; 'authors': at s = 1 a skipped position
    is None; at s > 1 j takes the nearest anchor that was not skipped, None if none was.
    sfr.attach_targets gives None positions z1 = 0 and, under fill='authors', counts them in
    L_FM, as their loss mask does."""
    n, off = (N, 0) if positions == "ar" else (N + 1, 1)

    def kept(j):
        a = j + off
        size = N - a if suffix_count == "ours" else min(segment_len, N - a + 1)
        return size >= min_suffix and not (suffix_count == "authors" and blank(a))
    if fill == "mask" or stride == 1:
        last = stride * ((n - 1) // stride)  # the last anchor inside
        anchors = (min(stride * round(j / stride - 1e-9), last) for j in range(n))
        return [a + off if kept(a) else None for a in anchors]
    good = [j for j in range(0, n, stride) if kept(j)]
    if not good:
        return [None] * n
    out = []
    for j in range(n):
        i = bisect.bisect_left(good, j)  # good[i - 1] < j <= good[i]
        out.append(min(good[max(0, i - 1):i + 1], key=lambda g: (abs(g - j), g)) + off)
    return out


def anchors(response, tok, cfg):
    """future_segments for one response under cfg; blank: the segment decodes to whitespace."""
    return future_segments(len(response), cfg.segment_len, cfg.stride, cfg.min_suffix,
                           cfg.positions, cfg.suffix_count, cfg.fill,
                           blank=lambda a: not tok.decode(response[a:a + cfg.segment_len]).strip())


def lam_at(cfg, step):
    """lam_phases='authors' (their _get_fm_loss_weight): full lambda during the head warm-up
    (phase A), then a ramp 0 -> lam over lam_ramp steps (B), then cfg.lam_schedule over the steps
    left (C)."""
    j = step - cfg.head_warmup  # steps of joint training
    if j < 0:
        return cfg.lam
    if j < cfg.lam_ramp:
        return cfg.lam * j / cfg.lam_ramp
    rest = cfg.steps - cfg.head_warmup - cfg.lam_ramp
    if cfg.lam_schedule in ("constant", "ramp") or rest <= 0:
        return cfg.lam
    return sfr.decayed(cfg, min(max((j - cfg.lam_ramp) / rest, 0.0), 1.0))


def gate(cfg, loss, state, scale):
    """Loss gating: (scale, state). Closes (scale 0: no L_FM gradient to the backbone) when L_FM
    is below its running mean / gate ('dynamic') or below gate ('static'). gate_on='current'
    reads this step's L_FM, the one whose gradient it cuts; 'previous' (their code decides before
    the forward) reads the last step's against a mean that already includes it, and never
    closes on the first step."""
    d = cfg.gate_decay

    def closes(x, mean):
        return x < cfg.gate if cfg.gate_mode == "static" else mean >= 1e-10 and x < mean / cfg.gate
    if cfg.gate_on == "current":
        state = loss if state is None else d * state + (1 - d) * loss
        return (0.0 if closes(loss, state) else scale), state
    if state is not None and closes(state[1], state[0]):
        scale = 0.0
    return scale, (loss if state is None else d * state[0] + (1 - d) * loss, loss)


def validate(cfg):
    """Config.validate's checks of the switches whose code is here."""
    if cfg.ema_teacher and not cfg.ema:
        raise sfr.UsageError("Config.ema_teacher=True needs the teacher's decay in Config.ema")
    if cfg.gate and cfg.gate <= 1.0 and cfg.gate_mode == "dynamic":
        raise sfr.UsageError(f"Config.gate={cfg.gate}: must be > 1 (authors: 1.5) or 0")


@torch.no_grad()
def teacher_blend(ema, head, decay):
    """ema_teacher: their _update_ema_teacher, which HF Trainer runs in training_step, after
    backward and before optimizer.step() (the Trainer's loop: training_step, then the gradient
    clip, then optimizer.step()): ema = d ema + (1 - d) head, then head = ema,
    so the optimiser moves the head one step away from the EMA each step. Skipped in the head
    warm-up; their first blend after it still uses the EMA of the initial head (its
    re-initialisation comes after the blend), which erases most of the warmed-up head.
    sfr.train_step runs it later than their Trainer, after the clip and the divergence check:
    the same step, since neither reads the weights, and a diverged step then changes none."""
    for pe, p in zip(ema.parameters(), head.parameters()):
        pe.mul_(decay).add_(p, alpha=1.0 - decay)
        p.copy_(pe)


sfr.RECIPES["authors"] = PRESET
sfr.AUTHORS.update(FlowHead=FlowHead, anchors=anchors, lam_at=lam_at, gate=gate,
                   teacher_blend=teacher_blend, validate=validate)

if __name__ == "__main__":
    sys.exit("sfr_authors.py registers recipe='authors' when imported (train.py imports it): "
             "python train.py --recipe=authors; python train.py --help lists every field")
