"""MBPP infrastructure for the SFR code experiment: data, prompts, a sandbox, pass@k.

The paper compares next-token SFT, multi-token prediction (MTP) and SFR on MBPP
(DESIGN.md, section 6). This file holds everything around that comparison that
does not train a model:

1. Data: load and validate ``mbpp.jsonl``, the standard splits by task_id, an
   optional download checked against a recorded sha256.
2. Prompt format: one fixed prompt and response format, and ``extract_code`` to
   get the program back out of a model's completion.
3. Sandbox: ``run_program`` / ``check_program`` run an untrusted program and its
   assert-tests in a fresh, resource-limited interpreter whose verdict the program
   cannot forge; ``run_checks`` runs many in parallel.
4. pass@k: the unbiased estimator of Chen et al. (2021).
5. Evaluation: ``evaluate_samples`` scores model samples per problem, and
   ``ResultStore`` keeps finished problems on disk so a rerun resumes.
6. ``check-references``: runs every reference solution through the sandbox, a
   test of the sandbox against 974 known-good programs.
7. Command line.
8. Training and sampling: the ``run`` subcommand trains one model per method
   (none / mtp / sfr / ablations / ladder rungs), samples, scores and reports.

Sections 1-7 import nothing heavy; section 8 imports torch and sfr inside its functions.

Commands (the data file is never part of the repository; pass its path)::

    python reproduce_mbpp.py download --dest data/mbpp.jsonl
    python reproduce_mbpp.py check-references --mbpp data/mbpp.jsonl
    python reproduce_mbpp.py evaluate --mbpp data/mbpp.jsonl --samples samples.jsonl
    python reproduce_mbpp.py run --mbpp data/mbpp.jsonl --threads 1          # CPU default, ~20 min
    python reproduce_mbpp.py run --mbpp data/mbpp.jsonl --smoke              # seconds
    python reproduce_mbpp.py run --mbpp data/mbpp.jsonl --model PATH [--lora] # HF model, GPU if any

MBPP: Austin et al. 2021, "Program Synthesis with Large Language Models",
https://github.com/google-research/google-research/tree/master/mbpp, released
under CC BY 4.0; keep that attribution next to any number computed on it.

Sandbox threat model, in short (the full version is ``run_program``'s docstring):
resource limits, process clean-up and the pass verdict are enforced by the OS and
by a secret the program never sees; the file-system and network policy is an
in-process audit hook (PEP 578), which stops accidents and casual tampering but
not a deliberate escape from the interpreter. Run untrusted code at scale inside
a container or VM as well.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import marshal
import os
import platform
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

# ---------------------------------------------------------------------------
# 1. Data
# ---------------------------------------------------------------------------

MBPP_URL = ("https://raw.githubusercontent.com/google-research/google-research/"
            "master/mbpp/mbpp.jsonl")
# sha256 of the copy this project was built against (974 problems, with the later
# corrections of tasks 341, 596 and 642; an older revision differs in those three).
MBPP_SHA256 = "ccf64ceae9c5403bf50a044cb6d505bfd2a2963ee58338ba268fd65beab92a9f"
# Standard splits by task_id, inclusive (Austin et al. 2021, section 2.1).
SPLITS = {"prompt": (1, 10), "test": (11, 510), "validation": (511, 600), "train": (601, 974)}
# field -> (check, what the error message says it should be)
_FIELDS = {
    "task_id": (lambda v: type(v) is int, "an int"),
    "text": (lambda v: isinstance(v, str), "a str"),
    "code": (lambda v: isinstance(v, str), "a str"),
    "test_list": (lambda v: isinstance(v, list) and v and all(isinstance(t, str) for t in v),
                  "a non-empty list of str"),
    "test_setup_code": (lambda v: isinstance(v, str), "a str"),
    "challenge_test_list": (lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v),
                            "a list of str"),
}


class MBPPFormatError(ValueError):
    """A line of an MBPP file that is not a valid record; the message names file, line and field."""


class ChecksumMismatchError(ValueError):
    """A downloaded file whose sha256 is not the expected one."""


def load_mbpp(path: str | os.PathLike) -> list[dict]:
    """Read an MBPP jsonl file, one problem a line, and validate every record.

    Each record must have the fields of ``_FIELDS`` with their types, and task_ids
    must be unique; anything else raises ``MBPPFormatError`` naming the file, the
    1-based line number and the field.
    """
    records, seen = [], {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            where = f"{path}:{lineno}"
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise MBPPFormatError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise MBPPFormatError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            for field, (ok, expected) in _FIELDS.items():
                if field not in rec:
                    raise MBPPFormatError(f"{where}: missing field '{field}'")
                if not ok(rec[field]):
                    raise MBPPFormatError(f"{where}: field '{field}' must be {expected}, "
                                          f"got {type(rec[field]).__name__}")
            if rec["task_id"] in seen:
                raise MBPPFormatError(f"{where}: field 'task_id' repeats task {rec['task_id']} "
                                      f"(first on line {seen[rec['task_id']]})")
            seen[rec["task_id"]] = lineno
            records.append(rec)
    return records


def split_mbpp(records: list[dict]) -> dict[str, list[dict]]:
    """Group records into the standard splits of ``SPLITS`` (prompt/test/validation/train).

    A task_id outside every split is an error rather than being dropped.
    """
    splits = {name: [] for name in SPLITS}
    for rec in records:
        for name, (lo, hi) in SPLITS.items():
            if lo <= rec["task_id"] <= hi:
                splits[name].append(rec)
                break
        else:
            raise ValueError(f"task_id {rec['task_id']} is in no MBPP split {SPLITS}")
    return splits


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_mbpp(url: str = MBPP_URL, dest: str | os.PathLike = "mbpp.jsonl",
                  sha256: str = MBPP_SHA256, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` only if its sha256 is ``sha256``.

    The bytes go to a temporary file next to ``dest`` and are hashed on the way;
    a copy with another checksum is deleted and refused with
    ``ChecksumMismatchError`` (``dest`` is left as it was), a good one is moved
    into place with ``os.replace``, so ``dest`` is never a partial file.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            for block in iter(lambda: resp.read(1 << 16), b""):
                h.update(block)
                out.write(block)
            out.flush()
            os.fsync(out.fileno())
        if h.hexdigest() != sha256:
            raise ChecksumMismatchError(
                f"{url}: sha256 {h.hexdigest()} is not the expected {sha256}; "
                f"refusing this copy ({dest} left untouched)")
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return dest


# ---------------------------------------------------------------------------
# 2. Prompt format
# ---------------------------------------------------------------------------

# The problem text plus the first test as the hint for the function's name and
# signature, as in the MBPP paper (which shows all three tests; we show one so the
# other two stay unseen). Matches the paper's instruction data in spirit: "an expert
# Python programmer" asked for a complete solution in a fenced python block.
PROMPT_TEMPLATE = ("You are an expert Python programmer, and here is your task: {text} "
                   "Your code should pass these tests:\n\n{test}\n")
RESPONSE_TEMPLATE = "```python\n{code}\n```\n"
_FENCE = re.compile(r"^```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:^```|\Z)", re.S | re.M)
# A line that starts with one of these ends an unfenced completion: prose after the
# code, or the model starting the next few-shot example.
_PROSE = re.compile(r"^(```|Explanation|Note:|Output:|Example|Here is|Here's|This (code|function|solution)"
                    r"|The (code|function|solution)|You are an expert Python programmer)")


def _clean(code: str) -> str:
    return code.replace("\r\n", "\n").replace("\r", "\n").strip("\n").rstrip()


def format_prompt(rec: dict) -> str:
    """The prompt for one problem: ``PROMPT_TEMPLATE`` with its text and first test."""
    return PROMPT_TEMPLATE.format(text=rec["text"].strip(), test=rec["test_list"][0].strip())


def format_response(rec: dict) -> str:
    """The target response: the reference solution in a ```python fenced block."""
    return RESPONSE_TEMPLATE.format(code=_clean(rec["code"]))


def extract_code(completion: str) -> str:
    """The program inside a model completion.

    The first ```python (or ```py / ```python3) block wins; else the first bare
    ``` block; else, with no fence at all, the text up to the first line that
    starts like prose (``_PROSE``). An unterminated fence (sampling stopped inside
    it) runs to the end of the text.
    """
    text = completion.replace("\r\n", "\n")
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(text)]
    for wanted in (("python", "py", "python3"), ("",)):
        for lang, body in blocks:
            if lang in wanted:
                return _clean(body)
    if blocks:  # fences, but none python or bare (```text, ```bash...): nothing to run
        return ""
    lines = []
    for line in text.split("\n"):
        if _PROSE.match(line):
            break
        lines.append(line)
    return _clean("\n".join(lines))


# ---------------------------------------------------------------------------
# 3. The sandbox
# ---------------------------------------------------------------------------
# Parent side: run_program spawns `python -I -S -B -c <child source>` per check in
# a fresh temporary directory, gives it the program and a one-time secret through
# stdin, and reads its output and a private result pipe until it exits or its time
# is up; then it kills everything the check started and deletes the directory.
# Child side: _sandbox_child (shipped as source, runs in the child) sets resource
# limits, installs the audit hook built by _make_sandbox_hook, runs program, setup
# and tests, and asks the hook to write "PASS <secret>" to the result pipe.

STATUSES = ("passed", "failed", "error", "refused", "timeout", "killed")
_TOKEN_VAR = "SFR_SANDBOX_TOKEN"  # marks the environment of every sandboxed process

# The policy the audit hook enforces (see _make_sandbox_hook for how each is used).
_POLICY = {
    # Modules a program may not import: interpreter escapes (ctypes, the test
    # modules), process creation, signals (a handler gets the current frame),
    # sockets, and posix itself once it has been trimmed (below).
    "blocked_imports": [
        "ctypes", "_ctypes", "_posixsubprocess", "signal", "_signal", "faulthandler", "_lsprof",
        "_testcapi", "_testinternalcapi", "_testbuffer", "_testmultiphase", "_testsinglephase",
        "_testimportmultiple", "_xxsubinterpreters", "_xxinterpchannels", "_xxtestfuzz",
        "multiprocessing", "_multiprocessing", "_posixshmem", "socket", "_socket", "ssl", "_ssl",
        "sqlite3", "_sqlite3", "posix", "pty", "termios", "readline", "curses", "_curses",
        "tkinter", "_tkinter"],
    # Audit events refused outright: frame and object-graph introspection (the way
    # to the harness's state), tracing, new audit hooks, raising resource limits,
    # links (a symlink would make path checks lie), leaving the sandbox directory.
    "refused_events": [
        "sys._current_frames", "sys._current_exceptions", "sys.settrace", "sys.setprofile",
        "sys.addaudithook", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
        "resource.setrlimit", "resource.prlimit", "fcntl.ioctl", "os.link", "os.symlink",
        "os.chdir", "os.chflags", "os.lchflags", "os.killpg", "pdb.Pdb", "webbrowser.open",
        "urllib.Request", "ensurepip.bootstrap", "sqlite3.enable_load_extension",
        "sqlite3.load_extension", "os.startfile"],
    "refused_prefixes": ["socket.", "ctypes.", "ftplib.", "http.", "imaplib.", "nntplib.",
                         "poplib.", "smtplib.", "telnetlib.", "winreg.", "msvcrt.", "_winapi."],
    # Starting processes: refused unless allow_processes (only for testing the
    # OS-level containment underneath the hook).
    "process_events": ["os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn",
                       "os.system", "subprocess.Popen", "pty.spawn"],
    # Events that change a file: event -> [index of the path, index of dir_fd or None].
    "change_events": {
        "os.remove": [0, 1], "os.rmdir": [0, 1], "os.mkdir": [0, 2], "os.chmod": [0, 2],
        "os.chown": [0, 3], "os.utime": [0, 3], "os.truncate": [0, None],
        "os.setxattr": [0, None], "os.removexattr": [0, None], "shutil.rmtree": [0, 1]},
    # Attribute reads that hand out a frame (audited as object.__getattr__).
    "frame_attributes": ["tb_frame", "gi_frame", "cr_frame", "ag_frame"],
    # Readable besides the sandbox directory and the child's sys.path.
    "read_only_paths": ["/dev/null", "/dev/zero", "/dev/urandom", "/dev/random",
                        "/usr/share/zoneinfo", "/usr/lib/zoneinfo", "/etc/zoneinfo", "/etc/localtime"],
    # posix functions that change the system without raising an audit event: deleted
    # from the module before the program runs (the ones starting sessions are kept
    # when processes are allowed, so the containment tests can make daemons).
    "removed_functions": [
        "mkfifo", "mknod", "chroot", "pidfd_open", "setpriority", "sched_setscheduler",
        "sched_setparam", "sched_setaffinity", "nice", "setuid", "setgid", "seteuid", "setegid",
        "setreuid", "setregid", "setresuid", "setresgid", "setgroups", "initgroups",
        "tcsetpgrp", "login_tty", "unshare", "setns"],
    "session_functions": ["setsid", "setpgid", "setpgrp"],
}


@dataclass(frozen=True)
class Limits:
    """Resource limits for one sandboxed program (the wall clock is ``timeout``)."""
    memory_bytes: int = 1 << 30   # RLIMIT_AS: address space; an allocation past it is a MemoryError
    output_bytes: int = 64 << 10  # stdout+stderr kept; one more byte and the program is killed
    file_bytes: int = 16 << 20    # RLIMIT_FSIZE: largest file it may write (in its own directory)
    open_files: int = 256         # RLIMIT_NOFILE
    max_tasks: int = 16           # cgroup pids.max: processes + threads, where cgroups are writable
    cpu_slack: float = 1.0        # RLIMIT_CPU = timeout + this, so a spinning child dies on its own


@dataclass(frozen=True)
class CheckResult:
    """What happened to one program: ``status`` is one of ``STATUSES``."""
    status: str        # passed | failed (an assert) | error | refused (sandbox) | timeout | killed
    detail: str        # why it did not pass ('' if it passed)
    wall_time: float   # seconds from spawning the child to the end of clean-up
    output: str = ""   # what it printed (stdout and stderr, at most Limits.output_bytes)
    returncode: int | None = None

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _make_sandbox_hook(nonce, result_fd, sandbox, policy):
    """Build the child's audit hook (PEP 578); runs in the child, before any untrusted code.

    The hook is the only holder of the secret ``nonce`` and of the right to report
    a pass: on the event ``sfr.sandbox.passed`` it writes ``PASS <nonce>`` to the
    result pipe, but only if the event comes from the very frame that raised
    ``sfr.sandbox.start`` (the harness's main frame, recorded before the program
    ran), and only once. The program cannot reach this closure: hooks are not
    listed anywhere in Python, and the object-graph and frame routes to it
    (gc.get_objects/get_referrers, sys._getframe, tracebacks' and generators'
    frames, tracing, signal handlers, /proc/self/mem) are refused below.

    It also holds the file-system policy: a program may change files only inside
    ``sandbox`` (its cwd) and read only there, in the Python library and a few
    device/zoneinfo paths. Paths are resolved like the kernel does (symlinks
    followed) using C functions only, because anything written in Python that the
    program could monkeypatch must not run inside the hook. For the same reason a
    path must be a str or bytes: a path-like object's ``__fspath__`` could answer
    the hook differently from the system call (so ``os.remove(Path(...))`` is
    refused even inside the sandbox; ``open(Path(...))`` is fine, io.open converts
    first).

    Self-contained (it is sent to the child as source): no module globals.
    """
    import posix
    import sys
    import _thread
    lstat, stat, readlink, getpid = posix.lstat, posix.stat, posix.readlink, posix.getpid
    write, getframe, get_ident = posix.write, sys._getframe, _thread.get_ident
    str_, bytes_, int_, type_ = str, bytes, int, type
    write_flags = posix.O_WRONLY | posix.O_RDWR | posix.O_CREAT | posix.O_TRUNC | posix.O_APPEND
    blocked_imports = frozenset(policy["blocked_imports"])
    refused_events = frozenset(policy["refused_events"])
    refused_prefixes = tuple(policy["refused_prefixes"])
    process_events = frozenset(policy["process_events"])
    change_events = dict(policy["change_events"])
    frame_attributes = frozenset(policy["frame_attributes"])
    allow_processes = policy["allow_processes"]
    inside = sandbox + "/"
    state = {"harness": None, "passed": False, "introspecting": None}

    def refuse(exc, what):
        raise exc("sandbox: " + what)

    def text(path, event):
        if type_(path) is str_:
            return path
        if type_(path) is bytes_:
            return path.decode("utf-8", "surrogateescape")
        refuse(PermissionError, event + " needs a str or bytes path")

    def resolve(path):
        # realpath(), with C calls only; cwd is always the sandbox (os.chdir is refused)
        if not path.startswith("/"):
            path = inside + path
        todo, done, links = path.split("/")[::-1], [], 0
        while todo:
            part = todo.pop()
            if part == "" or part == ".":
                continue
            if part == "..":
                if done:
                    done.pop()
                continue
            candidate = "/" + "/".join(done) + ("/" if done else "") + part
            try:
                is_link = lstat(candidate).st_mode & 0o170000 == 0o120000
            except (OSError, ValueError):
                is_link = False
            if not is_link:
                done.append(part)
                continue
            links += 1
            if links > 40:
                refuse(PermissionError, "too many levels of symbolic links")
            target = readlink(candidate)
            if target.startswith("/"):
                done = []
            todo.extend(target.split("/")[::-1])
        return "/" + "/".join(done)

    read_roots = tuple(resolve(p) for p in list(policy["read_only_paths"]) + sys.path if p)

    def fd_path(fd):
        try:
            return readlink("/proc/self/fd/%d" % fd)
        except (OSError, ValueError, TypeError):
            refuse(PermissionError, "cannot tell which file descriptor %r refers to" % (fd,))

    def check_change(path, event, dir_fd=None):
        p = fd_path(path) if type_(path) is int_ else text(path, event)
        if dir_fd is not None and dir_fd != -1 and not p.startswith("/"):  # -1: no dir_fd
            if type_(dir_fd) is not int_ or dir_fd < 0:
                refuse(PermissionError, event + ": dir_fd must be an int")
            p = fd_path(dir_fd) + "/" + p
        # '..' is refused outright: io.open does not tell us its dir_fd, so a
        # relative path is checked against cwd, which is only sound without '..'
        if ".." in p.split("/"):
            refuse(PermissionError, "%s %r: '..' in a path that changes files" % (event, p))
        if not resolve(p).startswith(inside) and p != "/dev/null":
            refuse(PermissionError, "%s %r: outside the sandbox directory" % (event, p))

    def check_read(path):
        p = text(path, "open")
        real = resolve(p)
        if real == sandbox or real.startswith(inside):
            return
        for root in read_roots:
            if real == root or real.startswith(root + "/"):
                try:  # a directory fd outside would make later dir_fd-relative opens escape
                    is_dir = stat(real).st_mode & 0o170000 == 0o040000
                except (OSError, ValueError):
                    return
                if is_dir:
                    refuse(PermissionError, "open %r: a directory outside the sandbox" % p)
                return
        refuse(PermissionError, "read %r: outside the sandbox and the Python library" % p)

    def caller_frame():
        # frame 0 is this function, 1 the hook, 2 whoever raised the event
        state["introspecting"] = get_ident()
        try:
            return getframe(2)
        finally:
            state["introspecting"] = None

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            if type_(path) is int_:  # wraps an fd the process already has
                return
            if (type_(flags) is int_ and flags & write_flags) or (
                    type_(mode) is str_ and ("w" in mode or "a" in mode or "x" in mode or "+" in mode)):
                check_change(path, "open")
            else:
                check_read(path)
        elif event == "import":
            name = args[0]
            if type_(name) is not str_ or name.partition(".")[0] in blocked_imports:
                refuse(ImportError, "import of %r is not allowed" % (name,))
        elif event in change_events:
            at, dir_at = change_events[event]
            check_change(args[at], event, None if dir_at is None else args[dir_at])
        elif event == "os.rename":
            check_change(args[0], event, args[2])
            check_change(args[1], event, args[3])
        elif event == "os.kill":
            if args[0] != getpid():
                refuse(PermissionError, "os.kill of a process other than itself")
        elif event in process_events:
            if not allow_processes:
                refuse(PermissionError, event + ": starting processes is not allowed")
        elif event in refused_events or event.startswith(refused_prefixes):
            refuse(PermissionError, event + " is not allowed")
        elif event == "sys._getframe":
            if state["introspecting"] != get_ident():
                refuse(ValueError, "frame introspection is not allowed")  # namedtuple & co. catch ValueError
        elif event == "object.__getattr__":
            if args[1] in frame_attributes:
                refuse(AttributeError, "frame introspection is not allowed")
        elif event == "sfr.sandbox.start":
            if state["harness"] is None:
                state["harness"] = caller_frame()
        elif event == "sfr.sandbox.passed":
            if state["passed"] or state["harness"] is None or caller_frame() is not state["harness"]:
                refuse(PermissionError, "only the harness reports a pass")
            state["passed"] = True
            write(result_fd, b"PASS\t" + nonce + b"\n")

    return hook


def _sandbox_child():
    """The trusted half of the harness; runs in the child (``python -I -S -B -c``).

    Order matters: read the config (program, tests, secret) from stdin, start a
    watchdog, set resource limits, trim ``posix``, install the audit hook, and only
    then compile and run program, setup and tests in one namespace. If every test
    returns, the hook writes the pass line; every other ending (an exception,
    ``sys.exit``, ``os._exit``, a signal, a timeout) leaves no pass line.

    The program shares this interpreter and could rebind any global or builtin name
    the harness uses (``import __main__; __main__.len = ...``), so everything used
    after the program has started is bound to a local first. Builtins are restored
    from a snapshot before each test, so a program cannot make e.g. ``sorted``
    lie to them. Self-contained (sent as source): no module globals.
    """
    import sys
    import posix
    import marshal
    import builtins
    import _thread
    import time
    _exit, _write, _read = posix._exit, posix.write, posix.read
    _exec, _compile, _BaseException, _AssertionError = exec, compile, BaseException, AssertionError
    _str, _type, _audit = str, type, sys.audit
    _builtins, _builtins_dict, _snapshot = builtins, builtins.__dict__, dict(builtins.__dict__)
    _clear, _update = dict.clear, dict.update
    _stdout, _stderr = sys.stdout, sys.stderr

    data = b""
    while True:
        chunk = _read(0, 1 << 16)
        if not chunk:
            break
        data += chunk
    cfg = marshal.loads(data)
    del data
    posix.close(0)
    posix.open("/dev/null", posix.O_RDONLY)  # takes fd 0 again: input() sees end of file
    fd = cfg["result_fd"]

    def report(status, detail):
        try:
            line = "FAIL\t" + status + "\t" + detail.replace("\n", " | ")[:2000] + "\n"
            _write(fd, line.encode("utf-8", "replace"))
        except _BaseException:
            pass

    def describe(e):
        try:  # the exception is the program's object: its __str__ is untrusted code
            name, message = _type(e).__name__, _str(e)
            if _type(name) is _str and _type(message) is _str:
                return name + (": " + message if message else "")
        except _BaseException:
            pass
        return "(an exception that could not be described)"

    # If the parent dies, nothing else would stop a sleeping child.
    def watchdog(sleep=time.sleep, seconds=cfg["timeout"] + 5.0):
        sleep(seconds)
        _exit(124)
    _thread.start_new_thread(watchdog, ())

    import resource
    for name, soft, hard in cfg["rlimits"]:
        if hasattr(resource, name):
            try:
                resource.setrlimit(getattr(resource, name), (soft, hard))
            except (ValueError, OSError):  # e.g. RLIMIT_AS on macOS; the wall clock still holds
                pass
    policy = cfg["policy"]
    for name in policy["removed_functions"]:
        if hasattr(posix, name):
            delattr(posix, name)
    sys.modules.pop("_signal", None)  # so that importing it goes through the hook
    import types  # noqa: F401  (reads tb_frame at import, which the hook refuses; enum, re... need it)

    sys.addaudithook(_make_sandbox_hook(cfg.pop("nonce").encode(), fd, cfg["sandbox"], policy))
    _audit("sfr.sandbox.start")

    phase = "program"
    try:
        program = _compile(cfg["program"], "<program>", "exec")
        phase = "setup code"
        setup = _compile(cfg["setup_code"], "<setup>", "exec")
        phase = "tests"
        tests = tuple((src, _compile(src, "<test %d>" % (i + 1), "exec"))
                      for i, src in enumerate(cfg["tests"]))
    except _BaseException as e:
        report("error", phase + ": " + describe(e))
        _exit(1)

    ns = {"__name__": "__sandbox__", "__builtins__": _builtins}  # not __main__: demo blocks stay off
    phase = "program"
    try:
        _exec(program, ns)
        phase = "setup code"
        _exec(setup, ns)
        for src, code in tests:
            phase = src
            _clear(_builtins_dict)  # each test sees the real builtins, whatever ran before it
            _update(_builtins_dict, _snapshot)
            ns["__builtins__"] = _builtins
            _exec(code, ns)
    except _BaseException as e:
        what = describe(e)
        if "sandbox: " in what:
            status = "refused"
        elif _type(e) is _AssertionError and phase != "program" and phase != "setup code":
            status = "failed"
        else:
            status = "error"
        report(status, phase + ": " + what)
        _exit(1)
    _audit("sfr.sandbox.passed")
    for stream in (_stdout, _stderr):
        try:
            stream.flush()
        except _BaseException:
            pass
    _exit(0)


@lru_cache(maxsize=None)
def _child_source() -> str:
    import inspect
    return (inspect.getsource(_make_sandbox_hook) + "\n" + inspect.getsource(_sandbox_child)
            + "\n_sandbox_child()\n")


class _Cgroup:
    """A throwaway control group for one check (Linux, where cgroupfs is writable).

    Why: a process can leave its session and process group (setsid, double fork)
    but not its cgroup, so killing every member kills all the program started, and
    ``pids.max`` stops a fork bomb at ``Limits.max_tasks``. cgroup v2 kills all
    members in one write (``cgroup.kill``); under v1 we SIGKILL the listed members
    until none is left. Where cgroups are not writable (no root, no delegation)
    ``create`` returns None and run_program falls back to the /proc sweep.
    """
    _bases: list[str] | None = None  # parent directories we can create cgroups in
    _lock = threading.Lock()

    def __init__(self, dirs: list[str]):
        self.dirs = dirs

    @classmethod
    def bases(cls) -> list[str]:
        with cls._lock:
            if cls._bases is None:
                cls._bases = cls._detect()
            return cls._bases

    @staticmethod
    def _detect() -> list[str]:
        """One writable parent directory, preferring a hierarchy with the pids controller.

        One, not one per hierarchy: moving a process between cgroups costs about a
        millisecond (more on a busy machine), and once is enough to contain it.
        """
        if not sys.platform.startswith("linux"):
            return []
        try:
            own = {}  # controllers -> our cgroup path in that hierarchy
            for line in Path("/proc/self/cgroup").read_text().splitlines():
                _, controllers, path = line.split(":", 2)
                own[controllers] = path
            candidates = []  # (has pids controller, parent directory)
            for line in Path("/proc/self/mountinfo").read_text().splitlines():
                left, _, right = line.partition(" - ")
                mountpoint, (fstype, _, options) = left.split()[4], right.split()[:3]
                if fstype == "cgroup2" and "" in own:
                    base = mountpoint + own[""]
                    try:
                        pids = "pids" in Path(base, "cgroup.controllers").read_text().split()
                    except OSError:
                        pids = False
                    candidates.append((pids, os.path.join(base, "sfr-sandbox")))
                elif fstype == "cgroup" and "pids" in options.split(","):
                    path = next((p for c, p in own.items() if "pids" in c.split(",")), None)
                    if path is not None:
                        candidates.append((True, os.path.join(mountpoint + path, "sfr-sandbox")))
        except (OSError, ValueError, IndexError):
            return []
        for _, parent in sorted(candidates, key=lambda c: not c[0]):
            try:
                os.makedirs(parent, exist_ok=True)
                probe = os.path.join(parent, f"probe-{os.getpid()}")
                os.mkdir(probe)
                os.rmdir(probe)
            except OSError:
                continue
            try:  # cgroup v2: children get pids.max only if the parent delegates it
                _write_text(os.path.join(parent, "cgroup.subtree_control"), "+pids")
            except OSError:
                pass
            return [parent]
        return []

    @classmethod
    def create(cls, name: str, max_tasks: int) -> _Cgroup | None:
        dirs = []
        try:
            for base in cls.bases():
                d = os.path.join(base, name)
                os.mkdir(d)
                dirs.append(d)
                if os.path.exists(os.path.join(d, "pids.max")):
                    _write_text(os.path.join(d, "pids.max"), str(max_tasks))
        except OSError:
            cls(dirs).remove()
            return None
        return cls(dirs) if dirs else None

    def add(self, pid: int) -> None:
        for d in self.dirs:
            _write_text(os.path.join(d, "cgroup.procs"), str(pid))

    def members(self) -> set[int]:
        pids = set()
        for d in self.dirs:
            try:
                pids.update(int(p) for p in Path(d, "cgroup.procs").read_text().split())
            except OSError:
                pass
        return pids

    def kill(self) -> None:
        for d in self.dirs:
            if os.path.exists(os.path.join(d, "cgroup.kill")):
                try:
                    _write_text(os.path.join(d, "cgroup.kill"), "1")
                except OSError:
                    pass
        deadline = time.monotonic() + 5.0
        while (pids := self.members()) and time.monotonic() < deadline:
            for pid in pids:
                _kill(pid)
            time.sleep(0.001)

    def remove(self) -> None:
        for d in reversed(self.dirs):
            deadline = time.monotonic() + 2.0
            while os.path.isdir(d):
                try:
                    os.rmdir(d)
                except OSError:  # EBUSY until the last member is gone
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.002)


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _proc_pids() -> list[int]:
    try:
        return [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return []


def sandbox_processes(token: str | None = None) -> list[int]:
    """Live processes whose environment carries the sandbox marker (``token``, or any).

    Reads /proc/PID/environ, the environment a process was started with, which
    survives setsid, double forks and reparenting to init. Zombies have an empty
    environ and are not listed (they hold no resources but a pid). [] without /proc.
    """
    marker = f"{_TOKEN_VAR}={token}".encode() if token else f"{_TOKEN_VAR}=".encode()
    found = []
    for pid in _proc_pids():
        if pid == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if any(var.startswith(marker) for var in env.split(b"\0")):
            found.append(pid)
    return found


def _descendants(root: int) -> set[int]:
    """Live descendants of ``root`` by walking the ppid links in /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for pid in _proc_pids():
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != b"Z":
            children.setdefault(int(fields[1]), []).append(pid)
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _kill_everything(proc: subprocess.Popen, cgroup: _Cgroup | None, token: str) -> None:
    """SIGKILL the child and everything it started; the child is not reaped yet."""
    try:  # its process group; the pgid cannot be reused while the leader is unreaped
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if cgroup is not None:
        cgroup.kill()
        return
    # No cgroup: processes that left the group are found by ppid (still attached)
    # or by the token in their environment (reparented to init). Repeat until a
    # sweep finds nobody, since a forking process may add one between sweeps.
    for _ in range(200):
        victims = _descendants(proc.pid) | set(sandbox_processes(token))
        if not victims:
            return
        for pid in victims:
            _kill(pid)
        time.sleep(0.001)


def _has_exited(proc: subprocess.Popen) -> bool:
    """Whether the child has exited, without reaping it (its pid must stay reserved)."""
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _pump(buffers: dict[int, bytearray], cap: int, deadline: float,
          proc: subprocess.Popen | None = None, pidfd: int | None = None) -> str:
    """Read pipes into ``buffers`` until: 'exited' (proc), 'eof' (all pipes),
    'deadline', or 'cap' (a buffer got past ``cap`` bytes)."""
    with selectors.DefaultSelector() as sel:
        for fd in buffers:
            sel.register(fd, selectors.EVENT_READ)
        if pidfd is not None:
            sel.register(pidfd, selectors.EVENT_READ)
        while True:
            open_pipes = len(sel.get_map()) - (pidfd is not None)
            if proc is None and open_pipes == 0:
                return "eof"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "deadline"
            # without a pidfd, poll for the exit every 10 ms
            wait = remaining if proc is None or pidfd is not None else min(remaining, 0.01)
            for key, _ in sel.select(wait):
                if key.fd == pidfd:
                    return "exited"
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                buffers[key.fd] += chunk
                if len(buffers[key.fd]) > cap:
                    return "cap"
            if proc is not None and pidfd is None and _has_exited(proc):
                return "exited"


def _rmtree(path: str) -> None:
    def unlock(func, p, _exc):  # a program may chmod its own directories to 000
        os.chmod(os.path.dirname(p), 0o700)
        if os.path.isdir(p):
            os.chmod(p, 0o700)
        func(p)
    shutil.rmtree(path, onerror=unlock)


def run_program(program: str, tests: list[str], timeout: float, setup_code: str = "", *,
                limits: Limits | None = None, allow_processes: bool = False) -> CheckResult:
    """Run ``program``, then ``setup_code``, then each assert in ``tests``, in a sandbox.

    Every call gets a fresh interpreter (``python -I -S -B``: no site, no user
    paths, no bytecode writes) in its own session and process group and its own
    temporary directory as cwd, with: a wall clock of ``timeout`` seconds (then
    SIGKILL), RLIMIT_CPU, RLIMIT_AS (MemoryError past ``Limits.memory_bytes``),
    RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_CORE=0, RLIMIT_NPROC=0 unless
    ``allow_processes`` (no new processes or threads for a non-root user; root
    ignores it, so there a per-check cgroup caps tasks at ``Limits.max_tasks``), an
    output cap (``Limits.output_bytes``, then SIGKILL), and at the end SIGKILL for
    every process it started: its process group, its cgroup's members, and without
    cgroups every descendant and every process whose environment carries this
    check's token (daemons that called setsid and were reparented to init).

    The verdict cannot come from the program. It passes only if the result pipe
    (an inherited fd, not stdout) carries ``PASS <nonce>``, where the nonce is a
    fresh secret that only the child's audit hook holds and writes, only when the
    harness's own frame reports that the last test returned (``_make_sandbox_hook``).
    So printing a marker, ``sys.exit(0)``/``os._exit(0)`` before the tests, atexit
    tricks, writing guesses to every fd, rebinding the harness's names or builtins,
    or raising the pass event itself, all end without a pass.

    The audit hook refuses: changing files outside the sandbox directory, reading
    outside it and the Python library, '..' in changing paths, links, chdir,
    sockets, ctypes, starting processes (unless ``allow_processes``, which exists
    only to test the OS-level containment), killing anything but itself, frame and
    gc introspection, tracing, and raising resource limits.

    Threat model, honestly: the limits, the clean-up and the secret are enforced by
    the kernel and by a separate process, and hold against any program. The file
    and network policy is enforced inside the interpreter the program runs in; it
    stops accidents (``rm -rf``, writing to /tmp, opening sockets) and casual
    tampering, but an in-process hook is not a security boundary (PEP 578 says so):
    a determined program may find an unaudited path through C extensions. Run
    untrusted code at scale inside a container/VM or as an unprivileged user too.
    Also inherent to assert-based tests: a program can return an object whose
    ``__eq__`` is always true, or patch a module function a test calls.
    """
    limits = limits or Limits()
    start = time.monotonic()
    sandbox = os.path.realpath(tempfile.mkdtemp(prefix="sfr-sandbox-"))
    token, nonce = secrets.token_hex(16), secrets.token_hex(16)
    cpu = int(timeout + limits.cpu_slack + 0.999)
    rlimits = [("RLIMIT_AS", limits.memory_bytes, limits.memory_bytes),
               ("RLIMIT_CPU", cpu, cpu + 1),
               ("RLIMIT_FSIZE", limits.file_bytes, limits.file_bytes),
               ("RLIMIT_NOFILE", limits.open_files, limits.open_files),
               ("RLIMIT_CORE", 0, 0)]
    if not allow_processes:
        rlimits.append(("RLIMIT_NPROC", 0, 0))
    policy = dict(_POLICY, allow_processes=allow_processes)
    if not allow_processes:
        policy["removed_functions"] = _POLICY["removed_functions"] + _POLICY["session_functions"]
    env = {_TOKEN_VAR: token, "TMPDIR": sandbox, "HOME": sandbox, "PATH": "/usr/bin:/bin",
           "LC_ALL": "C.UTF-8"}
    result_r, result_w = os.pipe()
    proc = cgroup = pidfd = None
    buffers: dict[int, bytearray] = {}
    ending = "error"
    try:
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-B", "-c", _child_source()],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                cwd=sandbox, env=env, pass_fds=(result_w,), start_new_session=True)
        finally:
            os.close(result_w)  # the child holds the only write end now
        # Join the cgroup before the child reads its config, i.e. before any untrusted code.
        cgroup = _Cgroup.create(f"check-{token}", limits.max_tasks) if _Cgroup.bases() else None
        if cgroup is not None:
            try:
                cgroup.add(proc.pid)
            except OSError:  # contain it with the /proc sweep instead
                cgroup.remove()
                cgroup = None
        try:
            pidfd = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):  # not Linux >= 5.3: poll instead
            pidfd = None
        out_fd = proc.stdout.fileno()
        buffers = {out_fd: bytearray(), result_r: bytearray()}
        config = marshal.dumps({
            "program": program, "setup_code": setup_code, "tests": list(tests), "nonce": nonce,
            "result_fd": result_w, "sandbox": sandbox, "timeout": float(timeout),
            "rlimits": rlimits, "policy": policy})
        try:
            proc.stdin.write(config)
            proc.stdin.close()
        except BrokenPipeError:  # died before reading; its exit status tells why
            pass
        ending = _pump(buffers, limits.output_bytes, start + timeout, proc, pidfd)
    finally:
        if proc is not None:
            _kill_everything(proc, cgroup, token)
            if ending != "cap":  # the writers are dead: collect what is still in the pipes
                _pump(buffers, limits.output_bytes, time.monotonic() + 1.0)
            proc.wait()
            proc.stdout.close()
            if proc.stdin and not proc.stdin.closed:
                try:
                    proc.stdin.close()
                except BrokenPipeError:
                    pass
        for fd in (result_r, pidfd):
            if fd is not None:
                os.close(fd)
        if cgroup is not None:
            cgroup.remove()
        _rmtree(sandbox)
    out = bytes(buffers[out_fd])[:limits.output_bytes]
    verdict = bytes(buffers.get(result_r, b"")).split(b"\n")
    status, detail = _verdict(verdict, nonce, ending, proc.returncode, timeout, limits)
    return CheckResult(status, detail, time.monotonic() - start,
                       out.decode("utf-8", "replace"), proc.returncode)


def _verdict(lines: list[bytes], nonce: str, ending: str, returncode: int, timeout: float,
             limits: Limits) -> tuple[str, str]:
    if b"PASS\t" + nonce.encode() in lines:
        return "passed", ""
    if ending == "deadline":
        return "timeout", f"still running after {timeout:g} s"
    if ending == "cap":
        return "killed", f"output over {limits.output_bytes} bytes"
    if returncode is not None and returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
        why = {"SIGXCPU": "CPU time limit", "SIGXFSZ": "file size limit"}.get(name, name)
        return "killed", f"killed by {name} ({why})" if why != name else f"killed by {name}"
    fails = [line for line in lines if line.startswith(b"FAIL\t")]
    if fails:
        _, status, detail = fails[-1].decode("utf-8", "replace").split("\t", 2)
        return (status if status in STATUSES else "error"), detail
    return "error", f"exited with code {returncode} before the tests finished"


def check_program(program: str, tests: list[str], timeout: float, setup_code: str = "") -> bool:
    """True if ``program`` passes every assert in ``tests`` in the sandbox (see ``run_program``)."""
    return run_program(program, tests, timeout, setup_code).passed


def run_checks(jobs: list[tuple[str, list[str], str]], timeout: float, *, workers: int | None = None,
               limits: Limits | None = None, desc: str | None = None,
               on_result=None) -> list[CheckResult]:
    """Run many ``(program, tests, setup_code)`` checks in parallel; results in input order.

    One thread per worker, each waiting on its own child process, so
    ``workers`` (default: the number of CPUs) checks run at once. ``desc`` shows
    a tqdm progress bar; ``on_result(index, result)`` is called as each finishes.
    """
    workers = workers or os.cpu_count() or 1
    results: list[CheckResult | None] = [None] * len(jobs)
    bar = None
    if desc is not None:
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(jobs), desc=desc, unit="check")
        except ImportError:  # the bar is a convenience, not a requirement
            pass

    def one(i):
        program, tests, setup_code = jobs[i]
        return i, run_program(program, tests, timeout, setup_code, limits=limits)

    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for i, result in pool.map(one, range(len(jobs))):
                results[i] = result
                if on_result is not None:
                    on_result(i, result)
                if bar is not None:
                    bar.update()
    finally:
        if bar is not None:
            bar.close()
    return results


# ---------------------------------------------------------------------------
# 4. pass@k
# ---------------------------------------------------------------------------

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass (Chen et al. 2021, eq. 1).

    ``1 - C(n-c, k) / C(n, k)``, computed as ``1 - prod_{i=n-c+1..n} (1 - k/i)``
    to avoid huge binomials. 0 when c == 0, 1 when fewer than k samples fail.
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


# ---------------------------------------------------------------------------
# 5. Evaluation
# ---------------------------------------------------------------------------

class ResultStore:
    """Finished results on disk, one JSON object a line, so an interrupted run resumes.

    ``add`` appends one line with a single write and fsyncs it. A crash can only
    leave the last line incomplete (no newline at the end, or not valid JSON);
    opening the store drops that line and truncates the file back to the last
    complete record, so the file is always a list of whole records. A bad line
    anywhere else was not written by us: that raises ``ValueError``.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._results: dict[str, object] = {}
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = self.path.read_bytes() if self.path.exists() else b""
        good = 0  # bytes of complete, valid records
        for lineno, line in enumerate(data.split(b"\n"), 1):
            end = good + len(line) + 1
            if end > len(data):  # the last piece has no newline: an interrupted write
                break
            try:
                rec = json.loads(line)
                self._results[str(rec["key"])] = rec["value"]
            except (ValueError, KeyError, TypeError):
                if end < len(data):
                    raise ValueError(f"{self.path}:{lineno}: not a result record; "
                                     "the file was changed by something else") from None
                break  # the final line, cut short before its newline reached the disk
            good = end
        if good < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good)
                os.fsync(f.fileno())

    def __contains__(self, key) -> bool:
        return str(key) in self._results

    def __len__(self) -> int:
        return len(self._results)

    def get(self, key, default=None):
        return self._results.get(str(key), default)

    def items(self):
        return list(self._results.items())

    def add(self, key, value) -> None:
        """Record ``value`` (JSON-serialisable) under ``key``; durable when this returns."""
        line = (json.dumps({"key": str(key), "value": value}, sort_keys=True) + "\n").encode()
        with self._lock:
            self._append(line)
            self._results[str(key)] = value

    def _append(self, data: bytes) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)


def _normalise(code: str) -> str | None:
    """Layout- and comment-free form of a program (its AST dump); None if it does not parse."""
    try:
        return ast.dump(ast.parse(code))
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None


def _problem_summary(task_id: int, codes: list[str], results: list[CheckResult],
                     ks: tuple[int, ...]) -> dict:
    n, c = len(results), sum(r.passed for r in results)
    trees = [_normalise(code) for code in codes]
    summary = {
        "task_id": task_id, "n": n, "c": c,
        "parse_rate": sum(t is not None for t in trees) / n if n else 0.0,
        "distinct_passing": len({t for t, r in zip(trees, results) if r.passed}),
        "outcomes": [{"status": r.status, "detail": r.detail[:300]} for r in results],
    }
    for k in ks:
        if n >= k:
            summary[f"pass@{k}"] = pass_at_k(n, c, k)
    return summary


def evaluate_samples(records: list[dict], samples: dict[int, list[str]], timeout: float, *,
                     ks: tuple[int, ...] = (1, 5, 10), workers: int | None = None,
                     limits: Limits | None = None, store: ResultStore | None = None,
                     desc: str | None = None) -> dict:
    """Score model completions: ``samples[task_id]`` is a list of raw completions.

    Each completion goes through ``extract_code`` and the sandbox with its
    problem's tests. Per problem: n, c, pass@k for each k <= n, the fraction of
    samples whose code parses, the number of distinct passing programs (after
    ``ast.dump``, so layout and comments do not count) and every sample's outcome.
    With ``store``, problems already in it (with as many samples) are not run again
    and each problem is stored as soon as its last sample finishes. Returns ``{"problems": {task_id:
    ...}, "summary": ...}`` where summary averages over problems (pass@k over those
    with n >= k).
    """
    by_id = {rec["task_id"]: rec for rec in records}
    missing = sorted(set(samples) - set(by_id))
    if missing:
        raise KeyError(f"samples for task_ids not in the records: {missing[:10]}")
    # A stored problem counts as done only for the same number of samples; a store
    # belongs to one set of samples (one model, one method, one seed).
    problems = {tid: store.get(tid) for tid in samples
                if store is not None and tid in store and store.get(tid)["n"] == len(samples[tid])}
    todo = [tid for tid in samples if tid not in problems]
    jobs, owner = [], []
    for tid in todo:
        rec = by_id[tid]
        for completion in samples[tid]:
            jobs.append((extract_code(completion), rec["test_list"], rec["test_setup_code"]))
            owner.append(tid)
    left = {tid: len(samples[tid]) for tid in todo}
    done: dict[int, dict[int, CheckResult]] = {tid: {} for tid in todo}

    def finished(i, result):
        tid = owner[i]
        done[tid][i] = result
        left[tid] -= 1
        if left[tid] == 0:
            order = sorted(done[tid])
            problems[tid] = _problem_summary(tid, [jobs[j][0] for j in order],
                                             [done[tid][j] for j in order], ks)
            if store is not None:
                store.add(tid, problems[tid])

    for tid in todo:  # a problem with no samples is finished already
        if left[tid] == 0:
            problems[tid] = _problem_summary(tid, [], [], ks)
    run_checks(jobs, timeout, workers=workers, limits=limits, desc=desc, on_result=finished)
    return {"problems": {tid: problems[tid] for tid in samples}, "summary": _summarise(problems, ks)}


def _summarise(problems: dict, ks: tuple[int, ...]) -> dict:
    values = list(problems.values())
    summary = {"problems": len(values)}
    for k in ks:
        scored = [p[f"pass@{k}"] for p in values if f"pass@{k}" in p]
        summary[f"pass@{k}"] = sum(scored) / len(scored) if scored else None
        summary[f"problems_with_n>={k}"] = len(scored)
    for key in ("parse_rate", "distinct_passing"):
        summary[key] = sum(p[key] for p in values) / len(values) if values else None
    return summary


# ---------------------------------------------------------------------------
# 6. check-references: the sandbox against 974 known-good programs
# ---------------------------------------------------------------------------

def check_references(records: list[dict], timeout: float, *, workers: int | None = None,
                     limits: Limits | None = None, progress: bool = True) -> dict:
    """Run every record's reference ``code`` with its ``test_setup_code`` and ``test_list``.

    No task is special-cased: a reference that fails is reported as failing.
    Returns per-split pass counts, the failures (task_id -> status and detail),
    the wall time and the throughput in checks per second.
    """
    jobs = [(rec["code"], rec["test_list"], rec["test_setup_code"]) for rec in records]
    start, cpu_start = time.monotonic(), _cpu_seconds()
    results = run_checks(jobs, timeout, workers=workers, limits=limits,
                         desc="references" if progress else None)
    wall, cpu = time.monotonic() - start, _cpu_seconds() - cpu_start
    split_of = {rec["task_id"]: name for name, recs in split_mbpp(records).items() for rec in recs}
    per_split = {name: {"passed": 0, "total": 0} for name in SPLITS}
    failures = {}
    for rec, result in zip(records, results):
        counts = per_split[split_of[rec["task_id"]]]
        counts["total"] += 1
        counts["passed"] += result.passed
        if not result.passed:
            failures[rec["task_id"]] = {"status": result.status, "detail": result.detail}
    return {"per_split": per_split, "passed": sum(r.passed for r in results), "total": len(results),
            "failures": failures, "wall_time": wall, "checks_per_second": len(results) / wall,
            "cpu_seconds": cpu, "workers": workers or os.cpu_count() or 1}


def _cpu_seconds() -> float:
    """CPU time of this process and its reaped children: what the checks cost,
    independent of whatever else the machine is running."""
    import resource
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


# ---------------------------------------------------------------------------
# 7. Command line
# ---------------------------------------------------------------------------

def _load_or_explain(path: str) -> list[dict]:
    if not os.path.exists(path):
        raise SystemExit(f"{path}: no such file; get it with "
                         f"`python reproduce_mbpp.py download --dest {path}`")
    digest = sha256_file(path)
    if digest != MBPP_SHA256:
        print(f"note: {path} has sha256 {digest}, not the recorded {MBPP_SHA256}; "
              "numbers may differ from ours", file=sys.stderr)
    return load_mbpp(path)


def _limits_from(args) -> Limits:
    return Limits(memory_bytes=args.memory_mb << 20)


def _cmd_download(args) -> int:
    dest = download_mbpp(args.url, args.dest, args.sha256)
    print(f"{dest}: sha256 {args.sha256} verified")
    return 0


def _cmd_check_references(args) -> int:
    records = _load_or_explain(args.mbpp)
    wanted = set(args.splits)
    records = [r for name, recs in split_mbpp(records).items() if name in wanted for r in recs]
    report = check_references(records, args.timeout, workers=args.workers,
                              limits=_limits_from(args), progress=not args.no_progress)
    print("\n| split | passed | total |\n|---|---|---|")
    for name, counts in report["per_split"].items():
        if counts["total"]:
            print(f"| {name} | {counts['passed']} | {counts['total']} |")
    print(f"| all | {report['passed']} | {report['total']} |\n")
    failing = sorted(report["failures"])
    print(f"failing task_ids ({len(failing)}): {failing}")
    for tid in failing:
        f = report["failures"][tid]
        print(f"  {tid}: {f['status']}: {f['detail'][:160]}")
    print(f"\n{report['total']} checks in {report['wall_time']:.1f} s = "
          f"{report['checks_per_second']:.1f} checks/s with {report['workers']} workers "
          f"on {os.cpu_count()} CPUs ({platform.machine()}, "
          f"{'cgroup' if _Cgroup.bases() else '/proc sweep'} containment)")
    # Wall-clock throughput depends on what else runs; CPU per check does not.
    load = " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    print(f"CPU per check {1000 * report['cpu_seconds'] / report['total']:.1f} ms "
          f"(harness + child); load average during the run {load}")
    return 0


def _cmd_evaluate(args) -> int:
    records = _load_or_explain(args.mbpp)
    samples: dict[int, list[str]] = {}
    with open(args.samples, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                rec = json.loads(line)
                samples.setdefault(int(rec["task_id"]), []).append(rec["completion"])
    store = ResultStore(args.results) if args.results else None
    report = evaluate_samples(records, samples, args.timeout, workers=args.workers,
                              limits=_limits_from(args), store=store,
                              desc=None if args.no_progress else "samples")
    print(json.dumps(report["summary"], indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="MBPP (Austin et al. 2021) is CC BY 4.0; keep the attribution with any result.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("download", help="download mbpp.jsonl and verify its sha256")
    p.add_argument("--dest", default="mbpp.jsonl", help="where to put the file (default: %(default)s)")
    p.add_argument("--url", default=MBPP_URL, help="where to get it (default: the google-research copy)")
    p.add_argument("--sha256", default=MBPP_SHA256,
                   help="refuse a copy with any other checksum (default: the copy this project uses)")
    p.set_defaults(func=_cmd_download)

    def common(p):
        p.add_argument("--mbpp", required=True, help="path to mbpp.jsonl (see the download command)")
        p.add_argument("--timeout", type=float, default=5.0,
                       help="wall-clock seconds per program, start-up included (default: %(default)s)")
        p.add_argument("--workers", type=int, default=None,
                       help="programs run at once (default: the number of CPUs)")
        p.add_argument("--memory-mb", type=int, default=1024,
                       help="address-space limit per program in MiB (default: %(default)s)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("check-references",
                       help="run every reference solution through the sandbox; print pass counts and checks/s")
    common(p)
    p.add_argument("--splits", nargs="+", choices=list(SPLITS), default=list(SPLITS),
                   help="which splits to run (default: all)")
    p.set_defaults(func=_cmd_check_references)

    p = sub.add_parser("evaluate", help="score model samples: pass@k, parse rate, distinct passing programs")
    common(p)
    p.add_argument("--samples", required=True,
                   help='jsonl, one {"task_id": int, "completion": str} a line, several per task for pass@k')
    p.add_argument("--results", default=None,
                   help="jsonl store of finished problems; a rerun skips them (default: none)")
    p.set_defaults(func=_cmd_evaluate)

    _add_run_parser(sub, common)  # section 8
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # recorded with the results
    return args.func(args)


# ---------------------------------------------------------------------------
# 8. Training and sampling: the `run` subcommand
# ---------------------------------------------------------------------------
# The controlled comparison of DESIGN.md section 6: one model, one data set, one seed,
# one data order and one number of steps for every method; only the auxiliary loss of
# sfr.Config changes.
#
#   built-in model  a byte-level GPT, first pretrained on this interpreter's standard
#                   library sources (cached under --cache-dir), then fine-tuned on the
#                   MBPP train split once per method, each time from those same weights
#   --model PATH    a local Hugging Face causal LM fine-tuned per method, optionally
#                   through LoRA adapters (merged into the weights before export)
#
# Then per method: the per-token loss of the test problems' reference solutions, n
# samples per test problem at each temperature, run through the sandbox (section 3),
# pass@k (section 4), parse rate and diversity. Every stage writes what it finishes to
# --out as it goes (exports, ResultStores), so a rerun with the same --out continues
# where the last one stopped. torch and sfr are imported inside the functions, so that
# sections 1-7 stay torch-free.

METHODS = {  # name -> sfr.Config overrides; every other field is shared by all methods
    "none": dict(aux="none"),  # next-token SFT
    "mtp": dict(aux="mtp", mtp_k=4),  # Gloeckle et al. 2024: heads for tokens 2..4 on the shared trunk
    "sfr": dict(aux="flow"),  # SFR as the authors run it: unit-norm MiniLM targets, lambda = 1
    "sfr_std": dict(aux="flow", target_scale="std"),  # SFR, targets standardised per dimension
    "sfr_null": dict(aux="flow", null_targets=True),  # control: SFR with targets shuffled across examples
    "mse": dict(aux="mse"),  # the authors' deterministic ablations: one point per context
    "cosine": dict(aux="cosine"),
    # the ladder from MTP to SFR (DESIGN.md section 3), restrictions lifted one at a time
    "ladder_mtp": dict(aux="ladder"),
    "ladder_brier": dict(aux="ladder", ladder_divergence="sq"),
    "ladder_gauss": dict(aux="ladder", ladder_divergence="sq", ladder_source="gaussian"),
    "ladder_flow": dict(aux="ladder", ladder_divergence="sq", ladder_source="gaussian", ladder_field="flow"),
    "ladder_kl": dict(aux="ladder", ladder_divergence="sq", ladder_source="gaussian", ladder_field="flow",
                      ladder_path="kl"),
    "ladder_sfr": dict(aux="ladder", ladder_divergence="sq", ladder_source="gaussian", ladder_field="flow",
                       ladder_target="embedding"),
}

# The built-in model, sized so that the default run (pretraining, three methods, 100
# problems x 10 samples, execution) takes about 20 minutes on a shared 2-core CPU.
# Byte tokens: an SFR target is the MiniLM embedding of the next 64 bytes (about a line of
# code), anchored every 16 bytes; every response position feeds the head, as the authors'.
BUILTIN = dict(backbone="gpt", tokenizer="byte", n_layer=4, n_head=4, n_embd=128, block_size=512,
               k=64, stride=16, min_suffix=16, fm_positions=0, lam=1.0, head_width=256, head_layers=3,
               steps=150, batch_size=8, lr=1e-3, lr_warmup=10, eval_every=0, ckpt_every=50)
PRETRAIN = dict(aux="none", steps=150, batch_size=16, lr=3e-3, lr_warmup=20)
# A Hugging Face model: sub-word tokens, so a shorter window in tokens (the authors use
# k = 256, s = 32 on responses far longer than MBPP's ~50 tokens).
HF_MODEL = dict(tokenizer="byte", block_size=1024, k=32, stride=8, min_suffix=8, fm_positions=0, lam=1.0,
                head_width=1024, head_layers=3, steps=300, batch_size=8, lr=2e-5, lr_warmup=20, eval_every=0,
                ckpt_every=100)
SMOKE = dict(n_layer=1, n_head=2, n_embd=32, head_width=32, steps=2, batch_size=2, ckpt_every=0)
ARCH = ("n_layer", "n_head", "n_embd", "block_size", "dropout")  # pretraining and fine-tuning share these
PROMPT_RESERVE = 128  # a prompt longer than block_size - this is cut on the left (its end names the function)
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _barrier() -> None:
    import torch
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _write_json(path: str | os.PathLike, obj) -> None:
    """Atomic: a reader (or a crash) sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")  # insertion order: methods as run
    os.replace(tmp, path)


def _config_key(cfg) -> dict:
    """The fields that decide what a training run computes (not where or how often it writes)."""
    import dataclasses
    import sfr
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in sfr.RESUME_FREE + ("cache",)}


def _same_run(folder: Path, meta: dict) -> None:
    """Refuse to resume into a folder that holds a different run."""
    path = folder / "meta.json"
    if path.exists():
        old = json.loads(path.read_text())
        changed = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
        if changed:
            raise SystemExit(f"{folder} holds a run with other settings ({', '.join(changed)}); "
                             "pass another --out or delete that folder")
    elif _rank() == 0:
        _write_json(path, meta)


# --- 8a. pretraining the built-in model on the standard library --------------

def stdlib_sources() -> list[Path]:
    """The pretraining corpus: this interpreter's standard library sources, real Python
    that every machine has (nothing to download), test suites and installed packages left out."""
    import sysconfig
    files = []
    for folder, dirs, names in os.walk(sysconfig.get_paths()["stdlib"]):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        files += [Path(folder) / n for n in sorted(names) if n.endswith(".py")]
    return files


def corpus_windows(files: list[Path], n: int, length: int, seed: int) -> list[str]:
    """n windows of `length` characters of the concatenated files, each starting at the
    beginning of a line picked uniformly at random (seeded)."""
    import random
    text = "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    rng = random.Random(seed)
    starts = [text.find("\n", rng.randrange(max(1, len(text) - 2 * length))) + 1 for _ in range(n)]
    return [text[s:s + length] for s in starts]


def pretrain(cfg, cache_dir: Path, log=print, progress=True) -> tuple[str, dict]:
    """Pretrain the built-in GPT (cfg: aux='none') on stdlib_sources() and cache the
    backbone's state_dict in cache_dir, keyed by a hash of cfg, the corpus file list and
    the Python version; a later run with the same key loads it instead. Every 20th file
    is held out for the eval loss. Returns (path of the .pt file, its record)."""
    import dataclasses
    import shutil as _shutil
    import sysconfig
    import sfr
    files = stdlib_sources()
    root = Path(sysconfig.get_paths()["stdlib"])
    corpus = [(str(f.relative_to(root)), f.stat().st_size) for f in files]
    key = hashlib.sha256(json.dumps({"config": _config_key(cfg), "corpus": corpus,
                                     "python": platform.python_version()}, sort_keys=True).encode())
    key = key.hexdigest()[:16]
    path, meta_path = cache_dir / f"pretrain-{key}.pt", cache_dir / f"pretrain-{key}.json"
    if path.exists() and meta_path.exists():
        return str(path), {**json.loads(meta_path.read_text()), "cached": True}
    held_out = set(files[::20])
    n_train = cfg.steps * cfg.batch_size  # every window is seen once
    # Empty prompts: sfr.prepare gives each window a lone <eos> to be predicted from, and
    # collate ends each with <eos> too; at 1 target in block_size, a harmless artefact.
    windows = corpus_windows([f for f in files if f not in held_out], n_train, cfg.block_size - 1, cfg.seed)
    eval_windows = corpus_windows(sorted(held_out), 64, cfg.block_size - 1, cfg.seed)
    tok = sfr.Tokenizer("byte")
    train_set = sfr.prepare([("", w) for w in windows], tok, cfg)
    eval_set = sfr.prepare([("", w) for w in eval_windows], tok, cfg)
    work = cache_dir / f"pretrain-{key}"
    cfg = dataclasses.replace(cfg, out_dir=str(work), resume=True)
    t0 = time.time()
    model, history = sfr.train(cfg, train_set, tok, eval_set, log=log, progress=progress)
    record = {"key": key, "files": len(files), "held_out_files": len(held_out),
              "corpus_bytes": sum(size for _, size in corpus), "windows": n_train,
              "seconds": time.time() - t0, "train_ar_last": history[-1]["ar"],
              "eval_ar": history[-1].get("eval_ar"), "config": _config_key(cfg), "corpus_root": str(root)}
    if _rank() == 0:
        sfr.save_checkpoint(str(path), model.backbone.state_dict())
        _write_json(meta_path, record)
        _shutil.rmtree(work, ignore_errors=True)  # the resumable checkpoint is not needed any more
    _barrier()
    return str(path), {**record, "cached": False}


# --- 8b. fine-tuning, once per method ----------------------------------------

class _LoRA:
    """sfr.train builds its backbone itself; to train LoRA adapters, wrap the HF model it
    builds (before the aux heads and the optimiser see it) by swapping sfr.build_backbone
    for the length of a `with` block."""

    def __init__(self, r: int, alpha: int, dropout: float):
        self.r, self.alpha, self.dropout = r, alpha, dropout

    def __enter__(self):
        import sfr
        from peft import LoraConfig, get_peft_model
        self.build = build = sfr.build_backbone
        lora = LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules="all-linear", task_type="CAUSAL_LM")

        def build_with_lora(cfg, vocab_size):
            backbone = build(cfg, vocab_size)
            if not isinstance(backbone, sfr.HFBackbone):
                raise ValueError("--lora needs --model (a Hugging Face model)")
            backbone.hf = get_peft_model(backbone.hf, lora)
            return backbone
        sfr.build_backbone = build_with_lora
        return self

    def __exit__(self, *exc):
        import sfr
        sfr.build_backbone = self.build


def finetune(cfg, tok, train_pairs, eval_pairs, encoder=None, lora: _LoRA | None = None,
             log=print, progress=True) -> Path:
    """Fine-tune one method (cfg) on (prompt, response) pairs and export the deployable
    model (no heads, no encoder) to cfg.out_dir/export. An export that is there already is
    reused; a run that stopped mid-training resumes from its checkpoint (cfg.resume)."""
    import contextlib
    import sfr
    out, export_dir = Path(cfg.out_dir), Path(cfg.out_dir) / "export"
    if (export_dir / "DONE").exists():
        return export_dir
    train_set = sfr.prepare(train_pairs, tok, cfg, encoder)
    eval_set = sfr.prepare(eval_pairs, tok, cfg, encoder)
    if cfg.null_targets:
        sfr.shuffle_targets(train_set, cfg.seed)
    if encoder is not None and _rank() == 0:
        encoder.save()
    t0 = time.time()
    with lora or contextlib.nullcontext():
        model, history = sfr.train(cfg, train_set, tok, eval_set, log=log, progress=progress)
    if _rank() == 0:
        if lora is not None:
            model.backbone.hf = model.backbone.hf.merge_and_unload()  # a plain model again
        sfr.export(model, str(export_dir), tok)
        _write_json(out / "train.json", {"seconds": time.time() - t0, "history": history})
        (export_dir / "DONE").write_text("")
    _barrier()
    return export_dir


def load_for_sampling(export_dir: Path, device: str):
    """The exported model, as a deployed user would load it (sfr.load_exported)."""
    import sfr
    model, _ = sfr.load_exported(str(export_dir))
    return model.to(device).eval()


# --- 8c. sampling and the loss of the reference solutions --------------------

def _crop_prompt(prompt: list[int], block: int) -> list[int]:
    """Keep room for the response: a prompt longer than block - PROMPT_RESERVE loses its start."""
    return prompt[-(block - PROMPT_RESERVE):] if len(prompt) > block - PROMPT_RESERVE else prompt


def _gpt_forward_cached(gpt, idx, kv, t0: int):
    """Logits (B, t, V) of the built-in GPT for tokens idx (B, t) at positions t0..t0+t-1,
    the keys and values of positions < t0 being in kv (one (2, B, nh, T_max, hs) buffer per
    block), to which this call adds its own. The same computation as sfr.GPT.forward, one
    step at a time (tests/test_mbpp_run.py checks the two agree): sfr.generate recomputes
    the whole sequence for every new token, ~50x slower at MBPP's prompt lengths."""
    import torch
    import torch.nn.functional as F
    B, t = idx.size()
    x = gpt.wte(idx) + gpt.wpe(torch.arange(t0, t0 + t, device=idx.device))
    for block, buf in zip(gpt.blocks, kv):
        attn, C = block.attn, x.size(-1)
        q, k, v = attn.qkv(block.ln1(x)).split(C, dim=2)
        q, k, v = (z.view(B, t, attn.n_head, C // attn.n_head).transpose(1, 2) for z in (q, k, v))  # (B, nh, t, hs)
        buf[0, :, :, t0:t0 + t], buf[1, :, :, t0:t0 + t] = k, v
        # a prompt (t0 = 0) attends causally; one new token (t = 1) attends to everything before it
        y = F.scaled_dot_product_attention(q, buf[0, :, :, :t0 + t], buf[1, :, :, :t0 + t], is_causal=t0 == 0)
        x = x + attn.proj(y.transpose(1, 2).reshape(B, t, C))
        x = x + block.mlp(block.ln2(x))
    return gpt.lm_head(gpt.ln_f(x))


def sample_gpt(gpt, prompt: list[int], n: int, max_new_tokens: int, temperature: float, eos_id: int,
               generator=None) -> list[list[int]]:
    """n completions of one prompt from the built-in GPT, with a key-value cache. Same
    sampling rule and random draws as sfr.generate (temperature 0 = greedy); each
    completion stops at eos_id, which it does not include."""
    import torch
    if len(prompt) + max_new_tokens > gpt.block_size:
        raise ValueError(f"{len(prompt)} prompt + {max_new_tokens} new tokens > block_size={gpt.block_size}")
    C, nh = gpt.wte.embedding_dim, gpt.blocks[0].attn.n_head
    dev = gpt.wte.weight.device
    kv = [torch.zeros(2, n, nh, len(prompt) + max_new_tokens, C // nh, device=dev) for _ in gpt.blocks]
    with torch.no_grad():
        logits = _gpt_forward_cached(gpt, torch.tensor([prompt], device=dev).expand(n, -1), kv, 0)[:, -1]
        out = torch.zeros(n, 0, dtype=torch.long, device=dev)
        done = torch.zeros(n, dtype=torch.bool, device=dev)
        for i in range(max_new_tokens):
            logits = logits.float()
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                nxt = torch.multinomial((logits / temperature).softmax(-1).cpu(), 1, generator=generator).to(dev)
            nxt = nxt.masked_fill(done[:, None], eos_id)
            done |= nxt[:, 0] == eos_id
            out = torch.cat([out, nxt], 1)
            if done.all() or i == max_new_tokens - 1:
                break
            logits = _gpt_forward_cached(gpt, nxt, kv, len(prompt) + i)[:, -1]
    rows = out.tolist()
    return [row[:row.index(eos_id)] if eos_id in row else row for row in rows]


def sample_hf(model, prompts: list[list[int]], n: int, max_new_tokens: int, temperature: float,
              eos_id: int, pad_id: int, seed: int) -> list[list[list[int]]]:
    """n completions of each prompt from a Hugging Face model, all prompts in one
    left-padded batch through model.generate (its own key-value cache). Plain sampling:
    the model's generation_config (top-k, top-p, repetition penalty) is overridden."""
    import torch
    from transformers import GenerationConfig
    rows = [p for p in prompts for _ in range(n)]
    L = max(len(p) for p in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for i, p in enumerate(rows):
        ids[i, L - len(p):], mask[i, L - len(p):] = torch.tensor(p), 1
    gen = GenerationConfig(do_sample=temperature > 0, temperature=temperature or None, top_k=0, top_p=1.0,
                           repetition_penalty=1.0, max_new_tokens=max_new_tokens, eos_token_id=eos_id,
                           pad_token_id=pad_id)
    torch.manual_seed(seed)
    dev = next(model.parameters()).device
    with torch.no_grad():
        out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), generation_config=gen)
    new = [row[L:] for row in out.tolist()]
    new = [row[:row.index(eos_id)] if eos_id in row else row for row in new]
    return [new[i * n:(i + 1) * n] for i in range(len(prompts))]


def reference_loss(model, tok, rec: dict, block: int) -> dict:
    """Cross-entropy of the reference solution (format_response) given format_prompt, summed
    over its tokens (eos not counted), with how many tokens and bytes that covers; a response
    running past the block is scored up to the block's end."""
    import torch
    import torch.nn.functional as F
    import sfr
    p = _crop_prompt(tok.encode(format_prompt(rec)), block)
    r = tok.encode(format_response(rec))
    scored = r[:block + 1 - len(p)]
    seq = torch.tensor([p + scored], device=next(model.parameters()).device)
    with torch.no_grad():
        logits = sfr.logits_of(model, seq[:, :-1])[0, len(p) - 1:].float()  # (len(scored), V)
    nats = F.cross_entropy(logits, seq[0, len(p):], reduction="sum").item()
    return {"nats": nats, "tokens": len(scored), "bytes": len(tok.decode(scored).encode()),
            "truncated": len(scored) < len(r)}


def sample_stats(codes: list[str], entry_point: str, encoder=None) -> dict:
    """What one problem's samples look like beyond pass/fail. Partial credit for a small
    model: the share that is non-empty and parses (an empty program parses too, so the
    sandbox's parse_rate counts it) and the share that defines the function the tests call.
    Diversity: distinct-1/2 over whitespace tokens, the number of different programs, and
    the Vendi score of their MiniLM embeddings (the effective number of distinct samples, 1..n)."""
    import sfr
    trees = [_parse(c) for c in codes]
    out = {"parses_nonempty": sum(t is not None and bool(c.strip()) for t, c in zip(trees, codes)) / len(codes),
           "defines_entry_point": sum(t is not None and any(
               isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == entry_point
               for node in ast.walk(t)) for t in trees) / len(codes),
           "distinct_1": sfr.distinct_n(codes, 1), "distinct_2": sfr.distinct_n(codes, 2),
           "distinct_samples": len(set(codes))}
    if encoder is not None and len(codes) > 1:
        out["vendi"] = sfr.vendi_score(encoder.encode(codes))
    return out


def _parse(code: str):
    try:
        return ast.parse(code)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None


def entry_point(rec: dict) -> str:
    """The function the first test calls: the first called name that is not a builtin (or
    the first called name, for the one task whose solution shadows `sum`)."""
    import builtins
    tree = _parse(rec["test_list"][0])
    names = [n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)] \
        if tree else []
    return next((n for n in names if not hasattr(builtins, n)), names[0] if names else "")


# --- 8d. the run: train every method, then evaluate every method -------------

def _sampling_seed(seed: int, task_id: int, temperature: float) -> int:
    """The same random draws for every method (common random numbers), fixed per problem."""
    return (seed * 1_000_003 + task_id) * 1_000_033 + round(temperature * 1000)


def _settings(args) -> dict:
    """The resolved settings of a run: model, per-method sfr.Config fields, sampling."""
    builtin = not args.model
    base = dict(BUILTIN if builtin else HF_MODEL)
    if not builtin:
        base["backbone"] = str(Path(args.model).resolve())
        if args.lora:
            base["lr"] = 2e-4  # adapters take a larger step than full fine-tuning
    pre = {**base, **PRETRAIN}
    if args.smoke:
        base.update(SMOKE)
        pre.update(SMOKE)
    if args.steps is not None:
        base["steps"] = args.steps
    if args.pretrain_steps is not None:
        pre["steps"] = args.pretrain_steps
    base.update(_parse_sets(args.set))
    pre.update({k: base[k] for k in ARCH if k in base})
    smoke = args.smoke
    return {"builtin": builtin, "base": base, "pretrain": pre,
            "problems": args.problems if args.problems is not None else (2 if smoke else 100),
            "n": args.n if args.n is not None else (5 if smoke else 10),
            "max_new_tokens": args.max_new_tokens or (24 if smoke else 256),
            "train_limit": args.train_limit if args.train_limit is not None else (8 if smoke else 0),
            "temperatures": args.temperatures, "seed": args.seed}


def _parse_sets(items: list[str]) -> dict:
    """--set FIELD=VALUE for any sfr.Config field, typed like the field's default."""
    import dataclasses
    import sfr
    fields = {f.name: f.default for f in dataclasses.fields(sfr.Config)}
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in fields:
            raise SystemExit(f"--set {item!r}: expected FIELD=VALUE with FIELD one of sfr.Config's fields")
        default = fields[name]
        out[name] = sfr._parse_bool(value) if isinstance(default, bool) else type(default)(value)
    return out


def _pairs(records: list[dict], tok, block: int, limit: int = 0) -> tuple[list, int]:
    """(prompt, response) pairs of format_prompt / format_response, leaving out those whose
    prompt does not fit the block (sfr.prepare would refuse them); and how many were left out."""
    pairs = [(format_prompt(r), format_response(r)) for r in records]
    kept = [(p, r) for p, r in pairs if len(tok.encode(p)) + 1 < block]
    return (kept[:limit] if limit else kept), len(pairs) - len(kept)


def _cmd_run(args) -> int:
    import dataclasses
    import sysconfig
    import torch
    import sfr
    t_start, load_start = time.time(), _load_average()
    s = _settings(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    tag = "builtin" if s["builtin"] else Path(args.model).name
    out = Path(args.out or f"out/mbpp-{'smoke-' if args.smoke else ''}{tag}")
    report = args.report or (str(out / "mbpp") if args.smoke else
                             "results/mbpp" if s["builtin"] else f"results/mbpp-{tag}")
    cache_dir = Path(args.cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; known: {', '.join(METHODS)}")
    methods = args.methods.split(",")
    records = _load_or_explain(args.mbpp)
    splits = split_mbpp(records)
    test = splits["test"][:s["problems"] or None]
    base = sfr.Config(**s["base"], device=device, seed=args.seed,
                      cache=str(cache_dir / "minilm-targets.pt")).validate()
    tok = sfr.build_tokenizer(base, [])  # the model's own tokenizer, or bytes for the built-in one
    log = print if _rank() == 0 else (lambda *a: None)
    progress = not args.no_progress
    seconds: dict[str, float] = {}  # this invocation's, per stage
    timings_path = out / "timings.json"  # stage times summed over every invocation on this --out
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {"stages": {}, "invocations": []}

    def spent(stage, t0):
        seconds[stage] = time.time() - t0
        timings["stages"][stage] = timings["stages"].get(stage, 0.0) + seconds[stage]
        if _rank() == 0:
            _write_json(timings_path, timings)

    # 1. pretraining (built-in model only), cached across runs
    init, pre_record = "", None
    if s["builtin"]:
        t0 = time.time()
        pre = sfr.Config(**s["pretrain"], device=device, seed=args.seed)
        log(f"pretraining the built-in GPT on {sysconfig.get_paths()['stdlib']} ({pre.steps} steps of {pre.batch_size})")
        init, pre_record = pretrain(pre, cache_dir, log, progress)
        log(f"pretrained weights: {init} ({'cached' if pre_record['cached'] else 'trained now'})")
        spent("pretrain", t0)

    # 2. fine-tuning, one export per method, all from the same weights, data and order
    train_pairs, dropped = _pairs(splits["train"], tok, base.block_size, s["train_limit"])
    eval_pairs, _ = _pairs(splits["validation"], tok, base.block_size, s["train_limit"] // 2)
    lora = _LoRA(args.lora_r, args.lora_alpha, args.lora_dropout) if args.lora else None
    encoder = None
    configs, exports = {}, {}
    for name in methods:
        cfg = sfr.Config(**{**dataclasses.asdict(base), **METHODS[name], "init": init,
                            "out_dir": str(out / name), "resume": True}).validate()
        configs[name] = cfg
        key = {**_config_key(cfg), "init": Path(init).name}  # the weights, wherever the cache is
        _same_run(out / name, {"config": key, "model": args.model, "train_examples": len(train_pairs),
                               "lora": [lora.r, lora.alpha, lora.dropout] if lora else None})
        if sfr.needs_encoder(cfg) and encoder is None and not (out / name / "export" / "DONE").exists():
            encoder = sfr.SegmentEncoder(cfg.encoder, device, cache=cfg.cache)
        t0 = time.time()
        log(f"fine-tuning '{name}' ({', '.join(f'{k}={v}' for k, v in METHODS[name].items())}): "
            f"{cfg.steps} steps of {cfg.batch_size} on {len(train_pairs)} train problems")
        exports[name] = finetune(cfg, tok, train_pairs, eval_pairs, encoder, lora, log, progress)
        spent(f"finetune/{name}", t0)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # training was the parallel part
    if _rank() != 0:
        return 0

    # 3. evaluation: reference loss, samples, sandbox, diversity; each problem stored as done
    div_encoder = sfr.SegmentEncoder(base.encoder, device, cache=base.cache)
    results = {}
    for name in methods:
        t0 = time.time()
        results[name] = evaluate_method(name, exports[name], configs[name], tok, test, s, out / name, args,
                                        div_encoder, progress)
        spent(f"evaluate/{name}", t0)
    div_encoder.save()
    wall = time.time() - t_start
    doc = _report_record(args, s, device, methods, configs, results, pre_record, test, dropped,
                         len(train_pairs), seconds, wall, load_start)
    timings["invocations"].append({"command": doc["command"], "wall_seconds": wall, "finished": doc["finished"]})
    _write_json(timings_path, timings)
    doc["stage_seconds_all_invocations"], doc["invocations"] = timings["stages"], timings["invocations"]
    _write_report(doc, report)
    print(markdown_table(doc))
    print(f"\nwrote {report}.json, {report}.md, {report}.png in {wall:.0f} s")
    return 0


def _load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def evaluate_method(name, export_dir, cfg, tok, test, s, folder: Path, args, encoder, progress) -> dict:
    """Everything measured on one method's exported model, each piece stored per problem as it
    finishes (ResultStores in `folder`), so a rerun only does what is missing."""
    import torch
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    model = None

    def loaded():
        nonlocal model
        if model is None:
            model = load_for_sampling(export_dir, cfg.device)
        return model

    def bar(items, desc):
        return tqdm(items, desc=desc, dynamic_ncols=True, leave=False) if (progress and tqdm) else items

    block = cfg.block_size
    loss_store = ResultStore(folder / "reference_loss.jsonl")
    for rec in bar([r for r in test if r["task_id"] not in loss_store], f"{name}: reference loss"):
        loss_store.add(rec["task_id"], reference_loss(loaded(), tok, rec, block))
    per_temp = {}
    for temp in s["temperatures"]:
        tag = f"T{temp:g}-n{s['n']}-new{s['max_new_tokens']}-seed{s['seed']}"
        samples = ResultStore(folder / f"samples-{tag}.jsonl")
        todo = [r for r in test if r["task_id"] not in samples]
        if cfg.backbone == "gpt":
            for rec in bar(todo, f"{name}: sampling T={temp:g}"):
                t0 = time.time()
                p = _crop_prompt(tok.encode(format_prompt(rec)), block)
                g = torch.Generator().manual_seed(_sampling_seed(s["seed"], rec["task_id"], temp))
                rows = sample_gpt(loaded(), p, s["n"], min(s["max_new_tokens"], block - len(p)), temp,
                                  tok.eos_id, g)
                samples.add(rec["task_id"], {"completions": [tok.decode(r) for r in rows],
                                             "seconds": time.time() - t0})
        else:
            chunks = [todo[i:i + args.gen_batch] for i in range(0, len(todo), args.gen_batch)]
            for chunk in bar(chunks, f"{name}: sampling T={temp:g} ({args.gen_batch} problems a batch)"):
                t0 = time.time()
                prompts = [_crop_prompt(tok.encode(format_prompt(r)), block) for r in chunk]
                new = min(s["max_new_tokens"], block - max(len(p) for p in prompts))
                outs = sample_hf(loaded(), prompts, s["n"], new, temp, tok.eos_id, tok.pad_id,
                                 _sampling_seed(s["seed"], chunk[0]["task_id"], temp))
                for rec, rows in zip(chunk, outs):
                    samples.add(rec["task_id"], {"completions": [tok.decode(r) for r in rows],
                                                 "seconds": (time.time() - t0) / len(chunk)})
        completions = {r["task_id"]: samples.get(r["task_id"])["completions"] for r in test}
        checks = ResultStore(folder / f"checks-{tag}.jsonl")
        scored = evaluate_samples(test, completions, args.timeout, workers=args.workers,
                                  limits=_limits_from(args), store=checks,
                                  desc=f"{name}: running T={temp:g}" if progress else None)
        div_store = ResultStore(folder / f"sample-stats-{tag}.jsonl")
        for rec in bar([r for r in test if r["task_id"] not in div_store], f"{name}: diversity T={temp:g}"):
            codes = [extract_code(c) for c in completions[rec["task_id"]]]
            div_store.add(rec["task_id"], sample_stats(codes, entry_point(rec), encoder))
        per_temp[f"{temp:g}"] = {"scored": scored, "diversity": {r["task_id"]: div_store.get(r["task_id"])
                                                                 for r in test},
                                 "sample_seconds": sum(samples.get(r["task_id"])["seconds"] for r in test),
                                 "first_completion": {r["task_id"]: completions[r["task_id"]][0]
                                                      for r in test[:3]}}
    train = json.loads((folder / "train.json").read_text())
    params = sum(p.numel() for p in loaded().parameters())
    return {"parameters": params, "loss": {r["task_id"]: loss_store.get(r["task_id"]) for r in test}, "temperatures": per_temp,
            "train": train}


# --- 8e. the report: JSON, markdown table, figure ----------------------------

def _loss_summary(loss: dict) -> dict:
    import math
    nats = sum(v["nats"] for v in loss.values())
    return {"nats_per_token": nats / max(1, sum(v["tokens"] for v in loss.values())),
            "bits_per_byte": nats / max(1, sum(v["bytes"] for v in loss.values())) / math.log(2),
            "problems": len(loss), "truncated": sum(v["truncated"] for v in loss.values())}


def _paired_difference(loss: dict, base: dict) -> dict:
    """Mean over problems of (this method's - the baseline's) per-token loss, with its
    standard error: the same problems under both, so most of the problem-to-problem
    spread cancels."""
    import statistics
    d = [loss[t]["nats"] / max(1, loss[t]["tokens"]) - base[t]["nats"] / max(1, base[t]["tokens"]) for t in loss]
    se = statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else float("nan")
    return {"mean": statistics.fmean(d), "se": se, "problems": len(d)}


def _report_record(args, s, device, methods, configs, results, pre_record, test, dropped, n_train,
                   seconds, wall, load_start) -> dict:
    import torch
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("transformers", "sentence_transformers", "peft", "numpy"):
        try:
            versions[pkg] = __import__(pkg).__version__
        except ImportError:
            versions[pkg] = None
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    hardware = {"cpu": cpu, "cpus": os.cpu_count(), "machine": platform.machine(), "system": platform.system(),
                "device": device, "torch_threads": torch.get_num_threads(),
                "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
                "load_average_start": load_start, "load_average_end": _load_average()}
    base_name = methods[0]
    doc = {"command": "python reproduce_mbpp.py " + " ".join(args.argv), "wall_seconds": wall,
           "stage_seconds_this_invocation": seconds, "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
           "hardware": hardware, "versions": versions, "seed": args.seed,
           "sampling": {"n": s["n"], "temperatures": s["temperatures"], "max_new_tokens": s["max_new_tokens"],
                        "seeds": "per problem: (seed * 1000003 + task_id) * 1000033 + round(1000 T), "
                                 "the same for every method"},
           "data": {"mbpp": str(args.mbpp), "sha256": sha256_file(args.mbpp), "license": "CC BY 4.0, Austin et al. 2021",
                    "train_problems": n_train, "train_left_out_prompt_too_long": dropped,
                    "test_task_ids": [r["task_id"] for r in test]},
           "model": args.model or "built-in GPT", "lora": {"r": args.lora_r, "alpha": args.lora_alpha,
                                                           "dropout": args.lora_dropout} if args.lora else None,
           "pretrain": pre_record, "baseline": base_name, "methods": {}}
    for name in methods:
        res = results[name]
        hist = res["train"]["history"]
        entry = {"overrides": METHODS[name], "config": _config_key(configs[name]), "parameters": res["parameters"],
                 "train": {"seconds": res["train"]["seconds"], "last_step": hist[-1]},
                 "reference_loss": {**_loss_summary(res["loss"]),
                                    "vs_baseline": _paired_difference(res["loss"], results[base_name]["loss"])},
                 "temperatures": {}, "problems": {}}
        for temp, t in res["temperatures"].items():
            div = list(t["diversity"].values())
            entry["temperatures"][temp] = {
                **t["scored"]["summary"], "sample_seconds": t["sample_seconds"],
                **{k: sum(d.get(k, 0.0) for d in div) / len(div) for k in ("parses_nonempty", "defines_entry_point",
                                                                           "distinct_1", "distinct_2",
                                                                           "distinct_samples", "vendi")},
                "example_completions": t["first_completion"]}
        for rec in test:
            tid = rec["task_id"]
            prob = {"reference_loss": res["loss"][tid]}
            for temp, t in res["temperatures"].items():
                p = dict(t["scored"]["problems"][tid])
                p["outcomes"] = [f"{o['status']}: {o['detail'][:100]}" if o["detail"] else o["status"]
                                 for o in p["outcomes"]]
                prob[f"T={temp}"] = {**p, **t["diversity"][tid]}
            entry["problems"][str(tid)] = prob
        doc["methods"][name] = entry
    return doc


def _fmt(v, pct=False, digits=3) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}%" if pct else f"{v:.{digits}f}"


def markdown_table(doc: dict) -> str:
    """One row per method and temperature. 'defines f': the share of samples whose code
    parses and defines the function the tests call."""
    head = ("| method | T | loss (nats/token) | vs " + doc["baseline"] + " (paired, ±s.e.) | bits/byte "
            "| parses, non-empty | defines f | pass@1 | pass@5 | pass@10 | distinct-2 | Vendi | distinct samples "
            "| distinct passing | train s |\n|" + "---|" * 15)
    rows = [head]
    for name, m in doc["methods"].items():
        loss, vs = m["reference_loss"], m["reference_loss"]["vs_baseline"]
        diff = "-" if name == doc["baseline"] else f"{vs['mean']:+.4f} ± {vs['se']:.4f}"
        for temp, t in m["temperatures"].items():
            rows.append(f"| {name} | {temp} | {loss['nats_per_token']:.4f} | {diff} | {loss['bits_per_byte']:.3f} "
                        f"| {_fmt(t['parses_nonempty'], True)} | {_fmt(t['defines_entry_point'], True)} | {_fmt(t['pass@1'], True)} | {_fmt(t['pass@5'], True)} "
                        f"| {_fmt(t['pass@10'], True)} | {t['distinct_2']:.3f} | {t['vendi']:.2f} "
                        f"| {t['distinct_samples']:.2f} | {t['distinct_passing']:.2f} "
                        f"| {m['train']['seconds']:.0f} |")
    return "\n".join(rows)


def _markdown(doc: dict) -> str:
    hw, s = doc["hardware"], doc["sampling"]
    first = next(iter(doc["methods"].values()))
    cfg = first["config"]
    ids = doc["data"]["test_task_ids"]
    if doc["model"] == "built-in GPT":
        pre = doc["pretrain"]
        model = (f"the built-in byte-level GPT ({cfg['n_layer']} layers, width {cfg['n_embd']}, "
                 f"{first['parameters'] / 1e6:.2f}M parameters, block {cfg['block_size']} bytes), pretrained "
                 f"{pre['config']['steps']} steps of {pre['config']['batch_size']} windows on {pre['files']} "
                 f"standard-library files ({pre['corpus_bytes'] / 1e6:.1f} MB; held-out loss "
                 f"{pre['eval_ar']:.3f} nats/byte)")
    else:
        model = f"{doc['model']} ({first['parameters'] / 1e6:.0f}M parameters{', LoRA' if doc['lora'] else ''})"
    load = hw["load_average_start"]
    lines = [
        "# MBPP: next-token SFT vs MTP vs SFR, same model, data, seed and steps",
        "",
        f"Model: {model}; then fine-tuned {cfg['steps']} steps of {cfg['batch_size']} per method on "
        f"{doc['data']['train_problems']} MBPP train problems, from the same weights, in the same order. "
        f"Evaluated on {len(ids)} test problems (task_ids {ids[0]}-{ids[-1]}), n = {s['n']} samples each, "
        f"at most {s['max_new_tokens']} new tokens. Loss: of the reference solutions of those problems, "
        f"given the prompt; 'vs {doc['baseline']}' is the paired per-problem difference.",
        "",
        markdown_table(doc),
        "",
        f"Command: `{doc['command']}`  ",
        f"Hardware: {hw['cpu']}, {hw['cpus']} CPUs ({hw['device']}, {hw['torch_threads']} torch threads"
        f"{', GPU ' + hw['gpu'] if hw['gpu'] else ''}), load average {load[0]:.1f} at the start "
        "(the machine was shared)  " if load else "",
        f"Wall time: {doc['wall_seconds'] / 60:.1f} min"
        + (f" for this invocation; {len(doc['invocations'])} invocations worked on this output folder, "
           f"{sum(i['wall_seconds'] for i in doc['invocations']) / 60:.1f} min in all" if len(doc["invocations"]) > 1
           else "")
        + f" (per stage: {', '.join(f'{k} {v:.0f} s' for k, v in doc['stage_seconds_all_invocations'].items())})  ",
        f"Versions: {', '.join(f'{k} {v}' for k, v in doc['versions'].items() if v)}",
        "",
        "MBPP: Austin et al. 2021, \"Program Synthesis with Large Language Models\", CC BY 4.0.",
        "",
        "## Reading these numbers",
        "",
        *_reading(doc),
    ]
    return "\n".join(line for line in lines if line is not None) + "\n"


def _reading(doc: dict) -> list[str]:
    """What the table does and does not show, from the numbers themselves."""
    base, ms = doc["baseline"], doc["methods"]
    temps = list(ms[base]["temperatures"])
    solved = any((t.get("pass@1") or 0) > 0 for m in ms.values() for t in m["temperatures"].values())
    out = []
    if doc["model"] == "built-in GPT":
        out.append("- The built-in model is tiny (under 1M parameters, minutes of pretraining on one CPU). What it can "
                   "learn is the surface of Python and of the response format (the fence, `def`, indentation, the "
                   "function name from the test; 'parses' and 'defines f' measure how far it got); it cannot be "
                   "expected to solve MBPP problems, and pass@k near 0 says nothing about the methods. The loss of "
                   "the reference solutions, those two rates and the diversity measures are what can differ.")
    if not solved:
        out.append("- No method solves a single problem here: pass@k cannot separate them.")
    if max(t["parses_nonempty"] for m in ms.values() for t in m["temperatures"].values()) < 0.05:
        out.append("- Fewer than 5% of the samples are non-empty code that parses, for every method and "
                   "temperature: the samples are not programs yet (see `example_completions` in the JSON), so "
                   "the sampling columns (parses, defines f, pass@k, distinct-n, Vendi) describe the model's "
                   "noise, not its programs. Only the reference loss compares the methods here.")
    for name, m in ms.items():
        if name == base:
            continue
        vs = m["reference_loss"]["vs_baseline"]
        sig = abs(vs["mean"]) > 2 * vs["se"]
        out.append(f"- {name} vs {base}: reference loss {vs['mean']:+.4f} nats/token "
                   f"(paired s.e. {vs['se']:.4f} over {vs['problems']} problems): "
                   + ("more than 2 s.e. from zero" if sig else "within 2 s.e. of zero, no measurable difference")
                   + " (the s.e. covers which problems were drawn, not training noise)"
                   + "; " + ", ".join(f"T={t}: Vendi {m['temperatures'][t]['vendi']:.2f} vs "
                                      f"{ms[base]['temperatures'][t]['vendi']:.2f}, parses {100 * m['temperatures'][t]['parses_nonempty']:.1f}% vs "
                                      f"{100 * ms[base]['temperatures'][t]['parses_nonempty']:.1f}%" for t in temps) + ".")
    out.append("- One seed, one training run per method: differences between methods include the run-to-run "
               "spread of training, which this table does not measure (rerun with --seed to see it).")
    return out


def plot(doc: dict, path: str) -> None:
    """Three panels: reference loss, correctness (parse rate, pass@k), diversity."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(doc["methods"])
    temp = next(iter(doc["methods"][names[0]]["temperatures"]))
    ms = [doc["methods"][n] for n in names]
    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    # the paired difference, not the raw losses: the problem-to-problem spread cancels in it
    vs = [m["reference_loss"]["vs_baseline"] for m in ms]
    ax[0].bar(names, [v["mean"] for v in vs], yerr=[2 * v["se"] for v in vs], capsize=4, color="tab:blue")
    ax[0].axhline(0, color="black", lw=0.8)
    ax[0].set_xticks(range(len(names)), [f"{n}\n{m['reference_loss']['bits_per_byte']:.3f} bits/byte"
                                         for n, m in zip(names, ms)])
    ax[0].set(title=f"reference-solution loss minus {doc['baseline']}'s (±2 s.e.)", ylabel="nats per token")
    keys = ["parses_nonempty", "defines_entry_point", "pass@1", "pass@10"]
    width = 0.8 / len(keys)
    for i, k in enumerate(keys):
        vals = [m["temperatures"][temp].get(k) or 0.0 for m in ms]
        ax[1].bar([j + i * width for j in range(len(names))], vals, width, label=k)
    ax[1].set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names)
    ax[1].set(title=f"correctness at T={temp}", ylabel="fraction", ylim=(0, 1))
    ax[1].legend(fontsize=8)
    ax[2].bar(names, [m["temperatures"][temp]["vendi"] for m in ms], color="tab:green")
    ax[2].set(title=f"diversity at T={temp}: Vendi of MiniLM embeddings", ylabel=f"effective samples (of {doc['sampling']['n']})")
    fig.suptitle(f"MBPP, {doc['model']}: only the auxiliary loss differs")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _write_report(doc: dict, prefix: str) -> None:
    _write_json(prefix + ".json", doc)
    md = Path(prefix + ".md")
    tmp = md.with_name(md.name + ".tmp")
    tmp.write_text(_markdown(doc))
    os.replace(tmp, md)
    plot(doc, prefix + ".png")


# --- 8f. command line --------------------------------------------------------

RUN_HELP = """Train the same model once per method and compare them on MBPP (DESIGN.md, section 6).

Methods (--methods, comma-separated) are sfr.Config overrides; everything else is shared:
""" + "\n".join(f"  {name:13s} {', '.join(f'{k}={v!r}' for k, v in kw.items())}" for name, kw in METHODS.items()) + """

Built-in model (default): a byte-level GPT (4 layers, width 128, ~0.9M parameters),
pretrained on this interpreter's standard library sources (cached in --cache-dir), then
fine-tuned per method. --model PATH: a local Hugging Face causal LM (GPU if there is one;
--lora for adapters; multi-GPU training: torchrun --nproc_per_node=N reproduce_mbpp.py run ...).
--smoke: the whole pipeline on a 1-layer model, 2 problems, in well under a minute.
Rerun with the same --out to resume: finished trainings, samples and checks are reused."""


def _add_run_parser(sub, common) -> None:
    p = sub.add_parser("run", help="train per method (none / mtp / sfr / ...), sample, run, report",
                       description=RUN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    common(p)
    p.add_argument("--methods", default="none,mtp,sfr", help="comma-separated names above (default: %(default)s)")
    p.add_argument("--model", default="", help="local Hugging Face causal-LM folder (default: the built-in GPT)")
    p.add_argument("--lora", action="store_true", help="--model: train LoRA adapters, merged before export")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank (default: %(default)s)")
    p.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha (default: %(default)s)")
    p.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout (default: %(default)s)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1... (default: cuda if there is one)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads; 0 = torch's default. On a machine shared with other jobs, 1 is "
                        "often several times faster than 2 (threads spin waiting for each other)")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps per method (default: 150 built-in, "
                                                           "300 --model)")
    p.add_argument("--pretrain-steps", type=int, default=None, help="built-in model (default: 150 of 16 windows)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any sfr.Config field for every method's fine-tuning, e.g. --set lr=5e-4 --set k=32 "
                        "(architecture fields apply to pretraining too); repeatable")
    p.add_argument("--problems", type=int, default=None,
                   help="evaluate the first N test problems (task_ids 11..); 0 = all 500 (default: 100)")
    p.add_argument("--n", type=int, default=None, help="samples per problem (default: 10)")
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.8], help="(default: 0.8)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="per sample (default: 256)")
    p.add_argument("--gen-batch", type=int, default=16, help="--model: problems per generate call (default: 16)")
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N train problems (0 = all)")
    p.add_argument("--seed", type=int, default=0, help="one seed for init, data order, flow noise and sampling")
    p.add_argument("--out", default=None, help="work folder: checkpoints, exports, per-problem stores "
                                               "(default: out/mbpp-builtin, out/mbpp-<model>, out/mbpp-smoke-...)")
    p.add_argument("--report", default=None, help="writes REPORT.json, .md, .png (default: results/mbpp for the "
                                                  "built-in model, results/mbpp-<model>, or OUT/mbpp with --smoke)")
    p.add_argument("--cache-dir", default=str(Path(__file__).resolve().parent / ".cache"),
                   help="pretrained weights and MiniLM targets, shared across runs (default: .cache/ here)")
    p.add_argument("--smoke", action="store_true", help="tiny everything: the whole pipeline in seconds")
    p.set_defaults(func=_cmd_run)


if __name__ == "__main__":
    sys.exit(main())
