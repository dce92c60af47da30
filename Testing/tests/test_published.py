"""Published weights fetched from a local HTTP server on the loopback address (and file:// URLs): progress,
resume after an interrupted download, the size limit, checksums (published and first-download), strict
conversion and cache reuse. No test reaches the network."""

from __future__ import annotations

import dataclasses
import http.server
import json
import threading

import pytest
import timm
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_bytes

from CLEARLib.bundle import load_bundle
from CLEARLib.errors import CLEARInputError
from CLEARLib.published import PublishedWeights, cached_bundle, fetch_published, published_entry


class _Server:
    """Serves byte strings by path with HTTP Range support; `cut_first` breaks the first response off after so
    many bytes (a dropped connection); counts requests."""

    def __init__(self, files: dict[str, bytes], cut_first: int | None = None):
        self.files, self.cut_first, self.requests = files, cut_first, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802  (http.server's name)
                server.requests.append((self.path, self.headers.get("Range")))
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if server.cut_first is not None and len(server.requests) == 1:
                    self.wfile.write(body[: server.cut_first])
                    self.wfile.flush()
                    self.connection.shutdown(2)  # the connection drops mid-file
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def femto_weights() -> bytes:
    """timm's mambaout_femto with its ImageNet classifier, as timm publishes it (random weights, same layout)."""
    torch.manual_seed(0)
    model = timm.create_model("mambaout_femto", pretrained=False)
    return safetensors_bytes({k: v.contiguous() for k, v in model.state_dict().items()})


def _entry(url: str, size: int, **changes) -> dict[str, PublishedWeights]:
    entry = dataclasses.replace(published_entry("mambaout_femto.in1k"), url=url, **changes)
    assert entry.max_bytes >= size  # the limit computed from the architecture admits the real file
    return {entry.name: entry}


def test_published_entries_say_source_license_and_converter():
    fmcib = published_entry("fmcib")
    assert fmcib.url == "https://zenodo.org/records/10528450/files/model_weights.torch?download=1"
    assert fmcib.kind == "lesion" and fmcib.converter == "fmcib" and "zenodo" in fmcib.license
    tiny = published_entry("mambaout_tiny.in1k")
    assert tiny.url == "https://huggingface.co/timm/mambaout_tiny.in1k/resolve/main/model.safetensors"
    assert tiny.license == "apache-2.0" and tiny.kind == "case" and tiny.converter == "mambaout"
    assert 100 * 2**20 < tiny.max_bytes < 110 * 2**20  # 26.5 M parameters of float32, plus 1 MiB
    with pytest.raises(CLEARInputError, match="no published weights named 'resnet'"):
        published_entry("resnet")


def test_fetch_resumes_verifies_converts_and_reuses_the_cache(tmp_path, femto_weights):
    with _Server({"/femto.safetensors": femto_weights}, cut_first=len(femto_weights) // 3) as server:
        entries = _entry(server.url("/femto.safetensors"), len(femto_weights))
        seen = []
        with pytest.raises(CLEARInputError, match="broke off.*run the same command again to resume"):
            fetch_published("mambaout_femto.in1k", tmp_path, progress=lambda f, m: seen.append(f), entries=entries)
        part = tmp_path / "downloads" / "mambaout_femto.in1k.part"
        kept = part.stat().st_size
        assert 0 < kept < len(femto_weights)  # kept for the next call
        bundle, record = fetch_published("mambaout_femto.in1k", tmp_path, entries=entries)
        assert server.requests[1][1] == f"bytes={kept}-"  # the second request resumed where the first stopped
        assert seen and 0 < max(seen) < 1
        assert record["verified_by"].startswith("first download") and record["license"] == "apache-2.0"
        manifest = load_bundle(bundle).manifest
        assert manifest.provenance["source_url"] == server.url("/femto.safetensors")
        assert manifest.provenance["source_sha256"] == record["sha256"]
        assert manifest.provenance["dropped_classifier_keys"]  # the ImageNet classifier, dropped by name
        # the converted encoder is timm's model without its classifier: same pooled features
        encoder = load_bundle(bundle).encoder.eval()
        reference = timm.create_model("mambaout_femto", pretrained=False).eval()
        reference.load_state_dict(safetensors_load(femto_weights))
        x = torch.rand(1, 3, 224, 224)
        with torch.no_grad():  # CLEAR's embedding: the pooled, normed features before timm's classifier MLP
            torch.testing.assert_close(encoder(x), reference.head.norm(reference.forward_features(x).mean((1, 2))))
        # A second fetch reads nothing from the network; the bundle is found by the recorded sha256.
        n_requests = len(server.requests)
        again, _ = fetch_published("mambaout_femto.in1k", tmp_path, entries=entries)
        assert again == bundle and len(server.requests) == n_requests
        assert cached_bundle(entries["mambaout_femto.in1k"], tmp_path) == bundle


def test_a_changed_file_the_size_limit_and_a_wrong_checksum_are_refused(tmp_path, femto_weights):
    other = bytearray(femto_weights)
    other[-1] ^= 1  # one bit of the last tensor changed at the source
    with _Server({"/a": femto_weights, "/b": bytes(other)}) as server:
        fetch_published("mambaout_femto.in1k", tmp_path, entries=_entry(server.url("/a"), len(femto_weights)))
        known = json.loads((tmp_path / "first-download-sha256.json").read_text())["mambaout_femto.in1k"]
        (tmp_path / "bundles").rename(tmp_path / "old-bundles")  # as if the cache had been cleared of bundles
        with pytest.raises(CLEARInputError, match="differs from the first download's"):
            fetch_published("mambaout_femto.in1k", tmp_path, entries=_entry(server.url("/b"), len(other)))
        assert not (tmp_path / "downloads" / "mambaout_femto.in1k.part").exists()
        assert json.loads((tmp_path / "first-download-sha256.json").read_text())["mambaout_femto.in1k"] == known
        small = _entry(server.url("/a"), 0, max_bytes=len(femto_weights) // 2)
        with pytest.raises(CLEARInputError, match="more than its limit"):
            fetch_published("mambaout_femto.in1k", tmp_path / "small", entries=small)
        published = _entry(server.url("/a"), len(femto_weights), sha256="0" * 64)
        with pytest.raises(CLEARInputError, match="is not the published 0000"):
            fetch_published("mambaout_femto.in1k", tmp_path / "published", entries=published)
        assert not list((tmp_path / "published" / "downloads").iterdir())


def test_a_file_that_does_not_fit_the_model_is_refused_key_by_key(tmp_path, femto_weights):
    state = safetensors_load(femto_weights)
    state["stages.0.blocks.0.extra.weight"] = torch.zeros(3)
    source = tmp_path / "odd.safetensors"
    source.write_bytes(safetensors_bytes(state))
    entries = _entry(source.resolve().as_uri(), source.stat().st_size)  # file:// URLs work the same way
    with pytest.raises(CLEARInputError, match="extra"):
        fetch_published("mambaout_femto.in1k", tmp_path / "cache", entries=entries)
    assert not (tmp_path / "cache" / "bundles").exists() or not list((tmp_path / "cache" / "bundles").iterdir())


def test_the_command_lines_use_a_fetched_model_by_name(tmp_path, femto_weights, monkeypatch, capsys):
    import pandas as pd

    from clear_training.cli import main as train_main
    from CLEARLib.cli import main as ct_main
    from CLEARLib.io import write_volume
    from CLEARLib.phantom import make_phantom

    monkeypatch.setenv("CLEAR_CACHE", str(tmp_path / "cache"))
    assert ct_main(["fetch", "--list"]) == 0
    listing = capsys.readouterr().out
    assert "fmcib" in listing and "mambaout_tiny.in1k" in listing and "apache-2.0" in listing
    volume, _ = make_phantom((6, 32, 32), (6.0, 6.0, 10.0), seed=1)
    pd.DataFrame({"case_id": ["c0"], "path": [str(write_volume(volume, tmp_path / "c0.nrrd"))]}).to_csv(
        tmp_path / "cohort.csv", index=False
    )
    command = ["extract", "--model", "mambaout_femto.in1k", "--cohort", str(tmp_path / "cohort.csv"),
               "--out", str(tmp_path / "features"), "--device", "cpu"]  # fmt: skip
    assert train_main(command) == 2  # not fetched yet: nothing is downloaded without asking
    assert "run `clear-ct fetch mambaout_femto.in1k` first" in capsys.readouterr().err
    source = tmp_path / "femto.safetensors"
    source.write_bytes(femto_weights)
    fetch_published("mambaout_femto.in1k", entries=_entry(source.resolve().as_uri(), len(femto_weights)))
    assert train_main(command) == 0
    assert (tmp_path / "features" / "c0.h5").exists()
