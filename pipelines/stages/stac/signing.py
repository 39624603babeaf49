"""Signing Planetary Computer asset hrefs just before pixels are read.

Planetary Computer serves Sentinel-2 COGs from Azure Blob Storage
(``https://sentinel2l2a01.blob.core.windows.net/sentinel2-l2/...``, the account and
container its collection lists as ``msft:storage_account`` and ``msft:container``). A
read needs a short-lived SAS token appended as the query string. The token comes from
``GET {token_url}/{account}/{container}``, which answers
``{"msft:expiry": "<ISO time>", "token": "st=...&se=...&sig=..."}``.

The scenes table keeps hrefs unsigned (tokens expire); the composite stage signs them
with one ``PlanetaryComputerSigner`` per run, which asks once per container and reuses
the token until five minutes before it expires. ``$PC_SDK_SUBSCRIPTION_KEY`` (the name
the planetary-computer SDK uses) is sent when set, for higher rate limits.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import requests

DEFAULT_TOKEN_URL = "https://planetarycomputer.microsoft.com/api/sas/v1/token"
BLOB_SUFFIX = ".blob.core.windows.net"
RENEW_BEFORE = dt.timedelta(minutes=5)


class SigningError(RuntimeError):
    """A token could not be had; the message names the href and the token URL."""


def needs_signing(href: str) -> bool:
    """An Azure Blob href without a query string (so no SAS token yet)."""
    parts = urlsplit(href)
    return parts.scheme == "https" and parts.netloc.endswith(BLOB_SUFFIX) and not parts.query


class PlanetaryComputerSigner:
    """Appends SAS tokens to Planetary Computer blob hrefs, one token per container."""

    def __init__(
        self,
        token_url: str | None = None,
        subscription_key: str | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        self.token_url = (
            token_url or os.environ.get("ASMWATCH_PC_TOKEN_URL") or DEFAULT_TOKEN_URL
        ).rstrip("/")
        self.subscription_key = subscription_key or os.environ.get("PC_SDK_SUBSCRIPTION_KEY")
        self.timeout_s = timeout_s
        self.requests_made = 0
        self._tokens: dict[tuple[str, str], tuple[dt.datetime, str]] = {}
        self._lock = threading.Lock()

    def __call__(self, href: str) -> str:
        return self.sign(href)

    def sign(self, href: str) -> str:
        """``href`` with a valid token appended; other hrefs come back unchanged."""
        if not needs_signing(href):
            return href
        parts = urlsplit(href)
        account = parts.netloc.removesuffix(BLOB_SUFFIX)
        container = parts.path.lstrip("/").split("/", 1)[0]
        if not container:
            raise SigningError(f"cannot sign {href}: no container in the path")
        return f"{href}?{self._token(account, container, href)}"

    def _token(self, account: str, container: str, href: str) -> str:
        now = dt.datetime.now(dt.UTC)
        with self._lock:
            hit = self._tokens.get((account, container))
            if hit is not None and hit[0] - RENEW_BEFORE > now:
                return hit[1]
            url = f"{self.token_url}/{account}/{container}"
            headers = {}
            if self.subscription_key:
                headers["Ocp-Apim-Subscription-Key"] = self.subscription_key
            try:
                self.requests_made += 1
                resp = requests.get(url, headers=headers, timeout=self.timeout_s)
                resp.raise_for_status()
                body = resp.json()
                token = str(body["token"])
                expiry = dt.datetime.fromisoformat(str(body["msft:expiry"]).replace("Z", "+00:00"))
            except (requests.RequestException, ValueError, KeyError, TypeError) as e:
                raise SigningError(
                    f"cannot sign {href}: the token service {url} answered {type(e).__name__}: {e}"
                ) from e
            if expiry.tzinfo is None:
                expiry = expiry.replace(tzinfo=dt.UTC)
            self._tokens[(account, container)] = (expiry, token)
            return token


def signer_for(
    items: Sequence[Mapping[str, Any]], subscription_key: str | None = None
) -> PlanetaryComputerSigner | None:
    """A Planetary Computer signer when any of the items' hrefs needs one, else None."""
    if any(needs_signing(a["href"]) for i in items for a in i["assets"].values()):
        return PlanetaryComputerSigner(subscription_key=subscription_key or None)
    return None


def signed_item(item: Mapping[str, Any], sign: Callable[[str], str]) -> dict[str, Any]:
    """The item with every asset href passed through ``sign`` (Planetary Computer SAS)."""
    assets = {k: {**a, "href": sign(a["href"])} for k, a in item["assets"].items()}
    return {**item, "assets": assets}
