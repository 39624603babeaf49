"""Planetary Computer href signing, against a token service on 127.0.0.1 answering in
the documented shape (the real one is remote), with the real 35MNM item hrefs."""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from pipelines.stages.stac.signing import PlanetaryComputerSigner, SigningError, needs_signing
from tests.conftest import load_json


class TokenService:
    def __init__(self) -> None:
        self.paths: list[str] = []
        self.keys: list[str | None] = []
        self.expiry = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
        self.status = 200
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                service.paths.append(self.path)
                service.keys.append(self.headers.get("Ocp-Apim-Subscription-Key"))
                body = json.dumps(
                    {
                        "msft:expiry": service.expiry.strftime("%Y-%m-%dT%H:%M:%SZ"),
                        "token": f"st=2026-11-22&se=x&sp=rl&sr=c&sig=tok{len(service.paths)}",
                    }
                ).encode()
                self.send_response(service.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/api/sas/v1/token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def tokens() -> Iterator[TokenService]:
    svc = TokenService()
    yield svc
    svc.server.shutdown()


# A real Planetary Computer Sentinel-2 L2A href (from the 35MNM item collection).
PC_HREF = (
    "https://sentinel2l2a01.blob.core.windows.net/sentinel2-l2/35/M/NM/2020/07/31/"
    "S2A_MSIL2A_20200731T080611_N0212_R078_T35MNM_20200818T062751.SAFE/GRANULE/"
    "L2A_T35MNM_A026673_20200731T081835/IMG_DATA/R10m/T35MNM_20200731T080611_B04_10m.tif"
)


def _pc_hrefs() -> list[str]:
    return [PC_HREF.replace("B04", b) for b in ("B02", "B03", "B04", "B08")] * 30


def test_one_token_per_container_reused_until_near_expiry(tokens: TokenService) -> None:
    hrefs = _pc_hrefs()
    assert all(needs_signing(h) for h in hrefs)
    signer = PlanetaryComputerSigner(token_url=tokens.url, subscription_key="k123")
    signed = [signer.sign(h) for h in hrefs]
    # The real items' account and container, as the collection lists them.
    assert tokens.paths == ["/api/sas/v1/token/sentinel2l2a01/sentinel2-l2"]
    assert tokens.keys == ["k123"]
    assert all(s == f"{h}?st=2026-11-22&se=x&sp=rl&sr=c&sig=tok1" for s, h in zip(signed, hrefs, strict=True))  # fmt: skip
    assert not needs_signing(signed[0]), "a signed href is left alone"
    assert signer.sign(signed[0]) == signed[0]
    assert signer.sign("file:///x/B04.tif") == "file:///x/B04.tif"
    assert signer.sign("https://sentinel-cogs.s3.us-west-2.amazonaws.com/a/B04.tif").endswith("B04.tif")  # fmt: skip

    # A token within five minutes of expiry is renewed.
    tokens.expiry = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=2)
    fresh = PlanetaryComputerSigner(token_url=tokens.url)
    fresh.sign(hrefs[0])
    fresh.sign(hrefs[1])
    assert fresh.requests_made == 2


def test_token_service_failure_names_the_href_and_url(tokens: TokenService) -> None:
    tokens.status = 503
    signer = PlanetaryComputerSigner(token_url=tokens.url)
    href = _pc_hrefs()[0]
    with pytest.raises(SigningError, match=r"cannot sign https://sentinel2l2a01\.blob") as e:
        signer.sign(href)
    assert tokens.url in str(e.value) and "503" in str(e.value)


def test_composite_signs_planetary_computer_hrefs_before_reading(
    tokens: TokenService,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The stored scenes keep unsigned hrefs; the composite signs them, then reads.

    Offline the blob cannot be reached, so every scene is skipped: the reasons show
    the hrefs as signed (token redacted), so the token was applied before the first read.
    """
    import dataclasses

    from pipelines.infra.layout import scenes_path
    from pipelines.regions import Period
    from pipelines.stages.composite import composite_for_region
    from pipelines.stages.stac.geoparquet import write_geoparquet
    from pipelines.stages.stac.normalize import normalize_items
    from tests.conftest import small_region

    ic = load_json("stac/planetary-computer/itemcollection_35MNM_2020-06-01_to_07-31_13items.geojson")  # fmt: skip
    scenes = normalize_items(ic["features"][:2]).scenes
    region = dataclasses.replace(
        small_region(), id="pc-test", source="planetary-computer",
        bbox=(27.0, -4.52, 27.01, -4.51),
        geometry={"type": "Polygon", "coordinates": [[[27.0, -4.52], [27.01, -4.52],
                  [27.01, -4.51], [27.0, -4.51], [27.0, -4.52]]]},
        periods=(Period("2020", dt.date(2020, 1, 1), dt.date(2020, 12, 31)),),
    )  # fmt: skip
    write_geoparquet([s.to_item() for s in scenes], scenes_path(tmp_path, region.id, "2020"))
    monkeypatch.setenv("ASMWATCH_PC_TOKEN_URL", tokens.url)
    monkeypatch.setenv("GDAL_HTTP_TIMEOUT", "2")
    secret = "pc-subscription-key-6f1e"  # a credential: only from the environment
    monkeypatch.setenv("PC_SDK_SUBSCRIPTION_KEY", secret)
    messages: list[str] = []
    with caplog.at_level(logging.DEBUG):
        res = composite_for_region(region, region.periods[0], tmp_path, chunk=128, progress=messages.append)  # fmt: skip
    assert tokens.keys == [secret]  # sent to the token service, as a header
    # ... and never written anywhere else: logs, messages, skip reasons, the COG's tags.
    written = "\n".join([*messages, caplog.text, *(s.reason for s in res.skipped)])
    assert secret not in written and "sig=" not in written
    import rasterio

    with rasterio.open(res.path) as src:
        assert secret not in str(src.tags()) and "sig=" not in str(src.tags())
    assert tokens.paths == ["/api/sas/v1/token/sentinel2l2a01/sentinel2-l2"]
    assert any("signing Azure Blob hrefs" in m for m in messages)
    assert len(res.skipped) == 2 and res.empty
    # Tokens never reach logs or metadata: the reason shows the href as signed.
    assert all(".tif?<signed>" in s.reason and "sig=" not in s.reason for s in res.skipped)
    assert not any("sig=" in m for m in messages)

    tokens.status = 500
    with pytest.raises(SigningError):
        composite_for_region(region, region.periods[0], tmp_path, chunk=128)


def test_gdal_messages_that_rasterio_logs_lose_their_tokens(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """GDAL names the file it failed on, signed href included, and rasterio logs that:
    the query string is redacted before any handler sees the record."""
    import pipelines.stages.composite as composite

    href = "https://acct.blob.core.windows.net/c/T35MNM_SCL_20m.tif?st=2026&sp=rl&sig=tok1"
    with caplog.at_level(logging.DEBUG):
        for name in composite.GDAL_LOGGERS:
            logging.getLogger(name).warning("CPLE_AppDefined in HTTP response code on %s: 0", href)
    assert "sig=" not in caplog.text and "tok1" not in caplog.text
    assert caplog.text.count("T35MNM_SCL_20m.tif?<signed>") == len(composite.GDAL_LOGGERS)
