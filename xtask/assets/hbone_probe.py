"""An independent HBONE client and mesh-CA caller for Weft's mTLS end-to-end tests.

Speaks HBONE the way Istio's ztunnel does, with nothing of Weft's code: TLS 1.3 from Python's
`ssl` (OpenSSL), ALPN h2, an HTTP/2 CONNECT from the `h2` package, certificates minted with
`cryptography`. Each run prints one JSON object.

usage:
  hbone_probe.py connect PEER TARGET --root ROOT [--ca-key KEY] [--trust BUNDLE] [--identity ID]
                 [--cert ca|expired|self-signed|foreign-ca|none] [--serial HEX] [--send TEXT]
  hbone_probe.py resume PEER TARGET --root ROOT --ca-key KEY --identity ID --thief ID2
  hbone_probe.py plaintext PEER TARGET
  hbone_probe.py csr --ca ADDR --root ROOT --token-file FILE --identity ID

connect: a client certificate for ID (signed by ROOT and KEY unless --cert says otherwise),
  the TLS handshake with PEER (verified against BUNDLE, else ROOT) (host:port, the HBONE port of a node), then CONNECT TARGET
  (pod ip:port); with a 200, TEXT is sent and whatever comes back within a second is reported.
  Prints {"handshake": "ok"|error, "server_identity": URI, "server_issuer": CN,
  "status": int|null, "reply": str, "error": str|null}.
resume: Weft's pause and resume of a stream to TARGET (a line-numbering TCP server), as ID:
  CONNECT offering to resume, one line through, then a pause (`weft-paused` trailers); then
  CONNECTs resuming the stream as ID2, with a malformed token, with a token nobody was given,
  and as ID, which sends one more line. Prints {"token": str, "first": str, "paused": str,
  "thief": int, "malformed": int, "unknown": int, "resumed": int, "echoed_token": str,
  "second": str, "error": str|null}.
plaintext: an HTTP/1.1 CONNECT without TLS; prints what came back.
csr: asks the mesh CA (Istio's IstioCertificateService/CreateCertificate, the request encoded
  by hand) for ID with ImpersonatedIdentity, authenticated with the token in FILE; prints
  {"code": gRPC status name, "details": str, "chain": count}.
"""

import argparse
import datetime
import json
import os
import socket
import ssl
import sys
import tempfile
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TIMEOUT = 5.0


