"""Which Prefect API a command talks to: PREFECT_API_URL when set, else a `transfer-flow server` answering at
the default address, else (for flow commands) a temporary server Prefect starts for the process."""
from __future__ import annotations

import ipaddress

from transfer_flow.storage.errors import SettingsError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4200


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{shown}:{port}/api"


def running_local_server(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> str | None:
    """The API URL of a server answering at the default `transfer-flow server` address, else None.

    Lets a plain `transfer-flow run` use a server that is already up (its runs then show in the UI)
    instead of paying ~6 s for a temporary one; a refused connection answers at once.
    """
    import httpx

    url = api_url(host, port)
    try:
        return url if httpx.get(f"{url}/health", timeout=0.5).status_code == 200 else None
    except httpx.HTTPError:
        return None


def require_api_url() -> str:
    """The configured Prefect API, or a user error: events sent nowhere would be lost silently."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise SettingsError(
            "PREFECT_API_URL is not set: start a server with `transfer-flow server` and export "
            "the PREFECT_API_URL it prints (a temporary server has no triggers or schedules to serve)"
        )
    return str(url)
