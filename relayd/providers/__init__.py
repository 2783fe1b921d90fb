"""The providers relayd can poll, one module each behind the `Provider` protocol
(`providers/base.py`); `build` makes one for each provider table of the config."""

from __future__ import annotations

from collections.abc import Callable

from relayd.config import Config, ProviderConfig
from relayd.providers.aitronos import AitronosProvider
from relayd.providers.base import Provider
from relayd.providers.xosum import XosumProvider

KINDS: dict[str, Callable[[ProviderConfig], Provider]] = {
    "xosum": XosumProvider,
    "aitronos": AitronosProvider,
}


def build(config: Config) -> dict[str, Provider]:
    """One provider per table (the config allows only the kinds above)."""
    return {name: KINDS[pc.kind](pc) for name, pc in config.providers.items()}
