"""Configuration: TOML plus env overlay, durations, and errors that name the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rotator.config import ConfigError, load_settings, mask_url, settings_toml
from rotator.core.durations import format_duration, parse_duration
from rotator.storage.layout import validate_keyset_name


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("ROTATOR_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("15m", 900),
        ("24h", 86400),
        ("7d", 604800),
        ("1h30m", 5400),
        (45, 45),
        ("12", 12),
        ("500ms", 0.5),
        ("1s250ms", 1.25),
    ],
)
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize("bad", ["", "5x", "-3s", "1.5h", True, -1, 2.5, "h", "5sm"])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_defaults_are_a_sound_policy() -> None:
    settings = load_settings()
    policy = settings.policy("default")
    assert policy.problems() == []
    assert policy.interval == 86400
    assert settings.configured_keysets() == ["default"]


def test_toml_then_env_then_keyset_override(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(
        tmp_path,
        """
[redis]
url = "redis://localhost:6380/1"
prefix = "jwt"
[rotation]
interval = "12h"
overlap = "2d"
[keysets.billing]
interval = "6h"
[keysets.search]
schedule = "0 3 * * *"
""",
    )
    monkeypatch.setenv("ROTATOR_REDIS__PREFIX", "fromenv")
    settings = load_settings(path)
    assert settings.redis.url == "redis://localhost:6380/1"
    assert settings.redis.prefix == "fromenv"
    assert settings.policy("other").interval == 12 * 3600
    assert settings.policy("billing").interval == 6 * 3600
    assert settings.policy("billing").overlap == 2 * 86400
    search = settings.policy("search")
    assert (search.interval, search.schedule) == (None, "0 3 * * *")
    assert settings.configured_keysets() == ["billing", "search"]


@pytest.mark.parametrize(
    ("text", "field", "fragment"),
    [
        ('[rotation]\noverlap = "10m"', "rotation.overlap", "max_token_ttl + clock_skew"),
        ('[rotation]\ninterval = "5m"', "rotation.cache_max_age", "at most half of interval"),
        ('[keysets.app]\noverlap = "1m"', "keysets.app.overlap", ">="),
        ('[rotation]\ninterval = "soon"', "rotation.interval", "invalid duration"),
        ('[rotation]\nschedule = "not cron"', "rotation.schedule", "invalid cron"),
        ('[rotation]\nschedule = "* * * * *"', "rotation.cache_max_age", "half of schedule"),
        ('[rotation]\ninterval = "1h"\nschedule = "0 * * * *"', "rotation", "not both"),
        ('[redis]\nurl = "http://x"', "redis.url", "scheme"),
        ('[redis]\nprefix = "a{b}"', "redis.prefix", "braces"),
        ("[redis]\nport = 5", "redis.port", "unknown field"),
        ('[keysets."a:b"]\ninterval = "1d"', "keysets", "colons"),
        ('[daemon]\ntick = "0s"', "daemon.tick", "at least 1s"),
        ("[daemon]\nhealth_port = 70000", "daemon.health_port", "65535"),
        ('[rotation]\nalgorithm = "HS256"', "rotation.algorithm", "'ES256', 'ES384'"),
        ('[keysets.app]\nalgorithm = "none"', "keysets.app.algorithm", "'EdDSA' or 'RS256'"),
        ("[rotation]\nrsa_bits = 1024", "rotation.rsa_bits", "2048"),
        # Read as 1 and 0 before (`shards = true` was one shard).
        ("[daemon]\nshards = true", "daemon.shards", "not true or false"),
        ("[keysets.app]\nrsa_bits = true", "keysets.app.rsa_bits", "not true or false"),
        ("[redis]\nretries = false", "redis.retries", "not true or false"),
        ("[server]\nmetrics_port = true", "server.metrics_port", "not true or false"),
    ],
)
def test_errors_name_the_field(tmp_path: Path, text: str, field: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text))
    message = str(caught.value)
    assert message.startswith(field), message
    assert fragment in message


def test_algorithm_is_a_policy_field_overridden_per_keyset(tmp_path: Path) -> None:
    text = '[rotation]\nalgorithm = "EdDSA"\n[keysets.rsa]\nalgorithm = "RS256"\nrsa_bits = 4096\n'
    settings = load_settings(write(tmp_path, text + "[keysets.plain]\n"))
    assert settings.policy("plain").algorithm == "EdDSA"
    assert (settings.policy("rsa").algorithm, settings.policy("rsa").rsa_bits) == ("RS256", 4096)
    assert load_settings().base_policy().algorithm == "ES256"


@pytest.mark.parametrize(
    ("field", "most"), [("workers", 64), ("threads", 1024), ("max_connections", 2**20)]
)
def test_server_counts_are_bounded(tmp_path: Path, field: str, most: int) -> None:
    """Before: `workers = 100000` forked without end and `threads` started as many OS
    threads as asked; each is refused beyond its bound, naming the field."""
    assert getattr(load_settings(write(tmp_path, f"[server]\n{field} = {most}")).server, field)
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, f"[server]\n{field} = {most + 1}"))
    assert str(caught.value).startswith(f"server.{field}: "), caught.value
    assert str(most) in str(caught.value)


def test_env_errors_name_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROTATOR_ROTATION__OVERLAP", "1s")
    with pytest.raises(ConfigError, match=r"^rotation\.overlap"):
        load_settings()


@pytest.mark.parametrize(
    ("variable", "suggested"),
    [
        ("ROTATOR_REDIS_URL", "ROTATOR_REDIS__URL"),
        ("ROTATOR_ROTATON__INTERVAL", "ROTATOR_ROTATION__INTERVAL"),
        ("ROTATOR_KEYSETS__SHOP__INTERVL", "ROTATOR_KEYSETS__SHOP__INTERVAL"),
        ("rotator_redis__urll", "ROTATOR_REDIS__URL"),
    ],
)
def test_a_variable_that_names_no_setting_is_an_error(
    monkeypatch: pytest.MonkeyPatch, variable: str, suggested: str
) -> None:
    monkeypatch.setenv(variable, "1h")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert str(caught.value) == (
        f"environment variable {variable.upper()} names no setting (did you mean {suggested}?)"
    )


def test_the_variables_that_name_settings_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROTATOR_CONFIG", "/elsewhere.toml")  # read by the CLI, not a setting
    monkeypatch.setenv("ROTATOR_KEYSETS__SHOP__INTERVAL", "2h")
    monkeypatch.setenv("ROTATOR_DAEMON", '{"tick": "20s"}')
    monkeypatch.setenv("ROTATOR_LOG__LEVEL", "debug")
    settings = load_settings()
    assert settings.policy("shop").interval == 7200
    assert (settings.daemon.tick, settings.log.level) == (20, "DEBUG")


def test_a_bad_value_names_its_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ROTATOR_ROTATION__INTERVAL", "abc")
    with pytest.raises(ConfigError, match=r"^rotation\.interval \(set by ROTATOR_ROTATION__"):
        load_settings()
    monkeypatch.delenv("ROTATOR_ROTATION__INTERVAL")
    monkeypatch.setenv("ROTATOR_ROTATION__OVERLAP", "1s")
    with pytest.raises(ConfigError, match=r"^rotation\.overlap \(set by ROTATOR_ROTATION__OV"):
        load_settings()
    # The same field from the file is named as before, without a variable.
    monkeypatch.delenv("ROTATOR_ROTATION__OVERLAP")
    with pytest.raises(ConfigError, match=r"^rotation\.interval: invalid duration"):
        load_settings(write(tmp_path, '[rotation]\ninterval = "abc"\n'))


@pytest.mark.parametrize(
    ("variables", "named"),
    [
        # pydantic-settings reads it in lower case; its error named the field alone.
        ({"rotator_daemon__tick": "abc"}, r"^daemon\.tick \(set by rotator_daemon__tick\)"),
        # pydantic-settings names the section: this was reported as ROTATOR_REDIS, not set.
        (
            {"ROTATOR_REDIS__URL": "redis://127.0.0.1:6379", "ROTATOR_REDIS__SENTINELS": "h:1"},
            r"^ROTATOR_REDIS__SENTINELS: not a JSON value",
        ),
        ({"ROTATOR_REDIS": "{not json"}, r"^ROTATOR_REDIS: not a JSON value of the whole"),
        # A section variable that is JSON is not blamed for its field variable's error.
        (
            {"ROTATOR_REDIS": '{"url": "redis://x"}', "ROTATOR_REDIS__SENTINELS": "h:1"},
            r"^ROTATOR_REDIS__SENTINELS: not a JSON value",
        ),
    ],
)
def test_a_bad_variable_is_named_as_it_was_set(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], named: str
) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=named):
        load_settings()


def test_the_file_is_read_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Before: `load_settings` parsed it for its errors and pydantic-settings again."""
    import tomllib

    path = write(tmp_path, '[redis]\nprefix = "fromfile"\n')
    parses: list[str] = []
    load, loads = tomllib.load, tomllib.loads

    def counted_load(file: Any) -> Any:
        parses.append("load")
        return load(file)

    def counted_loads(text: str) -> Any:
        parses.append("loads")
        return loads(text)

    monkeypatch.setattr(tomllib, "load", counted_load)
    monkeypatch.setattr(tomllib, "loads", counted_loads)
    assert load_settings(path).redis.prefix == "fromfile"
    assert len(parses) == 1


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_settings(tmp_path)
    with pytest.raises(ConfigError, match="line 1"):
        load_settings(write(tmp_path, "[redis\n"))


