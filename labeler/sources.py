"""Where a corpus's files come from, besides a plain path, URL, glob or folder.

* :func:`_saved_datasets`: an HF ``save_to_disk`` folder is read as ``datasets.load_from_disk`` reads
  it (of a DatasetDict only the split asked for; of a Dataset the data files its ``state.json`` lists,
  not the ``cache-*.arrow`` files that ``.map()`` and ``.filter()`` leave beside them).
* :data:`_DATASET_META`: the JSON files ``save_to_disk`` writes beside the data, which are not corpus.
* :func:`_check_hub_name`: ``hf:NAME`` names a hub dataset, never a local path or a URL.

:class:`labeler.corpus.Corpus` uses them when it opens a corpus.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
from typing import Any

from softlabels.labeler.records import file_format
from softlabels.schemas import retry_io
from softlabels.schemas.errors import UserError

log = logging.getLogger(__name__)

_DATASET_META = ("dataset_info.json", "state.json", "dataset_dict.json")  # what save_to_disk writes beside the data


def _saved_datasets(fs: Any, found: dict[str, Any], split: str, spec: str) -> dict[str, Any]:
    """``found`` (a folder's files) with each ``save_to_disk`` folder in it read as ``datasets.load_from_disk``
    reads it: of a DatasetDict (``dataset_dict.json``) only the split ``split``; of a Dataset (``state.json``)
    only the data files its ``_data_files`` lists, not the ``cache-*.arrow`` files that ``.map()`` and
    ``.filter()`` leave beside them, nor its JSON files.

    Raises:
        UserError: a DatasetDict without the split, a ``state.json`` that cannot be read or lists a missing file.
    """
    for d in sorted(posixpath.dirname(f) for f in found if posixpath.basename(f) == "dataset_dict.json"):
        inside = f"{d}/{split}/"
        found = {f: i for f, i in found.items() if not f.startswith(d + "/") or f.startswith(inside)}
        if not any(f.startswith(inside) for f in found):
            raise UserError(f"corpus {spec!r}: the saved dataset {d!r} (of several splits) has no split {split!r}")
    for state in sorted(f for f in found if posixpath.basename(f) == "state.json"):
        d = posixpath.dirname(state)
        try:
            listed = [f"{d}/{entry['filename']}" for entry in
                      json.loads(retry_io(lambda: fs.cat_file(state), f"read {state}"))["_data_files"]]
        except (ValueError, KeyError, TypeError) as e:  # not JSON, no _data_files, entries without a filename
            raise UserError(f"corpus {spec!r}: {state!r} is not the state file of a saved dataset "
                            f"({type(e).__name__}: {e}); save it again with save_to_disk") from None
        missing = [f for f in listed if f not in found]
        if missing:
            raise UserError(f"corpus {spec!r}: the saved dataset {d!r} lists {posixpath.basename(missing[0])!r} in "
                            "its state.json, which is missing; save it again with save_to_disk")
        left = [f for f in found if posixpath.dirname(f) == d and f not in listed and file_format(f) == ".arrow"]
        if left:
            log.info("corpus: %s: read the %d data file(s) its state.json lists, not %d other Arrow file(s) "
                     "(.map()/.filter() caches)", d, len(listed), len(left))
        found = {f: i for f, i in found.items() if posixpath.dirname(f) != d or f in listed}
    return found


def _check_hub_name(name: str) -> None:
    """``hf:NAME`` names a hub dataset (``OWNER/NAME[:CONFIG]``), never a local path or a URL.

    Raises:
        UserError: ``name`` is a path (``/x``, ``./x``, ``~/x``, one that exists here) or a URL.
    """
    repo = name.partition(":")[0]
    if "://" in name or repo.startswith(("/", ".", "~")) or "\\" in repo or (repo and os.path.exists(repo)):
        raise UserError(f"--corpus hf:{name}: hf: takes the name of a hub dataset (hf:OWNER/NAME); "
                        f"a local path or a URL is given without the prefix (--corpus {name})")
