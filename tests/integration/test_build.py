"""The build itself: a user without libcmocka-dev still builds the programs.

meson's default (-Dtests=auto) builds the cmocka unit tests only when cmocka
is there. The test hides cmocka from pkg-config (a copy of every pkg-config
directory without cmocka.pc) and runs `meson setup` + `ninja` the way the
README says, in a temporary build directory. It also checks the opposite:
-Dtests=enabled must fail loudly when cmocka is missing, not skip silently.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import REPO

pytestmark = pytest.mark.skipif(
    not (shutil.which("meson") and shutil.which("ninja") and shutil.which("pkg-config")),
    reason="meson, ninja or pkg-config missing (tests/run installs them)")


def pkg_config_without_cmocka(tmp_path):
    """A PKG_CONFIG_LIBDIR that has every .pc file of this machine but cmocka's."""
    search = subprocess.run(["pkg-config", "--variable", "pc_path", "pkg-config"],
                            capture_output=True, text=True, check=True).stdout.strip()
    out = tmp_path / "pkgconfig"
    out.mkdir()
    for d in search.split(":"):
        p = Path(d)
        if not p.is_dir():
            continue
        for pc in p.glob("*.pc"):
            if pc.name != "cmocka.pc" and not (out / pc.name).exists():
                (out / pc.name).symlink_to(pc.resolve())
    assert not (out / "cmocka.pc").exists()
    return out


def meson_setup(build, env, *opts):
    return subprocess.run(["meson", "setup", str(build), str(REPO), "--buildtype=plain", *opts],
                          capture_output=True, text=True, env=env, timeout=300)


def test_builds_without_cmocka(tmp_path):
    env = dict(os.environ, PKG_CONFIG_LIBDIR=str(pkg_config_without_cmocka(tmp_path)))
    # cmake could find cmocka another way; the build looks only through pkg-config.
    build = tmp_path / "build"
    r = meson_setup(build, env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "cmocka not found: unit tests are not built" in r.stdout
    r = subprocess.run(["ninja", "-C", str(build), "-j2"], capture_output=True, text=True,
                       env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    for exe in ("proxy/meshlet-proxy", "control/meshlet-control", "control/meshletctl"):
        assert (build / exe).is_file(), exe
    assert not list(build.glob("tests/*_test")), "unit tests were built without cmocka"
    version = subprocess.run([str(build / "proxy/meshlet-proxy"), "--version"],
                             capture_output=True, text=True, timeout=10)
    assert version.returncode == 0 and "meshlet" in version.stdout + version.stderr


def test_tests_enabled_without_cmocka_fails_loudly(tmp_path):
    env = dict(os.environ, PKG_CONFIG_LIBDIR=str(pkg_config_without_cmocka(tmp_path)))
    r = meson_setup(tmp_path / "build", env, "-Dtests=enabled")
    assert r.returncode != 0
    assert "cmocka" in r.stdout + r.stderr
