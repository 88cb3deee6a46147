"""What a bench run says: per-strategy summaries (speedup, acceptance, the analytic bound), a plain-text table and
a bar chart.

Model (Leviathan et al., 2211.17192 §3.1): if each drafted token is accepted independently with probability α and
a round drafts k tokens, the expected acceptance length (accepted drafts + the bonus/recovered token, the
definition `SpecStats` uses) is E(α, k) = (1 − α^{k+1}) / (1 − α). With c = cost of one drafted token / cost of one
verify round, a round costs k·c + 1 target-steps, so the best speedup over plain decoding is E(α, k) / (k·c + 1).
We invert E at the measured mean acceptance length to get α, measure c from the engine's phase timers, and report
efficiency = measured speedup / bound: how much of the speculation's promise the implementation keeps.
k is the configured draft length. Where rounds draft fewer tokens (an n-gram miss drafts none; adaptive k varies
below its maximum) the fixed-k model reads them as rejections, so α is then a lower estimate and the bound rough.
A tree drafts more nodes than it has positions, which the chain model does not describe: for trees read the measured
columns (nodes per round, the engine's draft and verify milliseconds per round), not α, c and the bound.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from outrider.methods import BASELINE

_BISECTION_STEPS = 60  # halves [0, 1] down to 1e-18: far below any timing noise


def expected_acceptance_length(alpha: float, k: int) -> float:
    """E(α, k) = 1 + α + … + α^k, summed directly so α = 1 needs no special case."""
    return sum(alpha ** i for i in range(k + 1))


def solve_alpha(mean_acceptance_length: float, k: int) -> float:
    """The α with E(α, k) = L, by bisection (E is increasing in α on [0, 1], from 1 to k + 1)."""
    if k <= 0 or mean_acceptance_length <= 1.0:
        return 0.0
    if mean_acceptance_length >= k + 1:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(_BISECTION_STEPS):
        mid = (lo + hi) / 2
        if expected_acceptance_length(mid, k) < mean_acceptance_length:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def speedup_bound(alpha: float, k: int, c: float) -> float:
    """(1 − α^{k+1}) / ((1 − α)(k·c + 1)): expected tokens per round over the round's cost in target steps."""
    return expected_acceptance_length(alpha, k) / (k * c + 1)


