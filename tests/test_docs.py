"""The documentation (README.md and docs/*.md) against the code and the files it quotes.

- Numbers: a Markdown block that starts with `<!-- numbers from FILE [FILE ...] -->` may quote only
  decimal numbers that its files hold (text files: the same digits; JSON files: a numeric value
  that rounds to them), so a regenerated result cannot silently disagree with the page.
- Commands: every `python scripts/X.py ...` line of a code block parses with that script's own
  argument parser (unknown flags and values of the wrong type fail); the quoted stage flags of
  `train_recipe.py` name flags of the stage's script.
- Flags named in the prose exist in some script; relative links and pictures resolve; every script
  is in the README's table; the README stays a front page; setup.py and the README agree on Python.
"""

import argparse
import functools
import io
import json
import re
import runpy
import shlex
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README] + sorted((REPO / "docs").glob("*.md"))
SCRIPTS = sorted(p.stem for p in (REPO / "scripts").glob("*.py"))
README_MAX_LINES = 250


def rel(path):
    return str(Path(path).relative_to(REPO))


# ---------------------------------------------------------------------------------------------
# Numbers quoted from generated files

MARKER = re.compile(r"^\s*<!--\s*numbers from\s+(.+?)\s*-->\s*$")
# A decimal number, not part of a version string (2.14.1), a longer number or a word.
DECIMAL = re.compile(r"(?<![\w.])\d+\.\d+(?![\w]|\.\d)")


def marked_blocks(text):
    """[(line number, [source files], block text)]: each marker and the lines after it, up to the first
    blank line (a paragraph, a list or a table) or the next marker."""
    lines = text.splitlines()
    blocks = []
    for i, line in enumerate(lines):
        found = MARKER.search(line)
        if not found:
            continue
        body = []
        for following in lines[i + 1:]:
            if not following.strip() or MARKER.search(following):
                break
            body.append(following)
        blocks.append((i + 1, found.group(1).replace(",", " ").split(), "\n".join(body)))
    return blocks


def json_numbers(value):
    """Every number among a JSON document's values, and every decimal written inside its strings."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield value
    elif isinstance(value, str):
        for number in DECIMAL.findall(value):
            yield float(number)
    elif isinstance(value, dict):
        for item in value.values():
            yield from json_numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from json_numbers(item)


def source_holds(path, quoted):
    """Whether the file at `path` holds the decimal `quoted` (a string such as '0.787')."""
    text = Path(path).read_text()
    if str(path).endswith(".json"):
        digits = len(quoted.split(".")[1])
        return any(f"{float(v):.{digits}f}" == quoted for v in json_numbers(json.loads(text)))
    return re.search(rf"(?<![\d.]){re.escape(quoted)}(?!\d)", text) is not None


def number_problems(text, root, where="page"):
    """One message per marker whose file is missing or holds nothing, and per quoted number none of the
    marker's files holds."""
    problems = []
    for line, sources, body in marked_blocks(text):
        paths = [Path(root) / s for s in sources]
        missing = [s for s, p in zip(sources, paths) if not p.is_file()]
        if missing:
            problems.append(f"{where}:{line}: numbers from {', '.join(missing)}: no such file")
            continue
        numbers = DECIMAL.findall(body)
        if not numbers:
            problems.append(f"{where}:{line}: a numbers marker over a block that quotes no decimal number")
        for number in numbers:
            if not any(source_holds(p, number) for p in paths):
                problems.append(f"{where}:{line}: {number} is not in {' or '.join(sources)}")
    return problems


