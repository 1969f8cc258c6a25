"""`--help` answers: every verb of the `medtune` command has a description, every option says what it does, and
every option with a default says which.

The parsers are walked from ``medtune.cli.build_parser``, so a verb added later is checked without touching this
file. Flags (``store_true`` / ``store_false``) are off unless given, which needs no saying; an empty list default
(a repeatable option) and ``None`` mean "not given".
"""
import argparse

import pytest

from medtune.cli import build_parser


def verb_parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(path, parser) for ``parser`` and every sub-verb under it, each parser once (aliases share one)."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            seen = set()
            for name, subparser in action.choices.items():
                if id(subparser) not in seen:
                    seen.add(id(subparser))
                    yield from verb_parsers(subparser, path + (name,))


def option_name(action: argparse.Action) -> str:
    return "/".join(action.option_strings) or action.dest


def states_no_default(action: argparse.Action) -> bool:
    return action.nargs == 0 or action.default in (None, argparse.SUPPRESS) or action.default == []


VERBS = [pytest.param(path, parser, id=" ".join(path) or "medtune") for path, parser in verb_parsers(build_parser())]


def test_the_walk_reaches_every_stage_and_nested_verbs():
    names = {" ".join(path) for path, _ in verb_parsers(build_parser())}
    assert {"data check", "model info", "train", "eval run", "eval suite", "chat", "serve", "web"} <= names


@pytest.mark.parametrize("path, parser", VERBS)
def test_every_verb_describes_itself_and_every_option_and_its_default(path, parser):
    assert parser.description and parser.description.strip(), f"`medtune {' '.join(path)}` has no description"
    formatter = parser._get_formatter()
    gaps = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        if isinstance(action, argparse._SubParsersAction):
            gaps += [f"verb {choice.dest}: no help in the list of verbs" for choice in action._choices_actions
                     if not (choice.help or "").strip()]
            continue
        if not (action.help or "").strip():
            gaps.append(f"{option_name(action)}: no help")
        elif not states_no_default(action) and "default" not in formatter._expand_help(action):
            gaps.append(f"{option_name(action)}: default {action.default!r} not stated")
    assert not gaps, f"medtune {' '.join(path)}: " + "; ".join(gaps)
    assert parser.format_help()  # and the help renders: no stray % in a help string


def test_the_defaults_a_newcomer_asked_about_are_printed():
    parsers = {" ".join(path): parser for path, parser in verb_parsers(build_parser())}
    serve, run = parsers["serve"].format_help(), " ".join(parsers["eval run"].format_help().split())
    assert "(default 8000)" in serve
    assert "questions per generate call (local) or requests in flight (endpoint) (default 8)" in run
    assert "(default compat,strict)" in run and "(default modulo)" in run
    suite = " ".join(parsers["eval suite"].format_help().split())
    assert "medmax-12: MedMax's 12 VQA tasks" in suite and "gmai: GMAI-VL's" in suite
