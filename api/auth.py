"""Who is calling: the API key in `Authorization: Bearer <key>` or `X-API-Key: <key>`.

Every job belongs to the key that created it; `owner` is that key's id. With `NAD_AUTH_ENABLED=false` every
caller is the one owner `anonymous` (for a service on a trusted network only).

A key found good is trusted for `NAD_KEY_CACHE_SECONDS` without asking the database again (`keys.KeyCache`).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from api.problems import ProblemError
from api.services import Reading, Service
from core import keys

ANONYMOUS = "anonymous"

bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer nad_...`")
api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="`X-API-Key: nad_...`")


async def owner(
    service: Service,
    session: Reading,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    header_key: Annotated[str | None, Depends(api_key_header)],
) -> str:
    """The id of the calling key, or a 401 problem that says how to authenticate."""
    if not service.settings.auth_enabled:
        return ANONYMOUS
    presented = credentials.credentials if credentials else header_key
    if not presented:
        raise _unauthorized("this endpoint needs an API key: send `Authorization: Bearer <key>` or "
                            "`X-API-Key: <key>`; an operator creates keys with `nad keys create --name NAME`")
    key_id = service.keys.get(presented)
    if key_id is not None:
        return key_id
    key_id = await session.run_sync(keys.authenticate, presented)
    if key_id is None:
        raise _unauthorized("the API key is not valid (mistyped, or revoked); ask an operator for a new one")
    service.keys.put(presented, key_id)
    return key_id


def _unauthorized(detail: str) -> ProblemError:
    return ProblemError(401, detail, headers={"WWW-Authenticate": "Bearer"})


Owner = Annotated[str, Depends(owner)]
