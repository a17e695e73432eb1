"""meshlet-control's resource limits and key rules under hostile callers:
CSR key types (issue 9 #12), request bodies read only after the headers
authenticated the caller (#11), and long polls capped per certificate, per
service and in total so that admin calls and new handshakes always find a
connection slot (#2). Everything runs on 127.0.0.1 and is torn down by the
control_factory fixture."""

import json
import socket
import ssl
import threading
import time

from control_helpers import (Identity, assert_refused, control, control_factory,  # noqa: F401
                             enroll, new_svid, request, tls_context)


# ---------------------------------------------------------------- #12 CSR keys

def test_csr_key_types_only_p256(control, tmp_path):
    tok = control.join_token("orders", uses=10)
    for kind, named in (("rsa2048", "RSA"), ("ed25519", "ED25519"), ("p384", "secp384r1")):
        ident = Identity(tmp_path / kind, "orders", key_type=kind)
        e = assert_refused(enroll(control, ident, token=tok), 400)
        assert e[2] == "csr", e
        assert named in e[1] and "P-256" in e[1], f"{kind}: unclear refusal {e}"
    # the refusals consumed no use of the token; P-256 gets its SVID
    good = Identity(tmp_path / "p256", "orders")
    r = enroll(control, good, token=tok)
    assert r.status in (200, 201), r
    assert r.json["serial"]
