"""The ``ktizo-agent`` command line: argparse over the flows, and exit codes that say what happened.

0 done · 1 failed (network, pin mismatch, bad bundle…) · 2 usage · 3 rejected or revoked (403) · 4 purged or
unknown (404) · 5 gave up after --max-attempts polls · 128+N stopped by signal N (serve: 0 on SIGTERM)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from ktizo_agent import __version__, agent, config, enroll, facts, identity, install, pki, serve
from ktizo_agent.errors import AgentError, ExitCode, Interrupted, UsageError
from ktizo_agent.stop import Stopper

PROG = "ktizo-agent"
log = logging.getLogger("ktizo_agent")

DESCRIPTION = """\
The host side of Ktizo: ask Ktizo to enroll this machine, wait for an operator to approve it, install the
certificate Ktizo signs for a key made here, then serve this host's facts to Ktizo over mutual TLS."""

EPILOG = """\
examples:
  ktizo-agent enroll https://ktizo.example.com --ca-fingerprint sha256:3f1c…   # once, as root
  ktizo-agent serve                                                            # the long-running service
  ktizo-agent --enroll https://ktizo.example.com --ca-fingerprint sha256:3f1c… # both (a systemd unit's ExecStart)
  ktizo-agent status

Get the CA fingerprint on the Ktizo host with `ktizo pki fingerprint`, or from the Ktizo UI.
exit codes: 0 done, 1 failed, 2 usage, 3 rejected/revoked, 4 purged/unknown, 5 gave up polling,
128+N stopped by signal N (serve exits 0 on SIGTERM)."""


def _common(parser: argparse.ArgumentParser, *, sub: bool) -> None:
    """Options every command takes, before or after the command name. In a subparser they default to SUPPRESS,
    so an option given before the command is not reset by the subparser's default."""
    group = parser.add_argument_group("files and identity")

    def option(*names: str, default: Any = None, help: str, **kwargs: Any) -> None:
        group.add_argument(*names, default=argparse.SUPPRESS if sub else default, help=help, **kwargs)

    option("--config", metavar="FILE", default=str(config.DEFAULT_CONFIG), help=f"default {config.DEFAULT_CONFIG}")
    option(
        "--cert-dir",
        metavar="DIR",
        default=str(config.DEFAULT_CERT_DIR),
        help=f"ca.pem, server.pem, server.key.pem (default {config.DEFAULT_CERT_DIR}/)",
    )
    option(
        "--whitelist",
        metavar="FILE",
        default=str(config.DEFAULT_WHITELIST),
        help=f"allowed_ips: who may call the listener (default {config.DEFAULT_WHITELIST})",
    )
    option(
        "--machine-id-file",
        metavar="FILE",
        default=str(identity.DEFAULT_MACHINE_ID_FILE),
        help=f"default {identity.DEFAULT_MACHINE_ID_FILE}",
    )
    option(
        "--os-release-file",
        metavar="FILE",
        default=str(identity.DEFAULT_OS_RELEASE_FILE),
        help=f"default {identity.DEFAULT_OS_RELEASE_FILE}",
    )
    option("--hostname", help="the hostname to report (default: the system's)")
    option("--ip-address", action="append", metavar="IP", help="an address to report, repeatable (default: found)")
    option("--proc-root", metavar="DIR", default="/proc", help="facts read cpuinfo, meminfo here (default /proc)")
    option("--sys-root", metavar="DIR", default="/sys", help="facts read block and net devices here (default /sys)")
    option(
        "--max-attempts",
        type=int,
        metavar="N",
        help="polls before giving up (default: max_poll_attempts; 0 = no limit)",
    )
    option("--log-file", metavar="FILE", help="log to FILE too (stderr always)")
    option("-v", "--verbose", action="store_true", default=False, help="log every step")


