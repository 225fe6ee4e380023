"""Refusals reach the user as one line, not a traceback.

* Every UserError survives pickling and the trip back from a Ray worker. The subclasses are
  found by walking ``UserError.__subclasses__()`` after importing every module of the package,
  so an error class added later is covered without touching this file.
* What a resume reads back from its output (run record, commit markers and indexes) and cannot
  use: a run record is refused in one line naming it; a marker or an index that does not check
  out costs only its units, which are redone; a directory in place of one is refused in one line.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pickle
import pkgutil
import shutil
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import REPO, assert_one_line_error, cli_in_process
from softlabels.common.cli import run_main
from softlabels.schemas import open_label_set
from softlabels.schemas.errors import UserError


def _import_everything() -> None:
    """Import every module of every package pyproject.toml ships (a new module is picked up too)."""
    with open(REPO / "pyproject.toml", "rb") as fh:
        packages = tomllib.load(fh)["tool"]["setuptools"]["packages"]
    for name in packages:
        package = importlib.import_module(name)
        for module in pkgutil.iter_modules(package.__path__, f"{name}."):
            if not module.ispkg and module.name.rsplit(".", 1)[-1] != "__main__":  # __main__ runs the command
                importlib.import_module(module.name)


def _subclasses(cls: type) -> Iterator[type]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


_import_everything()
ERRORS = sorted({UserError, *_subclasses(UserError)}, key=lambda c: f"{c.__module__}.{c.__qualname__}")


def instance(cls: type[UserError]) -> UserError:
    """One of ``cls``, built through its own ``__init__`` (whatever arguments it takes), with an attribute added."""
    try:
        params = [p for p in inspect.signature(cls).parameters.values() if p.default is p.empty
                  and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    except ValueError:  # no __init__ of its own: an exception's (message)
        params = None
    if params is None:
        err = cls(f"the {cls.__name__} message")
    else:
        err = cls(*[f"{p.name} of {cls.__name__}" for p in params if p.kind != p.KEYWORD_ONLY],
                  **{p.name: f"{p.name} of {cls.__name__}" for p in params if p.kind == p.KEYWORD_ONLY})
    err.detail = {"added": "after construction"}  # raisers may attach attributes: they must come back too
    return err


def same(a: BaseException, b: BaseException) -> None:
    assert type(a) is type(b), (type(a), type(b))
    assert str(a) == str(b) and a.args == b.args
    assert a.__dict__ == b.__dict__


def test_the_walk_finds_the_subclasses_of_every_package():
    names = {c.__qualname__ for c in ERRORS}
    # one from each kind of module (format, writer side, labeler, trainer): the walk reaches them all
    assert {"StorageAccessDenied", "OutputClaimed", "OutputError", "RowError", "NothingToLabel",
            "TrainingDiverged"} <= names, names


@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: c.__qualname__)
def test_every_user_error_round_trips_through_pickle(cls):
    err = instance(cls)
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        same(pickle.loads(pickle.dumps(err, protocol)), err)


def test_every_user_error_raised_in_a_ray_task_comes_back_as_itself_and_one_line(ray_local, capsys):
    from softlabels.labeler.pipeline import _get

    class Raiser:  # nested: Ray ships it by value (tests/ is not on the workers' path); one process for all
        def raise_it(self, err: BaseException) -> None:
            raise err

    raiser = ray_local.remote(num_cpus=0.1, max_restarts=0)(Raiser).remote()
    sent = [instance(cls) for cls in ERRORS]
    refs = [raiser.raise_it.remote(err) for err in sent]
    for err, ref in zip(sent, refs):
        with pytest.raises(UserError) as got:
            _get(ray_local, ref, "unit")  # how the labeler's driver collects a worker's result
        same(got.value, err)

        def fail(e: BaseException = got.value) -> int:
            raise e

        assert run_main(fail, False, "softlabels label") == 2
        # Ray relays its workers' output to this stderr too: the command's own line is checked
        assert f"softlabels label: error: {err}" in capsys.readouterr().err.splitlines()


# -- what a resume reads back ------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(label_set, tmp_path_factory) -> Path:
    """A finished conversion of the session's label set (fp16): commit indexes, the last block's markers."""
    out = tmp_path_factory.mktemp("converted") / "set"
    code, _, err = cli_in_process("convert", label_set, "--output", str(out), "--encoding", "fp16")
    assert code == 0, err[-3000:]
    return out


def interrupted(converted: Path, tmp_path: Path) -> Path:
    """A copy of the conversion as a run stopped before publishing leaves it (all units committed)."""
    out = tmp_path / "out"
    shutil.copytree(converted, out)
    (out / "manifest.json").unlink()
    return out


def convert_again(label_set: str, out: Path, *flags: str) -> tuple[int, str, str]:
    return cli_in_process("convert", label_set, "--output", str(out), "--encoding", "fp16", "--json", *flags)


def garble(path: Path, how: str) -> None:
    if how == "a directory":
        path.unlink()
        path.mkdir()
        (path / "left-here").write_text("")
    else:
        path.write_bytes(how.encode())


RUN_RECORDS = {"{\"encoding\": ": "is not JSON (Expecting value", "[1, 2]": "holds a JSON list, not an object",
               "a directory": "is a directory, not a file"}


@pytest.mark.parametrize("how", RUN_RECORDS)
def test_a_run_record_that_cannot_be_read_is_refused_naming_it(how, converted, label_set, tmp_path):
    out = interrupted(converted, tmp_path)
    garble(out / "_convert" / "run.json", how)
    code, _, err = convert_again(label_set, out)
    assert_one_line_error(code, err, "convert", f"its run record {out}/_convert/run.json {RUN_RECORDS[how]}",
                          "--overwrite")
    assert (out / "_claim").is_dir() and not (out / "manifest.json").exists()
    if how == "a directory":  # the way out the message gives
        code, _, err = convert_again(label_set, out, "--overwrite")
        assert code == 0, err[-3000:]


def test_the_labelers_run_record_that_cannot_be_read_is_refused_naming_it(ray_local, tiny_teacher, tmp_path):
    out = tmp_path / "out"
    (out / "_labeler").mkdir(parents=True)
    (out / "_labeler" / "run.json").write_text('{"teacher": ')
    code, _, err = cli_in_process("label", "--teacher", tiny_teacher, "--corpus", "pydoc", "--limit", "4",
                                  "--max-length", "64", "--output", str(out))
    assert_one_line_error(code, err, "label", f"its run record {out}/_labeler/run.json is not JSON")


def test_markers_and_indexes_that_do_not_check_out_cost_only_their_units(converted, label_set, tmp_path):
    out = interrupted(converted, tmp_path)
    markers = sorted((out / "_commits").glob("part-*.json"))
    indexes = sorted((out / "_commits" / "index").glob("*.json"))
    assert markers and len(indexes) >= 2, (markers, indexes)
    # a marker whose input digest is a number, not a string (once read as "the corpus changed")
    marker = json.loads(markers[0].read_text())
    markers[0].write_text(json.dumps({**marker, "inputs": 5}))
    index = json.loads(indexes[0].read_text())
    indexes[0].write_text(json.dumps({**index, "commits": [{**index["commits"][0], "trained": "all"}]}))
    indexes[1].write_text("[")
    code, out_json, err = convert_again(label_set, out)
    assert code == 0, err[-3000:]
    summary = json.loads(out_json.strip().splitlines()[-1])
    second = json.loads((converted / "_commits" / "index" / indexes[1].name).read_text())
    redone = 1 + len(index["commits"]) + len(second["commits"])
    assert summary["shards"] - summary["resumed"] == redone, summary
    ls = open_label_set(str(out))  # published, and every shard reads back against its checksum
    assert sum(len(ls.read_shard(s)) for s in ls.shards) == ls.manifest.totals.sequences


@pytest.mark.parametrize("what", ["commit marker", "commit index", "shard"])
def test_a_directory_in_place_of_a_marker_an_index_or_a_shard_is_refused_naming_it(what, converted, label_set,
                                                                                   tmp_path):
    out = interrupted(converted, tmp_path)
    marker = sorted((out / "_commits").glob("part-*.json"))[0]
    path = {"commit marker": marker, "commit index": sorted((out / "_commits" / "index").glob("*.json"))[0],
            "shard": out / "shards" / f"{marker.stem}.parquet"}[what]
    garble(path, "a directory")
    code, _, err = convert_again(label_set, out)
    assert_one_line_error(code, err, "convert", f"{what} {path} is a directory, not a file", "remove it")
