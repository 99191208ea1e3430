"""Tables and plots from ``bench/gpu_evidence.py`` JSON files (one or several runs).

    python bench/evidence_report.py bench/results/evidence-*.json \
        --markdown bench/results/evidence.md --plots bench/results/plots

Ratios are only formed between rows of the same run (same machine, same warm state).
"""
from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from typing import Dict, List, Optional


def load(paths: List[str]) -> List[dict]:
    runs = []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        data["path"] = path
        runs.append(data)
    return runs


def fmt(x: Optional[float], digits: int = 3) -> str:
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def mib(x: Optional[int]) -> str:
    return "-" if x is None else f"{x / 2 ** 20:,.0f}"


def block_table(run: dict) -> List[str]:
    rows = [r for r in run["rows"] if r["part"] == "block"]
    if not rows:
        return []
    by = {(r["case"], r["pass_"], r["variant"]): r for r in rows}
    cases = list(dict.fromkeys(r["case"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    out = ["| (B, T, Nv) | pass | " + " | ".join(f"{v} ms" for v in variants)
           + " | best kernel vs reference | vs reference+compile | peak MiB (best kernel / reference / compiled) |",
           "|---|---|" + "---|" * (len(variants) + 3)]
    kernels = [v for v in variants if not v.startswith("reference")]
    for case in cases:
        for pass_ in ("fwd", "fwd+bwd"):
            got = {v: by.get((case, pass_, v)) for v in variants}
            times = {v: r["ms"] for v, r in got.items() if r}
            best = min((v for v in kernels if v in times), key=times.get, default=None)
            ref, comp = times.get("reference"), times.get("reference+compile")
            mem = lambda v: mib(got[v]["peak_bytes"]) if got.get(v) else "-"  # noqa: E731
            out.append(f"| {case} | {pass_} | " + " | ".join(fmt(times.get(v)) for v in variants)
                       + f" | {fmt(ref / times[best]) + 'x' if best and ref else '-'}"
                       + f" | {fmt(comp / times[best]) + 'x' if best and comp else '-'}"
                       + f" | {mem(best) if best else '-'} / {mem('reference')} / {mem('reference+compile')} |")
    return out


def rate_table(rows: List[dict], caption: str, row_keys, row_names, rate: str, share: str) -> List[str]:
    """One row per distinct ``row_keys`` values, one column per variant: the rate and, when
    known, its share of the run's measured peak."""
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    out = [caption, "", "| " + " | ".join(row_names) + " | " + " | ".join(variants) + " |",
           "|" + "---|" * (len(row_names) + len(variants))]
    by = {(tuple(r.get(k) for k in row_keys), r["variant"]): r for r in rows}
    for key in dict.fromkeys(tuple(r.get(k) for k in row_keys) for r in rows):
        cells = []
        for v in variants:
            r = by.get((key, v))
            cells.append("-" if r is None else f"{fmt(r[rate])} ({r[share] * 100:.0f}%)"
                         if r.get(share) else fmt(r[rate]))
        out.append("| " + " | ".join(str(k) for k in key) + " | " + " | ".join(cells) + " |")
    return out


def attention_table(run: dict) -> List[str]:
    rows = [r for r in run["rows"] if r["part"] == "attention"]
    if not rows:
        return []
    caption = (f"Retrieval alone, TFLOP/s (share of the measured {fmt(run['meta'].get('matmul_tflops'))} "
               "TFLOP/s bf16 matmul peak); backward counts 2.5x the forward FLOPs.")
    return rate_table(rows, caption, ("case", "pass_"), ("(B, T, Nv)", "pass"), "tflops", "of_peak")


def decode_table(run: dict) -> List[str]:
    rows = [r for r in run["rows"] if r["part"] == "decode"]
    if not rows:
        return []
    by = {(r["case"], r["variant"], r["mode"]): r for r in rows}
    out = ["| (B, Nv) | floor us | " + " | ".join(
        f"{v} {m} us" for v, m in dict.fromkeys((r["variant"], r["mode"]) for r in rows)) + " |"]
    cols = list(dict.fromkeys((r["variant"], r["mode"]) for r in rows))
    out.append("|---|---|" + "---|" * len(cols))
    for case in dict.fromkeys(r["case"] for r in rows):
        first = next(r for r in rows if r["case"] == case)
        floor = first.get("floor_ms")
        cells = []
        for v, m in cols:
            r = by.get((case, v, m))
            cells.append("-" if r is None else
                         f"{fmt(r['ms'] * 1e3)} ({fmt(r['over_floor'], 2)}x)" if r.get("over_floor") else fmt(r["ms"] * 1e3))
        out.append(f"| {case} | {fmt(floor * 1e3 if floor else None)} | " + " | ".join(cells) + " |")
    return out


def op_table(run: dict) -> List[str]:
    rows = [r for r in run["rows"] if r["part"] == "decode-op"]
    if not rows:
        return []
    caption = (f"Memory-bound ops, GB/s (share of the measured {fmt(run['meta'].get('copy_gbs'))} "
               "GB/s copy rate).")
    return rate_table(rows, caption, ("op", "case"), ("op", "case"), "gbs", "of_copy")


def e2e_table(run: dict) -> List[str]:
    """Per (batch, variant): medians over the interleaved rounds (one row per round in the
    JSON), and the decode overhead against no PVM from those medians."""
    rows = [r for r in run["rows"] if r["part"] == "e2e"]
    if not rows:
        return []
    groups: Dict[tuple, List[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["B"], r["variant"])].append(r)

    def median(vals):
        vals = sorted(v for v in vals if v is not None)
        return vals[len(vals) // 2] if vals else None

    out = ["| batch | variant | rounds | new tokens | total s | prefill s | tokens/s | decode tokens/s "
           "| overhead vs no PVM (decode) |", "|---|---|---|---|---|---|---|---|---|"]
    med = {key: {k: median(r.get(k) for r in rs) for k in
                 ("total_s", "prefill_s", "tokens_per_s", "decode_tokens_per_s")}
           for key, rs in groups.items()}
    for (B, variant), rs in groups.items():
        m, base = med[(B, variant)], med.get((B, "no PVM"), {}).get("decode_tokens_per_s")
        over = (base / m["decode_tokens_per_s"] - 1) * 100 if base and m["decode_tokens_per_s"] else None
        out.append(f"| {B} | {variant} | {len(rs)} | {rs[0]['new_tokens']} | {fmt(m['total_s'])} | "
                   f"{fmt(m['prefill_s'])} | {fmt(m['tokens_per_s'])} | {fmt(m['decode_tokens_per_s'])} | "
                   f"{'-' if over is None else f'{over:+.1f}%'} |")
    return out


def markdown(runs: List[dict]) -> str:
    parts = []
    for run in runs:
        m = run["meta"]
        v = m.get("versions", {})
        parts.append(f"### {m['device']} ({os.path.basename(run['path'])})\n")
        parts.append(f"{m.get('date')}; torch {v.get('torch')}, triton {v.get('triton')}, "
                     f"transformers {v.get('transformers')}, {m.get('dtype')}; default backend "
                     f"`{m.get('default_backend')}`; measured peaks: bf16 matmul "
                     f"{fmt(m.get('matmul_tflops'))} TFLOP/s, copy {fmt(m.get('copy_gbs'))} GB/s.\n")
        for title, table in (("PVM block, 8B shapes", block_table(run)),
                             ("Retrieval vs SDPA", attention_table(run)),
                             ("Decode step (one PVM layer, merge with the FFN output)", decode_table(run)),
                             ("Decode and merge ops", op_table(run)),
                             ("End to end (greedy generate)", e2e_table(run))):
            if table:
                parts.append(f"#### {title}\n")
                parts.append("\n".join(table) + "\n")
        if run.get("errors"):
            parts.append("#### Errors\n")
            parts.extend(f"- {e['where']}: `{e['error'].splitlines()[-1][:300]}`" for e in run["errors"])
            parts.append("")
    return "\n".join(parts)


def plots(runs: List[dict], folder: str) -> List[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    written = []
    for run in runs:
        tag = run["meta"]["device"].replace(" ", "-")
        rows = [r for r in run["rows"] if r["part"] == "block"]
        if rows:
            fig, axes = plt.subplots(1, 2, figsize=(11, 4))
            for ax, pass_ in zip(axes, ("fwd", "fwd+bwd")):
                sel = [r for r in rows if r["pass_"] == pass_]
                cases = list(dict.fromkeys(r["case"] for r in sel))
                variants = list(dict.fromkeys(r["variant"] for r in sel))
                width = 0.8 / max(1, len(variants))
                for i, v in enumerate(variants):
                    ys = [next((r["ms"] for r in sel if r["case"] == c and r["variant"] == v), 0) for c in cases]
                    ax.bar([j + i * width for j in range(len(cases))], ys, width, label=v)
                ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))], cases, fontsize=8)
                ax.set_yscale("log")
                ax.set_ylabel("ms, log scale (lower is better)")
                ax.set_title(f"PVM block {pass_}, bf16")
                ax.legend(fontsize=7)
            fig.suptitle(run["meta"]["device"])
            fig.tight_layout()
            path = os.path.join(folder, f"block-{tag}.png")
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
        rows = [r for r in run["rows"] if r["part"] == "decode"]
        if rows:
            fig, ax = plt.subplots(figsize=(9, 4))
            cases = list(dict.fromkeys(r["case"] for r in rows))
            cols = list(dict.fromkeys((r["variant"], r["mode"]) for r in rows))
            width = 0.8 / max(1, len(cols))
            for i, (v, m) in enumerate(cols):
                ys = [next((r["over_floor"] or 0 for r in rows if r["case"] == c and r["variant"] == v
                            and r["mode"] == m), 0) for c in cases]
                ax.bar([j + i * width for j in range(len(cases))], ys, width, label=f"{v} ({m})")
            ax.axhline(1.0, color="k", lw=0.8)
            ax.axhline(1.5, color="r", lw=0.8, ls="--")
            ax.set_yscale("log")
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))], cases, fontsize=8)
            ax.set_ylabel("time / bandwidth floor")
            ax.set_title(f"PVM decode step vs floor, {run['meta']['device']}")
            ax.legend(fontsize=6, ncol=2)
            fig.tight_layout()
            path = os.path.join(folder, f"decode-{tag}.png")
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("inputs", nargs="+")
    parser.add_argument("--markdown", help="write the tables here (default: print)")
    parser.add_argument("--plots", help="folder for PNG plots")
    args = parser.parse_args(argv)
    runs = load(args.inputs)
    text = markdown(runs)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    else:
        print(text)
    if args.plots:
        for path in plots(runs, args.plots):
            print("plot:", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