@dataclass
class StrategySummary:
    strategy: str
    lossless: bool
    runs: int
    new_tokens: int
    seconds: float
    tokens_per_s: float
    decode_tokens_per_s: float  # prefill excluded (llama.cpp's peer figure is its decode rate)
    speedup: float | None  # tokens/s over autoregressive's, same prompts, same session
    rounds: int
    draft_tokens: int
    accepted_tokens: int
    mean_acceptance_length: float  # (accepted + rounds) / rounds
    draft_ms_per_round: float | None  # the engine's draft timer, per drafting round
    verify_ms_per_round: float | None  # the engine's verify timer (target forward and acceptance), per round
    acceptance_per_position: list[float]  # accepted_i / drafted_i, up to the last position ever drafted
    k: int  # the configured draft length (the upper bound when adaptive)
    alpha: float | None  # per-token acceptance solving E(α, k) = mean acceptance length
    c: float | None  # draft seconds per drafted token / verify seconds per round
    bound: float | None  # analytic speedup bound at (α, k, c)
    efficiency: float | None  # speedup / bound
    greedy_mismatches: int | None  # prompts whose tokens differ from autoregressive's; None when T > 0
    mismatched_prompts: list[dict]  # [{"prompt_index", "first_difference"}]

    def as_json(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


def summarize(strategy: str, lossless: bool, runs: list[dict], k: int, baseline_tps: float | None,
              mismatches: list[dict] | None) -> StrategySummary:
    """Pool one strategy's runs: sums first, ratios last, so long prompts weigh by their tokens."""
    tokens = sum(r["new_tokens"] for r in runs)
    seconds = sum(r["seconds"] for r in runs)
    rounds = sum(r["rounds"] for r in runs)
    drafted, accepted = sum(r["draft_tokens"] for r in runs), sum(r["accepted_tokens"] for r in runs)
    tps = tokens / seconds if seconds else 0.0
    decoding = seconds - sum(r["prefill_seconds"] for r in runs)
    decode_tps = tokens / decoding if decoding > 0 else 0.0
    speedup = tps / baseline_tps if baseline_tps else None
    length = (accepted + rounds) / rounds if rounds else 0.0
    draft_ms = 1000 * sum(r["draft_seconds"] for r in runs) / rounds if rounds and drafted else None
    verify_ms = 1000 * sum(r["verify_seconds"] for r in runs) / rounds if rounds else None
    alpha = c = bound = efficiency = None
    if drafted:
        alpha = solve_alpha(length, k)
        verify_per_round = sum(r["verify_seconds"] for r in runs) / rounds
        c = (sum(r["draft_seconds"] for r in runs) / drafted) / verify_per_round if verify_per_round else None
        if c is not None:
            bound = speedup_bound(alpha, k, c)
            efficiency = speedup / bound if speedup is not None and bound else None
    return StrategySummary(strategy, lossless, len(runs), tokens, seconds, tps, decode_tps, speedup, rounds, drafted,
                           accepted, length, draft_ms, verify_ms, _per_position(runs), k, alpha, c, bound, efficiency,
                           None if mismatches is None else len(mismatches), mismatches or [])


def _per_position(runs: list[dict]) -> list[float]:
    acc = [sum(col) for col in zip(*(r["accepted_per_position"] for r in runs))]
    drf = [sum(col) for col in zip(*(r["drafted_per_position"] for r in runs))]
    last = max((i for i, d in enumerate(drf) if d), default=-1)
    return [acc[i] / drf[i] if drf[i] else 0.0 for i in range(last + 1)]


def first_difference(a: list[int], b: list[int]) -> int:
    """Index of the first differing token (the shorter length when one is a prefix of the other)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _fmt(v: float | None, spec: str, suffix: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{suffix}"


def _rows_to_text(header: list[str], rows: list[list[str]]) -> list[str]:
    """Numbers right-aligned; the first (name) and last (free text) columns left-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    last = len(header) - 1

    def line(r: list[str]) -> str:
        cells = (c.ljust(w) if i in (0, last) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        return "  ".join(cells).rstrip()

    return [line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def render_verify_costs(costs: dict[str, dict[int, float]]) -> str:
    """What a verify forward cost by its rows, as each strategy's engine measured it: the price of a wider tree."""
    lines = ["verify ms by rows (the engine's timer, moving average):"]
    lines += [f"  {name}: " + " ".join(f"{rows}:{ms:.1f}" for rows, ms in by_rows.items())
              for name, by_rows in costs.items() if by_rows]
    return "\n".join(lines)


def render_table(summary: dict[str, dict], peers: dict[str, dict], num_prompts: int) -> str:
    """The strategies, their losslessness check, then the peers, as fixed-width text."""
    header = ["strategy", "tok/s", "decode tok/s", "speedup", "accept len", "nodes/round", "draft ms", "verify ms",
              "alpha", "c", "bound", "efficiency", "greedy ==", "acceptance per position"]
    rows = [[name, _fmt(s["tokens_per_s"], ".2f"), _fmt(s["decode_tokens_per_s"], ".2f"),
             _fmt(s["speedup"], ".2f", "x"), _fmt(s["mean_acceptance_length"], ".2f"),
             _fmt(s["draft_tokens"] / s["rounds"] if s["rounds"] else None, ".1f"),
             _fmt(s["draft_ms_per_round"], ".1f"), _fmt(s["verify_ms_per_round"], ".1f"), _fmt(s["alpha"], ".3f"),
             _fmt(s["c"], ".3f"), _fmt(s["bound"], ".2f", "x"), _fmt(s["efficiency"], ".0%"),
             _equality_cell(s, num_prompts),
             " ".join(f"{p:.2f}" for p in s["acceptance_per_position"]) or "-"] for name, s in summary.items()]
    lines = _rows_to_text(header, rows)
    lines += _mismatch_alarms(summary)
    if peers:
        lines += ["", *_peer_lines(peers)]
    return "\n".join(lines)


def _equality_cell(s: dict, num_prompts: int) -> str:
    if s["greedy_mismatches"] is None:
        return "n/a (T>0)"
    if s["greedy_mismatches"] == 0:
        return f"{num_prompts}/{num_prompts} ok"
    return f"MISMATCH {s['greedy_mismatches']}/{num_prompts}"


def _mismatch_alarms(summary: dict[str, dict]) -> list[str]:
    """A lossless strategy that changes greedy output is a correctness bug, not a statistic: shout it."""
    lines = []
    for name, s in summary.items():
        for m in s["mismatched_prompts"]:
            kind = "LOSSLESSNESS VIOLATED" if s["lossless"] else "differs (lossy strategy)"
            lines.append(f"!!! {name}: {kind} on prompt {m['prompt_index']}: output differs from autoregressive "
                         f"from token {m['first_difference']}")
    return lines


def _peer_lines(peers: dict[str, dict]) -> list[str]:
    header = ["peer", "plain tok/s", "spec tok/s", "spec speedup", "spec == plain", "note"]
    rows = []
    for name, p in peers.items():
        cell = "-"
        if p.get("identical_runs") is not None:
            by = "ids" if p["compared_by"] == "token_ids" else "text"
            cell = f"{p['identical_runs']}/{p['compared_runs']} ({by})"
        note = f"FAILED: {p['error'].splitlines()[0]}" if p.get("error") else p.get("note", "")
        rows.append([name, _fmt(p.get("plain_tokens_per_s"), ".2f"), _fmt(p.get("spec_tokens_per_s"), ".2f"),
                     _fmt(p.get("speedup"), ".2f", "x"), cell, note])
    return _rows_to_text(header, rows)


def new_figure(figsize: tuple[float, float]):
    """(fig, ax) drawn off-screen: a bench plot is written to a file, on servers without a display."""
    import matplotlib

    matplotlib.use("Agg")  # must precede pyplot's import
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize)


def save_figure(fig, path: Path) -> Path:
    """Write `fig` as a PNG at `path` (its folder made if missing) and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_throughput(summary: dict[str, dict], peers: dict[str, dict], path: Path, title: str) -> Path:
    """Bar chart of tokens/s per strategy and per peer mode, each bar labelled with its speedup."""
    labels, values, notes, colors = [], [], [], []
    for name, s in summary.items():
        labels.append(name)
        values.append(s["tokens_per_s"])
        notes.append(_fmt(s["speedup"], ".2f", "x"))
        colors.append("tab:blue" if name != BASELINE else "tab:gray")
    for name, p in peers.items():
        for mode, key, note in (("plain", "plain_tokens_per_s", "1.00x"),
                                ("spec", "spec_tokens_per_s", _fmt(p.get("speedup"), ".2f", "x"))):
            if p.get(key) is not None:
                labels.append(f"{name}\n{mode}")
                values.append(p[key])
                notes.append(note)
                colors.append("tab:orange")
    fig, ax = new_figure((max(5.0, 1.2 * len(labels)), 4.0))
    bars = ax.bar(range(len(values)), values, color=colors)
    for bar, note in zip(bars, notes):
        ax.annotate(note, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    xytext=(0, 2), textcoords="offset points", fontsize=9)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("tokens / s")
    ax.set_title(title, fontsize=9)
    ax.margins(y=0.15)
    return save_figure(fig, path)
