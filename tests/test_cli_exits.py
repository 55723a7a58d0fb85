"""Every command of the parser, driven to fail: bad arguments, Redis down, a busy port, a
closed stdout. Each failure is one line on stderr, exit 2 (bad usage or config) or 1 (the
operation failed), never a traceback. The commands are read from the parser, so a new one
is covered (or this file says which value its arguments need).

In-process where no process boundary matters (argument errors, Redis down, what a
one-shot command prints); subprocesses for a closed pipe and a busy port."""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rotator.cli.main import main
from rotator.cli.parser import build_parser, config_file, keyset_name, shield_kids, subparsers
from rotator.core.envelope import generate_kek_line
from rotator.daemon.backup import Backup
from rotator.embedded import EmbeddedRedis, free_port
from tests.conftest import Cli, CliResult
from tests.helpers import foreign_jwk

Command = tuple[str, ...]

# A kid that starts with "-", as one in 64 does: it also checks `shield_kids`.
KID = "-" + "A" * 42
# A value for each argument that some command requires, by its dest.
VALUES = {
    "kid": KID,
    "name": "shop",
    "token": "a.b.c",
    "claims": '{"sub": "me"}',
    "keyset": "default",
    "jwks": "keys.json",
    "until": "1d",
}
# Run until stopped: they wait for Redis (run, serve) or bring their own (dev).
LONG_RUNNING: set[Command] = {("run",), ("serve",), ("dev",)}
# What each command that binds a port reads it from.
PORT_SETTING: dict[Command, str] = {
    ("run",): "ROTATOR_DAEMON__HEALTH_PORT",
    ("serve",): "ROTATOR_SERVER__PORT",
}
# Work without Redis.
OFFLINE: set[Command] = {("kek", "generate"), ("check-config",)}


def _walk(path: Command, parser: argparse.ArgumentParser) -> Iterator[tuple[Command, list[str]]]:
    children = subparsers(parser)
    if not children:
        yield path, [*path, *_required(path, parser)]
    for name, child in children.items():
        yield from _walk((*path, name), child)


def _required(path: Command, parser: argparse.ArgumentParser) -> list[str]:
    argv: list[str] = []
    # A required group of options asks for one of them: the first.
    chosen = {g._group_actions[0] for g in parser._mutually_exclusive_groups if g.required}
    for action in parser._actions:
        if action.option_strings and not (action.required or action in chosen):
            continue
        assert action.dest in VALUES, f"{' '.join(path)}: add a value for {action.dest}"
        given = VALUES[action.dest]
        argv += [action.option_strings[-1], given] if action.option_strings else [given]
    return argv


COMMANDS = dict(_walk((), build_parser()))


def _options(command: Command) -> list[tuple[str, argparse.Action, bool]]:
    """Every option on the way to *command*: its last spelling, its action, and whether
    it is a global one (given before the command)."""
    parsers = [build_parser()]
    for name in command:
        parsers.append(subparsers(parsers[-1])[name])
    return [
        (action.option_strings[-1], action, parser is parsers[0])
        for parser in parsers
        for action in parser._actions
        if action.option_strings
    ]


def _checked_options(command: Command) -> list[tuple[str, bool, tuple[str, ...]]]:
    """The options whose values the parser checks, whether each is global, and values it
    refuses ("abc" and "-1" are fine key set names and file names)."""
    refused: dict[object, tuple[str, ...]] = {keyset_name: ("a b", "{x}"), config_file: ("",)}
    return [
        (option, is_global, refused.get(action.type, ("abc", "-1")))
        for option, action, is_global in _options(command)
        if action.nargs != 0 and (action.choices or action.type not in (None, str, Path))
    ]


def _with(argv: list[str], option: str, value: str, is_global: bool) -> list[str]:
    return [option, value, *argv] if is_global else [*argv, option, value]


