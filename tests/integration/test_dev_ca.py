"""certs/dev-ca issues X.509-SVIDs exactly as docs/design.md describes them."""

import os
import stat
import subprocess

import pytest

from helpers import DEV_CA, run


def dev_ca(*args):
    return subprocess.run([str(DEV_CA), *map(str, args)], capture_output=True, text=True)


def cert_text(pem):
    return run(["openssl", "x509", "-in", str(pem), "-noout", "-text"])


@pytest.fixture
def ca(tmp_path):
    r = dev_ca("init", "--trust-domain", "mesh.local", "--out", tmp_path / "ca", "--days", "10")
    assert r.returncode == 0, r.stderr
    return tmp_path / "ca"


def test_root_ca_profile(ca):
    t = cert_text(ca / "ca.pem")
    assert "CA:TRUE" in t
    assert "Certificate Sign, CRL Sign" in t
    assert "NIST CURVE: P-256" in t
    assert (ca / "bundle.pem").read_text() == (ca / "ca.pem").read_text()
    assert stat.S_IMODE(os.stat(ca / "ca.key").st_mode) == 0o600
    assert (ca / "trust_domain").read_text().strip() == "mesh.local"


def test_issue_svid_profile(ca, tmp_path):
    out = tmp_path / "svids"
    r = dev_ca("issue", "--service", "orders", "--ca", ca, "--out", out, "--hours", "3")
    assert r.returncode == 0, r.stderr
    pem, key = out / "orders.pem", out / "orders.key"
    t = cert_text(pem)
    assert t.count("URI:") == 1 and "URI:spiffe://mesh.local/svc/orders" in t
    assert "CA:FALSE" in t
    ext = run(["openssl", "x509", "-in", str(pem), "-noout", "-ext",
               "basicConstraints,keyUsage,extendedKeyUsage"])
    assert "X509v3 Basic Constraints: critical" in ext
    assert "X509v3 Key Usage: critical" in ext
    assert ext.split("Key Usage: critical", 1)[1].split("\n")[1].strip() == "Digital Signature"
    assert "TLS Web Server Authentication, TLS Web Client Authentication" in ext
    assert "NIST CURVE: P-256" in t
    assert key.read_text().startswith("-----BEGIN PRIVATE KEY-----")     # PKCS#8
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert (out / "bundle.pem").read_text() == (ca / "ca.pem").read_text()
    # The chain verifies for both TLS roles.
    for purpose in ("sslclient", "sslserver"):
        run(["openssl", "verify", "-CAfile", str(ca / "ca.pem"), "-purpose", purpose, str(pem)])
    # The key belongs to the certificate.
    pub_cert = run(["openssl", "x509", "-in", str(pem), "-noout", "-pubkey"])
    pub_key = run(["openssl", "pkey", "-in", str(key), "-pubout"])
    assert pub_cert == pub_key
    # Lifetime: 3 hours (plus the minute of back-dating).
    start = run(["openssl", "x509", "-in", str(pem), "-noout", "-startdate"]).split("=")[1]
    end = run(["openssl", "x509", "-in", str(pem), "-noout", "-enddate"]).split("=")[1]
    import calendar
    import time
    ts = [calendar.timegm(time.strptime(x.strip(), "%b %d %H:%M:%S %Y GMT")) for x in (start, end)]
    assert ts[1] - ts[0] == 3 * 3600 + 60


def test_issue_defaults_to_ca_dir(ca):
    r = dev_ca("issue", "--service", "frontend", "--out", ca)
    assert r.returncode == 0, r.stderr
    assert (ca / "frontend.pem").exists() and (ca / "frontend.key").exists()


@pytest.mark.parametrize("name", ["Orders", "-orders", "orders-", "or_ders", "a" * 64, "orders.x", ""])
def test_bad_service_names_refused(ca, name):
    r = dev_ca("issue", "--service", name, "--out", ca)
    assert r.returncode != 0
    assert ("bad service name" in r.stderr) or ("needs a value" in r.stderr)
    assert [p.name for p in ca.glob("*.key")] == ["ca.key"]


@pytest.mark.parametrize("name", ["a", "a1", "orders-v2", "a" * 63])
def test_good_service_names(ca, name):
    r = dev_ca("issue", "--service", name, "--out", ca)
    assert r.returncode == 0, r.stderr


def test_missing_ca(tmp_path):
    r = dev_ca("issue", "--service", "orders", "--out", tmp_path / "nothing")
    assert r.returncode != 0
    assert "no CA in" in r.stderr


def test_init_keeps_existing_ca(ca):
    before = (ca / "ca.pem").read_text()
    r = dev_ca("init", "--trust-domain", "mesh.local", "--out", ca)
    assert r.returncode != 0 and "already exists" in r.stderr
    assert (ca / "ca.pem").read_text() == before


def test_help_and_usage_errors():
    r = dev_ca("--help")
    assert r.returncode == 0 and "issue --service NAME" in r.stdout
    assert dev_ca("frobnicate").returncode == 2
    assert dev_ca("init").returncode == 2


def test_expired_and_foreign_trust_domain(ca, tmp_path):
    r = dev_ca("issue", "--service", "old", "--ca", ca, "--out", tmp_path,
               "--not-before", "20200101000000Z", "--not-after", "20200102000000Z")
    assert r.returncode == 0, r.stderr
    v = subprocess.run(["openssl", "verify", "-CAfile", str(ca / "ca.pem"), str(tmp_path / "old.pem")],
                       capture_output=True, text=True)
    assert v.returncode != 0 and "expired" in (v.stdout + v.stderr)
    r = dev_ca("issue", "--service", "x", "--ca", ca, "--out", tmp_path, "--trust-domain", "other.local")
    assert r.returncode == 0, r.stderr
    assert "URI:spiffe://other.local/svc/x" in cert_text(tmp_path / "x.pem")


def test_svid_cannot_outlive_ca(ca):
    r = dev_ca("issue", "--service", "orders", "--out", ca, "--days", "11")
    assert r.returncode != 0 and "outlive" in r.stderr