def test_number_checker_catches_a_changed_number(tmp_path):
    (tmp_path / "results.md").write_text("| method | Dice | s / image |\n|---|---|---|\n| A | 0.787 ± 0.135 | 0.080 |\n")
    (tmp_path / "model.json").write_text(json.dumps({"dice": 0.80481, "note": "HD95 7.63 mm", "n": 4}))
    good = ("<!-- numbers from results.md -->\nDice 0.787 (std 0.135) at 0.080 s per image.\n\n"
            "<!-- numbers from model.json -->\nWhole volume: 0.805, 0.80 and 0.8 rounded; HD95 7.63 mm; 4 scans.\n\n"
            "Unmarked paragraphs are free: 0.999.\n")
    assert number_problems(good, tmp_path) == []
    changed = good.replace("Dice 0.787", "Dice 0.788").replace("0.805", "0.806")
    problems = number_problems(changed, tmp_path)
    assert len(problems) == 2
    assert "0.788 is not in results.md" in problems[0] and "0.806 is not in model.json" in problems[1]
    # a longer number in the file does not hold a shorter quote, nor a version string a decimal
    assert not source_holds(tmp_path / "results.md", "0.78")
    assert DECIMAL.findall("torch 2.14.1, Dice 0.787.") == ["0.787"]
    # the block ends at the first blank line; a missing source or an empty block is reported
    assert number_problems("<!-- numbers from results.md -->\n0.787\n\n0.555\n", tmp_path) == []
    assert "no such file" in number_problems("<!-- numbers from nothere.md -->\n0.787\n", tmp_path)[0]
    assert "quotes no decimal" in number_problems("<!-- numbers from results.md -->\nno numbers\n", tmp_path)[0]
    # several files: a number may come from any of them
    both = "<!-- numbers from results.md model.json -->\n0.787 and 7.63\n"
    assert number_problems(both, tmp_path) == []


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_quoted_numbers_match_the_files_they_come_from(page):
    assert number_problems(page.read_text(), REPO, rel(page)) == []


def test_the_readme_quotes_generated_files():
    sources = {s for _, files, _ in marked_blocks(README.read_text()) for s in files}
    assert {"runs/demo/results.md", "runs/demo/model.json"} <= sources


# ---------------------------------------------------------------------------------------------
# Command lines against the scripts' argument parsers

class _Captured(BaseException):
    """Raised in place of a script's first parse_args: carries the parser it built."""

    def __init__(self, parser):
        super().__init__()
        self.parser = parser


@functools.lru_cache(maxsize=None)
def script_parser(name):
    """The argparse parser of scripts/<name>.py: the script runs as `python scripts/<name>.py` would, until
    its main parses the command line, which is intercepted before anything else happens."""
    path = REPO / "scripts" / f"{name}.py"
    original = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        raise _Captured(self)

    saved_argv, saved_path = sys.argv, list(sys.path)
    argparse.ArgumentParser.parse_args = capture
    sys.argv = [str(path)]
    try:
        runpy.run_path(str(path), run_name="__main__")
    except _Captured as captured:
        return captured.parser
    finally:
        argparse.ArgumentParser.parse_args = original
        sys.argv, sys.path[:] = saved_argv, saved_path
    raise AssertionError(f"scripts/{name}.py never parsed its command line")


def parse_error(name, argv):
    """None when `argv` parses with scripts/<name>.py's parser, else argparse's message."""
    err = io.StringIO()
    try:
        with redirect_stderr(err), redirect_stdout(io.StringIO()):
            script_parser(name).parse_args(argv)
    except SystemExit as stop:
        if stop.code in (0, None) and ("-h" in argv or "--help" in argv):
            return None
        return err.getvalue().strip() or f"exit status {stop.code}"
    return None


def code_blocks(text):
    """The fenced code blocks of a Markdown text: [(line number, language, body)]."""
    return [(text[:m.start()].count("\n") + 1, m.group(1), m.group(2))
            for m in re.finditer(r"^```(\w*)[^\n]*\n(.*?)^```", text, flags=re.M | re.S)]


VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
ASSIGNMENT = re.compile(r"^[A-Za-z_]\w*=")
SCRIPT = re.compile(r"^(?:\./)?scripts/(\w+)\.py$")
LAUNCHERS = re.compile(r"(^|/)(python[\d.]*|torchrun|mpiexec|mpirun)$")
STOP_TOKENS = {"&&", "||", ";", "|", ">", ">>", "2>", "2>&1", "&"}


