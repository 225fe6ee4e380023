"""Shared fixtures: a real S3 server (SeaweedFS), a local Ray, tiny and real teachers.

The S3 credentials and endpoint are set in the environment at import time,
before Ray starts, so Ray workers inherit them like a user's would.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

# Each pytest-xdist worker (make test runs two) has its own S3 server, on ports 20 apart (SeaweedFS's other
# ports move with it), and its own local Ray; gw0, or a run without xdist, has the defaults.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
S3_PORT = 8333 + 20 * (int(_WORKER[2:]) if _WORKER[2:].isdigit() else 0)
# Distinctive credentials (the server enforces them): tests/test_security.py scans every file
# the tools write for these strings.
ACCESS_KEY = "SLCANARYAKIA7Q2XW9ZK"
SECRET_KEY = "sl-canary-secret-5d1e9b7f3a0c"
os.environ.update(
    AWS_ACCESS_KEY_ID=ACCESS_KEY,
    AWS_SECRET_ACCESS_KEY=SECRET_KEY,
    AWS_DEFAULT_REGION="us-east-1",
    AWS_ENDPOINT_URL=f"http://127.0.0.1:{S3_PORT}",
    RAY_AUTH_MODE="disabled",
    RAY_USAGE_STATS_ENABLED="0",
    TOKENIZERS_PARALLELISM="false",
    HF_HUB_OFFLINE="1",
    # Commit indexes of 4 units (the default is 1,000): every labeler and convert run in the tests
    # gathers markers into indexes and resumes from them.
    SOFTLABELS_INDEX_UNITS="4",
    # Teacher replicas stay loaded between the labeler runs of a test process (each would otherwise start a
    # replica and load its teacher: seconds), two teachers' worth (the tiny test teacher and the built-in one);
    # processes the tests start run once and exit, as users' do.
    SOFTLABELS_KEEP_TEACHERS="2",
)
# The test process trains in process as `softlabels train` does in its own: large freed buffers kept.
from softlabels.common.malloc import keep_freed_memory  # noqa: E402

keep_freed_memory()
BUCKET = "softlabels-test"
REPO = Path(__file__).resolve().parents[1]


# -- two tiers: `make test-fast` (-m "not slow") and `make test` (everything) -------------------------------
# The fast tier starts no S3 server, no built-in teacher and no process of its own, and shares one local Ray
# (the `ray_local` fixture, started once) and one label set (`label_set`) among its tests. Tests that need
# the S3 server or the built-in teacher are marked slow here, by their fixtures; tests that start processes
# of their own, start Ray themselves, or take more than a couple of seconds carry @pytest.mark.slow. Under
# -m "not slow", starting Ray outside `ray_local`, or a `softlabels` process, fails the test, naming the
# marker it needs.
SLOW_FIXTURES = {"seaweed", "builtin_teacher"}  # and every fixture that uses one (s3_server, storage_root[s3])
FAST_ENV = "SOFTLABELS_TEST_FAST"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: needs the S3 server, the built-in teacher, a process or a Ray of its "
                            "own, or takes more than a couple of seconds; left out of `make test-fast`")
    if "not slow" in (config.option.markexpr or ""):
        os.environ[FAST_ENV] = "1"


def pytest_collection_modifyitems(config, items):
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or params.get("storage_root") == "s3":
            item.add_marker(pytest.mark.slow)


def _refuse_in_fast_tier(what: str) -> None:
    if os.environ.get(FAST_ENV):
        pytest.fail(f"this test {what}: mark it @pytest.mark.slow (make test-fast leaves such tests out)",
                    pytrace=False)


_ray_init = None  # the real ray.init while the fast tier's guard is on


@pytest.fixture(scope="session", autouse=True)
def _fast_tier_guard():
    """Under -m "not slow": a test that starts a Ray of its own fails at once, saying which marker it needs."""
    global _ray_init
    if not os.environ.get(FAST_ENV):
        yield
        return
    import ray

    _ray_init = ray.init
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ray, "init", lambda *a, **k: _refuse_in_fast_tier("starts a Ray of its own"))
        yield


def _bench_common():
    """bench/common.py (not a package: loaded by path), whose SeaweedFS server the tests share."""
    spec = importlib.util.spec_from_file_location("softlabels_bench_common", REPO / "bench" / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    """The tests' S3 server (port 8333, or 20 more per xdist worker; credentials enforced), restartable on its
    data: bench/common's."""
    try:
        server = _bench_common().SeaweedServer(tmp_path_factory.mktemp("seaweed"), BUCKET, S3_PORT)
        server.start()
    except RuntimeError as e:  # no weed binary, port taken, did not start: a failure that says why
        pytest.fail(str(e))
    yield server
    server.stop(grace=0)  # its data is the session's temporary files: no need to wait for a clean stop


