"""Security: no shell anywhere, service files that never break out of their values, private files.

- No ``shell=True`` (nor ``os.system``/``os.popen`` and their kin) in athanor/: an AST scan, so that a comment or
  a docstring mentioning them does not count and a call spelled differently does.
- The launchd plist and the systemd unit of a model are rendered through the real path (a spec applied to the
  store, ``launch_for``, ``jobs.model_job``, the managers' ``files``), with hostile text wherever a spec allows it:
  paths (the runtime's, the weights', the home's), ``spec.args`` and ``spec.env``. Each file is checked by the
  real tools (``plistutil``, ``systemd-analyze verify``, which also checks that the unit's executable path is a
  file, so systemd's own reading of it is tested) and parsed back: the plist with plistlib, the unit by
  systemd.syntax(7)'s rules; every value must come back exactly. A value a format cannot carry (a newline in a
  unit, a control character in a plist) must be refused with a clear error, never written. Values reach the
  process exactly, through a real systemd user manager too.
- Everything athanor leaves under ATHANOR_HOME after an apply, a runtime's secret, parked slots and caches, the
  daemon's lock, logs and telemetry is private (0700 directories, 0600 files), even under umask 000.
"""

from __future__ import annotations

import ast
import asyncio
import io
import json
import os
import plistlib
import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, Phase, event, given, reject, settings
from hypothesis import strategies as st

from athanor import actions
from athanor.errors import AthanorError, SpecError
from athanor.managers import jobs
from athanor.managers.base import Job, sorted_env
from athanor.managers.launchd import LaunchdManager, render_plist
from athanor.managers.systemd import SystemdManager, render_unit
from athanor.paths import ensure_private_dir, open_private_file
from athanor.runtimes.resolve import launch_for
from athanor.store import open_store
from conftest import REPO
from fixtures.tiny_models import write_tiny_llama_gguf

ATHANOR_SRC = REPO / "athanor"

# ------------------------------------------------------------------------------------------------------ no shell

# Calls that run their argument through /bin/sh, by (module, attribute).
SHELL_CALLS = {("os", "system"), ("os", "popen"), ("subprocess", "getoutput"), ("subprocess", "getstatusoutput"),
               ("asyncio", "create_subprocess_shell")}
SHELL_METHODS = {"subprocess_shell"}  # loop.subprocess_shell(...)


def shell_uses(source: str, filename: str) -> list[str]:
    """Every place ``source`` may run a shell: a ``shell=`` keyword that is not the constant False, a call (or an
    import) of a function that always does. Comments and strings are not code, so they never count."""
    found: list[str] = []
    aliases: dict[str, tuple[str, str]] = {}  # local name -> (module, attribute) for `from os import system`
    modules: dict[str, str] = {}  # local name -> module for `import os as o`
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                modules[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                if (node.module, alias.name) in SHELL_CALLS:
                    found.append(f"{filename}:{node.lineno}: imports {node.module}.{alias.name}")
                aliases[alias.asname or alias.name] = (node.module, alias.name)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        for keyword in node.keywords:
            never = isinstance(keyword.value, ast.Constant) and keyword.value.value is False
            if keyword.arg == "shell" and not never:
                found.append(f"{filename}:{node.lineno}: shell={ast.unparse(keyword.value)}")
        func = node.func
        if isinstance(func, ast.Attribute):
            owner = modules.get(func.value.id, func.value.id) if isinstance(func.value, ast.Name) else None
            if (owner, func.attr) in SHELL_CALLS or func.attr in SHELL_METHODS:
                found.append(f"{filename}:{node.lineno}: {ast.unparse(func)}(...)")
        elif isinstance(func, ast.Name) and aliases.get(func.id) in SHELL_CALLS:
            found.append(f"{filename}:{node.lineno}: {func.id}(...) is {'.'.join(aliases[func.id])}")
    return found


def test_the_scanner_finds_shells_however_spelled_and_ignores_comments_and_strings():
    planted = '''
import os, subprocess as sp
from os import popen as p
import asyncio
# subprocess.run(x, shell=True) in a comment is not code
"""nor os.system('x') in a docstring"""
sp.run(["ls"], shell=False)
sp.run("ls", shell=True)
sp.Popen("ls", shell=1)
sp.call(cmd, shell=flag)
os.system("ls")
p("ls")
sp.getoutput("ls")
asyncio.create_subprocess_shell("ls")
loop.subprocess_shell(factory, "ls")
'''
    assert [hit.split(": ", 1)[1] for hit in shell_uses(planted, "planted.py")] == [
        "imports os.popen", "shell=True", "shell=1", "shell=flag", "os.system(...)", "p(...) is os.popen",
        "sp.getoutput(...)", "asyncio.create_subprocess_shell(...)", "loop.subprocess_shell(...)",
    ]


def test_no_shell_anywhere_in_athanor():
    files = sorted(ATHANOR_SRC.rglob("*.py"))
    assert len(files) > 100, "the scan reads athanor's sources"
    found = [hit for path in files for hit in shell_uses(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))]
    assert found == [], "a shell runs here:\n" + "\n".join(found)
    processes = sum(path.read_text(encoding="utf-8").count("subprocess.") for path in files)
    assert processes > 10, "the scan sees the code that does start processes"


