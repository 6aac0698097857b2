"""The ``ktizo-agent`` command line: argparse over the flows, and exit codes that say what happened.

0 done · 1 failed (network, pin mismatch, bad bundle…) · 2 usage · 3 rejected or revoked (403) · 4 purged or
unknown (404) · 5 gave up after --max-attempts polls · 6 the site enrollment key was refused (401) · 128+N stopped
by signal N (serve: 0 on SIGTERM)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import re
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from ktizo_agent import __version__, agent, config, enroll, facts, identity, install, pki, serve
from ktizo_agent import redact as secrets
from ktizo_agent.errors import AgentError, ExitCode, Interrupted, UsageError
from ktizo_agent.stop import Stopper

PROG = "ktizo-agent"
log = logging.getLogger("ktizo_agent")
KEY_ENV = "KTIZO_ENROLLMENT_KEY"
_SITE_CODE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_SITE_KEY = re.compile(r"cek_[A-Za-z0-9_\-]{8,500}")

DESCRIPTION = """\
The host side of Ktizo: ask Ktizo to enroll this machine, wait for an operator to approve it (or, with a site's
enrollment key, be approved at once), install the certificate Ktizo signs for a key made here, then serve this
host's facts to Ktizo over mutual TLS."""

EPILOG = """\
examples:
  ktizo-agent enroll https://ktizo.example.com --ca-fingerprint sha256:3f1c…   # once, as root
  ktizo-agent serve                                                            # the long-running service
  ktizo-agent --enroll https://ktizo.example.com --ca-fingerprint sha256:3f1c… # both (a systemd unit's ExecStart)
  ktizo-agent status

zero-touch, in a site (no operator when the site approves on its own; the key is never logged or stored):
  KTIZO_ENROLLMENT_KEY=cek_… ktizo-agent enroll https://ktizo.example.com --site lab1 --ca-fingerprint sha256:3f1c…
  ktizo-agent --enroll https://ktizo.example.com --site lab1 --enrollment-key-file /root/lab1.key \\
      --ca-fingerprint sha256:3f1c…                                    # enroll in the site, then serve

Get the CA fingerprint on the Ktizo host with `ktizo pki fingerprint`, or from the Ktizo UI; a site's key with
`ktizo sites rotate-key CODE`.
exit codes: 0 done, 1 failed, 2 usage, 3 rejected/revoked, 4 purged/unknown, 5 gave up polling,
6 site key refused, 128+N stopped by signal N (serve exits 0 on SIGTERM)."""


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
        help="polls (and site enrollments turned away with 429) before giving up (default: max_poll_attempts; "
        "0 = no limit)",
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
    parser.add_argument(
        "--site",
        metavar="CODE",
        default=default(None),
        help="enroll in this Ktizo site with its enrollment key (zero-touch: approved at once if the site says so)",
    )
    parser.add_argument(
        "--enrollment-key",
        metavar="cek_…",
        default=default(None),
        help=f"the site's enrollment key; other local users can read a command line, so prefer "
        f"--enrollment-key-file or {KEY_ENV}",
    )
    parser.add_argument(
        "--enrollment-key-file",
        metavar="FILE",
        default=default(None),
        help=f"read the site's enrollment key from the first line of FILE (before {KEY_ENV}, after --enrollment-key)",
    )


