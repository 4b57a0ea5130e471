"""reproduce_mbpp.py run --chat and the method 'base': an instruct model's prompts as the user turn
of its chat template, and the model evaluated as it is, beside the fine-tuned ones.

On a tiny random Llama with a word-level tokenizer (sfr_hf.tiny_llama_folder) given a simple
chat template: nothing is downloaded, each test runs in seconds."""
import json

import pytest
import torch

import reproduce_mbpp as R
import sfr
import train
import sfr_hf

TEMPLATE = ("{% for m in messages %}<|user|> {{ m['content'] }} <|end|> {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|> {% endif %}")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def records(mbpp_path):
    return R.load_mbpp(mbpp_path)


def _tiny(path, records, template):
    """A tiny Llama whose word-level vocabulary covers the prompts and responses of `records`
    (and the template's markers); with `template` as its tokenizer's chat template."""
    from transformers import AutoTokenizer
    texts = [R.format_prompt(r) + " " + R.format_response(r) for r in records] + ["<|user|> <|end|> <|assistant|>"]
    sfr_hf.tiny_llama_folder(path, texts, d=16, n_layer=1)
    if template:
        tok = AutoTokenizer.from_pretrained(path)
        tok.chat_template = template
        tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_chat(records, tmp_path_factory):
    splits = R.split_mbpp(records)
    # what --smoke touches: 8 train problems, 4 validation, the first 2 test problems
    used = splits["train"][:8] + splits["validation"][:4] + splits["test"][:2]
    return _tiny(tmp_path_factory.mktemp("tiny") / "chat", used, TEMPLATE), used


def test_prompt_of_is_the_user_turn_of_the_template(tiny_chat, records):
    folder, _ = tiny_chat
    tok = sfr_hf.HFTokenizer(str(folder))
    rec = records[10]
    assert R.prompt_of(rec, tok) == R.format_prompt(rec)  # chat off: the plain prompt
    assert R.has_chat_template(tok) and not R.has_chat_template(train.Tokenizer("byte"))
    chat = R.prompt_of(rec, tok, chat=True)
    assert chat == f"<|user|> {R.format_prompt(rec)} <|end|> <|assistant|> "
    pairs, dropped = R._pairs([rec], tok, 1024, chat=True)
    assert pairs == [(chat, R.format_response(rec))] and dropped == 0


def test_reference_loss_with_chat_scores_the_response_after_the_chat_prompt(tiny_chat, records):
    from transformers import AutoModelForCausalLM
    folder, used = tiny_chat
    tok, model = sfr_hf.HFTokenizer(str(folder)), AutoModelForCausalLM.from_pretrained(folder).eval()
    rec = used[-1]
    p, r = tok.encode(R.prompt_of(rec, tok, chat=True)), tok.encode(R.format_response(rec))
    with torch.no_grad():
        logits = model(torch.tensor([p + r[:-1]])).logits[0, len(p) - 1:]
    want = torch.nn.functional.cross_entropy(logits, torch.tensor(r), reduction="sum").item()
    got, plain = R.reference_loss(model, tok, rec, 1024, chat=True), R.reference_loss(model, tok, rec, 1024)
    assert got["tokens"] == len(r) and got["nats"] == pytest.approx(want, rel=1e-5)
    assert plain["tokens"] == len(r) and plain["nats"] != pytest.approx(want, rel=1e-5)  # the prompt matters


def _run(mbpp_path, tmp, *extra):
    argv = ["run", "--mbpp", str(mbpp_path), "--smoke", "--threads", "1", "--no_progress", "--workers", "2",
            "--n", "2", "--max_new_tokens", "8", "--set", "block_size=128",
            "--out", str(tmp / "out"), "--cache_dir", str(tmp / "cache"), "--report", str(tmp / "report"), *extra]
    return R.main(argv)


