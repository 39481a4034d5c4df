"""docs/cli.md's flag tables are the parser's: regenerate them with `python -m rept.clidoc --write docs/cli.md`."""

from pathlib import Path

from rept.clidoc import differences, flag_table, tables, update
from rept.cli import build_parser

CLI_MD = Path(__file__).resolve().parents[2] / "docs" / "cli.md"


def test_docs_flag_tables_match_the_parser():
    problems = differences(CLI_MD.read_text(encoding="utf-8"), tables())
    assert not problems, f"{problems}: run python -m rept.clidoc --write docs/cli.md"


def test_every_flag_of_every_command_is_in_its_table():
    parser = build_parser()
    action = next(a for a in parser._actions if hasattr(a, "choices") and isinstance(a.choices, dict))
    for name, sub in action.choices.items():
        table = flag_table(sub)
        for a in sub._actions:
            for option in a.option_strings:
                if option not in ("-h", "--help", "-q", "--quiet"):
                    assert f"`{option}`" in table, (name, option)


def test_a_changed_flag_is_a_difference_and_update_fixes_it():
    generated = tables()
    text = CLI_MD.read_text(encoding="utf-8")
    stale = text.replace("| `--probe-rows` | PROBE_ROWS | `64` |", "| `--probe-rows` | PROBE_ROWS | `32` |", 1)
    assert stale != text
    assert differences(stale, generated) == ["layers: flags block out of date"]
    assert differences(update(stale, generated), generated) == []
    # a command the file does not document yet gets a block of its own
    missing = update(text, {**generated, "newcmd": "| flag |\n"})
    assert "## rept newcmd" in missing and differences(missing, {**generated, "newcmd": "| flag |\n"}) == []
    assert differences(text, {**generated, "newcmd": "| flag |\n"}) == ["newcmd: no flags block"]


def test_defaults_and_groups_are_shown():
    table = tables()["trace"]
    assert "| `--top-k` | TOP_K | `10` |" in table
    assert "| `--index` | INDEX | required |" in table
    assert "(not with `--queries`)" in table and "one of the group required" in table
    assert "| `--json` |  | off |" in table
