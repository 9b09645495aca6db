"""How every Kafka client of modstream authenticates: from the settings (modstream/settings.py),
never from a flag, so no password reaches the process table or a log.

PLAINTEXT (the default: the embedded local stack on loopback) adds nothing. SASL_SSL speaks
SCRAM (SHA-512 by default) over TLS, verifying the brokers' certificates against
MODSTREAM_KAFKA_CA_FILE (or the system's CAs) and their host names. Each role runs as its
own principal (MODSTREAM_KAFKA_USERNAME / MODSTREAM_KAFKA_PASSWORD), and the brokers' ACLs
give that principal only its topics and groups (deploy/kafka-acls.sh).

`client_options()` is the keyword arguments for aiokafka's producers, consumers and admin
client; `faust_credentials()` the same for the worker's faust app.
"""

from __future__ import annotations

import functools
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modstream.settings import Settings, SettingsError, current


@dataclass(frozen=True)
class KafkaAuth:
    protocol: str = "PLAINTEXT"
    mechanism: str = "SCRAM-SHA-512"
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never in a repr, hence a log line
    ca_file: str | None = None

    def __post_init__(self) -> None:
        if self.protocol not in ("PLAINTEXT", "SASL_SSL"):
            raise SettingsError(
                f"MODSTREAM_KAFKA_SECURITY_PROTOCOL must be PLAINTEXT or SASL_SSL, not {self.protocol!r}"
            )
        if self.protocol == "SASL_SSL":
            if not self.username or not self.password:
                raise SettingsError(
                    "MODSTREAM_KAFKA_SECURITY_PROTOCOL=SASL_SSL needs MODSTREAM_KAFKA_USERNAME and "
                    "MODSTREAM_KAFKA_PASSWORD (the password as a file in $MODSTREAM_SECRETS_DIR)"
                )
            if self.ca_file and not Path(self.ca_file).is_file():
                raise SettingsError(f"MODSTREAM_KAFKA_CA_FILE={self.ca_file}: no such file")

    @classmethod
    def from_settings(cls, settings: Settings) -> KafkaAuth:
        password = settings.kafka_password.get_secret_value() if settings.kafka_password else None
        return cls(
            settings.kafka_security_protocol,
            settings.kafka_sasl_mechanism,
            settings.kafka_username,
            password,
            settings.kafka_ca_file,
        )

    @property
    def secured(self) -> bool:
        return self.protocol == "SASL_SSL"

    def ssl_context(self) -> ssl.SSLContext:
        """TLS 1.2 or later, the brokers' certificates and host names verified."""
        context = ssl.create_default_context(cafile=self.ca_file)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for AIOKafkaProducer / AIOKafkaConsumer / AIOKafkaAdminClient."""
        if not self.secured:
            return {}
        return {
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": self.mechanism,
            "sasl_plain_username": self.username,
            "sasl_plain_password": self.password,
            "ssl_context": self.ssl_context(),
        }

    def faust_credentials(self) -> Any:
        """`broker_credentials` for faust.App (None: plaintext)."""
        if not self.secured:
            return None
        import faust
        from faust.types.auth import SASLMechanism

        return faust.SASLCredentials(
            username=self.username,
            password=self.password,
            ssl_context=self.ssl_context(),
            mechanism=SASLMechanism(self.mechanism),
        )


@functools.cache
def kafka_auth() -> KafkaAuth:
    """This process's Kafka credentials, read once from the settings."""
    return KafkaAuth.from_settings(current())


def client_options() -> dict[str, Any]:
    return kafka_auth().client_options()
