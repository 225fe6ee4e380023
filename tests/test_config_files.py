"""``--config`` files are typed like flags: every setting is checked for its type before the config is built.

A file's value is held to what its flag would give: ``trust_remote_code: "false"`` (a string, and a
non-empty string is true) is refused, ``lr: 1e-3`` (text to YAML 1.1) is the number ``--lr 1e-3``
is. The loader is bounded: size, nesting, aliases expanded. Cheap: no Ray, no teacher, no label set.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
import yaml

from conftest import REPO, assert_one_line_error, cli_in_process
from softlabels.cli import build_parser
from softlabels.common.cli import given_flags
from softlabels.common.settings import check_file_value, load_yaml_settings, resolve_settings
from softlabels.labeler.config import LabelConfig
from softlabels.schemas.errors import UserError
from softlabels.trainer.config import TrainConfig

REQUIRED = {LabelConfig: {"output": "out"}, TrainConfig: {"labels": "set", "output": "out"}}
COMMAND = {LabelConfig: "label", TrainConfig: "train"}


def fields_where(test: typing.Callable[[typing.Any], bool]) -> list[tuple[type, str]]:
    """(class, field) for every field of both config classes whose annotation passes ``test``."""
    return [(cls, f.name) for cls in REQUIRED for f in dataclasses.fields(cls)
            if test(typing.get_type_hints(cls)[f.name])]


def without_none(hint: typing.Any) -> typing.Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if len(args) == 1 and type(None) in typing.get_args(hint) else hint


BOOL_FIELDS = fields_where(lambda h: without_none(h) is bool)
INT_FIELDS = fields_where(lambda h: without_none(h) is int)
FLOAT_FIELDS = fields_where(lambda h: without_none(h) is float)
ALL_FIELDS = fields_where(lambda h: True)


def ids(cases: list[tuple[type, str]]) -> list[str]:
    return [f"{COMMAND[cls]}-{name}" for cls, name in cases]


def resolve(cls: type, tmp_path: Path, text: str, flags: tuple[str, ...] = ()) -> typing.Any:
    """The config ``softlabels label|train --config FILE *flags`` would run with (the required settings added)."""
    conf = tmp_path / "job.yaml"
    conf.write_text("".join(f"{k}: {v}\n" for k, v in REQUIRED[cls].items()) + text)
    args = build_parser().parse_args([COMMAND[cls], "--config", str(conf), *flags])
    return resolve_settings(cls, args.config, given_flags(args), required=tuple(REQUIRED[cls]))


def refusal(cls: type, tmp_path: Path, text: str) -> str:
    """The one-line message refusing a file with the required settings and ``text``."""
    with pytest.raises(UserError) as e:
        resolve(cls, tmp_path, text)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 300, msg[:3000]
    return msg


def test_the_field_lists_are_not_empty():
    """The parametrized tests below run over these: an annotation style they miss would leave them empty."""
    assert {"trust_remote_code", "overwrite", "store_spans", "resume", "fsdp"} <= {n for _, n in BOOL_FIELDS}
    assert {"top_k", "limit", "steps", "eval_batches"} <= {n for _, n in INT_FIELDS}
    assert {"lr", "clip", "temperature"} <= {n for _, n in FLOAT_FIELDS}


@pytest.mark.parametrize("cls,name", BOOL_FIELDS, ids=ids(BOOL_FIELDS))
def test_a_quoted_false_is_refused_for_every_boolean(cls, name, tmp_path):
    msg = refusal(cls, tmp_path, f'{name}: "false"\n')
    assert msg.startswith(f"config file {tmp_path / 'job.yaml'}: setting {name} must be true")
    assert "got a string ('false')" in msg
    assert "got a string ('no')" in refusal(cls, tmp_path, f"{name}: 'no'\n")
    assert "got an integer (0)" in refusal(cls, tmp_path, f"{name}: 0\n")
    # YAML's own booleans still work, and a flag overrides the file
    assert getattr(resolve(cls, tmp_path, f"{name}: false\n"), name) is False
    assert getattr(resolve(cls, tmp_path, f"{name}: true\n"), name) is True
    flag = "--" + name.replace("_", "-")
    assert getattr(resolve(cls, tmp_path, f"{name}: true\n", (f"--no-{flag[2:]}",)), name) is False
    assert getattr(resolve(cls, tmp_path, f"{name}: false\n", (flag,)), name) is True


def test_a_quoted_false_never_reaches_the_student(tmp_path):
    """The probe's case as a user meets it: ``softlabels train --config`` with trust_remote_code: "false"."""
    conf = tmp_path / "job.yaml"
    conf.write_text("labels: s\noutput: o\ntrust_remote_code: 'false'\n")
    code, _, err = cli_in_process("train", "--config", str(conf))
    assert_one_line_error(code, err, "train", "setting trust_remote_code must be true or false, got a string ('false')")


