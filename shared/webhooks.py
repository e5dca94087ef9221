"""Webhook URLs and signatures: the SSRF rules (used by the API at registration and by the deliverer
at connect time) and the Standard Webhooks signer.

Why a check at both times: a name that resolved to a public address at registration may resolve to
127.0.0.1 or 169.254.169.254 an hour later (DNS rebinding). The deliverer therefore checks the
address the socket actually connected to, after DNS, inside urllib3's connection (``guarded_session``);
redirects are not followed, proxies from the environment are not used.
"""
from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from standardwebhooks import Webhook
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from shared.errors import InvalidWebhook

MAX_URL_LENGTH = 2048


def address_allowed(ip: str) -> bool:
    """True for globally routable unicast addresses; False for loopback, link-local (cloud metadata),
    private, shared (CGNAT), reserved, multicast and unspecified ones, also when IPv4-mapped in IPv6."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_global and not addr.is_multicast


def check_url(url: str, allow_private: bool) -> str:
    """Validate a webhook URL at registration; return it. Raises InvalidWebhook saying why."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL_LENGTH:
        raise InvalidWebhook(f"webhook must be an http(s) URL of at most {MAX_URL_LENGTH} characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidWebhook("webhook must be an http:// or https:// URL with a host")
    if parts.username or parts.password:
        raise InvalidWebhook("webhook URLs may not carry credentials")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise InvalidWebhook("webhook URL has an invalid port") from None
    try:
        infos = socket.getaddrinfo(parts.hostname, port, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        raise InvalidWebhook(f"webhook host {parts.hostname!r} does not resolve ({exc})") from None
    if not allow_private:
        refused = sorted({i[4][0] for i in infos if not address_allowed(i[4][0])})
        if refused:
            raise InvalidWebhook(f"webhook host {parts.hostname!r} resolves to a loopback, link-local or private "
                                 f"address ({', '.join(refused)}); set PINFER_WEBHOOK_ALLOW_PRIVATE=1 to allow it")
    return url


def register(url: str | None, settings) -> str | None:
    """The webhook a request names (None when it names none), checked: webhooks must be enabled
    (PINFER_WEBHOOK_SECRET) and the URL must pass ``check_url``."""
    if url is None or url == "":
        return None
    if not settings.webhook_secret:
        raise InvalidWebhook("webhooks are not enabled on this server (PINFER_WEBHOOK_SECRET is not set)")
    return check_url(url, settings.webhook_allow_private)


def signer(secret: str) -> Webhook:
    """The Standard Webhooks signer for ``PINFER_WEBHOOK_SECRET`` (``whsec_`` + base64)."""
    try:
        return Webhook(secret)
    except Exception as exc:
        raise ValueError(f"PINFER_WEBHOOK_SECRET must be 'whsec_' + base64 of random bytes ({exc})") from None


class RefusedAddress(ConnectionError):
    """The webhook's host resolved, at connect time, to an address the SSRF rules refuse."""


class _Guard:
    def _new_conn(self):  # urllib3 2.x: the connected socket, after DNS
        sock = super()._new_conn()
        peer = sock.getpeername()[0]
        if not address_allowed(peer):
            sock.close()
            raise RefusedAddress(f"{self.host} connected to {peer}: loopback, link-local or private addresses "
                                 "are refused (PINFER_WEBHOOK_ALLOW_PRIVATE)")
        return sock


class _GuardedHTTPConnection(_Guard, HTTPConnection):
    pass


class _GuardedHTTPSConnection(_Guard, HTTPSConnection):
    pass


class _GuardedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection


class _GuardedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


class _GuardedAdapter(HTTPAdapter):
    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _GuardedHTTPPool, "https": _GuardedHTTPSPool}


def guarded_session(allow_private: bool) -> requests.Session:
    """A requests session for deliveries: no proxies from the environment, and (unless private
    addresses are allowed) every connection checked against the SSRF rules after DNS."""
    s = requests.Session()
    s.trust_env = False
    if not allow_private:
        adapter = _GuardedAdapter(max_retries=0)
        s.mount("http://", adapter)
        s.mount("https://", adapter)
    return s


__all__ = ["RefusedAddress", "address_allowed", "check_url", "guarded_session", "register", "signer"]
