"""The ``onnxvq`` command line: ``compress``, ``decompress``, ``inspect``, ``report``, ``run``,
``native build``, ``codebook build|show``.

Every user-fixable problem prints ``error: <one line>`` on stderr and exits with status 1, with
no traceback and no output file left behind. Set ``ONNXVQ_DEBUG=1`` to get tracebacks.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys

import click

from onnxvq.errors import OnnxVQError

__all__ = ["main"]


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every ``finally`` (temporary files) runs."""


def _raise_terminated(signum, frame):
    raise _Terminated()


def _work_done() -> None:
    """Once the output is in place, a SIGTERM no longer undoes anything: finish normally."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _user_errors(command):
    """Turn OnnxVQError (and unexpected errors) into one line and a non-zero exit."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        signal.signal(signal.SIGTERM, _raise_terminated)
        try:
            return command(*args, **kwargs)
        except OnnxVQError as e:
            if os.environ.get("ONNXVQ_DEBUG"):
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("error: interrupted; nothing was written", err=True)
            sys.exit(130)
        except _Terminated:
            click.echo("error: terminated; nothing was written", err=True)
            sys.exit(128 + signal.SIGTERM)
        except click.exceptions.Exit:
            raise
        except Exception as e:  # a bug in onnxvq: still one line unless debugging
            if os.environ.get("ONNXVQ_DEBUG"):
                raise
            click.echo(
                f"error: internal error ({type(e).__name__}: {e}); "
                "rerun with ONNXVQ_DEBUG=1 for a traceback and report it",
                err=True,
            )
            sys.exit(2)

    return wrapper


