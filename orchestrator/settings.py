"""Settings read from the environment (prefix ``IDHUB_``), validated once at start."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class SettingsError(SystemExit):
    """A bad setting: carries the one line that names it, and stops start-up."""

    def __init__(self, line: str) -> None:
        super().__init__(line)
        self.line = line


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IDHUB_", extra="ignore")

    database_url: str = Field(
        default_factory=lambda: f"sqlite:///{Path.cwd() / 'idhub.db'}",
        description="SQLAlchemy URL of the identity store; a SQLite file in the working directory by default",
    )
    broker_url: str = Field(
        default_factory=lambda: f"filesystem://{Path.cwd() / '.idhub' / 'broker'}",
        description="Celery broker URL; an embedded file-system broker by default.",
    )
    redis_url: str | None = Field(
        default=None, description="Redis for global rate limits and locks; the broker's Redis when unset."
    )
    targets_file: Path | None = None
    schema_dir: Path | None = Field(
        default=None, description="Folder of extra SCIM extension schemas (JSON), loaded at start."
    )
    max_page_size: int = Field(default=1000, ge=1, le=100_000)
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    bulk_max_operations: int = Field(default=1000, ge=1, le=100_000)
    max_string_length: int = Field(default=2048, ge=16)
    max_filter_length: int = Field(default=2048, ge=16)
    log_format: str = Field(default="console", pattern="^(console|json)$")
    log_level: str = Field(default="INFO", pattern="^(DEBUG|INFO|WARNING|ERROR)$")

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str) -> str:
        scheme = value.split(":", 1)[0].split("+", 1)[0]
        if scheme not in {"sqlite", "postgresql", "postgres"}:
            raise ValueError("must be a sqlite:// or postgresql:// URL")
        if value.startswith("postgres://"):
            value = "postgresql://" + value.removeprefix("postgres://")
        if value.startswith("postgresql://"):
            value = "postgresql+psycopg://" + value.removeprefix("postgresql://")
        return value


def load() -> Settings:
    """Read and validate the settings; a bad one raises SettingsError naming it in one line."""
    try:
        return Settings()
    except ValidationError as exc:
        err = exc.errors()[0]
        name = "IDHUB_" + "_".join(str(p) for p in err["loc"]).upper()
        raise SettingsError(f"idhub: bad setting {name}: {err['msg']}") from None


@lru_cache(maxsize=1)
def get() -> Settings:
    """The process-wide settings."""
    return load()
