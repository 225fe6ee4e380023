"""The elastic data order: any number of readers on any number of shards; resumes on another world size."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest

from softlabels.trainer.data import LabelDataset, StatefulLoader, merge_states
from softlabels.trainer.order import DataState, drop, split

from conftest import REPO, cli_in_process

SEED, EVAL = 5, 0.1


def train_keys(url) -> Counter:
    """Every training sample of the set once, read directly (no order, no readers)."""
    return Counter(int(s["sample_key"]) for s in LabelDataset(url, split="train", eval_fraction=EVAL, shuffle=False))


def ranks(url, world, workers, state=None, batch=3):
    out = []
    for r in range(world):
        ds = LabelDataset(url, split="train", eval_fraction=EVAL, seed=SEED, epochs=None, rank_world=(r, world))
        ld = StatefulLoader(ds, batch_size=batch, num_workers=workers)
        if state is not None:
            ld.load_state_dict(json.loads(json.dumps(state)))  # as it comes back from a checkpoint
        out.append(ld)
    return out


def steps(loaders, n) -> list[list[tuple[int, int]]]:
    """``n`` steps of every rank: per rank, the (epoch, sample key) of each sample in order."""
    seen: list[list[tuple[int, int]]] = [[] for _ in loaders]
    for _ in range(n):
        for r, ld in enumerate(loaders):
            b = next(ld)
            seen[r] += [(int(e), int(k)) for e, k in zip(b["position"][:, 2], b["sample_key"])]
    return seen


def epoch_done(loaders) -> bool:
    """Every slot of every rank has gone past epoch 0 (a loader moves only its own rank's slots)."""
    own = [ld.state.progress[ld.rank * ld.workers + w] for ld in loaders for w in range(ld.workers)]
    return all(e >= 1 for e, _ in own)


def test_spans_split_and_drop_keep_every_row_once():
    spans = [(0, 5), (9, 12), (20, 21)]
    rows = [i for a, b in spans for i in range(a, b)]
    for parts in (1, 2, 3, 7, 12):
        shares = split(spans, parts)
        assert [i for s in shares for a, b in s for i in range(a, b)] == rows
        assert max(map(len, ([i for a, b in s for i in range(a, b)] for s in shares))) - \
            min(map(len, ([i for a, b in s for i in range(a, b)] for s in shares))) <= 1
    assert [i for a, b in drop(spans, 6) for i in range(a, b)] == rows[6:]
    # collapsing a ragged state: what no slot consumed, dealt again to another number of slots
    state = DataState(2, [(0, 4), (1, 2)], {}, [0, 0])
    new = state.collapse(3, lambda e: 10)  # slot 0 has rows 0-3 of its 0-4 left; slot 1 is 2 rows into epoch 1
    got = [(e, i) for e in (0, 1) for s in range(3) for a, b in new.deals[e][s] for i in range(a, b)]
    # epoch 0: slot 0's row 4 (slot 1 finished its 5-9); epoch 1: slot 0's whole share 0-4, slot 1's 7-9
    want = [(0, 4)] + [(1, i) for i in range(0, 5)] + [(1, i) for i in range(7, 10)]
    assert got == want and new.progress == [(0, 0)] * 3


@pytest.mark.slow
@pytest.mark.parametrize("chain", [[(1, 0)], [(3, 1)], [(4, 0), (1, 0)]])
def test_resume_on_another_world_size_reads_every_sample_once(label_set, chain):
    """2 ranks x 2 workers for 3 steps, then the ranks x workers of ``chain`` in turn (2 steps each, the last to
    the end of the epoch; 4 x 0 has as many reader slots as 2 x 2, split otherwise): epoch 0 holds every
    training sample exactly once, like a straight run's; nothing of epoch 1 repeats."""
    first = ranks(label_set, 2, 2)
    seen = steps(first, 3)
    state = merge_states([ld.state_dict() for ld in first])
    assert all(e == 0 for e, _ in DataState.from_dict(state).progress)  # mid-epoch
    for world, workers in chain[:-1]:
        middle = ranks(label_set, world, workers, state=state)
        seen += steps(middle, 2)
        state = merge_states([ld.state_dict() for ld in middle])
    later = ranks(label_set, *chain[-1], state=state)
    while not epoch_done(later):
        seen += steps(later, 1)
    flat = [x for r in seen for x in r]
    assert Counter(k for e, k in flat if e == 0) == train_keys(label_set)
    assert max(Counter(k for e, k in flat if e == 1).values()) == 1


@pytest.mark.slow
def test_resume_on_the_same_world_size_continues_every_rank_exactly(label_set):
    straight = steps(ranks(label_set, 2, 2), 6)
    first = ranks(label_set, 2, 2)
    head = steps(first, 2)
    state = merge_states([ld.state_dict() for ld in first])
    tail = steps(ranks(label_set, 2, 2, state=state), 4)
    assert [h + t for h, t in zip(head, tail)] == straight


def subset(src, dst, n) -> str:
    """The first ``n`` shards of a label set as a label set of its own."""
    import shutil

    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    m["shards"] = m["shards"][:n]
    for key in ("sequences", "tokens", "bytes", "trained"):
        m["totals"][key] = sum(s["rows" if key == "sequences" else key] for s in m["shards"])
    (dst / "manifest.json").write_text(json.dumps(m))
    return str(dst)


@pytest.mark.slow
def test_torchrun_4_ranks_x_2_workers_on_3_shards_then_resume_on_1_rank(label_set, tmp_path):
    """More readers than shards: no hang, every rank in step (equal weights); killed mid-epoch at a
    checkpoint and resumed on one rank, epoch 0 holds every training sample once."""
    small = subset(label_set, tmp_path / "three", 3)
    out = tmp_path / "run"
    args = ["train", "--labels", small, "--output", str(out), "--batch-size", "2", "--eval-fraction", str(EVAL),
            "--eval-batches", "1", "--log-samples", "--checkpoint-every", "2", "--seed", str(SEED), "--json"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-port", "29517",
           "-m", "softlabels", *args, "--steps", "2", "--num-workers", "2"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    digests = {json.loads((out / f"rank{r}.json").read_text())["params_sha256"] for r in range(4)}
    assert len(digests) == 1
    progress = json.loads((out / "checkpoints" / "step-000002" / "progress.json").read_text())
    assert progress["world"] == 4 and progress["data"]["slots"] == 8
    code, out_, err = cli_in_process(*args, "--steps", "20", "--resume")  # one process, no torchrun: world size 1
    assert code == 0, err[-3000:]
    summary = json.loads(out_.strip().splitlines()[-1])
    assert summary["resumed_from"] == 2
    logged = [tok.split(":") for r in range(4) for tok in (out / f"samples.rank{r}.txt").read_text().split()]
    first_epoch = Counter(int(k) for e, k in logged if e == "0")
    assert first_epoch == train_keys(small)
    assert 4 * 2 * 2 + 18 * 2 == len(logged)  # 2 steps x 4 ranks x 2, then 18 steps x 1 rank x 2