class _OneLineUsageErrors(click.Group):
    """Click's usage errors (``-k abc``, a missing argument) as one ``error:`` line and exit 1,
    like every other user error, instead of the usage text and exit 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as e:
            where = f"{e.ctx.command_path} --help" if e.ctx is not None else "onnxvq --help"
            click.echo(f"error: {e.format_message()} (see {where})", err=True)
            sys.exit(1)
        except click.Abort:
            click.echo("error: interrupted; nothing was written", err=True)
            sys.exit(130)
        except click.ClickException as e:
            click.echo(f"error: {e.format_message()}", err=True)
            sys.exit(e.exit_code or 1)
        sys.exit(code if isinstance(code, int) else 0)


def _method_names() -> list[str]:
    from onnxvq.methods import METHODS

    return sorted(METHODS)


@click.group(cls=_OneLineUsageErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnxvq")
def main() -> None:
    """Vector-quantize the weights of ONNX models (see `onnxvq COMMAND --help`)."""


@main.command()
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("-o", "--output", required=True, type=click.Path(), help="Where to write the compressed model.")
@click.option("--method", type=click.Choice(_method_names()), default=None, help="Method for all layers. [default: pq]")
@click.option("-k", "k", type=int, default=None, help="Codewords per codebook (2..65536). [default: 256]")
@click.option("-d", "d", type=int, default=None, help="Subvector length. [default: 8]")
@click.option("--target-ratio", type=float, default=None, help="Size target: the output at least R times smaller than the input; k, d and scales chosen per layer.")
@click.option("--target-bits", type=float, default=None, help="Size target: average stored bits per weight of the compressible layers.")
@click.option("--rank", default=None, metavar="auto|N", help="lr2vq: clustering dimension (1..d), or auto to choose it per layer. [default: auto]")
@click.option("--codebook", "universal", type=click.Path(), default=None, help="vq4all: the universal codebook (onnxvq codebook build); it fixes k and d.")
@click.option("--codebook-external", is_flag=True, help="vq4all: keep the codebook in universal-<hash>.vqcb beside OUTPUT, one file that models compressed with it into that folder share.")
@click.option("--config", "config_path", type=click.Path(), default=None, help="JSON or YAML config (per-layer overrides).")
@click.option("--skip", multiple=True, metavar="NAME_OR_re:PATTERN", help="Leave a layer dense (repeatable).")
@click.option("--min-size", type=int, default=None, help="Leave layers with fewer weights dense. [default: 1024]")
@click.option("--seed", type=int, default=None, help="Seed of all random choices. [default: 0]")
@click.option("--codebook-dtype", type=click.Choice(["float16", "float32"]), default=None, help="Codebook storage. [default: float16]")
@click.option("--scales", type=click.Choice(["auto", "on", "off"]), default=None, help="Per-output-channel scales: auto keeps them where they lower the per-channel error. [default: auto]")
@click.option("--class-rows", type=click.Choice(["auto", "off"]), default=None, help="With --calib: auto splits the classes a classifier head wins on the calibration data into a layer of their own. [default: auto]")
@click.option("--report", "report_path", type=click.Path(), default=None, help="Write the summary as JSON here.")
@click.option("--external-data/--single-file", default=None, help="Force tensors into OUTPUT.data, or into one file. [default: external only over 2 GiB]")
@click.option("--calib", type=click.Path(), default=None, help="Calibration data: an .npz keyed by input name (samples on axis 0) or a folder of .npz samples.")
@click.option("--labels", type=click.Path(), default=None, help="Class labels (.npy, or .npz with 'labels') for a task loss.")
@click.option("--finetune", type=click.Choice(["none", "layer", "e2e"]), default=None, help="Fine-tuning with --calib. [default: layer with --calib]")
@click.option("--epochs", type=int, default=None, help="Passes over the data (per layer for layer-wise). [default: 10; e2e: 1000 steps or 10 epochs, ended after 3 of 10 held-out checks when the held-out loss does not fall]")
@click.option("--steps", type=int, default=None, help="Optimizer steps instead of epochs (run to the end).")
@click.option("--lr", type=float, default=None, help="Adam learning rate. [default: 1e-3]")
@click.option("--batch-size", type=int, default=None, help="Calibration samples per step. [default: 32]")
@click.option("--loss", type=click.Choice(["auto", "kl", "mse"]), default=None, help="e2e distillation loss. [default: auto: kl on a Softmax/Sigmoid output's logits and on class scores, mse otherwise]")
@click.option("--augment", type=click.Choice(["mixup", "none"]), default=None, help="e2e: train on mixes of calibration samples, labelled by the original model (not with --labels). [default: mixup]")
@click.option("--train-rest", is_flag=True, default=None, help="e2e: also train the layers' other float parameters (biases, norms' scales and shifts, weights left dense).")
@click.option("--activations", default=None, metavar="keep|pwlu[:N][:layer|:channel]", help="With --calib: activations behind the model's layers become learned piecewise-linear PWLUs (N intervals, one function per layer or per channel). [default: keep]")
@click.option("--weight-only", is_flag=True, help="With --calib, encode from weights alone (ablation).")
@click.option("--holdout", type=float, default=None, help="Fraction of calibration samples held back for quality. [default: 0.1]")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary table.")
@_user_errors
def compress(model, output, method, k, d, target_ratio, target_bits, rank, universal, codebook_external, config_path, skip, min_size, seed, codebook_dtype, scales,
             class_rows, report_path, external_data, calib, labels, finetune, epochs, steps, lr, batch_size, loss,
             augment, train_rest, activations, weight_only, holdout, quiet):
    """Compress MODEL's Conv/Gemm/MatMul weights into ai.onnxvq ops.

    With --calib, each layer is encoded to minimise its output error on the calibration data and
    then fine-tuned (layer-wise by default; --finetune e2e trains through the whole graph).
    """
    from onnxvq.api import compress as compress_model
    from onnxvq.config import CompressConfig
    from onnxvq.model_io import check_output_paths, load_model, model_file_bytes, source_files

    ir_model = load_model(model)
    input_file_bytes = model_file_bytes(model, ir_model)
    # Every file read (the model, its external data, config, calibration data, labels) against
    # every file written, before any work: the input is never overwritten.
    reads = source_files(ir_model) + _files_in([config_path, calib, labels, universal])
    check_output_paths(
        {"output": output, "external data": _data_path(output, external_data, input_file_bytes),
         "--report": report_path},
        reads,
    )
    if (target_ratio is not None or target_bits is not None) and (k is not None or d is not None):
        raise OnnxVQError("a size target chooses k and d per layer: drop -k/-d, or the target")
    if method == "vq4all" and (k is not None or d is not None):
        raise OnnxVQError("vq4all's k and d are its codebook's: drop -k/-d "
                          "(build the codebook with the k and d you want)")
    config = CompressConfig.from_file(config_path) if config_path else CompressConfig()
    config = config.merged(
        target_ratio=target_ratio, target_bits=target_bits,
        method=method, k=k, d=d, skip=list(skip) or None, min_size=min_size, seed=seed,
        codebook_dtype=codebook_dtype, scales=scales, class_rows=class_rows, rank=_rank(rank), codebook=universal,
    )
    tuning = {
        key: value
        for key, value in dict(
            mode=finetune, epochs=epochs, steps=steps, lr=lr, batch_size=batch_size, loss=loss,
            augment=augment, train_rest=train_rest, holdout=holdout, data_aware=False if weight_only else None,
            activations=activations,
        ).items()
        if value is not None
    }
    if activations is not None:
        from onnxvq.finetune_settings import parse_activations

        parse_activations(activations)  # a typo is named before a missing --calib is
    if calib is None and (tuning or labels):
        raise OnnxVQError("--labels and the fine-tune options need calibration data: add --calib PATH")
    result = compress_model(
        ir_model, config, calib=calib, labels=labels, finetune=tuning or None, progress=not quiet,
        codebook_external=codebook_external,
    )
    result.summary.input_file_bytes = input_file_bytes

    def write_report(files: list[str]) -> None:
        # Runs on the complete temporary files, before the model is renamed into place: a
        # report that cannot be written leaves no model behind either.
        result.summary.output_file_bytes = sum(os.path.getsize(p) for p in files)
        if report_path:
            _write_text(report_path, json.dumps(result.summary.to_dict(), indent=2))

    written = result.save(output, external_data=external_data, protected=reads, before_commit=write_report)
    _work_done()
    if not quiet:
        click.echo(result.summary.format())
    click.echo(f"wrote {_paths(written)}")
    check = result.summary.check
    if check is not None and check.warning:  # even with -q: a damaged model must be said
        click.echo(f"warning: {check.warning}", err=True)


def _rank(value: str | None) -> int | str | None:
    """``--rank``: ``auto`` or a positive integer."""
    if value is None or value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise OnnxVQError(f"--rank must be 'auto' or an integer, got {value!r}") from None


@main.command()
@click.argument("model", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="Where to write the dense model.")
@click.option("--external-data/--single-file", default=None, help="Force tensors into OUTPUT.data, or into one file. [default: external only over 2 GiB]")
@_user_errors
def decompress(model, output, external_data):
    """Write the dense equivalent of a compressed MODEL (standard ops only)."""
    from onnxvq.api import decompress as decompress_model
    from onnxvq.model_io import check_output_paths, load_model, model_file_bytes, save_model, source_files

    compressed = load_model(model)
    reads = source_files(compressed)
    data_path = _data_path(output, external_data, model_file_bytes(model, compressed))
    check_output_paths({"output": output, "external data": data_path}, reads)
    dense = decompress_model(compressed)
    written = save_model(dense, output, external_data=external_data, protected=reads)
    _work_done()
    click.echo(f"wrote {_paths(written)}")


@main.command()
@click.argument("model", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@_user_errors
def inspect(model, as_json):
    """List MODEL's candidate layers (names usable in configs) and its VQ layers."""
    from onnxvq.inspect_model import format_inspection, inspect_model
    from onnxvq.model_io import load_model

    info = inspect_model(load_model(model))
    click.echo(json.dumps(info, indent=2) if as_json else format_inspection(info))


