"""The README's Python examples run as written (from a scratch working directory), and every
command, option, script, file and code name it gives exists in the repository."""
import argparse
import importlib
import importlib.util
import re
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TEXT = README.read_text(encoding="utf-8")
BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, flags=re.DOTALL)

FENCE = re.compile(r"```[^\n]*\n(.*?)```", flags=re.DOTALL)
PYTHON_M = re.compile(r"(?:^|[\s/])python3?\s+-m\s+((?:utils|models)(?:\.\w+)+)")
BASH = re.compile(r"(?:^|\s)bash\s+([\w./-]+)")
OPTION = re.compile(r"(?<![\w-])--[a-z][\w-]*")
SET_KEY = re.compile(r"--set\s+([\w.]+)=")
SCRIPT = re.compile(r"(?<![\w./-])(scripts/[\w.-]+|\.ci/run)")
REPO_PATH = re.compile(r"(?<![\w./-])((?:utils|models|tests)/[\w/]+\.py|notebooks/[\w.-]+\.(?:ipynb|py|cfg)"
                       r"|(?:tests/data|outputs/benchmark)/[\w.-]+\.\w+|outputs/[\w-]+\.md)")
DOTTED = re.compile(r"(?:utils|models)(?:\.\w+)+")
# words about how the code was developed, which the README must not carry
HISTORY = [r"\bissues?\s*#?\s*\d+", r"(?<![\w/])#\d+\b", r"\bstep\s+\d+\b", r"\bsessions?\s+\d+",
           r"\bafter the rework\b", r"\b(?:first|earlier|previous) version\b", r"\btracker\b", r"\.\./shared"]
# a script run by bash whose options are those of a module's parser
BASH_PARSER = {"run.sh": "utils.run_notebooks"}
FIRST_SCREEN_LINES = 15


def test_readme_has_python_examples():
    assert BLOCKS, "README.md should show at least one runnable Python example"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out.strip(), "each example prints what it shows"


# ------------------------------------------------------------------------------------------
# the commands and names the README gives
# ------------------------------------------------------------------------------------------

def _strip_comment(line: str) -> str:
    """A code line without its trailing ``# comment`` (a ``#`` inside a word, as in ``x.npz#test/1``, stays)."""
    return re.split(r"(?:^|\s)#", line, maxsplit=1)[0]


def command_lines(text: str) -> list[str]:
    """Every line of every code block (backslash continuations joined, comments dropped), then
    every inline code span of the prose."""
    lines = []
    for block in FENCE.findall(text):
        lines += [_strip_comment(line) for line in re.sub(r"\\\n\s*", " ", block).splitlines()]
    return lines + inline_spans(text)


def inline_spans(text: str) -> list[str]:
    """The inline code spans of the prose, a span broken over lines joined by one space."""
    return [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", FENCE.sub("", text))]


class _Parsed(Exception):
    def __init__(self, parser):
        super().__init__("parser captured")
        self.parser = parser


def parser_of(module_name: str) -> argparse.ArgumentParser:
    """The command-line parser of ``python -m module_name``: its ``build_parser()``, else the
    parser its ``main([])`` builds (caught as it starts parsing, before the command does anything)."""
    module = importlib.import_module(module_name)
    if hasattr(module, "build_parser"):
        return module.build_parser()

    def capture(self, *args, **kwargs):
        raise _Parsed(self)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture):
        try:
            module.main([])
        except _Parsed as parsed:
            return parsed.parser
    raise AssertionError(f"{module_name}.main() parsed no command line")


