"""The whole path on one device, offline: label text and chat data, then train two-stage students.

What ``bench/gpu.sh`` runs to see the labeler and the trainer work on CUDA (bf16 teacher), on a
machine that cannot download anything: the teacher is a random-weight Llama of a real model's
shape (``--preset``; throughput does not depend on the weights) with a small tokenizer trained
here on the pydoc text, given the ChatML special tokens and template. Steps, each the real CLI:

1. ``softlabels label --corpus pydoc`` (plain text, ``--packing``: block-diagonal attention);
2. ``softlabels label --corpus pydoc-chat`` (assistant tokens only, ``--chat-template``);
3. ``softlabels train`` on 1, then ``softlabels train --init-from`` it on 2 (``--packing``);
4. ``softlabels eval`` of the two-stage student on held-out assistant tokens;
5. ``softlabels label --generate-with teacher``: the teacher writes responses to the chat prompts (HF ``generate``,
   KV cache, ``--max-new-tokens``; random weights rarely stop early) and labels them (issue 31).

Prints each step's summary (tokens/s, trained share, losses) as JSON lines and a table.

    python bench/gpu_pipeline.py --device cuda --preset llama-1b
    python bench/gpu_pipeline.py --device cpu --preset tiny --sequences 16   # smoke test
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def teacher_dir(path: Path, preset: str) -> Path:
    """A random-weight teacher of ``preset``'s shape with a pydoc-trained BPE tokenizer (ChatML tokens)."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([topics[k] for k in sorted(topics)], trainers.BpeTrainer(
        vocab_size=8000, special_tokens=["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"], show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHATML
    assert (fast.bos_token_id, fast.eos_token_id) == (1, 2)  # what common.llama_config sets
    common.random_llama_dir(path, preset, dtype="bfloat16", vocab_size=len(fast))
    fast.save_pretrained(path)
    return path


def cli(*args: str) -> dict:
    t = time.time()
    flag = [] if args[0] == "eval" else ["--json"]  # eval prints JSON anyway
    proc = subprocess.run([sys.executable, "-m", "softlabels", *args, *flag], cwd=common.REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.exit(f"gpu_pipeline: softlabels {' '.join(args[:2])} failed:\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_s"] = round(time.time() - t, 1)
    print(json.dumps({"step": " ".join(args[:3]), **{k: out[k] for k in out if not isinstance(out[k], dict)}}), flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--preset", default="smollm2-135m", choices=sorted(common.LLAMA_PRESETS))
    p.add_argument("--sequences", type=int, default=512, help="text sequences and conversations (default: %(default)s)")
    p.add_argument("--steps", type=int, default=100, help="steps of each training stage (default: %(default)s)")
    p.add_argument("--out", default=None, help="working folder (default: a temporary one)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="response length of step 5 (default: %(default)s)")
    args = p.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="softlabels-gpu-"))
    teacher = str(teacher_dir(out / "teacher", args.preset))
    (out / "chatml.jinja").write_text(CHATML)
    dtype = ["--dtype", "bfloat16"] if args.device.startswith("cuda") else []
    common_label = ["--teacher", teacher, "--device", args.device, *dtype, "--top-k", "64", "--limit",
                    str(args.sequences), "--shard-tokens", "65536", "--batch-tokens", "32768"]
    text = cli("label", "--corpus", "pydoc", "--output", str(out / "text"), "--max-length", "1024", "--packing",
               *common_label)
    chat = cli("label", "--corpus", "pydoc-chat", "--output", str(out / "chat"), "--max-length", "1024",
               "--chat-template", str(out / "chatml.jinja"), *common_label)
    budget = ["--steps", str(args.steps), "--batch-size", "16", "--device", args.device, "--eval-fraction", "0.2",
              "--packing"]
    general = cli("train", "--labels", str(out / "text"), "--student", "tiny", "--output", str(out / "general"), *budget)
    task = cli("train", "--labels", str(out / "chat"), "--init-from", str(out / "general"), "--output",
               str(out / "task"), *budget)
    score = cli("eval", "--labels", str(out / "chat"), "--model", str(out / "task"), "--device", args.device,
                "--eval-fraction", "0.2")
    gen = cli("label", "--corpus", "pydoc-chat", "--output", str(out / "generated"), "--max-length", "1024",
              "--chat-template", str(out / "chatml.jinja"), "--generate-with", "teacher", "--max-new-tokens",
              str(args.max_new_tokens), *common_label)
    print(f"\n{common.device_name(args.device)}, teacher {args.preset} (random weights), {common.versions()}\n")
    print(common.markdown_table(["step", "tokens", "labeled", "tokens/s", "wall s"], [
        ["label text (packed)", f"{text['tokens']:,}", f"{text['trained_tokens']:,}", f"{text['tokens_per_s']:,.0f}",
         text["wall_s"]],
        ["label chat (assistant)", f"{chat['tokens']:,}", f"{chat['trained_tokens']:,}",
         f"{chat['tokens'] / max(chat['label_s'], 1e-9):,.0f}", chat["wall_s"]],
        ["train general", f"{general['train_tokens']:,}", "", "", general["wall_s"]],
        ["train task (--init-from)", f"{task['train_tokens']:,}", "", "", task["wall_s"]],
        ["generate + label (teacher)", f"{gen['tokens']:,}", f"{gen['generated_tokens']:,} generated",
         f"{gen['generated_tokens'] / max(gen['label_s'], 1e-9):,.1f} generated", gen["wall_s"]],
    ]))
    print(f"\ntwo-stage student on held-out assistant tokens: KL {score['kl']:.3f}, top-1 {score['top1']:.3f}, "
          f"CE {score['ce']:.3f} ({score['positions']} positions)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
