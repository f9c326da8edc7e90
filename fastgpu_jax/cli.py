"""The ``fastgpu-jax`` command: parses arguments, calls the library, prints. Nothing else lives here.

    fastgpu-jax train   --config configs/digits_cnn.py --workdir runs/digits [--config.optimizer.lr=3e-3 ...]
    fastgpu-jax config  --config configs/digits_cnn.py [--config.k=v] # the resolved config as JSON
    fastgpu-jax train --help-keys                                     # every config key, default, allowed values
    fastgpu-jax eval    --workdir runs/digits [--split test]          # last stdout line: one JSON object
                        [--params auto|raw|ema] [--checkpoint latest|best]    # (also predict, export)
    fastgpu-jax predict --workdir runs/digits --input x.npy [--output y.npy] [--logits]
    fastgpu-jax predict --workdir runs/photos --input cat.jpg photos/ [--top-k 3]  # image files: class names
    fastgpu-jax plot    --workdir runs/digits                         # writes runs/digits/curves.png
    fastgpu-jax bench   --kernels [--tiny] [--json out.json]          # Pallas vs XLA TFLOP/s table
    fastgpu-jax bench   --kernels --model resnet50|vit_b16           # roofline of a train step's kernels
    fastgpu-jax bench   --config configs/folder_resnet18.py --data [--workers 0,1,2,4]  # input pipeline img/s
    fastgpu-jax quantize --workdir runs/digits [--calibrate-batches 4]  # int8 PTQ; last line: one JSON object
    fastgpu-jax export  --workdir runs/digits --output model.msgpack [--bench]  # one-file params + config
    fastgpu-jax convert --from folder --input imgs --output shards [--resize-short 256]  # ArrayRecord + manifest
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings


class _HelpKeys(argparse.Action):
    """``--help-keys``: every config key with its type, default, allowed values and help; then exit."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="list every config key (type, default, allowed values, help) and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        from fastgpu_jax.config import describe_keys

        print(describe_keys())
        parser.exit()


