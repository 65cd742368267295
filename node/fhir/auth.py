"""Bearer tokens and SMART-style system scopes.

Two kinds of credentials, both configured under ``[auth]``:

* static tokens: the SHA-256 of each token, with a name and its scopes;
* JWTs from one issuer: the signature is checked against the issuer's JWKS (a file, or a
  URL whose keys are cached), and ``iss``, ``exp`` (required), ``nbf`` and, if configured,
  ``aud``; the scopes are the ``scope`` claim (space-separated) or ``scp`` (a list).

Scopes follow SMART App Launch for backend services: ``system/<Type>.<access>`` where the
access is v1 ``read`` / ``write`` / ``*`` or v2 letters ``c r u d s`` (``system/*.rs``).
AuditEvents are readable only with a scope naming AuditEvent itself (the admin scope,
``system/AuditEvent.read``): wildcards do not grant it.

No credential, or an invalid one, is a 401; a valid one without the scope is a 403.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Final, Literal

import jwt

from node.fhir.errors import FhirError
from node.settings import AuthSettings, ConfigError, Settings, is_loopback_host

log = logging.getLogger("medgemma.fhir.auth")

Access = Literal["c", "r", "u", "d", "s"]
ADMIN_TYPES: Final = frozenset({"AuditEvent"})
_SCOPE: Final = re.compile(r"^system/(\*|[A-Z][A-Za-z]+)\.(read|write|\*|c?r?u?d?s?)$")


@dataclass(frozen=True)
class Principal:
    """Who is calling: a token name or JWT subject, and the scopes granted."""

    name: str
    kind: Literal["token", "jwt", "anonymous"]
    scopes: frozenset[str] = field(default_factory=frozenset)

    def allows(self, resource_type: str, access: Access) -> bool:
        """True when a scope grants ``access`` (c, r, u, d, s) on ``resource_type``."""
        return _scopes_allow(self.scopes, resource_type, access)


@lru_cache(maxsize=4096)
def _scopes_allow(scopes: frozenset[str], resource_type: str, access: Access) -> bool:
    """:meth:`Principal.allows` (cached: the same few scope sets ask the same questions)."""
    for scope in scopes:
        m = _SCOPE.match(scope)
        if m is None:
            continue
        rtype, what = m[1], m[2]
        if rtype == "*" and resource_type in ADMIN_TYPES:
            continue
        if rtype not in ("*", resource_type):
            continue
        if what == "*" or (what == "read" and access in "rs"):
            return True
        if what == "write" and access in "cud":
            return True
        if what not in ("read", "write") and access in what:
            return True
    return False


def anonymous_access_warning(settings: Settings) -> str | None:
    """The warning for ``auth.required = false`` (anonymous callers get every scope), or
    None when requests need a credential."""
    if settings.auth.required:
        return None
    return (
        "auth.required is false: ANONYMOUS callers of the FHIR API on "
        f"{settings.api.host}:{settings.api.port} get every scope (system/*.*): patient data "
        "for anyone who can connect. Set auth.required = true outside a closed test network."
    )


def check_anonymous_bind(settings: Settings) -> None:
    """ConfigError when anonymous access would be reachable beyond this machine (a
    non-loopback api.host) without ``auth.allow_anonymous_on_network = true``."""
    if settings.auth.required or settings.auth.allow_anonymous_on_network:
        return
    if not is_loopback_host(settings.api.host):
        raise ConfigError(
            f"auth.required = false gives anonymous callers every scope, and api.host "
            f"{settings.api.host} is not loopback: set auth.required = true (with tokens), "
            "api.host = 127.0.0.1, or auth.allow_anonymous_on_network = true to accept it"
        )


def _challenge(description: str) -> dict[str, str]:
    safe = description.replace('"', "'")
    return {
        "WWW-Authenticate": (
            f'Bearer realm="medgemma-node", error="invalid_token", error_description="{safe}"'
        )
    }


def unauthorized(message: str) -> FhirError:
    return FhirError(401, message, code="login", headers=_challenge(message))


def scope_needed(resource_type: str, access: Access) -> str:
    """The SMART v1 scope that grants ``access`` on ``resource_type`` (for messages)."""
    return f"system/{resource_type}.read" if access in "rs" else f"system/{resource_type}.write"


def forbidden(principal: Principal, resource_type: str, access: Access) -> FhirError:
    words = {"c": "create", "r": "read", "u": "update", "d": "delete", "s": "search"}
    need = scope_needed(resource_type, access)
    return FhirError(
        403,
        f"{principal.name} may not {words[access]} {resource_type}: needs the scope {need}"
        + (" (wildcards do not grant AuditEvent)" if resource_type in ADMIN_TYPES else ""),
        code="forbidden",
    )


class Authenticator:
    """Checks the Authorization header of a request and returns the Principal."""

    def __init__(self, settings: AuthSettings) -> None:
        self.settings = settings
        self._tokens = {t.sha256: t for t in settings.tokens}
        self._principals = {
            t.sha256: Principal(t.name, "token", frozenset(t.scopes)) for t in settings.tokens
        }
        self._jwks: jwt.PyJWKSet | None = None
        self._jwks_client: jwt.PyJWKClient | None = None
        if settings.jwt_issuer:
            if settings.jwks_file:
                path = Path(settings.jwks_file).expanduser()
                try:
                    self._jwks = jwt.PyJWKSet.from_dict(json.loads(path.read_text()))
                except (OSError, ValueError, jwt.PyJWTError) as exc:
                    raise ConfigError(f"auth.jwks_file {path} cannot be used: {exc}") from exc
            else:
                self._jwks_client = jwt.PyJWKClient(
                    settings.jwks_url, cache_keys=True, lifespan=300, timeout=10
                )
        if not settings.required:
            log.warning(
                "!!! auth.required is false: ANONYMOUS callers get every scope (system/*.*) "
                "on this FHIR API; use this only on a closed test network !!!"
            )
        if settings.required and not self._tokens and not settings.jwt_issuer:
            log.warning(
                "auth.required is true but no tokens or JWT issuer are configured: "
                "every FHIR request but /fhir/metadata will be refused (401)"
            )

    def authenticate(self, authorization: str | None) -> Principal:
        """The caller of a request; FhirError 401 when the credential is missing or bad."""
        if not authorization:
            if not self.settings.required:
                return Principal("anonymous", "anonymous", frozenset({"system/*.*"}))
            raise unauthorized("a bearer token is required (Authorization: Bearer <token>)")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise unauthorized("the Authorization header must be 'Bearer <token>'")
        if token.count(".") == 2 and self.settings.jwt_issuer:
            return self._jwt(token)
        known = self._principals.get(hashlib.sha256(token.encode()).hexdigest())
        if known is not None:
            return known
        if token.count(".") == 2:
            raise unauthorized("JWTs are not accepted: auth.jwt_issuer is not configured")
        raise unauthorized("unknown bearer token")

    def _signing_key(self, token: str) -> Any:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise unauthorized(f"malformed JWT: {exc}") from None
        kid = header.get("kid")
        if self._jwks_client is not None:
            try:
                return self._jwks_client.get_signing_key_from_jwt(token).key
            except jwt.PyJWKClientError as exc:
                raise unauthorized(f"no signing key for this JWT: {exc}") from None
        assert self._jwks is not None
        keys = list(self._jwks.keys)
        if kid is not None:
            for k in keys:
                if k.key_id == kid:
                    return k.key
            raise unauthorized(f"no key {kid!r} in the issuer's JWKS")
        if len(keys) == 1:
            return keys[0].key
        raise unauthorized("the JWT has no kid and the JWKS has several keys")

    def _jwt(self, token: str) -> Principal:
        s = self.settings
        key = self._signing_key(token)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=list(s.jwt_algorithms),
                issuer=s.jwt_issuer,
                audience=s.jwt_audience or None,
                leeway=s.leeway_seconds,
                options={"require": ["exp", "iss"], "verify_aud": bool(s.jwt_audience)},
            )
        except jwt.ExpiredSignatureError:
            raise unauthorized("the JWT has expired") from None
        except jwt.InvalidSignatureError:
            raise unauthorized("the JWT signature does not verify") from None
        except jwt.InvalidIssuerError:
            raise unauthorized("the JWT issuer is not the configured auth.jwt_issuer") from None
        except jwt.InvalidAudienceError:
            raise unauthorized("the JWT audience is not auth.jwt_audience") from None
        except jwt.PyJWTError as exc:
            raise unauthorized(f"invalid JWT: {exc}") from None
        raw = claims.get("scope", claims.get("scp", ""))
        scopes = raw.split() if isinstance(raw, str) else [str(x) for x in raw or []]
        name = str(claims.get("sub") or claims.get("client_id") or "jwt")
        return Principal(name[:64], "jwt", frozenset(scopes))
