"""The HTML challenge page a browser gets with a 401: solve proof-of-work (or a CAPTCHA), get a pass.

The page is self-contained: inline CSS, one constant inline script, and a JSON data block that
carries the per-request values (so nothing request-specific is ever spliced into JavaScript). The
script starts Web Workers, made from a Blob of inline code, that hash ``f"{token}:{nonce}"`` with
Web Crypto's SHA-256 until the digest has ``difficulty`` leading zero bits; then it repeats the
request with ``x-extauthz-pow: <token>:<nonce>``, the guard answers with the ``extauthz_pass``
cookie, and the page reloads onto the API. With a CAPTCHA widget the page embeds the provider's
widget instead, and its callback repeats the request with ``x-extauthz-captcha: <widget token>``.

Serve the page with the Content-Security-Policy from ``page_csp`` (``PAGE_CSP`` without a widget):
the inline script is allowed by its SHA-256 hash, with ``'unsafe-inline'`` kept only as the
fallback for browsers older than CSP level 2, which ignore it when a hash is present.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import html
import json
import math
from typing import Final

from extauthz.challenge.captcha import CaptchaWidget

POW_HEADER: Final = "x-extauthz-pow"
CAPTCHA_HEADER: Final = "x-extauthz-captcha"
# The browser-side callback name a provider widget calls with its token (data-callback).
CAPTCHA_CALLBACK: Final = "extauthzCaptchaSolved"

_STYLE: Final = """
:root{color-scheme:light dark;font-family:system-ui,-apple-system,"Segoe UI",sans-serif}
body{margin:0;min-height:100vh;display:grid;place-items:center;background:#f4f5f7;color:#1d2330}
main{max-width:34rem;margin:1rem;padding:2rem;background:#fff;border-radius:12px;
box-shadow:0 2px 12px rgba(0,0,0,.08)}
h1{font-size:1.35rem;margin:0 0 .75rem}
p{line-height:1.5;margin:.5rem 0}
progress{width:100%;height:1rem;margin:.75rem 0}
#stats{font-variant-numeric:tabular-nums;color:#555;font-size:.9rem}
#status{font-weight:600}
#status[data-state=error]{color:#b3261e}
#status[data-state=done]{color:#1e7d32}
button{margin-top:.75rem;padding:.5rem 1rem;font:inherit;cursor:pointer}
.captcha{margin:1rem 0}
small{color:#666}
@media (prefers-color-scheme:dark){body{background:#15181e;color:#e6e8ec}
main{background:#1f232b;box-shadow:none}#stats,small{color:#aab}}
"""

# Runs inside each Web Worker: batches of 256 digests in flight at once (Promise.all) keep
# Web Crypto busy; worker ``index`` of ``count`` takes every count-th batch, so workers never
# hash the same nonce. Progress is posted every 16 batches (4096 hashes).
_WORKER_JS: Final = r"""
const BATCH = 256;
function zeroBits(bytes) {
  let bits = 0;
  for (let i = 0; i < bytes.length; i++) {
    const b = bytes[i];
    if (b === 0) { bits += 8; continue; }
    return bits + Math.clz32(b) - 24;
  }
  return bits;
}
self.onmessage = async (event) => {
  const { token, difficulty, index, count } = event.data;
  const encoder = new TextEncoder();
  const prefix = token + ':';
  let sinceReport = 0;
  for (let batch = index; ; batch += count) {
    const first = batch * BATCH;
    const pending = new Array(BATCH);
    for (let i = 0; i < BATCH; i++) {
      pending[i] = crypto.subtle.digest('SHA-256', encoder.encode(prefix + (first + i)));
    }
    const digests = await Promise.all(pending);
    for (let i = 0; i < BATCH; i++) {
      if (zeroBits(new Uint8Array(digests[i])) >= difficulty) {
        self.postMessage({ tried: sinceReport + i + 1, nonce: String(first + i) });
        return;
      }
    }
    sinceReport += BATCH;
    if (sinceReport >= 16 * BATCH) {
      self.postMessage({ tried: sinceReport });
      sinceReport = 0;
    }
  }
};
"""

# The page script's source; ``_build_page_js`` fills in the header names and the worker code.
_PAGE_JS_TEMPLATE: Final = r"""
(() => {
  'use strict';
  const POW_HEADER = __POW_HEADER__;
  const CAPTCHA_HEADER = __CAPTCHA_HEADER__;
  const CAPTCHA_CALLBACK = __CAPTCHA_CALLBACK__;
  const WORKER_SOURCE = __WORKER_SOURCE__;
  const cfg = JSON.parse(document.getElementById('extauthz-challenge').textContent);
  const $ = (id) => document.getElementById(id);
  const status = $('status');
  const setStatus = (text, state) => {
    status.textContent = text;
    status.dataset.state = state || '';
  };
  const fmt = (n) => Math.round(n).toLocaleString('en-US');
  const showRetry = () => { $('retry').hidden = false; };
  $('retry').addEventListener('click', () => location.reload());

  const expired = () => Date.now() / 1000 > cfg.expires_at;

  async function redeem(headers, what) {
    setStatus('Verifying the ' + what + ' with the server\u2026', 'busy');
    let resp;
    try {
      resp = await fetch(cfg.retry_url, {
        headers: Object.assign({ accept: 'text/html' }, headers),
        credentials: 'same-origin',
        cache: 'no-store',
        redirect: 'follow',
      });
    } catch (err) {
      setStatus('Could not reach the server: ' + err + '. Reload to try again.', 'error');
      showRetry();
      return;
    }
    if (resp.status === 401) {
      setStatus('The server did not accept the ' + what + (expired() ? ' (the challenge expired)' : '') +
        '. Reload to get a new challenge.', 'error');
      showRetry();
      return;
    }
    if (resp.status >= 400) {
      setStatus('The server answered ' + resp.status + ' ' + resp.statusText + '.', 'error');
      showRetry();
      return;
    }
    setStatus('Verified. Loading the page\u2026', 'done');
    const target = new URL(cfg.retry_url, location.href);
    if (target.href === location.href) { location.reload(); } else { location.replace(target.href); }
  }

  if (cfg.captcha) {
    window[CAPTCHA_CALLBACK] = (widgetToken) => redeem({ [CAPTCHA_HEADER]: String(widgetToken) }, 'check');
    setStatus('Complete the check below to continue.', 'wait');
    return;
  }

  if (!window.crypto || !crypto.subtle || typeof Worker === 'undefined') {
    setStatus('This browser cannot solve the challenge here: it needs Web Workers and Web Crypto, ' +
      'which browsers offer only over HTTPS.', 'error');
    return;
  }

  const expected = Math.pow(2, cfg.difficulty);
  const bar = $('bar');
  bar.max = expected;
  $('expected').textContent = fmt(expected);
  const count = Math.max(1, Math.min(navigator.hardwareConcurrency || 2, 8));
  const source = URL.createObjectURL(new Blob([WORKER_SOURCE],
    { type: 'text/javascript' }));
  const workers = [];
  const started = performance.now();
  let tried = 0;
  let solved = false;
  const stopAll = () => { workers.forEach((w) => w.terminate()); URL.revokeObjectURL(source); };
  const onMessage = (event) => {
    if (solved) return;
    tried += event.data.tried;
    const seconds = (performance.now() - started) / 1000;
    $('tried').textContent = fmt(tried);
    $('rate').textContent = seconds > 0 ? fmt(tried / seconds) : '0';
    bar.value = Math.min(tried, expected);
    if (event.data.nonce !== undefined) {
      solved = true;
      stopAll();
      setStatus('Solved after ' + fmt(tried) + ' hashes.', 'busy');
      redeem({ [POW_HEADER]: cfg.token + ':' + event.data.nonce }, 'solution');
    }
  };
  const onError = (event) => {
    if (solved) return;
    solved = true;
    stopAll();
    setStatus('The solver failed: ' + (event.message || 'worker error') + '.', 'error');
    showRetry();
  };
  for (let index = 0; index < count; index++) {
    const worker = new Worker(source);
    worker.onmessage = onMessage;
    worker.onerror = onError;
    worker.postMessage({ token: cfg.token, difficulty: cfg.difficulty, index, count });
    workers.push(worker);
  }
  setStatus('Working\u2026 (' + count + ' worker' + (count > 1 ? 's' : '') + ')', 'busy');
})();
"""


def _build_page_js() -> str:
    """Fill the constants into the page script and check that nothing in it can end the
    <script> element it is inlined into."""
    script = (
        _PAGE_JS_TEMPLATE.replace("__POW_HEADER__", json.dumps(POW_HEADER))
        .replace("__CAPTCHA_HEADER__", json.dumps(CAPTCHA_HEADER))
        .replace("__CAPTCHA_CALLBACK__", json.dumps(CAPTCHA_CALLBACK))
        .replace("__WORKER_SOURCE__", json.dumps(_WORKER_JS))
    )
    lowered = script.lower()
    if "</script" in lowered or "<!--" in lowered:
        raise AssertionError("the inline page script must not contain </script or <!--")
    return script


# The page's one inline script. Constant, so its CSP hash is computed once at import.
_PAGE_JS: Final = _build_page_js()


def _csp_hash(script: str) -> str:
    digest = hashlib.sha256(script.encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


_SCRIPT_HASH: Final = _csp_hash(_PAGE_JS)


def page_csp(captcha: CaptchaWidget | None = None) -> str:
    """Return the Content-Security-Policy to send with a page rendered for ``captcha``.

    Allow only what the page uses: its own inline script and styles, Blob workers, fetches to
    its own origin, data: images, and the provider's hosts for scripts, frames, styles and
    connections when a widget is embedded.
    """
    extra = ""
    frames = "'none'"
    if captcha is not None:
        sources = " ".join(_csp_source(s) for s in (captcha.csp_sources or (captcha.origin,)))
        extra = " " + sources
        frames = sources
    return (
        "default-src 'none'; "
        f"script-src {_SCRIPT_HASH} 'unsafe-inline'{extra}; "
        "worker-src blob:; "
        f"connect-src 'self'{extra}; "
        f"style-src 'unsafe-inline'{extra}; "
        f"frame-src {frames}; "
        "img-src data:; "
        "base-uri 'none'; "
        "form-action 'self'; "
        "frame-ancestors 'none'"
    )


PAGE_CSP: Final = page_csp(None)


def _csp_source(source: str) -> str:
    """Refuse a CSP source expression that could end a directive or add a keyword."""
    bad = any(c in source for c in ";,'\"\r\n\t ")
    if bad or not source.startswith(("https://", "http://")):
        raise ValueError(f"not an http(s) CSP source: {source!r}")
    return source


def _json_for_script(value: object) -> str:
    """Serialize ``value`` for a <script type="application/json"> block: no ``<``, ``>`` or ``&``
    survive, so no ``</script>`` or ``<!--`` can end or bend the block."""
    text = json.dumps(value, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_challenge_page(
    *,
    token: str,
    difficulty: int,
    expires_at: float,
    retry_url: str,
    captcha: CaptchaWidget | None = None,
) -> bytes:
    """Render the challenge page as UTF-8 HTML bytes.

    ``token`` is the signed proof-of-work challenge, ``difficulty`` the leading zero bits asked
    for, ``expires_at`` the challenge's expiry in epoch seconds, ``retry_url`` the URL the page
    repeats with the solution (the request that got the 401; same origin, as CSP allows only
    ``connect-src 'self'``). With ``captcha`` the page shows the provider's widget instead of
    solving proof-of-work.
    """
    if not 0 <= difficulty <= 64:
        raise ValueError(f"difficulty must be within 0..64 bits, got {difficulty!r}")
    if not math.isfinite(expires_at):
        raise ValueError(f"expires_at must be finite, got {expires_at!r}")
    config = {
        "token": token,
        "difficulty": int(difficulty),
        "expires_at": float(expires_at),
        "retry_url": retry_url,
        "captcha": captcha is not None,
    }
    esc = html.escape
    expected = f"{2**difficulty:,}"
    if captcha is None:
        body = f"""<h1>Checking your browser</h1>
<p>This API asks browsers to do a little work before it answers, which keeps automated
scraping expensive. Your browser is computing a proof of work now; it usually takes a few
seconds and the page then continues by itself.</p>
<progress id="bar" value="0" max="1">working</progress>
<p id="stats">Hashes tried: <span id="tried">0</span> of about <span id="expected">{esc(expected)}</span>
expected (<span id="rate">0</span>/s) at difficulty {int(difficulty)}.</p>"""
    else:
        body = f"""<h1>One quick check</h1>
<p>This API asks browsers to pass a short check before it answers, which keeps automated
scraping expensive.</p>
<div class="captcha {esc(captcha.div_class)}" data-sitekey="{esc(captcha.site_key)}"
 data-callback="{CAPTCHA_CALLBACK}"></div>"""
    script_tag = (
        f'<script src="{esc(captcha.script_url)}" async defer></script>\n'
        if captcha is not None
        else ""
    )
    page = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex">
<title>Checking your browser</title>
<style>{_STYLE}</style>
</head>
<body>
<main>
{body}
<p id="status" role="status" aria-live="polite">Starting\u2026</p>
<button id="retry" type="button" hidden>Start again</button>
<noscript><p><strong>JavaScript is needed.</strong> This API answers browsers only after they
solve a short challenge, which needs JavaScript. Enable it and reload, or call the API with an
API key from a program instead.</p></noscript>
<p><small>Challenge expires at {esc(_utc(expires_at))} UTC.</small></p>
</main>
<script type="application/json" id="extauthz-challenge">{_json_for_script(config)}</script>
<script>{_PAGE_JS}</script>
{script_tag}</body>
</html>
"""
    return page.encode("utf-8")


def _utc(epoch_s: float) -> str:
    """Format an epoch second as ``YYYY-MM-DD HH:MM:SS`` (UTC) without reading the clock."""
    try:
        moment = datetime.datetime.fromtimestamp(epoch_s, tz=datetime.UTC)
    except (OverflowError, OSError, ValueError):
        return "an unknown time"
    return moment.strftime("%Y-%m-%d %H:%M:%S")
