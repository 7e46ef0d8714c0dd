"""The router: a learned two-level classifier (group, then expert) and a pure routing policy."""

from router.domains import DEFAULT_EXPERT, DOMAINS, GROUP_NAMES, GROUP_OF, GROUPS
from router.model import RouterConfig, RouterModel, RouterOutput
from router.policy import Decision, decide, default_decision
from router.router import Router, load_router

__all__ = ["DEFAULT_EXPERT", "DOMAINS", "GROUPS", "GROUP_NAMES", "GROUP_OF", "Decision", "Router",
           "RouterConfig", "RouterModel", "RouterOutput", "decide", "default_decision", "load_router"]