# ------------------------------------------------------------------------------------- plists and units, parsed back

# What each rendered file may hold, and nothing else (a value that broke out would add a key or a line).
PLIST_KEYS = {"Label", "ProgramArguments", "EnvironmentVariables", "WorkingDirectory", "StandardOutPath",
              "StandardErrorPath", "ProcessType", "ThrottleInterval", "ExitTimeOut", "KeepAlive"}
UNIT_KEYS = {"Unit": {"Description", "StartLimitIntervalSec", "StartLimitBurst"},
             "Service": {"Type", "ExecStart", "WorkingDirectory", "Environment", "StandardOutput", "StandardError",
                         "Restart", "RestartSec", "KillMode", "TimeoutStopSec", "UMask"}}
# Pieces of hostile text: markup, quoting, specifiers, variables, separators, escapes, unicode.
NASTY = ['"', "'", "\\", "\\\\", "<", ">", "&", "&amp;", "]]>", "<![CDATA[", "<!--", "%", "%n", "%%", "%h", "$",
         "$$", "${HOME}", "$HOME", "$1", ";", " ; ", " ", "  ", "\t", "`", "*", "?", "~", "#", "=", ":", "@", "-",
         "\\x41", "\\n", "\\\n", "ü", "ünïcödé", "😀", "\u202e", "\u00a0", "\u2028", "日本"]
PARTS = st.one_of(st.sampled_from(NASTY), st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=3))
HOSTILE = st.lists(PARTS, min_size=1, max_size=5).map("".join)
NAME_PART = HOSTILE.map(lambda s: s.replace("/", "_").replace("\0", "")).filter(
    lambda s: s not in ("", ".", "..") and len(s.encode()) <= 60)
ALIAS = HOSTILE.map(lambda s: re.sub(r"\s", "_", s)).filter(lambda s: 1 <= len(s) <= 128)  # the spec's pattern
ENV_KEY = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,12}", fullmatch=True).filter(lambda k: k not in ("PATH",))
# Fixed examples, and no shrinking: a failure reports its example at once rather than minutes later in CI.
PROFILE = settings(derandomize=True, max_examples=60, deadline=None, database=None, report_multiple_bugs=False,
                   phases=(Phase.explicit, Phase.generate),
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

_C_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\", '"': '"',
              "'": "'", "s": " "}


def _unescape(text: str) -> str:
    """C escapes as systemd.syntax(7) lists them (inside a quoted word)."""
    out, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        nxt = text[i + 1]
        if nxt in _C_ESCAPES:
            out.append(_C_ESCAPES[nxt])
            i += 2
        elif nxt == "x":
            out.append(chr(int(text[i + 2:i + 4], 16)))
            i += 4
        elif nxt == "u":
            out.append(chr(int(text[i + 2:i + 6], 16)))
            i += 6
        elif nxt == "U":
            out.append(chr(int(text[i + 2:i + 10], 16)))
            i += 10
        elif nxt in "01234567":
            out.append(chr(int(text[i + 1:i + 4], 8)))
            i += 4
        else:
            raise AssertionError(f"unknown escape \\{nxt} in {text!r}")
    return "".join(out)


