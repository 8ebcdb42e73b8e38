"""cluster.yaml: passes the Ray cluster launcher's own schema and installs what pyproject.toml pins."""

from __future__ import annotations

import copy
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
PINNED = ("torch", "torchvision", "ray")


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def prepared(raw: dict[str, Any]) -> dict[str, Any]:
    """The config as `ray up` sees it: merged with the AWS defaults, then validated."""
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


def _project_pins() -> dict[str, Requirement]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {r.name: r for r in map(Requirement, deps)}


def _installed_by(commands: list[str]) -> dict[str, Requirement]:
    """Requirements named on the `pip install` lines of `commands`."""
    found = {}
    for command in commands:
        words = shlex.split(command)
        if words[:2] != ["pip", "install"]:
            continue
        for word in words[2:]:
            if word.startswith(("-", "~", "/", ".")):
                continue
            try:
                req = Requirement(word)
            except InvalidRequirement:
                continue
            found[req.name] = req
    return found


def _exact_version(spec: SpecifierSet) -> str:
    (pin,) = list(spec)
    assert pin.operator == "==", f"{spec} is not a pin"
    return pin.version


def test_cluster_yaml_passes_the_launchers_schema(prepared: dict[str, Any]) -> None:
    assert prepared["head_node_type"] == "head"
    assert set(prepared["available_node_types"]) == {"head", "gpu_worker", "cpu_worker"}


def test_schema_check_catches_a_misspelt_key(raw: dict[str, Any]) -> None:
    broken = copy.deepcopy(raw)
    broken["available_node_types"]["gpu_worker"]["min_worker"] = 1  # min_workers misspelt
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(prepare_config(broken))


def test_every_node_installs_the_pyproject_pins(prepared: dict[str, Any]) -> None:
    pins = _project_pins()
    for role in ("head_setup_commands", "worker_setup_commands"):  # setup_commands merged into both
        installed = _installed_by(prepared[role])
        for name in PINNED:
            assert name in installed, f"{role} does not install {name}"
            assert installed[name].specifier == pins[name].specifier, (name, role)
            assert pins[name].extras <= installed[name].extras, (name, role)
        assert any(re.search(r"pip install .*-e ~/raycap", c) for c in prepared[role]), role


def test_images_run_the_pinned_ray(prepared: dict[str, Any]) -> None:
    ray_version = _exact_version(_project_pins()["ray"].specifier)
    requires_python = SpecifierSet(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"])
    docker = prepared["docker"]
    images = [docker["image"], docker["head_image"]] + [
        t["docker"]["worker_image"] for t in prepared["available_node_types"].values() if "docker" in t
    ]
    for image in images:
        match = re.fullmatch(r"rayproject/ray:([\d.]+)-py(\d)(\d+)-(cpu|gpu|cu\d+)", image)
        assert match, image
        assert match[1] == ray_version, image
        assert f"{match[2]}.{match[3]}" in requires_python, image
    assert "gpu" in docker["image"], "the GPU workers need a CUDA image"


def test_node_types_split_the_work(prepared: dict[str, Any]) -> None:
    types = prepared["available_node_types"]
    head, gpu, cpu = types["head"], types["gpu_worker"], types["cpu_worker"]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    assert head["max_workers"] == 0
    assert gpu["resources"]["GPU"] >= 1 and gpu["resources"]["CPU"] >= 1
    assert gpu["min_workers"] < gpu["max_workers"], "GPU workers must autoscale"
    assert cpu["resources"]["CPU"] >= 1 and not cpu["resources"].get("GPU")
    assert cpu["min_workers"] < cpu["max_workers"]
    assert sum(t["min_workers"] for t in types.values()) <= prepared["max_workers"]
    assert prepared["provider"]["type"] == "aws"


def test_workers_get_an_instance_profile_for_s3(prepared: dict[str, Any]) -> None:
    """The launcher gives the head a profile; workers read and write S3 with their own."""
    for name in ("gpu_worker", "cpu_worker"):
        profile = prepared["available_node_types"][name]["node_config"].get("IamInstanceProfile", {})
        assert profile.get("Name") or profile.get("Arn"), name