def test_overwrite_no_in_quotes_is_refused_before_any_work(tmp_path):
    """``overwrite: "no"`` was true: the label set at the output was deleted. Now nothing there is touched."""
    out = tmp_path / "set"
    (out / "shards").mkdir(parents=True)
    (out / "manifest.json").write_text("{}")
    (out / "shards" / "keep.parquet").write_bytes(b"mine")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    conf = tmp_path / "job.yaml"
    conf.write_text(f"output: {out}\nteacher: {tmp_path / 'no-teacher'}\noverwrite: \"no\"\n")
    code, _, err = cli_in_process("label", "--config", str(conf))
    assert_one_line_error(code, err, "label", f"config file {conf}: setting overwrite must be true or false, "
                                              "got a string ('no')")
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert (out / "shards" / "keep.parquet").read_bytes() == b"mine"


def test_a_list_where_a_name_goes_is_one_line(tmp_path):
    conf = tmp_path / "job.yaml"
    conf.write_text("labels: s\noutput: o\nstudent: [tiny]\n")
    code, _, err = cli_in_process("train", "--config", str(conf))
    assert_one_line_error(code, err, "train", "setting student must be a string, got a list (['tiny'])")


@pytest.mark.parametrize("cls,name", FLOAT_FIELDS, ids=ids(FLOAT_FIELDS))
def test_numbers_read_as_their_flags_do(cls, name, tmp_path):
    """``lr: 1e-3`` is text to YAML 1.1; the file gives the float the flag ``--lr 1e-3`` gives."""
    flag = "--" + name.replace("_", "-")
    from_flag = getattr(resolve(cls, tmp_path, "", (flag, "1e-3")), name)
    for spelling in ("1e-3", "'1e-3'", "0.001", "1.0e-3"):
        value = getattr(resolve(cls, tmp_path, f"{name}: {spelling}\n"), name)
        assert value == from_flag == 0.001 and type(value) is float, (spelling, value)
    one = check_file_value(name, 1, typing.get_type_hints(cls)[name], "f")  # an int is a number, made a float
    assert one == 1.0 and type(one) is float
    assert "got a boolean (true)" in refusal(cls, tmp_path, f"{name}: true\n")
    assert re.search(rf"setting {name} must be a number( or null)?, got a string \('fast'\)", refusal(cls, tmp_path, f"{name}: fast\n"))


@pytest.mark.parametrize("cls,name", INT_FIELDS, ids=ids(INT_FIELDS))
def test_an_integer_setting_refuses_floats_and_booleans(cls, name, tmp_path):
    assert f"setting {name} must be an integer" in refusal(cls, tmp_path, f"{name}: 2.0\n")
    assert "got a number (2.0)" in refusal(cls, tmp_path, f"{name}: 2.0\n")
    assert "got a boolean (true)" in refusal(cls, tmp_path, f"{name}: true\n")
    assert "got a string ('1e3')" in refusal(cls, tmp_path, f"{name}: 1e3\n")  # as --flag 1e3 is refused
    assert "is out of range" in refusal(cls, tmp_path, f"{name}: 0x{'f' * 20}\n")


def test_integers_read_as_their_flags_do(tmp_path):
    """Text that int() reads is taken, as ``--seed 0123`` is: 123, not YAML 1.1's octal 83."""
    from_flag = resolve(TrainConfig, tmp_path, "", ("--seed", "0123")).seed
    assert resolve(TrainConfig, tmp_path, "seed: 0123\n").seed == 123 == from_flag
    assert resolve(TrainConfig, tmp_path, "seed: '7'\n").seed == 7
    assert resolve(LabelConfig, tmp_path, "top_k: 1_000\n").top_k == 1000
    assert "got a string ('1:30')" in refusal(TrainConfig, tmp_path, "steps: 1:30\n")  # no base-60 either


def test_dates_are_text(tmp_path):
    """YAML 1.1 reads 2024-07-26 as a date; chat_date takes it as the text --chat-date 2024-07-26 gives."""
    assert resolve(LabelConfig, tmp_path, "chat_date: 2024-07-26\n").chat_date == "2024-07-26"
    assert resolve(LabelConfig, tmp_path, "revision: 2024-07-26\n").revision == "2024-07-26"


