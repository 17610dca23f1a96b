"""The README is the newcomer's manual: it must keep naming the two commands and every
setting the service reads."""

from pathlib import Path

from app.settings import Settings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


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
