"""Generate the reference pages that must follow the code (run by mkdocs-gen-files at build).

- ``reference/cli.md``: every ``hyperfleet`` command and flag, read from the argument parser
  that ``hyperfleet.app.cli.build_parser`` builds, so the page cannot drift from ``--help``.
- The campaign file page is written by hand, but its key tables are checked here against the
  keys the loader accepts: a key added to the code and not to the page (or the other way
  round) fails the build.
- ``changelog.md`` and ``explanations/benchmark-results.md``: CHANGELOG.md and
  bench/RESULTS.md, shown as pages of the site.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import mkdocs_gen_files

os.environ["COLUMNS"] = "88"  # argparse wraps usage lines to this width

from hyperfleet.app.cli import build_parser
from hyperfleet.campaign import CAMPAIGN_KEYS, POOL_KEYS
from hyperfleet.campaign.studies import EXPERIMENT_KEYS, SLOT_KEYS, STUDY_KEYS

ROOT = Path(__file__).resolve().parent.parent


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def command_help(parser: argparse.ArgumentParser) -> dict[str, str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {choice.dest: choice.help or "" for choice in action._choices_actions}
    return {}


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def argument_name(action: argparse.Action) -> str:
    if not action.option_strings:
        name = action.metavar or action.dest
        return f"`{str(name).upper()}`" + (" (optional)" if action.nargs == "?" else "")
    flags = ", ".join(action.option_strings)
    if action.nargs == 0:
        return f"`{flags}`"
    metavar = action.metavar or (
        "{" + ",".join(map(str, action.choices)) + "}" if action.choices else action.dest.upper()
    )
    return f"`{flags} {metavar}`"


def default_text(action: argparse.Action) -> str:
    if action.nargs == 0 or action.default in (None, argparse.SUPPRESS, False, ""):
        return ""
    return f"`{action.default}`"


def argument_rows(parser: argparse.ArgumentParser) -> list[str]:
    rows = ["| argument | default | what it does |", "|---|---|---|"]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            continue
        help_text = action.help or ""
        repeatable = isinstance(action, argparse._AppendAction) and "repeat" not in help_text
        extra = " (repeatable)" if repeatable else ""
        required = " (required)" if action.required else ""
        rows.append(
            f"| {argument_name(action)}{required} | {default_text(action)} "
            f"| {cell((action.help or '') % {'prog': parser.prog})}{extra} |"
        )
    return rows


def cli_page() -> str:
    parser = build_parser()
    lines = [
        "# The `hyperfleet` command",
        "",
        "This page is generated from the command's own argument parser when the site is built,",
        "so it says exactly what `hyperfleet COMMAND --help` says. Durations are written `90s`,",
        "`30m`, `2h` or `1h30m`; sizes `10GiB` or `512MiB`.",
        "",
        "```text",
        parser.format_usage().strip(),
        "```",
        "",
        *argument_rows(parser),
        "",
        "| command | what it does |",
        "|---|---|",
    ]
    helps = command_help(parser)
    for name in subcommands(parser):
        lines.append(f"| [`hyperfleet {name}`](#hyperfleet-{name}) | {cell(helps.get(name, ''))} |")
    for name, sub in subcommands(parser).items():
        lines += ["", f"## hyperfleet {name}", ""]
        if sub.description:
            lines += [sub.description, ""]
        elif helps.get(name):
            lines += [helps[name][0].upper() + helps[name][1:] + ".", ""]
        lines += ["```text", sub.format_usage().strip(), "```", "", *argument_rows(sub)]
    return "\n".join(lines) + "\n"


def table_keys(page: str, heading: str) -> list[str]:
    """The keys in the first column of the table that follows ``heading`` on the page."""
    match = re.search(rf"^#+ {re.escape(heading)}\s*$(.*?)(?=^#+ |\Z)", page, re.M | re.S)
    if match is None:
        raise SystemExit(f"docs/reference/campaign-file.md has no heading {heading!r}")
    return re.findall(r"^\| `([a-z_]+)` \|", match.group(1), re.M)


def check_campaign_page() -> None:
    page = (ROOT / "docs" / "reference" / "campaign-file.md").read_text()
    expected = {
        "[campaign]": CAMPAIGN_KEYS,
        "[pool]": POOL_KEYS,
        "[[study]]": STUDY_KEYS,
        "slot": SLOT_KEYS,
        "experiments": EXPERIMENT_KEYS,
    }
    for heading, keys in expected.items():
        documented = table_keys(page, heading)
        if sorted(documented) != sorted(keys):
            missing = sorted(set(keys) - set(documented))
            unknown = sorted(set(documented) - set(keys))
            raise SystemExit(
                f"docs/reference/campaign-file.md, table {heading}: keys the loader takes but "
                f"the page lacks: {missing}; keys on the page the loader does not take: {unknown}"
            )


with mkdocs_gen_files.open("reference/cli.md", "w") as page:
    page.write(cli_page())
mkdocs_gen_files.set_edit_path("reference/cli.md", "../src/hyperfleet/app/cli.py")
check_campaign_page()
with mkdocs_gen_files.open("changelog.md", "w") as page:
    page.write((ROOT / "CHANGELOG.md").read_text())
with mkdocs_gen_files.open("explanations/benchmark-results.md", "w") as page:
    page.write((ROOT / "bench" / "RESULTS.md").read_text())
