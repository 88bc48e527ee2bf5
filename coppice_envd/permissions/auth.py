"""Who may call a sandbox's envd, and as which user (envd-contract §1.2, §3.1).

* The access-token gate: with a token set, every request needs `X-Access-Token` except the few
  routes envd exempts; `/files` may instead carry a v1 signature (`download_url`/`upload_url`).
* The effective user: HTTP Basic auth with an empty password names it (`basic_auth_user`),
  else the sandbox's default user (resolved in coppice_envd.request).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time

UNAUTHORIZED_MESSAGE = (
    "unauthorized access, please provide a valid access token or method signing if supported"
)

# (method, path) pairs that pass the gate without a token (signed /files is checked later).
_TOKEN_EXEMPT = frozenset(
    {("GET", "/health"), ("GET", "/files"), ("POST", "/files"), ("POST", "/init")}
)


def token_matches(expected: str, given: str | None) -> bool:
    return given is not None and hmac.compare_digest(expected.encode(), given.encode())


def passes_token_gate(token: str | None, given: str | None, method: str, path: str) -> bool:
    """Whether the request may reach its handler (§3.1); a None token means an open sandbox."""
    return token is None or (method, path) in _TOKEN_EXEMPT or token_matches(token, given)


def file_signature(
    path: str, operation: str, username: str, token: str, expiration: int | None
) -> str:
    """The `v1_` signature the SDKs put in download/upload URLs."""
    text = f"{path}:{operation}:{username}:{token}"
    if expiration is not None:
        text += f":{expiration}"
    digest = hashlib.sha256(text.encode()).digest()
    return "v1_" + base64.b64encode(digest).decode().rstrip("=")


def check_file_access(
    token: str | None,
    given_token: str | None,
    *,
    path: str,
    operation: str,
    username: str,
    signature: str | None,
    expiration: int | None,
    now: float | None = None,
) -> str | None:
    """None when a `/files` request may proceed, else the 401 message envd sends."""
    if token is None:
        return None
    if given_token is not None:
        return (
            None
            if token_matches(token, given_token)
            else ("access token present in header but does not match")
        )
    if signature is None:
        return "missing signature query parameter"
    expected = file_signature(path, operation, username, token, expiration)
    if not hmac.compare_digest(expected.encode(), signature.encode()):
        return "invalid signature"
    if expiration is not None and expiration < (time.time() if now is None else now):
        return "signature is already expired"
    return None


def basic_auth_user(authorization: str | None) -> str | None:
    """The user name of `Authorization: Basic base64("<name>:")`, or None without Basic auth."""
    if not authorization:
        return None
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    return decoded.partition(":")[0]
