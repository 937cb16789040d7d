"""athanor pull against the fake hub (tests/fixtures/fake_hub.py): the real CLI in a subprocess, the real
huggingface_hub client, the real HF cache layout, registration by the real discovery, and a real gateway serving
what was pulled. What the client sent is read from the hub's request log."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import ATHANOR, REPO
from fixtures.fake_hub import (
    VALID_TOKEN,
    FakeHub,
    HeldFile,
    HubFile,
    HubRepo,
    gguf_header,
    tiny_gguf,
)
from fixtures.serving import chat

MiB = 2**20
TINY = "athanor-test/Tiny-Llama-GGUF"
HUGE = "athanor-test/Huge-GGUF"
TIMEOUT = 120


# ---------------------------------------------------------------------------------------------- helpers


def argv(*args: str) -> list[str]:
    return [ATHANOR, *args]


def athanor(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv(*args), capture_output=True, text=True, env=env or dict(os.environ), cwd=REPO,
                          timeout=TIMEOUT, check=False)


def models() -> dict[str, dict]:
    """What `athanor get models -o json` lists, by name."""
    result = subprocess.run([ATHANOR, "get", "models", "-o", "json"], capture_output=True, text=True,
                            env=dict(os.environ), timeout=TIMEOUT, check=True)
    return {item["metadata"]["name"]: item for item in json.loads(result.stdout)["items"]}


def cache() -> Path:
    return Path(os.environ["HF_HUB_CACHE"])


def snapshot(repo: str, root: Path | None = None) -> Path:
    """The one snapshot of `repo` in the cache."""
    snapshots = list(((root or cache()) / f"models--{repo.replace('/', '--')}" / "snapshots").iterdir())
    assert len(snapshots) == 1, snapshots
    return snapshots[0]


def content(f: HubFile) -> bytes:
    return b"".join(f.read(0, f.size or 0))


def gets(hub: FakeHub, repo: str) -> list[str]:
    """The files of `repo` downloaded (GET without a Range, or a resumed one), in order."""
    prefix = f"/{repo}/resolve/"
    return [r.path.split("/", 5)[-1] for r in hub.requests_to(prefix, "GET")
            if r.range is None or not r.range.startswith("bytes=0-")]


def resolves(hub: FakeHub, repo: str) -> list:
    return hub.requests_to(f"/{repo}/resolve/")


def incomplete(root: Path | None = None) -> list[Path]:
    return list((root or cache()).rglob("*.incomplete"))


def usable_memory() -> int:
    from athanor.fit import headroom, machine_memory

    memory = machine_memory()
    return memory.total - headroom(memory.total)


def interrupted_pull(held: HeldFile, *args: str) -> subprocess.CompletedProcess[str]:
    """`athanor pull ARGS`, sent SIGINT once the hub holds `held`'s download; never left running."""
    proc = subprocess.Popen(argv("pull", *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ), cwd=REPO)
    try:
        if not held.started.wait(TIMEOUT):
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"the download never started: {err}")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=TIMEOUT)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    finally:
        held.release.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)


# ---------------------------------------------------------------------------------------------- what is fetched


