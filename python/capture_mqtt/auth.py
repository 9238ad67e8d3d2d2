"""Capture's three ways to log in, and fetching a JWT from Capture's Auth API."""

from __future__ import annotations

import ipaddress
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import AuthenticationError, ConnectError

__all__ = ["Auth", "fetch_jwt"]

DEFAULT_PORTAL = "https://portal.captureplatform.com"


@dataclass(frozen=True)
class Auth:
    """Credentials for Capture's broker: a username plus a password, a JWT, or an API token's secret.

    Build one with :meth:`password`, :meth:`jwt` or :meth:`api_token`. The secret never shows in
    ``repr`` or ``str``.

    >>> import capture_mqtt as cm
    >>> cm.Auth.password("alice", "hunter2")
    Auth(kind='password', username='alice', secret=***)
    """

    kind: str
    username: str
    _secret: str | None = field(default=None, repr=False)
    _token_callable: Callable[[], str] | None = field(default=None, repr=False)

    @classmethod
    def password(cls, username: str, password: str) -> Auth:
        """A Capture user's (or a source's) username and password.

        >>> import capture_mqtt as cm
        >>> cm.Auth.password("alice", "hunter2").username
        'alice'
        """
        _check_text("username", username)
        _check_text("password", password)
        return cls("password", username, password)

    @classmethod
    def jwt(cls, username: str, token: str | Callable[[], str]) -> Auth:
        """A Capture username with a JWT from Capture's Auth API as the password.

        ``token`` is a string, or a callable returning a fresh one: it is called before every connect
        and reconnect (from the client's dispatcher thread, never the network thread).

        >>> import capture_mqtt as cm
        >>> cm.Auth.jwt("alice", lambda: "eyJ...").kind
        'jwt'
        """
        _check_text("username", username)
        if callable(token):
            return cls("jwt", username, None, token)
        _check_text("token", token)
        return cls("jwt", username, token)

    @classmethod
    def api_token(cls, token_id: str, token_value: str) -> Auth:
        """An API token: its ID (a GUID) as the username, its value as the password. It acts as a user.

        >>> import capture_mqtt as cm
        >>> cm.Auth.api_token("6f1c7e0e-0000-4000-8000-000000000000", "s3cret").kind
        'api_token'
        """
        _check_text("token_id", token_id)
        _check_text("token_value", token_value)
        return cls("api_token", token_id, token_value)

    def __repr__(self) -> str:
        return f"Auth(kind={self.kind!r}, username={self.username!r}, secret=***)"

    __str__ = __repr__

    @property
    def is_callable(self) -> bool:
        """Whether the secret comes from a callable (a refreshing JWT provider)."""
        return self._token_callable is not None

    def secret(self) -> str:
        """The password or token to send now (calls the token callable when there is one).

        >>> import capture_mqtt as cm
        >>> cm.Auth.jwt("alice", lambda: "eyJ.fresh.token").secret()
        'eyJ.fresh.token'
        """
        if self._token_callable is not None:
            token = self._token_callable()
            if not isinstance(token, str) or not token:
                raise AuthenticationError(
                    f"the token callable for {self.username!r} returned {type(token).__name__}, not a non-empty str"
                )
            return token
        return self._secret or ""


def _check_text(name: str, value: object) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    if not value:
        raise ValueError(f"{name} is empty")


def _open(request: urllib.request.Request, timeout: float) -> Any:
    """urlopen, without the proxy for a portal on this machine (the emulator's): urllib takes the
    proxy from the environment, and on Windows and macOS from the system settings, and would send
    even 127.0.0.1 through a corporate proxy that is not told otherwise. Other hosts go through
    urlopen as they are, and so through an opener the program installed."""
    host = urllib.parse.urlsplit(request.full_url).hostname or ""
    if host == "localhost" or _is_loopback(host):
        return urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=timeout)
    return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - the scheme is checked


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def fetch_jwt(username: str, password: str, base_url: str = DEFAULT_PORTAL, *, timeout: float = 15.0) -> str:
    """Logs in to Capture's Auth API and returns a JWT (valid for two hours) to use with :meth:`Auth.jwt`.

    Sends ``POST <base_url>/Auth`` with ``AuthVersion: V0.0.1`` and the username and password as JSON;
    the answer is the bare token. Raises :class:`AuthenticationError` when the credentials are refused
    and :class:`ConnectError` when the portal cannot be reached.

    >>> import capture_mqtt as cm
    >>> callable(cm.fetch_jwt)
    True
    """
    _check_text("username", username)
    _check_text("password", password)
    url = base_url.rstrip("/") + "/Auth"
    if not url.startswith(("https://", "http://")):
        raise ValueError(f"base_url must start with https:// (got {base_url!r})")
    body = json.dumps({"Username": username, "Password": password}).encode()
    request = urllib.request.Request(  # noqa: S310 - the scheme is checked above
        url,
        data=body,
        method="POST",
        headers={"AuthVersion": "V0.0.1", "Content-Type": "application/json"},
    )
    try:
        with _open(request, timeout) as response:
            token = str(response.read().decode()).strip()
    except urllib.error.HTTPError as err:
        if err.code in (400, 401, 403):
            raise AuthenticationError(
                f"Capture's Auth API at {url} refused the credentials of {username!r} (HTTP {err.code})"
            ) from None
        raise ConnectError(f"Capture's Auth API at {url} answered HTTP {err.code}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise ConnectError(f"could not reach Capture's Auth API at {url}: {reason}") from None
    token = token.strip('"')
    if not token:
        raise AuthenticationError(f"Capture's Auth API at {url} returned an empty token for {username!r}")
    return token
