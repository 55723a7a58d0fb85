"""Configuration: a TOML file overlaid by ``ROTATOR_<SECTION>__<FIELD>`` environment variables.

`load_settings` is the only entry point; it turns every problem (missing
file, TOML syntax, unknown field, bad duration, contradictory policy) into a
`ConfigError` whose lines each name the offending field.

It is the layer above the library: it may import the library, storage, core, the leaf
modules `rotator.metrics` and `rotator.logs`, pydantic and pydantic-settings; nothing the
library imports may import it.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import stat
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from rotator.core.envelope import KekError, Keyring
from rotator.core.issuer import issuer_routes
from rotator.core.overrides import Duration, PolicyOverrides, Whole, describe_error
from rotator.core.policy import Policy
from rotator.core.strictjson import shown
from rotator.storage.kekfile import load_keyring
from rotator.storage.layout import (
    DEFAULT_KEYSET,
    MAX_SHARDS,
    validate_keyset_name,
    validate_prefix,
)
from rotator.storage.lease import MAX_LEASE_TTL

__all__ = [
    "LOG_LEVELS",
    "MAX_WORKERS",
    "ConfigError",
    "KeysetSettings",
    "Settings",
    "load_settings",
    "mask_url",
    "settings_toml",
]

#: ``ROTATOR_*`` variables that name no setting but are read elsewhere (documented in the
#: README): they are not misspellings.
OTHER_VARIABLES = frozenset({"ROTATOR_CONFIG"})

_ENV_PREFIX = "ROTATOR_"
_NESTED = "__"


class ConfigError(Exception):
    """The configuration cannot be used; the message names each offending field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RedisSettings(_Section):
    """Where the state lives."""

    url: str = "redis://localhost:6379/0"
    prefix: str = "rotator"
    socket_timeout: Duration = 5.0
    retries: Whole = Field(default=5, ge=0, le=100)
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    sentinels: list[str] = Field(default_factory=list)
    sentinel_master: str = "mymaster"
    cluster: bool = False
    min_replicas_ack: Whole = Field(default=0, ge=0, le=100)
    replica_ack_timeout: Duration = 1.0

    @field_validator("tls_ca_file", "tls_cert_file", "tls_key_file", mode="before")
    @classmethod
    def _paths(cls, value: object) -> object:
        return _usable_path(value)

    @field_validator("socket_timeout", "replica_ack_timeout")
    @classmethod
    def _some_time(cls, seconds: float) -> float:
        # 0 is no timeout at all to a socket ("Operation now in progress" on every
        # command), and to WAIT a wait without end.
        if not 0.01 <= seconds <= 3600:
            raise ValueError("must be from 10ms to 1h")
        return seconds

    @field_validator("sentinels")
    @classmethod
    def _host_ports(cls, sentinels: list[str]) -> list[str]:
        for entry in sentinels:
            host, sep, port = entry.rpartition(":")
            if (
                not sep
                or not host
                or not entry.isascii()
                or not entry.isprintable()
                or not port.isdigit()
                or len(port) > 5
                or not 1 <= int(port) <= 65535
            ):
                raise ValueError(f"{shown(entry)} is not host:port (a port from 1 to 65535)")
        return sentinels

    @field_validator("url")
    @classmethod
    def _usable_url(cls, url: str) -> str:
        # Errors never repeat the URL: it may hold a password.
        if not url.isascii() or not url.isprintable():
            raise ValueError(
                "has characters that are not printable ASCII (percent-encode them in a "
                "password: %C3%A9 for \u00e9)"
            )
        parts = urlsplit(url)
        scheme = parts.scheme
        if scheme not in {"redis", "rediss", "unix"}:
            raise ValueError(f"scheme {scheme!r} is not redis://, rediss:// or unix://")
        # redis-py reads any query parameter as a connection option, ssl_cert_reqs=none
        # (no TLS verification) among them: what may be set has settings of its own.
        query = parse_qsl(parts.query, keep_blank_values=True)
        allowed = {"db"} if scheme == "unix" else set()
        if parts.fragment or any(name not in allowed for name, _ in query):
            raise ValueError(
                "takes no query parameters (TLS and timeouts are redis.* settings; a "
                "password goes before the host)"
                + ("; a unix:// URL takes ?db=N alone" if scheme == "unix" else "")
            )
        if any(not value.isdigit() for _, value in query):
            raise ValueError("db is not a number")
        try:
            port = parts.port
        except ValueError:
            raise ValueError("port is not a number from 1 to 65535") from None
        if port == 0:
            raise ValueError("port is not a number from 1 to 65535")
        if scheme != "unix" and not re.fullmatch(r"/?[0-9]{0,9}", parts.path):
            raise ValueError("the path is not a database number (redis://host:6379/0)")
        if scheme == "unix" and not parts.path:
            raise ValueError("names no socket (unix:///path/to/redis.sock)")
        return url

    @field_validator("prefix")
    @classmethod
    def _good_prefix(cls, prefix: str) -> str:
        return validate_prefix(prefix)

    @model_validator(mode="after")
    def _tls_needs_rediss(self) -> RedisSettings:
        if urlsplit(self.url).scheme != "rediss":
            for name in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} is set but url is not rediss://")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together (client certificate)")
        for name in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
            path = getattr(self, name)
            try:
                found = path is None or path.is_file()
            except OSError as exc:  # a name too long
                raise ValueError(f"{name}: {exc.strerror or exc}") from None
            if not found:  # else every connection fails, exit 1 and "cannot reach Redis"
                raise ValueError(f"{name}: {shown(str(path))} is not a file")
        if self.sentinels and self.cluster:
            raise ValueError("sentinels and cluster exclude each other")
        return self