def _specifiers(text: str) -> str:
    """``%%`` is a literal ``%``; any other ``%x`` is a specifier systemd would expand: a value that broke out."""
    assert re.fullmatch(r"(?:[^%]|%%)*", text), f"an unescaped specifier in {text!r}"
    return text.replace("%%", "%")


def _words(value: str) -> list[str]:
    """Split a command line the way systemd does for fully quoted words: ``"..."`` separated by spaces."""
    words = []
    pattern = re.compile(r'"((?:[^"\\]|\\.)*)"(?: |$)', re.S)
    pos = 0
    while pos < len(value):
        match = pattern.match(value, pos)
        assert match, f"not a quoted word at {value[pos:pos + 40]!r}"
        words.append(_specifiers(_unescape(match.group(1))))
        pos = match.end()
    return words


def _dollars(word: str) -> str:
    """Arguments (not the executable path) go through variable expansion: ``$$`` is a literal ``$``, and a
    ``${NAME}`` or a whole-word ``$NAME`` would be expanded (a value that broke out)."""
    assert not re.search(r"(?<!\$)(\$\$)*\$\{", word) and not re.fullmatch(r"\$[A-Za-z_]\w*", word), word
    return word.replace("$$", "$")


def parse_unit(text: str) -> dict[str, object]:
    """The unit back as systemd reads it: sections and keys (each once but Environment), the ExecStart argv,
    the environment, the paths."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in text.split("\n"):  # systemd splits lines at LF only (not at U+2028 and the like)
        if not line.strip() or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"a line that is no assignment: {line!r}"
        current.setdefault(key, []).append(value.strip())  # systemd strips the value's surrounding whitespace
    assert sections.keys() == UNIT_KEYS.keys(), sections
    for name, keys in sections.items():  # every key athanor writes, and no other (Environment only when it has one)
        assert UNIT_KEYS[name] - {"Environment", "UMask"} <= set(keys) <= UNIT_KEYS[name], sections
    service = sections["Service"]
    for key, values in (*sections["Unit"].items(), *service.items()):
        assert key == "Environment" or len(values) == 1, (key, values)
    exec_line = service["ExecStart"][0]
    separate = exec_line.startswith("@")  # "@path argv0 args...": the executable and argv[0] spelled apart
    exec_words = _words(exec_line[1:] if separate else exec_line)
    path, argv = exec_words[0], [_dollars(word) for word in exec_words[1:]]  # systemd expands no $ in the path
    if not separate:
        argv.insert(0, _dollars(path))
    env = [_words(value) for value in service.get("Environment", [])]
    assert all(len(words) == 1 and "=" in words[0] for words in env), env
    append = "append:"
    out, err = service["StandardOutput"][0], service["StandardError"][0]
    assert out == err and out.startswith(append)
    return {"path": path, "argv": argv,
            "env": [tuple(words[0].split("=", 1)) for words in env],
            "workdir": _specifiers(service["WorkingDirectory"][0]),
            "log": _specifiers(out[len(append):])}


def verify_unit(tmp: Path, unit: Path) -> None:
    """systemd-analyze verify --user: nothing at all on stderr. It also checks the executable path exists."""
    runtime = tmp / "xdg-runtime"
    runtime.mkdir(exist_ok=True)
    result = subprocess.run(["systemd-analyze", "verify", "--user", str(unit)], capture_output=True, text=True,
                            env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)})
    assert result.returncode == 0 and result.stderr == "", result.stderr


def check_plist(path: Path) -> dict:
    """plistutil reads it (to binary and back) as plistlib does; only the keys athanor writes."""
    with open(path, "rb") as fh:
        data = plistlib.load(fh)
    binary = path.with_suffix(".bin")
    converted = subprocess.run(["plistutil", "-i", str(path), "-f", "bin", "-o", str(binary)], capture_output=True)
    assert converted.returncode == 0, converted.stderr
    with open(binary, "rb") as fh:
        assert plistlib.load(fh) == data, "plistutil reads the same plist"
    assert PLIST_KEYS <= set(data) <= PLIST_KEYS | {"Umask"}, data.keys()
    return data


def check_plist_file(job: Job, tmp: Path) -> None:
    """The launchd rendering of ``job`` carries every value exactly, through plistutil and plistlib."""
    [plist_bytes] = LaunchdManager(tmp / "agents", tmp / "launchd").files(job).values()
    plist_path = tmp / f"{job.label}.plist"
    plist_path.write_bytes(plist_bytes)
    data = check_plist(plist_path)
    assert data["ProgramArguments"] == list(job.argv)
    assert data["EnvironmentVariables"] == dict(job.env)
    assert data["WorkingDirectory"] == job.workdir and data["Label"] == job.label
    assert data["StandardOutPath"] == data["StandardErrorPath"] == job.log_path


def check_unit_file(job: Job, tmp: Path) -> None:
    """The systemd rendering of ``job`` passes systemd-analyze and gives back every value exactly."""
    [(unit_path, unit_bytes)] = SystemdManager(tmp / "units").files(job).items()
    unit = tmp / unit_path.name
    unit.write_bytes(unit_bytes)
    verify_unit(tmp, unit)
    parsed = parse_unit(unit_bytes.decode("utf-8"))
    assert parsed["path"] == job.argv[0], "the executable systemd runs is the one given"
    assert parsed["argv"] == list(job.argv), "ExecStart's argv round-trips exactly"
    assert parsed["env"] == list(job.env)
    assert parsed["workdir"] == job.workdir and parsed["log"] == job.log_path


def check_job_files(job: Job, tmp: Path) -> None:
    check_plist_file(job, tmp)
    check_unit_file(job, tmp)


# What each format cannot carry, so that refusing a job for it is right (the error must name the value):
# XML 1.0 has no control character but tab, LF and CR, and its parsers turn a CR into an LF; a unit file has no
# way to write LF, CR or NUL, and none at all to end a path setting with white space (systemd strips it), and
# systemd refuses an executable path holding a quote, a backslash or a control character.
PLIST_CANNOT = re.compile("[\x00-\x08\x0b-\x1f\ufffe\uffff]")
UNIT_CANNOT = re.compile("[\x00\n\r]")
EXEC_CANNOT = re.compile("[\"'\\\\\x00-\x1f\x7f]")


def uncarried_by_plist(job: Job) -> list[str]:
    values = [*job.argv, *(v for pair in job.env for v in pair), job.workdir, job.log_path]
    return [v for v in values if PLIST_CANNOT.search(v)]


def uncarried_by_unit(job: Job) -> list[str]:
    values = [*job.argv, *(f"{key}={value}" for key, value in job.env), job.workdir, job.log_path]
    found = [v for v in values if UNIT_CANNOT.search(v)]
    found += [job.argv[0]] if EXEC_CANNOT.search(job.argv[0]) else []
    return found + [v for v in (job.workdir, job.log_path) if v != v.rstrip()]


def carried_or_rightly_refused(check, uncarried: list[str], job: Job, tmp: Path) -> str:
    """Run one format's check; a refusal must name a value that format cannot carry. Returns what happened."""
    try:
        check(job, tmp)
    except AthanorError as exc:
        assert uncarried and any(repr(v) in str(exc) or v in str(exc) for v in uncarried), exc
        return "refused"
    assert not uncarried, f"written although it cannot carry {uncarried!r}"
    return "carried"


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("weights") / "tiny.gguf")