class _Parser(argparse.ArgumentParser):
    """argparse repeats what it did not understand ("unrecognized arguments: --enrolment-key cek_…"): mask it."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {secrets.redact(message)}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
        "it. Interrupted, it resumes with the saved polling token and the same key. With --site and the site's "
        f"enrollment key (--enrollment-key-file FILE, {KEY_ENV}, or --enrollment-key) it enrolls in that site: "
        "one request when the site approves on its own, else it polls the same way; a refused key exits 6.",
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
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text += "\n" + record.exc_text
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
    for handler in handlers:
        handler.addFilter(secrets.Filter())  # on the handlers, so records from every ktizo_agent.* logger pass it
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


def _site_code(text: str) -> str:
    code = text.strip().lower()
    if not _SITE_CODE.fullmatch(code):
        raise UsageError(
            f"--site: {secrets.redact(text)!r} is not a site code",
            hint="a site code is 1-64 letters, digits, '-' or '_' (`ktizo sites list` on the Ktizo host)",
        )
    return code


class _KeyFileMissing(UsageError):
    """The key file cannot be read: fatal only if there is enrolling to do (an installer may delete it after)."""


def _enrollment_key(args: argparse.Namespace) -> tuple[secrets.Secret, str] | None:
    """The site key and where it came from: --enrollment-key, else --enrollment-key-file, else the environment."""
    if args.enrollment_key is not None:
        value, where = args.enrollment_key, "--enrollment-key"
    elif args.enrollment_key_file is not None:
        where = f"--enrollment-key-file {args.enrollment_key_file}"
        try:
            with open(args.enrollment_key_file, encoding="utf-8", errors="replace") as stream:
                value = stream.readline()
        except OSError as exc:
            raise _KeyFileMissing(f"{where}: {exc.strerror}") from None
    elif os.environ.get(KEY_ENV, "").strip():
        value, where = os.environ[KEY_ENV], KEY_ENV
        os.environ.pop(KEY_ENV)  # no child process (ip, …) needs to inherit it
    else:
        return None
    value = value.strip()
    secrets.register(value)  # from here on no message, log line or traceback shows it
    if not value:
        raise UsageError(f"{where}: the enrollment key is empty")
    if not _SITE_KEY.fullmatch(value):
        raise UsageError(
            f"{where}: that is not a site enrollment key (cek_ and then letters, digits, '-' or '_')",
            hint="`ktizo sites rotate-key CODE` on the Ktizo host makes one; its fingerprint is not the key",
        )
    return secrets.Secret(value), where


def _enroll_options_from(
    args: argparse.Namespace, manager_url: str, site_key: tuple[secrets.Secret, str] | None
) -> enroll.Options:
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
        site=_site_code(args.site) if args.site is not None else None,
        enrollment_key=site_key[0] if site_key else None,
    )


def _site_key(args: argparse.Namespace, manager_url: str) -> tuple[secrets.Secret, str] | None:
    """The site key for ``--site``, or None without --site; refuses one without the other."""
    if args.site is None:
        given = [
            name
            for name, value in (
                ("--enrollment-key", args.enrollment_key),
                ("--enrollment-key-file", args.enrollment_key_file),
                (KEY_ENV, os.environ.get(KEY_ENV, "").strip() or None),
            )
            if value is not None
        ]
        if given:
            raise UsageError(
                f"an enrollment key ({', '.join(given)}) is for a site: add --site CODE",
                hint=f"or, to enroll without a site and wait for an operator, drop it (unset {KEY_ENV})",
            )
        return None
    site = _site_code(args.site)
    try:
        found = _enrollment_key(args)
    except _KeyFileMissing:
        if enroll.enrolled_in(_paths(args), manager_url, site):
            log.info("already enrolled in site %s; the key file is gone, and is not needed", site)
            return None
        raise
    if found is None:
        raise UsageError(
            f"--site {site} needs the site's enrollment key",
            hint=f"--enrollment-key-file FILE, the environment variable {KEY_ENV}, or --enrollment-key cek_… "
            f"(a Ktizo admin gets it with `ktizo sites rotate-key {site}`)",
        )
    if found[1] == "--enrollment-key":
        log.warning(
            "the enrollment key is on the command line, where other users of this host can read it (ps): "
            "--enrollment-key-file or %s keep it out of sight",
            KEY_ENV,
        )
    return found


def _do_enroll(args: argparse.Namespace, stopper: Stopper, manager_url: str) -> int:
    site_key = _site_key(args, manager_url)
    options = _enroll_options_from(args, manager_url, site_key)
    if options.insecure:
        log.warning(
            "--insecure: MANAGER_URL's TLS certificate is not verified%s",
            "" if options.pin else ", and the CA is trusted on first sight without a pin",
        )
    if options.site is not None and options.enrollment_key is None:
        return ExitCode.OK  # enrolled in that site already, and the key file is gone: nothing to do
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
        api_key = install.held_api_key(paths)
        lines += [
            "state: enrolled" + (" (certificate EXPIRED: enroll again)" if now >= cert.not_valid_after_utc else ""),
            f"manager: {known.get('url')}",
            f"site: {known.get('site') or '-'}",
            f"agent_id: {known.get('agent_id') or '-'}",
            f"agent_api_key: {f'held ({paths.agent_api_key})' if api_key is not None else 'none'}",
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
            f"site: {pending.site or '-'}",
            f"ca_fingerprint: {pending.ca_fingerprint or '-'}",
            f"polling_interval_seconds: {pending.polling_interval_seconds:g}",
            f"max_poll_attempts: {pending.max_poll_attempts or 'unlimited'}",
            f"pending key: {paths.pending_key}{'' if paths.pending_key.exists() else ' (MISSING)'}",
        ]
    else:
        lines += ["state: not enrolled", f"next: {agent.ENROLL_FIRST}"]
    if paths.stash.exists():
        lines.append(f"note: an install was interrupted ({paths.stash}); `enroll`, `renew` or `serve` finishes it")
    print(secrets.redact("\n".join(lines)))
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
        print(f"{PROG}: error: {secrets.redact(exc.message)}", file=sys.stderr)
        if exc.hint:
            print(f"{PROG}: next: {secrets.redact(exc.hint)}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # a file or directory the agent may not touch, most often
        print(f"{PROG}: error: {secrets.redact(str(exc))}", file=sys.stderr)
        print(f"{PROG}: next: run as root, or point --config, --cert-dir and --whitelist elsewhere", file=sys.stderr)
        return ExitCode.ERROR
    except Exception:  # a bug: show the traceback, as Python would, but with the secrets masked
        print(secrets.redact(traceback.format_exc()).rstrip(), file=sys.stderr)
        print(f"{PROG}: error: an unexpected failure (a bug in {PROG}: please report it)", file=sys.stderr)
        return ExitCode.ERROR
    finally:
        if undo is not None:
            undo()


def main(argv: Sequence[str] | None = None) -> NoReturn:
    sys.exit(run(argv))
