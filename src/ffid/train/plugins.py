"""The opt-in for code that a training config names by a dotted path.

``model_type = "package.module:factory"`` and a dotted ``optimizer_type`` import a module and
call what it names. A config file can come from anywhere (one shipped with a dataset, say), so
importing and calling what it names is refused unless the person running ffid asked for it:
``ffid train --allow_plugins`` or ``FFID_ALLOW_PLUGINS=1`` in the environment. No config key can
give that permission, since the config is what is not trusted (compare transformers'
``trust_remote_code``). Built-in tasks and optimizers, tasks registered under the ``ffid.tasks``
entry point by an installed distribution (the user chose to install it), and torch's own
optimizers (``torch.optim.RAdam``: torch is imported anyway and the class is checked to be an
optimizer before it is called) need no permission.
"""

from __future__ import annotations

import os

from ..errors import ConfigError

ENV_ALLOW = "FFID_ALLOW_PLUGINS"
FLAG = "--allow_plugins"


def plugins_allowed() -> bool:
    """Whether this process may import and call code a config names (``FFID_ALLOW_PLUGINS``)."""
    value = os.environ.get(ENV_ALLOW, "").strip()
    if value in ("", "0"):
        return False
    if value == "1":
        return True
    raise ConfigError(f"{ENV_ALLOW}={value!r} is not 0 or 1; set {ENV_ALLOW}=1 to allow plugins, or unset it")


def allow_plugins() -> None:
    """Give this process (and processes it starts) the permission: what ``--allow_plugins`` does."""
    os.environ[ENV_ALLOW] = "1"


def check_plugin(key: str, value: str) -> None:
    """Refuse ``key = value`` (a dotted path the trainer would import and call) without the opt-in."""
    if plugins_allowed():
        return
    raise ConfigError(
        f"{key} {value!r} would import and run code named by the config; if you trust it, pass "
        f"{FLAG} to ffid train (or set {ENV_ALLOW}=1), otherwise use a built-in or installed name"
    )


__all__ = ["ENV_ALLOW", "FLAG", "allow_plugins", "check_plugin", "plugins_allowed"]
