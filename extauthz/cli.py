"""The ``extauthz`` command line: serve, check-config, admin, demo."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from extauthz.settings import from_env


def _serve(args: argparse.Namespace) -> int:
    from extauthz.policy.loader import PolicyError
    from extauthz.telemetry import logs

    try:
        settings = from_env(
            {
                "policy_path": args.policy,
                "host": args.host,
                "grpc_port": args.grpc_port,
                "http_port": args.http_port,
                "store_url": args.store,
                "decision_budget_ms": args.budget_ms,
                "max_message_bytes": args.max_message_bytes,
                "admin_token_file": args.admin_token_file,
                "noise_key_file": args.noise_key_file,
                "keys_file": args.keys_file,
                "tls_cert_file": args.tls_cert,
                "tls_key_file": args.tls_key,
                "tls_client_ca_file": args.tls_client_ca,
                "drain_s": args.drain_s,
                "replicas": args.replicas,
                "workers": args.workers,
                "reload_interval_s": args.reload_interval_s,
                "log_level": args.log_level,
                "log_format": args.log_format,
            }
        )
        logs.configure(settings.log_level, settings.log_format)
        if settings.workers > 1:
            from extauthz import workers

            return workers.supervise(settings)
        from extauthz import app

        asyncio.run(app.serve(settings))
    except PolicyError as exc:
        print(f"extauthz: invalid policy {exc.source}:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        print(f"extauthz: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def _check_config(args: argparse.Namespace) -> int:
    from extauthz.policy.loader import PolicyError, load_policy

    try:
        snapshot = load_policy(Path(args.file))
    except PolicyError as exc:
        print(f"{exc.source}: invalid", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    policy = snapshot.policy
    print(
        f"{snapshot.source}: ok (mode {policy.mode}, tiers {', '.join(policy.tiers)}, "
        f"{len(snapshot.keys_by_sha256)} API keys, {len(policy.routes)} model routes, digest {snapshot.digest[:12]})"
    )
    return 0


def _admin(args: argparse.Namespace) -> int:
    import grpc

    from extauthz.admin_client import AdminClient
    from extauthz.service.admin import read_token

    token_file = args.token_file or os.environ.get("EXTAUTHZ_ADMIN_TOKEN_FILE")
    token = read_token(Path(token_file)) if token_file else None
    if token is None:
        print(
            "extauthz admin: give --token-file (or EXTAUTHZ_ADMIN_TOKEN_FILE) with the admin token",
            file=sys.stderr,
        )
        return 2
    tls = None
    if args.ca_file:
        tls = (
            Path(args.ca_file),
            Path(args.cert_file) if args.cert_file else None,
            Path(args.key_file) if args.key_file else None,
        )
    with AdminClient(args.target, token, timeout_s=args.timeout, tls=tls) as admin:
        try:
            reply: dict[str, Any]
            if args.admin_command == "get-client":
                reply = admin.get_client(args.client_id)
            elif args.admin_command == "list":
                reply = admin.list_clients(limit=args.limit, page_token=args.page_token)
            elif args.admin_command == "reset":
                reply = admin.reset(args.client_id)
            elif args.admin_command == "export-evidence":
                for line in admin.export_evidence(args.client_id or "", limit=args.limit):
                    print(line)
                return 0
            elif args.admin_command == "erase-evidence":
                reply = {"erased": admin.erase_evidence(args.client_id)}
            else:
                level = None if args.level == "none" else args.level
                reply = admin.set_level(
                    args.client_id, level, blocked=args.block, reason=args.reason, ttl_s=args.ttl
                )
        except grpc.RpcError as exc:
            print(f"extauthz admin: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(json.dumps(reply, indent=2))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from extauthz.demo.run import run_demo

    return run_demo(
        keep=args.keep,
        workdir=Path(args.workdir) if args.workdir else None,
        budget=args.budget,
        seed=args.seed,
        report_dir=Path(args.report_dir) if args.report_dir else None,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="extauthz", description="Model-theft defense beside Envoy."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the guard (gRPC :9191, HTTP :9192)")
    serve.add_argument("--policy", type=Path, help="policy YAML (default: the built-in policy)")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1; 0.0.0.0 in a container)")
    serve.add_argument("--grpc-port", type=int)
    serve.add_argument("--http-port", type=int)
    serve.add_argument("--store", help="'memory' (default) or a redis:// URL")
    serve.add_argument(
        "--budget-ms", type=float, help="decision budget bounding store calls (default 50)"
    )
    serve.add_argument("--max-message-bytes", type=int, help="largest model body (default 8 MiB)")
    serve.add_argument(
        "--admin-token-file", type=Path, help="file with the admin API's bearer token"
    )
    serve.add_argument(
        "--replicas",
        type=int,
        help="guard replicas sharing the store (divides budgets in local mode)",
    )
    serve.add_argument(
        "--workers",
        type=int,
        help="worker processes sharing the ports (default 1; more need a redis:// store)",
    )
    serve.add_argument(
        "--keys-file",
        type=Path,
        help="challenge and pass keys, YAML {current: id, keys: {id: secret}}",
    )
    serve.add_argument(
        "--noise-key-file", type=Path, help="secret for keyed noise (the same on every replica)"
    )
    serve.add_argument(
        "--tls-cert", type=Path, help="serve gRPC over TLS with this certificate (PEM)"
    )
    serve.add_argument("--tls-key", type=Path, help="the certificate's private key (PEM)")
    serve.add_argument(
        "--tls-client-ca", type=Path, help="require client certificates signed by this CA (mTLS)"
    )
    serve.add_argument(
        "--drain-s", type=float, help="seconds NOT_SERVING before stopping (default 5)"
    )
    serve.add_argument(
        "--reload-interval-s", type=float, help="policy file poll interval (default 2)"
    )
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    serve.add_argument("--log-format", choices=("json", "console"))
    serve.set_defaults(func=_serve)

    check = commands.add_parser("check-config", help="validate a policy file")
    check.add_argument("file")
    check.set_defaults(func=_check_config)

    admin = commands.add_parser("admin", help="inspect and steer clients through the admin API")
    admin.add_argument("--target", default="127.0.0.1:9191")
    admin.add_argument(
        "--token-file", help="admin bearer token file (or EXTAUTHZ_ADMIN_TOKEN_FILE)"
    )
    admin.add_argument("--timeout", type=float, default=5.0)
    admin.add_argument("--ca-file", help="connect over TLS, trusting this CA (PEM)")
    admin.add_argument("--cert-file", help="client certificate for mTLS (PEM)")
    admin.add_argument("--key-file", help="client key for mTLS (PEM)")
    admin_commands = admin.add_subparsers(dest="admin_command", required=True)
    get_client = admin_commands.add_parser("get-client", help="show one client")
    get_client.add_argument("client_id")
    listing = admin_commands.add_parser("list", help="list known clients")
    listing.add_argument("--limit", type=int, default=100)
    listing.add_argument("--page-token", default="")
    reset = admin_commands.add_parser("reset", help="forget a client")
    reset.add_argument("client_id")
    export = admin_commands.add_parser("export-evidence", help="print the evidence ledger as JSONL")
    export.add_argument("--client-id", default="")
    export.add_argument("--limit", type=int, default=0)
    erase = admin_commands.add_parser("erase-evidence", help="erase one client's evidence records")
    erase.add_argument("client_id")
    set_level = admin_commands.add_parser(
        "set-level", help="pin a client's risk level, or block it"
    )
    set_level.add_argument("client_id")
    set_level.add_argument("level", choices=("normal", "elevated", "suspicious", "abusive", "none"))
    set_level.add_argument("--block", action="store_true", help="also block the client")
    set_level.add_argument("--reason", default="")
    set_level.add_argument(
        "--ttl", type=float, default=0.0, help="seconds the pin lasts (0: until reset)"
    )
    admin.set_defaults(func=_admin)

    solve = commands.add_parser(
        "solve",
        help="solve a proof-of-work challenge (TOKEN DIFFICULTY), or send a request and solve what it gets",
        add_help=False,
    )
    solve.add_argument("rest", nargs=argparse.REMAINDER)

    redteam = commands.add_parser(
        "redteam",
        help="attack a model endpoint and report what a thief gets (see extauthz redteam --help)",
        add_help=False,
    )
    redteam.add_argument("rest", nargs=argparse.REMAINDER)
    verify = commands.add_parser(
        "verify",
        help="test a suspect model for our watermarks (see extauthz verify --help)",
        add_help=False,
    )
    verify.add_argument("rest", nargs=argparse.REMAINDER)

    demo = commands.add_parser(
        "demo", help="run model + guard + Envoy locally and send traffic through"
    )
    demo.add_argument(
        "--keep", action="store_true", help="leave the stack running after the traffic"
    )
    demo.add_argument(
        "--workdir", help="where logs and configs go (default: a temporary directory)"
    )
    demo.add_argument(
        "--budget", type=int, default=600, help="red-team instances per attack (default 600)"
    )
    demo.add_argument("--seed", type=int, default=0, help="the red team's seed (default 0)")
    demo.add_argument(
        "--report-dir", help="where redteam-report.html/.json go (default: the current directory)"
    )
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["redteam"]:
        from extauthz.redteam.cli import main as redteam_main

        return redteam_main(argv[1:])
    if argv[:1] == ["verify"]:
        from extauthz.evidence.cli import main as verify_main

        return verify_main(argv[1:])
    if argv[:1] == ["solve"]:
        # `solve` has its own parser (extauthz.challenge.client), options included.
        from extauthz.challenge.client import main as solve_main

        return solve_main(argv[1:])
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code
