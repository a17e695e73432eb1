"""Reading Prometheus text (exposition format 0.0.4) in tests, and the
promtool of Debian's prometheus package when it is installed.

parse() is strict on purpose: a line it cannot read fails the test, so a
malformed /metrics cannot pass unnoticed even without promtool.
"""

import re
import shutil
import subprocess
import urllib.request

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')


def _labels(text):
    out, pos = {}, 0
    while pos < len(text):
        m = _LABEL.match(text, pos)
        assert m, f"bad label set {text!r}"
        out[m.group(1)] = m.group(2)
        pos = m.end()
    return out


def parse(text):
    """{(name, frozenset(labels.items())): value}, and {family: type}."""
    samples, types = {}, {}
    for line in text.splitlines():
        if not line:
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            types[name] = kind
            continue
        if line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        assert m, f"bad sample line {line!r}"
        key = (m.group(1), frozenset(_labels(m.group(3) or "").items()))
        assert key not in samples, f"duplicate series {line!r}"
        samples[key] = float(m.group(4))
    return samples, types


def value(samples, name, **labels):
    """The value of the series name{labels} (exactly those labels), or 0."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples, name, **labels):
    """The sum over the series of name whose labels include labels."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def series(samples, name):
    return [dict(ls) for (n, ls) in samples if n == name]


def names(samples):
    return {n for (n, _) in samples}


def scrape(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        assert r.status == 200, f"{url}: {r.status}"
        ctype = r.headers.get("Content-Type", "")
        assert ctype.startswith("text/plain"), f"{url}: Content-Type {ctype}"
        return r.read().decode()


def promtool():
    return shutil.which("promtool")


def check_metrics(text):
    """promtool check metrics on text: returns its complaints ("" when clean)."""
    p = subprocess.run([promtool(), "check", "metrics"], input=text.encode(),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
    out = p.stdout.decode(errors="replace").strip()
    return out if (p.returncode != 0 or out) else ""
