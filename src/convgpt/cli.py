"""``convgpt`` command line: make tiny checkpoints, inspect checkpoints."""

from __future__ import annotations

import argparse
import sys


def _make_tiny(args: argparse.Namespace) -> int:
    import os

    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise FileExistsError(f"{args.out} exists and is not a folder")
    if os.path.isfile(os.path.join(args.out, "config.json")) and not args.force:
        raise FileExistsError(f"{args.out} already holds a checkpoint; pass --force to overwrite it")
    if args.train and args.preset == "published":
        raise ValueError("--train fits the small presets only (the published geometry would take hours on a CPU)")
    from convgpt_core.checkpoint import parameter_count
    from convgpt_core.tiny import make_checkpoint, train_on_corpus

    big = args.preset == "published"
    if big:
        print(f"writing the {args.preset} geometry (about 330 MB in bfloat16)...", file=sys.stderr)
    config = make_checkpoint(args.out, preset=args.preset, seed=args.seed, progress=big)
    print(f"wrote {args.preset} checkpoint to {args.out} ({parameter_count(config):,} parameters)")
    if args.train:
        def log(step, steps, loss):
            print(f"\rtraining on the shipped text: step {step}/{steps}, loss {loss:.3f}", end="",
                  file=sys.stderr, flush=True)

        loss = train_on_corpus(args.out, steps=args.steps, seed=args.seed, log=log)
        print(f"\ntrained {args.steps} steps (final loss {loss:.3f}): it now continues lines of the shipped text")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import json
    import os

    from convgpt_core.checkpoint import (
        CheckpointError,
        config_dtype,
        non_finite_tensors,
        parameter_count,
        tokenizer_max_id,
        validate_checkpoint,
    )

    try:
        config = validate_checkpoint(args.path)
    except CheckpointError as exc:
        print(f"invalid checkpoint: {exc}", file=sys.stderr)
        return 1
    with open(os.path.join(args.path, "config.json")) as f:
        auto_map = json.load(f).get("auto_map")
    tok = tokenizer_max_id(args.path)
    rope = config.rope_parameters
    g = config.geometry
    sliding = [i for i, t in enumerate(config.layer_types) if t == "sliding_attention"]
    rows = [
        ("hidden_size H", g.H),
        ("grid F x F", f"{g.F} x {g.F}"),
        ("pool e", g.e),
        ("residual D", f"{g.D} ({g.H / g.D:g}x narrower)"),
        ("conv kernel k", g.k),
        ("layers", config.num_hidden_layers),
        ("heads q / kv / head_dim", f"{config.num_attention_heads} / {config.num_key_value_heads} / {config.head_dim}"),
        ("intermediate", config.intermediate_size),
        ("vocab", config.vocab_size),
        ("tied embeddings", config.tie_word_embeddings),
        ("sliding layers", f"{sliding} (window {config.sliding_window})" if sliding else "none"),
        ("RoPE", f"{rope.get('rope_type', 'default')}, theta {rope['rope_theta']:g}, "
                 f"{config.max_position_embeddings} positions"),
        ("dtype", config_dtype(config) or "not stated"),
        ("tokenizer", f"ids 0..{tok[0]}" if tok else "none in folder"),
        ("auto_map", "present (ignored: no remote code runs)" if auto_map else "none"),
        ("parameters", f"{parameter_count(config):,}"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"{args.path}: valid ConvGPT checkpoint")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    bad = non_finite_tensors(args.path)
    if bad:
        print(f"warning: NaN or inf in {', '.join(bad)}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from convgpt.serve import serve

    return serve(args.engine, args.model, args.engine_args)


# convgpt_core.tiny.PRESETS' names, listed here so that `--help` imports no torch (a test
# keeps the two equal).
PRESET_NAMES = ("tiny", "tiny-untied", "tiny-sliding", "published")


def main(argv: list[str] | None = None) -> int:
    from convgpt import __version__
    from convgpt.serve import ENGINES  # the launcher's module imports only the standard library

    parser = argparse.ArgumentParser(prog="convgpt", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser("make-tiny", help="write a random-weight checkpoint (offline)")
    tiny.add_argument("out", help="output folder")
    tiny.add_argument("--preset", default="tiny", choices=PRESET_NAMES,
                      help="geometry: tiny (tied, H=256), tiny-untied, tiny-sliding, or the published model")
    tiny.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    tiny.add_argument("--train", action="store_true",
                      help="fit the model to the shipped text (about a minute on a CPU), so that it continues "
                      "its lines: a demo answer that shows the stack works")
    tiny.add_argument("--steps", type=int, default=100, help="training steps with --train (default 100)")
    tiny.add_argument("--force", action="store_true", help="overwrite a checkpoint already in OUT")
    tiny.set_defaults(func=_make_tiny)
    insp = sub.add_parser("inspect", help="validate a checkpoint and print its geometry")
    insp.add_argument("path", help="checkpoint folder")
    insp.set_defaults(func=_inspect)
    srv = sub.add_parser(
        "serve", help="serve a checkpoint with an engine's OpenAI-compatible server",
        description="Start vLLM's or SGLang's own server for a ConvGPT checkpoint, with the defaults this "
        "machine needs (CPU or CUDA); every argument after MODEL goes to the engine unchanged. The "
        "engine's processes are stopped together when the server exits.",
    )
    srv.add_argument("engine", choices=ENGINES, help="which engine serves")
    srv.add_argument("model", help="checkpoint folder (or a hub id the engine resolves)")
    srv.add_argument("engine_args", nargs=argparse.REMAINDER, help="passed to the engine's server")
    srv.set_defaults(func=_serve)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    # convgpt_core's CheckpointError is a ValueError: a one-line error, and none of torch is
    # imported to report the mistakes found before the work starts (an existing OUT, say)
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as exc:
        print(f"convgpt {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
