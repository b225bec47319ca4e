"""The README and docs/ stay true to the repository.

No servers: these tests read the Markdown, the Makefile, the settings classes and the
argparse options of the entry points, and fail, naming the page and line, when a page
links to a missing file, names a make target or a command-line flag that does not exist,
lists a layout path that is gone, or leaves an alert out of the runbook.
"""

from __future__ import annotations

import ast
import re
import shlex
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS_DIR = ROOT / "docs"
PAGES = [README, *sorted(DOCS_DIR.glob("*.md"))]
README_LIMIT = 12_500  # bytes: a front page read in five minutes (STYLE.md, "README and docs")
# The topic pages the README's paragraphs link to.
TOPICS = ("wire-format.md", "training.md", "operations.md", "autoscaler.md", "benchmarks.md")
# `--key=value` is how the pages write "any setting"; it names no flag.
PLACEHOLDER_FLAGS = {"key"}


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ------------------------------------------------------------------ Markdown


def lines(page: Path) -> Iterator[tuple[int, str, bool]]:
    """(line number, line, inside a fenced block) for every line but the fences."""
    fenced = False
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        else:
            yield number, line, fenced


def outside_fences(page: Path) -> Iterator[tuple[int, str]]:
    return ((number, line) for number, line, fenced in lines(page) if not fenced)


def code_snippets(page: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of every line inside a fenced block and of every inline code span
    outside them. Shell comments are cut off block lines: they are prose."""
    for number, line, fenced in lines(page):
        if fenced:
            yield number, re.sub(r"(^|\s)#(\s.*)?$", "", line)
        else:
            for span in re.findall(r"`([^`]+)`", line):
                yield number, span


def links(page: Path) -> Iterator[tuple[int, str]]:
    for number, line in outside_fences(page):
        line = re.sub(r"`[^`]+`", "", line)  # a link in a code span is no link
        for target in re.findall(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", line):
            yield number, target


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for _, line in outside_fences(page):
        match = re.match(r"#{1,6}\s+(.*)", line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def tokens(text: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError:  # an unbalanced quote in a snippet: still check what is there
        return text.split()


def flags_in(words: list[str]) -> list[str]:
    return [w[2:].split("=", 1)[0] for w in words if re.match(r"--[A-Za-z]", w)]


# ------------------------------------------------------------ the repository


@cache
def makefile_rules() -> dict[str, str]:
    """Target name -> its recipe, from the Makefile's ``target:`` rules."""
    rules: dict[str, str] = {}
    current: list[str] = []
    for line in (ROOT / "Makefile").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9][\w-]*(?:[ \t]+[A-Za-z0-9][\w-]*)*)[ \t]*:(?!=)", line)
        if match:
            current = match.group(1).split()
            for target in current:
                rules.setdefault(target, "")
        elif line.startswith("\t") and current:
            for target in current:
                rules[target] += line + "\n"
        elif line.strip() and not line.startswith("#"):
            current = []
    return rules


@cache
def settings_fields() -> frozenset[str]:
    """The union of the fields of every settings class in shared.settings (the module is
    being split into per-service classes: whichever classes exist, their keys count)."""
    import shared.settings as settings_module

    fields: set[str] = set()
    for obj in vars(settings_module).values():
        if isinstance(obj, type) and isinstance(getattr(obj, "model_fields", None), dict):
            fields |= set(obj.model_fields)
    return frozenset(fields)


def module_file(module: str) -> Path | None:
    base = ROOT / module.replace(".", "/")
    for candidate in (base.with_suffix(".py"), base / "__main__.py"):
        if candidate.is_file():
            return candidate
    return None


def argparse_flags(path: Path) -> set[str]:
    return set(re.findall(r"add_argument\(\s*[\"']--([\w-]+)[\"']", path.read_text()))


def hand_parsed_flags(path: Path) -> set[str]:
    """Flags a module picks out of argv itself (``a.startswith("--bench_steps=")``, or the
    names of a module-level ``OPTIONS`` mapping, as the trainer's launcher has)."""
    text = path.read_text()
    flags = set(re.findall(r"startswith\(\s*[\"']--([\w-]+)=", text))
    for node in ast.parse(text).body:
        targets = node.targets if isinstance(node, ast.Assign) else []
        if any(isinstance(t, ast.Name) and t.id == "OPTIONS" for t in targets):
            flags |= set(ast.literal_eval(node.value))
    return flags


