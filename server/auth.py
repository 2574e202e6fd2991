"""API keys: who may call the /v1 routes, which tasks each key reaches, and who manages deltas.

Keys come from a JSON file (`api_keys_file`) or the same JSON inline (`DELTAMUX_API_KEYS`): a list
of objects `{"name": "tenant-a", "key": "...", "tasks": ["alpha", "tiny-base"], "admin": false}`.
`tasks` lists model ids (the base's id included) or is "*" for every model. Clients send a key as
`Authorization: Bearer <key>`, which the OpenAI clients do with their `api_key` option.

Without keys the server is open: every caller reaches every task and may manage deltas. With
keys, a missing or unknown key is a 401 and a non-admin key on a delta-management route is a 403.
A model outside the key's tasks gets the same 404 as a model that does not exist, so a tenant
cannot learn which other tasks exist.

Only SHA-256 digests of the keys are kept. A presented key is hashed and compared with every
stored digest by `hmac.compare_digest`, without stopping at a match, so the time taken does not
depend on how much of a key matches or on which entry matched. Logs name the key's `name`, never the key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from server.errors import APIError

logger = logging.getLogger(__name__)

MIN_KEY_LENGTH = 16  # shorter keys are guessable; 16 random characters give at least 64 bits
ALL_TASKS = "*"


class KeyConfigError(ValueError):
    """The API key configuration is invalid."""


class _KeySpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=64)
    key: str = Field(min_length=MIN_KEY_LENGTH)
    tasks: list[str] | Literal["*"] = Field(default_factory=list)
    admin: bool = False


@dataclass(frozen=True)
class Principal:
    """The caller of one request: the key's name, the model ids it reaches (None: all) and its rights."""

    name: str
    tasks: frozenset[str] | None
    admin: bool

    def allows(self, model: str) -> bool:
        return self.tasks is None or model in self.tasks


OPEN = Principal(name="anonymous", tasks=None, admin=True)  # every caller when no keys are configured


@dataclass(frozen=True)
class _StoredKey:
    digest: bytes
    principal: Principal


class KeyRing:
    """The configured keys, kept as SHA-256 digests."""

    def __init__(self, keys: list[_StoredKey]) -> None:
        self._keys = keys

    def __len__(self) -> int:
        return len(self._keys)

    def authenticate(self, presented: str) -> Principal | None:
        """Return the principal of `presented`, or None; every stored digest is compared."""
        digest = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
        found = None
        for stored in self._keys:
            if hmac.compare_digest(digest, stored.digest):
                found = stored.principal
        return found


def parse_keys(text: str, *, source: str) -> KeyRing:
    """Parse the JSON key list; raise KeyConfigError naming the source and the entry at fault."""
    try:
        raw = json.loads(text)
    except ValueError as e:
        raise KeyConfigError(f"the API keys in {source} are not valid JSON: {e}") from e
    if not isinstance(raw, list):
        raise KeyConfigError(f"the API keys in {source} must be a JSON list of objects, got {type(raw).__name__}")

    keys: list[_StoredKey] = []
    names: set[str] = set()
    digests: set[bytes] = set()
    for position, item in enumerate(raw):
        try:
            spec = _KeySpec.model_validate(item)
        except ValidationError as e:
            # The message lists field names and errors only: pydantic's input echo could contain the key.
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'entry'}: {err['msg']}" for err in e.errors())
            raise KeyConfigError(f"API key entry {position} in {source} is invalid: {problems}") from None
        digest = hashlib.sha256(spec.key.encode("utf-8", "surrogatepass")).digest()
        if spec.name in names:
            raise KeyConfigError(f"API key name {spec.name!r} appears twice in {source}; names must be unique")
        if digest in digests:
            raise KeyConfigError(f"API key entry {spec.name!r} in {source} repeats another entry's key")
        names.add(spec.name)
        digests.add(digest)
        tasks = None if spec.tasks == ALL_TASKS else frozenset(spec.tasks)
        keys.append(_StoredKey(digest=digest, principal=Principal(name=spec.name, tasks=tasks, admin=spec.admin)))
    if not keys:
        raise KeyConfigError(f"{source} lists no API keys; remove the setting to run without authentication")
    return KeyRing(keys)


def load_keys(*, keys_file: Path | None, inline: str | None) -> KeyRing | None:
    """Return the configured key ring, or None when no keys are configured (an open server)."""
    if keys_file is not None and inline is not None:
        raise KeyConfigError("set either api_keys_file or DELTAMUX_API_KEYS, not both")
    if keys_file is not None:
        try:
            text = Path(keys_file).read_text(encoding="utf-8")
        except OSError as e:
            raise KeyConfigError(f"cannot read the API keys file {str(keys_file)!r}: {e.strerror}") from e
        ring = parse_keys(text, source=repr(str(keys_file)))
    elif inline is not None:
        ring = parse_keys(inline, source="DELTAMUX_API_KEYS")
    else:
        return None
    logger.info("authentication on: %d API keys", len(ring))
    return ring


def _bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def identify(request: Request) -> Principal:
    """Return the request's principal; raise a 401 APIError for a missing or unknown key."""
    ring: KeyRing | None = request.app.state.keys
    if ring is None:
        return OPEN
    token = _bearer_token(request)
    if token is None:
        raise APIError(
            401, "missing API key; send it as 'Authorization: Bearer <key>'", code="missing_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    principal = ring.authenticate(token)
    if principal is None:
        raise APIError(401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    return principal


def require_key(request: Request) -> Principal:
    """Dependency of every /v1 route: the caller's principal (OPEN when no keys are configured)."""
    return identify(request)


def require_admin(request: Request) -> Principal:
    """Dependency of the delta-management routes: the caller must hold an admin key."""
    principal = identify(request)
    if not principal.admin:
        logger.info("key %s denied delta management on %s %s", principal.name, request.method, request.url.path)
        raise APIError(403, "this API key may not manage deltas; use an admin key", code="admin_key_required")
    return principal