def _usable_path(value: object) -> object:
    """A path setting as given: not empty (``""`` would be the current directory) and
    without a NUL (which every system call refuses, late, with a traceback)."""
    if isinstance(value, str | Path):
        text = str(value)
        if text == "":
            raise ValueError("is empty")
        if "\0" in text:
            raise ValueError("contains a NUL character")
    return value


class KeysSettings(_Section):
    """Key-encryption keys: lines ``ID:BASE64(32 bytes)``, the first one seals."""

    kek_file: Path | None = None
    keks: SecretStr | None = None

    @field_validator("kek_file", mode="before")
    @classmethod
    def _path(cls, value: object) -> object:
        return _usable_path(value)


class RotationSettings(PolicyOverrides):
    """Default policy for every key set (``[rotation]``)."""


class KeysetSettings(PolicyOverrides):
    """Per key set overrides (``[keysets.NAME]``)."""


def _bind_host(host: str) -> str:
    """A host to listen on: not empty (the empty host listens on every interface, without
    a word), printable ASCII without spaces (a NUL or a byte that is not UTF-8 failed
    late with a traceback)."""
    if not host:
        raise ValueError("is empty (0.0.0.0 listens on every interface, if that is meant)")
    if not host.isascii() or not host.isprintable() or " " in host:
        raise ValueError("is not a host name or address (printable ASCII, no spaces)")
    return host


class DaemonSettings(_Section):
    """The long-running process."""

    tick: Duration = 15.0
    sweep_interval: Duration = 600.0
    lease_ttl: Duration = 15.0
    # One shard by default: one leader, as before shards; more split the key sets among
    # the live daemons (`rotator.storage.lease`).
    shards: Whole = Field(default=1, ge=1, le=MAX_SHARDS)
    backup_path: Path | None = None
    health_host: str = "127.0.0.1"
    health_port: Whole = Field(default=9464, ge=0, le=65535)

    @field_validator("health_host")
    @classmethod
    def _host(cls, host: str) -> str:
        return _bind_host(host)

    @field_validator("backup_path", mode="before")
    @classmethod
    def _path(cls, value: object) -> object:
        return _usable_path(value)

    @field_validator("lease_ttl")
    @classmethod
    def _renewable_lease(cls, ttl: float) -> float:
        if ttl < 3:
            raise ValueError("must be at least 3s (it is renewed every third of it)")
        if ttl > MAX_LEASE_TTL:
            # A dead leader's shards wait that long for another daemon.
            raise ValueError(f"must be at most {MAX_LEASE_TTL:g}s")
        return ttl

    @field_validator("tick", "sweep_interval")
    @classmethod
    def _positive_tick(cls, tick: float) -> float:
        if tick < 1:
            raise ValueError("must be at least 1s")
        return tick