def _add_weight_choice(parser) -> None:
    """``--params raw|ema|auto`` and ``--checkpoint latest|best``: which weights eval/predict/export use."""
    parser.add_argument("--params", default="auto", choices=("auto", "raw", "ema"),
                        help="the trained params or their EMA (train.ema_decay); auto: the EMA when the run kept one")
    parser.add_argument("--checkpoint", default="latest", choices=("latest", "best"),
                        help="the newest checkpoint, or the best one kept by train.keep_best")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastgpu-jax", description="Train, evaluate and use image classifiers.")
    p.add_argument("--traceback", action="store_true",
                   help="show full tracebacks and library logs for errors (same as FASTGPU_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train (or resume) a run; extra --config.KEY=VALUE override the config")
    t.add_argument("--config", required=True, help="config file, optionally file.py:arg")
    t.add_argument("--workdir", required=True, help="run folder; an existing run there is resumed")
    t.add_argument("--allow-config-change", action="store_true",
                   help="resume even if the config changed in ways that alter the computation")
    t.add_argument("--help-keys", action=_HelpKeys)
    t.add_argument("--restart", action="store_true",
                   help="start over at step 0: the workdir's earlier checkpoints, metrics and logs are moved "
                        "into WORKDIR/restarted/N/ (never deleted)")

    c = sub.add_parser("config", help="print the resolved config (file + --config.KEY=VALUE overrides) as JSON")
    c.add_argument("--config", required=True, help="config file, optionally file.py:arg")
    c.add_argument("--help-keys", action=_HelpKeys)

    e = sub.add_parser("eval", help="evaluate the newest checkpoint; prints one JSON object last")
    e.add_argument("--workdir", required=True)
    e.add_argument("--split", default="test", choices=("train", "val", "test"))
    e.add_argument("--data-dir", default=None, help="override data.dir (data moved since training)")
    _add_weight_choice(e)

    r = sub.add_parser("predict", help="classify a .npy array of raw pixels (the data set's scale), or image "
                                       "files/folders (runs trained on folder/arrayrecord/tfds data: class names)")
    r.add_argument("--workdir", required=True)
    r.add_argument("--input", required=True, nargs="+",
                   help="ONE .npy array (N, H, W, C) or (N, H, W); or image files and folders (.jpg .png ...)")
    r.add_argument("--output", default=None,
                   help=".npy for predicted labels (arrays), .json for the per-file rows (images); default: print")
    r.add_argument("--logits", action="store_true", help="arrays: save logits (N, classes) instead of labels")
    r.add_argument("--top-k", type=int, default=1, help="images: the K most likely classes per file (default 1)")
    r.add_argument("--batch-size", type=int, default=None)
    _add_weight_choice(r)

    g = sub.add_parser("plot", help="write curves.png (loss/accuracy vs step) into the workdir")
    g.add_argument("--workdir", required=True)
    g.add_argument("--output", default=None)
    b = sub.add_parser("bench", help="--kernels: Pallas vs XLA TFLOP/s per shape; --config: train-step speed, "
                                     "scaling over device counts, MFU")
    which = b.add_mutually_exclusive_group(required=True)
    which.add_argument("--kernels", action="store_true", help="kernel sweep")
    which.add_argument("--config", help="config file whose train step to time (data.batch_size per device)")
    which.add_argument("--inference", metavar="WORKDIR", help="inference latency/throughput of a trained run")
    b.add_argument("--data", action="store_true",
                   help="with --config: time the config's input pipeline (decode + crop, images/s per worker "
                        "count) against its train step")
    b.add_argument("--workers", default="0,1,2", help="comma list of data.workers values for --data")
    b.add_argument("--devices", default=None, help="comma list of device counts (default 1,2,4,.. available)")
    b.add_argument("--backends", default="xla", help="comma list of op backends (model benchmark)")
    b.add_argument("--steps", type=int, default=10, help="timed steps after warm-up (model benchmark)")
    b.add_argument("--tiny", action="store_true", default=None, help="small shapes (default on CPU)")
    b.add_argument("--iters", type=int, default=None)
    b.add_argument("--ops", default="matmul,conv", help="comma list of matmul, conv")
    b.add_argument("--model", choices=("resnet50", "vit_b16"), default=None,
                   help="with --kernels: the roofline of this model's train-step kernels (FLOPs, minimum HBM "
                        "bytes, H100 roofline time; measured XLA and Pallas times on a GPU)")
    b.add_argument("--batch", type=int, default=256, help="batch size for --kernels --model")
    b.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="for --kernels --model")
    b.add_argument("--lowering", default="auto",
                   help="with --kernels: the Pallas lowering the kernels use, auto, triton or mosaic (a config "
                        "bench reads model.pallas_lowering); the sweep takes a comma list, timing XLA once per "
                        "shape for all, with {lowering} in --json")
    b.add_argument("--json", default=None, help="also write the rows to this JSON file")

    q = sub.add_parser("quantize", help="int8 post-training quantization of the newest checkpoint: writes "
                                        "WORKDIR/quantized/params.msgpack, prints float vs int8 accuracy and "
                                        "size, then one JSON object")
    q.add_argument("--workdir", required=True)
    q.add_argument("--calibrate-batches", type=int, default=4,
                   help="training batches that calibrate activation scales (int8 x int8 -> int32 layers); "
                        "0 = weight-only int8 (default 4)")
    q.add_argument("--split", default="test", choices=("train", "val", "test"), help="split to compare on")
    q.add_argument("--data-dir", default=None, help="override data.dir (data moved since training)")

    x = sub.add_parser("export", help="write params + batch_stats + config to ONE msgpack file (--output) "
                                      "and/or print an inference latency table (--bench); last line: JSON")
    x.add_argument("--workdir", required=True)
    x.add_argument("--output", default=None, help="file to write (load it with fastgpu_jax.load_exported)")
    _add_weight_choice(x)
    x.add_argument("--bench", action="store_true",
                   help="also time the jitted forward: median ms and images/s per batch size")
    x.add_argument("--batch-sizes", default="1,32,256", help="comma list of batch sizes for --bench")
    x.add_argument("--iters", type=int, default=20, help="timed calls per batch size for --bench")

    v = sub.add_parser("convert", help="write an image folder, CIFAR-10 or MNIST as ArrayRecord shards + "
                                       "manifest.json (data.name='arrayrecord'); last line: one JSON object")
    v.add_argument("--from", dest="kind", choices=("folder", "hf", "cifar10", "mnist"),
                   help="what --input holds: an image folder (train/<class>/, val/<class>/, optional test/), a "
                        "Hugging Face image set on disk (save_to_disk folder or parquet files; needs pyarrow), "
                        "or the CIFAR-10 / MNIST files")
    v.add_argument("--input", default=None, help="folder to read")
    v.add_argument("--output", required=True, help="folder to write (must not hold a converted set already)")
    v.add_argument("--resize-short", type=int, default=None,
                   help="folder/hf: shrink images so the short side is this many pixels, stored as JPEG")
    v.add_argument("--image-column", default=None, help="hf: the image column (default: the Image feature)")
    v.add_argument("--label-column", default=None, help="hf: the label column (default: the ClassLabel feature)")
    v.add_argument("--quality", type=int, default=90, help="JPEG quality 1..100 for --resize-short (default 90)")
    v.add_argument("--shard-size", type=int, default=5000, help="records per shard (default 5000)")
    v.add_argument("--overwrite", action="store_true", help="replace a converted set already in --output")
    v.add_argument("--verify", action="store_true",
                   help="only check --output: every shard's size and SHA-256 against its manifest")
    return p


