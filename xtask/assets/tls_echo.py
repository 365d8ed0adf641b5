"""An HTTPS server standing for a service outside the mesh, for the TLS origination tests.

It makes its own CA and a certificate for the names given (`cryptography`), writes the CA to
`--ca-out` for the DestinationRule's `caCertificates`, and answers every request with JSON
saying what it saw: the SNI the client sent, the TLS version, the client certificate's common
name (asked for, not required), the method and the path. With `--client-out`, it also issues a
client certificate (common name `tls-echo-client`) and writes it, its key and the CA there as
JSON, for a Secret.
"""

import argparse
import datetime
import http.server
import json
import os
import ssl
import tempfile

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def pem(cert):
    return cert.public_bytes(serialization.Encoding.PEM)


def issue(names):
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tls-echo test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(common_name, sans):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )
        if sans:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in sans]), critical=False
            )
        cert = builder.sign(ca_key, hashes.SHA256())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return pem(cert), key_pem

    return pem(ca), leaf(names[0], names), leaf("tls-echo-client", [])


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def answer(self):
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        client = None
        peer = self.connection.getpeercert()
        if peer:
            client = dict(pair for rdn in peer["subject"] for pair in rdn).get("commonName")
        body = json.dumps(
            {
                "sni": getattr(self.connection, "weft_sni", None),
                "client": client,
                "tls": self.connection.version(),
                "method": self.command,
                "path": self.path,
                "host": self.headers.get("host"),
            }
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = answer
    do_POST = answer

    def log_message(self, *args):
        pass


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8443)
    parser.add_argument("--name", action="append", required=True)
    parser.add_argument("--ca-out", required=True)
    parser.add_argument("--client-out")
    args = parser.parse_args()

    ca, (leaf, key), (client, client_key) = issue(args.name)
    if args.client_out:
        with open(args.client_out, "w") as f:
            json.dump({"cert": client.decode(), "key": client_key.decode(), "ca": ca.decode()}, f)
    with tempfile.TemporaryDirectory() as tmp:
        cert_path = os.path.join(tmp, "cert.pem")
        key_path = os.path.join(tmp, "key.pem")
        with open(cert_path, "wb") as f:
            f.write(leaf)
        with open(key_path, "wb") as f:
            f.write(key)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_path, key_path)
    # Client certificates are asked for and checked when sent, not required.
    context.verify_mode = ssl.CERT_OPTIONAL
    context.load_verify_locations(cadata=ca.decode())

    def remember_sni(sock, name, _context):
        sock.weft_sni = name

    context.sni_callback = remember_sni
    server = http.server.ThreadingHTTPServer(("0.0.0.0", args.port), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    # Written last: its presence says the server is listening.
    os.makedirs(os.path.dirname(args.ca_out), exist_ok=True)
    partial = args.ca_out + ".partial"
    with open(partial, "wb") as f:
        f.write(ca)
    os.rename(partial, args.ca_out)
    server.serve_forever()


if __name__ == "__main__":
    main()
