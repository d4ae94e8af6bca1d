"""What the tests that use PostgreSQL share: the server they were given (tests/conftest.py), and
the state location of a test database."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

import psycopg

from xencr.config import StateLocation

PG_ENV, PG_PASSWORD_ENV, NO_PG_ENV = "XENCR_TEST_PG", "XENCR_TEST_PG_PASSWORD", "XENCR_NO_PG"


@dataclass(frozen=True)
class PgServer:
    url: str  # postgresql://user@host:port/db: a database the user may connect to
    password: str

    def admin(self) -> psycopg.Connection[tuple[object, ...]]:
        parts = urlsplit(self.url)
        return psycopg.connect(
            host=parts.hostname,
            port=parts.port or 5432,
            user=parts.username,
            dbname=parts.path.lstrip("/"),
            password=self.password,
            autocommit=True,
            connect_timeout=10,
        )

    def database_url(self, name: str) -> str:
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc}/{name}"


def pg_location(url: str) -> StateLocation:
    """The state location of a test database: its password from $XENCR_TEST_PG_PASSWORD."""
    return StateLocation(url=url, password_env=PG_PASSWORD_ENV)
