"""Resuming a large label set: the resume check and the manifest write at 300,000 units, before and after.

Builds, on a local SeaweedFS S3 server, a label set in progress with ``--units``
committed units (tiny shards of random bytes: the protocol's cost is per object,
not per byte), each with its commit marker, as a run of softlabels 0.4.0 left it.
Then, side by side in one run:

before   ``LabelSetWriter.committed()`` of the previous release (its source taken from
         git at ``--before-rev``): list ``_commits/``, read every marker, read every shard
         back and hash it.
after    this release. A run gathers each block of 1,000 committed units into one index
         and deletes their markers as it goes (timed here apart, "indexing": spread over a
         real run, it costs one small write and one bulk delete per 1,000 units); then the
         resume check ``committed()``: read the indexes, list ``shards/`` (in parallel by name prefix) for
         the sizes. Both checks must find every unit.
manifest the final manifest of all units: built, serialized, written (``write_manifest``).

Issue target: resume check + manifest write <= 60 s at 300,000 units on this machine.

    python bench/resume.py [--units 300000] [--before-units N]

``--before-units`` (default 10,000) is the size of the set the old check is timed on; the
figure is scaled linearly to ``--units`` (the old check is one marker read and one shard read
per unit, nothing else). Building 300,000 units of the old layout (600,000 objects) takes
longer on this machine than the benchmark should.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

import common

DEFAULT_BEFORE_REV = "b2d9b05"  # the last commit before the commit index


def old_writer_class(rev: str) -> type:
    src = subprocess.run(["git", "show", f"{rev}:softlabels/common/commit.py"], cwd=common.REPO, check=True,
                         capture_output=True, text=True).stdout
    path = os.path.join(tempfile.mkdtemp(), "commit_before.py")
    with open(path, "w") as fh:
        fh.write(src)
    spec = importlib.util.spec_from_file_location("softlabels_commit_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.LabelSetWriter


def build(url: str, units: int, markers: bool, batch: int = 2000) -> list:
    """``units`` shards (with their commit markers, or gathered into indexes as a run leaves them)."""
    from softlabels.common.commit import LabelSetWriter
    from softlabels.schemas import ShardInfo, resolve_url
    from softlabels.schemas.fingerprint import sha256_bytes

    fs, root = resolve_url(url)
    writer = LabelSetWriter(url)
    infos = []
    t0 = time.time()
    for lo in range(0, units, batch):
        objects = {}
        for i in range(lo, min(units, lo + batch)):
            data = os.urandom(96)
            name = f"part-{i:06d}"
            info = ShardInfo(path=f"shards/{name}.parquet", rows=1, tokens=33_000, bytes=len(data),
                             sha256=sha256_bytes(data))
            infos.append(info)
            objects[f"{root}/{info.path}"] = data
            if markers:
                marker = {**dataclasses.asdict(info), "inputs": inputs(name)}
                objects[f"{root}/_commits/{name}.json"] = json.dumps(marker, sort_keys=True).encode()
        fs.pipe(objects, batch_size=256)
        if not markers:
            for i in range(lo, min(units, lo + batch)):
                writer.record(i, f"part-{i:06d}", infos[i], inputs(f"part-{i:06d}"), resumed=True)
        if lo // batch % 25 == 0:
            print(f"  built {len(infos):,}/{units:,} units ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    return infos


def inputs(name: str) -> str:
    from softlabels.schemas.fingerprint import sha256_bytes

    return sha256_bytes(name.encode())


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--units", type=int, default=300_000)
    p.add_argument("--before-units", type=int, default=10_000,
                   help="units the old check is timed on (scaled to --units; 0 skips it)")
    p.add_argument("--before-rev", default=DEFAULT_BEFORE_REV)
    p.add_argument("--json", help="write the figures here too")
    args = p.parse_args()
    from softlabels.common.commit import LabelSetWriter
    from softlabels.schemas import Manifest, Totals
    from softlabels.schemas.format import SCHEMA_VERSION

    Old = old_writer_class(args.before_rev) if args.before_units else None
    rows = {}
    with common.seaweedfs() as bucket:
        if args.before_units:
            url = common.unique_prefix(bucket, "resume-before")
            print(f"before: {args.before_units:,} units with their markers under {url} ...", file=sys.stderr, flush=True)
            infos = build(url, args.before_units, markers=True)
            done, t = timed(lambda: Old(url).committed())
            assert len(done) == args.before_units, (len(done), args.before_units)
            rows["before_measured_s"], rows["before_check_s"] = t, t * args.units / args.before_units
            # This release on the same set, as a resumed run meets it: every marker verified once,
            # then indexed block by block as the run goes.
            writer = LabelSetWriter(url)
            done, rows["after_old_layout_s"] = timed(writer.committed)
            assert len(done) == args.before_units

            def index_all() -> None:
                for i, info in enumerate(infos):
                    writer.record(i, f"part-{i:06d}", info, inputs(f"part-{i:06d}"), resumed=True)

            _, t = timed(index_all)
            rows["indexing_s"] = t * args.units / args.before_units

        url = common.unique_prefix(bucket, "resume")
        print(f"after: {args.units:,} units gathered into indexes under {url} ...", file=sys.stderr, flush=True)
        infos, rows["build_s"] = timed(lambda: build(url, args.units, markers=False))
        fresh = LabelSetWriter(url)
        done, rows["after_check_s"] = timed(fresh.committed)
        assert len(done) == args.units, (len(done), args.units)
        assert all(done[f"part-{i:06d}"].info == infos[i] for i in range(args.units))

        base = Manifest.from_json((common.REPO / "tests/fixtures/v2-sets/fp16/manifest.json").read_bytes())
        ordered = tuple(done[f"part-{i:06d}"].info for i in range(args.units))

        def publish() -> int:
            m = dataclasses.replace(
                base, shards=ordered, schema_version=SCHEMA_VERSION,
                totals=Totals(sum(s.rows for s in ordered), sum(s.tokens for s in ordered),
                              sum(s.bytes for s in ordered)))
            fresh.write_manifest(m)
            return len(m.to_json())

        rows["manifest_bytes"], rows["manifest_s"] = timed(publish)
    after = rows["after_check_s"] + rows["manifest_s"]
    print(f"\n{args.units:,} committed units on a local SeaweedFS S3 server ({common.cpu_name()})\n")
    table = [("building the set (setup, not timed in the target)", f"{rows['build_s']:.1f} s")]
    if args.before_units:
        scale = "" if args.before_units == args.units else f" (measured {rows['before_measured_s']:.1f} s on {args.before_units:,} units, scaled)"
        table += [
            ("before: resume check", f"{rows['before_check_s']:.1f} s{scale}"),
            ("after: indexing, as the run goes", f"{rows['indexing_s']:.1f} s in all{' (scaled)' if scale else ''}"),
        ]
    table += [
        ("after: resume check", f"{rows['after_check_s']:.1f} s"),
        ("manifest write", f"{rows['manifest_s']:.1f} s ({rows['manifest_bytes'] / 2**20:.0f} MiB)"),
        ("after: check + manifest", f"{after:.1f} s (target <= 60 s): {common.verdict(60 / after, 1)}"),
    ]
    if args.before_units:
        table.append(("speed-up of the check", f"{rows['before_check_s'] / rows['after_check_s']:.0f}x"))
    print(common.markdown_table(["step", "time"], table))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
