"""Downloads into the Keras cache, with a timeout that covers name resolution too."""

import concurrent.futures
import socket
import urllib.error
import urllib.parse
import urllib.request

from common import atomic


class DownloadError(OSError):
    """A download failed; the message says why (no network, refused, HTTP status...)."""


def download(url, path, timeout=10):
    """Fetches `url` into `path` atomically.

    Args:
        url: What to fetch.
        path: Where to store it (its folder is created).
        timeout: Seconds for resolving the host and for each network read.

    Raises:
        DownloadError: naming the cause.
    """
    host = urllib.parse.urlsplit(url).hostname
    # getaddrinfo ignores socket timeouts: without a network it can hang for minutes.
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        pool.submit(socket.getaddrinfo, host, 443).result(timeout=timeout)
    except concurrent.futures.TimeoutError:
        raise DownloadError(f"resolving {host} took over {timeout:.0f} s (no network?)") from None
    except OSError as e:
        raise DownloadError(f"cannot resolve {host} ({e})") from None
    finally:
        pool.shutdown(wait=False)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
    except urllib.error.HTTPError as e:
        raise DownloadError(f"{url} answered HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise DownloadError(f"downloading {url} failed ({getattr(e, 'reason', e)})") from None
    atomic.write_bytes(path, data)
    return path
