"""The wheel must carry every package: pyproject.toml lists them by hand (kernels/ is
installed as microattn.kernels, which automatic package discovery cannot express)."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def listed_packages() -> dict:
    """{package: directory} from [tool.setuptools] packages and package-dir."""
    text = (ROOT / "pyproject.toml").read_text()
    packages = re.search(r"^packages = \[(.*?)\]", text, re.S | re.M).group(1)
    names = re.findall(r'"([\w.]+)"', packages)
    package_dir = dict(re.findall(r'^"([\w.]+)" = "([\w/]+)"$', text, re.M))
    return {name: package_dir[name] for name in names}


def test_every_package_is_listed_in_pyproject():
    listed = listed_packages()
    on_disk = set()
    for top, installed_as in (("microattn", "microattn"), ("kernels", "microattn.kernels")):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            on_disk.add(".".join((installed_as, *rel)))
    assert on_disk == set(listed)
    for name, directory in listed.items():
        assert (ROOT / directory / "__init__.py").is_file(), name
    assert not any(name == "kernels" or name.startswith("kernels.") for name in listed)


def test_ci_runs_the_readme_test_command():
    """The README's second command (after creating the venv) is what .ci/run executes, with
    `|| exit 1` so that a failure in the middle of its && list fails CI (set -e ignores it)."""
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^python3 -m venv \.venv && \. \.venv/bin/activate && (.+)$", readme, re.M)
    assert len(commands) == 2, "the README opens with two commands: the main job and the tests"
    assert "microattn demo" in commands[0]
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert f"{commands[1]} || exit 1" in ci_lines


def optional_dependencies() -> dict:
    """{extra: [requirement, ...]} from [project.optional-dependencies]."""
    text = (ROOT / "pyproject.toml").read_text()
    table = re.search(r"^\[project\.optional-dependencies\]$(.*?)^\[", text, re.S | re.M).group(1)
    return {name: re.findall(r'"([^"]+)"', body)
            for name, body in re.findall(r"^([\w-]+) = \[(.*?)\]$", table, re.S | re.M)}


def test_the_test_command_installs_the_oracles_and_cuda():
    """The PyTorch-parity, PNG, PTX, offline-SASS and checkpoint tests need these extras; under
    CI=true their absence is a failure (tests/conftest.py), so the command CI runs must install them."""
    readme = (ROOT / "README.md").read_text()
    extras = re.search(r'pip install -e "\.\[([\w,-]+)\]" && python -m pytest', readme).group(1)
    assert set(extras.split(",")) >= {"test", "cuda-dev", "oracle", "models"}
    cuda_dev = optional_dependencies()["cuda-dev"]
    assert any(req.startswith("numba-cuda[cu13]") for req in cuda_dev)
    assert any(req.startswith("nvidia-cuda-nvdisasm") for req in cuda_dev)
    oracle = optional_dependencies()["oracle"]
    assert any(req.startswith("matplotlib") for req in oracle)
    # exactly the CPU build on this workplace's disk: anything looser downloads a CUDA build
    assert "torch==2.13.0" in oracle
    # the Hugging Face parity tests (tests/models) were written against this release
    assert "transformers==5.24.0" in oracle
    models = optional_dependencies()["models"]
    assert any(req.startswith("safetensors") for req in models)
    assert any(req.startswith("tokenizers") for req in models)


def test_the_package_never_imports_torch():
    """torch and transformers are test oracles only: no module of the package imports them."""
    for top in ("microattn", "kernels"):
        for source in (ROOT / top).rglob("*.py"):
            assert not re.search(r"^\s*(?:import|from)\s+(?:torch|transformers)\b", source.read_text(), re.M), source
