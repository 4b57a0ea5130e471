"""The training loop: crash and resume, multi-process training, divergence, atomic checkpoints.

Training runs as separate processes (tests/_train_worker.py) where a test must kill one or
launch several; targets come from a stand-in encoder there, so no process loads MiniLM.
"""
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sfr
import train
import sfr_dist

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "tests" / "_train_worker.py")
TINY = dict(n_layer=1, n_embd=32, n_head=2, head_width=32, batch_size=8, lr=1e-2, lr_warmup=2, seed=3)


def launch(cfg, *opts, torchrun=False, accelerate_fsdp=False):
    cmd = [sys.executable, WORKER, json.dumps(cfg), *opts]
    if torchrun:  # --standalone: a local rendezvous on a free port
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *cmd[1:]]
    if accelerate_fsdp:  # as a user would launch a model too big for one device
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--num_processes=2",
               "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", f"--main_process_port={free_port()}",
               *cmd[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group, so a hang can be killed whole


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def finish(proc, timeout):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"training did not finish in {timeout} s (a rank waiting on a collective?)")
    assert proc.returncode == 0, out
    return out


def load(path):
    return torch.load(path, weights_only=False)


def test_sigkill_then_resume_matches_an_uninterrupted_run_bit_for_bit(tmp_path):
    # dropout draws from the global RNG, gate / EMA / head warm-up / lambda ramp carry state
    # across steps, fm_positions draws the position subset: a resume must restore all of it
    cfg = dict(TINY, steps=12, ckpt_every=1, eval_every=4, dropout=0.1, ema=0.9, gate=1.5, head_warmup=3,
               fm_positions=4, lam_schedule="ramp", lam_ramp=6)
    whole = launch(dict(cfg, out_dir=str(tmp_path / "whole")))
    ckpt = tmp_path / "killed" / "ckpt.pt"
    killed = launch(dict(cfg, out_dir=str(ckpt.parent)), "--slow=0.3")
    deadline = time.time() + 60
    while not (ckpt.exists() and load(ckpt)["step"] >= 4):
        assert killed.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    assert killed.returncode == -signal.SIGKILL
    at = load(ckpt)["step"]
    assert 4 <= at < cfg["steps"]
    out = finish(launch(dict(cfg, out_dir=str(ckpt.parent), resume=True)), 60)
    assert f"resumed from {ckpt} at step {at}" in out
    finish(whole, 60)

    a, b = load(tmp_path / "whole" / "ckpt.pt"), load(ckpt)
    assert a["step"] == b["step"] == cfg["steps"]
    assert a["history"] == b["history"]  # every loss term, lambda and gradient norm, exactly
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after resume"
    assert a["gate_avg"] == b["gate_avg"]


def test_authors_recipe_resumes_bit_for_bit(tmp_path):
    """recipe='authors' carries more state across steps (the gate's (mean, last loss), the EMA
    teacher, the frozen warm-up): 3 steps, then a resume to 6, equal 6 in one go."""
    sys.path.insert(0, str(ROOT / "tests"))
    from _train_worker import demo_data
    cfg = dict(TINY, recipe="authors", segment_len=4, stride=2, min_suffix=2, head_width=32, lr_schedule="constant",
               head_warmup=2, lam_ramp=2, gate_decay=0.5, steps=6, ckpt_every=0, eval_every=0)
    quiet = dict(log=lambda s: None, run=train.RunOnDisk(progress=False))
    whole = train.RunConfig(**cfg, out_dir=str(tmp_path / "whole"))
    examples, tok = demo_data(whole)
    _, h1 = sfr.train(whole, examples, tok, **quiet)
    sfr.train(train.RunConfig(**{**cfg, "steps": 3}, out_dir=str(tmp_path / "part")), examples, tok, **quiet)
    _, h2 = sfr.train(train.RunConfig(**cfg, out_dir=str(tmp_path / "part"), resume=True), examples, tok, **quiet)
    assert h1 == h2
    a, b = load(tmp_path / "whole" / "ckpt.pt"), load(tmp_path / "part" / "ckpt.pt")
    assert a["gate_avg"] == b["gate_avg"] and isinstance(a["gate_avg"], tuple)
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part


