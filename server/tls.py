"""HTTPS on the listener (vLLM's ``--ssl-*`` flags), checked before any model loads.

uvicorn builds the listener's SSL context from the same settings once the models are loaded. Building one here
first turns a missing file, a key that does not match its certificate, an encrypted key (whose pass phrase
OpenSSL would ask for on a terminal the daemon does not have) or a client check without the CAs to check against
into a start-up error that names the flag.
"""

from __future__ import annotations

import argparse
import ssl

from server.config import HTTPConfig

CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


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
    _load(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), http.ssl_certfile, http.ssl_keyfile, http.ssl_ca_certs)
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
