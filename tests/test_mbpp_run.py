"""reproduce_mbpp.py run: the per-method training, sampling and report (sections 3-7).

The end-to-end tests run `run --smoke` in-process on the real MBPP file, the real MiniLM
encoder and this interpreter's standard library; the HF tests on a tiny random GPT-2
saved to a temporary folder (no download)."""
import dataclasses
import json
import shutil

import pytest
import torch

import reproduce_mbpp as R
import sfr
import sfr_encoder
import sfr_gpt
import train
import sfr_ladder  # noqa: F401  (registers aux='ladder', which the ladder_* methods use)


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny models here are fastest on one thread (and `run --threads 1` sets it for the
    process); put back what the other test modules had."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(mbpp_path, tmp, *extra):
    """`run --smoke` into tmp/out, caches in tmp/cache; returns the report as a dict."""
    argv = ["run", "--mbpp", str(mbpp_path), "--smoke", "--threads", "1", "--no_progress", "--workers", "2",
            "--out", str(tmp / "out"), "--cache_dir", str(tmp / "cache"), "--report", str(tmp / "report"), *extra]
    assert R.main(argv) == 0
    return json.loads((tmp / "report.json").read_text())


@pytest.fixture(scope="module")
def smoke(mbpp_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smoke")
    return tmp, run(mbpp_path, tmp)


# ----------------------------------------------------------------------------- sampling


def tiny_gpt(seed=0, block_size=64):
    torch.manual_seed(seed)
    cfg = train.RunConfig(n_layer=2, n_head=2, n_embd=16, block_size=block_size, tokenizer="byte")
    return sfr_gpt.GPT(cfg, 258).eval()


def test_sample_gpt_refuses_to_run_past_block_size():
    with pytest.raises(ValueError, match="block_size"):
        R.sample_gpt(tiny_gpt(block_size=32), [3] * 20, 2, 13, 1.0, 1)


# ----------------------------------------------------------------------------- pieces


def test_every_method_is_a_valid_config():
    for name, overrides in R.METHODS.items():
        train.RunConfig(**{**R.BUILTIN, **overrides}).validate()
    assert {"none", "mtp", "sfr"} <= set(R.METHODS)


def test_sfr_method_is_the_authors_recipe_on_top_of_the_base_config():
    # the base config names every field, so recipe='authors' alone would change nothing:
    # method_overrides writes the preset out, all but the run's own k / stride / min_suffix
    base = train.RunConfig(**R.BUILTIN)
    cfg = train.RunConfig(**{**dataclasses.asdict(base), **R.method_overrides("sfr")})
    for field, value in sfr.RECIPES["authors"].items():
        expected = getattr(base, field) if field in R.DATA_FIELDS else value
        assert getattr(cfg, field) == expected, field
    assert cfg.ema_teacher and cfg.head_arch == "authors" and cfg.head_width == 1024 and cfg.segment_len == R.BUILTIN["segment_len"]
    ours = train.RunConfig(**{**dataclasses.asdict(base), **R.method_overrides("sfr_ours")})
    assert not ours.ema_teacher and ours.head_width == R.BUILTIN["head_width"]


def test_stdlib_corpus_leaves_out_tests_and_packages():
    files = R.stdlib_sources()
    assert len(files) > 200 and all(f.suffix == ".py" for f in files)
    assert not [f for f in files if set(f.parts) & R._SKIP_DIRS]
    assert any(f.name == "argparse.py" for f in files)


def test_pretrain_is_cached_by_config(tmp_path):
    cfg = train.RunConfig(**{**R.BUILTIN, **R.PRETRAIN, **R.SMOKE, "steps": 1})
    path, rec = R.pretrain(cfg, tmp_path, log=lambda *a: None, progress=False)
    again, rec2 = R.pretrain(cfg, tmp_path, log=lambda *a: None, progress=False)
    other, rec3 = R.pretrain(train.RunConfig(**{**R.BUILTIN, **R.PRETRAIN, **R.SMOKE, "steps": 1, "seed": 1}),
                             tmp_path, log=lambda *a: None, progress=False)
    assert (rec["cached"], rec2["cached"], rec3["cached"]) == (False, True, False)
    assert again == path != other
    state = torch.load(path)
    assert set(state) == set(sfr_gpt.GPT(cfg, 258).state_dict())


def test_entry_point_and_sample_stats(mbpp_path):
    records = R.load_mbpp(mbpp_path)
    assert R.entry_point(records[911]) == "lobb_num"  # int(lobb_num(5, 3)): not the builtin
    refs = [R.sample_stats([r["code"]], R.entry_point(r))["defines_entry_point"] for r in records]
    assert sum(refs) == len(records)
    stats = R.sample_stats(["", "def f(:", "def g(x): return x", "def f(x): return x"], "f")
    assert stats["parses_nonempty"] == 0.5 and stats["defines_entry_point"] == 0.25
    assert stats["distinct_samples"] == 4


def test_reference_loss_counts_the_response_only():
    gpt, tok = tiny_gpt(block_size=512), train.Tokenizer("byte")
    rec = {"text": "Add.", "test_list": ["assert add(1, 2) == 3"], "code": "def add(a, b):\n    return a + b"}
    got = R.reference_loss(gpt, tok, rec, 512)
    p, r = tok.encode(R.format_prompt(rec)), tok.encode(R.format_response(rec))
    with torch.no_grad():
        logits, _ = gpt(torch.tensor([p + r[:-1]]))
    want = torch.nn.functional.cross_entropy(logits[0, len(p) - 1:], torch.tensor(r), reduction="sum")
    assert got["tokens"] == got["bytes"] == len(r) and not got["truncated"]
    assert got["nats"] == pytest.approx(want.item(), rel=1e-5)


# ----------------------------------------------------------------------------- end to end


def test_smoke_end_to_end(smoke):
    tmp, doc = smoke
    assert list(doc["methods"]) == ["none", "mtp", "sfr"]
    ids = doc["data"]["test_task_ids"]
    assert ids == [11, 12]
    for name, m in doc["methods"].items():
        t = m["temperatures"]["0.8"]
        assert t["problems"] == 2 and 0 <= t["pass@1"] <= 1 and 1 <= t["vendi"] <= 5
        assert m["reference_loss"]["nats_per_token"] > 0
        for tid in ids:
            prob = m["problems"][str(tid)]["T=0.8"]
            assert prob["n"] == len(prob["outcomes"]) == 5
        assert (tmp / "out" / name / "export" / "DONE").exists()
    assert doc["methods"]["mtp"]["config"]["aux"] == "mtp" and doc["methods"]["sfr"]["config"]["aux"] == "sfr"
    for key in ("command", "hardware", "versions", "wall_seconds", "seed", "pretrain"):
        assert doc[key] is not None
    assert (tmp / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert "| sfr | 0.8 |" in (tmp / "report.md").read_text()


def test_smoke_methods_share_init_and_data_but_not_training(smoke):
    """Same pretrained start, same first batch: the first step's L_AR is the same for every
    method (the aux heads start at zero); after training, the weights differ by method."""
    tmp, doc = smoke
    first = {n: json.loads((tmp / "out" / n / "train.json").read_text())["history"][0] for n in doc["methods"]}
    init = doc["methods"]["none"]["config"]["init"]
    assert init and all(m["config"]["init"] == init for m in doc["methods"].values())
    # sfr is recipe='authors': its head also reads the eos input, so a response at the block limit
    # keeps one byte less (same init, same order, nearly the same tokens)
    assert doc["methods"]["sfr"]["config"]["positions"] == "labels"
    assert first["none"]["ar"] == pytest.approx(first["sfr"]["ar"], rel=1e-3)
    assert first["none"]["ar"] == pytest.approx(first["mtp"]["ar"], abs=1e-4)
    w = {n: torch.load(tmp / "out" / n / "export" / "model.pt")["blocks.0.attn.qkv.weight"] for n in doc["methods"]}
    assert not torch.equal(w["none"], w["mtp"])


def test_rerun_does_no_work_twice(smoke, mbpp_path, tmp_path, monkeypatch):
    """A rerun on a finished --out trains, samples and runs nothing, and reports the same;
    after a crash mid-sampling (stores cut short), it does only what is missing."""
    src, doc = smoke
    for sub in ("out", "cache"):
        shutil.copytree(src / sub, tmp_path / sub)

    def forbidden(*a, **k):
        raise AssertionError("work was done again")
    calls = {"sample": 0, "checks": 0}
    monkeypatch.setattr(sfr, "train", forbidden)
    monkeypatch.setattr(R, "sample_gpt", forbidden)
    real_run_checks = R.run_checks

    def run_checks(jobs, *a, **k):
        calls["checks"] += len(jobs)
        return real_run_checks(jobs, *a, **k)
    monkeypatch.setattr(R, "run_checks", run_checks)
    again = run(mbpp_path, tmp_path)
    assert calls["checks"] == 0
    for name in doc["methods"]:
        for key in ("reference_loss", "temperatures", "problems"):
            assert again["methods"][name][key] == doc["methods"][name][key]

    folder = tmp_path / "out" / "mtp"  # a crash after problem 11 was sampled and run
    for store in folder.glob("*-T0.8-*.jsonl"):
        store.write_text(store.read_text().splitlines(keepends=True)[0])
    monkeypatch.undo()
    monkeypatch.setattr(sfr, "train", forbidden)
    monkeypatch.setattr(R, "run_checks", run_checks)
    real_sample = R.sample_gpt

    def sample(*a, **k):
        calls["sample"] += 1
        return real_sample(*a, **k)
    monkeypatch.setattr(R, "sample_gpt", sample)
    resumed = run(mbpp_path, tmp_path)
    assert calls == {"sample": 1, "checks": 5}  # problem 12 only, n = 5 samples
    # per-problem seeds: the same samples and outcomes as the uninterrupted run
    assert resumed["methods"]["mtp"]["problems"] == doc["methods"]["mtp"]["problems"]
    t, t0 = resumed["methods"]["mtp"]["temperatures"]["0.8"], doc["methods"]["mtp"]["temperatures"]["0.8"]
    assert {k: v for k, v in t.items() if k != "sample_seconds"} == \
        {k: v for k, v in t0.items() if k != "sample_seconds"}


def refused(mbpp_path, tmp, capsys, *extra) -> str:
    """`run --smoke` that must stop with exit 2 and one line (no traceback) on stderr."""
    argv = ["run", "--mbpp", str(mbpp_path), "--smoke", "--threads", "1", "--no_progress",
            "--out", str(tmp / "out"), "--cache_dir", str(tmp / "cache"), "--report", str(tmp / "report"), *extra]
    assert R.main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("note: ")]
    assert len(err) == 1, err
    return err[0]


def test_rerun_with_other_settings_is_refused(smoke, mbpp_path, tmp_path, capsys):
    src, _ = smoke
    for sub in ("out", "cache"):
        shutil.copytree(src / sub, tmp_path / sub)
    assert "other settings" in refused(mbpp_path, tmp_path, capsys, "--set", "lr=0.01")


def test_unknown_method_is_refused(mbpp_path, tmp_path, capsys):
    assert "unknown" in refused(mbpp_path, tmp_path, capsys, "--methods", "none,sft")


def test_null_targets_are_shuffled_once(smoke, mbpp_path, tmp_path, monkeypatch):
    # sfr.train owns the null-target shuffle; reproduce_mbpp shuffled once more before it
    src, _ = smoke
    shutil.copytree(src / "cache", tmp_path / "cache")  # the pretrained weights and MiniLM targets
    calls = []
    real = sfr.shuffle_targets
    monkeypatch.setattr(sfr, "shuffle_targets", lambda ex, seed: calls.append(seed) or real(ex, seed))
    run(mbpp_path, tmp_path, "--methods", "sfr_null")
    assert calls == [0]


# ----------------------------------------------------------------------------- Hugging Face path


@pytest.fixture
def tiny_hf(tmp_path):
    """A random 1-layer GPT-2 in a folder without tokenizer files: sfr's byte tokenizer is used."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=258, n_positions=1024, n_embd=32, n_layer=1, n_head=2))
    model.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny", model


def test_hf_smoke_lora_merges_a_low_rank_update(tiny_hf, mbpp_path, tmp_path):
    from transformers import AutoModelForCausalLM
    folder, original = tiny_hf
    doc = run(mbpp_path, tmp_path, "--model", str(folder), "--lora", "--lora_r", "2", "--methods", "none,sfr")
    assert list(doc["methods"]) == ["none", "sfr"] and doc["lora"]["r"] == 2
    assert doc["methods"]["sfr"]["temperatures"]["0.8"]["problems"] == 2
    export = tmp_path / "out" / "sfr" / "export"
    assert not (export / "adapter_config.json").exists()  # merged: a plain model
    tuned = AutoModelForCausalLM.from_pretrained(export)
    before, after = original.state_dict(), tuned.state_dict()
    delta = after["transformer.h.0.attn.c_attn.weight"] - before["transformer.h.0.attn.c_attn.weight"]
    s = torch.linalg.svdvals(delta.double())
    assert s[0] > 1e-7 and s[2] / s[0] < 1e-3  # trained, and only through a rank-2 update
    torch.testing.assert_close(after["transformer.ln_f.weight"], before["transformer.ln_f.weight"], rtol=0, atol=0)


def test_hf_smoke_full_finetune(tiny_hf, mbpp_path, tmp_path):
    folder, original = tiny_hf
    doc = run(mbpp_path, tmp_path, "--model", str(folder), "--methods", "mtp")
    assert doc["methods"]["mtp"]["config"]["backbone"] == str(folder.resolve())
    t = doc["methods"]["mtp"]["temperatures"]["0.8"]
    assert t["problems"] == 2 and len(doc["methods"]["mtp"]["problems"]["11"]["T=0.8"]["outcomes"]) == 5


@pytest.mark.parametrize("sets", [[], ["--set", "shard=true"]], ids=["ddp", "fsdp"])
def test_torchrun_two_processes_train_what_one_does(smoke, mbpp_path, tmp_path, sets):
    """Under torchrun every rank trains (DDP or FSDP, the global batch split in two) and
    rank 0 evaluates: the same reference losses as the one-process run. Pretraining runs
    under torchrun too; the MiniLM targets come from the one-process run's cache (the same
    numbers the encoder gives; a rank would load MiniLM only on a miss)."""
    import subprocess
    import sys
    src, doc = smoke
    (tmp_path / "cache").mkdir()
    for targets in (src / "cache").glob("minilm-targets*.pt"):
        shutil.copy(targets, tmp_path / "cache")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "reproduce_mbpp.py",
         "run", "--mbpp", str(mbpp_path), "--smoke", "--threads", "1", "--no_progress", "--workers", "2",
         "--out", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"), "--report", str(tmp_path / "report"),
         *sets],
        cwd=R.Path(R.__file__).parent, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert ("FSDP: sharded over 2 processes" in done.stdout + done.stderr) == bool(sets)
    two = json.loads((tmp_path / "report.json").read_text())
    for name, m in doc["methods"].items():
        for tid, prob in m["problems"].items():
            assert two["methods"][name]["problems"][tid]["reference_loss"]["nats"] == \
                pytest.approx(prob["reference_loss"]["nats"], rel=1e-4)


def test_each_pooling_has_its_own_target_cache_file(encoder, tmp_path):
    """'model' and 'mean' targets in one file would each replace the other's table (the file is
    tagged with one encoder), so neither would ever hit."""
    cache = str(tmp_path / "targets.pt")
    assert R.encoder_cache(cache, "model") == cache != R.encoder_cache(cache, "mean")
    writer = sfr_encoder.SegmentEncoder("minilm", cache=cache)
    writer.model = encoder.model  # the session's MiniLM, not a second load
    writer.encode(["alpha beta"])
    writer.save()
    assert sfr_encoder.SegmentEncoder("minilm", cache=cache).table.keys() == {"alpha beta"}
    mean = sfr_encoder.SegmentEncoder("minilm", cache=R.encoder_cache(cache, "mean"), pooling="mean")
    assert mean.table == {}


def test_a_run_folder_from_before_the_renames_is_the_same_run(tmp_path):
    """meta.json of 2026-12-01 says k and aux='flow': the same run as segment_len and aux='sfr' today;
    another segment length is still another run."""
    key = R._config_key(train.RunConfig(segment_len=4))
    old = dict(key, aux="flow")
    old["k"] = old.pop("segment_len")
    (tmp_path / "meta.json").write_text(json.dumps({"config": old, "model": "m"}))
    R._same_run(tmp_path, {"config": key, "model": "m"})  # no error
    with pytest.raises(R.UsageError, match="other settings"):
        R._same_run(tmp_path, {"config": R._config_key(train.RunConfig(segment_len=2)), "model": "m"})


def test_the_pretraining_cache_key_is_the_one_from_before_the_renames():
    """Weights cached (and run folders started) before 2026-12-02 keep their pretrain-<key>: the
    key hashes the config under the old name k, not segment_len."""
    import hashlib
    import platform
    cfg = train.RunConfig(**R.PRETRAIN)
    corpus = [("a.py", 10), ("b.py", 20)]
    old = {("k" if n == "segment_len" else n): v for n, v in R._config_key(cfg).items()}
    assert "k" in old and "segment_len" not in old
    want = hashlib.sha256(json.dumps({"config": old, "corpus": corpus, "python": platform.python_version()},
                                     sort_keys=True).encode()).hexdigest()[:16]
    assert R._pretrain_key(cfg, corpus) == want