def one_process(cfg, out_dir, eval_set=False):
    """The reference for a 2-process run launched with --no-target-rank=1: the model as
    train() initialises it, holding the gradients of step 0's global batch, that step's loss
    terms, and the history of sfr.train in one process. Also (examples, tok, Config)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from _train_worker import demo_data
    one_cfg = train.RunConfig(**cfg, out_dir=str(out_dir))
    examples, tok = demo_data(one_cfg, no_target_rank=1)
    rank1 = sfr.batch_ids(0, len(examples), cfg["batch_size"], cfg["seed"], 1, 2).tolist()
    assert not any(examples[i].valid.any() for i in rank1)
    torch.manual_seed(cfg["seed"])  # the init train() makes
    model = sfr.SFRModel(one_cfg, sfr.build_backbone(one_cfg, tok.vocab_size), 384)
    ids = sfr.batch_ids(0, len(examples), cfg["batch_size"], cfg["seed"])
    batch = sfr.collate([examples[i] for i in ids], ids, tok.pad_id, tok.eos_id, 384)
    loss, terms = sfr.total_loss(model(batch, 0), sfr.lam_at(one_cfg, 0))
    loss.backward()
    _, history = sfr.train(one_cfg, examples, tok, examples[:4] if eval_set else None, log=lambda s: None,
                           run=train.RunOnDisk(progress=False))
    return model, terms, history, (examples, tok, one_cfg)


def assert_same_grads(grads_path, model):
    """The gradients a 2-process run's --spy saved equal the one-process ones in model."""
    grads, params = load(grads_path), list(model.parameters())
    assert len(grads) == len(params)
    for g2, p in zip(grads, params):
        torch.testing.assert_close(g2, p.grad, rtol=1e-4, atol=1e-5 * p.grad.abs().max().item() + 1e-12)


def test_two_processes_match_one_process_and_a_rank_without_targets_does_not_hang(tmp_path):
    # At step 0, rank 1's half of the global batch has no valid target: it must still run the
    # flow head (a dummy forward) or DDP waits forever for the head's gradients on rank 0.
    cfg = dict(TINY, steps=2, grad_clip=0.0, eval_every=0, fm_positions=4)
    ddp = launch(dict(cfg, out_dir=str(tmp_path / "ddp")), "--spy", "--no-target-rank=1", torchrun=True)
    model, terms, history, _ = one_process(cfg, tmp_path / "one")

    finish(ddp, 120)
    two = load(tmp_path / "ddp" / "ckpt.pt")
    # float32 sums taken in another order (per rank, then all-reduced) differ by a few ulps
    # of the largest terms: ~1e-7 relative, x ~100 for sums over hundreds of terms
    for h1, h2 in zip(history, two["history"]):
        for k in ("ar", "aux", "grad_norm"):
            assert h2[k] == pytest.approx(h1[k], rel=1e-5), (h1["step"], k)
    assert history[0]["ar"] == pytest.approx(terms["ar"], rel=1e-6)
    assert_same_grads(tmp_path / "ddp" / "grads.pt", model)


def test_nan_loss_stops_naming_step_and_term_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "tests"))
    from _train_worker import demo_data
    cfg = train.RunConfig(**TINY, steps=8, ckpt_every=1, eval_every=0, out_dir=str(tmp_path))
    examples, tok = demo_data(cfg)
    calls, fm = [], sfr.fm_token_loss

    def poisoned(*args):  # the 4th step's flow loss is NaN
        calls.append(1)
        loss = fm(*args)
        return loss * float("nan") if len(calls) == 4 else loss
    monkeypatch.setattr(sfr, "fm_token_loss", poisoned)
    with pytest.raises(sfr.TrainingDiverged, match=r"step 4: loss term 'aux' is nan.*ckpt\.pt \(step 3\)"):
        sfr.train(cfg, examples, tok, log=lambda s: None, run=train.RunOnDisk(progress=False))
    ck = load(tmp_path / "ckpt.pt")
    assert ck["step"] == 3 and len(ck["history"]) == 3
    assert all(torch.isfinite(v).all() for v in ck["model"].values())