def test_short_policies_are_allowed_for_tests_and_dev() -> None:
    settings = load_settings(
        rotation={
            "interval": 2,
            "cache_max_age": 1,
            "max_token_ttl": 1,
            "clock_skew": 0,
            "overlap": 2,
        }
    )
    assert settings.policy("default").interval == 2


def test_mask_url_hides_only_the_password() -> None:
    assert mask_url("redis://user:s3cret@host:6379/0") == "redis://user:***@host:6379/0"
    assert mask_url("redis://host:6379/0") == "redis://host:6379/0"


@pytest.mark.parametrize(
    "name", ["", "a{b", "a:b", "a b", "tab\tname", "x" * 129, "nul\x00", "ünïcode"]
)
def test_bad_keyset_names(name: str) -> None:
    with pytest.raises(ValueError, match="key set name"):
        validate_keyset_name(name)


def test_good_keyset_names() -> None:
    for name in ["default", "app-1", "Tenant.EU_west", "x" * 128]:
        assert validate_keyset_name(name) == name


def test_example_config_is_valid_and_documents_every_field() -> None:
    from rotator.config import Settings

    path = Path(__file__).resolve().parent.parent / "config.example.toml"
    settings, defaults = load_settings(path), load_settings()
    # The example shows the defaults.
    assert settings.policy("default") == defaults.policy("default")
    for section in ("redis", "keys", "daemon", "log", "keysets"):
        assert getattr(settings, section) == getattr(defaults, section), section
    text = path.read_text()
    for section, model in Settings.model_fields.items():
        assert f"[{section}]" in text or f"[{section}." in text, section
        annotation = model.annotation
        for field in getattr(annotation, "model_fields", {}):
            assert f"{field} =" in text or f"# {field} =" in text, f"{section}.{field}"


def test_settings_written_as_toml_read_back_the_same(tmp_path: Path) -> None:
    """What `rotator dev` writes for the commands it prints: every field, nested key set
    tables with names TOML must quote, strings TOML must escape; never the KEKs."""
    settings = load_settings(
        redis={
            "url": "redis://127.0.0.1:6390/0",
            "sentinels": ["a:1", "b:2"],
            "sentinel_master": 'a\x7fb"\\\n',
        },
        keys={"kek_file": "/tmp/with space/k\u00e9k", "keks": "k1:" + "A" * 43 + "="},
        rotation={
            "interval": 30,
            "cache_max_age": 7,
            "max_token_ttl": 15,
            "clock_skew": 1,
            "overlap": 30,
        },
        keysets={'shop.eu"\\x': {"schedule": "0 3 * * *"}, "plain": {}},
        daemon={"tick": 5, "health_port": 1234},
        server={"host": "::1", "poll_interval": "1s500ms"},
    )
    path = tmp_path / "dev.toml"
    path.write_text(settings_toml(settings), encoding="utf-8")
    assert "keks" not in path.read_text(encoding="utf-8")
    assert load_settings(path) == settings.model_copy(
        update={"keys": settings.keys.model_copy(update={"keks": None})}
    )