def normalized(names: set[str] | frozenset[str]) -> set[str]:
    return {name.replace("-", "_") for name in names}


@cache
def valid_flags(module: str | None) -> tuple[frozenset[str], bool]:
    """(flags ``module`` accepts, whether hyphens and underscores are interchangeable).
    Entry points with argparse take their own options, spelled exactly; the others read
    the settings tree (``--key=value``, ``-`` and ``_`` alike) plus any hand-parsed flags."""
    path = module_file(module) if module else None
    if path is not None:
        own = argparse_flags(path)
        if own:
            return frozenset(own | {"help"}), False
        extra = hand_parsed_flags(path)
    else:
        extra = set()
    return frozenset(normalized(settings_fields() | extra) | {"help"}), True


@cache
def every_flag() -> frozenset[str]:
    """Any flag some entry point takes: for a flag named in prose, outside a command."""
    names = set(settings_fields())
    entry_points = [ROOT / "services/trainer/sample.py", ROOT / "services/trainer/launch.py"]
    for path in [*entry_points, *sorted((ROOT / "benchmarks").glob("*.py"))]:
        names |= argparse_flags(path) | hand_parsed_flags(path)
    return frozenset(normalized(names) | {"help"})


def make_commands(text: str) -> Iterator[tuple[str, list[str]]]:
    """(target, ARGS words) for each ``make <target> ...`` in a snippet: make in command
    position (first, after ``$ ``, variable assignments, ``;``, ``&&`` or ``|``), so that
    output such as "make + encode" is no command."""
    command_start = r"(?:^|[;&|(])\s*(?:\$\s+)?(?:[A-Z_][A-Z0-9_]*=\S*\s+)*"
    for match in re.finditer(command_start + r"make\s+([^;&|]*)", text):
        words = tokens(match.group(1))
        args: list[str] = []
        targets = []
        for word in words:
            if word.startswith("ARGS="):
                args += word[len("ARGS=") :].split()
            elif "=" not in word and not word.startswith("-"):
                targets.append(word)
        for target in targets:
            yield target, args


def module_commands(text: str) -> Iterator[tuple[str, list[str]]]:
    """(module, flags) for each ``python -m services.X`` / ``benchmarks.X`` (torchrun too)."""
    for match in re.finditer(r"-m\s+((?:services|benchmarks)(?:\.\w+)+)([^;&|]*)", text):
        yield match.group(1), flags_in(tokens(match.group(2)))


# ------------------------------------------------------------------- tests


def test_readme_is_a_front_page() -> None:
    size = len(README.read_bytes())
    assert size <= README_LIMIT, (
        f"README.md is {size:,} bytes, over the {README_LIMIT:,} limit: move detail to docs/"
    )


