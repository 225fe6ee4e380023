"""softlabels: offline soft labels for knowledge distillation of language models.

Label once (``softlabels label``, Ray), train many students (``softlabels train``),
read label sets from any tool. The packages:

* :mod:`softlabels.schemas`: the label-set format (shards, encodings, manifest, reader).
* :mod:`softlabels.labeler`: the labeling job (needs ``softlabels[labeler]``).
* :mod:`softlabels.trainer`: training and evaluating students (``softlabels[trainer]``).
* :mod:`softlabels.convert`: re-encode a label set; :mod:`softlabels.hf`: a label set as an HF dataset.

Two names are importable from here directly (lazily: ``import softlabels`` stays cheap)::

    softlabels.open_label_set(url)           # the reader (softlabels.schemas)
    softlabels.to_hf_dataset(url)            # a datasets.Dataset with decoded columns
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("softlabels")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

_LAZY = {
    "open_label_set": "softlabels.schemas",
    "to_hf_dataset": "softlabels.hf",
    "UserError": "softlabels.schemas.errors",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'softlabels' has no attribute {name!r}")
