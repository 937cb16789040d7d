"""The store's directory watch (``controller/dirwatch.py``): a change is seen by the very next look, with no event
loop in between, and a watch that cannot be kept answers "maybe" from then on (the caller stats, as before)."""

from __future__ import annotations

import gc
import os
import shutil
import sys
from pathlib import Path

import pytest

from athanor.controller.dirwatch import DirectoryWatch
from athanor.store.files import atomic_write_text

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux's")


@linux
def test_a_rename_into_the_directory_is_seen_by_the_next_look(tmp_path: Path):
    watch = DirectoryWatch(str(tmp_path))
    try:
        assert watch.watching and not watch.changed()
        for round_ in range(20):  # each write seen at once, every time, and only once
            atomic_write_text(tmp_path / "models.json", f'{{"round": {round_}}}', durable=False)
            assert watch.changed()
            assert not watch.changed()
        (tmp_path / "models.json").chmod(0o644)
        assert watch.changed()
    finally:
        watch.close()
    assert not watch.watching and watch.changed()  # closed: "maybe", every time


@linux
def test_a_watch_whose_directory_went_answers_maybe_from_then_on(tmp_path: Path):
    directory = tmp_path / "home"
    directory.mkdir()
    watch = DirectoryWatch(str(directory))
    assert watch.watching
    shutil.rmtree(directory)
    assert watch.changed()
    assert not watch.watching and watch.changed() and watch.changed()


@linux
def test_a_watch_gives_its_descriptor_back_when_closed_twice_or_collected(tmp_path: Path):
    def descriptors() -> set[str]:
        return set(os.listdir("/proc/self/fd"))

    gc.collect()  # what earlier tests left to the collector (a socket, a file) goes now, not in the middle
    before = descriptors()
    closed = DirectoryWatch(str(tmp_path))
    opened = descriptors() - before
    assert closed.watching and len(opened) == 1
    closed.close()
    closed.close()  # a second close is nothing
    assert not descriptors() & opened
    dropped = DirectoryWatch(str(tmp_path))
    opened = descriptors() - before
    assert dropped.watching and len(opened) == 1
    del dropped  # the desired state's watch goes with its owner: no inotify instance leaks per controller
    gc.collect()
    assert not descriptors() & opened


def test_no_directory_no_watch_and_always_maybe(tmp_path: Path):
    watch = DirectoryWatch(str(tmp_path / "not-yet"))
    assert not watch.watching
    assert watch.changed() and watch.changed()


@linux
def test_the_desired_state_follows_each_write_and_watches_a_home_made_after_it_started(tmp_path: Path):
    """The daemon may start before its home exists: it looks at the file on every request until a watch can be set,
    then reads each write at the next look all the same."""
    from athanor.controller.desired import DesiredState
    from athanor.store import Store

    store = Store(tmp_path / "home")
    desired = DesiredState(store, lambda *args: None)  # type: ignore[arg-type,return-value]
    try:
        assert desired.refresh()["models"] == {}
        for round_ in range(5):
            with store.models.edit() as doc:
                doc["ignoredSources"] = [f"round-{round_}"]
            assert desired.refresh()["ignoredSources"] == [f"round-{round_}"]
        assert desired._watch is not None and desired._watch.watching
    finally:
        desired.close()