def test_pull_fetches_the_preferred_quant_and_projector_with_progress_lines_and_registers_it(fake_hub, home):
    result = athanor("pull", TINY)

    assert result.returncode == 0, result.stderr
    assert result.stdout == "model/tiny-llama-q4-k-m pulled (886.1KiB)\n"
    # Not a terminal: plain lines, a line per file and at each tenth, the last at 100%; no bar.
    lines = result.stderr.splitlines()
    assert lines[0] == (f"pulling {TINY} (main, commit {fake_hub.repos[TINY].sha[:12]}): GGUF Q4_K_M, 2 files, "
                        "886.1KiB; 886.1KiB to download")
    assert "comfortable here" in lines[1]
    assert lines[2:] == ["mmproj-Tiny-Llama-F16.gguf (443.1KiB)", " 50% 443.1KiB of 886.1KiB",
                         "Tiny-Llama-Q4_K_M.gguf (443.1KiB)", "100% 886.1KiB of 886.1KiB"]
    assert "\r" not in result.stderr

    # Only the chosen files, the projector first and the file discovery keys the model on last.
    assert gets(fake_hub, TINY) == ["mmproj-Tiny-Llama-F16.gguf", "Tiny-Llama-Q4_K_M.gguf"]
    files = fake_hub.repos[TINY].files
    snap = snapshot(TINY)
    assert sorted(p.name for p in snap.iterdir()) == ["Tiny-Llama-Q4_K_M.gguf", "mmproj-Tiny-Llama-F16.gguf"]
    for name in ("Tiny-Llama-Q4_K_M.gguf", "mmproj-Tiny-Llama-F16.gguf"):
        assert (snap / name).read_bytes() == content(files[name])

    listed = models()
    assert list(listed) == ["tiny-llama-q4-k-m"]
    spec = listed["tiny-llama-q4-k-m"]["spec"]
    assert spec["runtime"] == "llama-server"
    assert spec["source"] == {"hf": {"repo": TINY, "file": "Tiny-Llama-Q4_K_M.gguf"}}
    described = subprocess.run([ATHANOR, "describe", "model", "tiny-llama-q4-k-m"], capture_output=True, text=True,
                               env=dict(os.environ), timeout=TIMEOUT, check=True).stdout
    assert "--mmproj" in described  # the projector was found beside the weights

    # Pulled again: nothing is downloaded, the same model is named.
    fake_hub.clear_log()
    again = athanor("pull", TINY, "-o", "json")
    assert again.returncode == 0, again.stderr
    assert gets(fake_hub, TINY) == []
    report = json.loads(again.stdout)
    assert report["downloadBytes"] == 0 and [m["name"] for m in report["models"]] == ["tiny-llama-q4-k-m"]
    assert report["models"][0]["action"] is None  # registered already
    assert "everything is in the cache already" in again.stderr.splitlines()[0]
    assert list(models()) == ["tiny-llama-q4-k-m"]


def test_pulling_a_deleted_model_again_registers_it_again(fake_hub, home):
    assert athanor("pull", TINY, "--file", "Tiny-Llama-Q8_0.gguf").returncode == 0
    subprocess.run([ATHANOR, "delete", "model", "tiny-llama-q8-0"], check=True, capture_output=True,
                   env=dict(os.environ))
    subprocess.run([ATHANOR, "scan"], check=True, capture_output=True, env=dict(os.environ))
    assert models() == {}  # a deleted discovered model stays deleted for scans

    fake_hub.clear_log()
    result = athanor("pull", TINY, "--file", "Tiny-Llama-Q8_0.gguf")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "model/tiny-llama-q8-0 pulled (443.1KiB)\n"  # pulling it asks for it again
    assert gets(fake_hub, TINY) == [] and list(models()) == ["tiny-llama-q8-0"]


def test_pull_an_mlx_repo_fetches_weights_config_and_tokenizer(fake_hub, home):
    repo = "mlx-community/Tiny-Llama-4bit"
    result = athanor("pull", repo, "-o", "json")

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [(m["name"], m["runtime"], m["action"]) for m in report["models"]] == [
        ("tiny-llama-4bit", "mlx-lm", "discovered")]
    fetched = gets(fake_hub, repo)
    assert set(fetched) == {"config.json", "model.safetensors", "special_tokens_map.json", "tokenizer.json",
                            "tokenizer_config.json"}  # not README.md
    assert fetched[-1] == "config.json"  # what makes the directory an MLX model comes last
    assert models()["tiny-llama-4bit"]["spec"] == {**models()["tiny-llama-4bit"]["spec"], "runtime": "mlx-lm",
                                                    "source": {"hf": {"repo": repo}}}


