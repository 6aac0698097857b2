"""The enrollment flow: pin Ktizo's CA, send this host's identity and CSR, wait for a person to approve, install.

Two ways in. Agent enrollment (``POST /api/v1/enroll``) sends the machine-id and waits for an operator. Site
enrollment (``--site CODE`` with the site's ``cek_`` key, ``POST /api/enroll``) sends a machine_uid instead
(a hash of the machine-id and the pinned CA fingerprint) and, when the site approves on its own, gets the
certificate and the agent's ``cak_`` API key in the same answer; otherwise it waits exactly as the first way.

Every step can be interrupted and run again: the key is on disk before Ktizo hears of it, the polling token is
saved the moment Ktizo gives it, and a received bundle is stashed before anything else can fail. The site key
is never written anywhere and never shown (see ``redact``)."""

from __future__ import annotations

import datetime as dt
import logging
import random
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ktizo_agent import config, files, identity, install, manager, pki
from ktizo_agent.config import Paths
from ktizo_agent.errors import AgentError, GaveUp, Gone, KeyRefused, Rejected
from ktizo_agent.redact import Secret, redact, redact_value
from ktizo_agent.stop import Stopper

log = logging.getLogger(__name__)

FINGERPRINT_HINT = "get it on the Ktizo host with `ktizo pki fingerprint`, or from the Ktizo UI"
MAX_TOKEN_LENGTH = 512
MIN_INTERVAL, MAX_INTERVAL = 0.01, 86400.0
SITE_ENROLL_PATH = "/api/enroll"
SITE_KEY_HINT = (
    "check the site code, and ask a Ktizo admin for the site's current key: `ktizo sites key {site}` shows its "
    "fingerprint (this key's is {fingerprint}), `ktizo sites rotate-key {site}` makes a new one"
)
_rng = random.SystemRandom()  # jitter only; SystemRandom keeps linters from suspecting a secret


@dataclass(frozen=True)
class Options:
    manager_url: str
    pin: str | None = None  # normalised sha256:<hex>; None only with insecure
    insecure: bool = False
    manager_ca: Path | None = None
    key_type: str = pki.DEFAULT_KEY_TYPE
    max_attempts: int | None = None  # None: the config's max_poll_attempts
    site: str | None = None  # with enrollment_key: a site enrollment
    enrollment_key: Secret | None = None


@dataclass(frozen=True)
class Pacing:
    """How long to wait between tries when Ktizo cannot be reached (tests shorten it)."""

    retry_base: float = 1.0
    retry_cap: float = 60.0
    tries: int = 5  # for the CA download and the enrollment request; polls count against max attempts instead
    jitter: float = 0.1

    def backoff(self, failures: int) -> float:
        return float(min(self.retry_cap, self.retry_base * 2 ** max(0, failures - 1)))


def enroll(
    paths: Paths, sources: identity.Sources, options: Options, stopper: Stopper, pacing: Pacing | None = None
) -> install.Installed | None:
    """Enroll this host; None when it already is (nothing to do)."""
    return _Enrollment(paths, sources, options, stopper, pacing or Pacing()).run()


def enrolled_in(paths: Paths, manager_url: str, site: str) -> bool:
    """Whether this host holds a valid certificate from ``manager_url`` in ``site``: then a site enrollment has
    nothing to do and needs no key (an installer may well have deleted the key file after the first run)."""
    known = config.section(config.load(paths.config), "manager", paths.config)
    if known.get("site") != site or not config.same_url(known.get("url"), manager.check_manager_url(manager_url)):
        return False
    try:
        cert = pki.load_certificate_file(paths.server_cert)
    except AgentError:
        return False
    return paths.server_key.exists() and dt.datetime.now(dt.UTC) < cert.not_valid_after_utc


