"""Whether a download can start here: a quick connection to the host, so that a machine without a network fails
in seconds with one sentence instead of after a minute of retries (the hub client's, torchvision's)."""
import socket
import urllib.parse
import urllib.request


def unreachable(url: str, timeout: float = 3.0) -> str:
    """Why `url`'s host cannot be reached ('' when it accepts a connection), through the proxy for its scheme
    when one is set (https_proxy, http_proxy)."""
    parsed = urllib.parse.urlparse(url)
    proxy = urllib.request.getproxies().get(parsed.scheme)
    target = urllib.parse.urlparse(proxy) if proxy else parsed
    host, port = target.hostname, target.port or (443 if target.scheme == 'https' else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        what = f'the proxy {host}:{port} (for {parsed.hostname})' if proxy else host
        return f'{what} cannot be reached ({e.strerror or type(e).__name__})'
    return ''
