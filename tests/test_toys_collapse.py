"""toy/collapse.py: the task and the regimes' splits, the exact group metrics against hand
computations and against sfr.generate's own sampling, flag validation, and a smoke run of the
whole script (pretraining, fine-tuning, every kind of method) on a tiny grid."""
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "toy"))
import collapse  # noqa: E402
import sfr  # noqa: E402
import train  # noqa: E402


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (and the machine is shared); restored afterwards,
    since collapse.main sets the process's thread count too."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def knobs(regime, **over):
    import argparse
    return argparse.Namespace(**{**collapse.REGIMES[regime], **over})


def test_task_long_span_parses_back_and_truth_entropy():
    task = collapse.CollapseTask(n_personas=3, n_modes=4, n_queries=2, span=20)  # beyond persona.py's 12
    assert len(task.response(0, 0, 0).split()) == 2 + 20 + 2 + 2
    for q in range(2):
        for m in range(4):
            for j in range(3):
                text = task.response(j, q, m)
                assert task.parse(q, text) == (m, j)
                assert task.parse(q, f"{task.annotation(m)} {text}") == (m, j)
                assert task.parse(1 - q, text) is None
    # p_0 = (0.4, 0.3, 0.2, 0.1): entropy by hand
    hand = -(0.4 * math.log(0.4) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))
    assert collapse.entropy(task.probs[0]) == pytest.approx(hand)
    assert task.probs[2].tolist() == pytest.approx([0.2, 0.1, 0.4, 0.3])  # rotated by persona


def test_plans_split_as_declared():
    pl = collapse.plan("heldout", knobs("heldout"))
    seen, held = set(pl["groups"]["seen"]), set(pl["groups"]["heldout"])
    assert not seen & held and len(seen | held) == 8 * 16
    assert all(sum(1 for (i, _) in seen if i == p) == 8 for p in range(8))  # a window of 8 queries each
    assert set(pl["ft"].values()) == {1}  # one response per prompt
    pl = collapse.plan("imbalance", knobs("imbalance", rare=3))
    assert sum(n for (i, _), n in pl["ft"].items() if i == 0) == 3
    assert all(n == 8 for (i, _), n in pl["ft"].items() if i > 0)
    pl = collapse.plan("pretrain", knobs("pretrain"))
    assert len(pl["pre"]) == 12 * 8 and set(pl["pre"].values()) == {8}
    assert {i for i, _ in pl["ft"]} == {0, 1, 2} and {q for _, q in pl["ft"]} == {0, 1}
    assert {i for i, _ in pl["groups"]["other"]} == set(range(3, 12))


def test_group_metrics_by_hand():
    task = collapse.CollapseTask(n_personas=2, n_modes=4, n_queries=1, span=0)
    mass = np.zeros((2, 1, 2, 4, 2))  # (P, Q, T, M, P)
    mass[0, 0, 0, :, 0] = task.probs[0]  # T index 0: exactly the truth, own style
    mass[0, 0, 1, 3, 1] = 0.5  # T index 1: half the mass on one mode in the other persona's style
    counts = np.zeros((2, 1, 4))
    counts[0, 0] = [2, 1, 1, 0]
    g = collapse.group_metrics(task, mass, [(0, 0)], counts)
    assert g["kl_mode"][0] == pytest.approx(0.0, abs=1e-12) and g["entropy_ratio"][0] == pytest.approx(1.0)
    assert g["fidelity"] == pytest.approx([1.0, 0.0]) and g["well_formed"] == pytest.approx([1.0, 0.5])
    assert g["entropy_ratio"][1] == pytest.approx(0.0) and g["top_mode"] == pytest.approx([0.4, 0.0])
    f = np.array([0.5, 0.25, 0.25])
    assert g["kl_data"][0] == pytest.approx(float((f * np.log(f / task.probs[0][:3])).sum()))
    ref = collapse.data_reference(task, [(0, 0)], counts)
    assert ref["kl_mode"] is None  # the data misses mode 3: KL to the truth is infinite
    assert ref["entropy_ratio"] == pytest.approx(collapse.entropy(f) / collapse.entropy(task.probs[0]))


def test_exact_mass_matches_sfr_generate(tmp_path, one_thread):
    """A briefly trained tiny model: the exact P(mode, style | prompt) must match how often
    sfr.generate samples each legal response at T = 1.3, and the any-topic mass how often it
    samples that mode and style about either topic."""
    task = collapse.CollapseTask(n_personas=2, n_modes=2, n_queries=2, span=1)
    tok = train.Tokenizer.from_texts(task.all_texts(), "word")
    data = collapse.make_data(task, {(0, 0): 6, (1, 0): 6, (1, 1): 6}, np.random.default_rng(0))
    cfg = train.RunConfig(aux="none", n_layer=1, n_embd=32, n_head=2, steps=100, lr=1e-2, eval_every=0, ckpt_every=0,
                     out_dir=str(tmp_path))
    model, _ = sfr.train(cfg, sfr.prepare(collapse.to_pairs(task, data, False), tok, cfg), tok, None,
                         log=lambda s: None)
    bb = model.backbone.eval()
    mass = collapse.exact_mass(task, bb, tok, [1.3])[0, 1, 0]  # (M, P) for persona 0, query 1 (untrained)
    mass_any = collapse.exact_mass(task, bb, tok, [1.3], any_topic=True, pairs=[(0, 1)])[0, 1, 0]
    assert 0.05 < mass_any.sum() <= 1 + 1e-9 and (mass_any >= mass - 1e-12).all()
    n = 4000
    idx = torch.tensor([tok.encode(task.prompt(0, 1))] * n)
    out = sfr.generate(bb, idx, 8, temperature=1.3, eos_id=tok.eos_id,
                       generator=torch.Generator().manual_seed(1))[:, idx.size(1):].tolist()
    freq, freq_any = np.zeros_like(mass), np.zeros_like(mass)
    for row in out:
        if tok.eos_id in row:
            text = tok.decode(row[:row.index(tok.eos_id)])
            for q, f in ((1, freq), (0, freq_any), (1, freq_any)):
                hit = task.parse(q, text)
                if hit is not None:
                    f[hit] += 1 / n
    tol = 4 * math.sqrt(0.25 / n) + 2e-3
    assert np.abs(freq - mass).max() < tol, (freq, mass)
    assert np.abs(freq_any - mass_any).max() < tol, (freq_any, mass_any)