def _interval(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        return None
    return float(min(max(value, MIN_INTERVAL), MAX_INTERVAL))


def _yaml_number(value: float) -> int | float:
    return int(value) if value == int(value) else value


class _Enrollment:
    def __init__(
        self, paths: Paths, sources: identity.Sources, options: Options, stopper: Stopper, pacing: Pacing
    ) -> None:
        self.paths = paths
        self.sources = sources
        self.options = options
        self.url = manager.check_manager_url(options.manager_url)
        self.stopper = stopper
        self.pacing = pacing
        self.site = options.site if options.enrollment_key is not None else None

    def run(self) -> install.Installed | None:
        finished = install.resume(self.paths)
        if finished is not None:
            return finished
        if self._already_enrolled():
            return None
        self.me = identity.collect(self.sources)
        if urllib.parse.urlsplit(self.url).scheme == "http":
            log.warning(
                "MANAGER_URL is plain http: the CA pin still guards the certificate, but the enrollment request "
                "and the polling token cross the network unencrypted"
            )
        with manager.public_door(self.url, insecure=self.options.insecure, manager_ca=self.options.manager_ca) as door:
            pin = self._pin(door)
            if self.site is not None and self.options.enrollment_key is not None:
                key, key_pem, body = self._site_enrollment(door, pin, self.site, self.options.enrollment_key)
            else:
                token, key, key_pem, interval = self._token(door, pin)
                body = self._poll(door, token, interval)
        # From here on the bundle exists nowhere else: check it, then install (which stashes it first).
        try:
            bundle = pki.check_bundle(body, key=key, pin=pin, now=dt.datetime.now(dt.UTC))
            api_key = install.parse_api_key(body["agent_api_key"]) if body.get("agent_api_key") is not None else None
        except (pki.BadBundle, ValueError) as exc:
            raise pki.BadBundle(
                f"refused Ktizo's bundle, nothing was installed: {getattr(exc, 'message', exc)}",
                hint=getattr(exc, "hint", None)
                or f"Ktizo hands a bundle out once: ask the operator to purge this enrollment "
                f"(`ktizo agents purge {self._ref(body)}`), then run enroll again",
            ) from None
        agent_id = body.get("agent_id")
        credentials = install.Credentials(
            agent_api_key=api_key,
            site=self.site,
            agent_id=agent_id if isinstance(agent_id, int) and not isinstance(agent_id, bool) else None,
            enrollment=True,
        )
        done = install.install(
            self.paths, bundle, manager_url=self.url, ca_fingerprint=pin, key_pem=key_pem, credentials=credentials
        )
        log.info(
            "enrolled with %s%s; mTLS from now on, at %s%s",
            self.url,
            f" in site {self.site}" if self.site else "",
            done.mtls_url or "(Ktizo gave no mtls_url)",
            f"; the agent API key is in {self.paths.agent_api_key}" if api_key else "",
        )
        return done

    def _ref(self, body: Any = None) -> str:
        """How an operator names this host in `ktizo agents …`: its id when Ktizo gave one, else the machine-id
        (agent enrollment) or the hostname (a site enrollment, which never sends the machine-id)."""
        agent_id = body.get("agent_id") if isinstance(body, dict) else None
        if isinstance(agent_id, int) and not isinstance(agent_id, bool):
            return str(agent_id)
        return self.me.machine_id if self.site is None else self.me.hostname

    # -- before contacting Ktizo -------------------------------------------------------------------------

    def _already_enrolled(self) -> bool:
        data = config.load(self.paths.config)
        known = config.section(data, "manager", self.paths.config)
        if not known.get("url") or not self.paths.server_cert.exists() or not self.paths.server_key.exists():
            return False
        try:
            cert = pki.load_certificate_file(self.paths.server_cert)
        except AgentError:
            return False
        if dt.datetime.now(dt.UTC) >= cert.not_valid_after_utc:
            log.warning("the certificate in %s has expired: enrolling again", self.paths.server_cert)
            return False
        if not config.same_url(str(known["url"]), self.url):
            raise AgentError(
                f"this host is already enrolled with {known['url']}",
                hint=f"to move it to {self.url}, remove the `manager:` section from {self.paths.config} first",
            )
        if self.site is not None and known.get("site") != self.site:
            log.info(
                "enrolled with %s %s: enrolling again in site %s",
                self.url,
                f"in site {known['site']}" if known.get("site") else "without a site",
                self.site,
            )
            return False
        log.info(
            "already enrolled with %s (certificate valid until %s): nothing to do",
            self.url,
            pki.iso(cert.not_valid_after_utc),
        )
        return True

    def _pending_key(self) -> tuple[pki.PrivateKey, bytes]:
        """The key this enrollment is for: the one an earlier run left, or a new one written before any request."""
        path = self.paths.pending_key
        if path.exists():
            key = pki.load_private_key(path)
            if pki.key_kind(key) == self.options.key_type:
                log.info("using the key an earlier run made (%s)", path)
                return key, path.read_bytes()
            log.info("%s is a %s key, not %s: making a new one", path, pki.key_kind(key), self.options.key_type)
        key = pki.generate_key(self.options.key_type)
        pem = pki.private_pem(key)
        files.ensure_dir(self.paths.cert_dir)
        with files.locked(self.paths.cert_lock):
            files.clean_stale_temps(self.paths.cert_dir, self.paths.cert_names)
            files.write_atomic(path, pem, install.KEY_MODE)
        return key, pem

    # -- talking to Ktizo ----------------------------------------------------------------------------------

    def _call(self, door: manager.Door, method: str, path: str, body: Any = None) -> manager.Reply:
        """One request, tried again on network failures and 5xx with backoff, then an error saying what to do."""
        for attempt in range(1, self.pacing.tries + 1):
            try:
                reply = door.request(method, path, body)
            except manager.Unreachable as exc:
                if not exc.transient:
                    raise
                if attempt == self.pacing.tries:
                    raise AgentError(
                        f"could not reach Ktizo: {exc.message}",
                        hint="check MANAGER_URL and the network (and --manager-ca for a private TLS CA), then run "
                        "the command again",
                    ) from None
                problem = exc.message
            else:
                if reply.status < 500 or attempt == self.pacing.tries:
                    return reply
                problem = f"HTTP {reply.status}: {reply.detail}"
            delay = self.pacing.backoff(attempt)
            log.warning("%s %s failed (%s); trying again in %.1fs", method, path, problem, delay)
            self.stopper.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def _pin(self, door: manager.Door) -> str:
        """The fingerprint to trust from now on: the pin, checked against the CA Ktizo serves; or, with
        --insecure and no pin, whatever it serves (the same one as last time, if there was a last time)."""
        reply = self._call(door, "GET", "/api/v1/pki/ca.pem")
        if 300 <= reply.status < 400 and reply.headers.get("location"):
            raise AgentError(
                f"MANAGER_URL redirects (HTTP {reply.status}) to {reply.headers['location']}",
                hint="give the final URL as MANAGER_URL: the agent follows no redirects, so that its identity and "
                "polling token go nowhere you did not name",
            )
        if reply.status != 200:
            raise AgentError(
                f"Ktizo answered HTTP {reply.status} for its CA certificate (/api/v1/pki/ca.pem): {reply.detail}",
                hint="check MANAGER_URL: it is the Ktizo server's base URL",
            )
        try:
            seen = pki.fingerprint(pki.load_one_certificate(reply.text, "/api/v1/pki/ca.pem"))
        except ValueError as exc:
            raise AgentError(f"Ktizo's CA download is unusable: {exc}", hint="check MANAGER_URL") from None
        if self.options.pin is not None:
            if not pki.same_fingerprint(seen, self.options.pin):
                raise AgentError(
                    f"the CA Ktizo served is not the one you pinned (served {seen}, pinned {self.options.pin})",
                    hint="check MANAGER_URL and the fingerprint (`ktizo pki fingerprint` on the Ktizo host); "
                    "if both are right, something between this host and Ktizo is answering in its place",
                )
            log.info("Ktizo's CA matches the pinned fingerprint %s", seen)
            return self.options.pin
        saved = config.Enrollment.read(config.load(self.paths.config), self.paths.config)
        started = saved.ca_fingerprint if config.same_url(saved.manager_url, self.url) else None
        if started and not pki.same_fingerprint(started, seen):
            raise AgentError(
                f"the CA Ktizo served ({seen}) differs from the one this enrollment started with ({started})",
                hint=f"pin the right one with --ca-fingerprint ({FINGERPRINT_HINT})",
            )
        log.warning(
            "--insecure: TRUSTING WHATEVER CA ANSWERED, %s. Compare it with `ktizo pki fingerprint` on the Ktizo "
            "host; anyone between here and there could have sent it.",
            seen,
        )
        return seen

    def _token(self, door: manager.Door, pin: str) -> tuple[str, pki.PrivateKey, bytes, float]:
        saved = config.Enrollment.read(config.load(self.paths.config), self.paths.config)
        if saved.polling_token and config.same_url(saved.manager_url, self.url):
            key, pem = self._saved_key()
            log.info("resuming: polling with the token saved in %s", self.paths.config)
            if saved.site:  # a site enrollment waits: the host will be in that site
                self.site = saved.site
            return saved.polling_token, key, pem, saved.polling_interval_seconds
        key, pem = self._pending_key()
        payload = {**self.me.as_request(), "csr_pem": pki.build_csr(key, self.me.hostname, self.me.fqdn)}
        log.info(
            "asking Ktizo at %s to enroll machine-id %s (%s); public key %s",
            self.url,
            self.me.machine_id,
            self.me.fqdn,
            pki.key_fingerprint(key),
        )
        while True:
            reply = self._call(door, "POST", "/api/v1/enroll", payload)
            if reply.status in (200, 201, 202):
                return self._accepted(reply, pin, saved, key, pem)
            if reply.status == 429:
                delay = reply.retry_after if reply.retry_after is not None else 5.0
                log.warning("Ktizo is busy (429); sending the enrollment again in %.1fs", delay)
                self.stopper.sleep(delay)
                continue
            if reply.status == 409:
                if saved.polling_token:
                    log.info("Ktizo already has a live enrollment for this machine-id: polling with the saved token")
                    self._save(saved.polling_token, saved.polling_interval_seconds, pin)
                    return saved.polling_token, key, pem, saved.polling_interval_seconds
                raise AgentError(
                    f"Ktizo says this machine-id already has a live enrollment: {reply.detail}",
                    hint=f"ask the operator to approve or purge it (`ktizo agents show {self.me.machine_id}`), or "
                    "run with the --config that holds its polling token",
                )
            if reply.status in (400, 422):
                raise AgentError(f"Ktizo refused the enrollment request: {reply.detail}")
            raise AgentError(f"Ktizo answered HTTP {reply.status} to the enrollment request: {reply.detail}")

    # -- a site enrollment ----------------------------------------------------------------------------

    def _proof(self) -> Secret | None:
        """The ``cak_`` key to prove this host is the agent Ktizo already knows (a re-enrollment or a site move):
        only for the Ktizo it came from, never handed to another one."""
        known = config.section(config.load(self.paths.config), "manager", self.paths.config)
        if not config.same_url(known.get("url"), self.url):
            return None
        return install.held_api_key(self.paths)

    def _site_enrollment(
        self, door: manager.Door, pin: str, site: str, secret: Secret
    ) -> tuple[pki.PrivateKey, bytes, Any]:
        """One request, and the bundle in its answer (site policy auto-approve); or a polling token to wait with."""
        saved = config.Enrollment.read(config.load(self.paths.config), self.paths.config)
        if saved.polling_token and config.same_url(saved.manager_url, self.url):
            if saved.site == site:
                key, pem = self._saved_key()
                log.info("resuming: polling with the token saved in %s", self.paths.config)
                return key, pem, self._poll(door, saved.polling_token, saved.polling_interval_seconds)
            log.info(
                "an enrollment %s is waiting for approval: leaving it, to enroll in site %s instead",
                f"in site {saved.site}" if saved.site else "without a site",
                site,
            )
        key, pem = self._pending_key()
        uid = identity.machine_uid(self.me.machine_id, pki.normalize_fingerprint(pin))
        payload: dict[str, Any] = {
            "site_code": site,
            "enrollment_key": secret.reveal(),
            "machine_uid": uid,
            **self.me.claims(),
            "csr_pem": pki.build_csr(key, self.me.hostname, self.me.fqdn),
        }
        proof = self._proof()
        if proof is not None:
            payload["agent_api_key"] = proof.reveal()
        log.info(
            "asking Ktizo at %s to enroll this host (%s) in site %s (site key fingerprint %s); machine_uid %s, "
            "public key %s%s",
            self.url,
            self.me.fqdn,
            site,
            secret.fingerprint,
            uid,
            pki.key_fingerprint(key),
            "; proving it is the agent Ktizo knows with its API key" if proof is not None else "",
        )
        log.debug("POST %s %s", SITE_ENROLL_PATH, redact_value({**payload, "csr_pem": "…"}))
        limit = self._max_attempts()
        attempts = 0
        while True:
            attempts += 1
            reply = self._call(door, "POST", SITE_ENROLL_PATH, payload)
            detail = redact(reply.detail)
            if reply.status in (200, 201, 202):
                body = reply.json()
                if not isinstance(body, dict):
                    raise AgentError(f"Ktizo answered the site enrollment with HTTP {reply.status} but no JSON object")
                state = body.get("enrollment_state")
                if state == "pending" or (state is None and reply.status == 202):
                    log.info(
                        "Ktizo holds this enrollment for an admin (the site approves by hand, or another machine "
                        "claims this machine_uid)"
                    )
                    token, _, _, interval = self._accepted(reply, pin, saved, key, pem)
                    return key, pem, self._poll(door, token, interval, used=attempts - 1)
                if state not in ("active", None):
                    raise AgentError(f"Ktizo answered the site enrollment with an unknown state {redact(str(state))!r}")
                outcome = body.get("outcome")
                log.info(
                    "Ktizo approved the enrollment at once (%s)%s",
                    {"new": "a new agent", "reuse": "the agent it knew", "site_move": "moved to this site"}.get(
                        str(outcome), redact(str(outcome))
                    ),
                    f", agent id {body['agent_id']}" if isinstance(body.get("agent_id"), int) else "",
                )
                return key, pem, body
            if reply.status == 401:
                raise KeyRefused(
                    f"Ktizo refused the site code {site!r} with this enrollment key: {detail}",
                    hint=SITE_KEY_HINT.format(site=site, fingerprint=secret.fingerprint),
                )
            if reply.status == 429:
                delay = reply.retry_after if reply.retry_after is not None else 5.0
                if limit and attempts >= limit:
                    raise GaveUp(
                        f"Ktizo still turned the enrollment away (429: {detail}) after {attempts} attempts",
                        hint="too many failed attempts lock a site out for a while: wait, check the key, then run "
                        "the command again",
                    )
                log.warning("Ktizo turned the enrollment away for now (429: %s); trying again in %.1fs", detail, delay)
                self.stopper.sleep(delay)
                continue
            if reply.status == 409:
                raise AgentError(
                    f"Ktizo cannot enroll this host in site {site}: {detail}",
                    hint="ask a Ktizo admin: the site may be full (its maximum of agents or of pending ones)",
                )
            if reply.status in (400, 422):
                raise AgentError(f"Ktizo refused the enrollment request: {detail}")
            raise AgentError(f"Ktizo answered HTTP {reply.status} to the enrollment request: {detail}")

    def _accepted(
        self, reply: manager.Reply, pin: str, saved: config.Enrollment, key: pki.PrivateKey, pem: bytes
    ) -> tuple[str, pki.PrivateKey, bytes, float]:
        body = reply.json()
        token = body.get("polling_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_LENGTH or not token.isprintable():
            raise AgentError("Ktizo accepted the enrollment but sent no usable polling_token")
        offered = _interval(body.get("poll_interval_seconds"))
        interval = offered or saved.polling_interval_seconds
        self._save(token, interval, pin)
        log.info("enrollment sent; the polling token is saved in %s", self.paths.config)
        return token, key, pem, interval

    def _save(self, token: str, interval: float, pin: str) -> None:
        def change(data: dict[str, Any]) -> None:
            enrollment = config.section(data, "enrollment", self.paths.config)
            enrollment["manager_url"] = self.url
            enrollment["polling_token"] = token
            enrollment["polling_interval_seconds"] = _yaml_number(interval)
            enrollment.setdefault("max_poll_attempts", 0)
            enrollment["ca_fingerprint"] = pin
            if self.site is not None:
                enrollment["site"] = self.site
            else:
                enrollment.pop("site", None)
            data["enrollment"] = enrollment

        config.update(self.paths.config, change)

    def _saved_key(self) -> tuple[pki.PrivateKey, bytes]:
        if not self.paths.pending_key.exists():
            self._forget()
            raise AgentError(
                f"the saved polling token belongs to a key that is gone ({self.paths.pending_key})",
                hint=f"the token is cleared; ask the operator to purge the pending enrollment "
                f"(`ktizo agents purge {self._ref()}`), then run enroll again",
            )
        return pki.load_private_key(self.paths.pending_key), self.paths.pending_key.read_bytes()

    def _forget(self) -> None:
        """Drop the polling token and the pending key: the enrollment they belonged to is over."""

        def change(data: dict[str, Any]) -> None:
            enrollment = config.section(data, "enrollment", self.paths.config)
            enrollment.pop("polling_token", None)
            enrollment.pop("ca_fingerprint", None)
            enrollment.pop("site", None)
            data["enrollment"] = enrollment

        config.update(self.paths.config, change)
        files.remove(self.paths.pending_key)

    def _max_attempts(self) -> int:
        if self.options.max_attempts is not None:
            return self.options.max_attempts
        return config.Enrollment.read(config.load(self.paths.config), self.paths.config).max_poll_attempts

    def _poll(self, door: manager.Door, token: str, interval: float, used: int = 0) -> Any:
        """Poll until approved (the bundle), rejected (403), forgotten (404) or out of attempts (``used`` of them
        went already: site enrollments Ktizo turned away with 429)."""
        limit = self._max_attempts()
        path = "/api/v1/enroll/status/" + urllib.parse.quote(token, safe="")
        mid = self._ref()
        log.info(
            "waiting for an operator to approve %s (%s) in Ktizo; polling every %gs%s",
            f"machine-id {mid}" if self.site is None else f"this host in site {self.site}",
            self.me.fqdn,
            interval,
            f", at most {limit} times" if limit else "",
        )
        attempts, failures = used, 0
        while True:
            attempts += 1
            try:
                reply: manager.Reply | None = door.request("GET", path)
            except manager.Unreachable as exc:
                if not exc.transient:
                    raise
                reply = None
                failures += 1
                log.warning("poll %d: could not reach Ktizo (%s)", attempts, exc.message)
                delay = min(interval, self.pacing.backoff(failures))
            if reply is not None:
                if reply.status != 429 and reply.status < 500:
                    failures = 0
                delay = interval
                if reply.status == 200:
                    return reply.json()
                if reply.status == 202:
                    interval = self._new_interval(reply, interval, token)
                    delay = interval
                    log.debug("poll %d: still pending", attempts)
                elif reply.status == 403:
                    raise Rejected(
                        f"Ktizo rejected this host's enrollment: {reply.detail}",
                        hint=f"ask the operator why; `ktizo agents show {mid}`",
                    )
                elif reply.status in (404, 410):
                    self._forget()
                    raise Gone(
                        f"Ktizo does not know this enrollment: it was purged or expired ({reply.detail})",
                        hint="the saved token is cleared: run enroll again",
                    )
                elif reply.status == 429:
                    delay = reply.retry_after if reply.retry_after is not None else interval
                    log.warning("poll %d: Ktizo is busy (429); waiting %.1fs", attempts, delay)
                elif reply.status >= 500:
                    failures += 1
                    delay = min(interval, self.pacing.backoff(failures))
                    log.warning("poll %d: Ktizo answered HTTP %d (%s)", attempts, reply.status, reply.detail)
                else:
                    raise AgentError(f"Ktizo answered HTTP {reply.status} to a status poll: {reply.detail}")
            if limit and attempts >= limit:
                raise GaveUp(
                    f"{f'machine-id {mid}' if self.site is None else self.me.fqdn} was still not approved after "
                    f"{attempts} attempts",
                    hint=f"the polling token is saved in {self.paths.config}: run the same command to keep waiting "
                    "(--max-attempts 0 waits for as long as it takes)",
                )
            self.stopper.sleep(delay + _rng.uniform(0, self.pacing.jitter * delay))

    def _new_interval(self, reply: manager.Reply, interval: float, token: str) -> float:
        body = reply.json()
        offered = _interval(body.get("poll_interval_seconds")) if isinstance(body, dict) else None
        if offered is None or offered == interval:
            return interval

        def change(data: dict[str, Any]) -> None:
            enrollment = config.section(data, "enrollment", self.paths.config)
            if enrollment.get("polling_token") == token:
                enrollment["polling_interval_seconds"] = _yaml_number(offered)

        config.update(self.paths.config, change)
        return offered