def options_of(module_name: str) -> set[str]:
    return {s for action in parser_of(module_name)._actions for s in action.option_strings}


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def _resolves(dotted: str) -> bool:
    """``utils.a.b.name``: the longest importable module prefix holds the rest as attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        if _module_exists(module_name):
            obj = importlib.import_module(module_name)
            for attribute in parts[cut:]:
                if not hasattr(obj, attribute):
                    return False
                obj = getattr(obj, attribute)
            return True
    return False


def _calls(segment: str):
    """``(module or None, argument text)`` of each ``python -m MODULE`` / ``bash SCRIPT`` in one
    shell command; a script's module is the one whose options it takes (``BASH_PARSER``).
    Raises FileNotFoundError for a ``bash`` script that does not exist."""
    found = sorted([(m.start(), m.end(), m.group(1)) for m in PYTHON_M.finditer(segment)]
                   + [(m.start(), m.end(), "bash " + m.group(1)) for m in BASH.finditer(segment)])
    for i, (_, end, name) in enumerate(found):
        arguments = segment[end:found[i + 1][0] if i + 1 < len(found) else len(segment)]
        if name.startswith("bash "):
            script = name[len("bash "):]
            if not (ROOT / script).exists():
                raise FileNotFoundError(f"`bash {script}`: no such script")
            name = BASH_PARSER.get(Path(script).name)
        yield name, arguments


def command_problems(text: str) -> list[str]:
    """What a README ``text`` names that does not exist: ``python -m`` modules, their options
    (on the same command line), scripts run by ``bash`` or named as ``scripts/...``, ``--set``
    keys, repository paths and dotted code names in inline code. One message per problem."""
    from dataclasses import fields

    from models.diffmic3d import MODEL_SECTIONS
    from utils.training.profiles import TrainConfig

    train_keys = {f.name for f in fields(TrainConfig)}

    problems, options = [], {}
    for line in command_lines(text):
        for segment in re.split(r"&&|\s;\s", line):
            try:
                calls = list(_calls(segment))
            except FileNotFoundError as missing:
                problems.append(str(missing))
                continue
            for module, arguments in calls:
                if module is None:
                    continue
                if not _module_exists(module):
                    problems.append(f"`python -m {module}`: no such module")
                    continue
                if module not in options:
                    options[module] = options_of(module)
                problems += [f"`python -m {module}` has no option {option}"
                             for option in OPTION.findall(arguments) if option not in options[module]]
        for key in (k for k in SET_KEY.findall(line) if k.lower() != "key"):  # KEY=VALUE: a placeholder
            known = key.split(".", 1)[0] in MODEL_SECTIONS if "." in key else key in train_keys
            if not known:
                problems.append(f"`--set {key}=...`: no such configuration key")
        problems += [f"`{path}`: no such script" for path in SCRIPT.findall(line) if not (ROOT / path).exists()]
    for span in inline_spans(text):
        problems += [f"`{path}`: no such file" for path in REPO_PATH.findall(span) if not (ROOT / path).exists()]
        if DOTTED.fullmatch(span) and not _resolves(span):
            problems.append(f"`{span}`: no such module or name")
    return problems


def test_every_command_option_script_and_path_the_readme_names_exists():
    assert command_problems(TEXT) == []


@pytest.mark.parametrize("snippet, expected", [
    ("```bash\npython -m utils.run --profile demo --no-such-option\n```\n",
     "`python -m utils.run` has no option --no-such-option"),
    ("Predict with `.venv/bin/python -m utils.predict scan.nii.gz --no-such-flag`.",
     "`python -m utils.predict` has no option --no-such-flag"),
    ("```bash\npython -m utils.data.phantoms --out x \\\n    --no-such-size 3   # a comment --quick\n```\n",
     "`python -m utils.data.phantoms` has no option --no-such-size"),
    ("`bash run.sh --no-such-option`", "`python -m utils.run_notebooks` has no option --no-such-option"),
    ("Run `python -m utils.no_such_module`.", "`python -m utils.no_such_module`: no such module"),
    ("`bash no_such_script.sh`", "`bash no_such_script.sh`: no such script"),
    ("See `python scripts/no_such_script.py`.", "`scripts/no_such_script.py`: no such script"),
    ("Override `--set no_such_key=1`.", "`--set no_such_key=...`: no such configuration key"),
    ("In `utils/no_such_module.py`.", "`utils/no_such_module.py`: no such file"),
    ("Open `notebooks/99_missing.ipynb`.", "`notebooks/99_missing.ipynb`: no such file"),
    ("Run `python -m utils.run_notebooks\n--no-such-option` (a span broken over two lines).",
     "`python -m utils.run_notebooks` has no option --no-such-option"),
    ("Call `utils.pipeline.no_such_function`.", "`utils.pipeline.no_such_function`: no such module or name"),
])
def test_a_readme_naming_something_missing_fails(snippet, expected):
    assert command_problems(snippet) == [expected]


def test_a_readme_naming_what_exists_passes():
    snippet = ("```bash\n.venv/bin/python -m utils.run --profile demo [--data-dir DIR] [--set dcg.top_t=0.1]\n"
               "python -m utils.data.phantoms --out d --n 4 [--difficulty easy|default|hard]   # --bogus in a comment\n"
               "bash run.sh --profile full\n```\n"
               "`python -m utils.prepare_data --data-dir DIR --no-cache`, `scripts/setup.sh`, `utils/run.py`, "
               "`utils.pipeline.train_all`, `--set batch_size=2`.")
    assert command_problems(snippet) == []


# ------------------------------------------------------------------------------------------
# shape of the README
# ------------------------------------------------------------------------------------------

def test_the_first_screen_gives_both_commands():
    first = [line for line in TEXT.splitlines() if line.strip()][:FIRST_SCREEN_LINES]
    screen = "\n".join(first)
    assert "bash run.sh" in screen and "bash .ci/run" in screen


@pytest.mark.parametrize("pattern", HISTORY)
def test_no_development_history_or_paths_outside_the_repository(pattern):
    hits = [m.group(0) for m in re.finditer(pattern, FENCE.sub("", TEXT) + "\n".join(FENCE.findall(TEXT)),
                                            flags=re.IGNORECASE)]
    assert not hits, f"README.md carries {hits} (pattern {pattern!r})"


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_to_a_section_resolves_and_the_contents_list_every_section():
    headings = re.findall(r"^#{2,4} (.+)$", FENCE.sub("", TEXT), flags=re.MULTILINE)
    anchors = {_slug(h) for h in headings}
    links = set(re.findall(r"\]\(#([^)]+)\)", TEXT))
    assert links <= anchors, f"links to missing sections: {sorted(links - anchors)}"
    sections = {_slug(h) for h in re.findall(r"^## (.+)$", FENCE.sub("", TEXT), flags=re.MULTILINE)}
    contents = TEXT.split("## Contents", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"\]\(#([^)]+)\)", contents))
    assert sections - {"contents"} <= listed, f"sections missing from Contents: {sorted(sections - listed)}"


def test_notebooks_readme_says_what_the_committed_notebooks_carry():
    text = (ROOT / "notebooks" / "README.md").read_text(encoding="utf-8")
    assert "outputs of a `demo` run" in text and "--update-notebooks" in text
    assert "cleared" not in text
