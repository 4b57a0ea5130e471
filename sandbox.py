"""A sandbox for checking untrusted Python programs against assert-tests (MBPP style).

``run_program(program, tests, timeout, setup_code)`` runs a program in a fresh,
resource-limited interpreter and returns a ``CheckResult``; ``check_program`` is
the yes/no form and ``run_checks`` runs many at once. Imports only the standard
library (no torch), so ``reproduce_mbpp.py`` and its users can import it cheaply.

Why the verdict cannot be forged
--------------------------------
A pass used to travel from the child to the parent as a message ("PASS <secret>").
Anything that runs in the same process as the program can be made to send that
message, so that channel can never carry a verdict. Here the child never knows
what the right answer is, and never says whether a test passed:

1. The parent parses every test with ``ast`` (``plan_test``). ``assert ACTUAL ==
   EXPECTED`` is split into the parts that need the program (the *leaves*: the
   smallest sub-expressions that mention a name the program or setup code may
   define, e.g. ``min_cost([[1, 2], [3, 4]], 1, 1)``) and everything else (the
   expected value, the comparison, and trusted wrappers such as ``int(...)`` or
   ``set(...)``), which the parent evaluates itself.
2. The child runs program and setup code, then evaluates only the leaves, and
   writes each value to the result pipe as tagged JSON (``encode`` in the child,
   ``decode`` here). Only plain data is encoded: int, float, complex, bool, str,
   bytes, None and tuple/list/dict/set/frozenset of those. A subclass of one of
   these (``Counter``, ``OrderedDict``, a namedtuple, an ``IntEnum``; 4 MBPP
   references return a Counter or defaultdict) is sent as its base type's own
   data, read with the base type's C methods, so its ``__eq__``, ``__iter__`` or
   ``__hash__`` never run. Anything else (an object whose ``__eq__`` is always
   true, a generator, a function) is an error.
3. The parent decodes the values (json and a fixed tag table: never pickle, never
   eval of child output) and evaluates the assert's expression on them. Only the
   parent decides "failed" or "passed".

So whatever the program does, the parent sees at most a list of plain values, one
per leaf, and compares them with expected values the child never held. A program
that writes to any fd (including the result pipe: lines it forges arrive as extra
or malformed lines, which make the check an error; a forged line the harness does
not duplicate is just a value), exits early (missing values: no pass), patches
builtins or the harness's names (at most changes the values sent), or fires
callbacks from C (weakref callbacks, ``__del__``, atexit, audit hooks: same) can
only change *which plain values* reach the parent. A program that returned those
values from its functions would get the same verdict. In other words, to pass, a
program must make the right values appear, which is what the test asks for; it
can no more than hard-code them (which a test of outputs cannot tell from
computing them).

Test shapes in MBPP (``mbpp.jsonl``, 974 tasks; ``survey_test_shapes`` recomputes
this table and tests/test_sandbox.py checks it against the file)::

    shape                                      test_list  challenge_test_list
    assert CALL == literal                          2910                   16
    assert CALL == literal, msg                        6                    0
    assert CALL == sys.getsizeof(literal)              3                    0
    assert int(CALL) == literal                        3                    0
    unsupported                                        0                    0

CALL is a call of the program's function with literal arguments (or the setup
code's variables); the message of ``assert ..., msg`` is never evaluated, and
``int(...)`` and ``sys.getsizeof(...)`` run in the parent. test_setup_code is
non-empty in 2 tasks (it builds binary trees); it runs in the child as code,
like the program. Comparisons are evaluated exactly as written
(MBPP uses ``==`` only, float tests included); ``!=``, ``<`` ... ``in``, ``is`` with
None/True/False, ``and``/``or``/``not``, arithmetic, subscripts and calls of a few
pure built-ins (``TRUSTED_NAMES``) and of ``math``/``cmath`` are supported too.

What is not supported, and what happens: a test that is not a single ``assert``
(an import, an assignment, a loop), or whose program-dependent part sits inside a
lambda, comprehension, starred or walrus expression, is refused before anything
runs: the check is an ``error`` ("unsupported test"), never a pass and never run
in the child, because a statement's success could only be reported by the child.
None of MBPP's 2,938 tests is refused. A leaf whose value is not plain data (a
function passed to ``map``, a tree node) is an ``error`` too.

Operating-system boundary
-------------------------
Where ``bwrap`` (bubblewrap) works (``bwrap_status()`` runs it once to check),
every child runs inside it:

- ``--unshare-all``: no network, and its own pid, ipc, uts and user namespaces;
  ``--die-with-parent``; all capabilities dropped.
- Read-only binds of the system libraries (/usr, /lib*, /bin) and of the
  interpreter's own prefix, wherever that is. Nothing else of the host: of /etc
  only ld.so.cache and localtime, no /home, no /var, no other part of /root.
- Its own /proc and /dev, and a private tmpfs as /tmp of at most
  ``Limits.disk_bytes``. Its cwd is /tmp/sandbox, the only place the audit hook
  lets it write. The tmpfs disappears with the check: nothing is left to clean up.

Elsewhere the fallback is this module's older layers: a temporary directory on the
host (its size polled every 0.1 s, removed afterwards without recursion) and the
in-process audit hook (PEP 578) that refuses reading and writing outside it. Both
run the audit hook; ``CheckResult.boundary`` says which layer ran ("bwrap" or
"hook").

Always, in the child:
- RLIMIT_CPU is the time limit: CPU seconds, so a verdict does not depend on what
  else the machine runs.
- RLIMIT_AS, RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_CORE=0 and RLIMIT_NPROC=0.
- A generous wall cap for programs that sleep (``Limits.wall_seconds``, by default
  10 x timeout + 10 s). MBPP task 123's reference needs 3-4 s of CPU but took up
  to 30 s of wall time on a loaded 2-core machine.
- A per-check cgroup with ``pids.max`` where cgroups are writable.
- SIGKILL for everything the check started.

What it does not stop, plainly
------------------------------
- Without bwrap, the file and network policy is an audit hook inside the
  program's own interpreter: it stops accidents and casual attempts, not a
  deliberate escape (bytecode surgery with ``code.replace(co_code=...)`` reaches
  raw memory and can switch the hook off). Reads are then limited to the Python
  library, but the program can still stat and list any host directory (those
  calls raise no audit event the hook refuses), and what the user running the
  harness can reach, an escaped program can reach. With bwrap, the same escape
  gains nothing outside the namespaces: no network, no host files but the
  read-only interpreter and libraries. Neither layer makes the verdict depend
  on the hook (see above).
- RLIMIT_NPROC does not apply to root (bwrap keeps uid 0 as root's own uid):
  there the cgroup's pids.max (where cgroups are writable) bounds forks, and the
  cgroup, bwrap's pid namespace or the /proc sweep kills them at the end.
  Kernel exploits are out of scope: use a VM.
- The total disk bound without bwrap is a poll: a program can write up to
  0.1 s worth of data past ``Limits.disk_bytes`` before it is killed, and a tree
  too deep to measure (over PATH_MAX) counts as over the bound.
- CPU time: RLIMIT_CPU is per process and counted in whole seconds.
- A test's leaf is evaluated in the program's namespace: if the test wraps the
  program's function in a name the program itself defines (MBPP task 126 is
  called ``sum``), that wrapper is the program's code, as it is in any harness.
- Hard-coded answers pass, as in every output-based test.
"""