@pytest.mark.parametrize("argv", [["--span", "-1"], ["--regime", "nope"], ["--methods", "sft,xyz"],
                                  ["--train_queries", "9", "--queries", "4"], ["--temps", "0,1"],
                                  ["--regime", "pretrain", "--ft_personas", "13"], ["--n_embd", "30"]])
def test_bad_flags_exit_2_before_work(argv, capsys):
    with pytest.raises(SystemExit) as e:
        collapse.parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("collapse.py: error:") and "\n" not in err


def test_script_smoke(tmp_path, encoder, one_thread):
    out = tmp_path / "collapse.json"
    res = collapse.main(["--regime", "pretrain", "--methods", "sft,sfr_ours,null_ours,mtp,anchor", "--seeds", "2",
                         "--s0", "3", "--steps", "3", "--pre_steps", "3", "--personas", "3", "--modes", "2",
                         "--queries", "3", "--ft_personas", "2", "--train_queries", "1", "--pre_per_pair", "2",
                         "--temps", "0.7,1.0", "--n_samples", "2", "--out", str(out)], encoder=encoder)
    saved = json.loads(out.read_text())
    assert (tmp_path / "collapse.png").stat().st_size > 10_000
    assert saved["meta"]["seeds"] == [3, 4]
    names = [r["method"] for r in saved["records"] if r["seed"] == 3]
    assert names == ["pretrained", "pretrained_anchor", "sft", "sfr_ours", "null_ours", "mtp", "anchor"]
    rec = {(r["method"], r["seed"]): r for r in saved["records"]}
    assert rec["sft", 3]["init"] == rec["sfr_ours", 3]["init"] == "pretrained"
    assert rec["sft", 3]["aux_grad_share"] == 0.0 and 0 < rec["sfr_ours", 3]["aux_grad_share"] < 1
    assert rec["mtp", 3]["aux_grad_share"] > 0 and rec["sfr_ours", 3]["shuffle_gap"] is not None
    for r in saved["records"]:
        for g in ("seen", "heldout", "other"):
            for k in ("well_formed", "fidelity", "top_mode"):
                assert all(0 <= v <= 1 + 1e-9 for v in r["groups"][g][k]), (k, r["groups"][g][k])
    assert set(rec["sft", 3]["groups_any_topic"]) == {"heldout"}
    S = res["regimes"]["pretrain"]
    assert {"sfr_ours - sft", "sfr_ours - null_ours", "sft - pretrained"} <= set(S["paired"])
    assert S["focus"] == "heldout" and "verdict:" in collapse.headline(res, "pretrain")


def test_add_to_merges_only_identical_reruns():
    def run(method, value, counts=(1, 2)):
        rec = {"regime": "heldout", "method": method, "seed": 0, "groups": {"heldout": {"entropy_ratio": [value]}}}
        meta = {"regimes": {"heldout": {"methods": [method]}}, "parts": [{"wall_s": 1.0}], "method_configs": {},
                "seeds": [0], "temps": [1.0]}
        return {"meta": meta, "records": [rec], "data": {"heldout": {"0": {"counts": list(counts)}}}}
    old = run("sft", 0.5)
    new = run("mtp", 0.7)
    new["records"].append(run("sft", 0.5)["records"][0])  # sft rerun: the same numbers
    merged = collapse.merge(old, new)
    assert merged["meta"]["regimes"]["heldout"]["methods"] == ["sft", "mtp"]
    assert len(merged["records"]) == 2 and merged["meta"]["wall_s"] == 2.0
    bad = run("mtp", 0.7)
    bad["records"].append(run("sft", 0.6)["records"][0])  # sft rerun disagrees: a different code path
    with pytest.raises(ValueError, match="differs"):
        collapse.merge(run("sft", 0.5), bad)
    with pytest.raises(ValueError, match="other training data"):
        collapse.merge(run("sft", 0.5), run("mtp", 0.7, counts=(2, 1)))


def test_add_to_accepts_a_saved_part_with_fewer_regimes(tmp_path):
    """A part that ran one regime is a valid --add_to target for a --full merge that adds others;
    a regime both have must still have the same knobs."""
    a = collapse.parse_args(["--full"])
    meta = {"seeds": a.seeds, "temps": a.temps, "model": {k: getattr(a, k) for k in collapse.MODEL_KEYS},
            "regimes": {"pretrain": {"knobs": a.knobs["pretrain"]}}}
    part = tmp_path / "part.json"
    part.write_text(json.dumps({"meta": meta}))
    collapse.parse_args(["--full", "--merge", str(part), "--add_to", str(part)])  # no error
    meta["regimes"]["pretrain"]["knobs"] = {**a.knobs["pretrain"], "steps": 1}
    part.write_text(json.dumps({"meta": meta}))
    with pytest.raises(SystemExit):
        collapse.parse_args(["--full", "--merge", str(part), "--add_to", str(part)])
