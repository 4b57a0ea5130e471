"""toy/persona.py: the task's parser and legal set, the exact tempered probabilities against
sfr.generate's own sampling, and a smoke run of the whole script on a tiny grid."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "toy"))
import persona  # noqa: E402
import sfr  # noqa: E402
import sfr_gpt  # noqa: E402  (the built-in GPT)
import train  # noqa: E402


def test_task_legal_set_parses_back_and_probs_rotate():
    task = persona.PersonaTask(n_personas=3, n_modes=4, n_queries=2, prefix_len=2)
    assert len(task.legal) == 2 * 4 * 3  # queries x modes x styles
    for q in range(2):
        for m in range(4):
            for j in range(3):
                text = task.response(j, q, m)
                assert task.parse(q, text) == (m, j)
                assert task.parse(q, f"{task.annotation(m)} {text}") == (m, j)  # anchor strips its annotation
                assert task.parse(1 - q, text) is None  # the other query's prefix
                assert task.parse(q, text + " arr") is None
    assert torch.allclose(torch.tensor(task.probs.sum(1)), torch.ones(3, dtype=torch.float64))
    assert task.probs[0].tolist() == pytest.approx([0.4, 0.3, 0.2, 0.1])
    assert task.probs[1].tolist() == pytest.approx([0.1, 0.4, 0.3, 0.2])  # rotated by persona


@pytest.mark.parametrize("T", [0.6, 1.5])
def test_exact_tempered_probabilities_match_sfr_generate(T):
    """Every response of up to 2 tokens (+ eos) over a 4-token vocabulary: the exact
    probability must match how often sfr.generate samples it at temperature T."""
    torch.manual_seed(0)
    tok = train.Tokenizer("word", ["a", "b"])  # ids: pad 0, eos 1, a 2, b 3
    gpt = sfr_gpt.GPT(sfr.Config(n_layer=1, n_embd=16, n_head=2, block_size=8), tok.vocab_size).eval()
    with torch.no_grad():
        gpt.wte.weight.mul_(3.0)  # tied to lm_head: uneven next-token probabilities, eos often early
    prompt = [2]
    non_eos = [0, 2, 3]
    responses = [[]] + [[x] for x in non_eos] + [[x, y] for x in non_eos for y in non_eos]
    exact = persona.tempered_logprobs(gpt, [prompt] * len(responses), responses, tok.eos_id, [T])[:, 0].exp()
    n = 20000
    out = sfr.generate(gpt, torch.tensor([prompt] * n), 3, temperature=T, eos_id=tok.eos_id,
                       generator=torch.Generator().manual_seed(1))[:, 1:].tolist()
    for r, p in zip(responses, exact.tolist()):
        k = len(r)
        freq = sum(row[:k + 1] == r + [tok.eos_id] for row in out) / n
        assert abs(freq - p) < 4 * math.sqrt(p * (1 - p) / n) + 2e-3, (r, freq, p)
    assert 0.2 < exact.sum() <= 1.0 + 1e-6  # the rest is mass on longer responses


def test_script_smoke(tmp_path, encoder):
    out = tmp_path / "persona.json"
    res = persona.main(["--methods", "sft,sfr,anchor", "--seeds", "2", "--steps", "3", "--personas", "2",
                        "--modes", "2", "--queries", "2", "--n_per_persona", "4", "--n_eval", "8",
                        "--temps", "0.5,1.0", "--n_samples", "2", "--out", str(out)], encoder=encoder)
    saved = json.loads(out.read_text())
    assert (tmp_path / "persona.png").stat().st_size > 10_000
    assert saved["meta"]["same_backbone_init"] is True
    assert len(saved["cells"]) == 3 * 2 * 2  # methods x seeds x temperatures: every cell reported
    for c in saved["cells"]:
        for k in ("well_formed", "fidelity", "coverage", "coverage_sampled", "distinct2"):
            assert 0.0 <= c[k] <= 1.0 + 1e-9, (k, c[k])
        assert c["kl_mode"] >= -1e-9 and c["entropy_ratio"] >= 0 and c["vendi"] >= 1 - 1e-6
    mech = {(m["method"], m["seed"]): m for m in saved["mechanism"]}
    assert mech["sft", 0]["shuffle_gap"] is None and mech["sft", 0]["aux_grad_share"] == 0.0
    assert mech["sfr", 0]["shuffle_gap"] is not None and 0 < mech["sfr", 0]["aux_grad_share"] < 1
    assert mech["sfr", 0]["aux_grad_share"] == pytest.approx(mech["sfr", 0]["aux_grad_share_sfr"])
    assert set(res["paired"]["sfr - sft"]["1.0"]) == set(persona.EXACT + persona.SAMPLED)
    assert "sfr - null" not in res["paired"]  # no null control in this grid


@pytest.mark.parametrize("argv, says", [(["--seeds=-1"], "--seeds=-1"), (["--temps=abc"], "--temps='abc'"),
                                        (["--temps=1,nan"], "finite"), (["--n_samples=0"], "--n_samples=0"),
                                        (["--methods=sft,flw"], "unknown methods")])
def test_bad_arguments_stop_before_any_work(argv, says, capsys):
    with pytest.raises(SystemExit) as e:
        persona.parse_args(argv)
    assert e.value.code == 2 and says in capsys.readouterr().err
