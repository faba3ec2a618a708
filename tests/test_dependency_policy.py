"""The dependency policy (README, "Dependency policy"): setup.cfg declares exactly what CI
runs. Each lower bound is the version `make test-min` installs, and the lock that `make test`
installs lies inside the declared ranges."""

import configparser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.smoke


def declared() -> dict[str, Requirement]:
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    lines = setup["options"]["install_requires"].splitlines()
    for extra in setup["options.extras_require"].values():
        lines += extra.splitlines()
    requirements = {}
    for line in filter(None, (line.strip() for line in lines)):
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert requirements.get(name, requirement).specifier == requirement.specifier, f"{name} declared twice"
        requirements[name] = requirement
    return requirements


def pins(name: str) -> dict[str, str]:
    result = {}
    for line in (ROOT / "requirements" / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", f"{name}: {line} is not an exact pin"
            result[canonicalize_name(requirement.name)] = spec.version
    return result


def lower_bound(requirement: Requirement) -> str:
    bounds = [spec.version for spec in requirement.specifier if spec.operator == ">="]
    assert len(bounds) == 1, f"{requirement} must have exactly one lower bound (the oldest version CI runs)"
    return bounds[0]


def test_every_lower_bound_is_the_version_make_test_min_installs():
    minimum = pins("minimum.txt")
    requirements = declared()
    assert set(minimum) == set(requirements), "requirements/minimum.txt must pin every declared requirement"
    for name, requirement in requirements.items():
        assert minimum[name] == lower_bound(requirement), (
            f"{name}: setup.cfg's lower bound {lower_bound(requirement)} is not what CI's minimum run installs "
            f"({minimum[name]})"
        )


def test_the_lock_lies_inside_the_declared_ranges():
    lock = pins("../requirements.lock")
    for name, requirement in declared().items():
        assert name in lock, f"{name} is declared but not locked"
        assert requirement.specifier.contains(lock[name]), f"lock pins {name}=={lock[name]}, outside {requirement}"


def test_torch_is_the_cpu_build_ci_installs_everywhere():
    assert pins("../requirements.lock")["torch"] == pins("minimum.txt")["torch"] == "2.13.0"
    makefile = (ROOT / "Makefile").read_text()
    assert "TORCH := torch==2.13.0" in makefile


def test_the_remote_code_checks_the_declared_transformers_minimum():
    from diffusion_moe.configuration import remote_code

    assert remote_code.MIN_TRANSFORMERS == lower_bound(declared()["transformers"])