@main.command()
@click.argument("model", type=click.Path())
@click.option("--baseline", type=click.Path(), default=None, help="The original model, to compare with.")
@click.option("--accelerator", default="edge-npu", show_default=True, help="Profile: edge-npu, mobile-soc or datacenter-gpu.")
@click.option("--set", "overrides", multiple=True, metavar="FIELD=VALUE", help="Override a profile field, e.g. dram_bandwidth=16e9 (repeatable).")
@click.option("--input", "inputs", multiple=True, metavar="NAME:SHAPE", help="Shape of a graph input, e.g. image:1x3x224x224 (repeatable).")
@click.option("--json", "json_path", type=click.Path(), default=None, help="Write every count as JSON here.")
@click.option("--plot", "plot_path", type=click.Path(), default=None, help="Write a PNG of off-chip bytes per layer here.")
@_user_errors
def report(model, baseline, accelerator, overrides, inputs, json_path, plot_path):
    """Estimate MACs, memory traffic and time of MODEL on an accelerator (roofline model).

    Compares MODEL with the same graph at int8 weights and, with --baseline, with the original.
    """
    from onnxvq import ops
    from onnxvq.accelerators import get_profile
    from onnxvq.api import decompress
    from onnxvq.memory_access import analyze, parse_input_shape
    from onnxvq.model_io import check_output_paths, load_model, source_files
    from onnxvq.report_tables import VARIANT_LABELS, comparison, format_comparison, format_layers
    from onnxvq.summary import format_bytes

    ir_model = load_model(model)
    base_model = load_model(baseline) if baseline else None
    reads = source_files(ir_model) + (source_files(base_model) if base_model else [])
    check_output_paths({"--json": json_path, "--plot": plot_path}, reads)
    profile = get_profile(accelerator, dict(_parse_assignment(o) for o in overrides))
    names = [v.name for v in ir_model.graph.inputs if not v.is_initializer()]
    input_shapes = dict(parse_input_shape(text, names) for text in inputs)

    traffic = analyze(ir_model, input_shapes, profile)
    variants = {}
    if base_model is not None:
        variants["baseline"] = analyze(base_model, input_shapes, profile)
        int8_source = base_model
    elif any(ops.is_weight_op(n) for n in ir_model.graph):
        int8_source = decompress(ir_model)
    else:
        int8_source = ir_model
    variants["int8"] = analyze(int8_source, input_shapes, profile, weight_format="int8")
    variants["model"] = traffic

    click.echo(f"accelerator {profile.name}: {profile.macs_per_second:.3g} MAC/s, "
               f"DRAM {profile.dram_bandwidth:.3g} B/s, buffer {format_bytes(profile.onchip_buffer_bytes)}, "
               f"ROM {format_bytes(profile.rom_bytes)}, activations "
               f"{profile.activation_bytes or 'as in the model'}{' B' if profile.activation_bytes else ''}")
    click.echo(format_layers(traffic))
    click.echo("")
    click.echo(format_comparison(variants))
    if json_path:
        record = {
            "model": os.fspath(model),
            "baseline": os.fspath(baseline) if baseline else None,
            "profile": profile.to_dict(),
            "input_shapes": {k: list(v) for k, v in input_shapes.items()},
            "comparison": comparison(variants),
            "variants": {label: t.to_dict() for label, t in variants.items()},
        }
        _write_text(json_path, json.dumps(record, indent=2))
        click.echo(f"wrote {_paths([json_path])}")
    if plot_path:
        from onnxvq.report_plot import plot_traffic

        title = f"Off-chip bytes per layer: {os.path.basename(model)} on {profile.name}"
        plot_traffic({VARIANT_LABELS[k]: t for k, t in variants.items()}, plot_path, title=title)
        click.echo(f"wrote {_paths([plot_path])}")


