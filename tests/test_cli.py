"""The jobs' command lines: one flag name per concept, old names still accepted with a note, --help
that shows defaults and choices, and documentation whose every job command uses flags that exist."""

from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
from functools import cache
from pathlib import Path

import pytest

from pipeline import cli

ROOT = Path(__file__).resolve().parents[1]
JOBS = sorted(p.stem for p in (ROOT / "jobs").glob("*.py"))
DOCS = [ROOT / "README.md", ROOT / "cluster" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@cache
def job_parser(job: str) -> argparse.ArgumentParser:
    """The parser jobs/<job>.py parses its command line with (importing a job loads no Ray, torch or MLflow)."""
    spec = importlib.util.spec_from_file_location(f"job_{job}", ROOT / "jobs" / f"{job}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parser and its subcommands' (jobs/registry.py)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return [parser, *(p for a in subs for p in a.choices.values())]


def shown_flags(job: str) -> set[str]:
    """The flags --help shows (a renamed flag's old name is accepted, never shown)."""
    return {
        flag
        for parser in _parsers(job_parser(job))
        for action in parser._actions
        if action.help != argparse.SUPPRESS
        for flag in action.option_strings
    }


@pytest.mark.parametrize("job", JOBS)
def test_every_option_of_every_job_shows_its_default_and_free_strings_list_their_choices(job):
    for parser in _parsers(job_parser(job)):
        formatter = parser._get_formatter()
        for action in parser._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS or action.nargs == 0:
                continue
            text = formatter._get_help_string(action) % {"default": action.default}
            has_default = action.default not in (None, "", argparse.SUPPRESS)
            assert not has_default or re.search(r"default|\[imagenet: ", text, re.I), (job, action.option_strings)
    if job == "train":
        parser = job_parser(job)
        for flag in ("--profile", "--schedule", "--promote", "--decode-on", "--init", "--normalize"):
            assert parser._option_string_actions[flag].choices, flag


@pytest.mark.parametrize(
    "job, old, new, value",
    [
        ("prepare", "--source", "--input", "raw/"),
        ("prepare", "--out", "--output", "shards/"),
        ("make_sample_data", "--out", "--output", "sample/"),
        ("relu_vs_tanh", "--out", "--output", "figure/"),
        ("evaluate", "--no-log", "--no-tracking", None),
        ("mlflow_server", "--workers", "--web-workers", "4"),
    ],
)
def test_a_renamed_flag_still_works_and_says_its_new_name(job, old, new, value, capsys):
    parser = job_parser(job)
    given = [old] if value is None else [old, value]
    wanted = [new] if value is None else [new, value]
    assert vars(parser.parse_args(given)) == vars(parser.parse_args(wanted))
    assert f"note: {old} is renamed {new}" in capsys.readouterr().err
    assert old not in shown_flags(job) and new in shown_flags(job)


def test_the_same_concept_has_the_same_flag_in_every_job():
    for job in ("train", "evaluate", "infer", "relu_vs_tanh", "registry"):
        assert "--tracking-uri" in shown_flags(job), job
    for job in ("train", "evaluate", "relu_vs_tanh"):
        assert "--no-tracking" in shown_flags(job), job
    for job in ("train", "prepare", "evaluate", "infer"):
        assert "--no-progress" in shown_flags(job), job
    for job in ("evaluate", "infer"):
        assert {"--replicas", "--gpus-per-replica"} <= shown_flags(job), job
        assert job_parser(job).parse_args(["--replicas", "1:4"]).gpus_per_replica == cli.AUTO
    assert {"--input", "--output"} <= shown_flags("prepare") and {"--input", "--output"} <= shown_flags("infer")
    assert "--data" in shown_flags("evaluate") and "--data" in shown_flags("train")


def test_the_tracking_uri_flag_is_the_jobs_mlflow_server():
    environ: dict[str, str] = {}
    cli.use_tracking_uri(job_parser("infer").parse_args(["--tracking-uri", "http://head:5000"]), environ)
    assert environ == {"MLFLOW_TRACKING_URI": "http://head:5000"}
    cli.use_tracking_uri(job_parser("infer").parse_args([]), environ := {})
    assert environ == {}


COMMAND = re.compile(r"python3? jobs/(\w+)\.py((?:[^\n`|\\]|\\\n|\\(?!\n))*)")
MAKE = re.compile(r"make (train|test|test-fast) ARGS=\"([^\"]*)\"")


def documented_commands() -> list[tuple[str, str, str]]:
    """(file, job, its arguments) for every `python jobs/<job>.py ...` (and `make train ARGS="..."`)."""
    found = []
    for path in DOCS:
        text = path.read_text()
        for match in COMMAND.finditer(text):
            found.append((path.name, match.group(1), match.group(2).replace("\\\n", " ")))
        for match in MAKE.finditer(text):
            if match.group(1) == "train":
                found.append((path.name, "train", match.group(2)))
    return found


def test_every_job_command_in_the_docs_uses_flags_the_job_has():
    commands = documented_commands()
    assert len(commands) >= 40 and {job for _, job, _ in commands} >= set(JOBS) - {"make_sample_data"}
    wrong = []
    for where, job, arguments in commands:
        if job not in JOBS:
            wrong.append(f"{where}: jobs/{job}.py does not exist")
            continue
        try:
            words = shlex.split(arguments.split("#")[0])
        except ValueError:
            words = arguments.split()
        flags = {w.split("=")[0] for w in words if re.fullmatch(r"--[a-z][a-z0-9-]*(=.*)?", w)}
        wrong += [f"{where}: jobs/{job}.py has no {flag}" for flag in sorted(flags - shown_flags(job))]
    assert not wrong, wrong


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors for a Markdown file's headings."""
    found = set()
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


def test_every_relative_link_in_the_docs_reaches_a_file_and_heading_that_exist():
    broken = []
    for path in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            if not linked.exists():
                broken.append(f"{path.name}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                broken.append(f"{path.name}: {target} (no such heading)")
    assert not broken, broken