@pytest.fixture(scope="module")
def validators() -> None:
    missing = [tool for tool in ("plistutil", "systemd-analyze") if shutil.which(tool) is None]
    assert not missing, f"{', '.join(missing)} missing: scripts/setup.sh --test installs them (libplist-utils, systemd)"


class Applied:
    """A model applied with hostile values through the real store, and the job a manager would run for it."""

    count = 0

    def __init__(self, base: Path, weights: Path, home_part: str, runtime_part: str, source_part: str,
                 args: list[str], env: dict[str, str], alias: str):
        Applied.count += 1
        root = base / f"example-{Applied.count}"
        self.tmp = root / "tmp"
        self.tmp.mkdir(parents=True)
        self.home = root / home_part
        runtime = root / runtime_part / "llama-server"
        runtime.parent.mkdir(parents=True, exist_ok=True)
        runtime.symlink_to("/bin/true")
        source = root / "weights" / source_part / "model.gguf"
        source.parent.mkdir(parents=True, exist_ok=True)
        os.link(weights, source)
        gateway = {"apiVersion": "athanor.dev/v1alpha1", "kind": "Gateway", "metadata": {"name": "default"},
                   "spec": {"runtimes": {"llama-server": {"path": str(runtime)}}, "discovery": {"hfCache": False}}}
        model = {"apiVersion": "athanor.dev/v1alpha1", "kind": "Model", "metadata": {"name": "m"},
                 "spec": {"runtime": "llama-server", "source": {"path": str(source)}, "args": args, "env": env,
                          "aliases": [alias]}}
        text = yaml.safe_dump_all([gateway, model], allow_unicode=True)
        store = open_store(self.home)
        actions.apply(store, ["-"], stdin=io.StringIO(text))  # what `athanor apply -f -` does
        doc = store.models.load()
        assert doc["models"]["m"]["spec"]["aliases"] == [alias]
        launch = launch_for(doc, doc["models"]["m"], self.home)
        assert launch is not None, "the weights were found"
        self.job = jobs.model_job("m", launch, self.home)
        # the hostile values are really in the job
        assert self.job.argv[0] == str(runtime) and str(source) in self.job.argv
        assert list(self.job.argv[len(self.job.argv) - len(args):]) == args
        assert set(env.items()) <= set(self.job.env) and self.job.workdir == str(self.home)