from __future__ import annotations

import ast
import builtins
import cmath
import json
import marshal
import math
import os
import secrets
import selectors
import shutil
import signal
import stat as stat_module
import subprocess
import sys
import tempfile
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

STATUSES = ("passed", "failed", "error", "refused", "timeout", "killed")
_TOKEN_VAR = "SFR_SANDBOX_TOKEN"  # marks the environment of every sandboxed process


@dataclass(frozen=True)
class Limits:
    """Resource limits for one check. The time limit (``timeout``) is CPU seconds."""
    memory_bytes: int = 1 << 30     # RLIMIT_AS: address space; an allocation past it is a MemoryError
    output_bytes: int = 64 << 10    # stdout+stderr kept; one more byte and the program is killed
    result_bytes: int = 4 << 20     # encoded values on the result pipe; more and it is killed
    file_bytes: int = 16 << 20      # RLIMIT_FSIZE: largest single file it may write
    disk_bytes: int = 64 << 20      # all its files together (tmpfs size under bwrap, else polled)
    open_files: int = 256           # RLIMIT_NOFILE
    max_tasks: int = 16             # cgroup pids.max: processes + threads, where cgroups are writable
    wall_seconds: float | None = None  # wall cap, for programs that sleep; None: 10 * timeout + 10
    boundary: str = "auto"          # "auto": bwrap if it works, else "hook"; or force "bwrap" / "hook"

    def __post_init__(self):
        for name in ("memory_bytes", "output_bytes", "result_bytes", "file_bytes", "disk_bytes",
                     "open_files", "max_tasks"):
            value = getattr(self, name)
            if type(value) is not int or value <= 0:
                raise ValueError(f"Limits.{name} must be a positive int, got {value!r}")
        if self.wall_seconds is not None and not (math.isfinite(self.wall_seconds) and self.wall_seconds > 0):
            raise ValueError(f"Limits.wall_seconds must be a positive number, got {self.wall_seconds!r}")
        if self.boundary not in ("auto", "bwrap", "hook"):
            raise ValueError(f"Limits.boundary must be auto, bwrap or hook, got {self.boundary!r}")


def check_timeout(timeout) -> float:
    """The CPU-time limit, validated: a positive, finite number of seconds."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (
            math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"timeout must be a positive, finite number of seconds, got {timeout!r}")
    return float(timeout)


@dataclass(frozen=True)
class CheckResult:
    """What happened to one program: ``status`` is one of ``STATUSES``."""
    status: str        # passed | failed (an assert) | error | refused (sandbox) | timeout | killed
    detail: str        # why it did not pass ('' if it passed)
    wall_time: float   # seconds from spawning the child to the end of clean-up
    output: str = ""   # what it printed (stdout and stderr, at most Limits.output_bytes)
    returncode: int | None = None
    boundary: str = ""  # which outer layer ran: "bwrap" or "hook" ("" if nothing ran)
    cpu_time: float | None = None  # CPU seconds of everything the check ran (from its cgroup; None without)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# ---------------------------------------------------------------------------
# Tests, parsed by the parent: what the child evaluates, what the parent compares
# ---------------------------------------------------------------------------

# Pure functions of plain data that a test may wrap around the program's values;
# the parent calls them, so a program cannot make them lie.
TRUSTED_NAMES = {name: getattr(builtins, name) for name in (
    "abs", "all", "any", "bin", "bool", "bytes", "chr", "complex", "dict", "divmod", "enumerate",
    "filter", "float", "frozenset", "hex", "int", "isinstance", "len", "list", "map", "max", "min",
    "oct", "ord", "pow", "range", "repr", "reversed", "round", "set", "sorted", "str", "sum", "tuple",
    "type", "zip", "Ellipsis")}
TRUSTED_MODULES = {"math": math, "cmath": cmath,
                   "sys": types.SimpleNamespace(getsizeof=sys.getsizeof, maxsize=sys.maxsize,
                                                float_info=sys.float_info, int_info=sys.int_info,
                                                byteorder=sys.byteorder)}
_SINGLETONS = (None, True, False, Ellipsis)


class UnsupportedTest(ValueError):
    """A test the parent cannot split into program values and a comparison."""


@dataclass(frozen=True)
class TestPlan:
    """One assert: ``leaves`` go to the child, ``check`` runs in the parent on their values."""
    source: str                # the test as written
    leaves: tuple[str, ...]    # expressions that need the program, evaluated in order
    check: types.CodeType      # the assert's condition with leaf i replaced by the name _v<i>


def bound_names(code: str) -> set[str]:
    """Names that ``code`` may bind in its module namespace (a superset; empty if it does
    not parse: then the child reports the SyntaxError). ``import math`` under its own
    name binds the real module and does not count; ``from m import *`` counts as binding
    every trusted built-in name."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return set()
    names, todo = set(), list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            todo.extend(n for n in ast.walk(node) if isinstance(n, ast.Global))
            continue
        if isinstance(node, ast.Lambda):
            continue
        if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            names.add(node.id)
        elif isinstance(node, ast.Global):
            names.update(node.names)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                if alias.name == "*":
                    names.update(TRUSTED_NAMES)
                elif isinstance(node, ast.Import) and alias.asname is None:
                    top = alias.name.split(".")[0]
                    if top not in TRUSTED_MODULES:
                        names.add(top)
                else:
                    names.add(alias.asname or alias.name)
        elif isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name:
            names.add(node.name)
        elif isinstance(node, ast.MatchMapping) and node.rest:
            names.add(node.rest)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
        todo.extend(ast.iter_child_nodes(node))
    return names


