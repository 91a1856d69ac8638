"""`web_search(query)` and `visit_page(url)`: host tools over HTTP, off unless configured.

They run in the host process (the sandbox has no network) behind RPC stubs. `web_search` calls a
search API given by URL and key; it understands SearXNG-style (`results`), Brave-style
(`web.results`) and Serper-style (`organic`) JSON. `visit_page` fetches a page and returns its
visible text, refusing private and loopback addresses unless told otherwise (the policy must not
reach the host's internal services).
"""

from __future__ import annotations

import ipaddress
import json
import socket
import urllib.parse

import httpx

from toolr1_jax.tools import files, registry


class WebToolError(Exception):
    """A web tool could not do what was asked; the message is shown to the policy."""


def _check_public(url: str) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebToolError(f"only http(s) URLs with a host can be visited, got {url!r}")
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 80, proto=socket.IPPROTO_TCP)
    except socket.gaierror as e:
        raise WebToolError(f"cannot resolve {parts.hostname!r}: {e}") from None
    for info in infos:
        addr = ipaddress.ip_address(info[4][0])
        if not addr.is_global:
            raise WebToolError(f"{parts.hostname!r} resolves to a non-public address ({addr})")


def _parse_results(payload) -> list[dict]:
    if isinstance(payload, dict):
        for items in (
            payload.get("results"),
            (payload.get("web") or {}).get("results") if isinstance(payload.get("web"), dict)
            else None,
            payload.get("organic"),
        ):  # fmt: skip
            if isinstance(items, list):
                break
        else:
            items = None
    else:
        items = payload if isinstance(payload, list) else None
    if items is None:
        raise WebToolError("the search API answered JSON without a list of results")
    out = []
    for item in items:
        if not isinstance(item, dict):
            continue
        out.append({
            "title": str(item.get("title", "")).strip(),
            "url": str(item.get("url") or item.get("link") or "").strip(),
            "snippet": str(
                item.get("content") or item.get("snippet") or item.get("description") or ""
            ).strip(),
        })  # fmt: skip
    return out


def make_web_tools(
    search_url: str,
    api_key: str | None,
    *,
    api_key_header: str = "Authorization",
    max_results: int = 5,
    max_chars: int = 20_000,
    max_bytes: int = 5 * 2**20,
    timeout_s: float = 15.0,
    allow_private_addresses: bool = False,
) -> tuple[registry.Tool, registry.Tool]:
    """(web_search, visit_page) as host tools.

    Args:
      search_url: the search API endpoint; queried as GET `search_url?q=...&count=...&format=json`.
      api_key: sent as `Authorization: Bearer <key>`, or as the raw value of `api_key_header`.
      allow_private_addresses: let `visit_page` reach loopback/private hosts (tests, intranets).
    """
    if not search_url.startswith(("http://", "https://")):
        raise ValueError(f"search_url must be an http(s) URL, got {search_url!r}")
    headers = {"User-Agent": "toolr1-jax-agent/0.1"}
    if api_key:
        if api_key_header.lower() == "authorization":
            headers["Authorization"] = f"Bearer {api_key}"
        else:
            headers[api_key_header] = api_key

    def web_search(query: str) -> str:
        """Search the web and return the top results, each as '[rank] title', its URL and a
        snippet. Follow up with visit_page(url) to read a result."""
        if not isinstance(query, str) or not query.strip():
            raise WebToolError("web_search: query must be a non-empty string")
        params = {"q": query, "count": max_results, "format": "json"}
        try:
            resp = httpx.get(search_url, params=params, headers=headers, timeout=timeout_s)
        except httpx.HTTPError as e:
            raise WebToolError(f"web_search: request failed: {e}") from None
        if resp.status_code != 200:
            raise WebToolError(f"web_search: the search API answered HTTP {resp.status_code}")
        try:
            results = _parse_results(resp.json())[:max_results]
        except json.JSONDecodeError:
            raise WebToolError("web_search: the search API did not answer JSON") from None
        if not results:
            return f"No web results for {query!r}."
        blocks = [
            f"[{i}] {r['title']}\n{r['url']}\n{r['snippet']}".rstrip()
            for i, r in enumerate(results, 1)
        ]
        return "\n\n".join(blocks)

    def check_request(request: httpx.Request) -> None:
        # Runs for the first request and for every redirect, so a public page cannot bounce the
        # fetch onto a private address.
        if not allow_private_addresses:
            _check_public(str(request.url))

    def visit_page(url: str) -> str:
        """Fetch a web page (http or https) and return its visible text, cut to a bounded
        length."""
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise WebToolError(f"visit_page: only http(s) URLs can be visited, got {url!r}")
        try:
            with (
                httpx.Client(
                    headers={"User-Agent": headers["User-Agent"]},
                    timeout=timeout_s,
                    follow_redirects=True,
                    max_redirects=5,
                    event_hooks={"request": [check_request]},
                ) as client,
                client.stream("GET", url) as resp,
            ):
                if resp.status_code != 200:
                    raise WebToolError(f"visit_page: {url} answered HTTP {resp.status_code}")
                body = bytearray()
                for chunk in resp.iter_bytes():
                    body += chunk
                    if len(body) > max_bytes:
                        break
                ctype = resp.headers.get("content-type", "").lower()
                encoding = resp.encoding or "utf-8"
        except httpx.HTTPError as e:
            raise WebToolError(f"visit_page: request to {url} failed: {e}") from None
        text = bytes(body[:max_bytes]).decode(encoding, errors="replace")
        if "html" in ctype or (not ctype and "<html" in text[:1000].lower()):
            text = files.html_to_text(text)
        elif not (ctype.startswith("text/") or "json" in ctype or "xml" in ctype):
            raise WebToolError(f"visit_page: cannot show content of type {ctype!r}")
        if len(text) > max_chars:
            text = text[:max_chars] + f"\n... [{len(text) - max_chars} more characters not shown]"
        return text

    return (
        registry.make_tool(web_search, host=True),
        registry.make_tool(visit_page, host=True),
    )
