"""Billing as the server holds it: the database, this process's meter and the key store, built by create_app
and started/stopped by its lifespan."""

from __future__ import annotations

import asyncio
import logging

from deepserve.billing import db as dbmod
from deepserve.billing.db import Database
from deepserve.billing.keys import KeyStore
from deepserve.billing.meter import Meter
from deepserve.config import Settings

log = logging.getLogger(__name__)


class Billing:
    def __init__(self, settings: Settings, operator_keys: list[str]):
        self.db = Database(settings.resolved_database_url)
        self.meter = Meter(self.db)
        self.key_store = KeyStore(self.db, operator_keys, allow_anonymous=settings.no_auth)

    async def start(self) -> None:
        """Migrate the schema to the newest revision, register this process, release what crashed ones held."""
        revision = await asyncio.to_thread(dbmod.upgrade, self.db.engine)
        released = await self.meter.start()
        log.info("billing database %s at revision %s; %d stale reservation(s) released",
                 dbmod.describe(self.db.url), revision, released)

    async def stop(self) -> None:
        try:
            await self.meter.stop()
        finally:
            await asyncio.to_thread(self.db.close)