def _free_names(node: ast.AST, memo: dict | None = None) -> frozenset[str]:
    """Names an expression reads from outside itself (lambda and comprehension variables
    excluded); ``memo`` (id(node) -> names) makes repeated calls on subtrees cheap."""
    memo = {} if memo is None else memo
    if id(node) in memo:
        return memo[id(node)]
    free = lambda n: _free_names(n, memo)  # noqa: E731
    if isinstance(node, ast.Lambda):
        a = node.args
        params = {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg] if x}
        defaults = a.defaults + [d for d in a.kw_defaults if d]
        names = (free(node.body) - params).union(*(free(d) for d in defaults))
    elif isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
        inner = [node.key, node.value] if isinstance(node, ast.DictComp) else [node.elt]
        bound = set()
        for gen in node.generators:
            bound |= {n.id for n in ast.walk(gen.target) if isinstance(n, ast.Name)}
            inner += [gen.iter] + gen.ifs
        names = set().union(*(free(n) for n in inner)) - bound | free(node.generators[0].iter)
    elif isinstance(node, ast.Name):
        names = {node.id}
    else:
        names = set().union(*(free(child) for child in ast.iter_child_nodes(node)))
    memo[id(node)] = frozenset(names)
    return memo[id(node)]


# Nodes the parent computes itself when a part of them needs the program.
_OPEN = (ast.Compare, ast.BoolOp, ast.UnaryOp, ast.BinOp, ast.IfExp, ast.Subscript, ast.Slice,
         ast.Tuple, ast.List, ast.Set, ast.Dict, ast.Call, ast.Attribute, ast.keyword, ast.JoinedStr,
         ast.FormattedValue)
# Nodes that bind names or unpack: the program-dependent part cannot be cut out of them.
_CLOSED = (ast.Lambda, ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp, ast.NamedExpr,
           ast.Starred, ast.Await, ast.Yield, ast.YieldFrom)


class _Splitter(ast.NodeTransformer):
    """Replace each smallest program-dependent sub-expression by a name ``_v<i>``."""

    def __init__(self, trusted: set[str]):
        self.trusted, self.leaves, self.memo = trusted, [], {}

    def needs_program(self, node) -> bool:
        return bool(_free_names(node, self.memo) - self.trusted)

    def leaf(self, node):
        self.leaves.append(ast.unparse(node))
        return ast.copy_location(ast.Name(id=f"_v{len(self.leaves) - 1}", ctx=ast.Load()), node)

    def visit(self, node):
        if not isinstance(node, ast.AST) or not self.needs_program(node):
            return node  # the parent evaluates it as it is
        if isinstance(node, _CLOSED):
            raise UnsupportedTest(f"the program is used inside `{ast.unparse(node)}`")
        if isinstance(node, ast.Name):
            return self.leaf(node)
        if isinstance(node, ast.Call) and (self.needs_program(node.func) or any(
                isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords)):
            return self.leaf(node)  # the program's own function, e.g. min_cost(...)
        if isinstance(node, ast.Attribute) and isinstance(node.value, (ast.Name, ast.Attribute)):
            return self.leaf(node)  # e.g. root.left.data: an attribute of the program's object
        if isinstance(node, ast.Dict) and any(k is None for k in node.keys):
            raise UnsupportedTest(f"`**` unpacking in `{ast.unparse(node)}`")
        if isinstance(node, ast.Compare):
            operands = [node.left] + node.comparators
            for op, a, b in zip(node.ops, operands, operands[1:]):
                if isinstance(op, (ast.Is, ast.IsNot)) and not any(
                        (isinstance(x, ast.Constant) and any(x.value is s for s in _SINGLETONS))
                        or (isinstance(x, ast.Name) and x.id in self.trusted) for x in (a, b)):
                    raise UnsupportedTest("`is` compares identity, which plain values do not keep; only `is` "
                                          "None/True/False/... or a trusted name (type(x) is int) is supported")
        if isinstance(node, _OPEN):
            return self.generic_visit(node)
        return self.leaf(node)


def plan_test(source: str, program_names: set[str] = frozenset()) -> TestPlan:
    """Split one test (``assert EXPR[, msg]``) into the leaves and the parent's check.

    ``program_names``: names the program or setup code binds (``bound_names``); a
    trusted name among them is the program's, not the built-in. Raises
    ``UnsupportedTest`` for anything but a single assert of a supported shape.
    """
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError) as e:
        raise UnsupportedTest(f"{source!r} does not parse: {e}") from None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assert):
        raise UnsupportedTest(f"{source[:200]!r} is not a single assert statement")
    trusted = (set(TRUSTED_NAMES) | set(TRUSTED_MODULES)) - set(program_names)
    splitter = _Splitter(trusted)
    condition = splitter.visit(tree.body[0].test)  # the message is never evaluated
    expression = ast.fix_missing_locations(ast.Expression(body=condition))
    return TestPlan(source, tuple(splitter.leaves), compile(expression, "<test>", "eval"))


def plan_tests(tests: list[str], program: str = "", setup_code: str = "") -> list[TestPlan]:
    """``plan_test`` for each test, with the names that program and setup code bind."""
    names = bound_names(program) | bound_names(setup_code)
    return [plan_test(test, names) for test in tests]


