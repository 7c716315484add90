#!/usr/bin/env python
"""Check the built book in a headless browser.

    python .ci/check_site.py _build/html [PAGE ...] [--screenshots DIR]

Serves HTML_DIR on 127.0.0.1 (python's http.server, in a thread) and loads the front page
(book/intro.html) and each PAGE (a path relative to HTML_DIR, e.g. chapters/01_rtn.html, or
book/glossary.html:0 to require no image on it) in
Debian's headless Chromium (`apt-get install -y chromium`), which runs the page's JavaScript
for a fixed virtual time, then dumps the DOM and takes a screenshot. For every page it checks:

* the page was served (HTTP 200), its DOM has the book's article, and every request the page
  made to the site succeeded (no 404 for a script, stylesheet, font or image);
* MathJax ran from the site itself: each math element of the built HTML became an
  <mjx-container> and none is a TeX error (<mjx-merror>);
* every <img> of the article that points into the site names a non-empty file that the
  browser fetched; each PAGE given on the command line shows at least --min-images of them;
* no output cell is a traceback (except in cells tagged `raises-exception`) or stderr output
  (unless --allow-stderr), and no docutils error or unresolved reference is left in the page;
* the page made no request outside 127.0.0.1 except those matching --allow-external
  (by default only the "Open in Colab" badge image). External hosts are unreachable for the
  browser, so a page that needs a CDN fails the MathJax check as well.

Prints one line per failure and exits 1 if there was any, else one summary line.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from urllib.parse import unquote, urljoin, urlparse

from bs4 import BeautifulSoup

FRONT_PAGE = "book/intro.html"
DEFAULT_ALLOW_EXTERNAL = [r"^https://colab\.research\.google\.com/assets/colab-badge\.svg$"]
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
    # The site is all the browser may reach: anything else fails at once instead of hanging.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]


# ---------------------------------------------------------------------------------------------
# the server


class _Handler(http.server.SimpleHTTPRequestHandler):
    log: list[tuple[str, int]]  # set on the subclass made per server

    def log_request(self, code="-", size="-"):  # record instead of printing
        try:
            status = int(getattr(code, "value", code))
        except (TypeError, ValueError):
            status = 0
        self.log.append((unquote(urlparse(self.path).path), status))

    def log_message(self, *args):
        pass


def serve(root: Path):
    log: list[tuple[str, int]] = []
    handler = type("Handler", (_Handler,), {"log": log})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    return httpd, log


# ---------------------------------------------------------------------------------------------
# the browser


def find_chromium(explicit: str | None) -> str:
    for name in ([explicit] if explicit else []) + ["chromium", "chromium-browser", "google-chrome", "chrome"]:
        path = shutil.which(name)
        if path:
            return path
    sys.exit("check_site: FAIL no chromium found (apt-get install -y chromium)")


def run_chromium(chromium: str, url: str, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="check_site_profile_") as profile:
        cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, url]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def external_requests(netlog: Path, origin: str) -> list[str]:
    """URLs outside the site that the page itself asked for (browser housekeeping excluded)."""
    try:
        data = json.loads(netlog.read_text(encoding="utf-8", errors="replace"))
    except (OSError, ValueError):
        text = netlog.read_text(encoding="utf-8", errors="replace") if netlog.exists() else ""
        data = json.loads(text.rstrip().rstrip(",") + "]}") if text else {}
    types = {v: k for k, v in data.get("constants", {}).get("logEventTypes", {}).items()}
    urls = []
    for event in data.get("events", []):
        params = event.get("params") or {}
        if types.get(event.get("type")) != "URL_REQUEST_START_JOB":
            continue
        if params.get("initiator") == origin and not params.get("url", "").startswith(origin):
            urls.append(params["url"])
    return sorted(set(urls))


# ---------------------------------------------------------------------------------------------
# the checks


def _classes(tag) -> set[str]:
    value = tag.get("class") or []
    return set(value if isinstance(value, list) else value.split())


def _snippet(tag, n=80) -> str:
    return re.sub(r"\s+", " ", tag.get_text(" ", strip=True))[:n]


def check_page(
    page: str,
    html_dir: Path,
    dom: str,
    static_html: str,
    served: list[tuple[str, int]],
    min_images: int,
    allow_stderr: bool,
) -> list[str]:
    fails = []
    soup = BeautifulSoup(dom, "html.parser")
    article = soup.find("article") or soup.find("main")
    page_path = "/" + page
    if (page_path, 200) not in served:
        fails.append(f"not served with HTTP 200 (got {[s for p, s in served if p == page_path]})")
    if article is None or not article.get_text(strip=True):
        fails.append("no article content in the rendered page")
        return fails
    missing = sorted({p for p, s in served if s >= 400 and p != "/favicon.ico"})
    for path in missing:
        fails.append(f"request failed: {path}")

    # MathJax: every math element of the built page typeset, none in error
    static = BeautifulSoup(static_html, "html.parser")
    n_math = len([t for t in static.find_all(["span", "div"]) if "math" in _classes(t)])
    n_typeset = len(soup.find_all("mjx-container"))
    if n_typeset < n_math:
        fails.append(f"MathJax typeset {n_typeset} of {n_math} math elements")
    for err in soup.find_all("mjx-merror"):
        fails.append(f"MathJax error: {err.get('data-mjx-error') or _snippet(err)}")

    # images of the article: local files that exist, are non-empty and were fetched
    local = 0
    for img in article.find_all("img"):
        src = img.get("src", "")
        if not src:
            fails.append(f"image without src: {img}"[:200])
            continue
        if src.startswith("data:"):
            local += 1
            continue
        absolute = urljoin(f"http://127.0.0.1/{page}", src)
        parsed = urlparse(absolute)
        if parsed.hostname != "127.0.0.1":
            continue  # external: judged by the request check
        path = unquote(parsed.path)
        file = html_dir / path.lstrip("/")
        if not file.is_file() or file.stat().st_size == 0:
            fails.append(f"image {src} missing or empty")
        elif (path, 200) not in served:
            fails.append(f"image {src} not fetched by the browser")
        else:
            local += 1
    if local < min_images:
        fails.append(f"{local} images in the article, expected at least {min_images}")

    # output cells: no tracebacks or stderr; no docutils errors or unresolved references
    for out in article.find_all(class_="output"):
        cls = _classes(out)
        cell = out.find_parent(class_="cell")
        expected = cell is not None and "tag_raises-exception" in _classes(cell)
        if "traceback" in cls and not expected:
            fails.append(f"error output: {_snippet(out)}")
        elif "stderr" in cls and not allow_stderr and not expected:
            fails.append(f"stderr output: {_snippet(out)}")
    for bad in article.find_all(class_=["system-message", "problematic"]):
        fails.append(f"docutils error in page: {_snippet(bad)}")
    return fails


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("html_dir", type=Path, help="the built site, e.g. _build/html")
    ap.add_argument(
        "pages",
        nargs="*",
        metavar="PAGE[:N]",
        help="more pages to check, relative to HTML_DIR; N overrides --min-images",
    )
    ap.add_argument("--front-page", default=FRONT_PAGE, help=f"default {FRONT_PAGE}")
    ap.add_argument(
        "--min-images", type=int, default=1, help="images required on each PAGE given (not the front page); default 1"
    )
    ap.add_argument("--allow-stderr", action="store_true", help="accept stderr output cells")
    ap.add_argument(
        "--allow-external",
        action="append",
        default=None,
        metavar="REGEX",
        help="external URL a page may request (repeatable); default: the Colab badge",
    )
    ap.add_argument("--screenshots", type=Path, help="keep PNG screenshots in this folder")
    ap.add_argument("--budget-ms", type=int, default=10000, help="virtual time per page")
    ap.add_argument("--timeout", type=float, default=120, help="wall-clock seconds per browser run")
    ap.add_argument("--chromium", help="browser binary (default: chromium on PATH)")
    args = ap.parse_args(argv)

    html_dir = args.html_dir.resolve()
    if not (html_dir / args.front_page).is_file():
        print(f"check_site: FAIL {args.front_page}: not found in {html_dir}")
        return 1
    allow = [
        re.compile(p) for p in (args.allow_external if args.allow_external is not None else DEFAULT_ALLOW_EXTERNAL)
    ]
    chromium = find_chromium(args.chromium)
    pages = [(args.front_page, 0)]
    for spec in args.pages:
        page, _, n = spec.partition(":")
        pages.append((page.lstrip("/"), int(n) if n else args.min_images))

    httpd, log = serve(html_dir)
    origin = f"http://127.0.0.1:{httpd.server_address[1]}"
    shots = args.screenshots or Path(tempfile.mkdtemp(prefix="check_site_shots_"))
    shots.mkdir(parents=True, exist_ok=True)
    failures, summary = [], []
    try:
        for page, min_images in pages:
            url = f"{origin}/{page}"
            if not (html_dir / page).is_file():
                failures.append(f"check_site: FAIL {page}: not found in {html_dir}")
                continue
            log.clear()
            with tempfile.TemporaryDirectory(prefix="check_site_net_") as tmp:
                netlog = Path(tmp) / "netlog.json"
                try:
                    res = run_chromium(
                        chromium,
                        url,
                        [f"--virtual-time-budget={args.budget_ms}", f"--log-net-log={netlog}", "--dump-dom"],
                        args.timeout,
                    )
                except subprocess.TimeoutExpired:
                    failures.append(f"check_site: FAIL {page}: browser timed out after {args.timeout}s")
                    continue
                served = list(log)
                external = external_requests(netlog, origin)
            fails = []
            if res.returncode != 0 or not res.stdout.strip():
                tail = res.stderr.strip().splitlines()[-1:] or [""]
                fails.append(f"browser exited {res.returncode} with no DOM: {tail[0][:200]}")
            else:
                static_html = (html_dir / page).read_text(encoding="utf-8", errors="replace")
                fails += check_page(page, html_dir, res.stdout, static_html, served, min_images, args.allow_stderr)
            for ext in external:
                if not any(p.search(ext) for p in allow):
                    fails.append(f"external request: {ext}")

            png = shots / (page.replace("/", "__").removesuffix(".html") + ".png")
            try:
                run_chromium(
                    chromium,
                    url,
                    [f"--virtual-time-budget={args.budget_ms}", "--window-size=1280,1600", f"--screenshot={png}"],
                    args.timeout,
                )
            except subprocess.TimeoutExpired:
                pass
            if not png.is_file() or png.stat().st_size == 0:
                fails.append("no screenshot written")
            failures += [f"check_site: FAIL {page}: {f}" for f in fails]
            dom = BeautifulSoup(res.stdout or "", "html.parser")
            summary.append(
                f"{page} ({len(dom.find_all('mjx-container'))} math, "
                f"{len((dom.find('article') or dom).find_all('img'))} img)"
            )
    finally:
        httpd.shutdown()
        httpd.server_close()

    for line in failures:
        print(line)
    if failures:
        return 1
    print(f"check_site: OK {len(pages)} pages: {', '.join(summary)}; screenshots in {shots}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
