"""Local HTTP simulators of the targets (Mailchimp, HubSpot, WooCommerce, a Standard Webhooks receiver)."""

from connectors.sandbox.core import Faults, SandboxServer, Simulator
from connectors.sandbox.runner import Sandboxes, build_simulator, start_sandboxes

__all__ = ["Faults", "SandboxServer", "Sandboxes", "Simulator", "build_simulator", "start_sandboxes"]
