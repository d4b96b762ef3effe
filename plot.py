"""
Training curves from train.py's log.jsonl, several runs overlaid:

    python plot.py out-shapes                             # -> out-shapes/curves.png
    python plot.py out-a out-b --out=docs/compare.png     # two runs, one picture

Four panels over the iterations: the training loss (lines) and validation loss (dots), the learning rate, and
tanh(attn_gate) and tanh(ff_gate) of each gated block: 0 is the bare LM, and the Flamingo paper plots the same for
its model, the gates opening layer by layer. A vector gate (IDEFICS's) is logged as the mean |tanh| over its channels.
Nothing here but what train.py already logs. matplotlib is an optional dependency: pip install matplotlib.
"""

import importlib
import os
import sys

import files


def read_run(folder):
    """A run's log.jsonl (its folder, or the file) -> (name, its records); SystemExit with a line if it has none."""
    path = folder if folder.endswith(".jsonl") else os.path.join(folder, "log.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"error: no training log at {path}")
    try:
        records = files.read_log(path)[0]  # a torn last line (a run killed mid-write) is left out
    except OSError as e:
        raise SystemExit(f"error: cannot read {path}: {files.message(e)}") from None
    if not records:
        raise SystemExit(f"error: {path} holds no records yet (train.py appends one every log_interval iterations)")
    return os.path.basename(os.path.dirname(os.path.abspath(path))), records


def series(records, key, sub=None):
    """(iterations, values) of the records that have `key` (and `sub` in it, for the gates)."""
    rows = [r for r in records if key in r and (sub is None or sub in r[key])]
    return [r["iter"] for r in rows], [r[key] if sub is None else r[key][sub] for r in rows]


def plot(runs, path):
    """runs: [(name, records)] -> a PNG at path, written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    (loss, lr), (attn, ff) = axes
    styles = ["-", "--", ":", "-."]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, (name, records) in enumerate(runs):
        c, ls = colors[j % len(colors)], styles[j % len(styles)]
        loss.plot(*series(records, "loss"), color=c, lw=1, label=f"{name} train")
        loss.plot(*series(records, "val_loss"), "o", color=c, ms=4, label=f"{name} val")
        lr.plot(*series(records, "lr"), color=c, label=name)
        layers = sorted({k.split(".")[0] for r in records for k in r.get("gates", {})}, key=int)
        for i, layer in enumerate(layers):  # one color per block, one line style per run
            for ax, gate in ((attn, "attn_gate"), (ff, "ff_gate")):
                ax.plot(*series(records, "gates", f"{layer}.{gate}"), ls, color=colors[i % len(colors)],
                        label=f"{name}: block {layer}" if len(runs) > 1 else f"block {layer}")
    loss.set(title="loss", yscale="log")
    lr.set(title="learning rate")
    attn.set(title="tanh(attn_gate) per gated block (before LM layer i)")
    ff.set(title="tanh(ff_gate) per gated block")
    for ax in axes.flat:
        ax.set_xlabel("iteration")
        if ax.lines:
            ax.legend(fontsize=7)
    for ax in (attn, ff):
        ax.axhline(0, color="gray", lw=0.5)
    fig.tight_layout()
    files.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=90))
    plt.close(fig)


def main(argv):
    out = next((a.split("=", 1)[1] for a in argv if a.startswith("--out=")), None)
    folders = [a for a in argv if not a.startswith("--")]
    if not folders or any(a.startswith("--") and not a.startswith("--out=") for a in argv):
        raise SystemExit("usage: python plot.py OUT_DIR [OUT_DIR ...] [--out=curves.png]")
    try:
        importlib.import_module("matplotlib")
    except ImportError:
        raise SystemExit("error: plot.py draws with matplotlib: pip install matplotlib") from None
    runs = [read_run(f) for f in folders]
    out = out or os.path.join(folders[0] if os.path.isdir(folders[0]) else os.path.dirname(folders[0]), "curves.png")
    try:
        plot(runs, out)
    except files.FileError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