@main.command()
@click.argument("model", type=click.Path())
@click.option("--native/--no-native", default=None, help="Require the native kernel library, or run the function bodies. [default: the library when built]")
@click.option("--inputs", type=click.Path(), default=None, help="Inputs: an .npz keyed by input name. [default: generated from the input specs]")
@click.option("--batch", type=click.IntRange(min=1), default=None, help="Batch size (first dimension) of generated inputs, or rows taken from --inputs. [default: 1; all rows of --inputs]")
@click.option("--repeat", type=click.IntRange(min=1), default=10, show_default=True, help="Timed runs, after one warm-up run.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="onnxruntime intra-op threads. [default: one per core]")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of generated inputs.")
@_user_errors
def run(model, native, inputs, batch, repeat, threads, seed):
    """Run MODEL in onnxruntime: output shapes, checksums and the median latency.

    A compressed model runs with the native kernel library when it is built (onnxvq native
    build), else through its ops' function bodies. Without --inputs, inputs are generated from
    the model's input specs: floats standard normal, integers 0, a dynamic first dimension set to
    --batch, other dynamic dimensions 64.
    """
    from onnxvq import ops
    from onnxvq.model_io import load_model
    from onnxvq.model_run import input_feed, open_session, output_lines, timed_runs

    ir_model = load_model(model)
    feed = input_feed(ir_model, inputs, batch=batch, seed=seed, where=os.fspath(model))
    session, library = open_session(model, native=native, threads=threads)
    outputs, timing = timed_runs(session, feed.arrays, repeat)
    vq_nodes = sum(1 for n in ir_model.graph.all_nodes() if n.domain == ops.DOMAIN)
    if vq_nodes:
        kernels = (f"native library {library} (function bodies for any op it has no kernel for)" if library
                   else "function bodies (standard ops)")
        click.echo(f"{vq_nodes} ai.onnxvq node(s), run by: {kernels}")
    click.echo(f"inputs {feed.source}:")
    click.echo("\n".join(feed.lines()))
    click.echo("outputs:")
    click.echo("\n".join(output_lines([o.name for o in session.get_outputs()], outputs)))
    threads_text = threads if threads is not None else "onnxruntime default"
    click.echo(f"latency: median {timing.median * 1e3:.3f} ms over {repeat} run(s) after 1 warm-up "
               f"(min {timing.minimum * 1e3:.3f} ms; threads: {threads_text})")