def logical_lines(body):
    """Shell lines with backslash continuations joined."""
    return body.replace("\\\n", " ").splitlines()


def script_commands(text):
    """[(line number, script name, argv)] of the `python scripts/X.py ...` lines in the bash code blocks.

    Shell variables are expanded from the assignments made earlier on the page (a reader pastes the
    blocks in order); a variable never assigned stays a visible placeholder word."""
    commands, variables = [], {}
    for start, language, body in code_blocks(text):
        if language not in ("bash", "sh", "shell", "console"):
            continue
        for line in logical_lines(body):
            expanded = VARIABLE.sub(lambda m: variables.get(m.group(1) or m.group(2), (m.group(1) or m.group(2)).upper()),
                                    line)
            try:
                lexer = shlex.shlex(expanded, posix=True, punctuation_chars=True)
                lexer.whitespace_split = True
                tokens = list(lexer)
            except ValueError as err:
                raise AssertionError(f"line {start}: cannot split {line!r}: {err}") from None
            if tokens and all(ASSIGNMENT.match(t) for t in tokens):
                for token in tokens:
                    key, value = token.split("=", 1)
                    variables[key] = value
                continue
            for i, token in enumerate(tokens):
                found = SCRIPT.match(token)
                if found and any(LAUNCHERS.search(t) for t in tokens[:i]):
                    argv = []
                    for arg in tokens[i + 1:]:
                        if arg in STOP_TOKENS:
                            break
                        argv.append(arg)
                    commands.append((start, found.group(1), argv))
                    break
    return commands


STAGE_FLAGS = {"--prepare_flags": "prepare_brats", "--ddpm_flags": "train_tumor_ddfm",
               "--classifier_flags": "classifier_tumor_train", "--ablation_flags": "ablation",
               "--validate_flags": "image_p_seg"}


def unknown_flags(name, tokens):
    """Flags in `tokens` that scripts/<name>.py does not have, or whose value it refuses."""
    actions = script_parser(name)._option_string_actions
    problems = []
    for i, token in enumerate(tokens):
        if not token.startswith("--"):
            continue
        flag, _, inline = token.partition("=")
        action = actions.get(flag)
        if action is None:
            problems.append(f"{flag}: not a flag of scripts/{name}.py")
            continue
        value = inline or (tokens[i + 1] if i + 1 < len(tokens) and action.nargs != 0 else None)
        if value is not None and callable(action.type) and not value.startswith("--"):
            try:
                converted = action.type(value)
            except (ValueError, TypeError, argparse.ArgumentTypeError) as err:
                problems.append(f"{flag} {value}: {err}")
                continue
            if action.choices is not None and converted not in action.choices:
                problems.append(f"{flag} {value}: not one of {list(action.choices)}")
    return problems


def all_commands():
    found = []
    for page in PAGES:
        for line, name, argv in script_commands(page.read_text()):
            found.append(pytest.param(page, name, argv, id=f"{rel(page)}:{line}:{name}"))
    return found


@pytest.mark.parametrize("page,name,argv", all_commands())
def test_command_lines_parse_with_their_scripts_parser(page, name, argv):
    assert name in SCRIPTS, f"scripts/{name}.py does not exist"
    assert parse_error(name, argv) is None, parse_error(name, argv)
    if name == "train_recipe":
        for flag, stage in STAGE_FLAGS.items():
            if flag in argv:
                assert unknown_flags(stage, shlex.split(argv[argv.index(flag) + 1])) == []


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_code_block_names_its_language(page):
    """So that no shell block escapes the command check (`text` for trees and listings)."""
    assert [line for line, language, _ in code_blocks(page.read_text()) if not language] == []


def test_the_pages_hold_commands_of_many_scripts():
    named = {name for page in PAGES for _, name, _ in script_commands(page.read_text())}
    assert {"segment_scans", "train_recipe", "image_p_seg", "train_tumor_ddfm", "classifier_tumor_train",
            "image_tumor_sample", "classifier_tumor_sample", "export_model"} <= named


