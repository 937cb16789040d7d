"""Hub search and trending against the fake hub (tests/fixtures/fake_hub.py) with the real huggingface_hub client:
the library (athanor.hub) in the test process, the CLI in a subprocess as a user runs it."""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import ATHANOR, REPO
from fixtures.fake_hub import (
    VALID_TOKEN,
    FakeHub,
    HubFile,
    HubRepo,
    tiny_gguf,
)

from athanor import hub
from athanor.errors import (
    HubAccessDenied,
    HubRateLimited,
    HubUnreachable,
    InvalidValueError,
    NotFoundError,
)

BASE = "athanor-test/Tiny-Llama"


def athanor(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ATHANOR, *args], capture_output=True, text=True, env=env or dict(os.environ), cwd=REPO,
                          timeout=120, check=False)


def table(stdout: str) -> list[dict[str, str]]:
    lines = [line for line in stdout.splitlines() if line.strip()]
    header = lines[0].split()
    assert header == ["REPO", "FORMAT", "SIZE", "QUANT", "FIT", "DOWNLOADS"]
    rows = []
    for line in lines[1:]:
        if line.startswith("gated "):
            break
        cells = line.split()
        if len(cells) == 7:  # "Q4_K_M +mmproj"
            cells[3:5] = [f"{cells[3]} {cells[4]}"]
        rows.append(dict(zip(header, cells, strict=True)))
    return rows


def cache() -> str:
    """This test's HF cache. huggingface_hub reads HF_HUB_CACHE (and HF_ENDPOINT) once, at import: calls made in
    the test process name them."""
    return os.environ["HF_HUB_CACHE"]


