"""Per-tenant API keys for the server, from a JSON file:

    {"tenants": {
        "acme": {"keys": ["sk-acme-1"], "adapters": ["sql", "support", "base"]},
        "ops":  {"keys": ["sk-ops-1"], "adapters": "*", "admin": true}}}

A request without a known key gets 401; asking for an adapter (``model``) outside its tenant's list gets
403 ("*" allows every adapter and the base model; the base model is "base" in a list). Only ``admin``
tenants may load and unload adapters. Without a keys file the server is open (bind it to localhost).
"""
from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from pathlib import Path


class AuthError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class Tenant:
    name: str
    adapters: frozenset[str] | None  # None: all
    admin: bool = False

    def allows(self, model: str) -> bool:
        return self.adapters is None or model in self.adapters


OPEN = Tenant("anonymous", None, admin=True)


class KeyRing:
    def __init__(self, tenants: dict[str, Tenant], keys: dict[str, str]):
        self.tenants, self._keys = tenants, keys

    @classmethod
    def from_file(cls, path: str | Path) -> "KeyRing":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"{path}: API keys file not found") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: invalid JSON ({exc})") from None
        if not isinstance(data, dict) or not isinstance(data.get("tenants"), dict):
            raise ValueError(f'{path}: expected {{"tenants": {{name: {{"keys": [...], "adapters": [...] or "*"}}}}}}')
        tenants, keys = {}, {}
        for name, entry in data["tenants"].items():
            where = f"{path}: tenant {name!r}"
            if not isinstance(entry, dict) or set(entry) - {"keys", "adapters", "admin"}:
                raise ValueError(f"{where}: allowed fields are keys, adapters, admin")
            ks, ads = entry.get("keys"), entry.get("adapters", [])
            if not isinstance(ks, list) or not ks or not all(isinstance(k, str) and len(k) >= 8 for k in ks):
                raise ValueError(f"{where}: 'keys' must be a non-empty list of strings of at least 8 characters")
            if ads != "*" and not (isinstance(ads, list) and all(isinstance(a, str) for a in ads)):
                raise ValueError(f"{where}: 'adapters' must be a list of adapter names or \"*\"")
            tenants[name] = Tenant(name, None if ads == "*" else frozenset(ads), bool(entry.get("admin", False)))
            for k in ks:
                if k in keys:
                    raise ValueError(f"{where}: a key is listed twice (also for tenant {keys[k]!r})")
                keys[k] = name
        return cls(tenants, keys)

    def authenticate(self, authorization: str | None) -> Tenant:
        """The tenant of an ``Authorization: Bearer <key>`` header; AuthError(401) otherwise."""
        if not authorization or not authorization.lower().startswith("bearer "):
            raise AuthError(401, "missing API key: send 'Authorization: Bearer <key>'")
        given = authorization[7:].strip()
        for key, tenant in self._keys.items():
            if hmac.compare_digest(key.encode(), given.encode()):
                return self.tenants[tenant]
        raise AuthError(401, "invalid API key")
