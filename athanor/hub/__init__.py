"""The Hugging Face Hub, as athanor uses it: search, trending and conversions, ranked by how a model would fit this
machine. Everything goes through huggingface_hub (imported only when a function here runs), honouring
``HF_ENDPOINT`` and ``HF_TOKEN``; its failures become one-line ``HubError``s (athanor/errors.py).

- ``search(query, fmt=, author=, sort=, limit=)`` and ``trending(limit)``: ``Row``s, one per repo.
- ``conversions(repo, fmt="mlx")``: repos made from a base model (tagged ``base_model:<repo>``).
- ``repo_row(repo)``: one repo's row (the files ``athanor pull`` would fetch, their size, the fit band).
- ``choose_gguf(files)``: the quantization athanor picks among (path, size) pairs, shards summed, the projector
  beside; ``QUANT_PREFERENCE`` is its order.
- ``hub_errors(repo)``: a context manager that turns huggingface_hub's exceptions (``hf_hub_download``'s too)
  into athanor's one-line errors: the boundary for any other code that calls the client.
"""

from athanor.hub._client import hub_errors
from athanor.hub._files import QUANT_PREFERENCE, Choice, GGUFChoice, choose_gguf
from athanor.hub._search import (
    BANDS,
    FORMATS,
    SORTS,
    Row,
    conversions,
    repo_row,
    search,
    trending,
)

__all__ = [
    "BANDS",
    "FORMATS",
    "QUANT_PREFERENCE",
    "SORTS",
    "Choice",
    "GGUFChoice",
    "Row",
    "choose_gguf",
    "conversions",
    "hub_errors",
    "repo_row",
    "search",
    "trending",
]
