"""toy/bimodal_head.py: a smoke test on a tiny setting, and tests of its scoring that
could fail (the truth must be scored as covering every mode with the right masses; a
single point at the mean must be scored as covering none)."""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "toy"))
import bimodal_head as bh  # noqa: E402


def tiny_args(tmp_path, *extra):
    return ["--dims", "2,8", "--modes", "synthetic", "--seeds", "2", "--steps", "5", "--width", "16",
            "--n_ctx", "3", "--n_train", "8", "--n_eval", "16", "--out", str(tmp_path), *extra]


def test_smoke_writes_json_and_figure(tmp_path, capsys):
    bh.main(tiny_args(tmp_path, "--full", "--sweep_widths", "16", "--sweep_steps", "3",
                      "--sweep_scales", "unit,std"))
    out = capsys.readouterr().out
    assert "| 8 | gaussian |" in out and "energy dist / D" in out
    saved = json.loads((tmp_path / "bimodal_head.json").read_text())["full"]
    heads = {(s["d"], s["head"]) for s in saved["summary"]}
    assert heads == {(d, h) for d in (2, 8) for h in ("truth",) + bh.HEADS}
    assert len(saved["sweep"]) == 2 and (tmp_path / "bimodal_head_full.png").stat().st_size > 10_000


def test_modes_are_unit_and_at_the_requested_cosine():
    g = torch.Generator().manual_seed(0)
    for d in (2, 16):
        m = bh.synthetic_modes(5, 3, d, 0.3, g)
        assert torch.allclose(m.norm(dim=-1), torch.ones(5, 3), atol=1e-5)
        assert torch.allclose((m[:, 0] * m[:, 1]).sum(-1), torch.full((5,), 0.3), atol=1e-5)
    assert (bh.mode_gap(bh.synthetic_modes(5, 3, 2, 0.3, g)) > 0.5).all()  # 2-D: modes 2, 3 mirrored


def test_score_truth_covers_and_the_mean_does_not():
    a = bh.parse_args(["--modes", "synthetic", "--n_ctx", "4"])
    task = bh.make_task(16, a, seed=0)
    g = torch.Generator().manual_seed(1)
    ctx = torch.arange(4).repeat_interleave(400)
    truth, _ = bh.draw_targets(task, ctx, g)
    s = bh.score(task, truth, ctx, a, g)
    assert s["covered"] == 1.0 and s["none"] == 0.0
    assert abs(s["mass0"] - 0.7) < 0.06 and abs(s["mass1"] - 0.3) < 0.06 and abs(s["ed"]) < 0.02
    mean = (task["weights"][None, :, None] * task["modes"]).sum(1)[ctx]  # E[z1 | h]: what mse learns
    s = bh.score(task, mean, ctx, a, g)
    assert s["covered"] == 0.0 and s["none"] == 1.0 and s["ed"] > 0.3
