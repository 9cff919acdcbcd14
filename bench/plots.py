"""Figures of the benchmark rows (matplotlib, Agg backend; imported only when matplotlib is present).

Each function takes the rows a benchmark wrote to its JSON and returns a Figure (or None when
there is nothing to draw).
"""

from __future__ import annotations

from collections import defaultdict


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def acceptance_per_position(rows: list[dict]):
    """Unconditional (top) and conditional (bottom) acceptance by draft position, one column per
    (temperature, draft mode), one line per draft shape."""
    spec_rows = [r for r in rows if r["kind"] != "plain" and r["acceptance_unconditional"]]
    if not spec_rows:
        return None
    settings = sorted({(r["temperature"], r["draft_mode"]) for r in spec_rows})
    configs = list(dict.fromkeys(r["config"] for r in spec_rows))
    plt = _plt()
    colour = {c: plt.get_cmap("tab10")(i % 10) for i, c in enumerate(configs)}
    fig, axes = plt.subplots(2, len(settings), figsize=(4.2 * len(settings), 6.4), squeeze=False, sharey=True)
    for col, (temp, mode) in enumerate(settings):
        for r in (r for r in spec_rows if (r["temperature"], r["draft_mode"]) == (temp, mode)):
            xs = list(range(1, len(r["acceptance_unconditional"]) + 1))
            style = {"marker": "o", "color": colour[r["config"]], "label": r["label"]}
            axes[0][col].plot(xs, r["acceptance_unconditional"], **style)
            cond = [c if c is not None else float("nan") for c in r["acceptance_conditional"]]
            axes[1][col].plot(xs, cond, **style)
        axes[0][col].set_title(f"T={temp:g}, {mode} drafts")
        for row, what in enumerate(("unconditional", "conditional")):
            ax = axes[row][col]
            ax.set_ylim(0, 1.02)
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.set_xlabel("draft position")
            ax.grid(alpha=0.3)
            if col == 0:
                ax.set_ylabel(f"{what} acceptance")
    axes[0][0].legend(fontsize=7, loc="best")
    fig.suptitle("MTP draft acceptance per position")
    fig.tight_layout()
    return fig


def acceptance_speedup(rows: list[dict]):
    """Speedup over plain decoding (same temperature) against verified nodes per step."""
    spec_rows = [r for r in rows if r["kind"] != "plain" and r.get("speedup") is not None]
    if not spec_rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    groups = defaultdict(list)
    for r in spec_rows:
        groups[(r["temperature"], r["draft_mode"])].append(r)
    for (temp, mode), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["nodes"])
        ax.plot([r["nodes"] for r in rs], [r["speedup"] for r in rs], marker="o", linestyle="",
                label=f"T={temp:g}, {mode}")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xlabel("verified draft nodes per step")
    ax.set_ylabel("speedup over plain")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def speedup_vs_shape(rows: list[dict]):
    """Left: speedup against chain depth, per batch size and draft vocabulary. Right: speedup
    against verified nodes per step for every draft shape (chains, trees, auto), per batch size."""
    spec_rows = [r for r in rows if r["kind"] != "plain"]
    if not spec_rows:
        return None
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for batch in sorted({r["batch_size"] for r in spec_rows}):
        for vocab in sorted({r.get("draft_vocab") or 0 for r in spec_rows}):  # a line per draft vocabulary
            chains = sorted((r for r in spec_rows if r["batch_size"] == batch and r["kind"] == "chain"
                             and (r.get("draft_vocab") or 0) == vocab), key=lambda r: r["depth"])
            if chains:
                left.plot([r["depth"] for r in chains], [r["speedup"] for r in chains], marker="o",
                          label=f"batch {batch}" + (f" @{vocab}" if vocab else ""))
        rs = sorted((r for r in spec_rows if r["batch_size"] == batch), key=lambda r: r["nodes"])
        right.plot([r["nodes"] for r in rs], [r["speedup"] for r in rs], marker="o", linestyle="",
                   label=f"batch {batch}")
        for r in rs:
            right.annotate(r["label"], (r["nodes"], r["speedup"]), fontsize=6, xytext=(3, 3),
                           textcoords="offset points")
    left.xaxis.get_major_locator().set_params(integer=True)
    right.xaxis.get_major_locator().set_params(integer=True)
    for ax, xlabel in ((left, "chain draft depth"), (right, "verified draft nodes per step (chains, trees, auto)")):
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a panel with nothing to show gets no legend
            ax.legend(fontsize=8)
    left.set_ylabel("speedup over plain (tokens/s ratio)")
    fig.tight_layout()
    return fig


def tokens_per_s_vs_batch(rows: list[dict]):
    """Tokens/s against batch size, one line per configuration (auto as one line)."""
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    by_key = defaultdict(list)
    for r in rows:
        by_key[r["config"]].append(r)
    for key, rs in by_key.items():
        rs = sorted(rs, key=lambda r: r["batch_size"])
        ax.plot([r["batch_size"] for r in rs], [r["tokens_per_s"] for r in rs], marker="o", label=key,
                linewidth=2.2 if key == "plain" else 1.2)
    sizes = sorted({r["batch_size"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.minorticks_off()
    ax.set_xlabel("batch size")
    ax.set_ylabel("tokens/s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def peers_tokens_per_s(rows: list[dict]):
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    names = [r["decoder"] for r in rows][::-1]
    ax.barh(names, [r["tokens_per_s"] for r in rows][::-1])
    ax.set_xlabel("tokens/s (batch 1, greedy)")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return fig


def serve_tokens_per_s(rows: list[dict]):
    """Serving: output tokens/s per load (closed-loop clients, Poisson rates), one bar per configuration."""
    rows = [r for r in rows if "mode" in r]
    if not rows:
        return None
    plt = _plt()
    loads = list(dict.fromkeys(r["mode"] for r in rows))
    configs = list(dict.fromkeys(r["config"] for r in rows))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    width = 0.8 / len(configs)
    for k, config in enumerate(configs):
        value = {r["mode"]: r["tokens_per_s"] for r in rows if r["config"] == config}
        xs = [i + k * width for i, load in enumerate(loads) if load in value]
        ax.bar(xs, [value[load] for load in loads if load in value], width, label=config)
    ax.set_xticks([i + width * (len(configs) - 1) / 2 for i in range(len(loads))], loads)
    ax.set_ylabel("output tokens/s")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def soak_over_time(samples: list[dict]):
    """Soak: resident memory, and running requests and cache blocks held, against time."""
    if not samples:
        return None
    plt = _plt()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.4, 5.2), sharex=True)
    t = [s["t_s"] for s in samples]
    top.plot(t, [s["rss_mb"] for s in samples])
    top.set_ylabel("RSS MiB")
    for key, label in (("running", "running requests"), ("blocks_used", "cache blocks held")):
        bottom.plot(t, [s[key] for s in samples], label=label)
    bottom.set_xlabel("seconds")
    bottom.legend(fontsize=7)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
