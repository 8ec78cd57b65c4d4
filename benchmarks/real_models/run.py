"""Real-model suite: onnxvq against onnxruntime's quantizers on pretrained models from PyPI packages.

For each model (one module per family, see ``TASKS``) it builds a labelled eval set and an
unlabelled calibration set (fixed seeds), then evaluates on the same eval set: the fp32 file,
onnxruntime int8 dynamic, int8 static QDQ and int4 MatMulNBits (:mod:`baselines`), and every
onnxvq setting in ``SETTINGS`` in each mode of ``MODES`` (no data; calibration data without
fine-tuning; calibration data with layer-wise fine-tuning). Every onnxvq run is its own
subprocess (:mod:`compress_worker`) so that its peak RSS is measured alone.

Per row: the task metric(s), file size and ratio against the fp32 file, output SQNR against
fp32 over the eval set, compression seconds, peak RSS of the compression, eval seconds.

    python benchmarks/real_models/run.py [--models a,b] [--settings 0,2|JSON] [--modes none,data,layer]
                                         [--no-finetune] [--quick] [--out DIR] [--threads N]
    python benchmarks/real_models/run.py --report-only --out DIR   # redo results.md and the plot

Writes ``DIR/results.json``, ``DIR/results.md`` and ``DIR/ratio_vs_metric.png`` (default DIR
``benchmarks/real_models/out``), rewriting the JSON after every row.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import pickle
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

# One line per onnxvq setting: plain keyword arguments of onnxvq.compress. A setting onnxvq
# rejects (OnnxVQError) is reported as skipped, so new options can be listed before they land.
SETTINGS: list[dict] = [
    {"target_ratio": 8},
    {"target_ratio": 16},
    {"method": "pq", "k": 256, "d": 4},
    {"method": "lr2vq", "k": 256, "d": 8},
    {"method": "ssvq", "k": 16, "d": 8},
]
# The ablation of issue 11 (--settings ablation): per-channel scales and Hessian error feedback
# switched off one at a time, at one fixed setting (under a size target the allocation moves
# with them, and its plan changes more than the switch does).
ABLATION: list[dict] = [
    {"method": "pq", "k": 256, "d": 3},
    {"method": "pq", "k": 256, "d": 3, "scales": "off"},
    {"method": "pq", "k": 256, "d": 3, "feedback": False},
]

# mode -> (uses calibration data, finetune argument)
MODES = {"none": (False, None), "data": (True, "none"), "layer": (True, "layer"), "e2e": (True, "e2e"),
         # issue 15: the same fine-tuning with activations turned into PWLUs (--activations)
         "layer_pwlu": (True, {"mode": "layer", "activations": "pwlu"}),
         "layer_pwlu_ch": (True, {"mode": "layer", "activations": "pwlu:8:channel"}),
         "e2e_pwlu": (True, {"mode": "e2e", "activations": "pwlu"}),
         "e2e_pwlu_ch": (True, {"mode": "e2e", "activations": "pwlu:8:channel"}),
         # e2e's default length (1000 steps) without its early end: what a run that pays gets
         "e2e_long": (True, {"mode": "e2e", "steps": 1000}),
         # e2e with --train-rest: biases and normalization parameters train too
         "e2e_rest": (True, {"mode": "e2e", "train_rest": True})}
MODE_LABELS = {"none": "no data", "data": "data-aware", "layer": "layer", "e2e": "e2e",
               "layer_pwlu": "layer + pwlu", "layer_pwlu_ch": "layer + pwlu:8:channel",
               "e2e_pwlu": "e2e + pwlu", "e2e_pwlu_ch": "e2e + pwlu:8:channel", "e2e_long": "e2e 1000 steps", "e2e_rest": "e2e + train-rest"}

# task modules, in table order
TASKS = ["det_ppocr", "cls_ppocr", "rec_ppocr", "ddddocr_det", "ddddocr_ocr", "vad_silero", "vad_silero_half", "sample_digits"]

EVAL_SEED = 1
CALIB_SEED = 1001  # a different seed: calibration never sees an eval sample


def setting_label(s: dict) -> str:
    rest = " ".join(f"{k}={v}" for k, v in s.items() if k != "method")
    return f"{s.get('method', 'pq')} {rest}".strip()


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=]+", "_", text).strip("_")


def file_bytes(path) -> int:
    """The model file plus its external data file, if any."""
    path = Path(path)
    total = path.stat().st_size
    data = Path(str(path) + ".data")
    return total + (data.stat().st_size if data.exists() else 0)


def evaluate_file(task, path, eval_set, reference, threads):
    start = time.perf_counter()
    sess = common.session(path, threads)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    ev = task.evaluate(sess, eval_set, reference)
    eval_s = time.perf_counter() - start
    return ev, load_s, eval_s


def compress_in_subprocess(model, out_path, settings, calib_path, finetune, timeout):
    job = {"model": str(model), "out": str(out_path), "settings": settings, "calib": calib_path and str(calib_path),
           "finetune": finetune}
    job_path = str(out_path) + ".job.json"
    with open(job_path, "w") as f:
        json.dump(job, f)
    result_path = job_path + ".result"
    if os.path.exists(result_path):
        os.remove(result_path)
    try:
        proc = subprocess.run([sys.executable, str(HERE / "compress_worker.py"), job_path],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if not os.path.exists(result_path):
        return {"error": f"worker exited with code {proc.returncode}: {proc.stderr.strip()[-500:]}"}
    with open(result_path) as f:
        return json.load(f)


class Suite:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.results = {"meta": meta(args), "models": {}}

    def save(self):
        tmp = self.out / "results.json.tmp"
        with open(tmp, "w") as f:
            json.dump(self.results, f, indent=1, default=float)
        os.replace(tmp, self.out / "results.json")

    def add_row(self, entry, row):
        entry["rows"].append(row)
        self.save()
        print("  " + format_row_line(entry, row), flush=True)

    def run_task(self, name):
        args = self.args
        task = importlib.import_module(name)
        sizes = task.SIZES
        n_eval = args.eval_n or sizes["eval_quick" if args.quick else "eval"]
        n_calib = args.calib_n or sizes["calib_quick" if args.quick else "calib"]
        entry = {"title": task.TITLE, "metric": task.METRIC, "doc": (task.__doc__ or "").strip(), "rows": []}
        self.results["models"][task.NAME] = entry
        print(f"\n== {task.NAME}: {task.TITLE}", flush=True)
        try:
            model = task.model_path()
        except FileNotFoundError as e:
            entry["error"] = str(e)
            print(f"  skipped: {e}", flush=True)
            self.save()
            return
        work = self.out / "models" / task.NAME
        work.mkdir(parents=True, exist_ok=True)
        t0 = start = time.perf_counter()
        eval_set = task.make_eval_set(EVAL_SEED, n_eval)
        calib = task.make_calib_set(CALIB_SEED, n_calib)
        calib_path = work / "calib.pkl"
        with open(calib_path, "wb") as f:
            pickle.dump(calib, f)
        entry.update(model=str(model), eval_samples=n_eval, calib_samples=len(calib), data_s=time.perf_counter() - start)
        print(f"  data: {n_eval} eval samples, {len(calib)} calibration feeds, {entry['data_s']:.1f} s", flush=True)

        fp32_bytes = file_bytes(model)
        ref, load_s, eval_s = evaluate_file(task, model, eval_set, None, args.threads)
        entry["fp32_bytes"] = fp32_bytes
        self.add_row(entry, {"variant": "fp32", "kind": "fp32", "metrics": ref.metrics, "file_bytes": fp32_bytes,
                             "ratio": 1.0, "sqnr_db": math.inf, "eval_s": eval_s, "session_s": load_s})

        def finish(row, path):
            ev, load_s, eval_s = evaluate_file(task, path, eval_set, ref, args.threads)
            size = file_bytes(path)
            row.update(metrics=ev.metrics, file_bytes=size, ratio=fp32_bytes / size,
                       sqnr_db=common.sqnr_db(ref.outputs, ev.outputs), eval_s=eval_s, session_s=load_s)

        if not args.no_baselines:
            import baselines

            for bname in baselines.BASELINES:
                row = {"variant": bname, "kind": "ort"}
                path = work / f"{slug(bname)}.onnx"
                start = time.perf_counter()
                try:
                    row["note"] = baselines.run(bname, model, path, calib)
                    row["compress_s"] = time.perf_counter() - start
                    finish(row, path)
                except baselines.NotApplicable as e:
                    row["na"] = str(e)
                except Exception as e:  # noqa: BLE001 (a quantizer that fails is a result)
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                self.add_row(entry, row)

        for settings in self.settings:
            for mode in self.modes:
                use_calib, finetune = MODES[mode]
                label = f"{setting_label(settings)}, {MODE_LABELS[mode]}"
                row = {"variant": label, "kind": "onnxvq", "settings": settings, "mode": mode}
                path = work / f"{slug(label)}.onnx"
                res = compress_in_subprocess(model, path, settings, calib_path if use_calib else None, finetune,
                                             args.timeout)
                row.update({k: res[k] for k in ("compress_s", "rss_peak_mib", "rss_before_mib", "totals",
                                                "calibration", "skipped", "error") if k in res})
                if "skipped" not in row and "error" not in row:
                    try:
                        finish(row, path)
                    except Exception as e:  # noqa: BLE001
                        row["error"] = f"eval failed: {type(e).__name__}: {str(e)[:300]}"
                elif "skipped" in row:
                    print(f"  skipped {label}: {row['skipped']}", flush=True)
                self.add_row(entry, row)
        entry["total_s"] = time.perf_counter() - t0

    def run(self):
        args = self.args
        self.settings = parse_settings(args.settings)
        self.modes = [m for m in args.modes.split(",") if m]
        if args.no_finetune or args.quick and args.modes == DEFAULT_MODES:
            self.modes = [m for m in self.modes if MODES[m][1] in (None, "none")]
        names = TASKS
        if args.models:
            wanted = args.models.split(",")
            names = [t for t in TASKS if t in wanted or importlib.import_module(t).NAME in wanted]
            if len(names) != len(wanted):
                sys.exit(f"unknown model in {wanted}; known: " + ", ".join(
                    f"{importlib.import_module(t).NAME} ({t})" for t in TASKS))
        self.results["meta"].update(settings=self.settings, modes=self.modes, tasks=names)
        start = time.perf_counter()
        for name in names:
            self.run_task(name)
            write_report(self.results, self.out)
        self.results["meta"]["wall_s"] = time.perf_counter() - start
        self.save()
        write_report(self.results, self.out)
        print(f"\nwrote {self.out / 'results.json'}, results.md, ratio_vs_metric.png "
              f"({self.results['meta']['wall_s'] / 60:.1f} min)")


def parse_settings(text):
    if not text:
        return SETTINGS
    if text.lstrip().startswith("["):
        return json.loads(text)
    if text == "ablation":
        return ABLATION
    return [SETTINGS[int(i)] for i in text.split(",")]


def meta(args):
    import numpy
    import onnxruntime

    import onnxvq

    try:
        commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(HERE), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        commit += " (+ uncommitted changes)" if dirty else ""
    except OSError:
        commit = "?"
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "onnxvq_commit": commit,
            "onnxvq": getattr(onnxvq, "__version__", "?"), "onnxruntime": onnxruntime.__version__,
            "numpy": numpy.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
            "threads": args.threads, "quick": args.quick, "eval_seed": EVAL_SEED, "calib_seed": CALIB_SEED}


# --- report -------------------------------------------------------------------------------------

def _fmt(v, spec=".3f"):
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return format(v, spec)


def _kb(n):
    return f"{n / 1024:,.0f} kB" if n < 10 * 2**20 else f"{n / 2**20:,.1f} MB"


def format_row_line(entry, row):
    if "na" in row:
        return f"{row['variant']}: n/a ({row['na']})"
    if "error" in row:
        return f"{row['variant']}: FAILED {row['error']}"
    if "skipped" in row:
        return f"{row['variant']}: skipped"
    m = entry["metric"]
    return (f"{row['variant']}: {m}={row['metrics'][m]:.4f} ratio={row['ratio']:.1f}x "
            f"sqnr={_fmt(row['sqnr_db'], '.1f')} dB compress={_fmt(row.get('compress_s'), '.1f')} s "
            f"eval={row['eval_s']:.1f} s")


def markdown(results) -> str:
    meta = results["meta"]
    lines = [
        "# onnxvq real-model suite",
        "",
        f"{meta['date']}; onnxvq {meta['onnxvq']} at {meta['onnxvq_commit']}; onnxruntime {meta['onnxruntime']}; "
        f"{meta['cpus']} CPUs, {meta['threads']} onnxruntime threads; quick={meta['quick']}; "
        f"wall time {_fmt(meta.get('wall_s', 0) / 60, '.1f')} min.",
        "",
        "Ratio: fp32 file bytes / file bytes. SQNR: model output against fp32 over the eval set. "
        "Compress s and peak RSS: the onnxvq subprocess (compress + save; RSS includes Python, "
        "onnxruntime, torch when fine-tuning, and the calibration data). Eval s: the whole eval set, "
        "after session creation.",
    ]
    for name, entry in results["models"].items():
        lines += ["", f"## {name}: {entry['title']}", ""]
        if "error" in entry:
            lines += [f"not run: {entry['error']}"]
            continue
        m = entry["metric"]
        fp32 = next((r for r in entry["rows"] if r["kind"] == "fp32"), None)
        extra: list[str] = []
        for r in entry["rows"]:
            extra += [k for k in r.get("metrics", {}) if k != m and k not in extra]
        lines += [f"{entry.get('eval_samples')} eval samples, {entry.get('calib_samples')} calibration feeds; "
                  f"fp32 file {_kb(entry.get('fp32_bytes', 0))}.", ""]
        head = ["variant", "file", "ratio", f"**{m}**", "Δ", *extra, "SQNR dB", "compress s", "peak RSS MiB",
                "eval s", "note"]
        lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 2) + ["---"]) + "|"]
        base = fp32["metrics"][m] if fp32 else None
        for r in entry["rows"]:
            if "metrics" not in r:
                why = r.get("na") and f"n/a: {r['na']}" or r.get("skipped") or f"failed: {r.get('error')}"
                lines.append("| " + " | ".join([r["variant"]] + ["-"] * (len(head) - 2) + [why.replace("|", "/")]) + " |")
                continue
            mv = r["metrics"]
            note = r.get("note", "")
            q = (r.get("calibration") or {}).get("quality") if isinstance(r.get("calibration"), dict) else None
            if q:  # onnxvq's own check on its held-back calibration samples
                held = ", ".join(f"{stage} {v['sqnr_db']:.1f} dB" for stage, v in q.items()
                                 if isinstance(v, dict) and v.get("sqnr_db") is not None)
                note = (note + "; " if note else "") + f"onnxvq held-out SQNR: {held}"
            shared = (r.get("totals") or {}).get("shared_codebook_bytes")
            if shared:  # vq4all: the universal codebook is a file of its own, outside "file"
                with_it = r["file_bytes"] + shared
                note = (note + "; " if note else "") + (
                    f"universal codebook {_kb(shared)} in its own file; with it {r['ratio'] * r['file_bytes'] / with_it:.1f}x")
            cells = [r["variant"], _kb(r["file_bytes"]), f"{r['ratio']:.1f}x", f"**{mv[m]:.4f}**",
                     f"{mv[m] - base:+.4f}" if base is not None else "-",
                     *[_fmt(mv.get(k), ".4f") for k in extra], _fmt(r["sqnr_db"], ".1f"),
                     _fmt(r.get("compress_s"), ".1f"), _fmt(r.get("rss_peak_mib"), ".0f"), f"{r['eval_s']:.1f}",
                     note.replace("|", "/")]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    models = [(n, e) for n, e in results["models"].items() if e.get("rows")]
    if not models:
        return
    cols = min(3, len(models))
    rows = math.ceil(len(models) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * max(cols, 2), 4.2 * rows + 0.6), squeeze=False)
    colors = {"pq": "tab:blue", "lr2vq": "tab:green", "ssvq": "tab:purple"}
    markers = {"none": "o", "data": "^", "layer": "s", "e2e": "D", "layer_pwlu": "P", "layer_pwlu_ch": "p",
               "e2e_pwlu": "v", "e2e_pwlu_ch": "<"}
    for ax, (name, entry) in zip(axes.flat, models):
        m = entry["metric"]
        for r in entry["rows"]:
            if "metrics" not in r:
                continue
            x, y = r["ratio"], r["metrics"][m]
            if r["kind"] == "fp32":
                ax.scatter([x], [y], marker="*", s=160, color="black", label="fp32", zorder=3)
            elif r["kind"] == "ort":
                ax.scatter([x], [y], marker="X", s=70, color="tab:red", zorder=3)
                ax.annotate(r["variant"].replace("ort ", ""), (x, y), fontsize=6, color="tab:red",
                            xytext=(3, -8), textcoords="offset points")
            else:
                s = r["settings"]
                ax.scatter([x], [y], marker=markers.get(r["mode"], "o"), s=45, alpha=0.8,
                           color=colors.get(s.get("method", "pq"), "tab:gray"), zorder=2)
                if r["mode"] == "none":
                    ax.annotate(setting_label(s).replace("k=", "k").replace("d=", "d"), (x, y), fontsize=6,
                                xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.set_xlabel("file compression ratio (fp32 / file)")
        ax.set_ylabel(m)
        ax.set_title(f"{name}", fontsize=10)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(models):]:
        ax.axis("off")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="*", ls="", color="black", ms=10, label="fp32"),
               Line2D([], [], marker="X", ls="", color="tab:red", label="onnxruntime int8/int4")]
    handles += [Line2D([], [], marker="o", ls="", color=c, label=f"onnxvq {k}") for k, c in colors.items()]
    handles += [Line2D([], [], marker=mk, ls="", color="gray", label=MODE_LABELS[k]) for k, mk in markers.items()]
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.6 / (4.2 * rows + 0.6), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results, out: Path):
    (out / "results.md").write_text(markdown(results))
    plot(results, out / "ratio_vs_metric.png")


DEFAULT_MODES = "none,data,layer"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", help="comma-separated model names or modules (default: all): "
                   "ppocr_det, ppocr_cls, ppocr_rec, ddddocr_det, ddddocr_ocr, silero_vad, silero_vad_half, digits_mlp")
    p.add_argument("--settings", help="indices into SETTINGS (e.g. 0,1), 'ablation', or a JSON list of compress() kwargs dicts")
    p.add_argument("--modes", default=DEFAULT_MODES, help="onnxvq modes: none (no data), data (calibration, "
                   "no fine-tuning), layer (calibration + layer-wise fine-tuning); also "
                   + ", ".join(m for m in MODES if m not in ("none", "data", "layer")))
    p.add_argument("--no-finetune", action="store_true", help="drop the fine-tuning modes")
    p.add_argument("--no-baselines", action="store_true", help="skip the onnxruntime quantizers")
    p.add_argument("--quick", action="store_true", help="smaller eval and calibration sets, no fine-tuning")
    p.add_argument("--eval-n", type=int, help="eval samples per model (overrides the task's default)")
    p.add_argument("--calib-n", type=int, help="calibration samples per model (overrides the task's default)")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads for evaluation")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per onnxvq compression")
    p.add_argument("--out", default=str(HERE / "out"), help="output folder")
    p.add_argument("--report-only", action="store_true", help="rewrite results.md and the plot from results.json")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        with open(out / "results.json") as f:
            write_report(json.load(f), out)
        print(f"wrote {out / 'results.md'} and {out / 'ratio_vs_metric.png'}")
        return
    common.CACHE_DIR = out / "cache"
    Suite(args).run()


if __name__ == "__main__":
    main()