def test_a_crash_mid_write_leaves_the_previous_checkpoint(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    train.save_checkpoint(path, {"step": 1, "w": torch.ones(3)})

    class Crash:  # pickling it fails after the big tensor before it has been written
        def __reduce__(self):
            raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        train.save_checkpoint(path, {"step": 2, "w": torch.zeros(1 << 20), "crash": Crash()})
    assert os.path.getsize(path + ".tmp") > 0  # the write did start
    ck = load(path)
    assert ck["step"] == 1 and torch.equal(ck["w"], torch.ones(3))


def test_fsdp_under_accelerate_matches_one_process_and_its_checkpoint_resumes_in_one(tmp_path):
    # accelerate launch --use_fsdp: weights, gradients and optimiser state sharded over 2
    # processes. At step 0 rank 1 has no valid target: its flow head still runs (a dummy
    # forward), or FSDP's reduce-scatter of the head's gradient waits forever on rank 0.
    cfg = dict(TINY, n_layer=2, steps=2, eval_every=1, ema=0.9, fm_positions=4, lr_schedule="constant")
    fsdp = launch(dict(cfg, out_dir=str(tmp_path / "fsdp")), "--spy", "--no-target-rank=1", accelerate_fsdp=True)
    model, _, history, (examples, tok, one_cfg) = one_process(dict(cfg, steps=4), tmp_path / "one", eval_set=True)

    out = finish(fsdp, 180)
    assert "FSDP: sharded over 2 processes, 2 transformer blocks" in out
    two = load(tmp_path / "fsdp" / "ckpt.pt")
    assert len(two["history"]) == 2
    for h1, h2 in zip(history, two["history"]):  # eval and diagnostics too: they run on the sharded model
        assert h1.keys() == h2.keys()
        for k in h1:
            assert h2[k] == pytest.approx(h1[k], rel=1e-4, abs=1e-6), (h1["step"], k)
    assert_same_grads(tmp_path / "fsdp" / "grads.pt", model)

    # the checkpoint holds whole tensors keyed by name: one process takes the run over
    logs = []
    _, resumed = sfr.train(dataclasses.replace(one_cfg, out_dir=str(tmp_path / "fsdp"), resume=True), examples,
                           tok, examples[:4], log=logs.append, run=train.RunOnDisk(progress=False))
    assert any("resumed from" in line and "at step 2" in line for line in logs)
    assert [h["step"] for h in resumed] == [1, 2, 3, 4]
    for h1, h2 in zip(history[2:], resumed[2:]):
        for k in ("ar", "aux", "grad_norm", "eval_ar", "eval_aux"):
            assert h2[k] == pytest.approx(h1[k], rel=1e-4), (h1["step"], k)


@pytest.mark.parametrize("env, error", [
    ({"ACCELERATE_USE_FSDP": "true"}, None),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP"}, "FULL_SHARD"),
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, "--use_fsdp"),
])
def test_accelerate_launch_flags_turn_sharding_on_or_are_refused(monkeypatch, env, error):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    cfg = sfr.Config()
    if error is None:
        assert sfr_dist.setup(cfg).world == 1 and cfg.shard
    else:
        with pytest.raises(NotImplementedError, match=error):
            sfr_dist.setup(cfg)


