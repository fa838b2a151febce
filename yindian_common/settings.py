"""Settings plumbing: every process has one frozen pydantic-settings object,
built in main from (highest first) command-line flags, YINDIAN_* environment
variables, a TOML config file, then defaults, and passed down.

`ServerSettings` holds what both servers (mis_adapter, bridge) share: TLS and
plain-text mode, clock and time zone, logging, the Prometheus endpoint, the
gRPC server's limits and the database pool. Every number is range-checked;
a value out of range, from any source, is refused naming the setting."""
from __future__ import annotations

import argparse
import json
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BeforeValidator, Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from yindian_common.audit_chain import SEAL_BATCH_MAX, SEAL_BATCHES_PER_PASS
from yindian_common.clock import DEFAULT_TZ
from yindian_common.server import ServerLimits, TlsFiles

S = TypeVar("S", bound="YinDianSettings")


class YinDianSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="YINDIAN_", frozen=True, extra="forbid")

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings],
                                   init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))


MESSAGE_BYTES_MAX = 256 * 1024 * 1024
PORT_MAX = 65_535
NAMES_MAX = 1_000  # entries of a list of names (operators, allowed clients, revoked serials)


def _names(value: Any) -> Any:
    """A list of names from a flag (repeated), TOML (an array) or the environment
    (comma-separated, or a JSON array as pydantic-settings writes lists)."""
    if isinstance(value, str):
        if value.lstrip().startswith("["):
            try:
                return json.loads(value)
            except ValueError:
                return value  # refused by the list type, naming the setting
        value = [v.strip() for v in value.split(",") if v.strip()]
    return value


# A list setting that YINDIAN_<NAME>=a,b sets as well as a repeated flag or a TOML array.
NameList = Annotated[list[str], NoDecode, BeforeValidator(_names), Field(max_length=NAMES_MAX)]


class ServerSettings(YinDianSettings):
    """The settings both servers share. Each server declares its own `listen`,
    `db` and `metrics_port` (their defaults differ) and its own bounds."""
    metrics_host: str = Field("127.0.0.1", description="address of the Prometheus /metrics endpoint")
    insecure: bool = Field(False, description="plain text on loopback, no TLS (development only); the bank id "
                                              "travels as x-yindian-bank-id metadata")
    force_insecure: bool = Field(False, description="allow plain text on a non-loopback address")
    tls_cert: str = Field("", description="PEM certificate this server presents")
    tls_key: str = Field("", description="PEM private key of --tls-cert")
    tls_ca: str = Field("", description="PEM CA bundle that signs the peers' certificates")
    clock_start: str = Field("", description="ISO instant the process clock starts at (tests, demos); "
                                             "empty: system time")
    timezone: str = Field(DEFAULT_TZ, description="time zone of business dates")
    log_level: str = Field("INFO", description="log level")
    crash_point: str = Field("", description="TESTS ONLY: SIGKILL this process at the named crash point(s) "
                                             "(yindian_common.crash_points); empty in production")
    db_pool_size: int = Field(16, ge=1, le=1_024, description="pooled connections per database")
    sqlite_synchronous: Literal["FULL", "NORMAL"] = Field(
        "FULL", description="SQLite durability: FULL (durable) or NORMAL")
    max_workers: int = Field(64, ge=1, le=4_096, description="threads serving RPCs")
    max_concurrent_rpcs: int = Field(256, ge=1, le=100_000, description="calls in progress before "
                                                                         "RESOURCE_EXHAUSTED")
    max_message_bytes: int = Field(4 * 1024 * 1024, ge=1_024, le=MESSAGE_BYTES_MAX,
                                   description="largest gRPC message accepted or sent")
    grace_s: float = Field(10.0, ge=0, le=3_600, description="drain period on SIGTERM")
    # Revoked client certificates (grpcio has no CRL support: refused at every call), reloaded with the
    # certificates on SIGHUP and when the files change.
    tls_revoked_serials: NameList = Field(default_factory=list,
                                          description="revoked client certificate serial, hex (repeatable)")
    tls_deny_list: str = Field("", description="file of revoked client certificate serials (hex, one a line)")
    tls_crl: str = Field("", description="certificate revocation list (PEM or DER) signed by a CA of --tls-ca")
    tls_reload_check_s: float = Field(1.0, gt=0, le=3_600,
                                      description="how often the TLS files are checked for changes")

    def server_limits(self) -> ServerLimits:
        return ServerLimits(max_workers=self.max_workers, max_concurrent_rpcs=self.max_concurrent_rpcs,
                            max_message_bytes=self.max_message_bytes, grace_s=self.grace_s)

    def tls(self) -> TlsFiles | None:
        """The TLS files, or None in plain-text mode; the three go together."""
        if not (self.tls_cert or self.tls_key or self.tls_ca):
            return None
        if not (self.tls_cert and self.tls_key and self.tls_ca):
            raise SystemExit("--tls-cert, --tls-key and --tls-ca go together")
        return TlsFiles(cert=self.tls_cert, key=self.tls_key, ca=self.tls_ca)


