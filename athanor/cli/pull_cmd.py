"""pull: a Hub repo into the Hugging Face cache, registered as a model the gateway serves at once.

The work is in athanor.hub.pull (huggingface_hub is imported there, when the command runs); this module prints:
what will be fetched and how it fits on stderr, the progress on stderr (a bar on a terminal, a line every 10%
otherwise), the registered models on stdout.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import click

from athanor.cli.common import emit, store, warn

if TYPE_CHECKING:
    from athanor.hub.pull import Plan, PullFile


@click.command("pull")
@click.argument("repo")
@click.option("--file", "files", multiple=True, metavar="F",
              help="Fetch this file of the repo instead of the preferred choice (repeatable; a shard of a split GGUF "
                   "brings the other shards; name a projector, mmproj-*.gguf, to fetch it too).")
@click.option("--revision", metavar="R", help="A branch, tag or commit of the repo (default: main).")
@click.option("--force", is_flag=True, help="Pull a model even if it cannot fit this machine's memory.")
@click.option("-o", "--output", type=click.Choice(("json",)), default=None,
              help="Print the result as JSON (progress stays on stderr).")
@click.pass_context
def pull_cmd(ctx: click.Context, repo: str, files: tuple[str, ...], revision: str | None, force: bool,
             output: str | None) -> None:
    """Download REPO from the Hugging Face Hub and register it as a model.

    What is fetched is what 'athanor search' shows: for a GGUF repo the preferred quantization (Q4_K_M, Q5_K_M,
    Q6_K, Q4_K_S, Q8_0, else the smallest), every shard of a split file, and the vision projector (mmproj)
    beside it; for an MLX repo the weights with their config and tokenizer files. The files go into the Hugging
    Face cache that discovery scans (the Gateway's discovery.hfCacheDir, else HF_HUB_CACHE or HF_HOME/hub);
    HF_ENDPOINT and HF_TOKEN are honoured.

    Before any download, a model that cannot fit this machine's memory (its weights, or its estimate at a
    512-token context, above total memory less what the OS keeps) is refused, unless --force. A dropped
    connection resumes where it stopped, and files already in the cache are not fetched again (the file an
    interrupted pull was fetching starts over).

    Once every file is complete, the model is registered by the same discovery the daemon runs (athanor scan),
    so a running gateway serves it at once, and pi is synced when the Gateway asks for it. Ctrl-C during the
    download registers nothing.
    """
    from athanor.hub import pull

    st = store()
    plan = pull.plan(repo, files=files, revision=revision, cache_dir=pull.cache_dir(st.models.load()))
    click.echo(_summary(plan), err=True)
    for note in pull.check_fit(plan, force=force):
        (warn if note.warning else _info)(note.text)
    pull.check_disk(plan)

    progress = _Bar() if sys.stderr.isatty() else _Lines()
    try:
        pull.download(plan, progress)
    except KeyboardInterrupt:
        complete = sum(1 for f in plan.files if f.cached) + progress.finished
        click.echo(f"athanor: pull of {plan.repo} interrupted: nothing was registered; {complete} of "
                   f"{len(plan.files)} files are complete in the cache, and 'athanor pull {plan.repo}' fetches the "
                   "rest", err=True)
        ctx.exit(130)

    registration = pull.register(plan, st)
    for message in registration.warnings:
        warn(message)
    if output == "json":
        emit({**plan.to_json(), "models": [_model_json(r) for r in registration.models]}, "json")
    from athanor.views import human_bytes

    failed = False
    for registered in registration.models:
        if registered.name is None:
            click.echo(f"athanor: {registered.problem}", err=True)
            failed = True
            continue
        if output != "json":
            planned = registered.planned
            click.echo(f"model/{registered.name} pulled "
                       f"({human_bytes(planned.weights_bytes + planned.projector_bytes)})")
        for note in registered.notes:
            warn(note)
    if not registration.models:
        _info(f"{plan.repo}: {len(plan.files)} files in the cache; none of them is a model on its own, nothing "
              "was registered")
    if any(r.action == "discovered" for r in registration.models):
        _sync_pi(st, quiet=output == "json")
    if failed:
        ctx.exit(1)


def _summary(plan: Plan) -> str:
    from athanor.views import human_bytes

    where = f"{plan.revision or 'main'}, commit {plan.commit[:12]}"
    what = {"gguf": "GGUF", "mlx": "MLX", "files": "files"}[plan.format]
    quants = ", ".join(dict.fromkeys(m.quant for m in plan.models if m.quant))
    fetch = (f"{human_bytes(plan.download_bytes)} to download" if plan.download_bytes
             else "everything is in the cache already")
    return (f"pulling {plan.repo} ({where}): {what}{' ' + quants if quants else ''}, {len(plan.files)} "
            f"file{'s' if len(plan.files) != 1 else ''}, {human_bytes(plan.size_bytes)}; {fetch}")


def _model_json(registered: Any) -> dict[str, Any]:
    planned = registered.planned
    return {"name": registered.name, "runtime": registered.runtime or planned.runtime, "action": registered.action,
            "files": list(planned.files), "quant": planned.quant,
            "sizeBytes": planned.weights_bytes + planned.projector_bytes, "problem": registered.problem,
            "notes": list(registered.notes)}


def _info(message: str) -> None:
    click.echo(message, err=True)


def _sync_pi(st: Any, *, quiet: bool) -> None:
    """As after scan (cli/sync_cmds.sync_clients); with -o json its lines go to stderr, stdout is the JSON."""
    from athanor.errors import AthanorError
    from athanor.integrations import pi

    try:
        messages = pi.sync_if_enabled(st, st.models.load())
    except (AthanorError, OSError) as exc:
        warn(f"the store is saved, but pi's models.json is not: {exc}; 'athanor sync pi' retries")
        return
    for message in messages:
        click.echo(message, err=quiet)


class _Lines:
    """Progress for a log or a pipe: one line per file, then a line each time the total passes a tenth."""

    def __init__(self) -> None:
        self.total = 0
        self.done = 0
        self.tenths = 0
        self.finished = 0  # files fetched to the end by this pull
        self.current: PullFile | None = None

    def begin(self, plan: Plan) -> None:
        self.total = plan.download_bytes

    def file(self, index: int, pulled: PullFile) -> None:
        from athanor.views import human_bytes

        self._close_file()
        self.current = pulled
        if not pulled.cached:
            _info(f"{pulled.path} ({human_bytes(pulled.size)})")

    def advance(self, n: int) -> None:
        from athanor.views import human_bytes

        self.done += n
        if self.total <= 0:
            return
        tenths = min(10, self.done * 10 // self.total)
        if tenths > self.tenths:
            self.tenths = tenths
            _info(f"{self.done * 100 // self.total:3d}% {human_bytes(self.done)} of {human_bytes(self.total)}")

    def note(self, message: str) -> None:
        _info(message)

    def end(self, completed: bool) -> None:
        from athanor.views import human_bytes

        if completed:
            self._close_file()
            if self.total and self.tenths < 10:  # some file came from the cache's blobs after all
                _info(f"100% {human_bytes(self.done)} downloaded")

    def _close_file(self) -> None:
        if self.current is not None and not self.current.cached:
            self.finished += 1
        self.current = None


class _Bar(_Lines):
    """Progress on a terminal: one tqdm bar for the whole pull (huggingface_hub's own progress library)."""

    def begin(self, plan: Plan) -> None:
        from tqdm import tqdm

        super().begin(plan)
        self.bar = tqdm(total=plan.download_bytes, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                        desc=plan.repo.split("/", 1)[1], dynamic_ncols=True, disable=plan.download_bytes == 0)

    def file(self, index: int, pulled: PullFile) -> None:
        self._close_file()
        self.current = pulled
        if not pulled.cached:
            self.bar.set_description(pulled.path.rsplit("/", 1)[-1], refresh=True)

    def advance(self, n: int) -> None:
        self.done += n
        self.bar.update(n)

    def note(self, message: str) -> None:
        self.bar.write(message, file=sys.stderr)

    def end(self, completed: bool) -> None:
        if completed:
            self._close_file()
        self.bar.close()
