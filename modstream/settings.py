"""Settings every role shares, from the environment, a secrets folder and a config file, so
that nothing secret has to sit on a command line (the process table) or in a manifest's args.

Precedence, highest first: a command-line flag; `MODSTREAM_<NAME>` in the environment; a file
named `MODSTREAM_<NAME>` in `$MODSTREAM_SECRETS_DIR` (a mounted Kubernetes Secret, Docker
secrets); the TOML file `$MODSTREAM_CONFIG`; the built-in default. pydantic-settings does the
reading and validation; secrets are `SecretStr`, so printing the settings shows `**********`.

    MODSTREAM_KAFKA_BOOTSTRAP   Kafka bootstrap servers            (127.0.0.1:19092)
    MODSTREAM_KAFKA_SECURITY_PROTOCOL  PLAINTEXT or SASL_SSL        (PLAINTEXT)
    MODSTREAM_KAFKA_SASL_MECHANISM     SCRAM-SHA-512 or SCRAM-SHA-256 (SCRAM-SHA-512)
    MODSTREAM_KAFKA_USERNAME, MODSTREAM_KAFKA_PASSWORD   this role's Kafka principal (a secret: a file)
    MODSTREAM_KAFKA_CA_FILE     the CA that signed the brokers' certificates (unset: the system's)
    MODSTREAM_REDIS_URL         Redis URL, may carry a password    (redis://127.0.0.1:16379/0)
    MODSTREAM_EVIDENCE          evidence store: a folder or s3://bucket/prefix  ($MODSTREAM_HOME/evidence)
    MODSTREAM_S3_ENDPOINT       S3-compatible endpoint URL (unset: AWS)
    MODSTREAM_S3_REGION         its region                          (unset: boto3's default)
    MODSTREAM_S3_ACCESS_KEY_ID, MODSTREAM_S3_SECRET_ACCESS_KEY   (unset: boto3's chain, e.g. a pod role)
    MODSTREAM_MEDIA_LINK_KEY    signs Label Studio's media links (a secret; unset: none are made or served)
    MODSTREAM_AUDIT_KEY         keys the blind audit sample (a secret; unset: a development key)
    MODSTREAM_PROMETHEUS_URL    the Prometheus the console's live-quality page reads (unset: none)
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import SecretStr
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

CONFIG_ENV = "MODSTREAM_CONFIG"
SECRETS_DIR_ENV = "MODSTREAM_SECRETS_DIR"


class SettingsError(ValueError):
    """A config file or setting that cannot be read; the message says which and why."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MODSTREAM_", extra="ignore", case_sensitive=False)

    kafka_bootstrap: str = "127.0.0.1:19092"
    # Authenticated transport (modstream/kafka_auth.py): one principal per role, its password a
    # secret (a file in $MODSTREAM_SECRETS_DIR, never a flag), TLS verified against the CA.
    kafka_security_protocol: Literal["PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256"] = "SCRAM-SHA-512"
    kafka_username: str | None = None
    kafka_password: SecretStr | None = None
    kafka_ca_file: str | None = None
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:16379/0")
    evidence: str | None = None  # None: <MODSTREAM_HOME>/evidence (modstream.options.evidence_location)
    s3_endpoint: str | None = None
    s3_region: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    # Signs the links Label Studio loads scored media by (review/media_links.py); the exporting
    # command and the console need the same one. Unset: no such links (the console refuses them).
    media_link_key: SecretStr | None = None
    # Keys the blind audit sample (stream/audit_sampling.py): posters cannot tell audited posts.
    audit_key: SecretStr | None = None
    # The Prometheus whose recorded live-quality series the console plots (review/live_quality_source.py).
    prometheus_url: str | None = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources = [init_settings, env_settings, file_secret_settings]
        config = os.environ.get(CONFIG_ENV)
        if config:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config)))
        return tuple(sources)


def load() -> Settings:
    """The settings as the environment says now (tests change it; roles read it once)."""
    config = os.environ.get(CONFIG_ENV)
    if config and not Path(config).is_file():
        raise SettingsError(f"{CONFIG_ENV}={config}: no such file")
    options: dict[str, Any] = {}
    secrets = os.environ.get(SECRETS_DIR_ENV)
    if secrets:
        if not Path(secrets).is_dir():
            raise SettingsError(f"{SECRETS_DIR_ENV}={secrets}: no such folder")
        options["_secrets_dir"] = secrets
    try:
        return Settings(**options)
    except Exception as exc:  # pydantic's ValidationError, a TOML syntax error
        raise SettingsError(f"settings: {exc}") from exc


@functools.cache
def current() -> Settings:
    return load()
