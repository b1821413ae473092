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
    """The README's second command (after creating the venv) is what .ci/run executes."""
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^python3 -m venv \.venv && \. \.venv/bin/activate && (.+)$", readme, re.M)
    assert len(commands) == 2, "the README opens with two commands: the main job and the tests"
    assert "microattn demo" in commands[0]
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci_lines