def test_command_checker_refuses_unknown_flags_and_bad_values():
    page = ('```bash\nFLAGS="--noise_level 0.1 --steps 1"\n'
            "python scripts/image_p_seg.py --src_dir data/demo/slices $FLAGS \\\n    --out_dir runs/x   # a comment\n"
            "python scripts/image_p_seg.py --no_such_flag 1\n"
            "python scripts/image_p_seg.py --steps two\n"
            "python scripts/image_p_seg.py $UNSET_FLAGS\n"
            ".venv/bin/mpiexec -n 2 .venv/bin/python scripts/image_p_seg.py --abs_map maybe\n```\n")
    commands = script_commands(page)
    assert [argv for _, _, argv in commands][0] == ["--src_dir", "data/demo/slices", "--noise_level", "0.1",
                                                    "--steps", "1", "--out_dir", "runs/x"]
    errors = [parse_error(name, argv) for _, name, argv in commands]
    assert errors[0] is None
    assert all(errors[1:]), errors
    assert "--no_such_flag" in errors[1]
    assert unknown_flags("train_tumor_ddfm", ["--num_channels", "32", "--max_noise_level", "x"]) == [
        "--max_noise_level x: could not convert string to float: 'x'"]


# Flags of other programs that the prose may name.
FOREIGN_FLAGS = {"--allow-run-as-root", "--index-url", "--extra-index-url", "--nproc_per_node", "--nnodes",
                 "--node_rank", "--rdzv_backend", "--rdzv_endpoint", "--standalone", "--dry-run"}


def prose_flags(text):
    """The `--flags` named inside inline code spans outside the code blocks."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return {flag for span in re.findall(r"`([^`\n]+)`", text) for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", span)}


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_flags_named_in_the_prose_exist(page):
    known = set(FOREIGN_FLAGS)
    for name in SCRIPTS:
        known.update(script_parser(name)._option_string_actions)
    assert sorted(prose_flags(page.read_text()) - known) == []


# ---------------------------------------------------------------------------------------------
# Links, pictures, the script table, the front page, the Python versions

def slug(heading):
    """GitHub's anchor of a Markdown heading."""
    heading = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", heading).replace(" ", "-")


def anchors(page):
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    return {slug(h) for h in re.findall(r"^#+\s+(.*)$", text, flags=re.M)}


def link_problems(page):
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    problems = []
    for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text) + re.findall(r"<img [^>]*src=\"([^\"]+)\"", text):
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            problems.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{target}: no heading #{anchor} in {resolved.name}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_relative_links_and_pictures_resolve(page):
    assert link_problems(page) == []


def test_link_checker_reports_missing_files_and_anchors(tmp_path):
    (tmp_path / "a.md").write_text("# Title\n\n## A section\n\nSee [b](b.md), [here](#a-section), [x](#nowhere), "
                                   "![pic](pic.png) and [web](https://example.org).\n")
    (tmp_path / "b.md").write_text("# B\n")
    problems = link_problems(tmp_path / "a.md")
    assert problems == ["#nowhere: no heading #nowhere in a.md", "pic.png: no such file"]


def test_every_docs_page_is_linked_from_the_readme():
    linked = set(re.findall(r"\]\((docs/[\w.-]+\.md)", README.read_text()))
    assert {rel(p) for p in PAGES[1:]} <= linked


def test_the_readme_lists_every_script():
    table = [line for line in README.read_text().splitlines() if line.startswith("| `")]
    listed = {m.group(1) for line in table for m in [re.match(r"\| `(\w+)\.py`", line)] if m}
    assert sorted(set(SCRIPTS) - listed) == []
    assert sorted(listed - set(SCRIPTS)) == []


def test_the_readme_is_a_front_page():
    assert len(README.read_text().splitlines()) <= README_MAX_LINES


def test_setup_and_readme_state_the_same_python():
    required = re.search(r"python_requires=\">=(\d+\.\d+)\"", (REPO / "setup.py").read_text()).group(1)
    assert f"Python {required} or newer" in README.read_text()
