"""``freqar serve``: the local web studio (needs ``pip install 'freqar[serve]'``)."""

from __future__ import annotations

import argparse
import ipaddress
import sys

from ..errors import FreqarError, InvalidOption
from ..registry import create_model, list_models
from .common import resolve_device

# The shipped default models, in order of preference; the first ones that exist are served by default.
DEFAULT_MODELS = ("emoji",)
FALLBACK_MODEL = "var-tiny"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="local web studio: generate, accelerate and compare in a browser")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--models",
        nargs="+",
        metavar="MODEL",
        help="presets or saved model directories to serve; the page can pick only these "
        f"(default: the shipped {', '.join(DEFAULT_MODELS)} model, else {FALLBACK_MODEL})",
    )
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--concurrency", type=int, default=1, help="generations at once per model (default 1)")
    p.add_argument("--queue", type=int, default=8, help="requests that may wait per model (default 8)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per generation")
    p.add_argument("--max-body", type=int, default=16 * 1024, help="largest request body in bytes")
    p.set_defaults(func=run)


def default_models() -> list[str]:
    known = set(list_models())
    return [m for m in DEFAULT_MODELS if m in known] or [FALLBACK_MODEL]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..serve.app import create_app
    except ImportError as e:
        raise FreqarError(
            f"freqar serve needs the serve extra ({e.name} is missing): pip install 'freqar[serve]'"
        ) from None
    from ..serve.studio import ServeSettings

    if not 0 <= args.port <= 65535:
        raise InvalidOption(f"--port must be in [0, 65535], got {args.port}")
    settings = ServeSettings(
        concurrency=args.concurrency, queue=args.queue, max_body=args.max_body, threads=args.threads
    )
    device = resolve_device(args.device)
    models = {}
    for spec in args.models or default_models():
        pipe = create_model(spec, device=device)
        name = pipe.name if spec not in list_models() else spec
        base, n = name, 2
        while name in models:
            name, n = f"{base}-{n}", n + 1
        models[name] = pipe
        print(f"freqar serve: model '{name}' from {spec} ({pipe.image_size}px, {pipe.num_classes} classes)")
    local = is_loopback(args.host)
    allowed = ["127.0.0.1", "localhost", "[::1]", "::1"] if local else None
    app = create_app(models, settings, allowed_hosts=allowed)
    url_host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"freqar serve: http://{url_host}:{args.port}/")
    if local:
        print(f"freqar serve: bound to {args.host}, reachable from this machine only (--host to change)")
    else:
        print(
            f"freqar serve: WARNING: bound to {args.host}, reachable from other machines; "
            "there is no authentication",
            file=sys.stderr,
        )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
