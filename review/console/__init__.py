"""The review console: web pages for reviewers, a bearer-token JSON API, /metrics and /healthz.

Security model, in short:
- Every route but the login page and /static needs a user: pages a session (cookie
  HttpOnly, SameSite=Strict, Secure unless `secure_cookies=False`; server-side in Redis),
  the API (/api/v1) a bearer token, /metrics and /healthz either. Anonymous page requests
  are redirected to the login page, everything else gets 401.
- Every POST from a page carries the session's synchronizer CSRF token (the login form a
  double-submit cookie); a missing or wrong token is 403. The API takes no cookies, so it
  needs no CSRF token.
- Headers on every response: a CSP with no inline script or style (JS and CSS are static
  files), frame-ancestors 'none' + X-Frame-Options DENY, Referrer-Policy same-origin (nothing leaves
  the console; with no-referrer a browser sends `Origin: null` on its own forms), nosniff; a
  POST whose Origin is another origin (another port included) is refused.
- Post text is rendered by jinja2 with autoescape on; images only through /media (see
  media_proxy.py), and only to the reviewer who holds the item, or an admin.
- A decision goes to Kafka (acks=all, awaited) before its Redis entry is acknowledged: when
  Kafka fails the reviewer sees the error and keeps the claim.
- A claim is kept alive while its page is open: the page's script renews it every
  claim_timeout/3 (POST /review/{entry_id}/renew, CSRF-checked like every page POST) and, when
  the renewal says the claim was lost, locks the form. A submit renews the claim (owner-checked)
  right before producing the decision and closes the item only if the submitter still holds
  it; a reviewer who lost it gets 409 and a page that says so, never a 500.

The package, by concern: core (settings, services, identity), metrics, middlewares, base
(what the handlers share), login, pages (the reviewer's), admin, api (JSON and operations),
app (routes, the operations app, `serve`).
"""

from review.console.app import CONSOLE_KEY, Handlers, create_app, create_ops_app, serve
from review.console.core import Console, ConsoleConfig, Identity
from review.console.metrics import Metrics

__all__ = [
    "CONSOLE_KEY",
    "Console",
    "ConsoleConfig",
    "Handlers",
    "Identity",
    "Metrics",
    "create_app",
    "create_ops_app",
    "serve",
]
