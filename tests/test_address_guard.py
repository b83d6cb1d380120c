"""The SSRF guard: private, loopback and link-local destinations are refused by default."""

from __future__ import annotations

import socket

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from conftest import make_image
from vlmdata.pipeline.address_guard import is_public_address
from vlmdata.pipeline.download import DownloadConfig, run_download
from vlmdata.pipeline.fetch import FetchPolicy


class StaticResolver(AbstractResolver):
    """Resolves a fixed table of names; any other name fails like an NXDOMAIN answer."""

    def __init__(self, table: dict[str, str]) -> None:
        self.table = table

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host not in self.table:
            raise OSError(socket.EAI_NONAME, f"Name or service not known: {host}")
        return [{"hostname": host, "host": self.table[host], "port": port, "family": socket.AF_INET,
                 "proto": 0, "flags": socket.AI_NUMERICHOST}]  # fmt: skip

    async def close(self) -> None:
        pass


@pytest.mark.parametrize(
    ("address", "public"),
    [("8.8.8.8", True), ("2606:4700::1111", True), ("127.0.0.1", False), ("10.1.2.3", False),
     ("172.16.0.1", False), ("192.168.1.1", False), ("169.254.169.254", False),
     ("100.64.0.1", False),
     ("0.0.0.0", False), ("::1", False), ("fe80::1", False), ("fc00::1", False),
     ("::ffff:127.0.0.1", False), ("224.0.0.1", False)],
)  # fmt: skip
def test_public_addresses(address, public):
    assert is_public_address(address) is public


def run(server, tmp_path, urls, allow: bool) -> dict[str, dict]:
    path = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"image_url": urls, "capsfusion": ["c"] * len(urls)}), path)
    out = tmp_path / ("allowed" if allow else "guarded")
    resolver = StaticResolver({"images.test": "127.0.0.1", "localhost": "127.0.0.1"})
    config = DownloadConfig(
        input=str(path), output_dir=str(out), processes=1, quiet=True,
        fetch=FetchPolicy(allow_private_network=allow, retries=0, timeout=5),
    )  # fmt: skip
    run_download(config, resolver=resolver)
    return {
        r["url"]: r for p in sorted(out.glob("*.parquet")) for r in pq.read_table(p).to_pylist()
    }


def test_private_destinations_refused_without_the_flag(server, tmp_path):
    server.add_file("a.jpg", make_image(32, 32))
    port = server.port
    urls = [
        f"http://127.0.0.1:{port}/img/a.jpg",
        f"http://localhost:{port}/img/a.jpg",
        f"http://images.test:{port}/img/a.jpg",  # a name that resolves to loopback
        f"http://[::1]:{port}/img/a.jpg",
        "http://169.254.169.254/latest/meta-data/",  # cloud metadata: never even connected to
        f"http://nowhere.test:{port}/img/a.jpg",
    ]
    rows = run(server, tmp_path, urls, allow=False)
    for url in urls[:5]:
        assert (rows[url]["status"], rows[url]["error_kind"]) == (
            "failed_to_download",
            "private_address",
        )
    assert rows[urls[5]]["error_kind"] == "dns"
    assert server.total_hits() == 0


def test_allow_private_network_lets_them_through(server, tmp_path):
    server.add_file("a.jpg", make_image(32, 32))
    urls = [
        f"http://images.test:{server.port}/img/a.jpg",
        f"http://127.0.0.1:{server.port}/img/a.jpg",
    ]
    rows = run(server, tmp_path, urls, allow=True)
    assert all(r["status"] == "success" for r in rows.values())
