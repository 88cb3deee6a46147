"""A real client end to end: lm-evaluation-harness's `local-completions` and `local-chat-completions` models against
`outrider serve`, on two tasks defined over local JSONL files (a log-likelihood one and a generate_until one), give
the same per-sample results and scores as the same evaluation run in process on the target alone.
"""
from __future__ import annotations

import json
from pathlib import Path

import lm_eval
import pytest
from lm_eval.api.model import TemplateLM
from lm_eval.tasks import TaskManager
from test_server import live, make_profile
from tiny_folders import write_tiny_pair

from outrider.runtime.loading import load_model
from outrider.runtime.tokenizer import Tokenizer
from outrider.scheduler.engine import Engine, Request
from outrider.scheduler.target import LocalTarget

CHOICES = [{"question": "def add(a, b):\n    return", "choices": [" a + b", " a - b", " print(a)"], "answer": 0},
           {"question": "The quick brown fox jumps over the", "choices": [" lazy dog", " moon", " end"], "answer": 0},
           {"question": "for i in range(", "choices": ["10):", "x)", "'a'"], "answer": 0},
           {"question": "import", "choices": [" os", " sys", " json"], "answer": 1}]
PROMPTS = [{"prompt": "def add(a, b):", "target": " return a + b"}, {"prompt": "The dog", "target": " sleeps"},
           {"prompt": "print(", "target": "add(1, 2))"}]


def write_tasks(folder: Path) -> Path:
    (folder / "choice.jsonl").write_text("\n".join(json.dumps(d) for d in CHOICES))
    (folder / "gen.jsonl").write_text("\n".join(json.dumps(d) for d in PROMPTS))
    (folder / "outrider_choice.yaml").write_text(
        "task: outrider_choice\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'choice.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    (folder / "outrider_gen.yaml").write_text(
        "task: outrider_gen\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'gen.jsonl'}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
        "generation_kwargs:\n  until: ['\\n\\n']\n  max_gen_toks: 12\n  do_sample: false\n  temperature: 0\n"
        "metric_list:\n  - metric: exact_match\n")
    return folder


class InProcess(TemplateLM):
    """The same evaluation on the target alone in this process: lm-eval's own request encoding (TemplateLM), our
    engine's prompt logprobs for log-likelihoods, plain greedy decoding cut at the stop strings for generations."""

    def __init__(self, engine: Engine, hf_tokenizer, tokenizer: Tokenizer, chat: bool = False) -> None:
        super().__init__()
        self.engine, self.hf, self.tok, self.chat = engine, hf_tokenizer, tokenizer, chat

    @property
    def eot_token_id(self) -> int:
        return self.hf.eos_token_id

    def tok_encode(self, string: str, **kwargs) -> list[int]:
        return self.hf.encode(string, add_special_tokens=False)

    def _loglikelihood_tokens(self, requests, **kwargs) -> list[tuple[float, bool]]:
        out = []
        for _, context, continuation in requests:
            seq = self.engine.generate(Request(context + continuation, 1, prompt_logprobs=1))
            entries = seq.prompt_logprobs[len(context):]
            out.append((sum(e.logprob for e in entries), all(e.logprob == e.top[0][1] for e in entries)))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("no rolling task here")

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for request in requests:
            context, kwargs = request.args
            if self.chat:
                ids = self.tok.encode(self.tok.apply_chat_template(json.loads(context)))
            else:
                ids = self.tok_encode(context)
            seq = self.engine.generate(Request(ids, kwargs["max_gen_toks"], stop_ids=frozenset(self.tok.eos_token_ids)))
            text = self.tok.decode(seq.generated)
            for stop in kwargs["until"]:
                text = text.split(stop)[0]
            out.append(text)
        return out

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        return json.dumps(chat_history)  # rendered by generate_until, as the server renders messages

    @property
    def tokenizer_name(self) -> str:
        return "tiny"


def responses(results: dict, task: str) -> list:
    return [s["filtered_resps"] for s in results["samples"][task]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmeval")
    target, draft = write_tiny_pair(root / "models")
    tasks = write_tasks(root)
    with live(make_profile((target, draft), max_seq_len=1024, max_tokens=64)) as (url, service):
        yield url, service, target, tasks


def in_process(target: Path, chat: bool = False) -> InProcess:
    from transformers import AutoTokenizer

    model = load_model(str(target), "float32", "dense")[0]
    return InProcess(Engine(LocalTarget(model, capacity=1024)), AutoTokenizer.from_pretrained(str(target)),
                     Tokenizer.load(target), chat)


def test_local_completions_scores_and_samples_equal_in_process(setup, monkeypatch):
    url, _, target, tasks = setup
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    names, manager = ["outrider_choice", "outrider_gen"], TaskManager(include_path=str(tasks))
    served = lm_eval.simple_evaluate(
        model="local-completions", tasks=names, task_manager=manager, log_samples=True,
        model_args={"model": "tiny", "base_url": f"{url}/v1/completions", "tokenizer_backend": "huggingface",
                    "tokenizer": str(target), "max_length": 1000})
    local = lm_eval.simple_evaluate(model=in_process(target), tasks=names, task_manager=manager, log_samples=True)
    for task in names:
        assert responses(served, task) == responses(local, task), task  # log-likelihoods compared exactly
    assert served["results"] == local["results"]
    assert any(r for r in responses(served, "outrider_gen")), "the generations are not all empty"


def test_local_chat_completions_generations_equal_in_process(setup, monkeypatch):
    url, _, target, tasks = setup
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    manager = TaskManager(include_path=str(tasks))
    served = lm_eval.simple_evaluate(
        model="local-chat-completions", tasks=["outrider_gen"], task_manager=manager, log_samples=True,
        apply_chat_template=True, model_args={"model": "tiny", "base_url": f"{url}/v1/chat/completions"})
    local = lm_eval.simple_evaluate(model=in_process(target, chat=True), tasks=["outrider_gen"], task_manager=manager,
                                    log_samples=True, apply_chat_template=True)
    assert responses(served, "outrider_gen") == responses(local, "outrider_gen")
    assert served["results"]["outrider_gen"] == local["results"]["outrider_gen"]
