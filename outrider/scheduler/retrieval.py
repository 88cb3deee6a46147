"""Retrieval for drafters without a model: find where the context's suffix occurred before — in the sequence's own
tokens, in a bounded pool of earlier requests' text, in a tokenized corpus — and return what followed, merged into
a tree by frequency (SuffixDecoding, Oliaro et al. 2024; REST, He et al. 2024)."""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

SCAN = 64  # latest occurrences of a key examined per lookup: bounds the cost of very common n-grams


class Source(Protocol):
    """Indexed tokens: occurrences of a context's suffix, and the tokens after one."""

    def matches(self, context: list[int], max_match: int) -> list[tuple[int, int]]:
        """(match length, end position) of the latest occurrences of the context's last n tokens, each extended
        backwards while it agrees with the context (at most max_match)."""
        ...

    def after(self, end: int, k: int) -> list[int]: ...  # the k tokens from position `end`


@dataclass
class IndexedTokens:
    """A token list indexed by its n-grams: `index[key]` holds the end positions e with tokens[e-n:e] == key."""

    n: int
    tokens: list[int] = field(default_factory=list)
    index: dict[tuple[int, ...], list[int]] = field(default_factory=dict)
    indexed: int = 0  # end positions below this are in the index

    def extend_to(self, tokens: list[int]) -> None:
        """Index `tokens`, reusing the work done for a prefix of them (a sequence grows between rounds)."""
        if len(tokens) < len(self.tokens) or tokens[:len(self.tokens)] != self.tokens:
            self.tokens, self.index, self.indexed = [], {}, 0
        self.tokens = list(tokens)
        # end positions e with a continuation (e < len): the last position is the query, never its own match
        for e in range(max(self.indexed, self.n), len(self.tokens)):
            self.index.setdefault(tuple(self.tokens[e - self.n:e]), []).append(e)
        self.indexed = max(self.indexed, len(self.tokens))

    def matches(self, context: list[int], max_match: int) -> list[tuple[int, int]]:
        found = []
        for e in reversed(self.index.get(tuple(context[-self.n:]), [])[-SCAN:]):
            found.append((_extend(self.tokens, e, self.n, context, max_match), e))
        return found

    def after(self, end: int, k: int) -> list[int]:
        return self.tokens[end:end + k]


def _extend(tokens, e: int, n: int, context: list[int], max_match: int) -> int:
    """How far back from end position e the tokens agree with the context's end (n of them are known to)."""
    length = n
    while (length < max_match and e - length - 1 >= 0 and length < len(context)
           and tokens[e - length - 1] == context[-length - 1]):
        length += 1
    return length


class TokenPool:
    """Earlier requests' text, bounded in tokens, oldest evicted first; safe to share between threads."""

    def __init__(self, n: int, max_tokens: int):
        self.n, self.max_tokens = n, max_tokens
        self.docs: deque[IndexedTokens] = deque()
        self.tokens = 0
        self.lock = threading.Lock()

    def add(self, tokens: list[int]) -> None:
        tokens = tokens[-self.max_tokens:]
        if len(tokens) <= self.n:
            return
        doc = IndexedTokens(self.n)
        doc.extend_to(tokens)
        with self.lock:
            self.docs.append(doc)
            self.tokens += len(tokens)
            while self.tokens > self.max_tokens:
                self.tokens -= len(self.docs.popleft().tokens)

    def sources(self) -> list[IndexedTokens]:
        with self.lock:
            return list(self.docs)

    def report(self) -> dict:
        with self.lock:
            return {"pool_requests": len(self.docs), "pool_tokens": self.tokens,
                    "pool_index_entries": sum(len(d.index) for d in self.docs)}


CORPUS_FORMAT = "outrider-corpus-v1"
_KEY_BITS = 21  # bits per token in a corpus key: vocabularies below 2 097 152 tokens, three tokens in an int64


