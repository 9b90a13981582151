"""The policy: YAML validated into an immutable snapshot, hot-reloaded when its file changes."""

from extauthz.policy.loader import PolicyError, Snapshot, load_default, load_policy, parse_policy
from extauthz.policy.model import Policy

__all__ = ["Policy", "PolicyError", "Snapshot", "load_default", "load_policy", "parse_policy"]
