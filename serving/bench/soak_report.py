"""The soak suite's verdicts: request outcomes classified, the checks (greedy tokens, KV slots,
RSS growth, file descriptors, errors, faults) and the plot of latency and RSS over time."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Optional

from serving.bench.soak_load import Outcome
from serving.bench.soak_server import Sample

RSS_GROWTH_LIMIT = 0.05
RSS_SAMPLES = 5  # samples (about 1 s apart) in the baseline and in the final median
MIN_RSS_SPAN_S = 20.0  # from the first baseline sample to the last final one
FD_SLACK = 8  # descriptors a sampled process set may gain (sockets that come and go) and still be "flat"
FAULT_GRACE_S = 3.0  # after recovery, requests that started in the window may still fail


def classify(outcomes: list[Outcome], faults: list[dict]) -> None:
    """Set each outcome's classification: ok, cancelled by us, killed by us, fault (a typed error
    of a request in flight at a kill or started before recovery), lost, or unexplained."""
    for o in outcomes:
        if o.status == "ok":
            o.classification = "mismatch" if o.check == "mismatch" else "ok"
        elif o.status == "cancelled":
            o.classification = "mismatch" if o.check == "mismatch" else "cancelled by us"
        elif o.status == "killed":
            o.classification = "killed by us"
        else:
            window = next((f for f in faults if o.started <= (f.get("recovered_at") or f["at"] + 120) + FAULT_GRACE_S
                           and o.ended >= f["at"]), None)
            typed = not (o.error_type or "").startswith("unexpected")
            o.classification = "fault (typed error)" if window is not None and typed else "unexplained"


def _median(values: list[float]) -> Optional[float]:
    return statistics.median(values) if values else None


def rss_check(samples: list[Sample], warmup_s: float, load_end: float) -> dict[str, Any]:
    """RSS of tritonserver + stubs: the median of the first samples after warm-up vs of the last
    samples, over the server process that ran longest (a restart starts a new baseline; with
    faults that is one of the three processes, whose warm-up is at most a third of its time).
    By count, not by a fixed window: a loaded machine samples less often than asked."""
    spans: dict[int, list[Sample]] = {}
    for s in samples:
        if s.triton_pid and s.rss_mib is not None and s.t <= load_end:
            spans.setdefault(s.triton_pid, []).append(s)
    if not spans:
        return {"pass": False, "reason": "no RSS samples"}
    last_pid, mine = max(spans.items(), key=lambda item: item[1][-1].t - item[1][0].t)
    warmup_s = min(warmup_s, (mine[-1].t - mine[0].t) / 3)
    after = [s for s in mine if s.t >= mine[0].t + warmup_s]
    base, final = after[:RSS_SAMPLES], after[-RSS_SAMPLES:]
    if len(after) < 2 * RSS_SAMPLES or final[-1].t - base[0].t < MIN_RSS_SPAN_S:
        return {"pass": None, "reason": f"too little load after warm-up (or between restarts) to compare: "
                                        f"{len(after)} samples of pid {last_pid} over "
                                        f"{(after[-1].t - after[0].t) if after else 0:.1f} s"}
    b, f = _median([s.rss_mib for s in base]), _median([s.rss_mib for s in final])
    fd_b, fd_f = max(s.fds for s in base), max(s.fds for s in final)
    growth = f / b - 1
    return {"pass": growth <= RSS_GROWTH_LIMIT, "baseline_mib": round(b, 1), "final_mib": round(f, 1),
            "growth": round(growth, 4), "limit": RSS_GROWTH_LIMIT, "fds_baseline": fd_b, "fds_final": fd_f,
            "fds_pass": fd_f <= fd_b + FD_SLACK, "fd_slack": FD_SLACK, "samples": len(after),
            "span_s": round(final[-1].t - base[0].t, 1), "peak_mib": round(max(s.rss_mib for s in mine), 1)}


def checks(outcomes: list[Outcome], samples: list[Sample], *, warmup_s: float, load_end: float,
           kv_final: Optional[float], kv_wait_s: float, faults: list[dict], shutdown: dict) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.classification or "?"] = counts.get(o.classification or "?", 0) + 1
    greedy = [o for o in outcomes if o.check is not None]
    mismatched = [o.record() for o in outcomes if o.check == "mismatch"]
    unexplained = [o.record() for o in outcomes if o.classification == "unexplained"]
    rss = rss_check(samples, warmup_s, load_end)
    result: dict[str, Any] = {
        "greedy_tokens_match": {"pass": bool(greedy) and not mismatched, "checked": len(greedy),
                                "mismatched": mismatched[:10]},
        "kv_slots_back_to_zero": {"pass": kv_final == 0, "final": kv_final, "waited_s": round(kv_wait_s, 1)},
        "rss_growth": {k: v for k, v in rss.items() if not k.startswith("fd")},
        "fds_flat": {"pass": rss.get("fds_pass"), "baseline": rss.get("fds_baseline"),
                     "final": rss.get("fds_final"), "slack": FD_SLACK},
        "zero_unexplained_errors": {"pass": not unexplained, "count": len(unexplained),
                                    "examples": unexplained[:10]},
        "clean_shutdown": {"pass": not shutdown.get("hard_killed") and not shutdown.get("shm_left"), **shutdown},
        "outcomes": counts,
    }
    if faults:
        lost = [o.record() for o in outcomes if o.classification == "unexplained"
                and any(o.started > (f.get("recovered_at") or 0) for f in faults)]
        result["faults_survived"] = {"pass": all(f.get("recovered_at") for f in faults),
                                     "faults": faults, "lost_after_recovery": len(lost)}
    return result


def passed(result: dict[str, Any]) -> bool:
    """Every check passes (None: could not be judged, counts as a failure)."""
    return all(v.get("pass") is True for k, v in result.items() if isinstance(v, dict) and "pass" in v)


def plot(outcomes: list[Outcome], samples: list[Sample], faults: list[dict], path: Path, t0: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for kind in sorted({o.kind for o in outcomes}):
        xs = [o.started - t0 for o in outcomes if o.kind == kind and o.ttft_s is not None]
        ys = [o.ttft_s * 1000 for o in outcomes if o.kind == kind and o.ttft_s is not None]
        ax1.scatter(xs, ys, s=6, label=f"{kind} TTFT")
    done = [o for o in outcomes if o.status == "ok" and o.token_ids]
    ax1.scatter([o.started - t0 for o in done], [(o.ended - o.started) * 1000 / max(1, len(o.token_ids)) for o in done],
                s=4, c="k", marker="x", label="ms per token (whole request)")
    ax1.set_yscale("log")
    ax1.set_ylabel("latency (ms)")
    ax1.legend(fontsize=7, loc="upper right")
    ax2.plot([s.t - t0 for s in samples if s.rss_mib], [s.rss_mib for s in samples if s.rss_mib], label="RSS MiB")
    ax2.set_ylabel("tritonserver + stubs RSS (MiB)")
    ax3 = ax2.twinx()
    ax3.plot([s.t - t0 for s in samples], [s.kv_active if s.kv_active is not None else float("nan") for s in samples],
             c="tab:orange", lw=0.8, label="KV slots active")
    ax3.set_ylabel("KV slots active")
    for ax in (ax1, ax2):
        for f in faults:
            ax.axvline(f["at"] - t0, c="r", ls="--", lw=0.8)
            if f.get("recovered_at"):
                ax.axvline(f["recovered_at"] - t0, c="g", ls=":", lw=0.8)
    ax2.set_xlabel("seconds since the load started (red: kill, green: recovered)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
