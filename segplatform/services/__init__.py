"""Local services the platform starts for tests and for ``segplatform local`` (S3 server)."""

from segplatform.services.seaweed import SeaweedError, SeaweedServer, weed_binary

__all__ = ["SeaweedError", "SeaweedServer", "weed_binary"]