def test_split_gguf_fetches_every_shard_and_file_picks_explicitly(fake_hub, home):
    repo = "t/Split-Small-GGUF"
    shape = {"architecture": "llama", "name": "split-small", "layers": 2, "heads": 2, "kv_heads": 2,
             "embedding": 64, "context_length": 512}
    fake_hub.add(HubRepo(repo, {
        "Q4_K_M/Split-Small-Q4_K_M-00001-of-00002.gguf": HubFile(gguf_header(split=(1, 2), **shape)),
        "Q4_K_M/Split-Small-Q4_K_M-00002-of-00002.gguf": HubFile(gguf_header(split=(2, 2), **shape)),
        "Split-Small-Q8_0.gguf": HubFile(gguf_header(**{**shape, "file_type": 7})),
        "mmproj-Split-Small-F16.gguf": HubFile(tiny_gguf(1, name="mmproj")),
    }, library_name="gguf"))

    result = athanor("pull", repo)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("model/split-small-q4-k-m pulled (")
    # Every shard and the projector; the first shard (what discovery registers) last.
    assert gets(fake_hub, repo) == ["Q4_K_M/Split-Small-Q4_K_M-00002-of-00002.gguf", "mmproj-Split-Small-F16.gguf",
                                    "Q4_K_M/Split-Small-Q4_K_M-00001-of-00002.gguf"]

    # --file: the named quant only, no projector; a later shard brings the first.
    fake_hub.clear_log()
    shutil.rmtree(cache())
    result = athanor("pull", repo, "--file", "Q4_K_M/Split-Small-Q4_K_M-00002-of-00002.gguf")
    assert result.returncode == 0, result.stderr
    assert gets(fake_hub, repo) == ["Q4_K_M/Split-Small-Q4_K_M-00002-of-00002.gguf",
                                    "Q4_K_M/Split-Small-Q4_K_M-00001-of-00002.gguf"]
    fake_hub.clear_log()
    result = athanor("pull", repo, "--file", "Split-Small-Q8_0.gguf")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("model/split-small-q8-0 pulled (")
    assert gets(fake_hub, repo) == ["Split-Small-Q8_0.gguf"]

    result = athanor("pull", repo, "--file", "Split-Small-Q6_K.gguf")
    assert result.returncode == 1
    assert result.stderr == (f"athanor: {repo} has no file 'Split-Small-Q6_K.gguf' (its weights: "
                             "Q4_K_M/Split-Small-Q4_K_M-00001-of-00002.gguf, Q4_K_M/Split-Small-Q4_K_M-00002-of-00002"
                             ".gguf, Split-Small-Q8_0.gguf, mmproj-Split-Small-F16.gguf)\n")


def test_pull_uses_the_gateways_hf_cache_dir(fake_hub, home, tmp_path):
    other = tmp_path / "elsewhere" / "hub"
    gateway = tmp_path / "gateway.yaml"
    gateway.write_text("apiVersion: athanor.dev/v1alpha1\nkind: Gateway\nmetadata: {name: default}\nspec:\n"
                       f"  discovery: {{hfCacheDir: {json.dumps(str(other))}}}\n")
    subprocess.run([ATHANOR, "apply", "-f", str(gateway)], check=True, capture_output=True, env=dict(os.environ))

    result = athanor("pull", TINY, "--file", "Tiny-Llama-Q8_0.gguf")
    assert result.returncode == 0, result.stderr
    assert (snapshot(TINY, other) / "Tiny-Llama-Q8_0.gguf").is_file()
    assert not cache().exists()
    assert list(models()) == ["tiny-llama-q8-0"]

    gateway.write_text(gateway.read_text().replace("{hfCacheDir", "{hfCache: false, hfCacheDir"))
    subprocess.run([ATHANOR, "apply", "-f", str(gateway)], check=True, capture_output=True, env=dict(os.environ))
    fake_hub.clear_log()
    result = athanor("pull", "mlx-community/Tiny-Llama-4bit")
    assert result.returncode == 1
    assert result.stderr.startswith("athanor: the Gateway's spec.discovery.hfCache is false")
    assert fake_hub.requests == []


# ---------------------------------------------------------------------------------------------- resume, Ctrl-C


def test_a_cut_download_resumes_with_a_range_request(fake_hub, home):
    repo, name = "t/Cut-GGUF", "Cut-Q4_K_M.gguf"
    padded = HubFile(tiny_gguf(15), size=24 * MiB)  # a real GGUF followed by zeros
    fake_hub.add(HubRepo(repo, {name: padded}, library_name="gguf"))
    # The first GET of the file is the fit check reading its head (256 KiB, all of it sent before that cut);
    # the second cut is the download's.
    fake_hub.cut(repo, name, after=15 * MiB)
    fake_hub.cut(repo, name, after=15 * MiB)

    result = athanor("pull", repo)

    assert result.returncode == 0, result.stderr
    assert result.stdout == "model/cut-q4-k-m pulled (24.0MiB)\n"
    head, *downloads = fake_hub.requests_to(f"/{repo}/resolve/", "GET")
    assert (head.range, head.sent) == ("bytes=0-262143", 256 * 1024)
    # The first request was cut after 15 MiB; the second asked for the rest from the last whole 10 MiB chunk
    # huggingface_hub wrote, and got a 206: it did not start over.
    assert [(r.status, r.range, r.cut) for r in downloads] == [(200, None, True), (206, f"bytes={10 * MiB}-", False)]
    assert downloads[1].sent == 14 * MiB
    # huggingface_hub's own log lines become one note among the progress lines.
    assert result.stderr.splitlines()[2:] == [
        "Cut-Q4_K_M.gguf (24.0MiB)", " 41% 10.0MiB of 24.0MiB", "the connection dropped; resuming after 10.0MiB",
        " 83% 20.0MiB of 24.0MiB", "100% 24.0MiB of 24.0MiB"]
    pulled = snapshot(repo) / name
    assert hashlib.sha256(pulled.read_bytes()).digest() == hashlib.sha256(content(padded)).digest()
    assert incomplete() == []
    assert list(models()) == ["cut-q4-k-m"]


