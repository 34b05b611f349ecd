"""The ``weightcache`` command line: parse arguments once, then hand typed values to the commands.

Tables and results go to stdout, progress, logs and errors to stderr; ``--json`` prints one
JSON document on stdout. The store commands find the node's configuration without flags:
``--config``, else ``$WEIGHTCACHE_CONFIG``, else ``/etc/weightcache/config.toml`` when it exists
(the DaemonSet mounts it there and sets the variable, so ``kubectl exec ... weightcache gc``
obeys the node's budget). No traceback reaches the user: an OSError is one line naming the path.
"""

from __future__ import annotations

import argparse
import os
import re
import sqlite3
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from weightcache.app import logs
from weightcache.daemon import __version__
from weightcache.daemon.config import ConfigError
from weightcache.daemon.errors import WeightcacheError

if TYPE_CHECKING:
    from weightcache.daemon.config import Config

DEFAULT_STORE = "/var/lib/weightcache"
DEFAULT_CONFIG = "/etc/weightcache/config.toml"
CONFIG_ENV = "WEIGHTCACHE_CONFIG"
DEFAULT_CSI_ENDPOINT = "unix:///csi/csi.sock"
DEFAULT_METRICS_ADDRESS = "0.0.0.0:9808"
DEFAULT_AGENT_ADDRESS = "127.0.0.1:9808"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

Command = Callable[[argparse.Namespace], int]


def config_path(flag: str | None) -> str | None:
    """``--config``, else ``$WEIGHTCACHE_CONFIG``, else the default path when it exists."""
    if flag:
        return flag
    if os.environ.get(CONFIG_ENV):
        return os.environ[CONFIG_ENV]
    return DEFAULT_CONFIG if os.path.isfile(DEFAULT_CONFIG) else None


def _config(args: argparse.Namespace) -> Config:
    from pathlib import Path

    from weightcache.daemon.config import load_config

    config_file = config_path(getattr(args, "config", None))
    store = getattr(args, "store", None)
    return load_config(
        Path(config_file) if config_file else None, root=Path(store) if store else None
    )


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTPE]i?|k)?B?\s*$")
_UNITS = {"": 1, "k": 1000, "K": 1000}
for _i, _u in enumerate("KMGTPE", start=1):
    _UNITS[_u] = 1000**_i
    _UNITS[_u + "i"] = 1024**_i


def parse_size(text: str) -> int:
    """Bytes from ``500Gi``, ``10G``, ``1.5Ti``, ``1048576`` (Kubernetes quantity suffixes:
    ``Ki Mi Gi Ti Pi Ei`` are powers of 1024, ``k/K M G T P E`` of 1000; a trailing ``B`` is
    allowed). Negative sizes are refused."""
    if text.strip().startswith("-"):
        raise argparse.ArgumentTypeError(f"{text!r}: a size must not be negative")
    match = _SIZE.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size (bytes, or a number with Ki, Mi, Gi, Ti or K, M, G, T)"
        )
    return int(float(match[1]) * _UNITS[match[2] or ""])


def _warm(args: argparse.Namespace) -> int:
    from weightcache.app import commands

    return commands.warm(_config(args), args.refs, args.json)


def _ls(args: argparse.Namespace) -> int:
    from weightcache.app import commands

    return commands.ls(_config(args), args.json)


def _verify(args: argparse.Namespace) -> int:
    from weightcache.app import commands

    return commands.verify(_config(args), args.full, args.json)


def _label(args: argparse.Namespace) -> int:
    from weightcache.app import commands

    return commands.label(_config(args), args.refs, args.json)


def _gc(args: argparse.Namespace) -> int:
    from weightcache.app import commands

    return commands.gc(_config(args), args.target_bytes)


def _node(args: argparse.Namespace) -> int:
    import asyncio
    import socket

    from weightcache.app.node_agent import run_node

    node_id = args.node_name or socket.gethostname()
    asyncio.run(
        run_node(
            _config(args),
            args.csi_endpoint,
            node_id,
            kube=not args.no_kube,
            kubeconfig=args.kubeconfig,
            metrics_address=args.metrics_address or None,
        )
    )
    return EXIT_OK


def _controller(args: argparse.Namespace) -> int:
    import asyncio
    from pathlib import Path

    from weightcache.app.controller_agent import run_controller
    from weightcache.daemon.config import load_config

    config = load_config(Path(args.config) if args.config else None)
    asyncio.run(run_controller(config, args.csi_endpoint))
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    from weightcache.app.status import status

    return status(_config(args).store, args.agent_address or None, args.json)