BAD_ARGUMENTS = (
    [
        pytest.param(command, [*argv, "--no-such-option"], "--no-such-option", id=f"{name} unknown")
        for command, argv in COMMANDS.items()
        for name in [" ".join(command)]
    ]
    + [
        pytest.param(
            command,
            _with(argv, option, bad, is_global),
            option,
            id=f"{' '.join(command)} {option} {bad}",
        )
        for command, argv in COMMANDS.items()
        for option, is_global, refused in _checked_options(command)
        for bad in refused
    ]
    + [
        # Found by an attacker: both were taken (the table won), and a long KEK id was echoed
        # whole in its error.
        pytest.param(
            ("status",),
            ["status", "--table", "--json"],
            "not allowed with",
            id="status --table --json",
        ),
        pytest.param(
            ("kek", "generate"),
            ["kek", "generate", "--id", "x" * 100_000],
            "must be 1-64 letters",
            id="kek generate --id of 100,000 characters",
        ),
    ]
)


def one_line(result: CliResult) -> bool:
    return result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def refused(result: CliResult, said: str) -> None:
    """*result* is a bad configuration or argument: exit 2, one line, saying *said*."""
    assert result.code == 2, result
    assert one_line(result) and said in result.stderr, result


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch, kek_file: Path) -> pytest.MonkeyPatch:
    """The process environment of an in-process run: a KEK, Redis where nothing listens
    (a test that wants one sets its URL), and the root logger put back afterwards."""
    for name in [name for name in os.environ if name.startswith("ROTATOR_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("ROTATOR_KEYS__KEK_FILE", str(kek_file))
    monkeypatch.setenv("ROTATOR_REDIS__URL", f"redis://127.0.0.1:{free_port()}/0")
    monkeypatch.setenv("ROTATOR_REDIS__SOCKET_TIMEOUT", "1s")
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    return monkeypatch


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> CliResult:
    """``rotator ARGV`` in this process, as the console script runs it."""
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's own exit
        assert isinstance(exc.code, int)
        code = exc.code
    out, err = capsys.readouterr()
    return CliResult(code, out, err)


def test_the_commands_are_read_from_the_parser() -> None:
    assert {("keyset", "add"), ("token", "verify"), ("kek", "generate"), ("run",)} < set(COMMANDS)
    assert len(COMMANDS) == 19
    assert LONG_RUNNING | OFFLINE | set(PORT_SETTING) <= set(COMMANDS)


@pytest.mark.parametrize(("command", "argv", "named"), BAD_ARGUMENTS)
def test_bad_arguments_are_one_line_and_exit_2(
    environment: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: Command,
    argv: list[str],
    named: str,
) -> None:
    """Before: `dev --interval abc` and `--log-level abc` were tracebacks (exit 1),
    `audit --limit -1` was accepted, and argparse's errors began with the usage."""
    result = run(capsys, *argv)
    assert result.code == 2, result
    assert one_line(result) and named in result.stderr, result.stderr
    assert len(result.stderr) < 400, result.stderr[:400]  # an argument is not echoed whole


def test_the_errors_the_issue_names(
    environment: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    dev = run(capsys, "dev", "--interval", "abc")
    assert dev.code == 2 and one_line(dev) and "invalid duration 'abc'" in dev.stderr
    audit = run(capsys, "audit", "--limit", "-1")
    assert audit.code == 2 and one_line(audit) and "from 1 to" in audit.stderr
    # Before: exit 1, "Redis error: value is not an integer or out of range".
    huge = run(capsys, "audit", "--limit", "99999999999999999999999")
    assert huge.code == 2 and one_line(huge) and "--limit" in huge.stderr
    hostile = run(capsys, "status", "--x\nsecond line")
    assert hostile.code == 2 and one_line(hostile), hostile.stderr
    # Before: accepted, and `rotator serve` forked that many workers.
    workers = run(capsys, "serve", "--workers", "65")
    assert (
        workers.code == 2
        and one_line(workers)
        and "--workers: 65 is more than 64" in workers.stderr
    )


# A bad argument that only the command checks (not the parser), for every command that
# has one: each is refused before the command connects to Redis.
CHECKED_BY_THE_COMMAND: dict[Command, list[tuple[list[str], str]]] = {
    ("keyset", "add"): [
        (["keyset", "add", "x", "--schedule", "0 0 * * 8"], "--schedule: invalid cron"),
        (["keyset", "add", "x", "--interval", "abc"], "--interval: invalid duration"),
        (["keyset", "add", "x", "--interval", "1s"], "--cache-max-age: 5m must be at most"),
        (["keyset", "add", "default"], "key set default is defined in the config"),
    ],
    ("keyset", "update"): [
        (["keyset", "update", "x", "--schedule", "0 0 * * 8"], "--schedule: invalid cron"),
        (["keyset", "update", "x", "--overlap", "abc"], "--overlap: invalid duration"),
        (["keyset", "update", "default", "--overlap", "1h"], "defined in the config"),
    ],
    ("keyset", "remove"): [(["keyset", "remove", "default"], "defined in the config")],
    ("token", "sign"): [
        (["token", "sign", "--claims", "nope"], "--claims is not JSON"),
        (["token", "sign", "--claims", "[1]"], "--claims must be a JSON object"),
        # Before: signed, and `rotator token verify` refused the token it made.
        (["token", "sign", "--claims", '{"sub": NaN}'], "--claims is not JSON"),
        (["token", "sign", "--claims", '{"sub": 1e999}'], "--claims is not JSON"),
        (["token", "sign", "--claims", "[" * 1500 + "]" * 1500], "--claims is not JSON"),
        (["token", "sign", "--claims", '{"iat": 1}'], "--claims must not hold exp or iat"),
    ],
}


def _named_keyset_arguments(command: Command) -> Iterator[tuple[list[str], str]]:
    """*command* given a refused key set name wherever it takes one."""
    argv = COMMANDS[command]
    if "name" in VALUES and VALUES["name"] in argv:
        at = argv.index(VALUES["name"])
        yield [*argv[:at], "a b", *argv[at + 1 :]], "argument name: key set name 'a b'"
    if "--keyset" in {option for option, _, _ in _options(command)}:
        yield [*argv, "--keyset", "a b"], "argument --keyset: key set name 'a b'"


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        pytest.param(argv, named, id=f"{' '.join(command)}: {named}")
        for command in COMMANDS
        for argv, named in [
            *_named_keyset_arguments(command),
            *CHECKED_BY_THE_COMMAND.get(command, []),
        ]
    ],
)
def test_a_bad_argument_with_redis_down_is_exit_2_naming_it(
    environment: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    named: str,
) -> None:
    """Before: `keyset add x --schedule "0 0 * * 8"`, `rotate --keyset "a b"` and
    `token sign --claims nope` connected first, so with Redis down they said "cannot
    reach Redis" (exit 1) instead of naming the bad argument."""
    result = run(capsys, *argv)
    assert result.code == 2, result
    assert one_line(result) and named in result.stderr, result.stderr
    assert len(result.stderr) < 400, result.stderr[:400]  # an argument is not echoed whole


def test_every_command_with_an_argument_to_check_has_a_bad_one() -> None:
    checked = {c for c in COMMANDS if any(True for _ in _named_keyset_arguments(c))}
    checked |= set(CHECKED_BY_THE_COMMAND)
    assert checked == set(COMMANDS) - OFFLINE - LONG_RUNNING - {("keyset", "list")}


@pytest.mark.parametrize(
    "case",
    [
        ("ROTATOR_REDIS_URL", "redis://elsewhere:6379/0", "did you mean ROTATOR_REDIS__URL?"),
        ("ROTATOR_ROTATON__INTERVAL", "1h", "did you mean ROTATOR_ROTATION__INTERVAL?"),
        ("ROTATOR_ROTATION__INTERVAL", "abc", "rotation.interval (set by "),
    ],
)
@pytest.mark.parametrize("command", [("check-config",), ("status",)], ids=" ".join)
def test_a_misspelled_or_bad_variable_is_one_line_and_exit_2(
    environment: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: Command,
    case: tuple[str, str, str],
) -> None:
    """Before: a misspelled variable was ignored (exit 0, localhost instead of the URL)."""
    variable, value, said = case
    environment.setenv(variable, value)
    result = run(capsys, *command)
    assert result.code == 2, result
    assert one_line(result) and variable in result.stderr and said in result.stderr, result


def test_an_empty_rotator_config_is_exit_2_naming_it(
    environment: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: ``ROTATOR_CONFIG=`` read as the current directory, "config file .: not
    found"."""
    environment.setenv("ROTATOR_CONFIG", "")
    result = run(capsys, "check-config")
    refused(result, "ROTATOR_CONFIG")


@pytest.mark.parametrize(
    ("command", "argv"),
    [
        pytest.param(c, argv, id=" ".join(c))
        for c, argv in COMMANDS.items()
        if c not in LONG_RUNNING
    ],
)
def test_redis_down_is_one_line_and_exit_1(
    environment: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: Command,
    argv: list[str],
) -> None:
    """Before: `token verify` logged "using the last copies" (there were none) and then
    said the key set "has no published JWKS"; `token sign` said "no key loaded yet"."""
    result = run(capsys, *argv)
    if command in OFFLINE:
        assert result.code == 0 and result.stderr == "", result
        return
    assert result.code == 1, result
    assert one_line(result) and result.stderr.startswith("rotator: cannot reach Redis"), result


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(PORT_SETTING), ids=" ".join)
def test_a_busy_port_is_one_line_and_exit_1(cli: Cli, command: Command) -> None:
    """Before: `rotator run` with its health port in use was an `OSError` traceback."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cli.env[PORT_SETTING[command]] = str(port)
        result = cli(*COMMANDS[command])
    assert result.code == 1, result
    assert one_line(result) and f"cannot listen on 127.0.0.1:{port}" in result.stderr, result


@pytest.mark.slow
def test_a_backup_file_another_daemon_holds_is_one_line_and_exit_1(
    cli: Cli, tmp_path: Path
) -> None:
    """Two daemons given one backup file would each find it replaced by the other at every
    save and write it whole every tick."""
    path = tmp_path / "state.db"
    Backup(path).claim()  # this process: the other daemon
    cli.env["ROTATOR_DAEMON__BACKUP_PATH"] = str(path)
    cli.env["ROTATOR_DAEMON__HEALTH_PORT"] = "0"
    result = cli("run")
    assert result.code == 1, result
    assert one_line(result) and "in use by another process" in result.stderr, result
    assert not path.exists()  # nothing read, nothing written


# Without --yes, `keyset remove` refuses (exit 2) before it has anything to print.
CONFIRMED: dict[Command, list[str]] = {("keyset", "remove"): ["--yes"]}


def closed_stdout(cli: Cli, *argv: str) -> CliResult:
    """Run with stdout a pipe whose reader has gone, as `rotator status | head -1` ends."""
    reader, writer = os.pipe()
    os.close(reader)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "rotator", *argv],
            env=cli.env,
            cwd=cli.cwd,
            stdout=writer,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(writer)
    return CliResult(done.returncode, "", done.stderr)


@pytest.mark.slow
def test_a_closed_stdout_is_exit_1_without_a_traceback(cli: Cli) -> None:
    """Before: `status`, `audit` and `keyset list` into `head -1` ended in
    `BrokenPipeError`. A command that prints its result then exits 1 and says nothing;
    one that fails first says why in one line."""
    assert cli("rotate").code == 0
    printing = {("status",), ("audit",), ("keyset", "list"), ("jwks",), ("check-config",)}
    printing |= {("kek", "generate"), ("token", "sign"), ("dev",), ("keyset", "add")}
    printing |= {("keyset", "update"), ("keyset", "remove"), ("keyset", "import")}
    # `keyset remove` has removed "shop" by then: import into the configured key set.
    (cli.cwd / "keys.json").write_text(json.dumps(foreign_jwk(1)))
    argvs = {**COMMANDS, ("keyset", "import"): ["keyset", "import", "default"]}
    argvs["keyset", "import"] += ["--jwks", "keys.json", "--until", "1d"]
    failures = []
    for command, argv in argvs.items():
        if command in {("run",), ("serve",)}:
            continue  # they print nothing on stdout, and run until stopped
        result = closed_stdout(cli, *argv, *CONFIRMED.get(command, []))
        quiet = result.stderr == "" if command in printing else result.stderr.count("\n") <= 1
        if result.code != 1 or not quiet or "Traceback" in result.stderr:
            failures.append((command, result))
    assert not failures


@pytest.fixture
def live(environment: pytest.MonkeyPatch, redis_server: EmbeddedRedis) -> pytest.MonkeyPatch:
    """The in-process environment with a real Redis."""
    environment.setenv("ROTATOR_REDIS__URL", redis_server.url)
    return environment


def retired_kid(capsys: pytest.CaptureFixture[str], keyset: str) -> str:
    status = run(capsys, "status", "--keyset", keyset, "--json")
    (doc,) = json.loads(status.stdout)
    return next(str(key["kid"]) for key in doc["keys"] if key["status"] == "retired")


def test_one_shot_commands_print_no_log_lines_unless_verbose(
    live: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: `keyset add`, `rotate` and `revoke` logged INFO lines repeating their
    stdout."""
    added = run(capsys, "keyset", "add", "shop")
    assert added.code == 0 and added.stderr == "" and "shop: bootstrap" in added.stdout
    rotated = run(capsys, "rotate", "--keyset", "shop", "--force")
    assert rotated.code == 0 and rotated.stderr == "" and "rotate (manual)" in rotated.stdout
    revoked = run(capsys, "revoke", retired_kid(capsys, "shop"), "--keyset", "shop")
    assert revoked.code == 0 and revoked.stderr == "" and "revoke" in revoked.stdout, revoked
    after = run(capsys, "rotate", "--keyset", "shop", "--force", "--verbose")
    assert after.code == 0 and " INFO " in after.stderr, after
    before = run(capsys, "--verbose", "rotate", "--keyset", "shop", "--force")
    assert before.code == 0 and " INFO " in before.stderr, before


def test_a_kek_file_others_can_read_is_said_once_without_verbose(
    live: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], kek_file: Path
) -> None:
    """Before, the warning was a log line, which one-shot commands show only with -v:
    `rotator rotate` by hand never said it. `token sign` loads the keyring twice."""
    assert run(capsys, "keyset", "add", "shop").code == 0
    kek_file.chmod(0o644)
    warning = "is readable by others or another group (mode 644); chmod 600 it\n"
    for argv in (["rotate", "--keyset", "shop", "--force"], ["token", "sign", "--keyset",
                 "shop", "--claims", '{"sub": "x"}']):  # fmt: skip
        result = run(capsys, *argv)
        assert result.code == 0, result
        assert result.stderr.startswith("rotator: warning: KEK file '"), result
        assert result.stderr.endswith(warning) and result.stderr.count("\n") == 1, result
    kek_file.chmod(0o600)
    assert run(capsys, "rotate", "--keyset", "shop", "--force").stderr == ""


