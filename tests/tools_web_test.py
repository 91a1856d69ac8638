"""web_search / visit_page against a real HTTP server on loopback, directly and from a sandbox."""

import http.server
import json
import threading
import urllib.parse

import pytest

from toolr1_jax.sandbox import SandboxPool
from toolr1_jax.tools import web

KEY = "test-key-123"


class _Handler(http.server.BaseHTTPRequestHandler):
    seen = []

    def log_message(self, *args):
        pass

    def _send(self, code, ctype, body: bytes):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        type(self).seen.append((url.path, query, self.headers.get("Authorization")))
        if url.path == "/search":
            if self.headers.get("Authorization") != f"Bearer {KEY}":
                return self._send(401, "application/json", b"{}")
            q = query["q"][0]
            results = [
                {"title": f"About {q}", "url": "http://example.org/1", "content": "first hit"},
                {"title": "Second", "url": "http://example.org/2", "content": "second hit"},
            ]
            return self._send(200, "application/json", json.dumps({"results": results}).encode())
        if url.path == "/brave":
            body = {"web": {"results": [{"title": "B", "url": "u", "description": "d"}]}}
            return self._send(200, "application/json", json.dumps(body).encode())
        if url.path == "/page":
            html = b"<html><body><script>x()</script><h1>Zorblat</h1><p>Flux 42</p></body></html>"
            return self._send(200, "text/html; charset=utf-8", html)
        if url.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/page")
            self.end_headers()
            return None
        if url.path == "/binary":
            return self._send(200, "application/octet-stream", b"\x00\x01")
        return self._send(404, "text/plain", b"nope")


@pytest.fixture(scope="module")
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_web_search_sends_key_and_renders_results(server):
    search, _ = web.make_web_tools(f"{server}/search", KEY, max_results=1)
    out = search("zorblat")
    assert out == "[1] About zorblat\nhttp://example.org/1\nfirst hit"
    path, query, auth = _Handler.seen[-1]
    assert (path, query["q"], query["count"], auth) == (
        "/search",
        ["zorblat"],
        ["1"],
        f"Bearer {KEY}",
    )
    bad, _ = web.make_web_tools(f"{server}/search", "wrong-key")
    with pytest.raises(web.WebToolError, match="HTTP 401"):
        bad("zorblat")
    brave, _ = web.make_web_tools(f"{server}/brave", KEY, api_key_header="X-Subscription-Token")
    assert brave("q") == "[1] B\nu\nd"


def test_visit_page_text_redirects_and_refusals(server):
    _, visit = web.make_web_tools(f"{server}/search", KEY, allow_private_addresses=True)
    assert visit(f"{server}/page") == "Zorblat\nFlux 42"
    assert visit(f"{server}/redirect") == "Zorblat\nFlux 42"
    with pytest.raises(web.WebToolError, match="HTTP 404"):
        visit(f"{server}/missing")
    with pytest.raises(web.WebToolError, match="content of type"):
        visit(f"{server}/binary")
    with pytest.raises(web.WebToolError, match="http"):
        visit("file:///etc/passwd")
    _, guarded = web.make_web_tools(f"{server}/search", KEY)
    with pytest.raises(web.WebToolError, match="non-public address"):
        guarded(f"{server}/page")
    with pytest.raises(ValueError, match="search_url"):
        web.make_web_tools("ftp://x", KEY)


async def test_web_tools_from_inside_the_sandbox(server):
    tools = web.make_web_tools(f"{server}/search", KEY, allow_private_addresses=True)
    async with SandboxPool(num_workers=1, timeout_s=10.0, memory_mb=512, tools=tools) as pool:
        s = await pool.open()
        r = await s.run(
            f"hits = web_search('flux')\npage = visit_page('{server}/page')\nprint(hits)\npage"
        )
        assert r.status == "ok", r
        assert "About flux" in r.stdout and r.value == repr("Zorblat\nFlux 42")
        # The worker itself cannot reach the server; only the host-side tool can.
        r = await s.run(f"import urllib.request\nurllib.request.urlopen('{server}/page')")
        assert r.status == "error", r