@PROFILE
@given(home_part=NAME_PART, runtime_part=NAME_PART, source_part=NAME_PART,
       args=st.lists(HOSTILE, max_size=4), env=st.dictionaries(ENV_KEY, HOSTILE, max_size=3), alias=ALIAS)
def test_hostile_paths_args_and_env_stay_inside_their_values(tmp_path_factory, weights, validators, home_part: str,
                                                           runtime_part: str, source_part: str, args: list[str],
                                                           env: dict[str, str], alias: str):
    base = tmp_path_factory.getbasetemp() / "hostile"
    try:
        applied = Applied(base, weights, home_part, runtime_part, source_part, args, env, alias)
    except SpecError as exc:  # an arg that is one of the flags athanor manages is refused, rightly
        if "athanor manages" in str(exc) or "instead" in str(exc):
            reject()
        raise
    job = applied.job
    event("plist " + carried_or_rightly_refused(check_plist_file, uncarried_by_plist(job), job, applied.tmp))
    event("unit " + carried_or_rightly_refused(check_unit_file, uncarried_by_unit(job), job, applied.tmp))


NASTY_ARGS = ('a"b', "c'd", "back\\slash", "trailing\\", "\\x41 is not A", "<tag>&amp;]]>", "<![CDATA[x]]>",
              "50% of %n %h %%", "$HOME", "${HOME}", "$$", "a$b", ";", "", " lead and trail ", "tab\there",
              "ünïcödé 😀 \u202e", "\u00a0nbsp", "`id`", "$(id)", "*", "--flag=\"x y\"")
NASTY_ENV = {"QUOTES": "\"'", "XML": "<a>&b]]>", "PCT": "5% %n", "DOLLAR": "$HOME ${HOME} $$", "BS": "\\ \\n",
             "SPACE": " a b ", "UNI": "ünï😀", "EMPTY": "", "EQ": "a=b=c", "SEMI": ";"}


