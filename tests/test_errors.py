"""Every UserError survives pickling and the trip back from a Ray worker: the user sees its one line.

The subclasses are found by walking ``UserError.__subclasses__()`` after importing every module
of the package, so an error class added later is covered without touching this file.
"""

from __future__ import annotations

import importlib
import inspect
import pickle
import pkgutil
import tomllib
from collections.abc import Iterator

import pytest

from conftest import REPO
from softlabels.common.cli import run_main
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
        params = [p for p in inspect.signature(cls).parameters.values()
                  if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except ValueError:  # no __init__ of its own: an exception's (message)
        params = None
    args = [f"the {cls.__name__} message"] if params is None else [f"{p.name} of {cls.__name__}" for p in params]
    err = cls(*args)
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