def test_fsdp_holds_1_over_n_of_the_state_per_process(tmp_path):
    # toy/shard_memory.py at a tiny size: the same run under DDP and FSDP, 2 processes each
    out = tmp_path / "shard_memory.json"
    run = subprocess.run([sys.executable, str(ROOT / "toy" / "shard_memory.py"), "--n_layer=2", "--n_embd=64",
                          "--n_head=2", "--vocab=512", "--head_width=64", "--batch_size=4", "--seq_len=16", "--steps=2",
                          f"--json={out}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    res = json.loads(out.read_text())
    assert res["state_ratio"] == pytest.approx(0.5, abs=0.02)  # FSDP pads each tensor's rows to a multiple of N
    for k in ("ar", "aux"):
        assert res["loss_fsdp"][k] == pytest.approx(res["loss_ddp"][k], rel=1e-5)


def test_history_jsonl_of_a_resumed_run_equals_an_uninterrupted_ones(tmp_path):
    # the killed run wrote step 4's line after its last checkpoint (step 3): a resume that only
    # appended would write it twice
    sys.path.insert(0, str(ROOT / "tests"))
    from _train_worker import demo_data
    cfg = dict(TINY, steps=6, ckpt_every=3, eval_every=5)
    examples, tok = demo_data(train.RunConfig(**cfg))

    class Killed(Exception):
        pass

    def killer(line):  # the first log line comes at step 5, before its record is written
        raise Killed
    sfr.train(train.RunConfig(**cfg, out_dir=str(tmp_path / "whole")), examples, tok, log=lambda s: None, run=train.RunOnDisk(progress=False))
    with pytest.raises(Killed):
        sfr.train(train.RunConfig(**cfg, out_dir=str(tmp_path / "part")), examples, tok, log=killer, run=train.RunOnDisk(progress=False))
    part = (tmp_path / "part" / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in part] == [1, 2, 3, 4]
    sfr.train(train.RunConfig(**cfg, out_dir=str(tmp_path / "part"), resume=True), examples, tok, log=lambda s: None,
              run=train.RunOnDisk(progress=False))
    whole = (tmp_path / "whole" / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in whole] == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "part" / "history.jsonl").read_text().splitlines() == whole
    assert [json.loads(line) for line in whole] == load(tmp_path / "whole" / "ckpt.pt")["history"]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One 3-step `python train.py` run of SFR (the encoder loads), in process, with --progress=false:
    (out_dir, its output)."""
    import contextlib
    import io
    out_dir, buf = tmp_path_factory.mktemp("cli"), io.StringIO()
    argv = ["--aux=sfr", "--segment_len=4", "--steps=3", "--n_layer=1", "--n_embd=32", "--n_head=2", "--eval_every=0",
            f"--out_dir={out_dir}", "--progress=false"]
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        train.main(argv)
    return out_dir, buf.getvalue()


def test_cli_progress_false_writes_no_bar_redraws(cli_run):
    out = cli_run[1]
    assert "step     3 | ar" in out and "exported" in out  # the log lines are all still there
    assert "\r" not in out
    from transformers.utils import logging as hf_logging
    assert hf_logging.is_progress_bar_enabled()  # off for that run only


def test_grad_accum_gives_the_large_batch_update(tmp_path):
    # SFR on (aux='sfr', a random 4 positions per sequence): the flow noise and the positions
    # are drawn per sequence from (seed, step, example id), the same in any micro-batch
    sys.path.insert(0, str(ROOT / "tests"))
    from _train_worker import demo_data
    cfg = train.RunConfig(**TINY, grad_clip=0.0, out_dir=str(tmp_path))
    examples, tok = demo_data(cfg)
    ids = sfr.batch_ids(0, len(examples), cfg.batch_size, cfg.seed)
    batch = sfr.collate([examples[i] for i in ids], ids, tok.pad_id, tok.eos_id, 384)
    runs = []
    for accum in (1, 4):  # 4 micro-batches of 2 sequences, each with its own token counts
        c = dataclasses.replace(cfg, grad_accum=accum)
        torch.manual_seed(0)
        model = sfr.SFRModel(c, sfr.build_backbone(c, tok.vocab_size), 384)
        opt, sched = sfr.make_optimizer(c, model)
        terms, gnorm, _ = sfr.train_step(model, opt, sched, batch, 0, c)
        runs.append((terms, gnorm, list(model.parameters())))
    (terms1, gnorm1, params1), (terms4, gnorm4, params4) = runs
    assert terms4 == pytest.approx(terms1, rel=1e-6) and gnorm4 == pytest.approx(gnorm1, rel=1e-6)
    # the gradient AdamW steps on (its first step, lr g / (|g| + eps), would blow a float32
    # rounding difference in a component with |g| near eps up to a sizeable share of lr)
    for p1, p4 in zip(params1, params4):
        torch.testing.assert_close(p4.grad, p1.grad, rtol=1e-5, atol=1e-6 * p1.grad.abs().max().item())


def test_cli_plots_every_term_of_the_history_to_loss_png(cli_run):
    png = cli_run[0] / "loss.png"
    assert f"loss plot: {png}" in cli_run[1]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bf16_autocast_keeps_float32_weights_and_the_loss_close_to_float32s(tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    from _train_worker import demo_data
    cfg = train.RunConfig(**TINY, steps=2, eval_every=0, out_dir=str(tmp_path))
    examples, tok = demo_data(cfg)
    quiet = dict(log=lambda s: None, run=train.RunOnDisk(progress=False))
    m32, h32 = sfr.train(cfg, examples, tok, **quiet)
    m16, h16 = sfr.train(dataclasses.replace(cfg, dtype="bf16"), examples, tok, **quiet)
    assert all(p.dtype == torch.float32 for p in m16.parameters())  # AdamW's master weights
    adam = load(tmp_path / "ckpt.pt")["opt"]["state"]  # the bf16 run's
    assert all(v.dtype == torch.float32 for s in adam.values() for k, v in s.items() if k != "step")
    for r32, r16 in zip(h32, h16):
        for k in ("ar", "aux"):
            assert math.isfinite(r16[k]) and r16[k] == pytest.approx(r32[k], rel=2e-2), (r16["step"], k)
    assert h16[0]["ar"] != h32[0]["ar"]  # autocast did run in bf16 (the zero-init head's step-1 aux is exact)