def plist_values(job: Job) -> list[object]:
    data = plistlib.loads(render_plist(job))
    return [data["ProgramArguments"], data["EnvironmentVariables"], data["WorkingDirectory"], data["StandardOutPath"]]


def unit_values(job: Job) -> list[object]:
    parsed = parse_unit(render_unit(job).decode("utf-8"))
    return [parsed["argv"], dict(parsed["env"]), parsed["workdir"], parsed["log"]]


@pytest.mark.parametrize("bad", ["two\nlines", "carriage\rreturn", "crlf\r\n", "nul\0byte", "bell\x07", "esc\x1b[31m",
                                 "del\x7f", "nonchar\ufffe"],
                         ids=["lf", "cr", "crlf", "nul", "bel", "esc", "del", "fffe"])
def test_a_control_character_is_carried_exactly_or_refused_never_mangled(tmp_path, bad: str):
    """Each format either carries the value exactly or refuses the job with a clear error (a unit has no way to
    write a newline; a plist, being XML, none for most control characters)."""
    refused = []
    for place in ("argv", "env", "workdir"):
        job = Job(kind="model", name="m", argv=("/bin/true", bad) if place == "argv" else ("/bin/true",),
                  env=sorted_env({"K": bad} if place == "env" else {}),
                  workdir=str(tmp_path / bad) if place == "workdir" else str(tmp_path),
                  log_path=str(tmp_path / "m.log"))
        want = [list(job.argv), dict(job.env), job.workdir, job.log_path]
        for name, values, uncarried in (("plist", plist_values, uncarried_by_plist(job)),
                                        ("unit", unit_values, uncarried_by_unit(job))):
            try:
                got = values(job)
            except AthanorError as exc:  # refused: it must name a value this format cannot carry
                assert any(repr(v) in str(exc) or v in str(exc) for v in uncarried), exc
                refused.append(name)
                continue
            assert got == want, f"the {name} changed {bad!r} in {place}: {got} != {want}"
    if "\0" in bad:
        assert refused.count("plist") == refused.count("unit") == 3, "NUL fits in neither"


def test_the_nastiest_values_round_trip_through_both_files(tmp_path, validators):
    job = Job(kind="model", name="m", argv=("/bin/true", *NASTY_ARGS), env=sorted_env(NASTY_ENV),
              workdir=str(tmp_path / "dir with spaces \"q\" 'q' % $HOME ${X} \\ ]]> & < ü"),
              log_path=str(tmp_path / "logs %n $x \\ ]]>" / "m.log"))
    check_job_files(job, tmp_path)


# ------------------------------------------------------------------------------------- through a real systemd


REPORT = ("import json, os, sys, time; "  # one line: a unit cannot carry a newline
          "argv = open('/proc/self/cmdline', 'rb').read().decode().split(chr(0))[:-1]; "
          "env = {k: v for k, v in os.environ.items() if k in json.loads(sys.argv[2])}; "
          "open(sys.argv[1], 'w').write(json.dumps({'argv': argv, 'env': env, 'cwd': os.getcwd(), "
          "'exe': os.readlink('/proc/self/exe')})); "
          "print('logged', flush=True); time.sleep(600)")


def run_in_systemd(systemctl, job: Job, out: Path) -> dict:
    """Start ``job`` under the real user manager, read what the process saw, stop it."""
    manager = SystemdManager(systemctl.config_home / "systemd" / "user")
    handle = asyncio.run(manager.start(job))
    try:
        deadline = time.monotonic() + 15
        while not out.exists() or not out.read_text():
            assert time.monotonic() < deadline, "the unit's process did not report"
            time.sleep(0.02)  # polling a condition with a deadline
        return json.loads(out.read_text())
    finally:
        asyncio.run(manager.stop(handle, 5))


