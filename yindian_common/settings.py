"""Settings plumbing: every process has one frozen pydantic-settings object,
built in main from (highest first) command-line flags, YINDIAN_* environment
variables, a TOML config file, then defaults, and passed down."""
from __future__ import annotations

import argparse
from typing import Any, TypeVar

from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

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


def load_settings(cls: type[S], args: argparse.Namespace | dict[str, Any] | None = None,
                  config_file: str | None = None) -> S:
    """Flags that were given (not None) override env, which overrides the TOML file."""
    given = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    known = cls.model_fields
    overrides = {k: v for k, v in given.items() if v is not None and k in known}
    target: type[S] = cls
    if config_file:
        target = type(cls.__name__, (cls,), {  # type: ignore[assignment]
            "model_config": {**cls.model_config, "toml_file": config_file}})
    return target(**overrides)


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