#: The most worker processes ``server.workers`` (and ``--workers``) accepts: each is a
#: full copy of the server, and a typo of a few digits must not fork without end.
MAX_WORKERS = 64


class ServerSettings(_Section):
    """`rotator serve`: the HTTP JWKS endpoint."""

    host: str = "127.0.0.1"
    port: Whole = Field(default=8080, ge=1, le=65535)
    workers: Whole = Field(default=1, ge=1, le=MAX_WORKERS)
    # Each thread is an OS thread started at once; each connection an open file, and
    # Linux's own ceiling on open files (fs.nr_open) is 2**20 by default.
    threads: Whole = Field(default=32, ge=1, le=1024)
    head_timeout: Duration = 10.0
    idle_timeout: Duration = 75.0
    send_timeout: Duration = 30.0
    max_connections: Whole = Field(default=4096, ge=1, le=2**20)
    max_requests_per_connection: Whole = Field(default=1000, ge=1, le=2**31)
    metrics_host: str | None = None
    metrics_port: Whole | None = Field(default=None, ge=1, le=65535)
    poll_interval: Duration = 30.0
    max_stale: Duration = 3600.0
    max_keysets: Whole = Field(default=1000, ge=1, le=10_000_000)

    @field_validator("host", "metrics_host")
    @classmethod
    def _hosts(cls, host: str | None) -> str | None:
        return None if host is None else _bind_host(host)

    @field_validator("head_timeout", "idle_timeout", "send_timeout")
    @classmethod
    def _positive_timeout(cls, timeout: float) -> float:
        if timeout < 1:
            raise ValueError("must be at least 1s")
        return timeout

    @model_validator(mode="after")
    def _own_metrics_port(self) -> ServerSettings:
        if self.metrics_host is not None and self.metrics_port is None:
            raise ValueError("metrics_host is set but metrics_port is not")
        if self.metrics_port == self.port and (self.metrics_host or self.host) == self.host:
            raise ValueError("metrics_port must differ from port")
        return self


class UsageSettings(_Section):
    """Verification counts readers report to Redis (`rotator.library.usage`), and the
    recent window `rotator status` shows of them."""

    report: bool = True
    flush_interval: Duration = 5.0
    window: Duration = 900.0

    @field_validator("flush_interval", "window")
    @classmethod
    def _at_least_a_second(cls, seconds: float) -> float:
        if seconds < 1:
            raise ValueError("must be at least 1s")
        return seconds


#: The levels ``log.level`` (and ``--log-level``) accept.
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class LogSettings(_Section):
    """Logging."""

    level: str = "INFO"
    format: Literal["text", "json"] = "text"
    audit_max_entries: Whole = Field(default=100_000, ge=100, le=10**9)

    @field_validator("level")
    @classmethod
    def _known_level(cls, level: str) -> str:
        level = level.upper()
        if level not in LOG_LEVELS:
            raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
        return level