def test_nasty_args_env_and_paths_reach_the_process_exactly_under_systemd(tmp_path, systemctl):
    workdir = tmp_path / "work dir \"q\" 'q' % %n $HOME ${HOME} \\ ]]> & < ü 😀"
    workdir.mkdir()
    out = tmp_path / "seen.json"
    argv = (sys.executable, "-c", REPORT, str(out), json.dumps(sorted(NASTY_ENV)), *NASTY_ARGS)
    job = Job(kind="model", name="nasty", argv=argv, env=sorted_env(NASTY_ENV), workdir=str(workdir),
              log_path=str(workdir / "logs %n $x \\ ]]>" / "nasty.log"))
    parsed = parse_unit(render_unit(job).decode())
    assert parsed["argv"] == list(argv) and parsed["env"] == list(job.env), "the test's reading of the unit"
    seen = run_in_systemd(systemctl, job, out)
    assert seen["argv"] == list(argv), "systemd's reading of the unit: the argv given"
    assert seen["env"] == NASTY_ENV and seen["cwd"] == str(workdir)
    assert Path(job.log_path).read_text().endswith("logged\n"), "the output went to the log path given"


def test_a_home_ending_in_white_space_is_the_working_directory_or_refused(tmp_path, systemctl):
    """ATHANOR_HOME is the unit's WorkingDirectory=, a path setting that takes no quotes: systemd strips the white
    space a value ends with, so such a home is refused with its name, or the process runs in exactly it."""
    workdir = tmp_path / "home ends with a space "
    workdir.mkdir()
    out = tmp_path / "seen.json"
    job = Job(kind="model", name="ws", argv=(sys.executable, "-c", REPORT, str(out), "[]"), env=(),
              workdir=str(workdir), log_path=str(tmp_path / "logs" / "ws.log"))
    try:
        render_unit(job)
    except AthanorError as exc:
        assert repr(str(workdir)) in str(exc), exc
        return
    assert run_in_systemd(systemctl, job, out)["cwd"] == str(workdir)


@pytest.mark.parametrize("part", ["spaces in it", "quote\"d", "apo'strophe", "per%cent %n", "back\\slash",
                                  "ünïcödé 😀", "xml ]]> & <", "dollar$sign", "var ${HOME}"])
def test_the_runtime_executable_systemd_runs_is_the_path_given(tmp_path, systemctl, part: str):
    """The first word of ExecStart is a path systemd executes as written (specifiers aside): it expands no
    variables there, while it does in the argv the process gets; and it refuses a path holding a quote or a
    backslash ("Executable name contains special characters"). So the unit runs exactly this path, or rendering
    refuses the job with a clear error; never a unit systemd rejects or runs something else with."""
    directory = tmp_path / part
    directory.mkdir()
    runtime = directory / "python"
    runtime.symlink_to(sys.executable)
    out = tmp_path / "seen.json"
    argv = (str(runtime), "-c", REPORT, str(out), "[]")
    job = Job(kind="model", name="exe", argv=argv, env=(), workdir=str(tmp_path),
              log_path=str(tmp_path / "logs" / "exe.log"))
    try:
        rendered = render_unit(job)
    except AthanorError as exc:  # systemd cannot run this path at all: refusing it here, saying so, is right too
        assert repr(str(runtime)) in str(exc), exc
        return
    unit = tmp_path / job.unit
    unit.write_bytes(rendered)
    verify_unit(tmp_path, unit)
    seen = run_in_systemd(systemctl, job, out)
    assert seen["argv"] == list(argv) and seen["exe"] == os.path.realpath(sys.executable)


# ---------------------------------------------------------------------------------------------- private files


