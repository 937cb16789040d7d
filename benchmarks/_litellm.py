"""LiteLLM's proxy as a peer: its own virtualenv (created once, cached), one config naming the direct runtime.

The virtualenv lives at ``~/.cache/athanor-bench/litellm-venv`` (``ATHANOR_BENCH_CACHE`` moves the parent),
made with the standard library's venv and ``pip install 'litellm[proxy]==LITELLM_VERSION'`` from PyPI on first
use; a marker file names the version installed, so a changed pin rebuilds it. The version is pinned: the figures
of two runs are comparable only with the same LiteLLM, and a pin keeps a yanked or tampered release out. (Later
releases' ``proxy`` extra needs a ``litellm-proxy`` distribution that the package index here does not serve.)
The proxy runs without a master key (``LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY``), as athanor runs
without keys here, with the model cost map read from its package (no network at start) and telemetry off.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import venv
from collections.abc import Iterator
from pathlib import Path

from _gateway import free_port, stop_group, wait_answering

LITELLM_VERSION = "1.82.6"
CACHE = Path(os.environ.get("ATHANOR_BENCH_CACHE", Path.home() / ".cache" / "athanor-bench"))


def litellm_venv() -> Path:
    """The cached virtualenv's ``litellm`` console script, installing it first when missing (minutes, once);
    pip's output goes to ``litellm-pip.log`` beside the virtualenv."""
    root = CACHE / "litellm-venv"
    log = CACHE / "litellm-pip.log"
    script = root / "bin" / "litellm"
    marker = root / "athanor-bench-installed"
    if script.exists() and marker.exists() and marker.read_text().strip() == LITELLM_VERSION:
        return script
    print(f"creating LiteLLM's virtualenv at {root} (litellm[proxy]=={LITELLM_VERSION}, once; pip log {log})",
          file=sys.stderr, flush=True)
    venv.EnvBuilder(clear=True, with_pip=True).create(root)
    with open(log, "wb") as out:
        done = subprocess.run([str(root / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
                               f"litellm[proxy]=={LITELLM_VERSION}"], stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"installing LiteLLM failed (pip exited {done.returncode}; see {log}); "
                           "--skip-litellm runs the rest")
    marker.write_text(LITELLM_VERSION + "\n")
    return script


@contextlib.contextmanager
def litellm_proxy(script: Path, upstreams: dict[str, tuple[str, str]], workdir: Path
                  ) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """LiteLLM's proxy serving each ``model name -> (OpenAI-compatible base URL ending in /v1, its API key)``;
    yields its URL and process. One worker; its whole process group is stopped at the end."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "litellm.yaml"
    models = [{"model_name": name, "litellm_params": {"model": f"openai/{name}", "api_base": base,
                                                        "api_key": key}}
              for name, (base, key) in upstreams.items()]
    config.write_text(json.dumps({"model_list": models, "litellm_settings": {"telemetry": False}}))  # JSON is YAML
    port = free_port()
    env = {**os.environ, "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true",
           "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR", "DISABLE_SCHEMA_UPDATE": "true"}
    env.pop("LITELLM_MASTER_KEY", None)
    with open(workdir / "litellm.log", "wb") as log:
        proc = subprocess.Popen([str(script), "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
                                 "--num_workers", "1", "--telemetry", "False"],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=workdir, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_answering(url + "/health/liveliness", proc, "LiteLLM's proxy", timeout=180)
        yield url, proc
    finally:
        stop_group(proc)