def test_strings_are_not_numbers_or_booleans(tmp_path):
    msg = refusal(LabelConfig, tmp_path, "revision: 1234\n")
    assert msg.endswith("setting revision must be a string or null, got an integer (1234); quote it to mean the text")
    assert "setting teacher must be a string, got a boolean (true)" in refusal(LabelConfig, tmp_path, "teacher: yes\n")
    assert "setting corpus must be a string, got null" in refusal(LabelConfig, tmp_path, "corpus:\n")
    assert resolve(LabelConfig, tmp_path, "revision: null\n").revision is None


def test_lists_of_names(tmp_path):
    assert resolve(TrainConfig, tmp_path, "allow_changed: lr\n").allow_changed == ("lr",)
    assert resolve(TrainConfig, tmp_path, "allow_changed: [lr, clip]\n").allow_changed == ("lr", "clip")
    assert resolve(TrainConfig, tmp_path, "report_to: none\n").report_to == ()
    msg = refusal(TrainConfig, tmp_path, "report_to: [3]\n")
    assert msg.endswith("setting report_to must be a string or a list of strings, got a list holding an integer (3)")
    assert "got a mapping ({'a': 1})" in refusal(TrainConfig, tmp_path, "allow_changed: {a: 1}\n")


def test_storage_options(tmp_path):
    cfg = resolve(LabelConfig, tmp_path, "storage_options: {anon: false, client_kwargs: {region_name: x}}\n",
                  ("--storage-option", "key=k"))
    assert cfg.storage_options == {"anon": False, "client_kwargs": {"region_name": "x"}, "key": "k"}
    msg = refusal(LabelConfig, tmp_path, "storage_options: [anon]\n")
    assert msg.endswith("setting storage_options must be a mapping of names to values, got a list")
    assert "anon" not in msg
    msg = refusal(LabelConfig, tmp_path, "storage_options: {secret: !!binary c2VjcmV0LXZhbHVl}\n")
    assert msg.endswith("setting storage_options.secret must be text, a number, true/false, null, a list or a "
                        "mapping, got binary data (!!binary)")
    assert "c2Vj" not in msg and "secret-value" not in msg  # a storage option may be a secret: never shown
    assert "must have string keys" in refusal(LabelConfig, tmp_path, "storage_options: {1: a}\n")


