"""The rest-hook channel of a Subscription: where it may send, and its header secrets.

Where (checked when a Subscription is created and again before every delivery, because
DNS can change):

* the endpoint must match an entry of ``fhir.subscription_allowed_endpoints`` (scheme,
  host, port and path prefix; an empty list allows none);
* https, except to a loopback IP address named by an ``http://`` entry (tests);
* every address the host resolves to must be public, unless it is the IP address an entry
  names or lies in ``fhir.subscription_allowed_networks``: link-local (cloud metadata),
  loopback and private addresses are refused otherwise.

A delivery connects to the address that was checked (the URL's host stays in the Host
header and TLS server name), so a DNS answer that changes between the check and the
connection cannot redirect it.

Secrets: ``channel.header`` values (``Authorization: Bearer ...``) are stored encrypted
(Fernet, AES-128-CBC + HMAC-SHA256) with a key kept outside the database (the node's key
file, 0600, created on first use) and decrypted only to send a notification; reads and
searches show them masked.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.fernet import Fernet, InvalidToken

from node.datadir import PRIVATE_FILE, private_dirs
from node.settings import FhirSettings

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
#: ``(host, port) -> IP addresses`` (tests replace DNS with their own answers).
Resolver = Callable[[str, int], list[str]]

#: Marks an encrypted header value in the stored Subscription.
SEALED: Final = "enc:fernet:"
MASK: Final = "***"
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


class EndpointRefused(Exception):
    """The endpoint may not be called; the message says why and which setting allows it."""


class ChannelKeyError(Exception):
    """The channel header key cannot be read, or does not open a stored header."""


def resolve_host(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to (a literal IP is itself); OSError when none."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(frozen=True)
class AllowedEndpoint:
    """One entry of ``fhir.subscription_allowed_endpoints``."""

    scheme: str
    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, entry: str) -> AllowedEndpoint:
        parts = urllib.parse.urlsplit(entry)
        scheme = parts.scheme.lower()
        return cls(
            scheme,
            (parts.hostname or "").lower(),
            parts.port or _DEFAULT_PORTS.get(scheme, 0),
            parts.path or "/",
        )

    def matches(self, scheme: str, host: str, port: int, path: str) -> bool:
        if (scheme, host, port) != (self.scheme, self.host, self.port):
            return False
        prefix = self.path.rstrip("/")
        return path == prefix or path.startswith(prefix + "/")

    @property
    def literal(self) -> IpAddress | None:
        """The IP address this entry names, if its host is one."""
        try:
            return ipaddress.ip_address(self.host.strip("[]"))
        except ValueError:
            return None


@dataclass(frozen=True)
class CheckedEndpoint:
    """An endpoint that may be called, and the checked address to connect to."""

    url: str
    scheme: str
    host: str
    port: int
    address: str

    def pinned_url(self, url: str) -> str:
        """``url`` (on this endpoint's host) with the host replaced by the checked address."""
        parts = urllib.parse.urlsplit(url)
        host = f"[{self.address}]" if ":" in self.address else self.address
        return urllib.parse.urlunsplit(parts._replace(netloc=f"{host}:{self.port}"))

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == _DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"


def _kind(ip: IpAddress) -> str:
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_private:
        return "private"
    return "non-public"


def check_endpoint(
    url: str, settings: FhirSettings, resolve: Resolver = resolve_host
) -> CheckedEndpoint:
    """The endpoint as it may be called now; EndpointRefused with the reason otherwise."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise EndpointRefused("channel.endpoint must be an https URL")
    if parts.username is not None or parts.password is not None:
        raise EndpointRefused("channel.endpoint must not carry a user or password")
    host = parts.hostname.lower()
    try:
        port = parts.port or _DEFAULT_PORTS[scheme]
    except ValueError:
        raise EndpointRefused("channel.endpoint has an invalid port") from None
    path = parts.path or "/"
    if any(seg in (".", "..") for seg in urllib.parse.unquote(path).split("/")):
        raise EndpointRefused("channel.endpoint must not contain . or .. path segments")
    allowed = [AllowedEndpoint.parse(e) for e in settings.subscription_allowed_endpoints]
    if not allowed:
        raise EndpointRefused(
            "no Subscription endpoint is allowed on this node: "
            "fhir.subscription_allowed_endpoints is empty (list the https URL prefixes of "
            "the endpoints that may receive notifications there)"
        )
    entry = next((a for a in allowed if a.matches(scheme, host, port, path)), None)
    if entry is None:
        raise EndpointRefused(
            f"channel.endpoint {scheme}://{host}:{port} is not in "
            "fhir.subscription_allowed_endpoints"
        )
    if scheme == "http" and (entry.literal is None or not entry.literal.is_loopback):
        raise EndpointRefused("channel.endpoint must be https (http only to a loopback IP)")
    try:
        addresses = resolve(host, port)
    except OSError as exc:
        raise EndpointRefused(f"channel.endpoint host {host} cannot be resolved: {exc}") from None
    if not addresses:
        raise EndpointRefused(f"channel.endpoint host {host} has no address")
    networks = [
        ipaddress.ip_network(n, strict=False) for n in settings.subscription_allowed_networks
    ]
    for text in addresses:
        ip = ipaddress.ip_address(text.split("%")[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip.is_global and not ip.is_multicast:
            continue
        if ip == entry.literal or any(ip.version == n.version and ip in n for n in networks):
            continue
        raise EndpointRefused(
            f"channel.endpoint host {host} resolves to {ip}, a {_kind(ip)} address: allowed "
            "only when fhir.subscription_allowed_endpoints names that address or "
            "fhir.subscription_allowed_networks contains it"
        )
    return CheckedEndpoint(url, scheme, host, port, addresses[0])


class HeaderCipher:
    """Encrypts and decrypts channel header values with the node's key file (created 0600,
    in a 0700 directory, on first use)."""

    def __init__(self, key_path: Path) -> None:
        self.key_path = key_path
        self._fernet: Fernet | None = None
        self._lock = threading.Lock()

    def _key(self) -> Fernet:
        with self._lock:
            if self._fernet is None:
                self._fernet = Fernet(self._load_or_create())
            return self._fernet

    def _load_or_create(self) -> bytes:
        path = self.key_path
        if not path.exists():
            private_dirs(path.parent)
            # written whole under another name, then linked: a reader never sees half a key,
            # and of two processes creating it at once, the first link wins
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE)
            try:
                os.fchmod(fd, PRIVATE_FILE)
                os.write(fd, Fernet.generate_key() + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
        try:
            key = path.read_bytes().strip()
            Fernet(key)
        except (OSError, ValueError) as exc:
            raise ChannelKeyError(
                f"the Subscription header key {path} cannot be used: {exc}"
            ) from None
        return key

    def seal(self, headers: Sequence[str]) -> list[str]:
        """``Name: value`` lines with each value encrypted (already sealed ones kept)."""
        out = []
        for line in headers:
            name, _, value = line.partition(":")
            value = value.strip()
            if not value.startswith(SEALED):
                value = SEALED + self._key().encrypt(value.encode()).decode()
            out.append(f"{name.strip()}: {value}")
        return out

    def open(self, headers: Sequence[str]) -> dict[str, str]:
        """The headers to send, values decrypted (a clear-text value of an older version
        is sent as it is)."""
        out = {}
        for line in headers:
            name, _, value = str(line).partition(":")
            value = value.strip()
            if value.startswith(SEALED):
                try:
                    value = self._key().decrypt(value.removeprefix(SEALED).encode()).decode()
                except InvalidToken:
                    raise ChannelKeyError(
                        f"header {name.strip()} was encrypted with another key than {self.key_path}"
                    ) from None
            out[name.strip()] = value
        return out


def mask(headers: Sequence[str]) -> list[str]:
    """``Name: ***`` for each header line: values are never served back."""
    return [f"{str(h).partition(':')[0].strip()}: {MASK}" for h in headers]


__all__ = [
    "MASK",
    "SEALED",
    "AllowedEndpoint",
    "ChannelKeyError",
    "CheckedEndpoint",
    "EndpointRefused",
    "HeaderCipher",
    "Resolver",
    "check_endpoint",
    "mask",
    "resolve_host",
]
