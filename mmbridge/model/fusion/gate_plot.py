"""The gate figure of gated cross-attention, written as PNG with matplotlib's Agg backend (no display needed).

:func:`plot_gates` draws Flamingo's figure of the tanh gates of the gated cross-attention
blocks (Alayrac et al. 2022, Fig. 6): |tanh(α)| per layer at the end of a stage, for the
cross-attention and the dense (FFW) gate, beside their mean over layers at every step.
"""

from __future__ import annotations

import os

from mmbridge.utils import atomic_path


def plot_gates(records: list[dict], path: str, title: str = "") -> str:
    """Draw the ``gates`` entries of training-log ``records`` into ``path``; returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot
    from matplotlib.ticker import MaxNLocator

    logged = [record for record in records if "gates" in record]
    if not logged:
        raise ValueError("no record carries 'gates' (only gated cross-attention bridges log them)")
    last = logged[-1]["gates"]
    figure, (per_layer, over_steps) = pyplot.subplots(1, 2, figsize=(10, 3.6))
    for kind, marker in (("attn", "o"), ("dense", "s")):
        per_layer.plot(last["layers"], last[kind], marker=marker, label=f"{kind} gate")
        means = [sum(record["gates"][kind]) / len(record["gates"][kind]) for record in logged]
        over_steps.plot([record["global_step"] for record in logged], means, label=f"{kind}, mean over layers")
    per_layer.set(xlabel="decoder layer the block precedes", ylabel="|tanh(α)|",
                  title=f"gates at step {logged[-1]['global_step']}")
    over_steps.set(xlabel="optimizer step", ylabel="|tanh(α)|", title="gates during training")
    for axes in (per_layer, over_steps):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        axes.legend()
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
    pyplot.close(figure)
    return path
