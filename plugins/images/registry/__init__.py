"""The images plugin's registry client: resolve, authenticate, fetch (it stores nothing).

Modules, by layer:

* :mod:`.reference`: image references, parsed and normalized (``busybox`` ->
  ``docker.io/library/busybox:latest``);
* :mod:`.platforms`: ``linux/arm64/v8`` and the choice of a manifest in an index;
* :mod:`.manifests`: OCI and Docker schema 2 media types, manifest and index parsing;
* :mod:`.config`: the ``hosts`` and retry keys of the images plugin's config.toml table;
* :mod:`.hosts`: the ordered endpoints of a registry host (config.toml, containerd's
  hosts.toml directory, defaults) and their credentials;
* :mod:`.auth`: the ``WWW-Authenticate`` flow (basic, bearer tokens), cached;
* :mod:`.client`: :class:`RegistryClient`, :class:`Repository` and :class:`BlobStream`
  (retries, mirrors, resumable and verified downloads).
"""

from daemon.reference import Reference, parse_reference
from plugins.images.registry.client import BlobStream, RegistryClient, Repository, RetryPolicy
from plugins.images.registry.config import HostConfig, RegistryConfig
from plugins.images.registry.hosts import Credentials, Endpoint, RegistryHosts
from plugins.images.registry.manifests import Index, IndexEntry, Manifest
from plugins.images.registry.platforms import Platform, default_platform, parse_platform, select_manifest

__all__ = [
    "BlobStream",
    "Credentials",
    "Endpoint",
    "HostConfig",
    "Index",
    "IndexEntry",
    "Manifest",
    "Platform",
    "Reference",
    "RegistryClient",
    "RegistryConfig",
    "RegistryHosts",
    "Repository",
    "RetryPolicy",
    "default_platform",
    "parse_platform",
    "parse_reference",
    "select_manifest",
]