def survey_test_shapes(records: list[dict]) -> dict[str, dict[str, int]]:
    """Count MBPP's test shapes per field, as listed in the module docstring."""
    counts: dict[str, dict[str, int]] = {}
    for rec in records:
        names = bound_names(rec["code"]) | bound_names(rec["test_setup_code"])
        for field in ("test_list", "challenge_test_list"):
            for test in rec[field]:
                try:
                    plan = plan_test(test, names)
                except UnsupportedTest:
                    shape = "unsupported"
                else:
                    node = ast.parse(test).body[0]
                    cond = node.test
                    if (isinstance(cond, ast.Compare) and len(cond.ops) == 1 and isinstance(cond.ops[0], ast.Eq)
                            and len(plan.leaves) == 1 and ast.unparse(cond.left) == plan.leaves[0]):
                        try:
                            ast.literal_eval(cond.comparators[0])
                            shape = "assert CALL == literal" + (", msg" if node.msg else "")
                        except ValueError:
                            shape = f"assert CALL == {ast.unparse(cond.comparators[0].func)}(literal)"
                    elif (isinstance(cond, ast.Compare) and isinstance(cond.left, ast.Call)
                          and ast.unparse(cond.left.args[0]) == plan.leaves[0]):
                        shape = f"assert {ast.unparse(cond.left.func)}(CALL) == literal"
                    else:
                        shape = "other: " + ast.unparse(cond)
                counts.setdefault(shape, {"test_list": 0, "challenge_test_list": 0})[field] += 1
    return counts


# ---------------------------------------------------------------------------
# Values from the child: tagged JSON, decoded without running any of its code
# ---------------------------------------------------------------------------
# The child's encoder (inside _sandbox_child) writes: null, true, false, [list...],
# {"i": hex int}, {"f": float.hex}, {"c": [re, im]}, {"u": utf-8 hex}, {"b": hex},
# {"t": [tuple...]}, {"s": [set...]}, {"F": [frozenset...]}, {"d": [[key, value]...]}.

MAX_DEPTH = 100  # nesting of containers in one value


def decode(text: str):
    """The plain value that the child's encoder wrote as ``text``; ValueError if it is not one."""
    try:
        obj = json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    return _build(obj, 0)


def _build(obj, depth):
    if depth > MAX_DEPTH:
        raise ValueError("nested too deeply")
    if obj is None or obj is True or obj is False:
        return obj
    if type(obj) is list:
        return [_build(x, depth + 1) for x in obj]
    if type(obj) is not dict or len(obj) != 1:
        raise ValueError(f"not a tagged value: {str(obj)[:80]}")
    (tag, v), = obj.items()
    if tag in ("i", "f", "u", "b") and type(v) is not str:
        raise ValueError(f"tag {tag!r} needs a string")
    if tag == "i":
        return int(v, 16)
    if tag == "f":
        return float.fromhex(v)
    if tag == "u":
        return bytes.fromhex(v).decode("utf-8", "surrogatepass")
    if tag == "b":
        return bytes.fromhex(v)
    if type(v) is not list:
        raise ValueError(f"tag {tag!r} needs a list")
    if tag == "c" and len(v) == 2 and all(type(x) is str for x in v):
        return complex(float.fromhex(v[0]), float.fromhex(v[1]))
    items = [_build(x, depth + 1) for x in v]
    if tag == "t":
        return tuple(items)
    if tag == "s":
        return set(items)
    if tag == "F":
        return frozenset(items)
    if tag == "d" and all(type(p) is list and len(p) == 2 for p in items):
        return {key: value for key, value in items}
    raise ValueError(f"unknown tag {tag!r}")


def _short(value, n=200) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int too long for str() (sys.set_int_max_str_digits)
        return f"<an int of {value.bit_length()} bits>" if type(value) is int else "<cannot be shown>"
    return text if len(text) <= n else text[:n] + "..."


class _Verdict:
    """The parent's bookkeeping for one check: reads the result pipe, compares as values arrive.

    Lines: ``V <test> <leaf> <json>`` (a value) and ``E <status> <detail>`` (the
    child's report of why it stopped; it can only make a check fail). Anything else
    on the pipe, a second value for the same leaf, or a value that does not decode,
    means the program wrote there: the check is an error.
    """

    def __init__(self, plans: list[TestPlan]):
        self.plans = plans
        self.values: list[dict[int, object]] = [{} for _ in plans]
        self.next = 0            # tests before this one compared true
        self.failure = None      # (status, detail) decided by the parent
        self.malformed = None    # why the pipe cannot be trusted
        self.child_error = None  # (status, detail) from an E line
        self.pending = b""
        self.advance()

    @property
    def decided(self) -> bool:
        return self.failure is not None or self.malformed is not None

    def feed(self, chunk: bytes) -> None:
        self.pending += chunk
        *lines, self.pending = self.pending.split(b"\n")
        for line in lines:
            if not self.decided:
                self.line(line)

    def line(self, line: bytes) -> None:
        parts = line.split(b"\t", 3)
        try:
            if parts[0] == b"E" and len(parts) == 3 and self.child_error is None:
                status = parts[1].decode("ascii")
                self.child_error = (status if status in ("error", "refused") else "error",
                                    parts[2].decode("utf-8", "replace"))
                return
            if parts[0] != b"V" or len(parts) != 4:
                raise ValueError("not a value line")
            i, j = int(parts[1]), int(parts[2])
            if not (0 <= i < len(self.plans) and 0 <= j < len(self.plans[i].leaves)):
                raise ValueError(f"no leaf {i}.{j}")
            if j in self.values[i]:
                raise ValueError(f"a second value for test {i + 1}")
            self.values[i][j] = decode(parts[3].decode("ascii"))
        except (ValueError, TypeError, UnicodeDecodeError, OverflowError, MemoryError) as e:
            self.malformed = f"the result pipe carried a line the harness did not write ({e}): {line[:80]!r}"
            return
        self.advance()

    def advance(self) -> None:
        while self.next < len(self.plans) and not self.decided:
            plan, got = self.plans[self.next], self.values[self.next]
            if len(got) < len(plan.leaves):
                return
            scope = {"__builtins__": {}, **TRUSTED_NAMES, **TRUSTED_MODULES,
                     **{f"_v{j}": v for j, v in got.items()}}
            what = f"test {self.next + 1}: {plan.source.strip()}"
            try:
                ok = bool(eval(plan.check, scope))
            except Exception as e:  # e.g. the value has the wrong type for the test's arithmetic
                self.failure = ("error", f"{what}: {type(e).__name__}: {e}")
                return
            if not ok:
                shown = ", ".join(f"{src} = {_short(got[j])}" for j, src in enumerate(plan.leaves))
                self.failure = ("failed", f"{what}: got {shown or 'nothing from the program'}")
                return
            self.next += 1

    @property
    def passed(self) -> bool:
        return (self.next == len(self.plans) and not self.decided and self.child_error is None
                and not self.pending)