class UsageError(Exception):
    """A malformed command line (exit 2, like argparse's own errors)."""


def _split_overrides(extra: list[str]) -> list[str]:
    """['--config.a.b=1', '--config.c', '2'] -> ['a.b=1', 'c=2']; anything else is an error."""
    out, i = [], 0
    while i < len(extra):
        arg = extra[i]
        if not arg.startswith("--config."):
            raise UsageError(f"unrecognized argument {arg!r} (config overrides look like --config.optimizer.lr=3e-3)")
        if "=" in arg:
            out.append(arg[len("--config."):])
        elif i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            out.append(f"{arg[len('--config.'):]}={extra[i + 1]}")
            i += 1
        else:
            raise UsageError(f"{arg} needs a value, e.g. {arg}=VALUE")
        i += 1
    return out


def _run(args, extra: list[str]) -> int:
    import fastgpu_jax as fg  # imported after parsing so --help is instant

    if args.command == "train":
        cfg = fg.load_config(args.config, overrides=_split_overrides(extra))
        summary = fg.train(cfg, args.workdir, allow_config_change=args.allow_config_change, restart=args.restart)
        print(json.dumps(summary))
    elif args.command == "config":
        cfg = fg.load_config(args.config, overrides=_split_overrides(extra))
        print(json.dumps(fg.config.to_flat_dict(cfg), indent=1))
    elif args.command == "eval":
        print(json.dumps(fg.evaluate(args.workdir, args.split, data_dir=args.data_dir, params=args.params,
                                     which=args.checkpoint)))
    elif args.command == "predict":
        print(json.dumps(_predict(fg, args)))
    elif args.command == "bench":
        from fastgpu_jax import bench

        split = lambda text: tuple(x.strip() for x in text.split(",") if x.strip())  # noqa: E731
        if args.inference:
            from fastgpu_jax.inference import benchmark_inference

            benchmark_inference(args.inference, iters=args.steps)
        elif args.kernels:
            from fastgpu_jax.pallas_kernels import lowering, tuning

            lowerings = tuple(lowering.check_lowering(name) for name in split(args.lowering))
            for name in lowerings:
                print(f"pallas lowering {lowering.describe(tuning.device_kind(), name)}")
            if args.model:
                if len(lowerings) != 1:
                    raise ValueError(f"--kernels --model times one lowering, got --lowering {args.lowering}")
                with lowering.use_lowering(lowerings[0]):
                    bench.run_roofline(args.model, batch=args.batch, dtype=args.dtype, iters=args.iters or 20,
                                       json_path=args.json)
            else:
                bench.run_kernel_benchmarks(tiny=args.tiny, iters=args.iters, json_path=args.json,
                                            ops=split(args.ops), lowerings=lowerings)
        elif args.data:
            from fastgpu_jax import bench_data

            cfg = fg.load_config(args.config, overrides=_split_overrides(extra))
            bench_data.run_data_benchmark(cfg, workers=tuple(int(n) for n in split(args.workers)),
                                          batches=args.steps, json_path=args.json)
        else:
            cfg = fg.load_config(args.config, overrides=_split_overrides(extra))
            counts = tuple(int(n) for n in split(args.devices)) if args.devices else None
            bench.run_model_benchmark(cfg, device_counts=counts, backends=split(args.backends),
                                      steps=args.steps, json_path=args.json)
    elif args.command == "quantize":
        from fastgpu_jax import quantize

        result = quantize.quantize_run(args.workdir, calibrate_batches=args.calibrate_batches, split=args.split,
                                       data_dir=args.data_dir)
        print(quantize.format_table(result))
        print(json.dumps(result))
    elif args.command == "export":
        from fastgpu_jax import inference

        if not args.output and not args.bench:
            raise ValueError("export needs --output FILE and/or --bench")
        result = (inference.export_params(args.workdir, args.output, params=args.params, which=args.checkpoint)
                  if args.output else {"workdir": args.workdir})
        if args.bench:
            sizes = tuple(int(n) for n in args.batch_sizes.split(",") if n.strip())
            result["bench"] = inference.benchmark_inference(args.workdir, batch_sizes=sizes, iters=args.iters)
        print(json.dumps(result))
    elif args.command == "plot":
        print(json.dumps({"plot": fg.plot_curves(args.workdir, args.output)}))
    elif args.command == "convert":
        from fastgpu_jax.data import convert, image_sources

        if args.verify:
            convert.verify(args.output)
            manifest = image_sources.read_manifest(args.output)
        else:
            if not args.kind or not args.input:
                raise UsageError("convert needs --from folder|hf|cifar10|mnist and --input DIR (or --verify)")
            manifest = convert.convert(args.kind, args.input, args.output, resize_short=args.resize_short,
                                       quality=args.quality, shard_size=args.shard_size, overwrite=args.overwrite,
                                       image_column=args.image_column, label_column=args.label_column)
        counts = {split: entry["count"] for split, entry in manifest["splits"].items()}
        summary = {"output": args.output, "from": manifest["source"]["from"], "counts": counts,
                   "classes": len(manifest["classes"]), "verified": bool(args.verify)}
        print(json.dumps(summary))
    return 0


