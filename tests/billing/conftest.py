"""Billing test fixtures: a fresh billing database per test, on SQLite and (when DEEPSERVE_TEST_DATABASE_URL
points at one, as .ci/run arranges) on PostgreSQL."""

from __future__ import annotations

import os

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from deepserve.billing import db
from deepserve.billing.tables import Base

PG_URL = os.environ.get("DEEPSERVE_TEST_DATABASE_URL")
needs_postgres = pytest.mark.skipif(not PG_URL, reason="DEEPSERVE_TEST_DATABASE_URL is not set (.ci/run sets it)")

BACKENDS = ["sqlite", pytest.param("postgresql", marks=needs_postgres)]


def reset_postgres(url: str) -> None:
    """Drop every billing table: each test starts from an empty schema."""
    engine = db.create_db_engine(url, pool_size=1)
    with engine.begin() as conn:
        Base.metadata.drop_all(conn)
        conn.exec_driver_sql("DROP TABLE IF EXISTS alembic_version")
    engine.dispose()


def database_url(backend: str, tmp_path) -> str:
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'billing.db'}"
    assert PG_URL
    reset_postgres(PG_URL)
    return PG_URL


@pytest.fixture(params=BACKENDS)
def db_url(request, tmp_path) -> str:
    return database_url(request.param, tmp_path)


@pytest.fixture()
def engine(db_url: str) -> Engine:
    engine = db.create_db_engine(db_url)
    db.upgrade(engine)
    yield engine
    engine.dispose()


def count(engine: Engine, table: str) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one()