def test_readme_links_every_topic_page() -> None:
    linked = {target.split("#")[0] for _, target in links(README)}
    missing = [f"docs/{name}" for name in TOPICS if f"docs/{name}" not in linked]
    assert not missing, f"README.md links none of: {', '.join(missing)}"
    unlinked = [rel(p) for p in DOCS_DIR.glob("*.md") if rel(p) not in linked]
    assert not unlinked, f"README.md does not link these docs pages: {', '.join(unlinked)}"


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_relative_links_resolve(page: Path) -> None:
    problems = []
    for number, target in links(page):
        if re.match(r"[A-Za-z][\w+.-]*:", target):  # https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        resolved = (page.parent / path_part).resolve() if path_part else page
        where = f"{rel(page)}:{number}: link ({target})"
        if not resolved.exists():
            problems.append(f"{where}: {path_part} does not exist")
        elif ROOT not in resolved.parents and resolved != ROOT:
            problems.append(f"{where}: points outside the repository")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{where}: no heading with anchor #{anchor} in {rel(resolved)}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_make_targets_exist(page: Path) -> None:
    rules = makefile_rules()
    problems = [
        f"{rel(page)}:{number}: `make {target}`: the Makefile has no target '{target}'"
        for number, text in code_snippets(page)
        for target, _ in make_commands(text)
        if target not in rules
    ]
    assert not problems, "\n".join(problems) + f"\n(targets: {', '.join(sorted(rules))})"


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_command_line_flags_exist(page: Path) -> None:
    rules = makefile_rules()
    problems = []
    for number, text in code_snippets(page):
        checks: list[tuple[str, str | None, list[str]]] = []
        for module, flags in module_commands(text):
            if module_file(module) is None:
                problems.append(f"{rel(page)}:{number}: `{text}`: no module {module}")
                continue
            checks.append((f"python -m {module}", module, flags))
        for target, args in make_commands(text):
            found = re.search(r"-m\s+([\w.]+)", rules.get(target, ""))
            module = found.group(1) if found else None
            checks.append((f"make {target} ARGS=", module, flags_in(args)))
        for what, module, flags in checks:
            allowed, loose = valid_flags(module)
            for flag in flags:
                name = flag.replace("-", "_") if loose else flag
                if name not in allowed and flag not in PLACEHOLDER_FLAGS:
                    problems.append(f"{rel(page)}:{number}: `{text}`: {what} takes no --{flag}")
        # A flag on its own in prose (`--compile`, `--show_steps`): some entry point takes it.
        alone = re.fullmatch(r"--([A-Za-z][\w-]*)(=.*)?", text.strip())
        if alone:
            flag = alone.group(1)
            if flag.replace("-", "_") not in every_flag() and flag not in PLACEHOLDER_FLAGS:
                problems.append(
                    f"{rel(page)}:{number}: `{text}`: no setting, sampler or benchmark flag "
                    f"--{flag}"
                )
    assert not problems, "\n".join(problems)


def test_settings_fields_were_found() -> None:
    # Guards the test above against passing because it found no settings at all.
    assert len(settings_fields()) > 20, sorted(settings_fields())


def layout_paths() -> list[tuple[int, str]]:
    readme = README.read_text(encoding="utf-8").splitlines()
    start = next(
        (i for i, line in enumerate(readme) if re.match(r"##\s+Layout\b", line)),
        None,
    )
    assert start is not None, "README.md has no '## Layout' section"
    found = []
    for number in range(start + 2, len(readme) + 1):
        line = readme[number - 1]
        if line.startswith("#"):
            break
        if not line.startswith("|"):
            continue
        for span in re.findall(r"`([^`]+)`", line):
            if "/" in span or span.endswith((".py", ".yml", ".yaml", ".toml")):
                found.append((number, span))
    return found


def test_layout_table_paths_exist() -> None:
    paths = layout_paths()
    assert len(paths) >= 20, f"README.md layout table: only {len(paths)} paths found"
    problems = [
        f"README.md:{number}: layout table names {path}, which does not exist"
        for number, path in paths
        if not (ROOT / path.rstrip("/")).exists()
    ]
    assert not problems, "\n".join(problems)


def test_runbook_covers_every_alert() -> None:
    rules = (ROOT / "deploy/prometheus/rules/alerts.yml").read_text()
    alerts = set(re.findall(r"^\s*-\s*alert:\s*(\S+)", rules, flags=re.MULTILINE))
    assert alerts, "no alerts found in deploy/prometheus/rules/alerts.yml"
    page = DOCS_DIR / "operations.md"
    text = page.read_text(encoding="utf-8")
    runbook = text.split("\n## Runbook", 1)
    assert len(runbook) == 2, "docs/operations.md has no '## Runbook' section"
    section = runbook[1].split("\n## ", 1)[0]
    entries = set(re.findall(r"^###\s+(\S+)\s*$", section, flags=re.MULTILINE))
    missing = sorted(alerts - entries)
    stale = sorted(entries - alerts)
    assert not missing, f"docs/operations.md runbook has no '### <alert>' entry for: {missing}"
    assert not stale, f"docs/operations.md runbook has entries for alerts that are gone: {stale}"
