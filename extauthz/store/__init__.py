"""Shared state between replicas: the Store Protocol and its implementations."""

from extauthz.store.base import ClientRecord, Store, StoreError

__all__ = ["ClientRecord", "Store", "StoreError"]
