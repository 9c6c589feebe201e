"""The in-process token behind the PKCS#11 tests: ``support.RealToken`` gives the p11rpc
Backend the daemon itself uses (``p11serve.ServiceBackend(Service(token))``), so the
sans-I/O tests exercise the real policy."""
from __future__ import annotations

from cryptobat.p11rpc.backend import Backend
from support import PIN, RealToken, make_signing_data


def test_real_token_backend_satisfies_protocol(tmp_path):
    rt = RealToken(tmp_path)
    try:
        b = rt.backend()
        assert isinstance(b, Backend)
        k = rt.key("k13")
        good = make_signing_data(k, rt.now + 86400, rt.now - 3600)
        assert b.check_signing_data("k13", good) is None
        assert b.check_signing_data("k13", make_signing_data(k, rt.now + 90 * 86400, rt.now)) is not None
        assert b.timed_sign([("k13", good)])[0].ok
        assert b.check_pin(PIN) and not b.check_pin(b"nope")
        assert not b.keygen_allowed()
        assert rt.key("k14").compat and not k.compat
    finally:
        rt.close()