def load_settings(cls: type[S], args: argparse.Namespace | dict[str, Any] | None = None,
                  config_file: str | None = None) -> S:
    """Flags that were given (not None) override env, which overrides the TOML file.
    Raises pydantic's ValidationError for a refused value (see parse_settings)."""
    given = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    known = cls.model_fields
    overrides = {k: v for k, v in given.items() if v is not None and k in known}
    target: type[S] = cls
    if config_file:
        target = type(cls.__name__, (cls,), {  # type: ignore[assignment]
            "model_config": {**cls.model_config, "toml_file": config_file}})
    return target(**overrides)


def parse_settings(parser: argparse.ArgumentParser, cls: type[S], argv: list[str]) -> S:
    """A server's settings from its command line (flags from add_settings_flags),
    env and --config file. A value refused (out of range, wrong type), from any
    source, ends the process like a bad flag: exit status 2, naming the setting,
    its flag and its environment variable."""
    args = parser.parse_args(argv)
    try:
        return load_settings(cls, args, args.config_file)
    except ValidationError as exc:
        parser.error(settings_error(exc))


def settings_error(exc: ValidationError) -> str:
    """One line per refused setting: `invalid setting NAME (--flag, YINDIAN_NAME): why`."""
    lines = []
    for err in exc.errors():
        if not err["loc"]:  # a rule across settings: its message names them
            lines.append(f"invalid settings: {err['msg'].removeprefix('Value error, ')}")
            continue
        name = ".".join(str(p) for p in err["loc"])
        flag = str(err["loc"][0])
        lines.append(f"invalid setting {name} (--{flag.replace('_', '-')}, YINDIAN_{flag.upper()}): {err['msg']}")
    return "\n".join(lines)


def add_settings_flags(parser: argparse.ArgumentParser, cls: type[YinDianSettings],
                       skip: frozenset[str] = frozenset()) -> None:
    """One --flag per setting, documented with its description and default."""
    parser.add_argument("--config", dest="config_file", default=None, help="TOML config file")
    for name, f in cls.model_fields.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        help_text = (f.description or "") + f" (default: {f.default!r}; env YINDIAN_{name.upper()})"
        if f.annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        elif f.annotation in (int, float, str):
            parser.add_argument(flag, dest=name, type=f.annotation, default=None, help=help_text)  # type: ignore[arg-type]
        else:
            parser.add_argument(flag, dest=name, default=None, help=help_text,
                                action="append" if "list" in str(f.annotation) else "store")


class SealingServerSettings(ServerSettings):
    """ServerSettings of a server that keeps an audit chain (the bridge's journal, the MIS journal) and runs
    its sealer (yindian_common.audit_chain)."""
    audit_seal_interval_s: float = Field(2.0, gt=0, le=3_600, description="seconds between passes of the "
                                         "audit chain's sealer")
    audit_seal_batch_max: int = Field(SEAL_BATCH_MAX, ge=1, le=SEAL_BATCH_MAX,
                                      description="rows per seal and per sealing transaction (its Python work "
                                                  "comes in slices of this many rows)")
    audit_seal_batches_per_pass: int = Field(SEAL_BATCHES_PER_PASS, ge=1, le=100_000,
                                             description="seals written per background pass at most (the rest "
                                                         "waits for the next pass)")