def test_sigint_during_the_download_registers_nothing(fake_hub, home):
    repo = "t/Held-GGUF"
    held = HeldFile(tiny_gguf(15), size=24 * MiB, finish=False, hold_s=TIMEOUT)
    fake_hub.add(HubRepo(repo, {"mmproj-Held-F16.gguf": HubFile(tiny_gguf(1, name="mmproj")),
                                "Held-Q4_K_M.gguf": held}, library_name="gguf"))

    result = interrupted_pull(held, repo)

    assert result.returncode == 130, result.stderr
    assert result.stdout == ""
    assert result.stderr.splitlines()[-1] == (
        f"athanor: pull of {repo} interrupted: nothing was registered; 1 of 2 files are complete in the cache, "
        f"and 'athanor pull {repo}' fetches the rest")
    assert models() == {}
    # The projector finished before the weights began; the weights' partial file is gone; discovery finds nothing.
    assert [p.name for p in snapshot(repo).iterdir()] == ["mmproj-Held-F16.gguf"]
    assert incomplete() == []
    scan = subprocess.run([ATHANOR, "scan"], capture_output=True, text=True, env=dict(os.environ), timeout=TIMEOUT,
                          check=False)
    assert scan.returncode == 0 and models() == {}

    # Pulled again, it completes: the projector is not fetched a second time.
    fake_hub.clear_log()
    result = athanor("pull", repo)
    assert result.returncode == 0, result.stderr
    assert gets(fake_hub, repo) == ["Held-Q4_K_M.gguf"]
    assert list(models()) == ["held-q4-k-m"]


# ---------------------------------------------------------------------------------------------- fit


def test_a_repo_that_cannot_fit_is_refused_before_any_download(fake_hub, home):
    if usable_memory() >= 200 * 10**9:
        pytest.skip("this machine could hold the 200 GB model")
    result = athanor("pull", HUGE)

    assert result.returncode == 1
    assert result.stdout == ""
    summary, refusal = result.stderr.splitlines()
    assert summary.startswith(f"pulling {HUGE} (main, commit ")
    assert refusal.startswith(f"athanor: {HUGE} Q4_K_M (Huge-Q4_K_M.gguf) cannot fit this machine: its weights "
                              "alone are 186.3GiB, but this machine can give a model ")
    assert " total, " in refusal and "kept for the system); nothing was downloaded" in refusal
    assert refusal.endswith("('athanor pull --force' pulls it anyway)")
    assert resolves(fake_hub, HUGE) == []  # not a byte: not even the head of the file for its shape
    assert models() == {}


def test_force_skips_the_fit_refusal(fake_hub, home, tmp_path):
    # The 200 GB repo: with --force the fit refusal is a warning and the pull goes on to its next check (the disk
    # here, or huggingface_hub's limit for plain HTTP); nothing is downloaded either way.
    if usable_memory() >= 200 * 10**9:
        pytest.skip("this machine could hold the 200 GB model")
    result = athanor("pull", HUGE, "--force")
    assert result.returncode == 1
    warning, error = result.stderr.splitlines()[1:]
    assert warning.startswith(f"warning: {HUGE} Q4_K_M (Huge-Q4_K_M.gguf) cannot fit this machine: ")
    assert warning.endswith("; pulling it anyway (--force)")
    assert "cannot fit" not in error and error.startswith("athanor: ")
    assert [r for r in resolves(fake_hub, HUGE) if r.method == "GET"] == []

    # A model just over this machine's memory (its bytes are zeros made on demand): refused, then with --force
    # its download starts, and is stopped early with Ctrl-C.
    size = usable_memory() + 2**30
    free = shutil.disk_usage(tmp_path).free
    if size >= min(free, 50 * 10**9):
        pytest.skip("not enough disk space here to start a download larger than this machine's memory")
    repo = "t/Too-Big-GGUF"
    held = HeldFile(tiny_gguf(15), size=size, finish=False, hold_s=TIMEOUT)
    fake_hub.add(HubRepo(repo, {"Too-Big-Q4_K_M.gguf": held}, library_name="gguf"))
    refused = athanor("pull", repo)
    assert refused.returncode == 1 and "cannot fit this machine" in refused.stderr
    assert resolves(fake_hub, repo) == []

    forced = interrupted_pull(held, repo, "--force")
    assert forced.returncode == 130
    assert "; pulling it anyway (--force)" in forced.stderr
    first = fake_hub.requests_to(f"/{repo}/resolve/main/", "GET")
    assert len(first) == 1 and first[0].range is None and first[0].sent == MiB
    assert models() == {} and incomplete() == []