def test_base_and_chat_end_to_end(tiny_chat, mbpp_path, tmp_path, monkeypatch):
    """base is not trained and keeps the folder's weights; none is trained on chat prompts;
    both are sampled with the same seeds and reported in one document, with the prompt format."""
    from transformers import AutoModelForCausalLM
    folder, used = tiny_chat
    trained, prepared, seeds = [], [], {}
    real_train, real_prepare, real_sample = sfr.train, sfr.prepare, R.sample_hf
    monkeypatch.setattr(sfr, "train", lambda cfg, *a, **k: trained.append(cfg.out_dir) or real_train(cfg, *a, **k))
    monkeypatch.setattr(sfr, "prepare", lambda pairs, *a, **k: prepared.extend(pairs) or real_prepare(pairs, *a, **k))

    def sample(model, prompts, n, new, temp, eos, pad, seed):
        seeds.setdefault(id(model), []).append((seed, prompts))
        return real_sample(model, prompts, n, new, temp, eos, pad, seed)
    monkeypatch.setattr(R, "sample_hf", sample)
    # full fine-tuning at a large step, so that two steps move the weights measurably
    assert _run(mbpp_path, tmp_path, "--model", str(folder), "--methods", "base,none", "--set", "lr=0.01",
                "--set", "lr_warmup=0") == 0
    doc = json.loads((tmp_path / "report.json").read_text())
    assert list(doc["methods"]) == ["base", "none"] and doc["baseline"] == "none"
    assert doc["prompt"]["chat"] is True and doc["prompt"]["chat_source"].startswith("auto")
    assert doc["prompt"]["example"].startswith("<|user|> You are an expert Python programmer")
    assert [p for p in trained] == [str(tmp_path / "out" / "none")]  # base is not trained
    assert prepared and all(p.startswith("<|user|> ") and p.endswith("<|assistant|> ") for p, _ in prepared)
    assert not (tmp_path / "out" / "base" / "export").exists()
    base, none = doc["methods"]["base"], doc["methods"]["none"]
    assert base["trained"] is False and base["config"] is None and base["train"]["seconds"] == 0
    assert none["trained"] is True and none["config"]["aux"] == "none"
    # common random numbers: the same seed and prompts for both methods
    assert len(seeds) == 2 and len(set(map(str, seeds.values()))) == 1
    tok, model = sfr_hf.HFTokenizer(str(folder)), AutoModelForCausalLM.from_pretrained(folder).eval()
    test = used[-2:]
    assert [int(t) for t in base["problems"]] == [r["task_id"] for r in test]
    for rec in test:  # base's reference loss is the untouched folder's, with the chat prompt
        want = R.reference_loss(model, tok, rec, 128, chat=True)["nats"]
        assert base["problems"][str(rec["task_id"])]["reference_loss"]["nats"] == pytest.approx(want, rel=1e-5)
        assert none["problems"][str(rec["task_id"])]["reference_loss"]["nats"] != pytest.approx(want, rel=1e-5)
    assert base["reference_loss"]["vs_baseline"]["problems"] == 2
    md = (tmp_path / "report.md").read_text()
    assert "| base | 0.8 |" in md and "chat template" in md and "'base' is those weights as they are" in md


def test_chat_off_keeps_plain_prompts(tiny_chat, mbpp_path, tmp_path, monkeypatch):
    folder, _ = tiny_chat
    prepared = []
    real_prepare = sfr.prepare
    monkeypatch.setattr(sfr, "prepare", lambda pairs, *a, **k: prepared.extend(pairs) or real_prepare(pairs, *a, **k))
    assert _run(mbpp_path, tmp_path, "--model", str(folder), "--methods", "none", "--chat", "off", "--steps", "1") == 0
    doc = json.loads((tmp_path / "report.json").read_text())
    assert doc["prompt"]["chat"] is False and doc["prompt"]["chat_source"] == "--chat off"
    assert prepared and all(p.startswith("You are an expert Python programmer") for p, _ in prepared)
    # a resume with the other prompt format is another run: refused, not mixed into these stores
    assert _run(mbpp_path, tmp_path, "--model", str(folder), "--methods", "none", "--chat", "on", "--steps", "1") == 2


@pytest.mark.parametrize("extra, words", [
    (["--chat", "on"], "--chat on: the built-in model has no tokenizer chat template"),
    (["--methods", "base,none"], "'base' (no fine-tuning) needs --model"),
    (["--methods", "none,none"], "a method is named twice"),
])
def test_bad_chat_or_base_is_one_line(mbpp_path, tmp_path, capsys, extra, words):
    assert _run(mbpp_path, tmp_path, *extra) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("note: ")]
    assert len(err) == 1 and words in err[0], err
