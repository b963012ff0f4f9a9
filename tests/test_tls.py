"""HTTPS on the listener: vLLM's --ssl-certfile/--ssl-keyfile/--ssl-ca-certs/--ssl-cert-reqs, with certificates from
a test CA made by trustme (the python-trio project's library for exactly this), and the container's probe."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import time

import httpx
import openai
import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from bench.server_process import PROJECT_ROOT
from server.healthcheck import probe
from tests.server_process import ServerProcess
from tests.test_prometheus_scrape import Prometheus, wait_for_scrapes_after

HEADER_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def pems(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The server's certificate and key as separate files and as one, the CA's certificate, and a CA's that did
    not sign anything here."""
    folder = tmp_path_factory.mktemp("pems")
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = {name: str(folder / f"{name}.pem") for name in ("cert", "key", "both", "ca", "other_ca", "other_key")}
    server_cert.cert_chain_pems[0].write_to_path(paths["cert"])
    server_cert.private_key_pem.write_to_path(paths["key"])
    server_cert.private_key_and_cert_chain_pem.write_to_path(paths["both"])
    ca.cert_pem.write_to_path(paths["ca"])
    other_ca = trustme.CA()
    other_ca.cert_pem.write_to_path(paths["other_ca"])
    other_ca.issue_cert("127.0.0.1").private_key_pem.write_to_path(paths["other_key"])
    return paths