# ---------------------------------------------------------------------------
# The child: policy, audit hook, harness
# ---------------------------------------------------------------------------

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
        "tkinter", "_tkinter", "spwd"],  # spwd reads /etc/shadow in C, with no audit event
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




def _make_sandbox_hook(sandbox, policy):
    """Build the child's audit hook (PEP 578); runs in the child, before any untrusted code.

    It holds the file-system policy: a program may change files only inside
    ``sandbox`` (its cwd) and read only there, in the Python library and a few
    device/zoneinfo paths. Paths are resolved like the kernel does (symlinks
    followed) using C functions only, because anything written in Python that the
    program could monkeypatch must not run inside the hook. For the same reason a
    path must be a str or bytes: a path-like object's ``__fspath__`` could answer
    the hook differently from the system call (so ``os.remove(Path(...))`` is
    refused even inside the sandbox; ``open(Path(...))`` is fine, io.open converts
    first). It also refuses frame and object-graph introspection, tracing and
    signals, so that the program cannot rewrite the harness's locals (the list of
    expressions still to evaluate, the saved builtins). The verdict does not rest on
    this hook: see the module docstring.

    Self-contained (it is sent to the child as source): no module globals.
    """
    import posix
    import sys
    lstat, stat, readlink, getpid = posix.lstat, posix.stat, posix.readlink, posix.getpid
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
            refuse(ValueError, "frame introspection is not allowed")  # namedtuple & co. catch ValueError
        elif event == "object.__getattr__":
            if args[1] in frame_attributes:
                refuse(AttributeError, "frame introspection is not allowed")
    return hook


def _sandbox_child():
    """The trusted half of the harness; runs in the child (``python -I -S -B -c``).

    Order matters: read the config (program, setup code, the leaves of each test)
    from stdin, start a watchdog, set resource limits, trim ``posix``, install the
    audit hook, and only then compile and run program and setup code in one
    namespace, then evaluate each test's leaves and write their values to the
    result pipe. It never sees an expected value and never reports a pass.

    The program shares this interpreter and could rebind any global or builtin name
    the harness uses, so everything used after the program has started is bound to
    a local first, and the encoder runs only C code on exact built-in types.
    Builtins are restored from a snapshot before each test, so a program cannot make
    e.g. ``sorted`` lie to a leaf. Self-contained (sent as source): no module globals.
    """
    import sys
    import posix
    import marshal
    import builtins
    import _thread
    import time
    _exit, _write, _read = posix._exit, posix.write, posix.read
    _exec, _eval, _compile, _BaseException = exec, eval, compile, BaseException
    _str, _type, _len, _join = str, type, len, str.join
    _int, _float, _complex, _bool, _bytes, _dict = int, float, complex, bool, bytes, dict
    _tuple, _NoneType = tuple, type(None)
    _float_hex, _bytes_hex, _str_encode, _int_format = float.hex, bytes.hex, str.encode, int.__format__
    _complex_real, _complex_imag = complex.real.__get__, complex.imag.__get__
    _issubclass, _type_name = issubclass, type.__dict__["__name__"].__get__
    _dict_items, _items_iter = dict.items, type({}.items()).__iter__
    _containers = ((list, None, list.__iter__), (tuple, "t", tuple.__iter__), (set, "s", set.__iter__),
                   (frozenset, "F", frozenset.__iter__))

    def _dict_iter_items(d):
        return _items_iter(_dict_items(d))
    _builtins, _builtins_dict, _snapshot = builtins, builtins.__dict__, dict(builtins.__dict__)
    _clear, _update, _append = dict.clear, dict.update, list.append
    _enumerate, _memoryview = enumerate, memoryview
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

    def send(text):
        view = _memoryview(_str_encode(text, "ascii"))
        while _len(view):
            view = view[_write(fd, view):]

    def report(status, detail):
        try:
            send("E\t" + status + "\t" + _str_encode(detail.replace("\n", " | ").replace("\t", " ")[:2000],
                                                     "ascii", "backslashreplace").decode("ascii") + "\n")
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

    class NotPlain(Exception):
        pass

    def encode(v, depth):
        # tagged JSON (decoded by sandbox.decode in the parent). A subclass of a plain
        # type (Counter, OrderedDict, a namedtuple, an IntEnum) is sent as its base
        # type's own data, read with the base type's C methods: no code of the program
        # runs here (no __eq__, __iter__, __repr__, __hash__, items of a subclass).
        if depth > 100:
            raise NotPlain("the value is nested more than 100 deep")
        t = _type(v)
        if t is _NoneType:
            return "null"
        if _issubclass(t, _bool):
            return "true" if _int_format(v, "d") == "1" else "false"
        if _issubclass(t, _int):
            return '{"i":"' + _int_format(v, "x") + '"}'
        if _issubclass(t, _float):
            return '{"f":"' + _float_hex(v) + '"}'
        if _issubclass(t, _complex):
            return ('{"c":["' + _float_hex(_complex_real(v)) + '","' + _float_hex(_complex_imag(v))
                    + '"]}')
        if _issubclass(t, _str):
            return '{"u":"' + _bytes_hex(_str_encode(v, "utf-8", "surrogatepass")) + '"}'
        if _issubclass(t, _bytes):
            return '{"b":"' + _bytes_hex(v) + '"}'
        parts = []
        if _issubclass(t, _dict):
            for key, value in _dict_iter_items(v):
                _append(parts, "[" + encode(key, depth + 1) + "," + encode(value, depth + 1) + "]")
            return '{"d":[' + _join(",", parts) + "]}"
        for base, tag, iterate in _containers:
            if _issubclass(t, base):
                for item in iterate(v):  # the base type's C iterator over its own storage
                    _append(parts, encode(item, depth + 1))
                body = "[" + _join(",", parts) + "]"
                return body if tag is None else '{"' + tag + '":' + body + "}"
        raise NotPlain("the value is a %s, not plain data (int, float, complex, bool, str, bytes, None, "
                       "or tuple/list/dict/set/frozenset of those)" % _type_name(t))

    # If the parent dies, nothing else would stop a sleeping child.
    def watchdog(sleep=time.sleep, seconds=cfg["wall"] + 5.0):
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

    sys.addaudithook(_make_sandbox_hook(cfg["sandbox"], policy))

    phase = "program"
    try:
        program = _compile(cfg["program"], "<program>", "exec")
        phase = "setup code"
        setup = _compile(cfg["setup_code"], "<setup>", "exec")
        phase = "tests"
        tests = _tuple(_tuple((src, _compile(src, "<test %d>" % (i + 1), "eval")) for src in leaves)
                       for i, leaves in _enumerate(cfg["leaves"]))
    except _BaseException as e:
        report("error", phase + ": " + describe(e))
        _exit(1)

    ns = {"__name__": "__sandbox__", "__builtins__": _builtins}  # not __main__: demo blocks stay off
    phase = "program"
    try:
        _exec(program, ns)
        phase = "setup code"
        _exec(setup, ns)
        for i, leaves in _enumerate(tests):
            _clear(_builtins_dict)  # each test sees the real builtins, whatever ran before it
            _update(_builtins_dict, _snapshot)
            ns["__builtins__"] = _builtins
            for j, (src, code) in _enumerate(leaves):
                phase = "test %d: %s" % (i + 1, src)
                value = _eval(code, ns)
                send("V\t%d\t%d\t%s\n" % (i, j, encode(value, 0)))
    except _BaseException as e:
        what = describe(e)
        report("refused" if "sandbox: " in what else "error", phase + ": " + what)
        _exit(1)
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


