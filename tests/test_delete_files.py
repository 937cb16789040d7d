"""delete --files: a model's weights leave the disk only when asked, exactly those, and never another model's.

Through the real `athanor` entry point against a real Hugging Face cache layout and real loose GGUF files; the
confirmation is answered on a real pseudo-terminal.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import ATHANOR, REPO, write
from fixtures.tiny_models import (
    add_gguf_repo,
    add_mlx_repo,
    make_hf_cache,
    write_tiny_llama_gguf,
    write_tiny_mlx_llama,
)
from huggingface_hub import scan_cache_dir
from test_apply_cli import PATH_MODEL, models_json

from athanor import actions, registry, weights

REPO_ID = "test-org/tiny-GGUF"


def on_disk(*roots: Path) -> set[Path]:
    """Every file, link and directory under the roots."""
    found: set[Path] = set()
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            found.update(Path(dirpath) / name for name in dirnames + filenames)
    return found


def repo_dir(hub: Path, repo_id: str = REPO_ID) -> Path:
    return hub / ("models--" + repo_id.replace("/", "--"))


def ignored(home: Path) -> list[str]:
    return json.loads((home / "models.json").read_text())["ignoredSources"]


@pytest.fixture
def world(cli, hf_root: Path, tmp_path: Path) -> dict[str, Path]:
    """An HF repo with two revisions sharing their README blob (main is the newer), a loose GGUF, and a loose split
    GGUF with its projector, all discovered."""
    old = write_tiny_llama_gguf(tmp_path / "src" / "old.gguf", seed=1)
    new = write_tiny_llama_gguf(tmp_path / "src" / "new.gguf", seed=2)
    readme = b"# tiny\n"
    make_hf_cache(hf_root, {REPO_ID: {"tiny.gguf": old, "README.md": readme}})
    hub = make_hf_cache(hf_root, {REPO_ID: {"tiny.gguf": new, "README.md": readme}})
    loose = tmp_path / "models"
    solo = write_tiny_llama_gguf(loose / "solo" / "solo.gguf", seed=3)
    split = loose / "split"
    write_tiny_llama_gguf(split / "Big-Q8_0-00001-of-00002.gguf", seed=4)
    (split / "Big-Q8_0-00002-of-00002.gguf").write_bytes(b"GGUF second shard")
    (split / "mmproj-Big-f16.gguf").write_bytes(b"GGUF projector")
    result = cli("scan", "--path", str(loose))
    assert result.returncode == 0, result.stderr
    assert set(models_json(cli)) == {"tiny", "solo", "big-q8-0"}
    return {"hub": hub, "loose": loose, "solo": solo, "split": split}


def test_yes_removes_exactly_the_models_files_and_prints_what_it_freed(cli, home, hf_root, world):
    hub, split, solo = world["hub"], world["split"], world["solo"]
    cache = scan_cache_dir(hub)
    (repo,) = cache.repos
    main = repo.refs["main"]
    (older,) = repo.revisions - {main}
    expected_freed = cache.delete_revisions(main.commit_hash).expected_freed_size_str
    before = on_disk(hf_root, world["loose"])

    result = cli("delete", "model", "tiny", "solo", "big-q8-0", "--files", "--yes")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for name in ("tiny", "solo", "big-q8-0"):
        assert f"model/{name} deleted" in out
    assert f"revision {main.commit_hash[:7]}" in out and f"freed {expected_freed}" in out
    assert f"removed {solo} (443.1KiB)" in out

    new_blob = next(f.blob_path for f in main.files if f.file_name == "tiny.gguf")
    gone = {
        main.snapshot_path, *(f.file_path for f in main.files), repo_dir(hub) / "refs" / "main", new_blob,
        solo, *(split / n for n in ("Big-Q8_0-00001-of-00002.gguf", "Big-Q8_0-00002-of-00002.gguf",
                                    "mmproj-Big-f16.gguf")),
    }
    assert before - on_disk(hf_root, world["loose"]) == gone
    assert on_disk(hf_root, world["loose"]) == before - gone, "nothing else was touched"
    assert all(f.blob_path.exists() for f in older.files), "the older revision keeps its blobs, the shared one too"
    assert models_json(cli) == {}

    # The older revision still holds tiny.gguf: scans keep ignoring it (and say so); the loose ones are gone for good.
    assert f"hf:{REPO_ID}:tiny.gguf is still in the Hugging Face cache" in out
    assert ignored(home) == [f"hf:{REPO_ID}:tiny.gguf"]
    assert cli("scan", "--path", str(world["loose"])).returncode == 0
    assert models_json(cli) == {}


def test_without_a_terminal_and_without_yes_nothing_changes(cli, home, hf_root, world, tmp_path):
    before = on_disk(hf_root, world["loose"])
    models = (home / "models.json").read_text()

    result = cli("delete", "model", "tiny", "solo", "--files", input="")
    assert result.returncode == 1
    assert "stdin is not a terminal; pass --yes to remove them (nothing was deleted)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert f"  {world['solo']}  (443.1KiB)" in result.stdout, "it says what it would remove"
    assert "Hugging Face cache: test-org/tiny-GGUF revision" in result.stdout

    spec = write(tmp_path / "solo.yaml", PATH_MODEL.format(path=world["solo"]).replace("name: mine", "name: solo"))
    by_file = cli("delete", "-f", str(spec), "--files", input="")
    assert by_file.returncode == 1 and "pass --yes" in by_file.stderr
    from_stdin = cli("delete", "-f", "-", "--files", input=spec.read_text())
    assert from_stdin.returncode == 1 and "pass --yes" in from_stdin.stderr

    assert on_disk(hf_root, world["loose"]) == before
    assert (home / "models.json").read_text() == models, "not even the registry entries are deleted"


def run_on_terminal(args: list[str], answer: str) -> subprocess.CompletedProcess[str]:
    """Run athanor with a pseudo-terminal as stdin and type ``answer`` into it."""
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen([ATHANOR, *args], stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=dict(os.environ), cwd=REPO)
        os.close(slave)
        os.write(master, answer.encode())
        out, err = proc.communicate(timeout=120)
    finally:
        os.close(master)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_the_terminal_confirmation_names_what_goes_and_a_no_deletes_nothing(cli, home, hf_root, world):
    solo = world["solo"]
    before = on_disk(hf_root, world["loose"])
    models = (home / "models.json").read_text()

    declined = run_on_terminal(["delete", "model", "solo", "--files"], "n\n")
    assert declined.returncode == 1 and "nothing was deleted" in declined.stderr
    assert f"  {solo}  (443.1KiB)" in declined.stdout
    assert "Delete model/solo and remove these files (443.1KiB)? [y/N]" in declined.stdout
    assert on_disk(hf_root, world["loose"]) == before
    assert (home / "models.json").read_text() == models

    accepted = run_on_terminal(["delete", "model", "solo", "--files"], "y\n")
    assert accepted.returncode == 0, accepted.stderr
    assert "model/solo deleted" in accepted.stdout and f"removed {solo} (443.1KiB)" in accepted.stdout
    assert on_disk(hf_root, world["loose"]) == before - {solo}
    assert set(models_json(cli)) == {"tiny", "big-q8-0"}


def test_weights_another_registered_model_uses_are_kept(cli, home, hf_root, tmp_path):
    # One HF revision with two quantizations (both discovered); two loose GGUFs sharing one projector; and two
    # applied specs serving the same loose file.
    q4 = write_tiny_llama_gguf(tmp_path / "src" / "q4.gguf", seed=1)
    q8 = write_tiny_llama_gguf(tmp_path / "src" / "q8.gguf", seed=2)
    hub = make_hf_cache(hf_root, {"test-org/multi-GGUF": {
        "multi-Q4_K_M.gguf": q4, "multi-Q8_0.gguf": q8, "README.md": b"# multi\n"}})
    pair = tmp_path / "models" / "pair"
    a = write_tiny_llama_gguf(pair / "a.gguf", seed=3)
    b = write_tiny_llama_gguf(pair / "b.gguf", seed=4)
    mmproj = pair / "mmproj-pair.gguf"
    mmproj.write_bytes(b"GGUF projector")
    assert cli("scan", "--path", str(pair.parent)).returncode == 0
    mine = write(tmp_path / "mine.yaml", PATH_MODEL.format(path=b))
    mine2 = write(tmp_path / "mine2.yaml", PATH_MODEL.format(path=b).replace("name: mine", "name: mine2"))
    assert cli("apply", "-f", str(mine), "-f", str(mine2)).returncode == 0
    assert set(models_json(cli)) == {"multi-q4-k-m", "multi-q8-0", "a", "mine", "mine2"}
    cache = scan_cache_dir(hub)
    (repo,) = cache.repos
    (revision,) = repo.revisions
    q8_file = next(f for f in revision.files if f.file_name == "multi-Q8_0.gguf")
    expected_freed = cache.delete_files(q8_file).expected_freed_size_str
    before = on_disk(hf_root, pair)

    result = cli("delete", "model", "multi-q8-0", "a", "mine", "--files", "--yes")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"removed {a} (443.1KiB)" in out
    assert f"multi-Q8_0.gguf: freed {expected_freed}" in out
    assert f"kept {mmproj}: used by model/mine2" in out and out.count(str(mmproj)) == 1
    assert f"kept {b}: used by model/mine2" in out
    assert f"kept the rest of test-org/multi-GGUF revision {revision.commit_hash[:7]}" in out
    assert "used by model/multi-q4-k-m" in out
    assert before - on_disk(hf_root, pair) == {a, q8_file.file_path, q8_file.blob_path}
    assert set(models_json(cli)) == {"multi-q4-k-m", "mine2"}

    # Once the last user goes, so do its files (here by spec file).
    last = cli("delete", "-f", str(mine2), "--files", "--yes")
    assert last.returncode == 0, last.stderr
    assert f"removed {b} (443.1KiB)" in last.stdout and f"removed {mmproj} (14B)" in last.stdout
    assert not b.exists() and not mmproj.exists()


def test_deleted_files_downloaded_again_are_discovered_again(cli, home, hf_root, tmp_path):
    add_gguf_repo(hf_root, REPO_ID, filename="tiny.gguf")
    solo = write_tiny_llama_gguf(tmp_path / "models" / "solo.gguf", seed=3)
    assert cli("scan", "--path", str(solo.parent)).returncode == 0
    ports = {name: m["spec"]["port"] for name, m in models_json(cli).items()}
    assert set(ports) == {"tiny", "solo"}

    result = cli("delete", "model", "tiny", "solo", "--files", "--yes")
    assert result.returncode == 0, result.stderr
    assert "the last one" in result.stdout and f"all of {repo_dir(hf_root / 'hub')}" in result.stdout
    assert not repo_dir(hf_root / "hub").exists() and not solo.exists()
    assert ignored(home) == [], "nothing on disk is left to ignore"

    add_gguf_repo(hf_root, REPO_ID, filename="tiny.gguf")
    write_tiny_llama_gguf(solo, seed=3)
    scan = cli("scan", "--path", str(solo.parent))
    assert "model/tiny discovered" in scan.stdout and "model/solo discovered" in scan.stdout


def test_a_file_that_cannot_be_removed_is_reported_and_the_model_stays_deleted(store, home, tmp_path):
    loose = tmp_path / "models"
    solo = write_tiny_llama_gguf(loose / "solo.gguf")
    other = write_tiny_llama_gguf(loose / "other.gguf", seed=1)
    registry.scan(store, (str(loose),))
    planned = weights.plan(store, ["solo", "other"])
    assert [r.label for r in planned.removals] == [str(solo), str(other)]
    actions.delete_model(store, "solo")
    actions.delete_model(store, "other")
    solo.unlink()  # something put a directory where the file was: unlink fails with EISDIR
    (solo / "inside").mkdir(parents=True)

    outcome = weights.execute(store, planned)
    assert [r.label for r in outcome.removed] == [str(other)] and not other.exists()
    (failure,) = outcome.failures
    assert failure.startswith(f"{solo}: ") and len(failure) > len(f"{solo}: "), "the path and the OS's reason"
    error = outcome.error()
    assert error is not None
    assert str(error).splitlines() == [f"cannot remove {failure}", f"the models stay deleted; left on disk: {solo}"]
    doc = store.models.load()
    assert doc["models"] == {}
    assert doc["ignoredSources"] == [f"path:{solo}"], "what is left stays out of later scans"


def test_files_is_for_models_only(cli):
    result = cli("delete", "recipe", "agent", "--files")
    assert result.returncode == 2 and "recipes have no files" in result.stderr


def test_mlx_weights_go_as_a_whole_directory_or_revision(cli, hf_root, tmp_path):
    add_mlx_repo(hf_root, "mlx-community/tiny-llama-4bit", quantized_bits=4)
    models = tmp_path / "models"
    loose = write_tiny_mlx_llama(models / "tiny-mlx", quantized_bits=4)
    assert cli("scan", "--path", str(models)).returncode == 0
    names = set(models_json(cli))
    assert len(names) == 2
    expected = scan_cache_dir(hf_root / "hub").delete_revisions(
        *(r.commit_hash for repo in scan_cache_dir(hf_root / "hub").repos for r in repo.revisions)
    ).expected_freed_size_str

    result = cli("delete", "model", *sorted(names), "--files", "--yes")
    assert result.returncode == 0, result.stderr
    assert f"removed {loose}{os.sep} (" in result.stdout and f"freed {expected}" in result.stdout
    assert not loose.exists() and models.is_dir(), "the model's directory goes, the folder holding it stays"
    assert not repo_dir(hf_root / "hub", "mlx-community/tiny-llama-4bit").exists()


def test_links_and_directories_holding_other_weights_are_left_alone(cli, tmp_path):
    real = write_tiny_llama_gguf(tmp_path / "elsewhere" / "real.gguf")
    models = tmp_path / "models"
    models.mkdir()
    link = models / "linked.gguf"
    link.symlink_to(real)
    outer = write_tiny_mlx_llama(tmp_path / "outer", quantized_bits=4)
    stray = write_tiny_llama_gguf(outer / "extra" / "stray.gguf")
    for spec_name, path in (("linked", link), ("outer", outer)):
        text = PATH_MODEL.format(path=path).replace("name: mine", f"name: {spec_name}")
        if spec_name == "outer":
            text = text.replace("runtime: llama-server", "runtime: mlx-lm")
        spec = write(tmp_path / f"{spec_name}.yaml", text)
        assert cli("apply", "-f", str(spec)).returncode == 0
    result = cli("delete", "model", "linked", "outer", "--files", "--yes")
    assert result.returncode == 0, result.stderr
    assert f"kept {link}: a symbolic link (to {real})" in result.stdout
    assert f"kept {outer}: it also holds other weights ({stray})" in result.stdout
    assert link.is_symlink() and real.exists() and stray.exists() and (outer / "config.json").exists()
    assert models_json(cli) == {}


def test_a_download_during_the_confirmation_keeps_the_blobs_it_links(store, hf_root, tmp_path):
    gguf = write_tiny_llama_gguf(tmp_path / "src" / "tiny.gguf")
    hub = make_hf_cache(hf_root, {REPO_ID: {"tiny.gguf": gguf, "README.md": b"v1\n"}})
    registry.scan(store)
    planned = weights.plan(store, ["tiny"])
    (removal,) = planned.removals
    assert "the last one" in removal.label, "planned: the repo's only revision, blobs and all"

    # While the user reads the prompt, a new revision arrives that reuses the weights' blob.
    make_hf_cache(hf_root, {REPO_ID: {"tiny.gguf": gguf, "README.md": b"v2\n"}})
    actions.delete_model(store, "tiny")
    outcome = weights.execute(store, planned)

    assert not outcome.failures
    (repo,) = scan_cache_dir(hub).repos
    (left,) = repo.revisions
    assert left.refs == frozenset({"main"})
    assert {f.file_name for f in left.files} == {"tiny.gguf", "README.md"}
    assert all(f.blob_path.exists() for f in left.files), "the new revision's blobs are all there"
    assert outcome.still_ignored == [f"hf:{REPO_ID}:tiny.gguf"]
