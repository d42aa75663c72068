"""API keys: created by an operator (`fudlr keys create`), presented as `Bearer` tokens.

Keys are 256-bit random strings, so a plain sha256 is a safe way to keep them: a
leaked table yields no key, and lookups are by hash.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Annotated, TypeVar

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.auth.models import ApiKey, Tenant
from service.context import ContextDep, SessionDep
from service.db import new_id, utcnow
from service.problems import Problem, not_found
from service.storage import TenantStore

KEY_PREFIX = "fudlr-"
_bearer = HTTPBearer(auto_error=False, description="An API key from `fudlr keys create`.")


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, tenant_name: str) -> tuple[Tenant, ApiKey, str]:
    """A new key for the tenant (created if new); the clear key is returned only here."""
    tenant = session.scalar(select(Tenant).where(Tenant.name == tenant_name))
    if tenant is None:
        tenant = Tenant(id=new_id("ten"), name=tenant_name)
        session.add(tenant)
        session.flush()  # the key's foreign key needs the tenant row first
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    record = ApiKey(id=new_id("key"), tenant_id=tenant.id, key_hash=_hash(key), prefix=key[:12])
    session.add(record)
    return tenant, record, key


def revoke_key(session: Session, key_id: str) -> bool:
    record = session.get(ApiKey, key_id)
    if record is None or record.revoked_at is not None:
        return False
    record.revoked_at = utcnow()
    return True


def tenant_of(session: Session, key: str) -> str | None:
    return session.scalar(
        select(ApiKey.tenant_id).where(ApiKey.key_hash == _hash(key), ApiKey.revoked_at.is_(None))
    )


def current_tenant(
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The tenant of the request's key; 401 for a missing, malformed, unknown or revoked key."""
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Problem(401, "unauthorized", "missing bearer API key", headers=challenge)
    tenant = tenant_of(session, credentials.credentials)
    if tenant is None:
        raise Problem(401, "unauthorized", "invalid or revoked API key", headers=challenge)
    return tenant


TenantDep = Annotated[str, Depends(current_tenant)]


def tenant_store(context: ContextDep, tenant: TenantDep) -> TenantStore:
    """The tenant's subtree of the artifact store: the only files a request may touch."""
    return context.storage.tenant(tenant)


StoreDep = Annotated[TenantStore, Depends(tenant_store)]
ModelT = TypeVar("ModelT")


def owned(session: Session, model: type[ModelT], identifier: str, tenant: str, kind: str) -> ModelT:
    """The tenant's object, else 404: another tenant's object looks exactly like none."""
    row = session.get(model, identifier)
    if row is None or row.tenant_id != tenant:  # type: ignore[attr-defined]
        raise not_found(kind, identifier)
    return row
