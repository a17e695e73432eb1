"""Bypass attempts against a deny rule for /admin (the authorization layer
of service meshes has been walked around again and again by paths the proxy
and the app read differently).

Policy: deny /admin and /admin/* for everyone, allow everything else from
frontend. Each attempt goes as raw bytes on its own connection, straight to
the inbound over mutual TLS with frontend's SVID (nothing on the way
normalises it), and again through frontend's outbound. Each must be refused
(400, or the status named) or denied (403 no-admin), and the app must never
receive a request that a forgiving application could read as /admin
(http_helpers.lenient_path: every escape decoded, '\\' as '/', ';'
parameters cut, dot segments resolved).

Case: paths are case-sensitive (RFC 3986 6.2.2.1 leaves the path alone),
so /ADMIN/x is not /admin/x. The expectation we document and assert: it is
allowed and reaches the app as /ADMIN/x, unchanged. An application that
treats paths case-insensitively needs its own rule for that.
"""

import pytest

from helpers import spiffe
from http_helpers import HttpClient, frontend_ctx, http_mesh, is_admin

RULES = [
    {"name": "no-admin", "action": "deny", "from": ["*"], "paths": ["/admin", "/admin/*"]},
    {"name": "frontend-all", "action": "allow", "from": [spiffe("frontend")]},
]

DENY = 403          # denied by no-admin
BAD = 400

# (id, raw request bytes, expected status); "h" gives a minimal request for a target.


def h(target, method=b"GET", host=b"orders", version=b"HTTP/1.1", extra=b""):
    if isinstance(target, str):
        target = target.encode("latin-1")
    return method + b" " + target + b" " + version + b"\r\nhost: " + host + b"\r\n" + extra + b"\r\n"


