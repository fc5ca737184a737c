"""``skillbank serve``: a bank served over HTTP, each request answered by its own skill (LitServe)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from skillbank.errors import SkillbankError
from skillbank.integrations.cli.common import escape, positive_float_arg
from skillbank.storage.bank import SkillBank

__all__ = ["register"]


def register(sub: Any) -> None:  # argparse's subparsers action
    """Add ``serve``."""
    p = sub.add_parser(
        "serve",
        help="serve the bank over HTTP: each request answered by its own skill from one base in memory",
        description='Start a LitServe server on --host:--port. POST /predict with {"text": ..., "skill": NAME} '
        'answers with that skill\'s own model (base + its region, its head): {"skill", "label", "logits"}. '
        'Leave "skill" out and the router picks the skill whose routing centroids are nearest (the answer\'s '
        '"routed" says why); that needs skills localized with --routing-data. Requests are batched and grouped '
        "by skill, one switch a group. Skills added to the bank later are served without a restart. GET /health "
        "says when the server is ready, GET /metrics counts switches and requests per skill. Ctrl-C stops it.",
    )
    p.add_argument("bank", help="the bank directory")
    p.add_argument("--base", required=True, help="the base model folder the skills were localized on, or pulled:<alias>")
    p.add_argument("--tokenizer", default=None, help="the tokenizer's folder (default: --base)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    p.add_argument("--max-batch-size", type=int, default=16, help="requests batched together at most (default: %(default)s)")
    p.add_argument(
        "--batch-timeout",
        type=positive_float_arg,
        default=0.01,
        help="seconds a batch waits to fill (default: %(default)s)",
    )
    p.add_argument("--max-length", type=int, default=128, help="tokens per text; longer texts are cut (default: %(default)s)")
    p.add_argument(
        "--refresh",
        type=positive_float_arg,
        default=2.0,
        help="seconds between looks at the bank for new or removed skills (default: %(default)s)",
    )
    p.add_argument(
        "--max-prepared",
        type=int,
        default=64,
        help="skills kept laid out in memory, 16 bytes an entry each (default: %(default)s); the others are read "
        "and prepared when a request names them, the least recently used one leaving",
    )
    p.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> int:
    from skillbank.integrations.serving import SkillServer, build_server, run_until_stopped

    if not 1 <= args.max_batch_size <= 4096 or not 1 <= args.max_length <= 1 << 16 or not 0 < args.port < 1 << 16:
        raise SkillbankError("--max-batch-size must be 1-4096, --max-length 1-65536 and --port 1-65535.")
    if args.max_prepared < 1:
        raise SkillbankError("--max-prepared must be at least 1.")
    from skillbank.vectors.models import load_tokenizer, model_path, require_safetensors

    require_safetensors(model_path(args.base))  # checked here, where the error is one line, not in the worker
    load_tokenizer(args.tokenizer or args.base)
    bank = SkillBank(args.bank, create=False)
    names = bank.names()
    if not names:
        raise SkillbankError(f"{args.bank} holds no skills yet; add one (skillbank localize) before serving it.")
    routable = any(bank.routable(n) for n in names)  # headers only: the worker reads the skills it needs
    with tempfile.TemporaryDirectory(prefix="skillbank-serve-") as scratch:
        api = SkillServer(
            args.bank,
            args.base,
            tokenizer=args.tokenizer,
            max_length=args.max_length,
            refresh_seconds=args.refresh,
            max_prepared=args.max_prepared,
            metrics_path=Path(scratch) / "metrics.json",
            max_batch_size=args.max_batch_size,
            batch_timeout=args.batch_timeout,
        )
        server = build_server(api, routable=routable)
        print(
            f"serving {len(names)} skills of {escape(str(args.bank))} on http://{args.host}:{args.port}/predict"
            f"{' (routing on)' if routable else ''}; Ctrl-C stops",
            flush=True,
        )
        run_until_stopped(server, args.host, args.port)
    print("server stopped", flush=True)
    return 0
