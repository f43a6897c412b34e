"""Who is calling: a ``Principal`` (namespace and scope) resolved from the bearer token.

Tokens from the settings are the operator's: admin on every namespace. Tokens
made with ``statehost token create`` belong to one namespace and one scope;
each scope includes the ones before it: read < invoke < submit < admin.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from statehost.server.persistence.database import SCOPES, Database

__all__ = ["Principal", "resolve"]


@dataclass(frozen=True)
class Principal:
    namespace: str | None  # None: every namespace
    scope: str
    label: str

    def can(self, namespace: str, scope: str) -> bool:
        """May this caller act with ``scope`` on ``namespace``?"""
        if self.namespace is not None and self.namespace != namespace:
            return False
        return SCOPES.index(self.scope) >= SCOPES.index(scope)

    def has(self, scope: str) -> bool:
        """Has this caller ``scope`` on at least its own namespace?"""
        return SCOPES.index(self.scope) >= SCOPES.index(scope)


def resolve(token: str, server_tokens: tuple[str, ...], db: Database | None) -> Principal | None:
    for known in server_tokens:
        if hmac.compare_digest(token.encode(), known.encode()):
            return Principal(None, "admin", "server token")
    if db is not None:
        row = db.find_token(token)
        if row is not None:
            return Principal(row.namespace, row.scope, row.label or f"token {row.hash[:8]}")
    return None