CASES = [
    # baseline
    ("plain", h("/admin/x"), DENY),
    ("exact", h("/admin"), DENY),
    ("trailing-slash", h("/admin/"), DENY),
    ("query-does-not-hide", h("/admin/x?/../../public"), DENY),
    ("http10", h("/admin/x", version=b"HTTP/1.0"), DENY),
    # encoded slashes and backslashes
    ("pct2F", h("/admin%2Fx"), BAD),
    ("pct2f", h("/admin%2fx"), BAD),
    ("pct2f-lead", h("/%2fadmin/x"), BAD),
    ("pct2f-dotdot", h("/x/..%2fadmin/y"), BAD),
    ("pct5C", h("/admin%5Cx"), BAD),
    ("pct5c-dotdot", h("/x/..%5cadmin/y"), BAD),
    ("double-encoded-slash", h("/admin%252Fx"), BAD),
    ("double-encoded-dot", h("/x/%252e%252e/admin/y"), BAD),
    ("double-encoded-u", h("/x/%25u002e%25u002e/%61%64%6d%69%6e/y"), BAD),
    ("encoded-percent", h("/x/100%25"), BAD),
    ("pct-u", h("/x/%u002e%u002e/admin/y"), BAD),
    # encoded unreserved characters: decoded, then matched
    ("pct-letter", h("/%61dmin/x"), DENY),
    ("pct-letter-upper", h("/%41DMIN/x"), 200),   # %41 = 'A': /ADMIN/x, see case below
    ("pct-all-letters", h("/%61%64%6d%69%6e/x"), DENY),
    # encoded dots
    ("pct2e2e-lower", h("/x/%2e%2e/admin/y"), DENY),
    ("pct2E2E-upper", h("/x/%2E%2E/admin/y"), DENY),
    ("pct2e-mixed", h("/x/.%2e/admin/y"), DENY),
    ("pct2E-single", h("/%2E/admin/y"), DENY),
    ("pct2e-above-root", h("/%2e%2e/admin/y"), BAD),
    ("overlong-utf8-dot", h("/%c0%ae%c0%ae/admin/y"), BAD),
    ("overlong-utf8-slash", h("/admin%c0%afx"), BAD),
    ("iis-unicode-escape", h("/%u002e%u002e/admin/y"), BAD),
    # doubled slashes
    ("double-slash", h("//admin/x"), DENY),
    ("many-slashes", h("///admin///x"), DENY),
    ("slash-after", h("/admin//x"), DENY),
    # dot segments
    ("dotdot", h("/x/../admin/y"), DENY),
    ("dot", h("/./admin/y"), DENY),
    ("dot-inside", h("/admin/./y"), DENY),
    ("dotdot-deep", h("/a/b/../../admin/y"), DENY),
    ("dotdot-trailing", h("/admin/x/.."), DENY),
    ("dotdot-above-root", h("/../admin/y"), BAD),
    # case: a different path (module docstring)
    ("case", h("/ADMIN/x"), 200),
    ("case-mixed", h("/Admin/x"), 200),
    # absolute form
    ("absolute", h("http://orders/admin/x"), DENY),
    ("absolute-port", h("http://orders:80/admin/x", host=b"orders:80"), DENY),
    ("absolute-dotdot", h("http://orders/x/../admin/y"), DENY),
    ("absolute-double-slash", h("http://orders//admin/x"), DENY),
    ("absolute-other-host", h("http://elsewhere/admin/x"), BAD),
    ("absolute-userinfo", h("http://u@orders/admin/x"), BAD),
    ("absolute-pct2f", h("http://orders/admin%2fx"), BAD),
    ("absolute-no-path", h("http://orders?/admin/x"), 200),   # path "/", query "/admin/x"
    # backslash
    ("backslash", h("/admin\\x"), BAD),
    ("backslash-lead", h("\\admin/x"), BAD),
    ("backslash-dotdot", h("/x/..\\admin/y"), BAD),
    # NUL
    ("nul-raw", h(b"/admin\x00/x"), BAD),
    ("nul-raw-prefix", h(b"/x\x00/../admin/y"), BAD),
    ("pct00", h("/admin%00/x"), BAD),
    ("pct00-dotdot", h("/x%00/../admin/y"), BAD),
    # ';' path parameters (Tomcat/Jetty: /admin;x/y is /admin/y, /..;/ is /../)
    ("semicolon", h("/admin;x/y"), BAD),
    ("semicolon-end", h("/admin;jsessionid=1"), BAD),
    ("dotdot-semicolon", h("/..;/admin/y"), BAD),
    ("x-dotdot-semicolon", h("/x/..;/admin/y"), BAD),
    # fragments
    ("fragment", h("/admin/x#frag"), BAD),
    ("fragment-dotdot", h("/x#/../admin/y"), BAD),
    ("fragment-encoded-in-path", h("/x%23/../admin/y"), DENY),   # %23 stays a segment char
    # other characters and forms
    ("space-in-target", h("/admin /x"), BAD),
    ("tab-in-target", h("/admin\t/x"), BAD),
    ("pct20", h("/admin%20/x"), 200),                # "/admin%20/x" is another segment
    ("control-char", h(b"/admin\x01/x"), BAD),
    ("pct-control", h("/admin%01/x"), BAD),
    ("high-byte", h(b"/admin\xff/x"), BAD),
    ("bad-escape", h("/admin%zz/x"), BAD),
    ("truncated-escape", h("/admin%2"), BAD),
    ("lowercase-method", h("/admin/x", method=b"get"), 501),
    ("no-leading-slash", h("admin/x"), BAD),
    ("asterisk-get", h("*"), BAD),
    ("empty-lines-first", b"\r\n\r\n" + h("/admin/x"), (DENY, BAD)),
    ("absolute-host-case", h("http://ORDERS/admin/x"), DENY),
    ("absolute-https", h("https://orders/admin/x"), (DENY, BAD)),
    ("absolute-scheme-case", h("HTTP://orders/admin/x"), (DENY, BAD)),
    ("absolute-other-scheme", h("ftp://orders/admin/x"), BAD),
    ("http09", b"GET /admin/x\r\n\r\n", (BAD, 505)),
    ("http2-version", h("/admin/x", version=b"HTTP/2.0"), 505),
    ("two-hosts", h("/admin/x", extra=b"host: other\r\n"), BAD),
]


def attempt(port, ctx, data):
    with HttpClient(port, ctx, timeout=10) as c:
        c.send(data)
        return c.read_response()


@pytest.mark.parametrize("via", ["inbound-direct", "outbound"])
def test_admin_bypass_attempts(mesh, pki, via):
    hm = http_mesh(mesh, RULES, outbound=via == "outbound")
    port, ctx = (hm.out_port, None) if via == "outbound" else (hm.in_port, frontend_ctx(pki))
    wrong = []
    for cid, data, want in CASES:
        n_before = len(hm.app.requests)
        resp = attempt(port, ctx, data)
        got = resp.status if resp else None
        if got not in (want if isinstance(want, tuple) else (want,)):
            line = data.split(b"\r\n")[0]
            wrong.append(f"{cid:26} {line!r}: answered {got}, expected {want}")
        elif got == DENY and resp.json() != {"error": "forbidden", "rule": "no-admin"}:
            wrong.append(f"{cid:26}: 403 body {resp.body!r}")
        elif got == 200:
            seen = hm.app.requests[n_before:]
            if len(seen) != 1:
                wrong.append(f"{cid:26}: allowed but the app saw {[r.line for r in seen]}")
    admin = [r.line for r in hm.app.requests if is_admin(r.path)]
    assert not admin, f"requests for /admin reached the app: {admin}"
    # The case rule as documented: /ADMIN/x arrives unchanged.
    assert "/ADMIN/x" in hm.app.paths() and "/Admin/x" in hm.app.paths()
    assert not wrong, "\n" + "\n".join(wrong)
