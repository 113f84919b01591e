"""``fashiondiff serve``: the web page for the stylist, on 127.0.0.1 unless told otherwise.

Usage::

    fashiondiff serve                          # after `make repro`: http://127.0.0.1:7860
    fashiondiff serve --model models --lora models --port 7861
    fashiondiff serve --tuned-only --device cuda   # real weights: one pipeline in memory

The base is params ``model.prior`` / ``model.decoder`` (``--base-prior``/``--base-decoder``
override), the tuned model ``--model``'s prior/ and decoder/; sampling defaults come from
params.yaml as for ``fashiondiff generate``. LoRA adapters (``--lora DIR``, and the
tuned folder's own when it has them) can be applied to the base from the page.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fashiondiff.errors import PipelineError
from fashiondiff.serving.engine import Limits

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_parser(subparsers) -> None:
    """Register ``serve`` on the top-level CLI."""
    limits = Limits()
    p = subparsers.add_parser(
        "serve",
        help="web page: text or photo + text -> image, base vs tuned",
        description="The web page for the stylist: text -> image and photo + text -> "
        "image, the base and the tuned model side by side.",
    )
    p.add_argument("--model", default="models", help="tuned model: a folder with prior/ and decoder/")
    p.add_argument("--base-prior", help="base prior folder or Hub id (default: params model.prior)")
    p.add_argument("--base-decoder", help="base decoder folder or Hub id (default: params model.decoder)")
    p.add_argument("--tuned-only", action="store_true", help="no base column (half the memory)")
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder with prior/lora and/or decoder/lora to offer on the base (repeatable)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port to bind (default 7860)")
    p.add_argument("--queue-size", type=int, default=8, help="requests that may wait; more are refused (default 8)")
    p.add_argument(
        "--max-upload-mb",
        type=float,
        default=limits.max_upload_mb,
        help=f"photo size cap (default {limits.max_upload_mb:g})",
    )
    p.add_argument("--device", help="cpu, cuda, cuda:1... (default: cuda if available)")
    p.add_argument("--params", default="params.yaml", help="defaults come from here if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    """Check the options, build the page, serve until Ctrl-C."""
    for ok, what in (
        (args.queue_size >= 1, f"--queue-size must be >= 1, got {args.queue_size}"),
        (args.max_upload_mb > 0, f"--max-upload-mb must be > 0, got {args.max_upload_mb}"),
        (0 < args.port < 65536, f"--port must be in 1..65535, got {args.port}"),
    ):
        if not ok:
            raise PipelineError(what)
    from dataclasses import replace

    from fashiondiff.commands.generate import defaults
    from fashiondiff.serving.studio import Side, Studio, find_adapters

    prior, decoder = str(Path(args.model) / "prior"), str(Path(args.model) / "decoder")
    base_prior, base_decoder = _base(args)
    sides = [Side("tuned", prior, decoder, args.device, folder=args.model)]
    if not args.tuned_only:
        sides.insert(0, Side("base", base_prior, base_decoder, args.device, takes_adapters=True))
    adapters = {}
    if args.tuned_only and args.lora:
        raise PipelineError("--lora adapters apply to the base model, which --tuned-only leaves out")
    if not args.tuned_only:  # the tuned folder's own adapters (a LoRA run), then --lora's
        adapters = find_adapters([args.model], base_prior, base_decoder, required=False)
        adapters.update(find_adapters(args.lora, base_prior, base_decoder))
    limits = replace(Limits(), max_upload_mb=args.max_upload_mb)
    studio = Studio(sides, adapters, limits, defaults(args.params))
    _warm(studio)
    _serve(studio, args)


def _base(args) -> tuple[str, str]:
    if args.base_prior and args.base_decoder:
        return args.base_prior, args.base_decoder
    if not Path(args.params).is_file():
        raise PipelineError(
            f"{args.params}: no params file to take the base model from: give --base-prior and --base-decoder"
        )
    from fashiondiff.config.whole import load_params

    model = load_params(args.params).model
    return args.base_prior or model.prior, args.base_decoder or model.decoder


def _warm(studio) -> None:
    """Load every side now, so the first visitor does not wait; a missing one is reported
    here and on the page, and looked for again at each request."""
    for side in studio.sides:
        try:
            side.engine()
        except PipelineError as exc:
            print(f"serve: {side.label} model not loaded yet: {exc}", file=sys.stderr)


def _serve(studio, args) -> None:
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home: offline, and private
    from fashiondiff.serving.page import build, launch_options

    if args.host not in LOOPBACK:
        print(
            f"serve: binding {args.host}: anyone who can reach this machine can use the page (there is no login)",
            file=sys.stderr,
        )
    page = build(studio, args.queue_size)
    print(
        f"serve: {studio.describe()}; queue {args.queue_size}, uploads up to {args.max_upload_mb:g} MB", file=sys.stderr
    )
    page.launch(**launch_options(args.host, args.port, args.max_upload_mb))
