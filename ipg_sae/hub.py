"""The Hugging Face hub: one quick probe before a download, so a missing network costs seconds.

``huggingface_hub`` and ``datasets`` retry a failed download for about a minute before they give
up. Every place that may download (a model, a dataset, a published SAE) first checks its local
cache and, when the files are not there, calls :func:`unreachable` once.
"""

from __future__ import annotations


def unreachable(timeout: float = 3.0) -> str | None:
    """None when the Hugging Face hub accepts a connection within ``timeout`` seconds, else why not: one probe,
    so that a missing network costs seconds instead of a minute of retries."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout):
            return None
    except OSError as e:
        return f"{url.hostname}: {e.strerror or e}"