@main.group()
def native() -> None:
    """The native kernel library of the ai.onnxvq ops (optional: models run without it)."""


@native.command("build")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None, help="Folder to put libonnxvq_ops.so in. [default: inside the installed onnxvq.ops package, where sessions find it]")
@click.option("--ort-include", type=click.Path(), default=None, help="Folder of onnxruntime's C/C++ headers. [default: $ORT_INCLUDE_DIR, else downloaded once into the cache]")
@_user_errors
def native_build(out_dir, ort_include):
    """Compile the native kernels (CMake, Ninja, a C++17 compiler) and print the library's path."""
    from onnxvq.ops.native_build import build, default_library_path
    from onnxvq.ops.native_library import ENV_LIBRARY

    path = build(out_dir, ort_include=ort_include, echo=lambda line: click.echo(line, err=True))
    click.echo(str(path))
    if path.resolve() != default_library_path().resolve():
        click.echo(f"sessions load it with {ENV_LIBRARY}={path}", err=True)


@main.group()
def codebook() -> None:
    """Universal codebooks (VQ4ALL): one codebook for every layer of many models."""


@codebook.command("build")
@click.argument("models", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="Where to write the codebook (.npz).")
@click.option("-k", "k", type=int, required=True, help="Codewords (2..65536).")
@click.option("-d", "d", type=int, required=True, help="Subvector length.")
@click.option("--per-tensor", type=int, default=4096, show_default=True, help="Subvectors sampled from every compressible weight (all when it has fewer).")
@click.option("--bandwidth", type=click.Choice(["scott", "silverman"]), default="scott", show_default=True, help="Kernel bandwidth rule.")
@click.option("--refine", is_flag=True, help="Refine the drawn codewords by k-means on the sampled subvectors.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampling and the draws.")
@_user_errors
def codebook_build(models, output, k, d, per_tensor, bandwidth, refine, seed):
    """Build one codebook from the weights of MODEL... by kernel density estimation."""
    from onnxvq.model_io import check_output_paths
    from onnxvq.universal_codebook import build_codebook, save_codebook

    check_output_paths({"output": output}, models)  # before the work; the save checks data files too
    built = build_codebook(list(models), k=k, d=d, per_tensor=per_tensor, seed=seed, bandwidth=bandwidth, refine=refine)
    path = save_codebook(built, output)
    _work_done()
    for model, record in zip(models, built.provenance["models"]):
        click.echo(f"{model}: {record['tensors']} tensors, {record['subvectors']} subvectors sampled")
    click.echo(f"bandwidth: {bandwidth}, factor h={built.provenance['bandwidth_factor']:.6g}"
               f"{'; refined by k-means' if refine else ''}")
    click.echo(f"codebook: k={built.k}, d={built.d}, sha256 {built.sha256}")
    click.echo(f"wrote {_paths([path])}")


@codebook.command("show")
@click.argument("file", type=click.Path())
@_user_errors
def codebook_show(file):
    """Verify FILE's content hash and print how it was built."""
    from onnxvq.universal_codebook import format_codebook, load_codebook

    click.echo(format_codebook(load_codebook(file), file))
    click.echo("hash verified: the content matches the recorded sha256")


def _parse_assignment(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise OnnxVQError(f"--set {text!r}: expected FIELD=VALUE, e.g. dram_bandwidth=16e9")
    return key.strip(), value.strip()


def _data_path(output: str, external_data: bool | None, input_bytes: int) -> str | None:
    """The external data file a save may write: when asked for, or by default when the model
    may not fit one protobuf (save_model checks again once it knows)."""
    from onnxvq.model_io import PROTOBUF_LIMIT

    if external_data or (external_data is None and input_bytes > PROTOBUF_LIMIT):
        return f"{output}.data"
    return None


def _files_in(paths: list[str | None]) -> list[str]:
    """The files named by ``paths``: a folder stands for the files in it."""
    files = []
    for path in filter(None, paths):
        if os.path.isdir(path):
            files += [entry.path for entry in os.scandir(path) if entry.is_file()]
        else:
            files.append(path)
    return files


def _paths(paths: list[str]) -> str:
    """Paths as the user would write them: relative to the working folder when inside it."""
    shown = []
    for path in paths:
        relative = os.path.relpath(path)
        shown.append(path if relative.startswith("..") else relative)
    return ", ".join(shown)


def _write_text(path: str, text: str) -> None:
    from onnxvq.model_io import write_atomically

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    write_atomically(path, write)


if __name__ == "__main__":
    main()
