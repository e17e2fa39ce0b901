"""Open a report in headless Chromium, the way a person would, and list the images that did not load.

The report folder is served on loopback; a same-origin checker page loads report.html in an iframe
and records, for every <img>, whether the browser decoded it (complete and naturalWidth > 0), and what
a reader sees first: the title, the summary line (#summary) and the 95% intervals (.ci) as rendered.
"""

from __future__ import annotations

import functools
import html
import http.server
import json
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

CHECKER = """<!doctype html><html><body><pre id="result">pending</pre>
<iframe id="f" src="/{page}" width="1200" height="900"></iframe>
<script>
document.getElementById('f').addEventListener('load', function () {{
  var imgs = Array.from(this.contentDocument.images);
  var bad = imgs.filter(function (i) {{ return !(i.complete && i.naturalWidth > 0); }})
               .map(function (i) {{ return i.getAttribute('src'); }});
  var doc = this.contentDocument, summary = doc.getElementById('summary'), h1 = doc.querySelector('h1');
  var shown = function (e) {{ var r = e.getBoundingClientRect(); return r.width > 0 && r.height > 0; }};
  var cis = Array.from(doc.querySelectorAll('.ci'));
  document.getElementById('result').textContent = 'RESULT' + JSON.stringify({{
    total: imgs.length, bad: bad, title: h1 ? h1.innerText : null,
    summary: summary && shown(summary) ? summary.innerText : null,
    summary_intervals: summary ? Array.from(summary.querySelectorAll('.ci')).filter(shown)
                                   .map(function (e) {{ return e.innerText; }}) : [],
    intervals: cis.filter(shown).length, hidden_intervals: cis.length - cis.filter(shown).length,
    marks: Array.from(doc.querySelectorAll('.mark')).filter(shown).map(function (e) {{ return e.innerText; }})
  }}) + 'END';
}});
</script></body></html>"""


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def check_images(html_file: Path, chromium: str | None = None, timeout: float = 60.0) -> dict:
    """As seen by a real browser: {'total': N images, 'bad': [src that did not load, ...], 'title': the h1's
    text, 'summary': the summary line's text (None: absent or not displayed), 'summary_intervals': its intervals'
    texts, 'intervals': how many .ci are displayed, 'hidden_intervals': how many are not, 'marks': the verdict
    marks (✓ / ✗) displayed over the paired samples}."""
    html_file = Path(html_file).resolve()
    chromium = chromium or find_chromium()
    if chromium is None:
        raise RuntimeError("no chromium on PATH (apt-get install chromium)")
    root = html_file.parent

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if self.path.startswith("/__check__.html"):
                body = CHECKER.format(page=html_file.name).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            super().do_GET()

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with tempfile.TemporaryDirectory() as profile:
            cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                   "--disable-background-networking", "--disable-component-update", "--disable-sync",
                   f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom",
                   f"http://127.0.0.1:{server.server_address[1]}/__check__.html"]
            dom = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout
    finally:
        server.shutdown()
    m = re.search(r"RESULT(.*?)END", dom, re.S)
    if not m:
        raise RuntimeError("the browser did not finish loading the report")
    return json.loads(html.unescape(m.group(1)))


if __name__ == "__main__":  # python tests/browser_check.py runs/report/report.html
    import sys

    res = check_images(Path(sys.argv[1]))
    print(json.dumps(res, ensure_ascii=False))
    sys.exit(0 if res["total"] > 0 and not res["bad"] and res["summary"] and res["intervals"] else 1)
