"""Network policies.

The sandbox has no network of its own; everything it sends must leave
through heel's proxy, which asks the policy.  :class:`DenyAll`, the default,
means no network at all, not even loopback.
"""

from __future__ import annotations

__all__ = ["NetworkPolicy", "DenyAll"]


class NetworkPolicy:
    """Base of all network policies."""

    #: True when the policy can never allow anything: no proxy is started and
    #: the sandbox gets no TCP at all.
    denies_everything: bool = False


class DenyAll(NetworkPolicy):
    """No network: no TCP, no UDP, no DNS, not even loopback."""

    denies_everything = True

    def __repr__(self) -> str:
        return "DenyAll()"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DenyAll)

    def __hash__(self) -> int:
        return hash(DenyAll)