@pytest.fixture
def umask_0() -> Iterator[None]:
    """Everything below runs (and starts processes) under umask 000, the worst case for modes."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_a_runtime_under_systemd_logs_and_writes_privately(tmp_path, systemctl):
    """systemd, not athanor, creates a unit's log file (``StandardOutput=append:``), and the runtime writes its
    slot files itself before athanor seals them: both follow the unit's umask, so the unit must set a private
    one, as the embedded supervisor's log (``open_private_file``) already is."""
    home = ensure_private_dir(tmp_path / "home")
    written = home / "park" / "written-by-the-runtime.bin"
    ensure_private_dir(written.parent)
    out = tmp_path / "seen.json"
    code = (f"open({str(written)!r}, 'wb').write(b'slot'); " + REPORT)
    job = Job(kind="model", name="private", argv=(sys.executable, "-c", code, str(out), "[]"), env=(),
              workdir=str(home), log_path=str(home / "logs" / "private.log"))
    run_in_systemd(systemctl, job, out)
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in (Path(job.log_path), written)}
    assert modes == {"private.log": "0o600", written.name: "0o600"}, modes


def test_everything_athanor_leaves_in_its_home_is_private_under_umask_0(home: Path, tmp_path: Path, weights: Path,
                                                                        umask_0):
    from athanor.managers import logs
    from athanor.parking import apc
    from athanor.parking import files as park
    from athanor.runtimes.secret import issue_secret, secret_path
    from athanor.store.daemon_lock import hold_daemon_lock
    from athanor.telemetry import db
    from conftest import ATHANOR

    source = tmp_path / "weights" / "m.gguf"
    source.parent.mkdir()
    os.link(weights, source)
    spec = tmp_path / "m.yaml"
    spec.write_text("apiVersion: athanor.dev/v1alpha1\nkind: Gateway\nmetadata: {name: default}\n"
                    "spec: {serviceManager: launchd, discovery: {hfCache: false}}\n---\n"
                    "apiVersion: athanor.dev/v1alpha1\nkind: Model\nmetadata: {name: m}\n"
                    f"spec: {{runtime: llama-server, source: {{path: {source}}}}}\n")
    applied = subprocess.run([ATHANOR, "apply", "-f", str(spec)], capture_output=True, text=True, timeout=60)
    assert applied.returncode == 0, applied.stderr
    assert (home / "launchd" / "dev.athanor.model.m.plist").exists(), "the model's plist is written in the home"

    store = open_store(home)
    fd = hold_daemon_lock(store, "127.0.0.1:9")  # what `athanor serve` takes first
    try:
        issue_secret(secret_path(home, "m"))  # the runtime's key, before its start
        slots = park.key_dir(home, "m", "k1")
        park.prepare(slots)  # before llama-server is told to save there
        (slots / park.slot_filename(0)).write_bytes(b"slot" * 100)  # llama-server writes it, under umask 000
        park.seal(slots, "m", "k1", 0, tokens=10)
        shards = park.key_dir(home, "vlm", "k2")
        park.prepare(shards)
        (shards / "ns").mkdir(mode=0o777)  # mlx-vlm's namespace directory and shard, as it makes them
        (shards / "ns" / "a.safetensors").write_bytes(b"shard")
        apc.seal(shards, "k2")
        log = ensure_private_dir(home / "logs") / "m.log"  # as the supervisor opens a runtime's log
        os.close(open_private_file(log, os.O_WRONLY | os.O_APPEND))
        log.write_bytes(b"x" * 2048)
        logs.rotate(log, max_bytes=1024)  # the copy (m.log.1) and the log
        conn = db.connect(db.path_in(home), create=True)
        assert conn is not None
        conn.execute("SELECT 1")
        try:
            loose = [f"{oct(stat.S_IMODE(p.lstat().st_mode))} {p.relative_to(home)}" for p in [home, *home.rglob("*")]
                     if stat.S_IMODE(p.lstat().st_mode) != (0o700 if p.is_dir() else 0o600)]
            assert loose == [], "not private:\n" + "\n".join(loose)
            names = {str(p.relative_to(home)) for p in home.rglob("*")}
            assert {"models.json", "state.json", "daemon.lock", "run/m.key", "launchd/dev.athanor.model.m.plist",
                    "park/m/k1/slot-0.bin", "park/m/k1/slot-0.json", "park/vlm/k2/ns/a.safetensors",
                    "logs/m.log.1", db.FILENAME} <= names, names
        finally:
            conn.close()
    finally:
        os.close(fd)