def _enroll_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *, sub: bool) -> None:
    def default(value: Any) -> Any:
        return argparse.SUPPRESS if sub else value

    parser.add_argument(
        "--ca-fingerprint",
        metavar="sha256:HEX",
        default=default(None),
        help="SHA-256 of Ktizo's CA certificate; any other CA is refused (`ktizo pki fingerprint` on the Ktizo host)",
    )
    parser.add_argument(
        "--insecure",
        "--enroll-insecure",
        action="store_true",
        dest="insecure",
        default=default(False),
        help="without a pin, trust whatever CA answers, and skip TLS verification of MANAGER_URL (loudly)",
    )
    parser.add_argument(
        "--manager-ca",
        metavar="FILE",
        default=default(None),
        help="CA bundle to verify an https MANAGER_URL with (default: the system's)",
    )
    parser.add_argument(
        "--key-type",
        choices=pki.KEY_TYPES,
        default=default(pki.DEFAULT_KEY_TYPE),
        help="the key made on this host (default: p256)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    seed = parser.add_argument_group("enroll, then serve in one go (linux_patch_api's spelling)")
    seed.add_argument("--enroll", metavar="MANAGER_URL", help="enroll with the Ktizo at MANAGER_URL, then serve")
    _enroll_options(seed, sub=False)
    seed.add_argument(
        "--listen", metavar="HOST:PORT", default=None, help=f"for serve (default: {serve.DEFAULT_LISTEN})"
    )
    _common(parser, sub=False)

    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=summary, description=description)

    p = command(
        "enroll",
        "ask Ktizo to enroll this host and wait for approval",
        "Fetch Ktizo's CA and check it against --ca-fingerprint, make a key here, send this host's identity and a "
        "CSR, then poll until an operator approves (certificate installed, exit 0), rejects (3) or purges (4) "
        "it. Interrupted, it resumes with the saved polling token and the same key.",
    )
    p.add_argument("manager_url", metavar="MANAGER_URL", help="Ktizo's base URL, e.g. https://ktizo.example.com")
    _enroll_options(p, sub=True)
    _common(p, sub=True)

    p = command(
        "serve",
        "serve this host's facts to Ktizo over mTLS; check in and renew",
        "Listen for Ktizo (mTLS with Ktizo's CA, whitelisted addresses, Ktizo's manager certificate only) and "
        "answer GET /v1/facts; check in with Ktizo and renew the certificate at 2/3 of its life.",
    )
    p.add_argument(
        "--listen",
        metavar="HOST:PORT",
        default=argparse.SUPPRESS,
        help=f"default {serve.DEFAULT_LISTEN}; port 0 picks one",
    )
    _common(p, sub=True)

    p = command("renew", "renew the certificate now (new key, over mTLS)", "Renew now; the old files stay as .prev.")
    _common(p, sub=True)
    p = command("checkin", "check in with Ktizo once (sends the facts)", "One check-in, as serve does periodically.")
    _common(p, sub=True)
    p = command("status", "print what the config says: enrolled or pending, certificate dates", "Read-only.")
    _common(p, sub=True)
    p = command("facts", "print the facts JSON this host reports", "What GET /v1/facts and check-ins carry.")
    _common(p, sub=True)
    return parser


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno == logging.INFO else record.levelname.lower() + ": "
        text = f"{PROG}: {level}{record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def _setup_logging(verbose: bool, log_file: str | None) -> Callable[[], None]:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    handlers[0].setFormatter(_Formatter())
    if log_file:
        try:
            to_file = logging.FileHandler(log_file, encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"--log-file {log_file}: {exc.strerror}") from None
        to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handlers.append(to_file)
    before = (log.level, log.propagate)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False
    for handler in handlers:
        log.addHandler(handler)
    # httpx logs each request's URL at INFO, and a status URL carries the polling token.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)

    def undo() -> None:
        for handler in handlers:
            log.removeHandler(handler)
            handler.close()
        log.setLevel(before[0])
        log.propagate = before[1]

    return undo


def _paths(args: argparse.Namespace) -> config.Paths:
    return config.Paths(config=Path(args.config), cert_dir=Path(args.cert_dir), whitelist=Path(args.whitelist))


def _sources(args: argparse.Namespace) -> identity.Sources:
    addresses = []
    for text in args.ip_address or []:
        try:
            addresses.append(identity.validate_ip(text))
        except ValueError as exc:
            raise UsageError(f"--ip-address: {exc}") from None
    return identity.Sources(
        machine_id_file=Path(args.machine_id_file),
        os_release_file=Path(args.os_release_file),
        hostname=args.hostname,
        ip_addresses=tuple(dict.fromkeys(addresses)),
    )


def _roots(args: argparse.Namespace) -> facts.Roots:
    return facts.Roots(proc=Path(args.proc_root), sys=Path(args.sys_root))


def _enroll_options_from(args: argparse.Namespace, manager_url: str) -> enroll.Options:
    pin = None
    if args.ca_fingerprint:
        try:
            pin = pki.normalize_fingerprint(args.ca_fingerprint)
        except ValueError as exc:
            raise UsageError(f"--ca-fingerprint: {exc}", hint=enroll.FINGERPRINT_HINT) from None
    elif not args.insecure:
        raise UsageError(
            "enrolling needs Ktizo's CA fingerprint: --ca-fingerprint sha256:HEX",
            hint=f"{enroll.FINGERPRINT_HINT} (or, knowing the risk, --insecure)",
        )
    if args.max_attempts is not None and args.max_attempts < 0:
        raise UsageError("--max-attempts is 0 (unlimited) or more")
    return enroll.Options(
        manager_url=manager_url,
        pin=pin,
        insecure=bool(args.insecure),
        manager_ca=Path(args.manager_ca) if args.manager_ca else None,
        key_type=args.key_type,
        max_attempts=args.max_attempts,
    )


def _do_enroll(args: argparse.Namespace, stopper: Stopper, manager_url: str) -> int:
    options = _enroll_options_from(args, manager_url)
    if options.insecure:
        log.warning(
            "--insecure: MANAGER_URL's TLS certificate is not verified%s",
            "" if options.pin else ", and the CA is trusted on first sight without a pin",
        )
    enroll.enroll(_paths(args), _sources(args), options, stopper)
    return ExitCode.OK


def _do_serve(args: argparse.Namespace, stopper: Stopper) -> int:
    listen = serve.parse_listen(args.listen or serve.DEFAULT_LISTEN)

    def listening(host: str, port: int) -> None:
        print(f"{PROG}: listening on {host}:{port}", file=sys.stderr, flush=True)

    serve.serve(_paths(args), _sources(args), _roots(args), listen, stopper, on_listening=listening)
    print(f"{PROG}: stopped by {signal.Signals(stopper.signum or signal.SIGTERM).name}", file=sys.stderr)
    return ExitCode.OK if stopper.signum in (None, signal.SIGTERM) else 128 + (stopper.signum or 0)


def _do_renew(args: argparse.Namespace) -> int:
    paths = _paths(args)
    resumed = install.resume(paths)
    if resumed is not None:
        log.info(
            "finished an interrupted install: %s valid until %s",
            paths.server_cert,
            pki.iso(resumed.cert.not_valid_after_utc),
        )
        return ExitCode.OK
    done = agent.renew(paths, agent.membership(paths), _sources(args))
    log.info(
        "renewed: %s valid until %s (the old files are kept as .prev)",
        paths.server_cert,
        pki.iso(done.cert.not_valid_after_utc),
    )
    return ExitCode.OK


def _do_checkin(args: argparse.Namespace) -> int:
    paths = _paths(args)
    install.resume(paths)
    member = agent.membership(paths)
    collected = facts.collect(identity.collect(_sources(args)), _roots(args))
    answer = agent.checkin(paths, member, collected, None)
    renew_after = pki.iso(answer.renew_after) if answer.renew_after else "not given"
    log.info("checked in with %s; next check-in in %ss, renew after %s", member.mtls_url, answer.interval, renew_after)
    return ExitCode.OK


def _do_status(args: argparse.Namespace) -> int:
    paths = _paths(args)
    data = config.load(paths.config)
    known = config.section(data, "manager", paths.config)
    pending = config.Enrollment.read(data, paths.config)
    lines: list[str] = []
    if known.get("url") and paths.server_cert.exists():
        cert = pki.load_certificate_file(paths.server_cert)
        now = dt.datetime.now(dt.UTC)
        lines += [
            "state: enrolled" + (" (certificate EXPIRED: enroll again)" if now >= cert.not_valid_after_utc else ""),
            f"manager: {known.get('url')}",
            f"mtls_url: {known.get('mtls_url') or '-'}",
            f"ca_fingerprint: {known.get('ca_fingerprint') or '-'}",
            f"manager_addresses: {', '.join(str(a) for a in known.get('addresses') or []) or '-'}",
            f"certificate: {paths.server_cert} (serial {cert.serial_number:x})",
            f"not_before: {pki.iso(cert.not_valid_before_utc)}",
            f"not_after: {pki.iso(cert.not_valid_after_utc)}",
            f"renew_after: {pki.iso(pki.renewal_due(cert))}",
        ]
    elif pending.polling_token:
        lines += [
            "state: pending (waiting for an operator's approval; `ktizo-agent enroll` resumes polling)",
            f"manager: {pending.manager_url or '-'}",
            f"ca_fingerprint: {pending.ca_fingerprint or '-'}",
            f"polling_interval_seconds: {pending.polling_interval_seconds:g}",
            f"max_poll_attempts: {pending.max_poll_attempts or 'unlimited'}",
            f"pending key: {paths.pending_key}{'' if paths.pending_key.exists() else ' (MISSING)'}",
        ]
    else:
        lines += ["state: not enrolled", f"next: {agent.ENROLL_FIRST}"]
    if paths.stash.exists():
        lines.append(f"note: an install was interrupted ({paths.stash}); `enroll`, `renew` or `serve` finishes it")
    print("\n".join(lines))
    return ExitCode.OK


def _do_facts(args: argparse.Namespace) -> int:
    print(json.dumps(facts.collect(identity.collect(_sources(args)), _roots(args)), indent=2))
    return ExitCode.OK


def _dispatch(args: argparse.Namespace, stopper: Stopper) -> int:
    if args.enroll and args.command:
        raise UsageError("--enroll MANAGER_URL already means `enroll MANAGER_URL` and then `serve`: drop the command")
    if args.enroll:
        _do_enroll(args, stopper, args.enroll)
        return _do_serve(args, stopper)
    if args.command == "enroll":
        return _do_enroll(args, stopper, args.manager_url)
    if args.command == "serve":
        return _do_serve(args, stopper)
    if args.command == "renew":
        return _do_renew(args)
    if args.command == "checkin":
        return _do_checkin(args)
    if args.command == "status":
        return _do_status(args)
    if args.command == "facts":
        return _do_facts(args)
    raise UsageError("give a command (enroll, serve, renew, checkin, status, facts) or --enroll MANAGER_URL")


def run(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or argparse's own usage error
        return exc.code if isinstance(exc.code, int) else ExitCode.USAGE
    stopper = Stopper()
    undo: Callable[[], None] | None = None
    try:
        undo = _setup_logging(bool(args.verbose), args.log_file)
        with stopper.handling_signals():
            return _dispatch(args, stopper)
    except Interrupted as exc:
        print(f"{PROG}: stopped by {exc.name}; run the same command again to carry on", file=sys.stderr)
        return 128 + exc.signum
    except AgentError as exc:
        print(f"{PROG}: error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"{PROG}: next: {exc.hint}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # a file or directory the agent may not touch, most often
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        print(f"{PROG}: next: run as root, or point --config, --cert-dir and --whitelist elsewhere", file=sys.stderr)
        return ExitCode.ERROR
    finally:
        if undo is not None:
            undo()


def main(argv: Sequence[str] | None = None) -> NoReturn:
    sys.exit(run(argv))