# ---------------------------------------------------------------------------------------------- the Hub


def test_hf_token_is_sent_as_the_authorization_header(fake_hub, home):
    repo = "athanor-gated/Gated-Llama-GGUF"
    anonymous = athanor("pull", repo)
    assert anonymous.returncode == 1
    assert anonymous.stderr.splitlines()[-1].startswith(f"athanor: {repo} is gated: accept its terms at ")
    assert models() == {}

    fake_hub.repos[repo].granted.add(VALID_TOKEN)
    fake_hub.clear_log()
    result = athanor("pull", repo, env={**os.environ, "HF_TOKEN": VALID_TOKEN})
    assert result.returncode == 0, result.stderr
    assert result.stdout == "model/gated-llama-q4-k-m pulled (443.1KiB)\n"
    sent = [r for r in fake_hub.requests if repo in r.path]
    assert {r.method for r in sent} == {"GET", "HEAD"}
    assert {r.headers.get("Authorization") for r in sent} == {f"Bearer {VALID_TOKEN}"}


def test_hub_errors_are_one_line(fake_hub, home):
    result = athanor("pull", "nobody/nothing")
    assert result.returncode == 1
    assert result.stderr == f"athanor: no model repo nobody/nothing on the Hub ({fake_hub.url}) (a private repo needs HF_TOKEN)\n"

    fake_hub.rate_limit(1, reset=30, prefix=f"/api/models/{TINY}")
    result = athanor("pull", TINY)
    assert result.returncode == 1
    assert result.stderr == (f"athanor: the Hub at {fake_hub.url} is rate-limiting requests (429): try again in 30 "
                             "s, or set HF_TOKEN for a higher limit\n")

    result = athanor("pull", TINY, "--revision", "no-such-branch")
    assert result.returncode == 1
    assert result.stderr == f"athanor: {TINY}: no such revision on the Hub ({fake_hub.url})\n"

    result = athanor("pull", "athanor-test/Tiny-Llama")  # a transformers checkpoint: nothing to register
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1
    assert "has no GGUF or MLX weights" in result.stderr and "athanor search athanor-test/Tiny-Llama" in result.stderr

    result = athanor("pull", "not-a-repo")
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1
    assert models() == {}


# ---------------------------------------------------------------------------------------------- serving


def test_a_pulled_gguf_is_served_through_the_gateway_at_once(fake_hub, gateway):
    repo = "t/Serve-Tiny-GGUF"
    fake_hub.add(HubRepo(repo, {"Serve-Tiny-Q8_0.gguf": HubFile(tiny_gguf(7)),
                                "Serve-Tiny-Q4_K_M.gguf": HubFile(tiny_gguf(15))}, library_name="gguf"))

    result = athanor("pull", repo)

    assert result.returncode == 0, result.stderr
    assert result.stdout == "model/serve-tiny-q4-k-m pulled (443.1KiB)\n"
    served = {m.id for m in gateway.client.models.list()}
    assert "serve-tiny-q4-k-m" in served
    answer = chat(gateway.client, "serve-tiny-q4-k-m", max_tokens=4)
    choice = answer.choices[0]
    assert answer.model == "serve-tiny-q4-k-m" and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.finish_reason in ("length", "stop")
    assert 0 < answer.usage.completion_tokens <= 4  # the pulled weights generated it
    assert gateway.phase("serve-tiny-q4-k-m") == "Ready"