# ---------------------------------------------------------------------------
# Containment: cgroups and the /proc sweep
# ---------------------------------------------------------------------------

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

    def procs_file(self) -> str:
        return os.path.join(self.dirs[0], "cgroup.procs")

    def cpu_seconds(self) -> float | None:
        """CPU time used by all members so far (cgroup v2's cpu.stat), or None."""
        try:
            for line in Path(self.dirs[0], "cpu.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "usage_usec":
                    return int(value) / 1e6
        except (OSError, ValueError):
            pass
        return None

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


# ---------------------------------------------------------------------------
# The parent's clean-up of a host directory (only without bwrap)
# ---------------------------------------------------------------------------

def remove_tree(root: str) -> bool:
    """Delete ``root`` and all under it; True if it is gone. Never raises, never recurses.

    A program may leave a tree thousands of levels deep (deeper than PATH_MAX, and
    than Python's recursion limit), directories it chmod-ed to 000, and symlinks.
    So every operation is relative to a directory fd, and instead of descending,
    each subdirectory found is first renamed up into ``root`` itself: the tree
    flattens as it is removed, and at most two directory fds are open at a time.
    Symlinks are removed, never followed.
    """
    try:
        os.chmod(root, 0o700)
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    counter = 0
    try:
        todo: list[str | None] = [None]  # None: root itself; else a directory moved into root
        while todo:
            name = todo.pop()
            try:
                fd = root_fd if name is None else os.open(
                    name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=root_fd)
            except OSError:
                continue
            try:
                with os.scandir(fd) as it:
                    entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
                for entry, is_dir in entries:
                    try:
                        if not is_dir:
                            os.unlink(entry, dir_fd=fd)
                            continue
                        os.chmod(entry, 0o700, dir_fd=fd)  # a directory, not a link: it was lstat-ed
                        if fd == root_fd:
                            todo.append(entry)
                            continue
                        while True:  # a fresh name in root: os.rename would replace an empty dir
                            counter += 1
                            new = f".sfr-rm-{counter}"
                            try:
                                os.lstat(new, dir_fd=root_fd)
                            except FileNotFoundError:
                                break
                        os.rename(entry, new, src_dir_fd=fd, dst_dir_fd=root_fd)
                        todo.append(new)
                    except OSError:
                        pass
            except OSError:
                pass
            finally:
                if fd != root_fd:
                    os.close(fd)
            if name is not None:
                try:
                    os.rmdir(name, dir_fd=root_fd)
                except OSError:
                    pass
    finally:
        os.close(root_fd)
    try:
        os.rmdir(root)
    except OSError:
        pass
    return not os.path.lexists(root)


def tree_bytes(root: str, cap: int) -> int:
    """Disk blocks used under ``root`` in bytes, stopping once past ``cap``. A tree that
    cannot be measured (deeper than PATH_MAX, unreadable) counts as ``cap + 1``."""
    total, todo = 0, [root]
    while todo:
        path = todo.pop()
        try:
            with os.scandir(path) as it:
                for entry in it:
                    st = entry.stat(follow_symlinks=False)
                    total += st.st_blocks * 512
                    if stat_module.S_ISDIR(st.st_mode):
                        todo.append(entry.path)
        except FileNotFoundError:
            continue
        except OSError:
            return cap + 1
        if total > cap:
            return total
    return total


# ---------------------------------------------------------------------------
# The operating-system boundary: bubblewrap
# ---------------------------------------------------------------------------

BWRAP_DIR = "/tmp/sandbox"  # the check's directory inside bwrap, on a tmpfs of its own


def _bwrap_argv(disk_bytes: int) -> list[str]:
    """bwrap and its options: no namespaces shared, read-only interpreter and system
    libraries, a tmpfs /tmp of ``disk_bytes`` holding the working directory."""
    argv = [shutil.which("bwrap") or "bwrap", "--unshare-all", "--die-with-parent", "--new-session",
            "--cap-drop", "ALL", "--proc", "/proc", "--dev", "/dev"]
    seen: list[str] = []
    paths = ["/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", sys.base_prefix, sys.prefix,
             os.path.dirname(os.path.realpath(sys.executable)), os.path.dirname(sys.executable)]
    for path in paths:
        if not os.path.lexists(path) or any(path == s or path.startswith(s + "/") for s in seen):
            continue
        seen.append(path)
        if os.path.islink(path):  # merged /usr: /lib -> usr/lib
            argv += ["--symlink", os.readlink(path), path]
        else:
            argv += ["--ro-bind", path, path]
    for path in ("/etc/ld.so.cache", "/etc/localtime"):
        argv += ["--ro-bind-try", path, path]
    return argv + ["--size", str(disk_bytes), "--tmpfs", "/tmp", "--dir", BWRAP_DIR,
                   "--chdir", BWRAP_DIR, "--"]


_boundary_lock = threading.Lock()
_boundary_cache: dict[str, tuple[bool, str]] = {}


def bwrap_status() -> tuple[bool, str]:
    """(works, why): runs bwrap once (cached) and checks that the child starts, sees
    no /etc/passwd, no network interface but loopback, and its own directory as cwd."""
    with _boundary_lock:
        if "bwrap" not in _boundary_cache:
            _boundary_cache["bwrap"] = _bwrap_self_test()
        return _boundary_cache["bwrap"]


def _bwrap_self_test() -> tuple[bool, str]:
    if not sys.platform.startswith("linux") or shutil.which("bwrap") is None:
        return False, "bwrap is not installed (Debian: apt-get install bubblewrap)"
    probe = ("import os, sys; nets = {l.split(':')[0].strip() for l in open('/proc/net/dev') if ':' in l}; "
             "sys.stdout.write('ok' if not os.path.exists('/etc/passwd') and nets <= {'lo'} "
             "and os.getcwd() == '/tmp/sandbox' else 'open')")
    try:
        done = subprocess.run(_bwrap_argv(1 << 20) + [sys.executable, "-I", "-S", "-B", "-c", probe],
                              capture_output=True, timeout=30, env={"PATH": "/usr/bin:/bin"})
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"bwrap did not run: {e}"
    if done.returncode != 0 or done.stdout != b"ok":
        err = (done.stderr or done.stdout).decode("utf-8", "replace").strip().splitlines()
        return False, f"bwrap failed its self-test (exit {done.returncode}: {err[-1] if err else ''})"
    return True, ""


def choose_boundary(wanted: str = "auto") -> str:
    """'bwrap' or 'hook' for ``Limits.boundary``; RuntimeError if bwrap is wanted and does not work."""
    if wanted == "hook":
        return "hook"
    works, why = bwrap_status()
    if works:
        return "bwrap"
    if wanted == "bwrap":
        raise RuntimeError(why)
    return "hook"


# ---------------------------------------------------------------------------
# Running one check
# ---------------------------------------------------------------------------

def _pump(buffers: dict[int, bytearray], caps: dict[int, int], deadline: float,
          proc: subprocess.Popen | None = None, pidfd: int | None = None,
          on_result=None, result_fd: int | None = None, poll=None) -> str:
    """Read pipes into ``buffers`` until: 'exited' (proc), 'eof' (all pipes), 'deadline',
    'cap' (a buffer got past its cap), 'decided' (``on_result`` returned True after new
    bytes on ``result_fd``), or whatever ``poll()`` returns when it is not None (every 0.1 s)."""
    with selectors.DefaultSelector() as sel:
        for fd in buffers:
            sel.register(fd, selectors.EVENT_READ)
        if pidfd is not None:
            sel.register(pidfd, selectors.EVENT_READ)
        next_poll = time.monotonic() + 0.1
        while True:
            open_pipes = len(sel.get_map()) - (pidfd is not None)
            if proc is None and open_pipes == 0:
                return "eof"
            now = time.monotonic()
            if now >= deadline:
                return "deadline"
            if poll is not None and now >= next_poll:
                why = poll()
                if why:
                    return why
                next_poll = now + 0.1
            # without a pidfd, poll for the exit every 10 ms
            wait = deadline - now
            if proc is not None and pidfd is None:
                wait = min(wait, 0.01)
            if poll is not None:
                wait = min(wait, max(0.0, next_poll - now))
            for key, _ in sel.select(wait):
                if key.fd == pidfd:
                    return "exited"
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                buffers[key.fd] += chunk
                if len(buffers[key.fd]) > caps[key.fd]:
                    return "cap" if key.fd != result_fd else "result cap"
                if key.fd == result_fd and on_result is not None and on_result(chunk):
                    return "decided"
            if proc is not None and pidfd is None and _has_exited(proc):
                return "exited"


class _NotStarted(Exception):
    """run_program's way from a failed spawn to its clean-up."""


def run_program(program: str, tests: list[str], timeout: float, setup_code: str = "", *,
                limits: Limits | None = None, allow_processes: bool = False) -> CheckResult:
    """Run ``program``, then ``setup_code``, then check each assert in ``tests``.

    ``timeout`` is CPU seconds (RLIMIT_CPU, rounded up to whole seconds); the wall
    clock is only a cap for programs that sleep (``Limits.wall_seconds``). Every call
    gets a fresh interpreter (``python -I -S -B``: no site, no user paths, no bytecode
    writes), inside bwrap where it works (``Limits.boundary``), in its own session
    and process group, with the limits of ``Limits`` and RLIMIT_NPROC=0 unless
    ``allow_processes`` (which exists only to test the containment: forks, daemons).
    At the end every process it started is killed: its process group, its cgroup's
    members, and without cgroups every descendant and every process whose environment
    carries this check's token (daemons that called setsid and were reparented to init).

    The verdict comes from the parent alone (module docstring): the child evaluates
    the program-dependent parts of each assert and sends plain values; the parent
    compares. The parent stops the child at the first failing test.
    """
    limits = limits or Limits()
    timeout = check_timeout(timeout)
    start = time.monotonic()
    try:
        plans = plan_tests(tests, program, setup_code)
    except UnsupportedTest as e:
        return CheckResult("error", f"unsupported test: {e}", time.monotonic() - start)
    try:
        layer = choose_boundary(limits.boundary)
    except RuntimeError as e:
        return CheckResult("error", f"sandbox: {e}", time.monotonic() - start)
    verdict = _Verdict(plans)
    if verdict.decided:  # a test that does not need the program and fails on its own
        status, detail = verdict.failure
        return CheckResult(status, detail, time.monotonic() - start, boundary="")
    try:
        host_dir = None if layer == "bwrap" else os.path.realpath(tempfile.mkdtemp(prefix="sfr-sandbox-"))
    except OSError as e:  # e.g. a full disk: this check cannot run, the others may
        return CheckResult("error", f"sandbox: no temporary directory: {e}", time.monotonic() - start)
    sandbox = BWRAP_DIR if layer == "bwrap" else host_dir
    token = secrets.token_hex(16)
    cpu = max(1, math.ceil(timeout))
    wall = limits.wall_seconds or 10 * timeout + 10  # generous: see the module docstring
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
    argv = [sys.executable, "-I", "-S", "-B", "-c", _child_source()]
    if layer == "bwrap":
        argv = _bwrap_argv(limits.disk_bytes) + argv
    cgroup = _Cgroup.create(f"check-{token}", limits.max_tasks) if _Cgroup.bases() else None
    if cgroup is not None:  # join it before exec, so that everything the child starts is inside
        argv = ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', cgroup.procs_file()] + argv
    result_r, result_w = os.pipe()
    proc = pidfd = cpu_used = None
    out_fd = -1
    buffers: dict[int, bytearray] = {}
    ending = "error"

    def disk_poll():
        if tree_bytes(host_dir, limits.disk_bytes) > limits.disk_bytes:
            return "disk"
        return None

    try:
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, cwd=host_dir or "/", env=env,
                                    pass_fds=(result_w,), start_new_session=True)
        except OSError as e:  # e.g. EAGAIN from fork on a crowded machine
            ending = f"could not start the child: {e}"
        finally:
            os.close(result_w)  # the child holds the only write end now
        if proc is None:
            raise _NotStarted
        try:
            pidfd = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):  # not Linux >= 5.3: poll instead
            pidfd = None
        out_fd = proc.stdout.fileno()
        buffers = {out_fd: bytearray(), result_r: bytearray()}
        caps = {out_fd: limits.output_bytes, result_r: limits.result_bytes}
        config = marshal.dumps({
            "program": program, "setup_code": setup_code, "leaves": [list(p.leaves) for p in plans],
            "result_fd": result_w, "sandbox": sandbox, "wall": float(wall),
            "rlimits": rlimits, "policy": policy})
        try:
            proc.stdin.write(config)
            proc.stdin.close()
        except BrokenPipeError:  # died before reading; its exit status tells why
            pass

        def on_result(chunk):
            verdict.feed(chunk)
            return verdict.decided

        ending = _pump(buffers, caps, start + wall, proc, pidfd, on_result, result_r,
                       disk_poll if host_dir else None)
    except _NotStarted:
        pass
    finally:
        if proc is not None:
            _kill_everything(proc, cgroup, token)
            if ending not in ("cap", "result cap", "decided"):  # the writers are dead: read what is left
                before = len(buffers.get(result_r, b""))
                _pump(buffers, {fd: 1 << 62 for fd in buffers}, time.monotonic() + 1.0)
                verdict.feed(bytes(buffers[result_r][before:limits.result_bytes]))
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
            cpu_used = cgroup.cpu_seconds()
            cgroup.remove()
        removed = remove_tree(host_dir) if host_dir else True
    if proc is None:
        return CheckResult("error", f"sandbox: {ending}", time.monotonic() - start, boundary=layer)
    out = bytes(buffers.get(out_fd, b""))
    status, detail = _final(verdict, ending, proc.returncode, layer, timeout, wall, limits)
    if not removed:
        detail += f" (could not remove {host_dir})"
    return CheckResult(status, detail, time.monotonic() - start,
                       out[:limits.output_bytes].decode("utf-8", "replace"), proc.returncode, layer, cpu_used)