@pytest.fixture(scope="session")
def s3_server(seaweed) -> str:
    """The real S3 server's test bucket, as an ``s3://`` URL."""
    return f"s3://{BUCKET}"


@pytest.fixture(params=["local", "s3"])
def storage_root(request, tmp_path):
    """A fresh, empty location on local disk and on the real S3 server."""
    if request.param == "local":
        return str(tmp_path / "store")
    bucket = request.getfixturevalue("s3_server")
    return f"{bucket}/{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray with 2 CPUs, shared by the labeler tests."""
    import ray

    if not ray.is_initialized():
        # address="local": never join a cluster that a stale /tmp/ray/ray_current_cluster names
        (_ray_init or ray.init)(address="local", num_cpus=2, include_dashboard=False,
                                object_store_memory=300 * 1024**2, configure_logging=False)
    yield ray
    from softlabels.labeler.replicas import release_kept

    release_kept(ray)  # the kept teachers (SOFTLABELS_KEEP_TEACHERS): killed, not drained
    ray.shutdown()


def _tiny_tokenizer(path: Path):
    """A small real tokenizer (byte-level BPE trained on pydoc text, every byte in its alphabet, so it
    reproduces any text as real tokenizers do): fast and offline."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([topics[k] for k in sorted(topics)][:20], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>")
    fast.save_pretrained(path)
    return fast


def bpe_tokenizer(path: Path, lo: int, hi: int, vocab: int = 500) -> str:
    """A byte-level BPE tokenizer trained on pydoc topics ``lo:hi`` (another vocabulary than the teacher's), saved at ``path``."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([topics[k] for k in sorted(topics)][lo:hi], trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>", "<pad>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if path.exists():
        shutil.rmtree(path)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>").save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> str:
    """A tiny random Llama teacher with its own small tokenizer, as a local HF directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-teacher")
    tok = _tiny_tokenizer(path)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    # Sharper-than-random logits so top-k and tail masses are non-trivial.
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def label_set(ray_local, tiny_teacher, tmp_path_factory) -> str:
    """A small label set made by the real labeler with the tiny teacher (k = 8, several shards)."""
    from softlabels.labeler.config import LabelConfig
    from softlabels.labeler.job import run

    out = str(tmp_path_factory.mktemp("labels") / "set")
    run(LabelConfig(teacher=tiny_teacher, corpus="pydoc", output=out, top_k=8, max_length=64, limit=200,
                    shard_tokens=1000, batch_tokens=1024))
    return out


@pytest.fixture(scope="session")
def builtin_teacher() -> str:
    """The real built-in teacher (SmolLM2-135M), fetched and converted once per cache."""
    from softlabels.labeler.builtin import builtin_teacher_dir

    return str(builtin_teacher_dir("smollm2-135m"))


def run_cli(
    *args: str, check: bool = True, timeout: float = 600, env: dict[str, str] | None = None, umask: int | None = None,
) -> subprocess.CompletedProcess:
    """Run ``python -m softlabels args`` like a user would (``env`` adds variables); returns the completed process."""
    _refuse_in_fast_tier("starts a softlabels process")
    proc = subprocess.run(
        [sys.executable, "-m", "softlabels", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
        env={**os.environ, **(env or {})}, umask=-1 if umask is None else umask,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"softlabels {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def cli_in_process(*args: str) -> tuple[int, str, str]:
    """Run ``softlabels args`` inside this process (no interpreter start-up); returns (code, stdout, stderr).

    For refusals, which end before any Ray or teacher work: the same ``main``
    a user's command runs, minus the seconds of importing torch again.
    """
    import contextlib
    import io

    from softlabels.cli import main

    out, err = io.StringIO(), io.StringIO()
    sigterm = signal.getsignal(signal.SIGTERM)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse
            code = e.code
        finally:
            signal.signal(signal.SIGTERM, sigterm)
    return code, out.getvalue(), err.getvalue()


def assert_one_line_error(code: int, stderr: str, command: str, *fragments: str) -> str:
    """Exit code 2, no traceback, and a last line ``softlabels COMMAND: error: ...`` holding every fragment."""
    assert code == 2, (code, stderr[-3000:])
    assert "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"softlabels {command}: error:"), last
    for f in fragments:
        assert f in last, (f, last)
    print(f"refused: {last}")  # shown with -s / -rP: the messages docs/reliability.md quotes
    return last
