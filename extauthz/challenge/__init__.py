"""Challenges a client pays before it may continue: proof of work, then a signed pass.

:mod:`extauthz.challenge.pow` issues and verifies stateless Hashcash-style challenges,
:mod:`extauthz.challenge.passes` issues and reads the pass a solved challenge buys, and
:mod:`extauthz.challenge.client` answers challenges for API clients (``extauthz solve``).
Single use of a challenge and the budget of a pass are kept by the caller in its store.
"""

from __future__ import annotations

from extauthz.challenge.passes import (
    Pass,
    PassCheck,
    issue_pass,
    pass_from_headers,
    read_pass,
    set_cookie_value,
)
from extauthz.challenge.pow import Challenge, Verified, issue, leading_zero_bits, solve, verify

__all__ = [
    "Challenge",
    "Pass",
    "PassCheck",
    "Verified",
    "issue",
    "issue_pass",
    "leading_zero_bits",
    "pass_from_headers",
    "read_pass",
    "set_cookie_value",
    "solve",
    "verify",
]
