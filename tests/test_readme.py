"""The README is the newcomer's manual: it must keep naming the two commands and every
setting the service reads, by the names users type."""

import re
from pathlib import Path

from app.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_the_two_commands_come_first() -> None:
    top = README[: README.index("## ")]
    assert "make demo" in top and "make test" in top


def test_every_setting_is_in_the_configuration_table() -> None:
    table = README[README.index("## Configuration") : README.index("## Deployment")]
    missing = [
        f"NEGMERGE_{name.upper()}"
        for name in Settings.model_fields
        if f"`NEGMERGE_{name.upper()}`" not in table
    ]
    assert not missing, f"README's configuration table lacks {missing}"


# Settings whose field name is also a field of a job request (the README means that one).
# search.max_lambda, escalation.max_variants too.
ALSO_REQUEST_FIELDS = {"max_eval_samples", "max_lambda", "max_variants"}


def test_settings_are_named_as_users_type_them() -> None:
    """`NEGMERGE_DATA_ROOTS`, never the field name `data_roots` nobody can set."""
    bare = [
        name
        for name in Settings.model_fields
        if name not in ALSO_REQUEST_FIELDS
        and re.search(rf"(?<![A-Za-z_]){name}(?![A-Za-z_])", README)
    ]
    assert not bare, f"README names settings by their field names: {bare}"


def test_links_within_the_readme_name_its_headings() -> None:
    # GitHub's anchors: lower case, punctuation dropped, spaces as hyphens.
    anchors = {
        re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        for heading in re.findall(r"^#{2,4} (.+)$", README, re.M)
    }
    links = set(re.findall(r"\]\(#([^)]+)\)", README))
    assert links and links <= anchors, links - anchors


def _layout() -> dict[str, set[str]]:
    """README's Layout: each folder's line ("    name/  ...") and the modules listed under
    it ("      name.py  ..." or "      name/  ...")."""
    block = README[README.index("## Layout") : README.index("## Development")]
    listed: dict[str, set[str]] = {}
    folder = None
    for line in block.splitlines():
        if match := re.match(r"^    (\S+/)", line):
            folder = match.group(1)
            listed[folder] = set()
        elif (match := re.match(r"^      (\S+)", line)) and folder:
            listed[folder].add(match.group(1))
    return listed


def test_the_layout_lists_every_module_of_the_packages_it_details() -> None:
    listed = _layout()
    assert {"negmerge/", "app/", "app/services/", "worker/", "client/"} <= listed.keys()
    for folder, names in listed.items():
        assert (ROOT / folder).is_dir(), f"Layout names {folder}, which is not in the tree"
        if not names:
            continue  # a folder described, not detailed
        present = {
            p.name + ("/" if p.is_dir() else "")
            for p in (ROOT / folder).iterdir()
            if (p.suffix == ".py" and p.name != "__init__.py")
            or (p.is_dir() and (p / "__init__.py").exists())
        }
        assert names == present, (
            f"{folder}: Layout lists {sorted(names - present)}, which are not there, and "
            f"omits {sorted(present - names)}"
        )