def mint(identity, issuer_cert, issuer_key, not_before, not_after, serial=None):
    """A P-256 key and a certificate for `identity`, signed by the issuer (self if None)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert else x509.Name(
            [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "attacker")]))
        .public_key(key.public_key())
        .serial_number(serial or x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]),
            critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH,
                                   ExtendedKeyUsageOID.SERVER_AUTH]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    cert = builder.sign(issuer_key if issuer_key else key, hashes.SHA256())
    return key, cert


def foreign_ca():
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cluster.local")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def client_files(args, workdir):
    """Writes the client certificate chain and key; returns their paths (None: no cert)."""
    if args.cert == "none":
        return None
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = (now - datetime.timedelta(minutes=1), now + datetime.timedelta(hours=1))
    with open(args.root, "rb") as f:
        root = x509.load_pem_x509_certificate(f.read())
    if args.cert in ("ca", "expired"):
        with open(args.ca_key, "rb") as f:
            root_key = serialization.load_pem_private_key(f.read(), None)
        if args.cert == "expired":
            valid = (now - datetime.timedelta(days=2), now - datetime.timedelta(days=1))
        serial = int(args.serial, 16) if args.serial else None
        key, cert = mint(args.identity, root, root_key, *valid, serial=serial)
    elif args.cert == "self-signed":
        key, cert = mint(args.identity, None, None, *valid)
    elif args.cert == "foreign-ca":
        ca_cert, ca_key = foreign_ca()
        key, cert = mint(args.identity, ca_cert, ca_key, *valid)
    else:
        raise SystemExit(f"unknown --cert {args.cert}")
    cert_path = os.path.join(workdir, "cert.pem")
    key_path = os.path.join(workdir, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


def split(hostport):
    host, port = hostport.rsplit(":", 1)
    return host, int(port)


def connect(args):
    import h2.config
    import h2.connection
    import h2.events

    out = {"handshake": None, "server_identity": None, "status": None, "reply": "",
           "error": None}
    with tempfile.TemporaryDirectory() as workdir:
        files = client_files(args, workdir)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False  # mesh certificates carry SPIFFE IDs, not names
        ctx.load_verify_locations(args.trust or args.root)
        ctx.set_alpn_protocols(["h2"])
        if files:
            ctx.load_cert_chain(*files)
        raw = socket.create_connection(split(args.peer), timeout=TIMEOUT)
        try:
            tls = ctx.wrap_socket(raw)
        except (ssl.SSLError, OSError) as e:
            out["handshake"] = f"failed: {e}"
            return out
        out["handshake"] = "ok"
        peer = tls.getpeercert()
        for kind, value in peer.get("subjectAltName", ()):
            if kind == "URI":
                out["server_identity"] = value
        for rdn in peer.get("issuer", ()):
            for key, value in rdn:
                if key == "commonName":
                    out["server_issuer"] = value
        out["alpn"] = tls.selected_alpn_protocol()
        # h2 asks every request for :path and :scheme; an HBONE CONNECT (RFC 9113 8.5) has
        # neither, so outbound validation is off for this one request.
        conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, validate_outbound_headers=False))
        conn.initiate_connection()
        stream = conn.get_next_available_stream_id()
        conn.send_headers(stream, [(b":method", b"CONNECT"), (b":authority", args.target.encode())])
        try:
            tls.sendall(conn.data_to_send())
            deadline = TIMEOUT
            sent = False
            tls.settimeout(1.0)
            while deadline > 0:
                try:
                    data = tls.recv(65536)
                except socket.timeout:
                    deadline -= 1.0
                    if sent:
                        break
                    continue
                if not data:
                    out["error"] = out["error"] or "connection closed"
                    break
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived):
                        headers = dict(event.headers)
                        out["status"] = int(headers[b":status"])
                        if out["status"] == 200 and args.send:
                            conn.send_data(stream, args.send.encode())
                            sent = True
                    elif isinstance(event, h2.events.DataReceived):
                        conn.acknowledge_received_data(event.flow_controlled_length,
                                                       event.stream_id)
                        out["reply"] += event.data.decode(errors="replace")
                    elif isinstance(event, h2.events.StreamReset):
                        out["error"] = f"stream reset {event.error_code}"
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        out["error"] = f"goaway {event.error_code}"
                tls.sendall(conn.data_to_send())
                if out["status"] is not None and out["status"] != 200 and out["reply"]:
                    break
                if sent and args.send and len(out["reply"]) >= len(args.send):
                    break
        except (ssl.SSLError, OSError) as e:
            out["error"] = f"{type(e).__name__}: {e}"
    return out


class Stream:
    """One CONNECT stream on its own TLS connection, as `identity`, driven by hand."""

    def __init__(self, args, workdir, identity, headers):
        import h2.config
        import h2.connection

        args.identity = identity
        files = client_files(args, workdir)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False
        ctx.load_verify_locations(args.root)
        ctx.set_alpn_protocols(["h2"])
        ctx.load_cert_chain(*files)
        self.tls = ctx.wrap_socket(socket.create_connection(split(args.peer), timeout=TIMEOUT))
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, validate_outbound_headers=False))
        self.conn.initiate_connection()
        self.id = self.conn.get_next_available_stream_id()
        self.conn.send_headers(self.id, [(b":method", b"CONNECT"),
                                         (b":authority", args.target.encode())] + headers)
        self.flush()
        self.status, self.headers, self.data, self.trailers = None, {}, b"", None

    def flush(self):
        self.tls.sendall(self.conn.data_to_send())

    def until(self, done, seconds=TIMEOUT):
        """Reads events until `done()` or the time is up; whether `done()` came true."""
        import h2.events

        deadline = time.monotonic() + seconds
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.tls.settimeout(left)
            try:
                data = self.tls.recv(65536)
            except socket.timeout:
                return False
            if not data:
                return done()
            for event in self.conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    self.headers = {k.decode(): v.decode() for k, v in event.headers}
                    self.status = int(self.headers[":status"])
                elif isinstance(event, h2.events.DataReceived):
                    self.conn.acknowledge_received_data(event.flow_controlled_length,
                                                        event.stream_id)
                    self.data += event.data
                elif isinstance(event, h2.events.TrailersReceived):
                    self.trailers = {k.decode(): v.decode() for k, v in event.headers}
            self.flush()
        return True

    def answered(self):
        # A node proxy waits up to 5 s for a paused stream's socket before it answers 410.
        self.until(lambda: self.status is not None, seconds=3 * TIMEOUT)
        return self.status

    def line(self, text):
        """Sends one line and returns the line that comes back."""
        start = len(self.data)
        self.conn.send_data(self.id, text.encode())
        self.flush()
        self.until(lambda: b"\n" in self.data[start:])
        return self.data[start:].decode(errors="replace")

    def close(self):
        self.tls.close()


def resume(args):
    import secrets

    out = {"token": None, "first": None, "paused": None, "thief": None, "malformed": None,
           "unknown": None, "resumed": None, "echoed_token": None, "second": None,
           "error": None}
    owner = args.identity
    with tempfile.TemporaryDirectory() as workdir:
        try:
            first = Stream(args, workdir, owner, [(b"weft-resumable", b"1")])
            if first.answered() != 200:
                out["error"] = f"CONNECT answered {first.status}"
                return out
            out["token"] = token = first.headers.get("weft-resume-token")
            out["first"] = first.line("one\n")
            # The pause: the end of this side's data, with the count of what it sent.
            sent = len("one\n")
            first.conn.send_headers(first.id, [(b"weft-paused", str(sent).encode())],
                                    end_stream=True)
            first.flush()
            first.until(lambda: first.trailers is not None)
            out["paused"] = (first.trailers or {}).get("weft-paused")
            if not token:
                out["error"] = "no token offered"
                return out
            for key, who, value in [
                ("thief", args.thief, token),
                ("malformed", owner, "../" + token[3:]),
                ("unknown", owner, secrets.token_hex(16)),
            ]:
                other = Stream(args, workdir, who, [(b"weft-resume", value.encode())])
                out[key] = other.answered()
                other.close()
            again = Stream(args, workdir, owner, [(b"weft-resumable", b"1"),
                                                  (b"weft-resume", token.encode())])
            out["resumed"] = again.answered()
            out["echoed_token"] = again.headers.get("weft-resume-token")
            if out["resumed"] == 200:
                out["second"] = again.line("two\n")
            again.close()
            first.close()
        except (ssl.SSLError, OSError) as e:
            out["error"] = f"{type(e).__name__}: {e}"
    return out


def plaintext(args):
    sock = socket.create_connection(split(args.peer), timeout=TIMEOUT)
    sock.sendall(f"CONNECT {args.target} HTTP/1.1\r\nHost: {args.target}\r\n\r\n".encode())
    got = b""
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                break
            got += data
    except OSError as e:
        return {"reply": got.decode(errors="replace"), "error": f"{type(e).__name__}: {e}"}
    return {"reply": got.decode(errors="replace"), "error": None}


def varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def field(number, wire, payload):
    tag = varint((number << 3) | wire)
    if wire == 2:
        return tag + varint(len(payload)) + payload
    return tag + payload


def csr(args):
    import grpc

    key = ec.generate_private_key(ec.SECP256R1())
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(args.identity)]),
            critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = request.public_bytes(serialization.Encoding.PEM)
    # google.protobuf.Struct {fields: {"ImpersonatedIdentity": Value{string_value}}}
    value = field(3, 2, args.identity.encode())
    entry = field(1, 2, b"ImpersonatedIdentity") + field(2, 2, value)
    metadata = field(1, 2, entry)
    message = field(1, 2, pem) + field(3, 0, varint(3600)) + field(4, 2, metadata)
    with open(args.root, "rb") as f:
        creds = grpc.ssl_channel_credentials(root_certificates=f.read())
    with open(args.token_file) as f:
        token = f.read().strip()
    channel = grpc.secure_channel(args.ca, creds,
                                  options=[("grpc.ssl_target_name_override", "weft-ca")])
    call = channel.unary_unary(
        "/istio.v1.auth.IstioCertificateService/CreateCertificate",
        request_serializer=lambda m: m,
        response_deserializer=lambda b: b,
    )
    try:
        reply = call(message, metadata=[("authorization", f"Bearer {token}")],
                     timeout=TIMEOUT)
        # repeated string cert_chain = 1: count the entries.
        count, i = 0, 0
        while i < len(reply):
            tag = reply[i]
            i += 1
            length, shift = 0, 0
            while True:
                b = reply[i]
                i += 1
                length |= (b & 0x7F) << shift
                shift += 7
                if not b & 0x80:
                    break
            i += length
            count += tag == 0x0A
        return {"code": "OK", "details": "", "chain": count}
    except grpc.RpcError as e:
        return {"code": e.code().name, "details": e.details(), "chain": 0}


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("connect")
    c.add_argument("peer")
    c.add_argument("target")
    c.add_argument("--root", required=True)
    c.add_argument("--ca-key")
    c.add_argument("--trust", help="roots to verify the server with (default: --root)")
    c.add_argument("--identity", default="spiffe://cluster.local/ns/mesh/sa/default")
    c.add_argument("--cert", default="ca")
    c.add_argument("--send", default="")
    c.add_argument("--serial", help="serial number of the minted certificate, hex")
    m = sub.add_parser("resume")
    m.add_argument("peer")
    m.add_argument("target")
    m.add_argument("--root", required=True)
    m.add_argument("--ca-key", required=True)
    m.add_argument("--identity", required=True)
    m.add_argument("--thief", required=True)
    m.set_defaults(cert="ca", serial=None)
    p = sub.add_parser("plaintext")
    p.add_argument("peer")
    p.add_argument("target")
    r = sub.add_parser("csr")
    r.add_argument("--ca", required=True)
    r.add_argument("--root", required=True)
    r.add_argument("--token-file", required=True)
    r.add_argument("--identity", required=True)
    args = parser.parse_args()
    modes = {"connect": connect, "resume": resume, "plaintext": plaintext, "csr": csr}
    result = modes[args.mode](args)
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
