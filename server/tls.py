"""HTTPS on the listener (vLLM's ``--ssl-*`` flags), checked before any model loads.

uvicorn builds the listener's SSL context from the same settings once the models are loaded. Building one here
first turns a missing file, a key that does not match its certificate, an encrypted key (whose pass phrase
OpenSSL would ask for on a terminal the daemon does not have) or a client check without the CAs to check against
into a start-up error that names the flag.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import ssl

from server.config import HTTPConfig

CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
REFRESH_POLL_S = 1.0  # --enable-ssl-refresh: how often the files are looked at

log = logging.getLogger("gptserve")


def cert_reqs(text: str) -> int:
    """``--ssl-cert-reqs``: vLLM's integers (the ssl module's 0, 1, 2) or their names."""
    for name, value in CERT_REQS.items():
        if text.strip().lower() in (name, str(int(value))):
            return int(value)
    raise argparse.ArgumentTypeError(f"must be one of 0, 1, 2 or {', '.join(CERT_REQS)}; got {text!r}")


class TLSSettingsError(ValueError):
    """The --ssl-* flags cannot serve HTTPS; the message names the flag."""


def check_tls(http: HTTPConfig) -> bool:
    """Whether the listener serves HTTPS; raises TLSSettingsError when the settings cannot serve it."""
    files = {"--ssl-certfile": http.ssl_certfile, "--ssl-keyfile": http.ssl_keyfile,
             "--ssl-ca-certs": http.ssl_ca_certs}
    if http.ssl_certfile is None:
        given = [flag for flag, path in files.items() if path is not None]
        if http.ssl_cert_reqs != ssl.CERT_NONE:
            given.append("--ssl-cert-reqs")
        given += [flag for flag, setting in (("--ssl-ciphers", http.ssl_ciphers is not None),
                                              ("--enable-ssl-refresh", http.enable_ssl_refresh)) if setting]
        if given:
            raise TLSSettingsError(f"{given[0]} needs --ssl-certfile (the server's certificate)")
        return False
    if (http.ssl_ca_certs is None) != (http.ssl_cert_reqs == ssl.CERT_NONE):
        raise TLSSettingsError("--ssl-ca-certs and --ssl-cert-reqs 1 (optional) or 2 (required) go together: the "
                               "CAs are what client certificates are checked against, only when clients are asked")
    for flag, path in files.items():
        if path is not None:
            try:
                open(path, "rb").close()
            except OSError as e:
                raise TLSSettingsError(f"{flag}: {e.strerror}: {path}") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _load(context, http.ssl_certfile, http.ssl_keyfile, http.ssl_ca_certs)
    if http.ssl_ciphers is not None:
        try:
            context.set_ciphers(http.ssl_ciphers)
        except ssl.SSLError:
            raise TLSSettingsError(f"--ssl-ciphers: OpenSSL knows no cipher in {http.ssl_ciphers!r}") from None
    return True


def _load(context: ssl.SSLContext, certfile: str, keyfile: str | None, ca_certs: str | None) -> None:
    key_flag = "--ssl-certfile" if keyfile is None else "--ssl-keyfile"

    def refuse_encrypted_key() -> str:  # OpenSSL would ask for its pass phrase on a terminal the daemon lacks
        raise TLSSettingsError(f"{key_flag}: the private key is encrypted; give it unencrypted, readable only by the "
                               "server's user")

    try:
        context.load_cert_chain(certfile, keyfile, password=refuse_encrypted_key)
    except ssl.SSLError as e:
        reason = f"not a PEM certificate and key that belong together ({e.reason or e})"
        if keyfile is None:
            reason += "; without --ssl-keyfile the key must be in this file"
        raise TLSSettingsError(f"--ssl-certfile{'' if keyfile is None else '/--ssl-keyfile'}: {reason}") from None
    if ca_certs is not None:
        try:
            context.load_verify_locations(ca_certs)
        except ssl.SSLError as e:
            raise TLSSettingsError(f"--ssl-ca-certs: no PEM CA certificate in {ca_certs} ({e.reason or e})") from None


class CertificateRefresher:
    """--enable-ssl-refresh: loads the files into the listener's own SSL context when they change, so the next
    handshake presents the new certificate (connections already open keep theirs). Files are compared by inode,
    size and modification time, as a renewal writes or swaps them; a set that does not load yet (the key written,
    the certificate not) keeps the old one and is tried again at the next look."""

    def __init__(self, context: ssl.SSLContext, http: HTTPConfig) -> None:
        assert http.ssl_certfile is not None
        self.context, self.http = context, http
        self.paths = [path for path in (http.ssl_certfile, http.ssl_keyfile, http.ssl_ca_certs) if path is not None]
        self.seen = self._stamps()

    def _stamps(self) -> list[tuple[int, int, int] | None]:
        stamps: list[tuple[int, int, int] | None] = []
        for path in self.paths:
            try:
                stat = os.stat(path)
                stamps.append((stat.st_ino, stat.st_size, stat.st_mtime_ns))
            except OSError:  # mid-swap: looked at again next time
                stamps.append(None)
        return stamps

    def refresh(self) -> bool:
        """Reload if the files changed since the last load; whether it did."""
        stamps = self._stamps()
        if stamps == self.seen:
            return False
        try:
            assert self.http.ssl_certfile is not None
            _load(self.context, self.http.ssl_certfile, self.http.ssl_keyfile, self.http.ssl_ca_certs)
        except (TLSSettingsError, OSError) as e:
            log.warning("TLS files changed but do not load (yet): %s", e)
            return False
        self.seen = stamps
        log.info("reloaded the TLS certificate", extra={"files": self.paths})
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_POLL_S)
            self.refresh()
