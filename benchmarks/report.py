"""The report: results.md tables, PNG plots (matplotlib, optional), a comparison
with an earlier run, and README.md's Performance section."""

from __future__ import annotations

import math
import os
import re
import shutil
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLOTS_IN_REPO = os.path.join("benchmarks", "plots")
MAX_COMMITTED_PLOT = 200 * 1024
BEGIN, END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"

FLOOR_PARAGRAPH = (
    "Each figure is ours next to its *floor*, the fastest way to do the same with no "
    "runtime (an `os.fork` and a pipe handshake, a `multiprocessing` child's sentinel, a "
    "`multiprocessing.Pipe` round trip to a forked echo process, a one-process server), "
    "measured in the same run and interleaved with ours sample by sample, because this "
    "shared machine's absolute times drift. The ratio is ours' median cost over the "
    "floor's (for a rate, the floor's rate over ours): 1.0x is as cheap as the floor. "
    "p99 is the worst 1% of the samples; where a target is set on a tail (p90, p99), it is "
    "for the ratio of ours' tail to the floor's.")


def fmt(value: float, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if unit.endswith("/s") or abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def ratio_text(fig: dict[str, Any]) -> str:
    """A figure's ratio (or a tail's: anything with a "ratio")."""
    r = fig["ratio"]
    return "-" if r is None or math.isnan(r) else f"{r:.2f}x"


def targets(fig: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target of a figure: the medians' (``stat`` "median"), then each tail's
    ("p99": ours' p99 over the floor's), with its ratio and whether it was met."""
    out = []
    if fig.get("target") is not None:
        out.append({"stat": "median", "ratio": fig["ratio"], "target": fig["target"],
                    "met": fig["met"]})
    for tail in fig.get("tails", []):
        out.append({"stat": f"p{tail['q']}", **tail})
    return out


def met_text(t: dict[str, Any]) -> str:
    return "met" if t["met"] else "missed"


def target_text(fig: dict[str, Any]) -> str:
    parts = []
    for t in targets(fig):
        if t["stat"] == "median":
            parts.append(f"<= {t['target']}x: {met_text(t)}")
        else:
            parts.append(f"{t['stat']} {ratio_text(t)} <= {t['target']}x: {met_text(t)}")
    return "; ".join(parts)


def target_line(fig: dict[str, Any], t: dict[str, Any]) -> str:
    """One target of a figure in words, for the lists of targets."""
    if t["stat"] == "median":
        return f"{fig['name']}, {ratio_text(t)} of {fig['floor']['name']}"
    u = fig["unit"]
    return (f"{fig['name']}, {t['stat']}: {fmt(t['ours'], u)} {u}, {ratio_text(t)} of "
            f"{fig['floor']['name']}'s {t['stat']} ({fmt(t['floor'], u)} {u})")


def machine_line(results: dict[str, Any]) -> str:
    m = results["machine"]
    pin = f"pinned to CPU {m['pinned_cpu']}" if m["pinned_cpu"] is not None else "not pinned"
    own = [f"{label} on CPU {part['pinned_cpu']}" for label, part in results["parts"].items()
           if part.get("pinned_cpu") not in (None, m["pinned_cpu"])]
    if own:
        pin += f" ({', '.join(own)}: pinned by default)"
    dirty = " (with uncommitted changes)" if m.get("git_dirty") else ""
    return (f"{m['cpu_model']} x {m['cpu_count']}, {m['memory_mib']:,} MiB, Linux "
            f"{m['kernel']}, Python {m['python']}, start method {m['start_method']} (spawn "
            f"part: each), {pin}, commit {m['git_commit'][:10]}{dirty}; load average "
            f"{m['load_average_at_start']} at the start, {m.get('load_average_at_end', '?')} "
            f"at the end")


def table(figures: list[dict[str, Any]], short: bool = False) -> list[str]:
    if short:
        lines = ["| figure | floor | ours | floor | ratio | target |", "|---|---|---|---|---|---|"]
    else:
        lines = ["| figure | floor | ours median | ours p99 | floor median | floor p99 | ratio "
                 "| target | n (ours/floor) |", "|---|---|---|---|---|---|---|---|---|"]
    for fig in figures:
        u = fig["unit"]
        o, f = fig["ours"], fig["floor"]
        if short:
            lines.append(f"| {fig['name']} | {f['name']} | {fmt(o['median'], u)} {u} | "
                         f"{fmt(f['median'], u)} {u} | {ratio_text(fig)} | {target_text(fig)} |")
        else:
            lines.append(f"| {fig['name']} | {f['name']} | {fmt(o['median'], u)} {u} | "
                         f"{fmt(o['p99'], u)} {u} | {fmt(f['median'], u)} {u} | "
                         f"{fmt(f['p99'], u)} {u} | {ratio_text(fig)} | {target_text(fig)} | "
                         f"{o['n']}/{f['n']} |")
    return lines


def markdown(results: dict[str, Any]) -> str:
    lines = [f"# Benchmarks{' (quick)' if results['quick'] else ''}", "",
             f"`{results['command']}`, started {results['started']}, "
             f"{results['seconds']:.0f} s.", "", machine_line(results), "",
             FLOOR_PARAGRAPH, ""]
    by_part: dict[str, list[dict[str, Any]]] = {}
    for fig in results["figures"]:
        by_part.setdefault(fig["part"], []).append(fig)
    for label, part in results["parts"].items():
        said = [f"{part['seconds']} s"] if part["seconds"] else []
        if part.get("pinned_cpu") is not None:
            said.append(f"pinned to CPU {part['pinned_cpu']}")
        lines.append(f"## {label}" + (f" ({', '.join(said)})" if said else ""))
        lines.append("")
        if part["error"]:
            lines += [f"**Failed:** {part['error']}", ""]
        for note in part["notes"]:
            lines.append(f"- {note}")
        if part["notes"]:
            lines.append("")
    for name, figs in by_part.items():
        lines += [f"## Figures: {name}", "", *table(figs), ""]
    every = [(f, t) for f in results["figures"] for t in targets(f)]
    if every:
        lines += ["## Targets", ""]
        for f, t in every:
            lines.append(f"- {target_line(f, t)}: target {t['target']}x: **{met_text(t)}**")
        lines.append("")
    for plot in results.get("plots", []):
        lines.append(f"![{os.path.splitext(os.path.basename(plot))[0]}]({os.path.basename(plot)})")
    if results.get("plot_note"):
        lines.append(results["plot_note"])
    return "\n".join(lines) + "\n"


def compare(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Each figure of ``new`` beside ``old``'s: medians and ratios, with the change."""
    before = {f["key"]: f for f in old["figures"]}
    lines = [f"compared with the run of {old.get('started', '?')} "
             f"(commit {old['machine'].get('git_commit', '')[:10]})",
             f"{'figure':<60} {'old':>10} {'new':>10} {'unit':<6}{'change':>8}   "
             f"{'old ratio':>9} {'new ratio':>9}"]
    for fig in new["figures"]:
        prev = before.get(fig["key"])
        if prev is None:
            lines.append(f"{fig['key']:<60} {'(new figure)':>21}")
            continue
        u = fig["unit"]
        a, b = prev["ours"]["median"], fig["ours"]["median"]
        change = (b - a) / a * 100 if a else math.nan
        lines.append(f"{fig['key']:<60} {fmt(a, u):>10} {fmt(b, u):>10} {u:<6}{change:+7.1f}%   "
                     f"{ratio_text(prev):>9} {ratio_text(fig):>9}")
    gone = sorted(set(before) - {f["key"] for f in new["figures"]})
    if gone:
        parts = sorted({key.split(".")[0] for key in gone})
        lines.append(f"and {len(gone)} figures of the earlier run not in this one "
                     f"(parts: {', '.join(parts)})")
    return "\n".join(lines)


# ------------------------------------------------------------------ plots


def plots(results: dict[str, Any], out: str) -> tuple[list[str], str]:
    """Write the plots; (their paths, a note when they were skipped)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return [], ("plots skipped: matplotlib is not installed "
                    "(pip install -e '.[bench]' to have them)")
    written = []
    scale = results["series"].get("scale")
    if scale and scale.get("n"):
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(scale["n"], scale["create_median_ms"], "o-", label="registry.create, median")
        ax.plot(scale["n"], scale["create_p99_ms"], "o:", label="registry.create, p99")
        ax.plot(scale["n"], scale["floor_median_ms"], "s-",
                label="floor: os.fork + handshake (small process)")
        td = scale.get("teardown", {})
        if td.get("n"):
            ax.plot(td["n"], td["ours_ms"], "^-", label="teardown (kv.stop), per bucket")
            ax.plot(td["n"], td["floor_ms"], "v-", label="floor: SIGKILL + reap, per child")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("live buckets")
        ax.set_ylabel("ms per bucket")
        ax.set_title("kv: creating and tearing down buckets as they accumulate")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out, "scale.png")
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    every = [f for f in results["figures"] if not math.isnan(f["ratio"] or math.nan)]
    for filename, figs in (("ratios.png", [f for f in every if f.get("headline")]),
                           ("ratios_all.png", every)):
        if not figs:
            continue
        fig, ax = plt.subplots(figsize=(11, 0.22 * len(figs) + 1.2))
        names = [f"{f['name']}  vs  {f['floor']['name']}"[:110] for f in figs]
        ax.barh(range(len(figs)), [f["ratio"] for f in figs],
                color=["tab:red" if any(t["met"] is False for t in targets(f)) else "tab:blue"
                       for f in figs])
        ax.set_yticks(range(len(figs)), names, fontsize=6)
        ax.invert_yaxis()
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
        ax.tick_params(axis="x", which="both", labelsize=7)
        ax.set_xlabel("cost ratio to the floor (1x: as cheap as the floor; red: target missed)")
        fig.subplots_adjust(left=0.52, right=0.98, top=0.99, bottom=0.6 / (0.22 * len(figs) + 1.2))
        path = os.path.join(out, filename)
        fig.savefig(path, dpi=72)
        plt.close(fig)
        written.append(path)
    return written, ""


# ------------------------------------------------------------------ README


def readme_section(results: dict[str, Any], plot_paths: list[str]) -> str:
    headline = [f for f in results["figures"] if f.get("headline")]
    lines = [BEGIN,
             "<!-- generated by `python -m benchmarks --readme RESULTS.json`; "
             "do not edit by hand -->", "",
             FLOOR_PARAGRAPH, "",
             "```sh",
             "pip install -e '.[bench]'    # matplotlib, for the plots (optional)",
             f"{results['command']}",
             "```", "",
             f"This run ({results['seconds']:.0f} s): {machine_line(results)}. The machine is "
             "shared and noisy: absolute times move by tens of percent between runs; the "
             "ratios move less. `python -m benchmarks --compare OLD/results.json` sets a run "
             "beside an earlier one.", "",
             *table(headline, short=True), ""]
    every = [(f, t) for f in results["figures"] for t in targets(f)]
    if every:
        met = [t for _, t in every if t["met"]]
        lines += [f"The issue's targets: {len(met)} of {len(every)} met in this run (every "
                  "one is in `results.md`):", ""]
        for f, t in every:
            lines.append(f"- {'met' if t['met'] else '**missed**'}: {target_line(f, t)} "
                         f"(target {t['target']}x)")
        lines.append("")
    notes = [n for p in results["parts"].values() for n in p["notes"]]
    if notes:
        lines += ["Notes from this run:", "", *[f"- {n}" for n in notes], ""]
    for path in plot_paths:
        lines.append(f"![{os.path.splitext(os.path.basename(path))[0]}]({path})")
    if plot_paths:
        lines.append("")
    lines += ["Every figure of the run (p99, sample counts, all payloads and sizes) is in its "
              "`results.md`; past measurements and what explains them are in "
              "[benchmarks/README.md](benchmarks/README.md).", END]
    return "\n".join(lines)


def update_readme(results_path: str, readme_path: str, plots_dir: str | None = None) -> str:
    """Replace the README's generated section with one made from ``results_path``;
    the run's plots (if small) are copied to ``plots_dir`` (default benchmarks/plots)."""
    import json

    with open(results_path) as f:
        results = json.load(f)
    run_dir = os.path.dirname(os.path.abspath(results_path))
    plots_dir = plots_dir or os.path.join(REPO, PLOTS_IN_REPO)
    committed = []
    for plot in results.get("plots", []):
        src = os.path.join(run_dir, os.path.basename(plot))
        if os.path.exists(src) and os.path.getsize(src) <= MAX_COMMITTED_PLOT:
            os.makedirs(plots_dir, exist_ok=True)
            dst = os.path.join(plots_dir, os.path.basename(plot))
            shutil.copyfile(src, dst)
            committed.append(os.path.relpath(dst, os.path.dirname(os.path.abspath(readme_path))))
    with open(readme_path) as f:
        text = f.read()
    section = readme_section(results, committed)
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        raise SystemExit(f"{readme_path} has no {BEGIN} ... {END} section")
    with open(readme_path, "w") as f:
        f.write(text)
    return f"{readme_path}: Performance regenerated from {results_path}" + (
        f"; plots copied to {plots_dir}" if committed else "")
