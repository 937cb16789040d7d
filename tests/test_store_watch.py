"""models.json watched rather than looked at per request: what the watch hears, and that a request still sees
every change made before it was sent (``controller/file_watch.py``, ``DesiredState.look``)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest
from fixtures.serving import Gateway, apply_gateway, apply_models, model_spec
from fixtures.tiny_models import write_tiny_llama_gguf

from athanor.controller.desired import DesiredState
from athanor.controller.file_watch import EntryWatch, watch_entry
from athanor.store import open_store

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the watch is inotify's (Linux)")


async def _after_a_byte_sent_now() -> None:
    """Return once the event loop has read a byte sent on a fresh connection now. By the ordering the watch relies
    on (ready descriptors are handled in the order they became ready), everything the watch was told before it is
    heard by then: this is how a request that follows an ``apply`` sees it."""
    ours, theirs = socket.socketpair()
    try:
        reader, writer = await asyncio.open_connection(sock=theirs)
        ours.sendall(b"x")
        assert await reader.readexactly(1) == b"x"
        writer.close()
    finally:
        ours.close()


def test_the_watch_hears_its_entry_written_renamed_into_place_and_removed_and_nothing_else(tmp_path: Path):
    target = tmp_path / "models.json"

    async def scenario() -> None:
        watch = watch_entry(target)
        assert isinstance(watch, EntryWatch)
        try:
            assert watch.changed, "what happened before the watch began is unknown: the first reader looks"

            async def heard(change) -> bool:
                watch.changed = False
                change()
                await _after_a_byte_sent_now()
                return watch.changed

            assert await heard(lambda: target.write_text("{}")), "created and written"
            assert await heard(lambda: (tmp_path / "models.json.tmp").write_text("{}")) is False, "another name"
            assert await heard(lambda: (tmp_path / "models.json.tmp").rename(target)), "renamed into place"
            assert await heard(lambda: (tmp_path / "state.json").write_text("{}")) is False, "another file"
            assert await heard(target.unlink), "removed"
            assert not watch.lost
        finally:
            watch.close()

    asyncio.run(scenario())


def test_a_watch_whose_directory_goes_is_lost_and_one_that_cannot_be_had_is_none(tmp_path: Path):
    directory = tmp_path / "home"
    directory.mkdir()

    async def scenario() -> None:
        assert watch_entry(tmp_path / "missing" / "models.json") is None, "no directory to watch: stat instead"
        watch = watch_entry(directory / "models.json")
        assert watch is not None
        try:
            shutil.rmtree(directory)
            await _after_a_byte_sent_now()
            assert watch.lost, "the reader must look every time from now on"
        finally:
            watch.close()

    asyncio.run(scenario())


def _desired_with_one_model(home: Path, tmp_path: Path) -> DesiredState:
    home.mkdir(parents=True, exist_ok=True)
    gguf = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    apply_models(tmp_path / "models.yaml", model_spec("first", gguf))
    events: list[tuple] = []
    return DesiredState(open_store(), lambda *args, **kwargs: events.append(args))


def test_look_reads_the_file_only_when_the_watch_heard_it_change(home: Path, tmp_path: Path):
    desired = _desired_with_one_model(home, tmp_path)
    models_json = str(open_store().models.path)
    real_stat = os.stat
    stats: list[str] = []

    def counted_stat(path, *args, **kwargs):
        if os.fspath(path) == models_json:
            stats.append(models_json)
        return real_stat(path, *args, **kwargs)

    def looked() -> dict:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(os, "stat", counted_stat)
            return desired.look()

    async def scenario() -> None:
        desired.watch()
        try:
            assert "first" in looked()["models"], "the first look reads the file"
            assert len(stats) == 1
            for _ in range(3):
                looked()
            assert len(stats) == 1, "unchanged: not looked at again"

            with open_store().models.edit() as doc:
                doc["models"]["second"] = json.loads(json.dumps(doc["models"]["first"]))
                doc["models"]["second"]["metadata"]["name"] = "second"
            await _after_a_byte_sent_now()
            assert set(looked()["models"]) == {"first", "second"}, "a change before the request is seen"
            assert len(stats) == 2
            assert desired.resolve("second", refresh=False) == "second"
        finally:
            desired.unwatch()

    asyncio.run(scenario())


def test_without_a_watch_every_look_reads_the_file(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    desired = _desired_with_one_model(home, tmp_path)
    monkeypatch.setattr(sys, "platform", "darwin")  # kqueue promises no order: each request keeps its stat

    async def scenario() -> None:
        desired.watch()
        try:
            assert "first" in desired.look()["models"]
            with open_store().models.edit() as doc:
                del doc["models"]["first"]
            assert desired.look()["models"] == {}, "looked at again, with no loop turn in between"
        finally:
            desired.unwatch()

    asyncio.run(scenario())


def test_each_request_sees_the_apply_that_finished_before_it_was_sent(gateway: Gateway, tmp_path: Path):
    """Through the real gateway and the real CLI: the body limit and a new model, each changed by an ``apply``
    that returned just before the request was sent, apply to that request."""
    body = json.dumps({"model": "nothing-yet", "prompt": "x" * 4000}).encode()
    gguf = write_tiny_llama_gguf(tmp_path / "late.gguf")
    for i in range(6):
        apply_gateway(gateway, tmp_path, "  limits: {maxRequestBytes: 1024}\n")
        status, answer = gateway.post("/v1/completions", body)
        assert status == 413, answer
        apply_gateway(gateway, tmp_path, "  limits: {maxRequestBytes: 100000}\n")
        status, answer = gateway.post("/v1/completions", body)
        assert status == 404 and answer["error"]["code"] == "model_not_found", answer

        name = f"late-{i}"
        apply_models(tmp_path / f"{name}.yaml", model_spec(name, gguf, extra="  residency: disabled\n"))
        status, answer = gateway.post("/v1/completions", json.dumps({"model": name, "prompt": "hi"}).encode())
        assert status == 503 and "disabled" in answer["error"]["message"], answer