class Settings(BaseSettings):
    """The whole configuration. Build it with `load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="ROTATOR_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    redis: RedisSettings = RedisSettings()
    keys: KeysSettings = KeysSettings()
    rotation: RotationSettings = RotationSettings()
    keysets: dict[str, KeysetSettings] = Field(default_factory=dict)
    daemon: DaemonSettings = DaemonSettings()
    server: ServerSettings = ServerSettings()
    log: LogSettings = LogSettings()
    usage: UsageSettings = UsageSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file is read by `load_settings`, once, and laid under the environment
        # there: no source here needs to know its path.
        return (init_settings, env_settings)

    @field_validator("keysets")
    @classmethod
    def _good_names(cls, keysets: dict[str, KeysetSettings]) -> dict[str, KeysetSettings]:
        for name in keysets:
            validate_keyset_name(name)
        return keysets

    @model_validator(mode="after")
    def _sound_policies(self) -> Settings:
        errors = [
            f"rotation.{field}: {message}" for field, message in self.base_policy().problems()
        ]
        if not errors:
            for name, override in self.keysets.items():
                errors += [
                    f"keysets.{name}.{field}: {message}"
                    for field, message in override.overlay(self.base_policy()).problems()
                ]
        if not errors:
            errors = self._shared_issuer_paths()
        if not errors:
            errors = self._backup_apart()
        if errors:
            raise ValueError("; ".join(errors))
        return self

    def _backup_apart(self) -> list[str]:
        """The backup file, and the files it writes beside it, must be none of the files
        rotator reads: a save replaces it whole (a KEK file named there was overwritten
        by the database)."""
        backup = self.daemon.backup_path
        if backup is None:
            return []
        beside = [
            backup,
            *(backup.with_name(backup.name + end) for end in ("-journal", "-wal", "-shm", ".lock")),
        ]
        read = {
            "keys.kek_file": self.keys.kek_file,
            "redis.tls_ca_file": self.redis.tls_ca_file,
            "redis.tls_cert_file": self.redis.tls_cert_file,
            "redis.tls_key_file": self.redis.tls_key_file,
        }
        return [
            f"daemon.backup_path: it (or a file it writes beside it) is {name}"
            for name, path in read.items()
            if any(_same_file(path, written) for written in beside)
        ]

    def _shared_issuer_paths(self) -> list[str]:
        """One error per issuer path that two configured key sets claim (serve could not
        tell whose discovery document it is), naming the field each got it from."""
        names = self.configured_keysets()
        _routes, shared = issuer_routes({name: self.policy(name).issuer for name in names})
        errors = []
        for path, claimants in shared.items():
            fields = sorted(
                f"keysets.{name}.issuer" if self._own_issuer(name) else "rotation.issuer"
                for name in claimants
            )
            errors.append(
                f"{fields[0]}: issuer path {path} is shared by key sets "
                f"{', '.join(claimants)}; give each its own"
            )
        return errors

    def _own_issuer(self, keyset: str) -> bool:
        override = self.keysets.get(keyset)
        return override is not None and override.issuer is not None

    def base_policy(self) -> Policy:
        """The ``[rotation]`` policy over the built-in defaults."""
        return self.rotation.overlay(Policy())

    def policy(self, keyset: str) -> Policy:
        """Effective policy of *keyset*: its own overrides over ``[rotation]``."""
        override = self.keysets.get(keyset)
        base = self.base_policy()
        return override.overlay(base) if override else base

    def keyring(self) -> Keyring | None:
        """The KEKs from ``keys.kek_file`` or ``keys.keks``, else from the systemd credential
        ``kek`` (``$CREDENTIALS_DIRECTORY/kek``); ``None`` if there are none.

        Raises `KekError` when they are unusable.
        """
        keks = self.keys.keks.get_secret_value() if self.keys.keks else None
        kek_file = self.keys.kek_file
        credentials = os.environ.get("CREDENTIALS_DIRECTORY")
        if kek_file is None and keks is None and credentials:
            candidate = Path(credentials) / "kek"  # systemd LoadCredential=kek:...
            try:
                kek_file = candidate if candidate.is_file() else None
            except OSError as exc:  # a name too long
                raise KekError(f"CREDENTIALS_DIRECTORY: {exc.strerror or exc}") from None
        return load_keyring(kek_file, keks)

    def configured_keysets(self) -> list[str]:
        """Key sets named in the config; ``default`` when none is."""
        return sorted(self.keysets) or [DEFAULT_KEYSET]


def mask_url(url: str) -> str:
    """*url* with any password replaced by ``***``, for printing."""
    parts = urlsplit(url)
    # From the text itself, not `parts.port`: a port that is not a number raised here.
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostport}"))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    # A JSON string is a TOML basic string but for DEL, which TOML wants escaped.
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_value(key)


def _toml_table(path: list[str], table: Mapping[str, Any], out: list[str]) -> None:
    scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
    if path and (scalars or not table):
        out.append("[" + ".".join(map(_toml_key, path)) + "]")
    out.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in scalars.items())
    for name, value in table.items():
        if isinstance(value, dict):
            _toml_table([*path, name], value, out)


def settings_toml(settings: Settings) -> str:
    """*settings* as a TOML config file that `load_settings` reads back to the same
    settings (what `rotator dev` writes for the commands it prints). ``keys.keks`` is
    left out: a secret does not go into a file here (``keys.kek_file`` does).
    """
    document = settings.model_dump(mode="json", exclude_none=True)
    document["keys"].pop("keks", None)
    lines: list[str] = []
    _toml_table([], document, lines)
    return "\n".join(lines) + "\n"


def _setting_variables() -> list[str]:
    """Every ``ROTATOR_*`` variable that names a setting or a whole section, upper case
    (``[keysets.NAME]`` aside: its name is free, see `_unknown_variable`)."""
    names = []
    for section, field in Settings.model_fields.items():
        names.append(f"{_ENV_PREFIX}{section.upper()}")
        model = field.annotation
        if isinstance(model, type) and issubclass(model, BaseModel):
            names += [
                f"{_ENV_PREFIX}{section.upper()}{_NESTED}{f.upper()}" for f in model.model_fields
            ]
    return names


def _not_json(exc: SettingsError, environ: list[str]) -> str:
    """The line for a ``ROTATOR_*`` value that pydantic-settings could not read as JSON. Its
    error names the section alone, also for a variable of one field in it (a non-JSON
    ``ROTATOR_REDIS__SENTINELS`` was reported as ``ROTATOR_REDIS``): the variables of
    the section whose field takes JSON are looked at to name the one."""
    found = re.search(r'field "(\w+)"', str(exc))
    if found is None:
        return f"a ROTATOR_* variable: not a JSON value ({exc})"
    section = found.group(1)
    fields = getattr(Settings.model_fields[section].annotation, "model_fields", {})
    source = EnvSettingsSource(Settings)
    for name in environ:
        head, _, rest = name.upper().removeprefix(_ENV_PREFIX).partition(_NESTED)
        field = fields.get(rest.lower()) if head == section.upper() else None
        if field is not None and source.field_is_complex(field) and not _is_json(name):
            return f"{name}: not a JSON value (a list or a table is written as JSON)"
    whole = f"{_ENV_PREFIX}{section.upper()}"
    named = next((name for name in environ if name.upper() == whole), whole)
    return f"{named}: not a JSON value of the whole section ({exc})"


def _is_json(variable: str) -> bool:
    try:
        json.loads(os.environ[variable])
    except ValueError:
        return False
    return True


def _unknown_variable(name: str, known: list[str]) -> str | None:
    """The problem of environment variable *name* (``ROTATOR_...``, upper case) if it names
    no setting, with the closest one that does; ``None`` if it names one."""
    if name in known or name in OTHER_VARIABLES:
        return None
    parts = name.removeprefix(_ENV_PREFIX).split(_NESTED)
    fields = [f.upper() for f in KeysetSettings.model_fields]
    if parts[0] == "KEYSETS" and len(parts) == 2 and parts[1]:
        return None  # ROTATOR_KEYSETS__NAME: a whole key set as JSON
    if parts[0] == "KEYSETS" and len(parts) == 3 and parts[1]:
        if parts[2] in fields:
            return None
        prefix = f"{_ENV_PREFIX}KEYSETS{_NESTED}{parts[1]}{_NESTED}"
        known = [prefix + field for field in fields]
    close = difflib.get_close_matches(name, [*known, *OTHER_VARIABLES], n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"environment variable {name} names no setting{hint}"


def _set_by(line: str, variables: Mapping[str, str]) -> str:
    """*line* with each field that an environment variable set followed by its name."""
    for location, name in variables.items():
        line = re.sub(
            rf"(^|; ){re.escape(location)}: ", rf"\g<1>{location} (set by {name}): ", line
        )
    return line


def _merged(low: Mapping[str, Any], high: Mapping[str, Any]) -> dict[str, Any]:
    """*low* overlaid by *high*, table by table (how pydantic-settings merges its sources)."""
    merged = dict(low)
    for key, value in high.items():
        below = merged.get(key)
        if isinstance(value, Mapping) and isinstance(below, Mapping):
            merged[key] = _merged(below, value)
        else:
            merged[key] = value
    return merged


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Read *path* (TOML, optional), overlay ``ROTATOR_*`` env vars, then *overrides*.

    Raises `ConfigError` with one line per problem, each naming its field (and the
    environment variable that set it), or naming a ``ROTATOR_*`` variable that names no
    setting (a misspelling would otherwise be ignored without a word).
    """
    document = {} if path is None else _config_document(path)
    known = _setting_variables()
    environ = sorted(name for name in os.environ if name.upper().startswith(_ENV_PREFIX))
    problems = [p for p in (_unknown_variable(n.upper(), known) for n in environ) if p]
    if problems:
        raise ConfigError("\n".join(problems))
    # Each field set by a variable, as its errors name it: ROTATOR_ROTATION__INTERVAL sets
    # rotation.interval.
    variables = {
        # Upper-cased first: pydantic-settings reads ``rotator_daemon__tick`` too.
        ".".join(name.upper().removeprefix(_ENV_PREFIX).split(_NESTED)).lower(): name
        for name in environ
        if _NESTED in name
    }
    try:
        # The priority of pydantic-settings' own sources: overrides, then the
        # environment, then the file.
        merged = _merged(_merged(document, EnvSettingsSource(Settings)()), overrides)
        settings = Settings(**merged)
    except RecursionError:
        raise ConfigError("a ROTATOR_* variable holds JSON nested too deeply to read") from None
    except SettingsError as exc:  # a ROTATOR_<SECTION> value that is not JSON
        raise ConfigError(_not_json(exc, environ)) from None
    except ValidationError as exc:
        lines = [_set_by(describe_error(error), variables) for error in exc.errors()]
        raise ConfigError("\n".join(lines)) from None
    if path is not None and _same_file(settings.daemon.backup_path, path):
        raise ConfigError("daemon.backup_path: is the config file itself")
    return settings