def _final(verdict: _Verdict, ending: str, returncode: int | None, layer: str, timeout: float,
           wall: float, limits: Limits) -> tuple[str, str]:
    """The status: the parent's comparisons first, then how the child ended."""
    if verdict.failure is not None:
        return verdict.failure
    if verdict.malformed is not None:
        return "error", verdict.malformed
    if verdict.child_error is not None:
        return verdict.child_error
    if verdict.passed and ending in ("exited", "eof"):
        return "passed", ""
    if ending == "deadline":
        return "timeout", f"still running after {wall:g} s of wall time"
    if ending == "cap":
        return "killed", f"output over {limits.output_bytes} bytes"
    if ending == "result cap":
        return "killed", f"values over {limits.result_bytes} bytes"
    if ending == "disk":
        return "killed", f"files over {limits.disk_bytes} bytes"
    signo = None
    if returncode is not None and returncode < 0:
        signo = -returncode
    elif layer == "bwrap" and returncode is not None and returncode > 128:  # bwrap exits 128 + signal
        signo = returncode - 128
    if signo is not None:
        name = signal.Signals(signo).name if signo in signal.valid_signals() else str(signo)
        if name == "SIGXCPU":
            return "timeout", f"over the CPU time limit of {math.ceil(timeout)} s"
        if name == "SIGXFSZ":
            return "killed", f"killed by SIGXFSZ (a file over {limits.file_bytes} bytes)"
        return "killed", f"killed by {name}"
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
    timeout = check_timeout(timeout)
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