def _demo(args: argparse.Namespace) -> int:
    from weightcache.app.demo import run_demo

    return run_demo()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weightcache",
        description="Node-level model-weight cache: prefetch, verify and mount model weights.",
    )
    parser.add_argument("--version", action="version", version=f"weightcache {__version__}")
    log_args(parser, argparse.SUPPRESS)  # also accepted after the command
    parser.set_defaults(log_format="text", log_level="INFO")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def store_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--store",
            default=None,
            metavar="DIR",
            help=f"store directory (default: [store] root of the configuration, {DEFAULT_STORE})",
        )
        p.add_argument(
            "--config",
            default=None,
            metavar="FILE",
            help=f"TOML configuration (default: ${CONFIG_ENV}, else {DEFAULT_CONFIG} if present)",
        )

    def json_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", action="store_true", help="print one JSON document on stdout")

    warm = sub.add_parser("warm", help="fetch and verify models into the store")
    warm.add_argument("refs", nargs="+", metavar="REF", help="oci://, s3:// or file:// reference")
    store_arg(warm)
    json_arg(warm)
    warm.set_defaults(run=_warm)

    ls = sub.add_parser("ls", help="list models, sizes, states and pins")
    store_arg(ls)
    json_arg(ls)
    ls.set_defaults(run=_ls)

    verify = sub.add_parser("verify", help="re-check the store; exit 1 when anything is corrupt")
    store_arg(verify)
    verify.add_argument("--full", action="store_true", help="re-hash content, not only metadata")
    json_arg(verify)
    verify.set_defaults(run=_verify)

    gc = sub.add_parser("gc", help="evict unpinned models down to a target size")
    store_arg(gc)
    gc.add_argument(
        "--target-bytes",
        type=parse_size,
        default=None,
        metavar="SIZE",
        help="evict down to this many bytes (500Gi, 10G, 1048576; default: the low watermark)",
    )
    gc.set_defaults(run=_gc)

    node = sub.add_parser("node", help="run the node agent and the CSI Identity and Node services")
    store_arg(node)
    node.add_argument("--csi-endpoint", default=DEFAULT_CSI_ENDPOINT)
    node.add_argument("--metrics-address", default=DEFAULT_METRICS_ADDRESS, metavar="HOST:PORT")
    node.add_argument("--node-name", default=None, metavar="NAME")
    kube = node.add_mutually_exclusive_group()
    kube.add_argument("--kubeconfig", default=None, metavar="PATH")
    kube.add_argument("--no-kube", action="store_true", help="run without the warm controller")
    node.set_defaults(run=_node)

    controller = sub.add_parser("controller", help="run the metadata-only CSI Controller service")
    controller.add_argument("--csi-endpoint", default=DEFAULT_CSI_ENDPOINT)
    controller.add_argument(
        "--config", default=None, metavar="FILE", help="TOML configuration (registry access)"
    )
    controller.set_defaults(run=_controller)

    label = sub.add_parser(
        "label", help="the node label a warm reference sets, and the node affinity preferring it"
    )
    label.add_argument("refs", nargs="+", metavar="REF", help="oci://, s3:// or file:// reference")
    label.add_argument(
        "--config", default=None, metavar="FILE", help="TOML configuration (registry aliases)"
    )
    json_arg(label)
    label.set_defaults(run=_label)

    demo = sub.add_parser("demo", help="the whole flow on this machine")
    demo.set_defaults(run=_demo)

    status = sub.add_parser("status", help="the node's whole picture for an operator")
    store_arg(status)
    json_arg(status)
    status.add_argument(
        "--agent-address",
        default=DEFAULT_AGENT_ADDRESS,
        metavar="HOST:PORT",
        help="the node agent's metrics address, asked for its live status (%(default)s; "
        "empty: do not ask)",
    )
    status.set_defaults(run=_status)
    for command in sub.choices.values():
        log_args(command, argparse.SUPPRESS)
    return parser


def log_args(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--log-format", default=default, choices=logs.FORMATS)
    parser.add_argument("--log-level", default=default, choices=logs.LEVELS)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(args.log_format, args.log_level)
    run: Command = args.run
    try:
        return run(args)
    except ConfigError as exc:
        print(f"weightcache {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except WeightcacheError as exc:
        print(f"weightcache {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"weightcache {args.command}: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILED
    except sqlite3.Error as exc:
        print(f"weightcache {args.command}: the store's index: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"weightcache {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