def test_revoke_says_revoke_once(
    live: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: `shop: revoke (revoke) KID`, in `revoke` and in `audit`."""
    assert run(capsys, "keyset", "add", "shop").code == 0
    assert run(capsys, "rotate", "--keyset", "shop", "--force").code == 0
    kid = retired_kid(capsys, "shop")
    revoked = run(capsys, "revoke", kid, "--keyset", "shop")
    assert revoked.code == 0 and f"shop: revoke {kid}\n" in revoked.stdout, revoked.stdout
    audit = run(capsys, "audit", "--keyset", "shop")
    assert f"  revoke  {kid}" in audit.stdout and "(revoke)" not in audit.stdout, audit.stdout
    assert "  rotate (manual)  " in audit.stdout


def test_a_kid_with_a_newline_or_an_escape_is_echoed_escaped_on_one_line(
    live: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: `revoke $'a\\nFAKE LINE'` printed a two-line error, and an escape sequence in
    the kid reached the terminal as it was."""
    assert run(capsys, "keyset", "add", "shop").code == 0
    revoked = run(capsys, "revoke", "a\nFAKE LINE\x1b]0;owned\x07", "--keyset", "shop", "--yes")
    assert revoked.code == 1, revoked
    assert one_line(revoked) and "\x1b" not in revoked.stderr, revoked.stderr


def test_an_unknown_key_set_is_exit_2_for_every_command(
    live: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: `token verify --keyset nosuch` exited 1, `jwks --keyset nosuch` 2."""
    results = {
        command: run(capsys, *COMMANDS[command], "--keyset", "nosuch")
        for command in sorted(COMMANDS)
        if command not in LONG_RUNNING and "--keyset" in {o for o, _, _ in _options(command)}
    }
    assert {("jwks",), ("token", "sign"), ("token", "verify"), ("audit",)} < set(results)
    for result in results.values():
        assert result.code == 2 and one_line(result), result
        assert "'nosuch' is neither in the config nor registered" in result.stderr, result


@pytest.mark.parametrize("ttl", ["0s", "400d"])
def test_a_ttl_outside_the_key_sets_bound_is_a_bad_argument(
    live: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], ttl: str
) -> None:
    """Before: `token sign --ttl` past max_token_ttl was exit 1, as a failed operation."""
    assert run(capsys, "rotate").code == 0
    signed = run(capsys, "token", "sign", "--claims", "{}", "--ttl", ttl)
    assert signed.code == 2 and one_line(signed), signed
    assert "--ttl" in signed.stderr and "max_token_ttl" in signed.stderr, signed
    assert run(capsys, "token", "sign", "--claims", "{}", "--ttl", "1m").code == 0


def test_a_wrong_kek_is_said_once(
    live: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Before: `token sign` with a KEK that does not open the key logged the error and
    then printed it again."""
    assert run(capsys, "rotate").code == 0
    other = tmp_path / "other-kek"
    other.write_text(run(capsys, "kek", "generate", "--id", "k1").stdout)
    other.chmod(0o600)
    live.setenv("ROTATOR_KEYS__KEK_FILE", str(other))
    signed = run(capsys, "token", "sign", "--claims", "{}")
    assert signed.code == 1 and one_line(signed) and "does not open key" in signed.stderr


def test_shield_kids_leaves_the_value_of_every_option_in_place() -> None:
    """The options that take a value come from the parser: the hand-kept list missed
    --audience, --host, --claims, --ttl and more, and moved a value given to one of them
    behind ``--`` as if it were a kid."""
    options = {
        option
        for command in COMMANDS
        for option, action, _ in _options(command)
        if action.nargs != 0
    }
    assert {"--audience", "--host", "--claims", "--ttl", "--limit", "--log-format"} <= options
    for option in options:
        assert shield_kids(["status", option, KID]) == ["status", option, KID], option
    assert shield_kids(["revoke", KID, "--keyset", "x"]) == ["revoke", "--keyset", "x", "--", KID]


def _deep_toml(path: Path) -> str:
    path.write_text("a = " + "[" * 5000 + "]" * 5000 + "\n")
    return str(path)


def _backup_is_the_kek(path: Path) -> str:
    kek = os.environ["ROTATOR_KEYS__KEK_FILE"]
    path.write_text(f'[daemon]\nbackup_path = "{kek}"\n')
    return str(path)


def _backup_is_the_config(path: Path) -> str:
    path.write_text(f'[daemon]\nbackup_path = "{path}"\n')
    return str(path)


def _toml(text: str) -> Callable[[Path], str]:
    def write(path: Path) -> str:
        path.write_text(text)
        return str(path)

    return write


def _fifo(path: Path) -> str:
    os.mkfifo(path)
    return str(path)


@pytest.mark.parametrize(
    ("config", "said"),
    [
        (lambda _path: "/dev/zero", "not a regular file"),
        (_fifo, "not a regular file"),
        (lambda _path: "/" + "a" * 5000, "File name too long"),
        (_deep_toml, "nested too deeply"),
        (
            _backup_is_the_kek,
            "daemon.backup_path: it (or a file it writes beside it) is keys.kek_file",
        ),
        (_backup_is_the_config, "daemon.backup_path: is the config file itself"),
        (_toml('[daemon]\nbackup_path = "/tmp/a\\u0000b"\n'), "contains a NUL character"),
        (_toml('[daemon]\nbackup_path = ""\n'), "daemon.backup_path: is empty"),
    ],
    ids=[
        "dev-zero",
        "fifo",
        "name-too-long",
        "nested-5000-deep",
        "backup-is-kek",
        "backup-is-config",
        "backup-path-nul",
        "backup-path-empty",
    ],
)
def test_a_hostile_config_file_is_one_line_and_exit_2(
    environment: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    config: Callable[[Path], str],
    said: str,
) -> None:
    """Before: /dev/zero and a FIFO said "not found" (or hung), a long name and deep
    nesting were tracebacks, and a backup file named as the KEK file overwrote the KEK
    with the database at the first save."""
    result = run(capsys, "--config", config(tmp_path / "rotator.toml"), "check-config")
    refused(result, said)


def test_json_nested_too_deep_in_a_variable_is_one_line_and_exit_2(
    environment: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    environment.setenv("ROTATOR_REDIS__SENTINELS", "[" * 3000 + "]" * 3000)
    result = run(capsys, "check-config")
    refused(result, "nested too deeply")


@pytest.mark.parametrize(
    ("variable", "value", "said"),
    [
        (
            "ROTATOR_REDIS__URL",
            "rediss://127.0.0.1:6380/0?ssl_cert_reqs=none",
            "takes no query parameters",
        ),
        (
            "ROTATOR_REDIS__URL",
            "redis://127.0.0.1:6379/0?password=hunter2secret",
            "takes no query parameters",
        ),
        ("ROTATOR_REDIS__URL", "redis://127.0.0.1:6379/0?foo=bar", "takes no query parameters"),
        ("ROTATOR_REDIS__URL", "redis://:hunter2secret@127.0.0.1:99999/0", "port is not"),
        ("ROTATOR_REDIS__URL", "redis://127.0.0.1:abc/0", "port is not"),
        ("ROTATOR_REDIS__URL", "redis://127.0.0.1:6379/abc", "not a database number"),
        ("ROTATOR_REDIS__SENTINELS", '["127.0.0.1:99999999"]', "is not host:port"),
        ("ROTATOR_SERVER__HOST", "", "is empty"),
        ("ROTATOR_DAEMON__HEALTH_HOST", "", "is empty"),
        ("ROTATOR_DAEMON__HEALTH_HOST", "x\x1b[31m", "is not a host name"),
        ("ROTATOR_DAEMON__LEASE_TTL", "36500d", "must be at most 600s"),
        ("ROTATOR_LOG__AUDIT_MAX_ENTRIES", "9" * 23, "less than or equal to"),
        ("ROTATOR_REDIS__MIN_REPLICAS_ACK", "9" * 23, "less than or equal to"),
        ("ROTATOR_REDIS__SOCKET_TIMEOUT", "0s", "must be from 10ms to 1h"),
        ("ROTATOR_REDIS__REPLICA_ACK_TIMEOUT", "0s", "must be from 10ms to 1h"),
    ],
    ids=[
        "tls-verification-off",
        "password-in-query",
        "unknown-query",
        "port-over-65535",
        "port-not-a-number",
        "database-not-a-number",
        "sentinel-port",
        "empty-serve-host",
        "empty-health-host",
        "host-with-escape",
        "lease-of-a-century",
        "audit-entries-huge",
        "replicas-huge",
        "socket-timeout-zero",
        "ack-timeout-zero",
    ],
)
def test_a_dangerous_or_broken_address_is_one_line_and_exit_2(
    environment: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    variable: str,
    value: str,
    said: str,
) -> None:
    """Before: ``?ssl_cert_reqs=none`` turned TLS verification off (and won over
    tls_ca_file), a password in the query was printed by check-config and logged by run,
    a bad port was a traceback, and an empty host listened on every interface."""
    environment.setenv(variable, value)
    result = run(capsys, "check-config")
    refused(result, said)
    assert "hunter2secret" not in result.stdout + result.stderr


def _kek_bytes(data: bytes) -> Callable[[Path], str]:
    def write(path: Path) -> str:
        path.write_bytes(data)
        path.chmod(0o600)
        return str(path)

    return write


@pytest.mark.parametrize(
    ("kek_file", "said"),
    [
        (_kek_bytes(b"k1:\xff\n"), "is not UTF-8 text"),
        (_kek_bytes("k1:\u00e9\n".encode()), "is not valid base64"),
        (lambda _path: "/dev/zero", "is not a regular file"),
        (_fifo, "is not a regular file"),
        (_kek_bytes(b"# " + b"x" * 70_000 + b"\n"), "is larger than"),
    ],
    ids=["not-utf8", "kek-not-ascii", "dev-zero", "fifo", "huge"],
)
def test_an_unusable_kek_file_is_one_line_and_exit_2(
    environment: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    kek_file: Callable[[Path], str],
    said: str,
) -> None:
    """Before: a UnicodeDecodeError or ValueError traceback, /dev/zero read without end
    (4 GB in 8 s), and a FIFO waited for a writer."""
    environment.setenv("ROTATOR_KEYS__KEK_FILE", kek_file(tmp_path / "kek"))
    result = run(capsys, "check-config")
    refused(result, said)


def test_a_kek_given_where_its_path_belongs_is_never_repeated(
    environment: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: "cannot read k1:<the whole KEK>: No such file or directory"."""
    line = generate_kek_line("k1")
    environment.setenv("ROTATOR_KEYS__KEK_FILE", line)
    result = run(capsys, "check-config")
    refused(result, "looks like a KEK line")
    assert line.split(":")[1] not in result.stdout + result.stderr


def test_a_kek_that_is_not_ascii_is_one_line_and_exit_2(
    environment: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    environment.delenv("ROTATOR_KEYS__KEK_FILE")
    environment.setenv("ROTATOR_KEYS__KEKS", "k1:\u00e9")
    result = run(capsys, "check-config")
    refused(result, "not valid base64")


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["keyset", "add", "--from-file", ""], "--from-file: empty"),
        (["kek", "generate", "--id", ""], "--id: empty"),
    ],
    ids=["from-file", "kek-id"],
)
def test_an_empty_argument_is_refused_not_taken_for_another(
    environment: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    said: str,
) -> None:
    """Before: ``--from-file ''`` read the current directory ("--from-file .: Is a
    directory") and ``--id ''`` made a KEK of the default id without a word."""
    result = run(capsys, *argv)
    refused(result, said)


def test_a_tls_file_that_is_not_there_is_one_line_and_exit_2(
    environment: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: exit 1, "cannot reach Redis: ... No such file or directory", for a field
    of the configuration."""
    environment.setenv("ROTATOR_REDIS__URL", "rediss://127.0.0.1:6380/0")
    environment.setenv("ROTATOR_REDIS__TLS_CA_FILE", "/nonexistent/ca.pem")
    result = run(capsys, "status")
    refused(result, "tls_ca_file: '/nonexistent/ca.pem' is not a file")


def test_a_kek_file_with_a_comment_that_is_not_ascii_is_read(
    environment: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Comments are allowed, in UTF-8: the file of a release before bounded reads (which
    first took it as ASCII, a review found) still loads."""
    kek = tmp_path / "kek"
    kek.write_text(f"# cl\u00e9 de production \u2014 2026\n{generate_kek_line('k1')}\n")
    kek.chmod(0o600)
    environment.setenv("ROTATOR_KEYS__KEK_FILE", str(kek))
    result = run(capsys, "check-config")
    assert result.code == 0, result


def test_a_config_file_of_old_mac_line_ends_still_reads(
    environment: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Read as text, as before the bound on its size (a review found bytes refused it)."""
    path = tmp_path / "rotator.toml"
    path.write_bytes(b'[rotation]\rinterval = "2h"\r')
    result = run(capsys, "--config", str(path), "check-config")
    assert result.code == 0, result
    assert '"interval": "2h"' in result.stdout


_INTERRUPTED_WHILE_LOADING = """
import sys


class Interrupt:
    def find_spec(self, name, path, target=None):
        if name == "rotator.cli.main":
            raise KeyboardInterrupt
        return None


sys.meta_path.insert(0, Interrupt())
sys.argv = ["rotator", "status"]
from rotator.__main__ import run

run()
"""


def test_ctrl_c_while_the_command_line_loads_is_exit_130_without_a_traceback() -> None:
    """Found by an attacker: SIGINT in the half second of imports printed a traceback
    (exit 1); once loaded it was already exit 130. Interrupted here where the console
    script and ``python -m rotator`` import the command line."""
    done = subprocess.run(
        [sys.executable, "-c", _INTERRUPTED_WHILE_LOADING],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr
