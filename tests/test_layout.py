"""The rooms of services/ as docs/architecture.md lists them ("The rooms"): every module in the folder named there,
and every import (a late one inside a function too) going to its own folder or to one listed below it, so the
folders have no circle and the list stays the picture of the code."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"^## The rooms\n.*?^```\n(.*?)^```", re.S | re.M)


def rooms():
    """[(folder, [module file names])], top first, from docs/architecture.md."""
    block = BLOCK.search((ROOT / "docs" / "architecture.md").read_text()).group(1)
    return [(line.split()[0].rstrip("/").removeprefix("services/"), line.split()[1:]) for line in block.splitlines()]


def folder_of(module):
    """`services.wire.codes` -> `wire`; `services` (the package itself) -> None."""
    parts = module.split(".")
    return parts[1] if parts[0] == "services" and len(parts) > 1 else None


def imported(path):
    """The services modules a file imports, as dotted names."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "services":
            yield node.module
            if node.module.count(".") == 1:  # `from services.wire import events`: a module of that folder
                yield from (f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name.split(".")[0] == "services")


def test_every_module_is_in_the_folder_the_architecture_names():
    listed = {f"{folder}/{name}" for folder, names in rooms() for name in names}
    on_disk = {str(p.relative_to(ROOT / "services")) for p in (ROOT / "services").glob("*/*.py")
               if p.name != "__init__.py" or p.parent.name == "providers"}
    assert listed == on_disk, f"listed, not on disk: {sorted(listed - on_disk)}; on disk, not listed: " \
                              f"{sorted(on_disk - listed)}"
    assert [p.name for p in (ROOT / "services").glob("*.py")] == ["__init__.py"]  # nothing left outside a folder


def test_no_folder_imports_one_listed_above_it():
    order = [folder for folder, _ in rooms()]
    upward = []
    for path in (ROOT / "services").glob("*/*.py"):
        here = path.parent.name
        for module in imported(path):
            there = folder_of(module)
            if there is not None and there != here and order.index(there) < order.index(here):
                upward.append(f"{path.relative_to(ROOT)} -> {module}")
    assert not upward, f"imports of a folder listed above (docs/architecture.md, The rooms): {upward}"


def test_the_sub_packages_are_installed():
    """setup.cfg lists packages by name: a folder missing there is missing from `pip install .`."""
    setup = (ROOT / "setup.cfg").read_text()
    packages = re.search(r"^packages =\n((?:    .+\n)+)", setup, re.M).group(1).split()
    assert {f"services.{folder}" for folder, _ in rooms()} <= set(packages)
