"""cluster.yaml and the KubeRay manifests, checked offline: Ray's own validator, botocore's EC2 model, our CLI."""

from __future__ import annotations

import copy
import pathlib
import shlex
from typing import Any

import botocore.session
import pytest
import yaml

from batchseg.cli import build_parser

ROOT = pathlib.Path(__file__).resolve().parent.parent


def cluster() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_own_validation() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(cluster()))
    validate_config(config)
    assert config["available_node_types"]["gpu_worker"]["min_workers"] == 0  # GPU workers scale from zero
    assert config["head_node_type"] == "head"


def unknown_keys(value: Any, shape: Any, where: str) -> list[str]:
    """Keys of ``value`` that the botocore ``shape`` does not define, recursively."""
    if shape.type_name == "structure":
        problems = []
        for key, item in value.items():
            if key not in shape.members:
                problems.append(f"{where}.{key}")
            else:
                problems += unknown_keys(item, shape.members[key], f"{where}.{key}")
        return problems
    if shape.type_name == "list":
        return [p for i, item in enumerate(value) for p in unknown_keys(item, shape.member, f"{where}[{i}]")]
    return []


def test_node_configs_match_ec2_run_instances() -> None:
    shape = (
        botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape
    )
    for name, node_type in cluster()["available_node_types"].items():
        assert unknown_keys(node_type["node_config"], shape, name) == []
    broken = {
        "InstanceType": "g5.xlarge",
        "BlockDeviceMappings": [{"DeviceName": "/dev/sda1", "Ebs": {"VolumeSise": 1}}],
    }
    assert unknown_keys(broken, shape, "typo") == ["typo.BlockDeviceMappings[0].Ebs.VolumeSise"]


def test_cluster_installs_batchseg_from_this_checkout() -> None:
    config = cluster()
    assert config["file_mounts"] == {"~/batchseg": "."}
    assert any("pip install" in c and "~/batchseg" in c for c in config["setup_commands"])
    assert config["available_node_types"]["head"]["resources"] == {"CPU": 0}


def entrypoint(manifest: str) -> tuple[dict[str, Any], list[str]]:
    job = yaml.safe_load((ROOT / "deploy" / manifest).read_text())
    return job, shlex.split(job["spec"]["entrypoint"])


@pytest.mark.parametrize(
    ("manifest", "command"), [("segment-rayjob.yaml", "segment"), ("train-rayjob.yaml", "train")]
)
def test_kuberay_jobs_are_well_formed_and_their_commands_parse(manifest: str, command: str) -> None:
    job, words = entrypoint(manifest)
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]["rayClusterSpec"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (gpu,) = spec["workerGroupSpecs"]
    for container in [
        *spec["headGroupSpec"]["template"]["spec"]["containers"],
        *gpu["template"]["spec"]["containers"],
    ]:
        assert container["image"] and container["resources"]["limits"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    assert words[:2] == ["python", f"jobs/{command}.py"] and (ROOT / words[1]).exists()
    args = build_parser().parse_args([command, *words[2:]])  # the entrypoint is a valid batchseg command
    assert args.command == command
    per_worker = args.gpus_per_actor if command == "segment" else args.gpus_per_worker
    assert per_worker == float(limits["nvidia.com/gpu"])