#: The largest config file read: a TOML file of rotator's settings is a few KiB.
MAX_CONFIG_BYTES = 1024 * 1024


def _config_document(path: Path) -> dict[str, Any]:
    """The TOML document at *path*, or `ConfigError` in one line saying why not."""
    try:
        status = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"config file {shown(str(path))}: not found") from None
    except OSError as exc:
        raise ConfigError(f"config file {shown(str(path))}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(status.st_mode):
        raise ConfigError(f"config file {shown(str(path))}: is a directory")
    if not stat.S_ISREG(status.st_mode):  # a FIFO would block, /dev/zero never end
        raise ConfigError(f"config file {shown(str(path))}: not a regular file")
    try:
        # Text mode, as before the bound: a file of old Mac line ends (CR) still reads.
        with path.open(encoding="utf-8") as handle:
            text = handle.read(MAX_CONFIG_BYTES + 1)
        if len(text) > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {shown(str(path))}: larger than 1 MiB")
        return tomllib.loads(text)
    except RecursionError:
        raise ConfigError(f"config file {shown(str(path))}: nested too deeply") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as exc:
        raise ConfigError(f"config file {shown(str(path))}: {exc}") from None


def _same_file(one: Path | None, other: Path | None) -> bool:
    """Whether two configured paths name one file (existing or not)."""
    if one is None or other is None:
        return False
    try:
        return one.resolve() == other.resolve()
    except (OSError, RuntimeError, ValueError):  # a loop of links, a NUL: not the same
        return False