class Corpus:
    """A tokenized corpus as arrays: the tokens, and every n-gram's end positions sorted by the n-gram (packed
    into one int64 key), looked up by binary search. Built once by `build`; memory is 12 bytes per token."""

    def __init__(self, tokens: np.ndarray, n: int, target: str, vocab_size: int):
        if not 1 <= n <= 3:
            raise ValueError(f"a corpus indexes 1- to 3-token keys, got n={n}")
        if vocab_size > 1 << _KEY_BITS:
            raise ValueError(f"a corpus packs token ids in {_KEY_BITS} bits; a vocabulary of {vocab_size} is too big")
        self.tokens, self.n, self.target, self.vocab_size = tokens.astype(np.int32), n, target, vocab_size
        ends = np.arange(n, len(self.tokens), dtype=np.int64)  # end positions with a continuation
        keys = self._keys(ends)
        order = np.argsort(keys, kind="stable")  # by key, then by position
        self.keys, self.ends = keys[order], ends[order]

    def _keys(self, ends: np.ndarray) -> np.ndarray:
        keys = np.zeros(len(ends), dtype=np.int64)
        for i in range(self.n, 0, -1):
            keys = (keys << _KEY_BITS) | self.tokens[ends - i].astype(np.int64)
        return keys

    def matches(self, context: list[int], max_match: int) -> list[tuple[int, int]]:
        if len(context) < self.n:
            return []
        key = 0
        for t in context[-self.n:]:
            key = (key << _KEY_BITS) | t
        lo, hi = np.searchsorted(self.keys, key, "left"), np.searchsorted(self.keys, key, "right")
        return [(_extend(self.tokens, int(e), self.n, context, max_match), int(e))
                for e in self.ends[max(lo, hi - SCAN):hi][::-1]]

    def after(self, end: int, k: int) -> list[int]:
        return self.tokens[end:end + k].tolist()

    def save(self, path: Path) -> None:
        with open(path, "wb") as f:  # a file object: np.savez would add .npz to a name without it
            np.savez(f, tokens=self.tokens, n=self.n, target=self.target, vocab_size=self.vocab_size,
                     format=CORPUS_FORMAT)

    @classmethod
    def load(cls, path: Path | str) -> "Corpus":
        """A saved corpus; ValueError saying what is wrong with the file."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise ValueError(f"{path} does not exist")
        try:
            data = np.load(path, allow_pickle=False)
            fmt, saved_target = str(data["format"]), str(data["target"])
            tokens, n, saved_vocab = data["tokens"], int(data["n"]), int(data["vocab_size"])
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{path} is not a corpus file ({e})") from None
        if fmt != CORPUS_FORMAT:
            raise ValueError(f"{path} has format {fmt!r}, not {CORPUS_FORMAT}")
        return cls(tokens, n, saved_target, saved_vocab)


def best_paths(continuations: list[list[int]], budget: int,
               min_prob: float) -> tuple[list[int], list[int], list[float]]:
    """Merge `continuations` into a trie counting how many pass through each node, and keep the `budget` nodes
    with the highest share of them (at least `min_prob`), most shared first: (tokens, parents, shares). A node's
    share never exceeds its parent's, so ranking by share, shallower first on ties, puts every parent before its
    children, and any leading part of the ranking is a tree."""
    trie_tokens: list[int] = []
    trie_parent: list[int] = []
    counts: list[int] = []
    depths: list[int] = []
    children: list[dict[int, int]] = [{}]  # children[i + 1]: node i's children by token; children[0]: the root's
    for cont in continuations:
        node = -1
        for token in cont:
            child = children[node + 1].get(token)
            if child is None:
                child = len(trie_tokens)
                children[node + 1][token] = child
                trie_tokens.append(token)
                trie_parent.append(node)
                counts.append(0)
                depths.append(depths[node] + 1 if node >= 0 else 1)
                children.append({})
            counts[child] += 1
            node = child
    total = len(continuations)
    ranked = sorted(range(len(trie_tokens)), key=lambda i: (-counts[i], depths[i], i))
    order = [i for i in ranked[:budget] if counts[i] / total >= min_prob]
    new_index = {old: new for new, old in enumerate(order)}
    return ([trie_tokens[i] for i in order], [new_index[trie_parent[i]] if trie_parent[i] >= 0 else -1
                                              for i in order], [counts[i] / total for i in order])


@dataclass
class _Seq:
    own: IndexedTokens
    prompt_len: int


class Retriever:
    """Each sequence's own tokens, a shared pool of finished sequences' text and an optional corpus, searched
    together for the longest match of a context's suffix."""

    def __init__(self, min_match: int, max_match: int, pool_tokens: int | None, corpus: Corpus | None = None):
        self.min_match, self.max_match = min_match, max_match
        self.pool = TokenPool(min_match, pool_tokens) if pool_tokens else None
        self.corpus = corpus
        self.seqs: dict[int, _Seq] = {}

    def start(self, seq_id: int, prompt_len: int) -> None:
        self.seqs[seq_id] = _Seq(IndexedTokens(self.min_match), prompt_len)

    def continuations(self, seq_id: int, tokens: list[int], k: int) -> tuple[int, list[list[int]]]:
        """The longest match length and the (up to k) tokens after each occurrence matched that long."""
        seq = self.seqs.setdefault(seq_id, _Seq(IndexedTokens(self.min_match), len(tokens)))
        seq.own.extend_to(tokens)
        if k < 1 or len(tokens) < self.min_match:
            return 0, []
        sources: list[Source] = [seq.own, *(self.pool.sources() if self.pool else [])]
        if self.corpus is not None:
            sources.append(self.corpus)
        found = [(length, src, e) for src in sources for length, e in src.matches(tokens, self.max_match)
                 if length >= self.min_match]
        if not found:
            return 0, []
        longest = max(length for length, _, _ in found)
        return longest, [src.after(e, k) for length, src, e in found if length == longest]

    def finish(self, seq_id: int) -> None:
        """The sequence is done: its output (after the prompt's tail, so a later context can reach the output's
        start) joins the pool."""
        seq = self.seqs.pop(seq_id, None)
        if seq is not None and self.pool is not None:
            self.pool.add(seq.own.tokens[max(0, seq.prompt_len - self.max_match):])

    def report(self) -> dict:
        out = self.pool.report() if self.pool else {}
        return out | ({"corpus_tokens": int(len(self.corpus.tokens))} if self.corpus is not None else {})