def client_context(ca: trustme.CA, client_cert: trustme.LeafCert | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    if client_cert is not None:
        client_cert.configure_cert(context)
    return context


@pytest.fixture(scope="module")
def server(tiny_gpt2_dir, ca, pems):
    args = ["--model", f"tiny={tiny_gpt2_dir}", "--ssl-certfile", pems["cert"], "--ssl-keyfile", pems["key"],
            "--header-timeout", str(HEADER_TIMEOUT)]
    with ServerProcess(args, tls=client_context(ca)) as running:
        yield running


def test_the_openai_sdk_completes_and_streams_over_https(server, ca):
    with httpx.Client(verify=client_context(ca)) as http_client:
        client = openai.OpenAI(base_url=server.v1, api_key="none", http_client=http_client)
        completion = client.completions.create(model="tiny", prompt="Hello", max_tokens=5, temperature=0)
        chunks = list(client.completions.create(model="tiny", prompt="Hello", max_tokens=5, temperature=0,
                                                stream=True))
    assert completion.usage.completion_tokens == 5
    assert "".join(chunk.choices[0].text for chunk in chunks) == completion.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_a_client_that_does_not_trust_the_certificate_cannot_connect(server):
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(server.base_url + "/health", timeout=10)


def test_plain_http_to_the_https_port_gets_no_answer_and_the_server_keeps_serving(server):
    with pytest.raises(httpx.TransportError):
        httpx.get(server.base_url.replace("https://", "http://") + "/health", timeout=10)
    assert server.health()["status"] == "ok"


def test_a_client_silent_after_the_handshake_is_closed_at_the_header_timeout(server, ca):
    """The header deadline (server/http_protocols.py) runs on the decrypted stream, so it holds over TLS too."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        with client_context(ca).wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            started = time.monotonic()
            received = sock.recv(1)  # nothing is sent: the server ends the connection
            seconds = time.monotonic() - started
    assert received == b"" and seconds < HEADER_TIMEOUT + 3


def test_prometheus_scrapes_the_metrics_over_https_trusting_the_ca(server, pems, tmp_path):
    """A real Prometheus, configured as an operator would (scheme https, tls_config.ca_file)."""
    with Prometheus(f"127.0.0.1:{server.port}", tmp_path, tls_ca=pems["ca"]) as prometheus:
        wait_for_scrapes_after(prometheus, time.time())
        assert prometheus.value('up{job="gptserve"}') == 1
        assert prometheus.series('gptserve:num_requests_running{model_name="tiny"}')


def test_the_containers_probe_asks_over_https_when_the_certificate_is_set(server, pems):
    environ = {"GPTSERVE_PORT": str(server.port)}
    assert probe({**environ, "GPTSERVE_SSL_CERTFILE": pems["cert"]}) == 0
    assert probe(environ) == 1  # plain HTTP: the server does not answer it


def test_the_containers_probe_fails_where_nothing_listens():
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    assert probe({"GPTSERVE_PORT": str(port)}, timeout=2) == 1


@pytest.mark.parametrize("requirement", ["2", "required"])
def test_required_client_certificates_admit_only_those_the_ca_signed(tiny_gpt2_dir, ca, pems, requirement):
    client_cert = ca.issue_cert("client.example")
    args = ["--model", f"tiny={tiny_gpt2_dir}", "--ssl-certfile", pems["both"], "--ssl-ca-certs", pems["ca"],
            "--ssl-cert-reqs", requirement]
    with ServerProcess(args, tls=client_context(ca, client_cert)) as running:
        assert httpx.get(running.base_url + "/health", verify=client_context(ca, client_cert), timeout=10).is_success
        for stranger in (None, trustme.CA().issue_cert("client.example")):
            with pytest.raises(httpx.TransportError):  # TLS 1.3 refuses a missing or foreign one at the first read
                httpx.get(running.base_url + "/health", verify=client_context(ca, stranger), timeout=10)
        assert running.health()["status"] == "ok"


def test_optional_client_certificates_admit_clients_without_one_but_not_with_a_foreign_one(tiny_gpt2_dir, ca, pems):
    args = ["--model", f"tiny={tiny_gpt2_dir}", "--ssl-certfile", pems["cert"], "--ssl-keyfile", pems["key"],
            "--ssl-ca-certs", pems["ca"], "--ssl-cert-reqs", "optional"]
    with ServerProcess(args, tls=client_context(ca)) as running:
        for client_cert in (None, ca.issue_cert("client.example")):
            response = httpx.get(running.base_url + "/health", verify=client_context(ca, client_cert), timeout=10)
            assert response.is_success
        with pytest.raises(httpx.TransportError):
            httpx.get(running.base_url + "/health", timeout=10,
                      verify=client_context(ca, trustme.CA().issue_cert("client.example")))


def encrypted_key(pems: dict[str, str], folder) -> str:
    key = serialization.load_pem_private_key(open(pems["key"], "rb").read(), password=None)
    path = folder / "encrypted.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.BestAvailableEncryption(b"secret")))
    return str(path)


REFUSALS = {
    "key without certificate": (["--ssl-keyfile", "{key}"], "--ssl-keyfile needs --ssl-certfile"),
    "missing certificate": (["--ssl-certfile", "{missing}"], "--ssl-certfile: No such file or directory: "),
    "certificate without its key": (["--ssl-certfile", "{cert}"], "the key must be in this file"),
    "key of another certificate": (["--ssl-certfile", "{cert}", "--ssl-keyfile", "{other_key}"],
                                   "--ssl-certfile/--ssl-keyfile: not a PEM certificate and key that belong together"),
    "encrypted key": (["--ssl-certfile", "{cert}", "--ssl-keyfile", "{encrypted}"],
                      "--ssl-keyfile: the private key is encrypted"),
    "CAs without asking for client certificates": (["--ssl-certfile", "{both}", "--ssl-ca-certs", "{ca}"],
                                                   "--ssl-ca-certs and --ssl-cert-reqs"),
    "client certificates without CAs": (["--ssl-certfile", "{both}", "--ssl-cert-reqs", "2"],
                                        "--ssl-ca-certs and --ssl-cert-reqs"),
    "CAs that are not certificates": (["--ssl-certfile", "{both}", "--ssl-ca-certs", "{key}", "--ssl-cert-reqs", "1"],
                                      "--ssl-ca-certs: "),
    "unknown client requirement": (["--ssl-certfile", "{both}", "--ssl-cert-reqs", "3"],
                                   "--ssl-cert-reqs: must be one of 0, 1, 2"),
    "unknown ciphers": (["--ssl-certfile", "{both}", "--ssl-ciphers", "NO-SUCH-CIPHER"],
                        "--ssl-ciphers: OpenSSL knows no cipher in 'NO-SUCH-CIPHER'"),
    "ciphers without a certificate": (["--ssl-ciphers", "ECDHE-ECDSA-AES256-GCM-SHA384"],
                                      "--ssl-ciphers needs --ssl-certfile"),
    "refresh without a certificate": (["--enable-ssl-refresh"], "--enable-ssl-refresh needs --ssl-certfile"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_tls_settings_that_cannot_serve_stop_the_start_with_the_flag_named(tiny_gpt2_dir, pems, tmp_path, case):
    """Refused before any engine core starts loading, with exit status 2, as the other start-up errors."""
    args, message = REFUSALS[case]
    files = {**pems, "missing": str(tmp_path / "missing.pem"), "encrypted": encrypted_key(pems, tmp_path)}
    result = subprocess.run([sys.executable, "-m", "server", "--device", "cpu", "--model", f"tiny={tiny_gpt2_dir}",
                             *(arg.format(**files) for arg in args)],
                            check=False, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "started engine core" not in result.stderr, result.stderr


def served_certificate(port: int, context: ssl.SSLContext) -> bytes:
    """The certificate a new connection is shown (DER)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def der(leaf: trustme.LeafCert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())


@pytest.fixture(scope="module")
def refreshing(tiny_gpt2_dir, ca, tmp_path_factory):
    folder = tmp_path_factory.mktemp("rotated")
    first = ca.issue_cert("127.0.0.1")
    first.cert_chain_pems[0].write_to_path(str(folder / "cert.pem"))
    first.private_key_pem.write_to_path(str(folder / "key.pem"))
    args = ["--model", f"tiny={tiny_gpt2_dir}", "--ssl-certfile", str(folder / "cert.pem"), "--ssl-keyfile",
            str(folder / "key.pem"), "--enable-ssl-refresh", "--ssl-ciphers", "ECDHE-ECDSA-AES256-GCM-SHA384"]
    with ServerProcess(args, tls=client_context(ca)) as running:
        yield running, folder, first


def test_a_renewed_certificate_is_served_to_new_connections_without_a_restart(refreshing, ca):
    server, folder, first = refreshing
    context = client_context(ca)
    assert served_certificate(server.port, context) == der(first)
    (folder / "cert.pem").write_text("-----BEGIN CERTIFICATE-----\nhalf-written")  # a renewal caught mid-write
    time.sleep(2.5)
    assert served_certificate(server.port, context) == der(first)  # the old one stays until the new set loads
    assert "TLS files changed but do not load" in server.log_text()
    renewed = ca.issue_cert("127.0.0.1")
    renewed.private_key_pem.write_to_path(str(folder / "key.pem"))
    renewed.cert_chain_pems[0].write_to_path(str(folder / "cert.pem"))
    deadline = time.monotonic() + 15
    while served_certificate(server.port, context) != der(renewed) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert served_certificate(server.port, context) == der(renewed)
    reply = httpx.get(server.base_url + "/health", verify=context, timeout=10)
    assert reply.status_code == 200


def test_tls_12_clients_get_only_the_ciphers_named(refreshing, ca):
    server, _, _ = refreshing
    for cipher, accepted in (("ECDHE-ECDSA-AES256-GCM-SHA384", True), ("ECDHE-ECDSA-AES128-GCM-SHA256", False)):
        context = client_context(ca)
        context.maximum_version = ssl.TLSVersion.TLSv1_2  # TLS 1.3's suites are not --ssl-ciphers'
        context.set_ciphers(cipher)
        if accepted:
            served_certificate(server.port, context)
        else:
            with pytest.raises(ssl.SSLError):
                served_certificate(server.port, context)
