"""Accuracy vs measured removed fraction, one PNG per task, one panel per context length (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

STYLES = {  # method -> (label, marker)
    "full": ("full cache", "*"),
    "kvzap_linear": ("KVzap linear (τ sweep)", "o"),
    "kvzap_mlp": ("KVzap MLP (τ sweep)", "s"),
    "oracle": ("KVzip+ oracle (top-k)", "^"),
    "streaming_llm": ("StreamingLLM", "v"),
    "random": ("random", "x"),
    "knorm": ("KNorm", "d"),
}


def plot_task(rows: list[dict], task: str, path: Path) -> Path:
    """Write ``path``: rows are ``fidelity.summarize`` entries of one task (method, length, accuracy, removed_fraction)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({row["length"] for row in rows})
    fig, axes = plt.subplots(1, max(len(lengths), 1), figsize=(5 * max(len(lengths), 1), 4), squeeze=False)
    for ax, length in zip(axes[0], lengths):
        here = [row for row in rows if row["length"] == length]
        for method, (label, marker) in STYLES.items():
            points = sorted((row["removed_fraction"] * 100, row["accuracy"]) for row in here if row["method"] == method)
            if not points:
                continue
            if method == "full":
                ax.axhline(points[0][1], color="black", linestyle="--", linewidth=1, label=label)
                continue
            ax.plot([x for x, _ in points], [y for _, y in points], marker=marker, label=label)
        samples = max((row["samples"] for row in here), default=0)
        ax.set(title=f"{task}, {length} tokens ({samples} samples/point)", xlabel="removed fraction (%)",
               ylabel="accuracy (%)", xlim=(-2, 100), ylim=(-5, 105))  # fmt: skip
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