def _choices() -> list[tuple[type, str, tuple[str, ...]]]:
    """(class, setting, choices) for every flag of ``label`` and ``train`` that has ``choices=``."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    out = []
    for cls in REQUIRED:
        names = {f.name for f in dataclasses.fields(cls)}
        for action in sub.choices[COMMAND[cls]]._actions:
            if action.choices is not None and action.dest in names:
                out.append((cls, action.dest, tuple(action.choices)))
    return out


CHOICES = _choices()


def test_the_choice_flags_are_found():
    assert {"format", "train_on", "on_error", "dtype", "token_map", "precision", "loss", "allow_changed"} <= {
        n for _, n, _ in CHOICES}


@pytest.mark.parametrize("cls,name,choices", CHOICES, ids=[f"{COMMAND[c]}-{n}" for c, n, _ in CHOICES])
def test_settings_with_choices_take_exactly_the_flags_choices(cls, name, choices, tmp_path):
    for choice in choices:
        value = getattr(resolve(cls, tmp_path, f"{name}: {choice}\n"), name)
        assert value in (choice, (choice,)), (choice, value)
    msg = refusal(cls, tmp_path, f"{name}: not-a-choice\n")
    assert name in msg.replace("-", "_") and "not-a-choice" in msg, msg
    # the 1 MB value is described, not printed
    msg = refusal(cls, tmp_path, f"{name}: {'x' * (1 << 19)}\n")
    assert name in msg.replace("-", "_") and "xxxx" in msg, msg


def test_a_huge_value_is_never_printed_whole(tmp_path):
    assert len(refusal(LabelConfig, tmp_path, f"format: {'x' * 1_000_000}\n")) < 300
    assert len(refusal(LabelConfig, tmp_path, f"encoding: {'x' * 1_000_000}\n")) < 300
    assert len(refusal(LabelConfig, tmp_path, f"chat_date: {'x' * 1_000_000}\n")) < 300
    assert len(refusal(LabelConfig, tmp_path, f"teacher: [{', '.join(['a' * 1000] * 500)}]\n")) < 300
    assert len(refusal(TrainConfig, tmp_path, f"report_to: [{', '.join(f'n{i}' for i in range(20_000))}]\n")) < 300
    conf = tmp_path / "key.yaml"
    conf.write_text(f"? {'k' * 1_000_000}\n: 1\n")  # an explicit key: no length limit
    with pytest.raises(UserError, match=r"unknown setting 'k{10,40}\.\.\.k{10,40}' \(known: ") as e:
        load_yaml_settings(str(conf), LabelConfig)
    assert len(str(e.value)) < 1000  # the known settings' names are listed


def test_the_shape_of_a_file(tmp_path):
    conf = tmp_path / "job.yaml"
    assert _file_refusal(conf, "- a\n- b\n").endswith("expected a mapping of settings (name: value), got a list")
    assert _file_refusal(conf, "just text\n").endswith("got a string")
    assert _file_refusal(conf, "1: 2\n").endswith("setting names must be strings, got an integer (1)")
    assert _file_refusal(conf, "top_k: 1\ntop-k: 2\n").endswith("setting top_k is given twice")
    assert _file_refusal(conf, "top_k: 1\ntop_k: 2\n").endswith("setting top_k is given twice")
    assert "not valid YAML (expected a single document" in _file_refusal(conf, "top_k: 1\n---\ntop_k: 2\n")
    assert "not valid YAML" in _file_refusal(conf, "top_k: [\n")
    assert "an integer of 5000 characters" in _file_refusal(conf, f"top_k: {'9' * 5000}\n")
    conf.write_bytes(b"top_k: \xff\n")
    with pytest.raises(UserError, match="not UTF-8 text"):
        load_yaml_settings(str(conf), LabelConfig)
    conf.write_text("# nothing set\n")
    assert load_yaml_settings(str(conf), LabelConfig) == {}


def _file_refusal(conf: Path, text: str) -> str:
    conf.write_text(text)
    with pytest.raises(UserError) as e:
        load_yaml_settings(str(conf), LabelConfig)
    msg = str(e.value)
    assert msg.startswith(f"config file {conf}: ") and "\n" not in msg and len(msg) < 300, msg[:3000]
    return msg


def test_a_file_past_1_mib_is_refused_unread(tmp_path):
    conf = tmp_path / "job.yaml"
    conf.write_text("# padding\n" * 110_000)
    assert _file_refusal(conf, conf.read_text()).endswith("larger than 1 MiB; a file of settings is a few hundred bytes")


def test_nesting_and_self_reference_are_bounded(tmp_path):
    conf = tmp_path / "job.yaml"
    assert _file_refusal(conf, f"storage_options: {{a: {'[' * 40}{']' * 40}}}\n").endswith("nested deeper than 32 levels")
    assert "alias *a is inside the value it names" in _file_refusal(conf, "teacher: &a [*a]\n")


def test_aliases_within_bounds_still_work(tmp_path):
    cfg = resolve(LabelConfig, tmp_path, "teacher: &t ./models/t\nchat_template: *t\n")
    assert cfg.teacher == cfg.chat_template == "./models/t"


# 9^9 'lol's from 414 bytes, all inside one setting (teacher), whose value the refusal used to print
BILLION_LAUGHS = "teacher:\n  - &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"  - &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8))


def test_billion_laughs_is_refused_at_once_in_bounded_memory(tmp_path):
    """9^9 'lol's from a few hundred bytes: refused before the value is built, walked or printed; 1 GiB of address space
    is plenty (expanding it took 5 GiB and printed 2 GB)."""
    conf = tmp_path / "lol.yaml"
    conf.write_text(BILLION_LAUGHS)
    assert len(conf.read_bytes()) < 1000
    script = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30)); "
              "from softlabels.cli import main; sys.exit(main(sys.argv[1:]))")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script, "label", "--config", str(conf), "--output", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert time.monotonic() - started < 60
    assert_one_line_error(proc.returncode, proc.stderr, "label",
                          f"config file {conf}: holds more than 100,000 values or 1 MiB of text once its aliases")
    assert len(proc.stderr) < 300 and not (tmp_path / "o").exists()


def test_every_default_written_in_a_file_reads_back_as_the_default(tmp_path):
    """Each setting has a file rule (a new type would raise TypeError here), and the defaults pass it unchanged."""
    for cls in REQUIRED:
        defaults = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
                    for f in dataclasses.fields(cls)}
        written = {k: list(v) if isinstance(v, tuple) else v for k, v in {**defaults, **REQUIRED[cls]}.items()}
        conf = tmp_path / f"{COMMAND[cls]}.yaml"
        conf.write_text(yaml.safe_dump(written))
        cfg = resolve_settings(cls, str(conf), {})
        assert dataclasses.asdict(cfg) == dataclasses.asdict(cls(**REQUIRED[cls]))