def listings(fake: FakeHub) -> list:
    """The listing requests (not the per-repo ones under /api/models/)."""
    return [r for r in fake.requests if r.path == "/api/models"]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def dropping_endpoint() -> Iterator[tuple[str, list[int]]]:
    """An endpoint that accepts every connection and closes it without a word; the list counts the connections."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[int] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # the listener was closed: done
                return
            accepted.append(1)
            conn.close()

    thread = threading.Thread(target=serve, name="dropping-endpoint", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", accepted
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(10)


# ---------------------------------------------------------------------------------------------- the fixture


def test_fake_hub_serves_the_real_client_and_resumes_a_cut_download(fake_hub, tmp_path):
    from huggingface_hub import hf_hub_download

    content = HubFile(tiny_gguf(15), size=24 * 2**20)
    fake_hub.add(HubRepo("t/Padded-GGUF", {"m-Q4_K_M.gguf": content}))
    fake_hub.cut("t/Padded-GGUF", "m-Q4_K_M.gguf", after=15 * 2**20)
    path = hf_hub_download("t/Padded-GGUF", "m-Q4_K_M.gguf", endpoint=fake_hub.url, cache_dir=cache())

    assert Path(path).read_bytes() == b"".join(content.read(0, content.size or 0))
    gets = fake_hub.requests_to("/t/Padded-GGUF/resolve/main/m-Q4_K_M.gguf", "GET")
    assert [(r.status, r.range, r.cut) for r in gets] == [(200, None, True), (206, f"bytes={10 * 2**20}-", False)]
    assert gets[0].sent == 15 * 2**20 and gets[1].sent == 14 * 2**20


def test_fake_hub_gates_files_like_the_hub(fake_hub):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import GatedRepoError

    repo, name = "athanor-gated/Gated-Llama-GGUF", "Gated-Llama-Q4_K_M.gguf"
    with pytest.raises(GatedRepoError) as anonymous:
        hf_hub_download(repo, name, endpoint=fake_hub.url, cache_dir=cache())
    with pytest.raises(GatedRepoError) as not_granted:
        hf_hub_download(repo, name, endpoint=fake_hub.url, token=VALID_TOKEN, cache_dir=cache())
    assert (anonymous.value.response.status_code, not_granted.value.response.status_code) == (401, 403)
    fake_hub.repos[repo].granted.add(VALID_TOKEN)
    assert Path(hf_hub_download(repo, name, endpoint=fake_hub.url, token=VALID_TOKEN, cache_dir=cache())).read_bytes() == tiny_gguf(15)


# ---------------------------------------------------------------------------------------------- the library


def test_search_by_query_author_and_format(fake_hub):
    assert {r.repo for r in hub.search("tiny-llama", fmt="mlx")} == {"mlx-community/Tiny-Llama-4bit",
                                                                    "someone/Tiny-Llama-mlx-8bit"}
    assert [r.repo for r in hub.search(author="mlx-community")] == ["mlx-community/Tiny-Llama-4bit"]
    gguf = hub.search(fmt="gguf")
    assert {r.format for r in gguf} == {"gguf"} and {r.runtime for r in gguf} == {"llama-server"}
    assert [r.downloads for r in gguf] == sorted((r.downloads for r in gguf), reverse=True)
    assert "athanor-test/Tiny-Llama" not in {r.repo for r in gguf}
    # --any: the plain checkpoint too (mlx-lm loads it), labelled as such.
    plain = next(r for r in hub.search("Tiny-Llama") if r.repo == BASE)
    assert (plain.format, plain.runtime, plain.quant, plain.files) == ("safetensors", "mlx-lm", "F16",
                                                                       ("model.safetensors",))
    listing = listings(fake_hub)[-1]
    assert listing.query["search"] == ["Tiny-Llama"] and "siblings" in listing.query["expand"]


def test_quant_choice_by_preference_then_smallest(fake_hub):
    rows = {r.repo: r for r in hub.search(fmt="gguf", limit=50)}
    mid = rows["athanor-test/Mid-8B-GGUF"]
    assert (mid.quant, mid.files, mid.size_bytes) == ("Q4_K_M", ("Mid-8B-Q4_K_M.gguf",), 5_030_000_000)
    assert mid.quants == ("Q4_K_M", "Q5_K_M", "Q6_K", "Q4_K_S", "Q8_0", "F16")
    iq = rows["athanor-test/IQ-Only-GGUF"]
    assert (iq.quant, iq.size_bytes) == ("IQ2_XXS", 2_300_000_000)

    files = [("a-Q8_0.gguf", 8), ("a-Q5_K_M.gguf", 5), ("a-Q6_K.gguf", 6), ("a-Q2_K.gguf", 2)]
    assert hub.choose_gguf(files).weights.files == ("a-Q5_K_M.gguf",)
    assert hub.choose_gguf([("a-Q2_K.gguf", 2), ("a-Q3_K_M.gguf", 3)]).weights.quant == "Q2_K"


def test_split_shards_are_one_choice_with_their_sizes_summed(fake_hub):
    split = hub.repo_row("athanor-test/Split-GGUF")
    assert split.files == ("Q4_K_M/Split-Q4_K_M-00001-of-00002.gguf", "Q4_K_M/Split-Q4_K_M-00002-of-00002.gguf")
    assert (split.quant, split.size_bytes) == ("Q4_K_M", 17_500_000_000)
    # A split with a shard missing cannot load: the next quant is chosen.
    partial = hub.choose_gguf([("x-Q4_K_M-00001-of-00003.gguf", 10), ("x-Q4_K_M-00002-of-00003.gguf", 10),
                               ("x-Q8_0.gguf", 30)])
    assert partial.weights.files == ("x-Q8_0.gguf",) and len(partial.candidates) == 1


def test_mmproj_is_the_projector_never_the_quant(fake_hub):
    row = hub.repo_row("athanor-test/Tiny-Llama-GGUF")
    assert row.files == ("Tiny-Llama-Q4_K_M.gguf",) and row.quant == "Q4_K_M"
    assert row.projector == "mmproj-Tiny-Llama-F16.gguf" and row.projector_bytes == len(tiny_gguf(1, name="mmproj"))
    assert row.size_bytes == len(tiny_gguf(15))
    only_projectors = hub.choose_gguf([("mmproj-F16.gguf", 5), ("mmproj-Q8_0.gguf", 3)])
    assert only_projectors.weights is None and only_projectors.projector.files == ("mmproj-F16.gguf",)


def test_the_estimate_reads_the_model_shape_without_downloading(fake_hub):
    row = hub.repo_row("athanor-test/Mid-8B-GGUF")
    assert row.meta["qwen3.block_count"] == 36 and row.meta["qwen3.attention.head_count_kv"] == 8
    assert row.context_length == 40960
    head = fake_hub.requests_to("/athanor-test/Mid-8B-GGUF/resolve/", "GET")
    assert [r.range for r in head] == [f"bytes=0-{256 * 1024 - 1}"]
    mlx = hub.repo_row("mlx-community/Tiny-Llama-4bit")
    assert (mlx.format, mlx.quant, mlx.meta["num_hidden_layers"]) == ("mlx", "4bit", 2)
    # Nothing reached the HF cache: search never writes there.
    assert not any(Path(os.environ["HF_HUB_CACHE"]).glob("models--*"))


def test_sort_fit_ranks_by_band_and_the_200gb_repo_is_last_and_risky(fake_hub):
    rows = hub.search(sort="fit")
    order = {band: i for i, band in enumerate(hub.BANDS)}
    assert all(r.fit in order for r in rows)
    assert [order[r.fit] for r in rows] == sorted(order[r.fit] for r in rows)
    for a, b in itertools.pairwise(rows):
        if a.fit == b.fit:
            assert a.downloads >= b.downloads
    assert rows[-1].repo == "athanor-test/Huge-GGUF" and rows[-1].fit == "risky"
    assert rows[-1].estimate_bytes > 200 * 10**9
    assert {r.fit for r in rows if r.repo.startswith(("mlx-community/", "someone/"))} == {"comfortable"}


def test_trending_is_the_hub_trending_order(fake_hub):
    rows = hub.trending(4)
    assert [r.repo for r in rows] == ["athanor-test/Huge-GGUF", "mlx-community/Tiny-Llama-4bit",
                                      "athanor-test/Split-GGUF", "athanor-test/Tiny-Llama-GGUF"]
    assert [r.query["sort"] for r in listings(fake_hub)] == [["trendingScore"]]


def test_mlx_conversions_of_a_base_model_are_found(fake_hub):
    assert [r.repo for r in hub.conversions(BASE)] == ["mlx-community/Tiny-Llama-4bit",
                                                       "someone/Tiny-Llama-mlx-8bit"]
    assert [r.repo for r in hub.conversions(BASE, fmt="gguf")] == ["athanor-test/Tiny-Llama-GGUF"]
    # A repo id as the query finds its conversions too (their ids do not contain the base's).
    assert [r.repo for r in hub.search(BASE, fmt="mlx")] == ["mlx-community/Tiny-Llama-4bit",
                                                             "someone/Tiny-Llama-mlx-8bit"]


def test_rate_limit_is_one_line_without_retrying(fake_hub):
    fake_hub.rate_limit(1, reset=30, prefix="/api/models")
    with pytest.raises(HubRateLimited) as err:
        hub.search("tiny")
    assert str(err.value) == (f"the Hub at {fake_hub.url} is rate-limiting requests (429): try again in 30 s, "
                              "or set HF_TOKEN for a higher limit")
    assert len(fake_hub.requests) == 1


def test_unreachable_endpoint_is_one_line_at_once(fake_hub, monkeypatch):
    url = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("HF_ENDPOINT", url)
    with pytest.raises(HubUnreachable) as err:
        hub.search("tiny")
    assert str(err.value).startswith(f"cannot reach the Hub ({url}): ") and "\n" not in str(err.value)
    # At once: a connection that fails is not tried again (huggingface_hub's own retries would wait 23 s).
    with dropping_endpoint() as (url, accepted):
        monkeypatch.setenv("HF_ENDPOINT", url)
        with pytest.raises(HubUnreachable) as err:
            hub.search("tiny")
        assert len(accepted) == 1
    assert str(err.value).startswith(f"cannot reach the Hub ({url}): ") and "\n" not in str(err.value)


def test_gated_repo_is_listed_and_its_files_refused_in_one_line(fake_hub, monkeypatch):
    from huggingface_hub import hf_hub_download

    repo = "athanor-gated/Gated-Llama-GGUF"
    row = hub.repo_row(repo)
    assert row.gated and row.files == ("Gated-Llama-Q4_K_M.gguf",)
    assert not fake_hub.requests_to(f"/{repo}/resolve/")  # no file read: it would be refused
    with pytest.raises(HubAccessDenied) as anonymous, hub.hub_errors(repo):
        hf_hub_download(repo, row.files[0], endpoint=fake_hub.url, cache_dir=cache())
    assert str(anonymous.value) == (f"{repo} is gated: accept its terms at {fake_hub.url}/{repo}, then set HF_TOKEN "
                                    "to a token of that account")
    monkeypatch.setenv("HF_TOKEN", VALID_TOKEN)
    with pytest.raises(HubAccessDenied) as not_granted, hub.hub_errors(repo):
        hf_hub_download(repo, row.files[0], endpoint=fake_hub.url, cache_dir=cache())
    assert "no access to it (403)" in str(not_granted.value)


def test_bad_arguments_and_unknown_repos(fake_hub):
    with pytest.raises(InvalidValueError):
        hub.search(sort="stars")
    with pytest.raises(InvalidValueError):
        hub.search(limit=0)
    with pytest.raises(NotFoundError, match="no model repo nobody/Nothing"):
        hub.repo_row("nobody/Nothing")


# ---------------------------------------------------------------------------------------------- the CLI


def test_cli_search_sort_fit_table(fake_hub):
    result = athanor("search", "--sort", "fit")
    assert result.returncode == 0, result.stderr
    rows = table(result.stdout)
    assert rows[-1]["REPO"] == "athanor-test/Huge-GGUF" and rows[-1]["FIT"] == "risky"
    assert rows[-1]["SIZE"] == "186.3GiB" and rows[-1]["QUANT"] == "Q4_K_M"
    tiny = next(r for r in rows if r["REPO"] == "athanor-test/Tiny-Llama-GGUF")
    assert (tiny["FORMAT"], tiny["QUANT"], tiny["FIT"], tiny["DOWNLOADS"]) == ("gguf", "Q4_K_M +mmproj",
                                                                              "comfortable", "5K")
    assert "gated (accept the terms on the Hub, then set HF_TOKEN to pull): athanor-gated/Gated-Llama-GGUF" \
        in result.stdout


def test_cli_search_json_and_trending(fake_hub):
    result = athanor("search", "--mlx", "--author", "mlx-community", "-o", "json")
    assert result.returncode == 0, result.stderr
    [row] = json.loads(result.stdout)
    assert (row["repo"], row["format"], row["runtime"], row["quant"], row["files"]) == (
        "mlx-community/Tiny-Llama-4bit", "mlx", "mlx-lm", "4bit", ["model.safetensors"])
    [listing] = listings(fake_hub)
    assert (listing.query["filter"], listing.query["author"]) == (["mlx"], ["mlx-community"])

    result = athanor("trending", "--limit", "2", "-o", "json")
    assert result.returncode == 0, result.stderr
    assert [r["repo"] for r in json.loads(result.stdout)] == ["athanor-test/Huge-GGUF",
                                                              "mlx-community/Tiny-Llama-4bit"]
    assert athanor("search", "nothing-like-this").stderr == "No matching repos found.\n"


def test_cli_errors_are_one_line(fake_hub):
    fake_hub.rate_limit(1, reset=12)
    result = athanor("search", "tiny")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (f"athanor: the Hub at {fake_hub.url} is rate-limiting requests (429): try again in "
                             "12 s, or set HF_TOKEN for a higher limit\n")

    url = f"http://127.0.0.1:{closed_port()}"
    result = athanor("trending", env={**os.environ, "HF_ENDPOINT": url})
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(f"athanor: cannot reach the Hub ({url}): ")

    result = athanor("search", env={**os.environ, "HF_TOKEN": "hf_not_a_token"})
    assert result.returncode == 1
    assert result.stderr == (f"athanor: the Hub at {fake_hub.url} refused the token (401 invalid credentials): "
                             "check HF_TOKEN\n")


def test_cli_sends_hf_token(fake_hub):
    result = athanor("search", "--gguf", "--limit", "1", env={**os.environ, "HF_TOKEN": VALID_TOKEN})
    assert result.returncode == 0, result.stderr
    assert {r.headers.get("Authorization") for r in fake_hub.requests} == {f"Bearer {VALID_TOKEN}"}


def test_hub_commands_start_light():
    code = ("import sys; import athanor.cli.hub_cmds, athanor.hub; "
            "print(sorted({'huggingface_hub', 'psutil', 'aiohttp', 'jsonschema'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