def _predict(fg, args) -> dict:
    """Arrays in, labels/logits out; image files in, "file -> class (p)" lines out. Returns the JSON summary."""
    import numpy as np

    inputs = args.input
    if len(inputs) == 1 and inputs[0].endswith(".npy"):
        logits = fg.predict(args.workdir, np.load(inputs[0]), batch_size=args.batch_size, params=args.params,
                            which=args.checkpoint)
        result = logits if args.logits else logits.argmax(-1)
        summary = {"input": inputs[0], "count": int(len(logits)), "output": args.output}
        if args.output:
            np.save(args.output, result)
        else:  # the predictions themselves, in the one JSON line
            summary["logits" if args.logits else "labels"] = result.tolist()
        return summary
    if any(x.endswith(".npy") for x in inputs):
        raise UsageError("predict takes ONE .npy array, or image files and folders, not both")
    if args.logits:
        raise UsageError("--logits applies to .npy input; image files print class probabilities (--top-k)")
    rows = fg.predict_files(args.workdir, inputs, top_k=args.top_k, batch_size=args.batch_size, params=args.params,
                            which=args.checkpoint)
    for row in rows:
        print(f"{row['file']} -> " + ", ".join(f"{name} ({p:.3f})" for name, p in row["top"]))
    summary = {"input": inputs, "count": len(rows), "output": args.output}
    if args.output:
        with open(args.output, "w") as f:
            json.dump(rows, f, indent=1)
    else:
        summary["predictions"] = rows
    return summary


def main(argv: list[str] | None = None) -> int:
    """Runs one command. User errors (config, data, checkpoints, workdir, OS errors such as a full disk) are
    one line on stderr and exit code 2; ``--traceback`` or ``FASTGPU_DEBUG=1`` shows the traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--traceback" in argv:  # accepted anywhere on the line, before or after the command
        argv.remove("--traceback")
        os.environ["FASTGPU_DEBUG"] = "1"
    args, extra = _parser().parse_known_args(argv)
    from fastgpu_jax import quiet

    quiet.for_command_line()
    warnings.formatwarning = lambda message, *_, **__: f"fastgpu-jax: warning: {message}\n"
    from fastgpu_jax.errors import UserError

    try:
        if extra and args.command not in ("train", "bench", "config"):
            raise UsageError(f"unrecognized arguments: {' '.join(extra)}")
        if args.command == "bench" and args.data and not args.config:
            raise UsageError("bench --data times a config's input pipeline: give --config FILE with it")
        return _run(args, extra)
    except (UsageError, UserError, OSError, ValueError, FloatingPointError, NotImplementedError) as err:
        if quiet.debug():
            raise
        print(f"fastgpu-jax: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastgpu-jax: interrupted", file=sys.stderr)
        return 130


def _one_line(err: BaseException) -> str:
    """The message on one line; OS errors keep their path and reason."""
    if isinstance(err, OSError) and err.strerror:
        where = f" {err.filename!r}" if err.filename else ""
        return f"{err.strerror}:{where}" if where else err.strerror
    text = " ".join(str(err).split()) or type(err).__name__
    return text[:2000]
