"""End to end with the real built-in teacher (SmolLM2-135M): label to S3, check, train, eval."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from softlabels.schemas import open_label_set

from conftest import cli_in_process

pytestmark = pytest.mark.slow  # the built-in teacher, the S3 server


def cli(*args: str) -> str:
    """``softlabels args`` in this process (the tests' Ray, no interpreter start-up); its stdout."""
    code, out, err = cli_in_process(*args)
    assert code == 0, err[-3000:]
    return out


def test_builtin_teacher_to_s3_train_and_eval(builtin_teacher, s3_server, ray_local, tmp_path):
    url = f"{s3_server}/e2e"
    out = cli("label", "--teacher", "smollm2-135m", "--corpus", "pydoc", "--output", url,
              "--top-k", "16", "--max-length", "64", "--limit", "12", "--shard-tokens", "300", "--json")
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["sequences"] == 12 and summary["shards"] >= 2

    ls = open_label_set(url)
    assert ls.manifest.tokenizer.vocab_size == 49152 and ls.manifest.teacher.id == "smollm2-135m"
    samples = list(ls.iter_samples())
    assert ls.manifest.label_encoding.name == "compact"  # the default
    # The stored labels equal a direct full-softmax computation of the same model, up to the
    # compact encoding's budget: same id sets, KL(exact k+1 buckets || stored) within max_kl.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(builtin_teacher, dtype=torch.float32).eval()
    for s in samples[:2]:
        with torch.no_grad():
            logits = model(torch.tensor(s.input_ids, dtype=torch.long)[None]).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        top = torch.topk(logp, 16, -1).indices.numpy()
        assert (np.sort(top, 1) == np.sort(s.topk_ids, 1)).all(1).mean() > 0.95  # 16th/17th near-ties may swap
        stored = torch.tensor(s.topk_ids, dtype=torch.long)
        p = torch.cat([logp.gather(-1, stored), torch.logsumexp(logp.scatter(-1, stored, float("-inf")), -1)[:, None]], 1).exp()
        q = torch.cat([torch.tensor(s.topk_logprobs), torch.tensor(s.tail_logprob)[:, None]], 1).double().exp()
        kl = (p * (p.log() - (q / q.sum(1, keepdim=True)).log())).sum(1)
        assert 0 < float(kl.mean()) < 1.5 * ls.manifest.label_encoding.max_kl

    out = tmp_path / "student"
    train = json.loads(cli("train", "--labels", url, "--output", str(out), "--steps", "4",
                           "--batch-size", "4", "--eval-fraction", "0.25", "--json").strip().splitlines()[-1])
    assert train["after"]["kl"] < train["before"]["kl"]
    ev = json.loads(cli("eval", "--labels", url, "--model", str(out), "--eval-fraction", "0.25").strip().splitlines()[-1])
    assert set(ev) >= {"ce", "kl", "top1"} and all(np.isfinite([ev["ce"], ev["kl"], ev["top1"]]))
